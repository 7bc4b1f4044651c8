"""``kdcli soft-targets``: run teachers over data and write a transfer set."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from kdcli.errors import DataError, DistributedError, ModelError, OutputExistsError, UsageError
from kdcli.io.files import (
    atomic_output,
    check_output,
    data_files,
    remove_stale_temps,
    temp_path,
    write_error,
)
from kdcli.io.storage import SafetensorsWriter, to_bytes
from kdcli.output import Reporter, Timer
from kdcli.teachers.base import (
    Teacher,
    TeacherOptions,
    check_teacher_options,
    load_teacher,
)
from kdcli.teachers.inputs import describe_preprocessing
from kdcli.transfer.base import (
    COMBINE_RULES,
    INDEX_SUFFIX,
    TRANSFER_FORMAT,
    TRANSFER_FORMAT_VERSION,
    bytes_per_row,
    combine_members,
    is_index_path,
    merge_shards,
    own_shards,
    shard_paths,
    top_k_targets,
    transfer_specs,
    write_index,
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


class _Source:
    """The transfer set's inputs in order: the kept examples, then each augmented copy.

    An augmented copy's random draws come from generators seeded per block of examples, so
    any row range is the same whichever process computes it and however it is batched.
    """

    BLOCK = 4096

    def __init__(self, ds, keep, copies: int, augment: AugmentConfig, seed: int) -> None:
        from kdcli.io.storage import PageBudget

        self.ds, self.keep, self.copies, self.augment, self.seed = ds, keep, copies, augment, seed
        self.base = len(ds) if keep is None else len(keep)
        self.n = self.base * (copies + 1)
        self.budget = PageBudget(getattr(ds, "files", []))
        self.row_bytes = ds.inputs[0].numel() * ds.inputs.element_size()

    def rows(self, a: int, b: int):
        """Inputs and labels (or None) of transfer rows ``[a, b)``."""
        import torch

        for f in self.budget.files:  # a mapped data file truncated meanwhile: not SIGBUS
            f.check_intact()
        xs, ys = [], []
        for copy in range(a // self.base, (b - 1) // self.base + 1):
            lo = max(a, copy * self.base) - copy * self.base
            hi = min(b, (copy + 1) * self.base) - copy * self.base
            if self.keep is None:
                x = self.ds.inputs[lo:hi]
                y = None if self.ds.labels is None else self.ds.labels[lo:hi]
            else:
                x = self.ds.inputs[self.keep[lo:hi]]
                y = None if self.ds.labels is None else self.ds.labels[self.keep[lo:hi]]
            if copy:
                x = self._augment(x, copy, lo, hi)
            xs.append(x)
            ys.append(y)
            self.budget.add((hi - lo) * self.row_bytes)
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        y = None if ys[0] is None else (ys[0] if len(ys) == 1 else torch.cat(ys))
        return x, y

    def _augment(self, x, copy: int, lo: int, hi: int):
        import torch

        from kdcli.data.augment import Draw

        draws = []
        for blk in range(lo // self.BLOCK, (hi - 1) // self.BLOCK + 1):
            gen = torch.Generator().manual_seed(  # torch takes seeds below 2^64
                ((self.seed * 1_000_003 + copy) * 1_000_003 + blk) % (1 << 64))
            s = slice(max(lo, blk * self.BLOCK) - blk * self.BLOCK,
                      min(hi, (blk + 1) * self.BLOCK) - blk * self.BLOCK)
            draws.append(self.augment.draw(self.BLOCK, gen)[s])
        return self.augment.apply(x, Draw.cat(draws))

    def sha256(self, nbytes: int = 8 << 20) -> str:
        chunk = max(1, nbytes // max(1, self.row_bytes))
        h = hashlib.sha256()
        for a in range(0, self.n, chunk):
            x, _ = self.rows(a, min(self.n, a + chunk))
            h.update(to_bytes(x))
        return h.hexdigest()


def soft_targets(
    teachers: list[str | Path], T: float | None = None, data: str = "mnist:train",
    out: str | Path = "transfer.safetensors", *, options: list[TeacherOptions] | None = None,
    combine: str = "mean-probs", weights: list[float] | None = None, batch_size: int = 1024,
    device: str = "auto", precision: str = "auto", classes: list[int] | None = None,
    exclude_classes: list[int] | None = None, limit: int | None = None,
    augment: AugmentConfig | None = None, copies: int = 0, seed: int = 0, jitter: int = 0,
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
        data: Data spec (see :mod:`kdcli.data.base`).
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
    augment = _check_options(teachers, combine=combine, precision=precision,
                             batch_size=batch_size, augment=augment, jitter=jitter,
                             copies=copies, top_k=top_k, targets_dtype=targets_dtype, rep=rep)
    max_shard = _max_shard(out, shard_size)
    weights, opts = _check_weights(weights, len(teachers)), _per_member(options, len(teachers))
    out = _check_out(out, force, inputs=[*teachers, *data_files(data)])
    for teacher, opt in zip(teachers, opts, strict=True):
        check_teacher_options(teacher, opt)  # before the data is read
    dev = resolve_device(device)
    precision, precision_shown = _precision(precision, dev)
    # read the data, then probe the teachers with its first batch
    source = _read(data, limit, data_options, classes, exclude_classes, copies, augment, seed)
    probe_x, probe_y = source.rows(0, min(source.n, batch_size))
    members = _load_members(teachers, opts, dev, precision, probe_x, rep)
    T = _temperature(T, members, rep)
    c, class_names = _classes(source.ds, members)
    top_k = _top_k(top_k, c, rep)
    # run them over all rows, writing the set a batch at a time
    with session(dev) as dist:
        writer = _RangeWriter(members, source, weights, combine, T, c, top_k, targets_dtype,
                              batch_size, rep)
        _check_room(out, source.n, writer)
        meta = _metadata(writer, dist, precision=precision, classes=classes,
                         exclude_classes=exclude_classes, class_names=class_names,
                         data_options=data_options)
        with Timer() as timer:
            shards = _write_set(out, meta, writer, dist, force, max_shard, shard_size)
        stats = dist.all_reduce_sum(writer.stats)
    summary = _summary(out, writer, stats, has_labels=probe_y is not None, shards=shards,
                       ranks=dist.world, seconds=timer.seconds, class_names=class_names)
    summary.update(precision=precision, precision_shown=precision_shown)
    _show_summary(summary, members, rep, sharded=bool(shards))
    return summary


def _check_options(teachers: list[str | Path], *, combine: str, precision: str,
                   batch_size: int, augment: AugmentConfig | None, jitter: int, copies: int,
                   top_k: int | None, targets_dtype: str, rep: Reporter) -> AugmentConfig:
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
    if copies and not augment.active:
        raise UsageError("--copies needs an augmentation to make the copies differ",
                         "Add --jitter 2, or --augment crop-flip")
    if augment.active and not copies:
        rep.warn(f"augmentation ({augment.describe()}) applies only to the copies, and "
                 "--copies is 0: add --copies 1 or more")
    if top_k is not None and top_k <= 0:
        raise UsageError(f"--top-k must be at least 1, got {top_k}", "Try --top-k 32")
    if targets_dtype not in ("float32", "float16"):
        raise UsageError(f"unknown --targets-dtype {targets_dtype!r}", "Use float32 or float16")
    if targets_dtype != "float32" and top_k is None:
        raise UsageError("--targets-dtype applies to top-k targets only",
                         "Add --top-k K, or drop --targets-dtype")
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
          augment: AugmentConfig, seed: int) -> _Source:
    """The transfer set's inputs: the data, filtered by class, and its augmented copies."""
    from kdcli.data.base import load_data

    ds = load_data(data, limit=limit, options=data_options)
    keep = _filter_classes(ds, classes, exclude_classes)
    augment.check_shape(ds.sample_shape)
    return _Source(ds, keep, copies, augment, seed)


def _classes(ds, members: list[Teacher]) -> tuple[int, list[str] | None]:
    """The class count the teachers agree on (and the labels fit), and the class names."""
    c = _check_classes(members, None if ds.labels is None else int(ds.labels.max()))
    return c, _class_names(ds, members, c)


def _check_out(out: str | Path, force: bool, inputs: list[str | Path]) -> Path:
    """``out`` (a file, or a sharded set's index) may be written."""
    path = check_output(out, force, inputs=inputs)
    if is_index_path(out):
        check_sharded_output(path, force)
    return path


def _load_members(teachers: list[str | Path], opts: list[TeacherOptions], dev: str,
                  precision: str, probe_x, rep: Reporter) -> list[Teacher]:
    """Load each teacher (probed with ``probe_x``); warn of raw 8-bit inputs to a foreign one."""
    import torch

    members = [load_teacher(p, o, device=dev, precision=precision, probe=probe_x)
               for p, o in zip(teachers, opts, strict=True)]
    for t in members:
        pre = t.preprocessing
        if t.format != "kdcli" and probe_x.dtype == torch.uint8 and \
                pre.get("scale", 1.0) == 1.0 and pre.get("mean", 0.0) == 0.0 and \
                pre.get("std", 1.0) == 1.0:
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


def _top_k(top_k: int | None, c: int, rep: Reporter) -> int | None:
    """``top_k``, at most the class count ``c``."""
    if top_k is not None and top_k > c:
        rep.info(f"--top-k {top_k} is more than the {c} classes; storing all {c} "
                 "(the same targets as dense storage)")
        return c
    return top_k


def _metadata(writer: _RangeWriter, dist, *, precision: str, classes: list[int] | None,
              exclude_classes: list[int] | None, class_names: list[str] | None,
              data_options: DataOptions | None) -> dict[str, str]:
    """The transfer set's metadata: what it was made from and how (see docs/formats.md)."""
    source, augment = writer.source, writer.source.augment
    meta = {
        "format": TRANSFER_FORMAT,
        # every file carries data_sha256, which version 3 added
        "format_version": str(TRANSFER_FORMAT_VERSION),
        "kdcli_version": __version__,
        "created": dist.broadcast(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        "T": repr(writer.T),
        "combine": writer.combine,
        "weights": json.dumps(writer.weights),
        "teachers": json.dumps([t.describe() for t in writer.members]),
        "num_classes": str(writer.c),
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
        "targets": "dense" if writer.top_k is None else "top-k",
    }
    for key, value in (("class_names", class_names), ("feature_names", source.ds.feature_names),
                       ("data_options", data_options.recorded() if data_options else None)):
        if value:
            meta[key] = json.dumps(value)
    if writer.top_k is not None:
        meta.update(top_k=str(writer.top_k), targets_dtype=writer.dtype_name)
    return meta


def _write_set(out: Path, meta: dict[str, str], writer: _RangeWriter, dist, force: bool,
               max_shard: int, shard_size: str | int | None) -> list[dict[str, Any]] | None:
    """Write the whole set: one file, or (for an index ``out``) shards of at most
    ``max_shard`` bytes, which are returned."""
    n = writer.source.n
    if not is_index_path(out):
        _write_single(out, n, meta, writer, dist, force)
        return None
    layout = writer.specs(1)
    header = len(json.dumps(meta)) + 200 * (len(layout) + 4)  # a generous bound
    rows_per_shard = (max_shard - header) // bytes_per_row(layout)
    if rows_per_shard < 1:
        raise UsageError(f"--shard-size {shard_size} cannot hold one example "
                         f"({header + bytes_per_row(layout):,} bytes with header)",
                         "Give a larger --shard-size")
    return _write_sharded(out, n, rows_per_shard, meta, writer, dist, force)


def _check_room(out: Path, n: int, writer: _RangeWriter) -> None:
    """Refuse a set larger than the free space of its folder, before writing a byte."""
    from kdcli.resources import check_disk

    check_disk(n * bytes_per_row(writer.specs(1)), out.parent,
               f"the transfer set of {n:,} rows", "Lower --copies or --limit, or free space")


def _summary(out: Path, writer: _RangeWriter, stats, *, has_labels: bool,
             shards: list[dict[str, Any]] | None, ranks: int, seconds: float,
             class_names: list[str] | None) -> dict[str, Any]:
    """soft_targets()'s result: counts, per-teacher accuracy, disagreement, timing."""
    members, n, m = writer.members, writer.source.n, len(writer.members)
    correct, disagree = stats[:m + 1], int(stats[m + 1])
    summary: dict[str, Any] = {
        "out": str(out), "examples": n, "classes": writer.c, "T": writer.T,
        "combine": writer.combine, "weights": writer.weights,
        "storage": "dense" if writer.top_k is None else "top-k", "top_k": writer.top_k,
        "shards": len(shards) if shards else 1, "ranks": ranks,
        "seconds": round(seconds, 3),
        "samples_per_s": round(n / max(seconds, 1e-9), 1),
        "teachers": [{"file": str(t.path), "format": t.format, "output": t.output,
                      "preprocessing": t.preprocessing,
                      "accuracy": (float(correct[i]) / n if has_labels else None)}
                     for i, t in enumerate(members)],
        "class_names": class_names,
    }
    if has_labels:
        summary["ensemble_accuracy"] = float(correct[m]) / n
    if m > 1:
        summary["disagreement"] = disagree / n
    return summary


def _show_summary(summary: dict[str, Any], members: list[Teacher], rep: Reporter, *,
                  sharded: bool) -> None:
    """The teachers' notes, then the results table."""
    for t in members:
        for note in t.notes:
            rep.info(note)
    rows = [[Path(t["file"]).name, t["format"], t["output"],
             describe_preprocessing(t["preprocessing"]),
             "-" if t["accuracy"] is None else f"{100 * t['accuracy']:.2f}%"]
            for t in summary["teachers"]]
    multi = len(members) > 1
    if multi:
        rows.append(["ensemble", summary["combine"], "logits", "",
                     f"{100 * summary['ensemble_accuracy']:.2f}%"
                     if "ensemble_accuracy" in summary else "-"])
    top_k = summary["top_k"]
    form = "dense" if top_k is None else f"top-{top_k}"
    where = f", {summary['shards']} shards" if sharded else ""
    rep.table(f"Transfer set {summary['out']}: {summary['examples']:,} examples, "
              f"{summary['classes']} classes, T={summary['T']:g}, {form}{where}, "
              f"{summary['precision_shown']}, {summary['samples_per_s']:,.0f} samples/s",
              ["teacher", "format", "output", "preprocessing", "accuracy"], rows)
    if multi:
        rep.info(f"members disagree on {100 * summary['disagreement']:.2f}% of examples")


class _RangeWriter:
    """Runs the teachers over a range of rows and writes them to one transfer-set file."""

    def __init__(self, members, source, weights, combine, T, c, top_k, targets_dtype,
                 batch_size, rep) -> None:
        import torch

        self.members, self.source, self.weights, self.combine = members, source, weights, combine
        self.T, self.c, self.top_k = T, c, top_k
        self.dtype_name, self.targets_dtype = targets_dtype, getattr(torch, targets_dtype)
        self.batch_size, self.rep = batch_size, rep
        m = len(members)
        self.stats = torch.zeros(m + 2, dtype=torch.long)  # correct per member, ensemble; disagree

    def specs(self, n: int) -> dict[str, Any]:
        """The tensors of a transfer-set file holding ``n`` of these rows."""
        x0, y0 = self.source.rows(0, 1)
        return transfer_specs(n, tuple(x0.shape[1:]), x0.dtype, labels=y0 is not None,
                              members=len(self.members), num_classes=self.c, top_k=self.top_k,
                              targets_dtype=self.targets_dtype)

    def write(self, path: Path, a: int, b: int, meta: dict[str, str], advance) -> None:
        """Write rows ``[a, b)`` as a complete transfer-set file at ``path``."""
        import torch

        src, m, c, n = self.source, len(self.members), self.c, b - a
        if n <= 0:
            return
        with SafetensorsWriter(path, self.specs(n), meta) as w, _weight_cast_cache(self.members):
            for start in range(a, b, self.batch_size):
                stop = min(b, start + self.batch_size)
                x, y = src.rows(start, stop)
                z = torch.stack([t.logits(x) for t in self.members])  # [M, B, C]
                _check_finite(z, self.members, start)
                logits, probs = combine_members(z, self.weights, self.combine, self.T)
                r = start - a
                w.write("inputs", r * x[0].numel(), x)
                if y is not None:
                    w.write("labels", r, y)
                if self.top_k is None:
                    if m > 1:
                        for i in range(m):
                            w.write("member_logits", (i * n + r) * c, z[i])
                    w.write("logits", r * c, logits)
                    w.write("soft_targets", r * c, probs)
                else:
                    tk = top_k_targets(logits, self.top_k, self.T)
                    k = self.top_k
                    w.write("topk_logits", r * k, tk.logits.to(self.targets_dtype))
                    w.write("topk_indices", r * k, tk.indices.to(torch.int32))
                    w.write("tail_logmass", r, tk.tail_logmass)
                if m > 1:
                    preds = z.argmax(-1)
                    self.stats[m + 1] += int((preds != preds[0]).any(0).sum())
                if y is not None:
                    self.stats[:m] += (z.argmax(-1) == y).sum(-1)
                    self.stats[m] += int((logits.argmax(-1) == y).sum())
                advance(stop - start)


def _weight_cast_cache(members: list[Teacher]) -> contextlib.AbstractContextManager:
    """One bf16 autocast region around the whole teacher pass when a PyTorch teacher runs in
    bf16. Each batch's own autocast region then nests in it, so autocast keeps the bf16
    copies of the weights it made for the first batch instead of casting every weight again
    for every batch (the same copies, so the same numbers)."""
    import torch

    bf16 = [t for t in members if t.module is not None and t.precision == "bf16"]
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(bf16[0].device).type, dtype=torch.bfloat16)


def _write_single(out: Path, n: int, meta: dict[str, str], writer: _RangeWriter, dist,
                  force: bool) -> None:
    """One file. Under torchrun, ranks write their rows to part files that rank 0 merges."""
    if not dist.enabled:
        with atomic_output(out, force) as tmp, \
                writer.rep.progress(f"soft targets T={writer.T:g}", n) as advance:
            writer.write(tmp, 0, n, meta, advance)
        return
    parts = [out.with_name(f".{out.name}.part{r:05d}-of-{dist.world:05d}.tmp")
             for r in range(dist.world)]
    a, b = dist.split(n)
    ok = False
    try:
        with writer.rep.progress(f"soft targets T={writer.T:g} (rank 0)", b - a) as advance:
            writer.write(parts[dist.rank], a, b, meta, advance)
        ok = True
    finally:
        all_ok = dist.all_ok(ok)
        try:
            if all_ok and dist.main:
                with atomic_output(out, force) as tmp:
                    merge_shards([p for p in parts if p.exists()], tmp, writer.specs(n), meta)
        finally:
            dist.barrier()
            parts[dist.rank].unlink(missing_ok=True)
    if not all_ok:
        raise DistributedError("another rank failed while writing soft targets",
                               "See that rank's error above; nothing was written")


@contextlib.contextmanager
def _on_every_rank(dist, failed: str, hint: str) -> Iterator[None]:
    """Run a step on every rank and agree on its outcome: a rank whose own step failed
    raises its error, and the others raise DistributedError(``failed``, ``hint``)."""
    ok = False
    try:
        yield
        ok = True
    finally:
        ok = dist.all_ok(ok)
    if not ok:
        raise DistributedError(failed, hint)


def _write_sharded(index: Path, n: int, rows_per_shard: int, meta: dict[str, str],
                   writer: _RangeWriter, dist, force: bool) -> list[dict[str, Any]]:
    """Shard files of at most ``rows_per_shard`` rows plus the index; under torchrun each
    rank writes a contiguous run of shards.

    Every shard is written under a temporary name first. Only when all are complete does
    rank 0 check ``--force`` again and delete the old set (its index, then the shards of
    that name found in the folder, never files an old index names); each rank then renames
    its shards into place, and rank 0 publishes the index last. A failure at any point
    leaves the old set or no index, never an index naming missing shards."""
    count = math.ceil(n / rows_per_shard)
    finals = shard_paths(index, count)
    mine = range(*dist.split(count))
    temps = {i: temp_path(finals[i]) for i in mine}
    import re

    stem = re.escape(index.name.removesuffix(INDEX_SUFFIX))  # any count: a killed run's
    remove_stale_temps(index, rf"{stem}-\d{{5}}-of-\d{{5}}\.safetensors")  # may differ

    def rows(i: int) -> tuple[int, int]:
        return i * rows_per_shard, min(n, (i + 1) * rows_per_shard)

    try:
        with _on_every_rank(dist, "another rank failed while writing soft targets",
                            "See that rank's error above; nothing was written"):
            _write_shards(writer, meta, {i: (temps[i], finals[i], *rows(i)) for i in mine},
                          count)
        with _on_every_rank(dist, "rank 0 could not replace the old set",
                            "See its error above; nothing was written"):
            if dist.main:
                check_sharded_output(index, force)
                index.unlink(missing_ok=True)  # no index may name a half-replaced set
                for old in own_shards(index):
                    old.unlink()
        with _on_every_rank(dist, "a rank could not rename its shards into place",
                            "See its error above; no index was written"):
            for i in mine:
                os.replace(temps[i], finals[i])
        shards = [{"file": finals[i].name, "row_start": rows(i)[0],
                   "rows": rows(i)[1] - rows(i)[0],
                   "bytes": finals[i].stat().st_size} for i in range(count)]
        with _on_every_rank(dist, "rank 0 could not write the index", "See its error above"):
            if dist.main:
                with atomic_output(index, force=True) as tmp:
                    write_index(tmp, meta, shards)
    finally:
        for t in temps.values():
            with contextlib.suppress(OSError):  # read-only: the write error is the news
                t.unlink(missing_ok=True)
    return shards


def _write_shards(writer: _RangeWriter, meta: dict[str, str],
                  mine: dict[int, tuple[Path, Path, int, int]], count: int) -> None:
    """Write this rank's shards: ``mine`` maps a shard's number to its temporary and final
    paths and its rows ``[a, b)``."""
    with writer.rep.progress(f"soft targets T={writer.T:g}",
                             sum(b - a for _, _, a, b in mine.values())) as advance:
        for i, (temp, final, a, b) in mine.items():
            shard_meta = {**meta, "shard_index": str(i + 1), "shard_count": str(count),
                          "shard_row_start": str(a), "shard_rows": str(b - a)}
            try:
                writer.write(temp, a, b, shard_meta, advance)
            except (OSError, RuntimeError) as e:
                err = write_error(final, e)
                if err is None:
                    raise
                raise err from e


def check_sharded_output(index: Path, force: bool) -> None:
    """Refuse, without ``force``, to replace an index or any shard of its name."""
    check_output(index, force)
    existing = own_shards(index)
    if existing and not force:
        raise OutputExistsError(f"{existing[0]} (a shard of {index.name}) already exists",
                                "Pass --force to replace the set")
    for f in existing:
        check_output(f, force=True)


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
    import torch

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
    from kdcli.data.base import check_same_classes
    from kdcli.students.model_file import file_class_names

    names = ds.class_names
    for t in members:
        theirs = t.class_names if t.class_names is not None else file_class_names(t.path)
        check_same_classes(names, ds.source, theirs, f"teacher {t.name}")
        names = names or theirs
    if names is not None and len(names) != c:
        raise DataError(f"{ds.source} names {len(names)} classes, but the teacher has {c}",
                        "Use a teacher trained on these classes")
    return names


def _check_finite(z, members: list[Teacher], start: int) -> None:
    import torch

    ok = torch.isfinite(z).all(-1)  # [M, B]
    if not bool(ok.all()):
        i, row = (~ok).nonzero()[0].tolist()
        rows = (start + (~ok[i]).nonzero()[:5, 0]).tolist()
        raise ModelError(f"teacher {members[i].name} output NaN or Inf (first bad rows {rows})",
                         "Check the teacher and its --scale/--mean/--std")
