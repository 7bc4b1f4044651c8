"""``kdcli soft-targets``: run teachers over data and write a transfer set."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kdcli import __version__
from kdcli.checks import (
    check_batch_size,
    check_precision,
    check_seed,
    check_temperature,
    parse_size,
    precision_note,
    resolve_device,
    resolve_precision,
)
from kdcli.data.augment import AugmentConfig
from kdcli.data.base import Data, TableColumns, table_columns
from kdcli.data.text_augment import TextAugment
from kdcli.errors import DataError, ModelError, UsageError
from kdcli.io.files import check_output, data_files
from kdcli.output import Reporter, Timer
from kdcli.teachers.base import Teacher, TeacherOptions
from kdcli.teachers.formats import check_teacher_options, load_teacher, one_class_order
from kdcli.teachers.inputs import describe_preprocessing
from kdcli.transfer.ensemble import COMBINE_RULES
from kdcli.transfer.layout import (
    COLUMNS_VERSION,
    INDEX_SUFFIX,
    TENSOR_VERSION,
    TEXT_VERSION,
    TRANSFER_FORMAT,
    is_index_path,
)
from kdcli.transfer.targets import check_form_options, chosen_form
from kdcli.transfer.writer import (
    RangeWriter,
    Source,
    check_room,
    check_sharded_output,
    write_set,
)

if TYPE_CHECKING:
    from kdcli.data.base import DataOptions


# The default T for teachers that output logits (the paper's MNIST value), and for teachers
# whose outputs are probabilities (tree ensembles, classifiers converted with a softmax):
# their log-probabilities are already soft, and at T = 20 p^(1/T) is close to uniform. On
# scikit-learn's digits a random forest's students made 108 errors at T = 20 and 27 at T = 2
# (benchmarks/bench_tables.py).
LOGITS_T = 20.0
PROBS_T = 2.0


def default_temperature(members: list[Teacher]) -> float:
    """:data:`PROBS_T` when every teacher outputs probabilities or log-probabilities, else
    :data:`LOGITS_T`."""
    return PROBS_T if all(t.output in ("probs", "log-probs") for t in members) else LOGITS_T




def soft_targets(
    teachers: list[str | Path], T: float | None = None, data: str = "mnist:train",
    out: str | Path = "transfer.safetensors", *, options: list[TeacherOptions] | None = None,
    combine: str = "mean-probs", weights: list[float] | None = None, batch_size: int = 1024,
    device: str = "auto", precision: str = "auto", classes: list[int] | None = None,
    exclude_classes: list[int] | None = None, limit: int | None = None,
    augment: AugmentConfig | None = None, copies: int = 0, seed: int = 0, jitter: int = 0,
    text_augment: TextAugment | None = None,
    top_k: int | None = None, targets_dtype: str = "float32",
    shard_size: str | int | None = None, force: bool = False,
    reporter: Reporter | None = None, data_options: DataOptions | None = None,
) -> dict[str, Any]:
    """Run one teacher or an ensemble over data and write a transfer set.

    Memory stays bounded whatever the number of examples: inputs are read, and targets
    written, a batch at a time. Under torchrun each rank runs the teachers on its own
    contiguous share of the rows; the result is the same set a single process writes.

    Args:
        teachers: Teacher model files; several form an ensemble.
        T: Softmax temperature. None: :func:`default_temperature` (the paper's 20 for
            teachers that output logits; 2 when every teacher outputs probabilities).
        data: Data spec (see :mod:`kdcli.data.sources`).
        out: Output transfer-set file, or an ``.index.json`` for a sharded set.
        options: Per-teacher :class:`TeacherOptions` (one for all, or one each).
        combine: ``mean-probs`` (the paper's arithmetic mean at T) or ``mean-logits``.
        weights: Per-teacher weights (default: equal).
        batch_size: Examples per teacher call.
        device: ``auto``, ``cpu`` or ``cuda``.
        precision: ``auto`` (bf16 autocast where the hardware has bf16 units, else fp32;
            see :func:`~kdcli.checks.resolve_precision`), ``fp32`` or ``bf16``.
        classes: Keep only examples with these labels.
        exclude_classes: Drop examples with these labels.
        limit: Use only the first N examples.
        augment: The augmentation of the copies (shared with ``kdcli train``).
        copies: How many augmented copies of each example to add.
        seed: Seed of the augmentation.
        jitter: Shorthand for ``augment=AugmentConfig(jitter=jitter)``.
        text_augment: The augmentation of the copies of texts (Tang et al. 2019; see
            :mod:`kdcli.data.text_augment`).
        top_k: Store only the K largest logits per example, their classes and the tail mass
            (None: all C logits and probabilities).
        targets_dtype: ``float32`` or ``float16``, the dtype of stored top-k logits.
        shard_size: Largest shard file, e.g. ``1GB``; needs an ``.index.json`` ``out``.
        force: Overwrite ``out`` if it exists.
        reporter: Where progress and tables go (default: quiet).
        data_options: How a table or image folder given as ``data`` is read.

    Returns:
        A summary: counts, per-teacher accuracy, disagreement, timing.
    """
    from kdcli.distributed import session

    rep = reporter or Reporter()
    # check every option before any file is read
    T = None if T is None else check_temperature(T)
    check_seed(seed)
    text_augment = text_augment or TextAugment()
    text_augment.check()
    augment = _check_options(teachers, combine=combine, precision=precision,
                             batch_size=batch_size, augment=augment, jitter=jitter,
                             copies=copies, top_k=top_k, targets_dtype=targets_dtype, rep=rep,
                             text=text_augment)
    max_shard = _max_shard(out, shard_size)
    weights, opts = _check_weights(weights, len(teachers)), _per_member(options, len(teachers))
    out = _check_out(out, force, inputs=[*teachers, *data_files(data)])
    for teacher, opt in zip(teachers, opts, strict=True):
        check_teacher_options(teacher, opt)  # before the data is read
    dev = resolve_device(device)
    precision, precision_shown = _precision(precision, dev)
    # read the data, then probe the teachers with its first batch
    source = _read(data, limit, data_options, classes, exclude_classes, copies,
                   (augment, text_augment), seed, rep)
    probe_x, probe_y = source.rows(0, min(source.n, batch_size))
    members = _load_members(teachers, opts, dev, precision, probe_x, rep,
                            table_columns(source.ds, data_options))
    T = _temperature(T, members, rep)
    members = _in_one_order(source.ds, members, rep)
    c, class_names = _classes(source.ds, members)
    form = chosen_form(top_k, targets_dtype, c, len(members), rep.info)
    # run them over all rows, writing the set a batch at a time
    with session(dev) as dist:
        writer = RangeWriter(members, source, weights, combine, T, form, batch_size, rep)
        check_room(out, source.n, writer)
        meta = _metadata(writer, dist, precision=precision, classes=classes,
                         exclude_classes=exclude_classes, class_names=class_names,
                         data_options=data_options)
        with Timer() as timer:
            shards = write_set(out, meta, writer, dist, force, max_shard, shard_size)
        stats = dist.all_reduce_sum(writer.stats)
    summary = _summary(out, writer, stats, has_labels=probe_y is not None, shards=shards,
                       ranks=dist.world, seconds=timer.seconds, class_names=class_names)
    summary.update(precision=precision, precision_shown=precision_shown)
    _show_summary(summary, members, rep, sharded=bool(shards), form=form.label())
    return summary


def _check_options(teachers: list[str | Path], *, combine: str, precision: str,
                   batch_size: int, augment: AugmentConfig | None, jitter: int, copies: int,
                   top_k: int | None, targets_dtype: str, rep: Reporter,
                   text: TextAugment) -> AugmentConfig:
    """Check soft_targets()'s options; return the augmentation of the copies."""
    if not teachers:
        raise UsageError("no teacher given", "Name at least one teacher file")
    if combine not in COMBINE_RULES:
        raise UsageError(f"unknown --combine {combine!r}", f"Use one of {', '.join(COMBINE_RULES)}")
    check_precision(precision)
    check_batch_size(batch_size, "Try 1024")
    augment = augment or AugmentConfig()
    if jitter:
        augment = replace(augment, jitter=jitter)
    augment.check()
    if copies < 0:
        raise UsageError(f"--copies must be 0 or more, got {copies}", "Try --copies 1")
    _check_copies_bound(copies)
    if copies and not augment.active and not text.active:
        raise UsageError("--copies needs an augmentation to make the copies differ",
                         "Add --jitter 2 or --augment crop-flip (images), or --word-mask 0.1 "
                         "(texts)")
    if augment.active and text.active:
        raise UsageError("image augmentation and text augmentation together",
                         "Give the one that fits the data")
    active = augment if augment.active else text if text.active else None
    if active is not None and not copies:
        rep.warn(f"augmentation ({active.describe()}) applies only to the copies, and "
                 "--copies is 0: add --copies 1 or more")
    check_form_options(top_k, targets_dtype)
    return augment


def _precision(precision: str, dev: str) -> tuple[str, str]:
    """``precision`` made concrete for ``dev``, and how the results table says it (with
    what auto chose and why)."""
    note = precision_note(precision, dev)
    chosen = resolve_precision(precision, dev)[0]
    return chosen, note or chosen


def _max_shard(out: str | Path, shard_size: str | int | None) -> int:
    """The largest shard file in bytes (``--shard-size`` needs an index as ``out``)."""
    if shard_size is not None and not is_index_path(out):
        raise UsageError(f"--shard-size writes a sharded set, which is named by its index file, "
                         f"not {out}", f"Use --out {Path(out).stem}{INDEX_SUFFIX}")
    return parse_size(shard_size if shard_size is not None else "1GB")


def _check_copies_bound(copies: int) -> None:
    """Refuse a --copies no run could finish (the row count is checked again with the data)."""
    from kdcli.resources import MAX_COPIES, check_count

    check_count(copies, "--copies", MAX_COPIES, "Try --copies 10")


def _read(data: str, limit: int | None, data_options: DataOptions | None,
          classes: list[int] | None, exclude_classes: list[int] | None, copies: int,
          augments: tuple[AugmentConfig, TextAugment], seed: int,
          rep: Reporter | None = None) -> Source:
    """The transfer set's inputs: the data, filtered by class, and its augmented copies."""
    augment, text = augments
    from kdcli.data.sources import load_data

    ds = load_data(data, limit=limit, options=data_options, reporter=rep)
    keep = _filter_classes(ds, classes, exclude_classes)
    if text.active and not ds.is_text:
        raise UsageError(f"--word-mask, --word-replace and --ngram-sample augment texts, but "
                         f"{ds.source} is not text", "Use --jitter or --augment for images")
    if ds.is_text and augment.active:
        raise UsageError(f"--jitter, --crop-pad and --flip augment images, but {ds.source} "
                         "is text", "Use --word-mask, --word-replace or --ngram-sample")
    if ds.is_text and copies and ds.inputs.pairs:
        raise UsageError("text augmentation takes one text per example, not sentence pairs",
                         "Drop --copies for pairs")
    augment.check_shape(ds.sample_shape)
    return Source(ds, keep, copies, augment, seed, text)


def _classes(ds, members: list[Teacher]) -> tuple[int, list[str] | None]:
    """The class count the teachers agree on (and the labels fit), and the class names."""
    c = _check_classes(members, None if ds.labels is None else int(ds.labels.max()))
    return c, _class_names(ds, members, c)


def _in_one_order(ds, members: list[Teacher], rep: Reporter) -> list[Teacher]:
    """The teachers, each with its outputs in the class order of the first that names its
    classes (:func:`~kdcli.teachers.formats.one_class_order`), so that an ensemble averages
    like with like; say when string labels are taken as unnamed classes."""
    members, order = one_class_order(members)
    if order is None and ds.class_names is not None:
        rep.info(f"{ds.source} names its classes; numbered in sorted order "
                 f"({', '.join(f'{i} {n}' for i, n in enumerate(ds.class_names[:5]))}"
                 f"{', ...' if len(ds.class_names) > 5 else ''}) as the teacher's "
                 "classes, which it does not name: check the accuracy column")
    return members


def _check_out(out: str | Path, force: bool, inputs: list[str | Path]) -> Path:
    """``out`` (a file, or a sharded set's index) may be written."""
    path = check_output(out, force, inputs=inputs)
    if is_index_path(out):
        check_sharded_output(path, force)
    return path


def _load_members(teachers: list[str | Path], opts: list[TeacherOptions], dev: str,
                  precision: str, probe_x, rep: Reporter,
                  table: TableColumns | None) -> list[Teacher]:
    """Load each teacher (probed with ``probe_x``, given the table's columns by name where
    its file records them); warn of raw 8-bit inputs to a foreign one."""
    members = [load_teacher(p, o, device=dev, precision=precision, probe=probe_x,
                            table=table)
               for p, o in zip(teachers, opts, strict=True)]
    for t in members:
        if hasattr(t.runner, "truncated"):
            t.runner.truncated = 0  # count the transfer set's texts, not the probe's
        pre = t.preprocessing
        if not isinstance(probe_x, torch.Tensor):
            continue
        if not t.fmt.own_preprocessing and probe_x.dtype == torch.uint8 and \
                (pre.scale, pre.mean, pre.std) == (1.0, 0.0, 1.0):
            rep.warn(f"{t.name} gets raw 8-bit values (0-255): no --scale/--mean/--std given. "
                     "If it was trained on [0, 1] inputs, pass --scale 255")
    return members


def _temperature(T: float | None, members: list[Teacher], rep: Reporter) -> float:
    """``T``, or the default for these teachers (saying so when it is not the paper's)."""
    if T is not None:
        return T
    T = default_temperature(members)
    if T == PROBS_T:
        rep.info(f"T={T:g}, the default for teachers that output probabilities (the "
                 "paper's 20 would make them nearly uniform); choose with --T")
    return T


def _has_columns(ds: Data) -> bool:
    """Whether a table's rows need transfer-set version 5: categories or missing numbers."""
    return not ds.is_text and ds.feature_names is not None and (
        bool(ds.categories) or (ds.inputs.is_floating_point()
                                and bool(torch.isnan(ds.inputs).any())))


def _metadata(writer: RangeWriter, dist, *, precision: str, classes: list[int] | None,
              exclude_classes: list[int] | None, class_names: list[str] | None,
              data_options: DataOptions | None) -> dict[str, str]:
    """The transfer set's metadata: what it was made from and how (see docs/formats.md)."""
    source, augment = writer.source, writer.source.augment
    meta = {
        "format": TRANSFER_FORMAT,
        # the lowest version that holds the set: 3 (data_sha256), 4 for texts, 5 for tables
        # with categories or missing numbers
        "format_version": str(TEXT_VERSION if source.text else COLUMNS_VERSION
                              if _has_columns(source.ds) else TENSOR_VERSION),
        "kdcli_version": __version__,
        "created": dist.broadcast(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        "T": repr(writer.T),
        "combine": writer.combine,
        "weights": json.dumps(writer.weights),
        "teachers": json.dumps([t.describe() for t in writer.members]),
        "num_classes": str(writer.form.num_classes),
        "num_examples": str(source.n),
        "data_source": source.ds.source,
        "inputs_sha256": source.sha256(),
        "precision": precision,
        "classes": json.dumps(sorted(classes) if classes else None),
        "exclude_classes": json.dumps(sorted(exclude_classes) if exclude_classes else None),
        "jitter": str(augment.jitter),
        "crop_pad": str(augment.crop_pad),
        "pad_mode": augment.pad_mode,
        "flip": json.dumps(augment.flip),
        "copies": str(source.copies),
        "seed": str(source.seed),
        "targets": writer.form.name,
    }
    if source.text:
        meta["inputs"] = "text"
        meta["text_augment"] = json.dumps(source.text_augment.settings())
        if source.ds.inputs.columns:
            meta["text_columns"] = json.dumps(source.ds.inputs.columns)
    for key, value in (("class_names", class_names), ("feature_names", source.ds.feature_names),
                       ("categories", source.ds.categories),
                       ("data_options", data_options.recorded() if data_options else None)):
        if value:
            meta[key] = json.dumps(value)
    meta.update(writer.form.metadata())
    return meta






def _summary(out: Path, writer: RangeWriter, stats, *, has_labels: bool,
             shards: list[dict[str, Any]] | None, ranks: int, seconds: float,
             class_names: list[str] | None) -> dict[str, Any]:
    """soft_targets()'s result: counts, per-teacher accuracy, disagreement, timing."""
    members, n, m = writer.members, writer.source.n, len(writer.members)
    correct, disagree = stats[:m + 1], int(stats[m + 1])
    summary: dict[str, Any] = {
        "out": str(out), "examples": n, "classes": writer.form.num_classes, "T": writer.T,
        "combine": writer.combine, "weights": writer.weights,
        "storage": writer.form.name, "top_k": writer.form.top_k,
        "shards": len(shards) if shards else 1, "ranks": ranks,
        "seconds": round(seconds, 3),
        "samples_per_s": round(n / max(seconds, 1e-9), 1),
        "teachers": [{"file": str(t.path), "format": t.format, "output": t.output,
                      "preprocessing": t.preprocessing.to_dict(),
                      "accuracy": (float(correct[i]) / n if has_labels else None),
                      **({"truncated": t.runner.truncated}
                         if hasattr(t.runner, "truncated") else {})}
                     for i, t in enumerate(members)],
        "class_names": class_names,
    }
    if has_labels:
        summary["ensemble_accuracy"] = float(correct[m]) / n
    if m > 1:
        summary["disagreement"] = disagree / n
    return summary


def _show_summary(summary: dict[str, Any], members: list[Teacher], rep: Reporter, *,
                  sharded: bool, form: str) -> None:
    """The teachers' notes, then the results table (``form``: the targets form's label)."""
    for t, record in zip(members, summary["teachers"], strict=True):
        for note in t.notes:
            rep.info(note)
        if record.get("truncated"):
            rep.info(f"{t.name}: {record['truncated']:,} of {summary['examples']:,} texts "
                     f"were longer than its {t.runner.max_length} tokens and were truncated")
    rows = [[Path(t["file"]).name, t["format"], t["output"],
             describe_preprocessing(t["preprocessing"]),
             "-" if t["accuracy"] is None else f"{100 * t['accuracy']:.2f}%"]
            for t in summary["teachers"]]
    multi = len(members) > 1
    if multi:
        rows.append(["ensemble", summary["combine"], "logits", "",
                     f"{100 * summary['ensemble_accuracy']:.2f}%"
                     if "ensemble_accuracy" in summary else "-"])
    where = f", {summary['shards']} shards" if sharded else ""
    rep.table(f"Transfer set {summary['out']}: {summary['examples']:,} examples, "
              f"{summary['classes']} classes, T={summary['T']:g}, {form}{where}, "
              f"{summary['precision_shown']}, {summary['samples_per_s']:,.0f} samples/s",
              ["teacher", "format", "output", "preprocessing", "accuracy"], rows)
    if multi:
        rep.info(f"members disagree on {100 * summary['disagreement']:.2f}% of examples")


def _check_weights(weights: list[float] | None, m: int) -> list[float]:
    if weights is None:
        return [1.0 / m] * m
    if len(weights) != m:
        raise UsageError(f"--weights has {len(weights)} values for {m} teachers",
                         "Give one weight per teacher")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise UsageError(f"--weights must be non-negative with a positive sum, got {weights}",
                         "e.g. --weights 0.5,0.3,0.2")
    total = sum(weights)
    return [w / total for w in weights]


def _per_member(options: list[TeacherOptions] | None, m: int) -> list[TeacherOptions]:
    if not options:
        return [TeacherOptions() for _ in range(m)]
    if len(options) == 1:
        return options * m
    if len(options) != m:
        raise UsageError(f"got options for {len(options)} teachers but {m} teachers",
                         "Repeat a per-teacher flag once for each teacher, or once for all")
    return options


def _filter_classes(ds, classes, exclude):
    """Indices of the examples to keep (None: all of them)."""
    if not classes and not exclude:
        return None
    if ds.labels is None:
        raise UsageError("--classes/--exclude-classes need labelled data", "Use labelled data")
    present = set(ds.labels.unique().tolist())
    for c in (classes or []) + (exclude or []):
        if c not in present:
            raise UsageError(f"class {c} does not occur in {ds.source}",
                             f"Choose from {sorted(present)}")
    keep = torch.ones(len(ds), dtype=torch.bool)
    if classes:
        keep &= torch.isin(ds.labels, torch.tensor(classes))
    if exclude:
        keep &= ~torch.isin(ds.labels, torch.tensor(exclude))
    if not bool(keep.any()):
        raise DataError("no examples are left after filtering classes", "Relax the filter")
    return keep.nonzero()[:, 0]


def _check_classes(members: list[Teacher], labels_max: int | None) -> int:
    counts = {t.name: t.num_classes for t in members}
    if len(set(counts.values())) != 1:
        raise ModelError(f"ensemble members disagree on the class count: {counts}",
                         "Use teachers trained on the same classes")
    c = int(next(iter(counts.values())))
    if labels_max is not None and labels_max >= c:
        raise ModelError(f"the teacher has {c} classes, but the data has label "
                         f"{labels_max}", "Use a teacher trained on all classes")
    return c


def _class_names(ds, members: list[Teacher], c: int) -> list[str] | None:
    """The class names of the data, else of the teachers (their own, or what their kdcli or
    ONNX file records); refuse any that differ."""
    from kdcli.data.base import align_classes, check_same_classes

    names = ds.class_names
    for t in members:
        theirs = t.class_names if t.class_names is not None else t.fmt.class_names(t.path)
        if names is ds.class_names:  # the data's labels numbered in the teacher's order
            align_classes(ds, theirs)
            names = ds.class_names
        check_same_classes(names, ds.source, theirs, f"teacher {t.name}")
        names = names or theirs
    if names is not None and len(names) != c:
        raise DataError(f"{ds.source} names {len(names)} classes, but the teacher has {c}",
                        "Use a teacher trained on these classes")
    return names


