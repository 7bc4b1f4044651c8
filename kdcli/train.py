"""``kdcli train`` (hard labels) and ``kdcli train-student`` (distillation).

Each builds a model and a step loss, and both share one visible training loop,
:func:`kdcli.training.loop.fit`: the data is held as tensors and batched by index from a
seeded permutation, so the same seed gives bit-identical weights on the same CPU and thread
count, and a checkpoint written after each epoch lets an interrupted run resume exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdcli.checks import precision_note, resolve_device
from kdcli.config import (  # noqa: F401 - the constants are re-exported, as kdcli.train's API
    DEFAULT_EPOCHS,
    MAX_AUTO_EPOCHS,
    MIN_STEPS,
    STUDENT_GRAD_CLIP,
    STUDENT_LR,
    STUDENT_WARMUP,
    DistillConfig,
    TrainConfig,
    WordsConfig,
    student_config,
)
from kdcli.data.augment import AugmentConfig
from kdcli.data.base import (
    Data,
    DataOptions,
    absent_text,
    align_classes,
    check_same_classes,
    no_labels,
    recorded_options,
)
from kdcli.data.sources import load_data
from kdcli.distributed import Dist, session
from kdcli.errors import UsageError
from kdcli.evaluate import classification_metrics, predict
from kdcli.io.files import atomic_output, data_files, sha256_file
from kdcli.modalities import fit_preprocessing
from kdcli.output import Reporter
from kdcli.preprocessing import Preprocessing
from kdcli.students.base import Architecture, build_model, count_params
from kdcli.students.model_file import save_model
from kdcli.training.checkpoint import check_train_outputs, checkpoint_path
from kdcli.training.loop import StepLoss, fit
from kdcli.training.losses import criterion, matches_logits
from kdcli.training.table import encoded_table, fit_table, needs_encoding, table_inputs
from kdcli.training.text import (
    check_kind,
    encoded,
    family_defaults,
    fit_transfer_words,
    fit_words,
    init_student,
)
from kdcli.transfer.reader import TransferSet, check_unchanged, file_stamps, load_transfer_set
from kdcli.transfer.rows import Rows
from kdcli.transfer.targets import check_class_memory, to_device


def _normalize(cfg: TrainConfig, arch: Architecture) -> bool:
    """Resolve ``normalize=None`` (auto): normalize unless there is input dropout."""
    return cfg.normalize if cfg.normalize is not None else not arch.input_dropout


def _default_eval(eval_data: str | None, source: str) -> str | None:
    if eval_data == "auto":
        return "mnist:test" if source.split("[")[0] in ("mnist", "mnist:train") else None
    if eval_data in (None, "", "none"):
        return None
    return eval_data


@dataclass(frozen=True)
class _Outputs:
    """Where and how a trained model is written, and the title of its results table."""
    out: str | Path
    force: bool
    title: str
    start_time: float  # time.perf_counter() when the command started
    names: dict[str, list[str] | None]  # class_names and feature_names of the model file
    precision_note: str | None = None  # what --precision auto chose and why (the table)


def _finish(model: nn.Module, *, arch: Architecture, pre: Preprocessing, num_classes: int,
            training: dict[str, Any], history: list[dict[str, Any]], eval_ds: Data | None,
            cfg: TrainConfig, outputs: _Outputs, reporter: Reporter,
            dist: Dist) -> dict[str, Any]:
    """Final fp32 evaluation, model file, checkpoint clean-up and the results table (the
    model file and table on rank 0 only)."""
    summary = dict(training)
    if dist.enabled:
        summary["ranks"] = dist.world
    if not dist.main:
        dist.barrier()
        return summary
    if eval_ds is not None:
        m = classification_metrics(predict(model, eval_ds.inputs), eval_ds.labels)
        summary.update(test_data=eval_ds.source, test_errors=m["errors"],
                       test_accuracy=m["accuracy"], test_nll=m["nll"])
    last = history[-1] if history else {}
    summary.update({k: v for k, v in last.items() if k not in ("epoch", "seconds",
                                                                 "test_errors")})
    summary["seconds"] = round(time.perf_counter() - outputs.start_time, 2)
    summary["params"] = count_params(model)
    summary["history"] = history
    out = outputs.out
    stopped = bool(history) and history[-1]["epoch"] < cfg.epochs and not cfg.dry_run
    if stopped:
        summary["stopped_after"] = history[-1]["epoch"]
        summary["checkpoint"] = str(checkpoint_path(out))
    elif not cfg.dry_run:
        with atomic_output(out, outputs.force) as tmp:
            save_model(tmp, model, arch, pre, num_classes,
                       {k: v for k, v in summary.items() if k != "history"}, **outputs.names)
        checkpoint_path(out).unlink(missing_ok=True)
        summary["out"] = str(out)
    rows = [[k, outputs.precision_note if k == "precision" and outputs.precision_note else v]
            for k, v in summary.items() if v is not None and k in _SHOWN]
    reporter.table(outputs.title, ["", "value"], rows)
    dist.barrier()
    return summary


# The rows of the results table that ends train and train-student.
_SHOWN = ("architecture", "params", "T", "alpha", "loss", "targets", "tail", "epochs", "precision",
          "test_errors", "test_accuracy", "agreement", "train_error", "ranks", "seconds", "out",
          "stopped_after", "checkpoint")


def train(data: str = "mnist", *, arch: Architecture, out: str | Path = "model.safetensors",
          config: TrainConfig | None = None, augment: AugmentConfig | None = None,
          eval_data: str | None = "auto", limit: int | None = None,
          num_classes: int | None = None, force: bool = False, resume: bool = False,
          reporter: Reporter | None = None, data_options: DataOptions | None = None,
          words: WordsConfig | None = None) -> dict[str, Any]:
    """Train a kdcli model on hard labels (how users make teachers and baselines).

    Args:
        data: Labelled training data spec.
        arch: The architecture.
        out: Output model file.
        config: Optimization settings.
        augment: Augmentation of the training images (default none).
        eval_data: Data for per-epoch test errors; ``auto`` is ``mnist:test`` for MNIST.
        limit: Use only the first N training examples.
        num_classes: The model's class count (default: the largest label + 1, refused when
            the labels do not support it; see :func:`class_count`).
        force: Overwrite ``out``.
        resume: Continue from ``out``'s checkpoint.
        reporter: Output sink.
        data_options: How tables and image folders are read (for ``data`` and
            ``eval_data``).
        words: A text student's vocabulary settings (see
            :class:`~kdcli.training.text.WordsConfig`).

    Returns:
        The training summary (also stored in the model file).
    """
    words = words or WordsConfig()
    words.check()
    cfg = config or TrainConfig()
    cfg.check()
    aug = augment or AugmentConfig()
    aug.check()
    arch.check()
    rep = reporter or Reporter()
    if not cfg.dry_run:
        check_train_outputs(out, force, resume, data_files(data) + data_files(eval_data))
    start = time.perf_counter()
    ds = load_data(data, limit=limit, options=data_options, reporter=rep)
    check_kind(arch, ds.is_text, ds.source)
    cfg = family_defaults(cfg, arch, TrainConfig(), rep)
    if ds.labels is None:
        raise no_labels(ds, "train on labelled data (kdcli train needs labels)", UsageError)
    cfg, precision_note = _concrete(cfg, len(ds))
    eval_ds = _eval_data(eval_data, ds.source, data_options, ds.class_names, ds.source,
                         list(ds.sample_shape), f"{ds.source} has", rep, ds.feature_names)
    num_classes = _train_classes(ds, eval_ds, num_classes)
    if ds.is_text and aug.active:
        raise UsageError("--augment, --jitter, --crop-pad and --flip augment images, not "
                         "texts", "Drop them for text data")
    aug.check_shape(ds.sample_shape)
    inputs, pre = fit_words(ds.inputs, words, rep) if ds.is_text else \
        fit_table(ds.inputs, ds.feature_names, ds.categories, cfg.max_categories, rep) \
        if needs_encoding(ds.inputs, ds.feature_names, ds.categories) else (ds.inputs, None)
    model, pre = _build(arch, cfg, inputs, num_classes, pre)
    init_student(model, pre, words if ds.is_text else None, rep)
    eval_ds = encoded_table(encoded(eval_ds, pre), pre)
    labels = ds.labels

    def step(z: torch.Tensor, idx: torch.Tensor):
        y = labels[idx].to(z.device)
        loss = F.cross_entropy(z, y)
        return loss, torch.stack([loss.detach(), (z.argmax(-1) != y).float().mean()])

    fingerprint = {"command": "train", "data": ds.source, "arch": arch.to_dict(),
                   "config": cfg.settings(), "augment": aug.settings(),
                   **({"words": words.settings()} if ds.is_text else {})}
    training = {"command": "train", "architecture": arch.spec(), "data": ds.source,
                **_recorded(data_options), **cfg.settings(), **aug.settings(),
                **(words.settings() if ds.is_text else {})}
    outputs = _Outputs(out, force, f"Trained {arch.spec()} on {ds.source}", start,
                       {"class_names": ds.class_names, "feature_names": ds.feature_names},
                       precision_note)
    with session(resolve_device(cfg.device)) as dist:
        history = fit(model, arch, inputs, step, ["train_loss", "train_error"], cfg,
                      eval_data=eval_ds, checkpoint=None if cfg.dry_run else checkpoint_path(out),
                      fingerprint=fingerprint, resume=resume, reporter=rep, dist=dist,
                      augment=aug)
        return _finish(model, arch=arch, pre=pre, num_classes=num_classes, training=training,
                       history=history, eval_ds=eval_ds, cfg=cfg, outputs=outputs,
                       reporter=rep, dist=dist)


def _concrete(cfg: TrainConfig, n: int) -> tuple[TrainConfig, str | None]:
    """``cfg`` made concrete for ``n`` examples (epochs and precision, see
    :meth:`TrainConfig.resolved`), and what ``--precision auto`` chose and why (None when
    the precision was given), for the results table."""
    note = precision_note(cfg.precision, resolve_device(cfg.device))
    cfg = cfg.resolved(n)
    cfg.check()
    return cfg, note


def _build(arch: Architecture, cfg: TrainConfig, inputs: torch.Tensor | Rows,
           num_classes: int, pre: Preprocessing | None = None
           ) -> tuple[nn.Module, Preprocessing]:
    """A freshly initialized model (seeded by ``cfg.seed``) and its input preprocessing,
    fitted on ``inputs`` (a text student's, with its vocabulary, is given as ``pre``)."""
    torch.manual_seed(cfg.seed)
    if pre is None:
        pre = fit_preprocessing(inputs, _normalize(cfg, arch), cfg.normalize_by)
    return build_model(arch, pre, num_classes), pre


def _eval_data(eval_data: str | None, source: str, data_options: DataOptions | None,
               class_names: list[str] | None, names_of: str, shape: list[int],
               shape_of: str, rep: Reporter,
               feature_names: list[str] | None = None) -> Data | None:
    """The data of ``--eval-data`` (``auto``: mnist:test for MNIST ``source``), refused unless
    it is labelled and its class names (or some of them) and example shape match the
    training data's. A table's columns are taken by the training data's ``feature_names``
    unless ``--feature-columns`` names them."""
    spec = _default_eval(eval_data, source)
    if not spec:
        return None
    if feature_names and (data_options is None or data_options.feature_columns is None):
        data_options = replace(data_options or DataOptions(),
                               feature_columns=tuple(feature_names))
    eval_ds = load_data(spec, options=data_options, reporter=rep)
    if eval_ds.labels is None:
        raise no_labels(eval_ds, "give labelled --eval-data, or pass --eval-data none",
                        UsageError)
    absent = align_classes(eval_ds, class_names)
    if absent:
        rep.warn(absent_text(absent, eval_ds.source))
    check_same_classes(class_names, names_of, eval_ds.class_names, eval_ds.source)
    if list(eval_ds.sample_shape) != shape:
        raise UsageError(f"--eval-data {spec} has examples of shape "
                         f"{list(eval_ds.sample_shape)}, but {shape_of} {shape}",
                         "Pass --eval-data with matching examples, or --eval-data none")
    return eval_ds


def _train_classes(ds: Data, eval_ds: Data | None, num_classes: int | None) -> int:
    """The class count of a model trained on ``ds`` (see :func:`class_count`), at most the
    number of class names the data gives."""
    num_classes = class_count(ds, eval_ds, num_classes)
    if ds.class_names is not None and num_classes != len(ds.class_names):
        if num_classes > len(ds.class_names):  # --num-classes more than the names
            raise UsageError(f"--num-classes {num_classes}, but {ds.source} names "
                             f"{len(ds.class_names)} classes", "Drop --num-classes")
        num_classes = len(ds.class_names)  # a slice without the last classes' examples
    return num_classes


def _recorded(data_options: DataOptions | None) -> dict[str, Any]:
    """``data_options`` as the model file records them (nothing for the defaults)."""
    recorded = data_options.recorded() if data_options is not None else {}
    return {"data_options": recorded} if recorded else {}


# A class count is refused (unless --num-classes is given) when more of its classes have no
# training example than this, and than the classes that have one: a stray label of 1,000,000
# among 500 examples would otherwise build a 1,000,001-class model.
MAX_EMPTY_CLASSES = 10


def class_count(ds: Data, eval_ds: Data | None, num_classes: int | None) -> int:
    """The class count of a model trained on ``ds``: ``num_classes`` if given (it must cover
    every label), else the largest label + 1 when the labels support it.

    Raises:
        UsageError: ``num_classes`` is too small, or (without it) more than
            ``max(MAX_EMPTY_CLASSES, distinct labels)`` classes would have no example.
    """
    top = max(ds.num_classes or 0, eval_ds.num_classes or 0 if eval_ds else 0)
    if num_classes is not None:
        if isinstance(num_classes, bool) or not 1 <= num_classes <= 1 << 24:
            raise UsageError(f"--num-classes must be from 1 to {1 << 24:,}, got {num_classes}",
                             "Try --num-classes 10")
        if num_classes < top:
            raise UsageError(f"--num-classes {num_classes}, but the labels go up to {top - 1}",
                             f"Pass --num-classes {top} or more")
        return num_classes
    distinct = int(ds.labels.unique().numel())
    empty = top - distinct
    if empty > max(MAX_EMPTY_CLASSES, distinct):
        raise UsageError(f"the labels go up to {top - 1}, but only {distinct} distinct labels "
                         f"occur: a {top:,}-class model would have {empty:,} classes with no "
                         "example", "Check the labels, or pass --num-classes to mean it")
    return top


def train_student(transfer: str | Path = "transfer.safetensors", *, arch: Architecture,
                  distill: DistillConfig | None = None, alpha: float | None = None,
                  T: float | None = None, loss: str | None = None, center: bool | None = None,
                  tail: str | None = None, out: str | Path = "student.safetensors",
                  config: TrainConfig | None = None, eval_data: str | None = "auto",
                  force: bool = False, resume: bool = False, reporter: Reporter | None = None,
                  data_options: DataOptions | None = None,
                  words: WordsConfig | None = None,
                  fitted: tuple[torch.Tensor, Preprocessing] | None = None) -> dict[str, Any]:
    """Train a student against a transfer set (Hinton et al. 2015).

    ``--loss kd``: ``L = alpha*CE(y, softmax(z)) + (1-alpha)*T^2*CE(p_T, softmax(z/T))``.
    ``--loss mse``: ``L = alpha*CE(y, softmax(z)) + (1-alpha)*1/2*mean_i (z_i - v_i)^2``, the
    exact high-T limit of ``kd`` (see :class:`kdcli.training.losses.LogitMSELoss`).

    The transfer set (one file or a sharded set) is memory-mapped and read a batch at a
    time, so memory does not grow with its size. Under torchrun, training is data-parallel
    (see :func:`fit`) and rank 0 writes the outputs.

    Args:
        transfer: Transfer-set file, or the ``.index.json`` of a sharded set.
        arch: Student architecture.
        distill: The distillation settings (default :class:`~kdcli.config.DistillConfig`:
            alpha 0.1, the kd loss at the transfer set's T). A T other than the set's
            re-derives the soft targets exactly from the stored logits where they allow it.
        alpha: Shorthand for ``distill.alpha``, the weight on the hard labels, in [0, 1].
        T: Shorthand for ``distill.T``.
        loss: Shorthand for ``distill.loss``: ``kd`` or ``mse`` (logit matching).
        center: Shorthand for ``distill.center`` (``mse``: centre both logit vectors).
        tail: Shorthand for ``distill.tail`` (top-k sets; see :mod:`kdcli.training.losses`).
        out: Output student model file.
        config: Optimization settings (default: :func:`student_config`, lr 0.05 after a
            1-epoch warmup, gradients clipped to norm 5).
        eval_data: Data for per-epoch test errors; ``auto`` is ``mnist:test`` for MNIST.
        force: Overwrite ``out``.
        resume: Continue from ``out``'s checkpoint.
        reporter: Output sink.
        data_options: How a table or image folder given as ``eval_data`` is read.
        words: A text student's vocabulary settings (a set of texts; see
            :class:`~kdcli.training.text.WordsConfig`).
        fitted: A set of texts: its word ids and vocabulary, as
            :func:`~kdcli.training.text.fit_transfer_words` returns them for this set and
            ``words`` (``kdcli sweep`` fits them once for all its students); default:
            fitted here.

    Returns:
        The training summary (also stored in the student file).
    """
    words = words or WordsConfig()
    words.check()
    d = _with(distill or DistillConfig(), T=T, alpha=alpha, loss=loss, center=center, tail=tail)
    cfg = config or student_config()
    cfg.check()
    arch.check()
    rep = reporter or Reporter()
    d.check()
    if not cfg.dry_run:
        check_train_outputs(out, force, resume,
                            [transfer, *data_files(transfer), *data_files(eval_data)])
    start = time.perf_counter()
    ts = load_transfer_set(transfer)
    check_kind(arch, ts.is_text, str(transfer))
    cfg = family_defaults(cfg, arch, student_config(), rep)
    stamps = file_stamps(ts)
    if d.alpha > 0 and not ts.has_labels:
        raise UsageError(f"--alpha {d.alpha} needs labels, but {transfer} has none",
                         "Use --alpha 0 (pure distillation) or a labelled transfer set")
    cfg, precision_note = _concrete(cfg, len(ts))
    check_class_memory(ts.path, ts.num_classes, cfg.batch_size)
    d = d.resolved(ts.T)
    _check_targets(ts, d, rep)
    step = _student_step(ts, d)
    eval_ds = _student_eval_data(ts, Path(transfer).name, eval_data, data_options, rep)
    transfer_sha = sha256_file(ts.path)
    if ts.is_text:
        inputs, pre = fitted or fit_transfer_words(ts, words, rep)
    else:
        inputs, pre = table_inputs(ts, cfg.max_categories, rep)
    model, pre = _build(arch, cfg, inputs, ts.num_classes, pre)
    init_student(model, pre, words if ts.is_text else None, rep, ts)
    eval_ds = encoded_table(encoded(eval_ds, pre), pre)
    training, fingerprint = _student_record(ts, Path(transfer).name, transfer_sha, arch, d, cfg,
                                            data_options, words if ts.is_text else None)
    outputs = _Outputs(out, force, f"Distilled {arch.spec()} from {Path(transfer).name}", start,
                       {"class_names": ts.meta.get("class_names"),
                        "feature_names": ts.meta.get("feature_names")}, precision_note)
    with session(resolve_device(cfg.device)) as dist:
        history = fit(model, arch, inputs, step, ["train_loss", "hard", "soft", "agreement"],
                      cfg, eval_data=eval_ds,
                      checkpoint=None if cfg.dry_run else checkpoint_path(out),
                      fingerprint=fingerprint, resume=resume, reporter=rep, dist=dist)
        check_unchanged(ts, stamps)  # trained on the bytes that were checked, or nothing
        return _finish(model, arch=arch, pre=pre, num_classes=ts.num_classes,
                       training=training, history=history, eval_ds=eval_ds, cfg=cfg,
                       outputs=outputs, reporter=rep, dist=dist)


def _with(distill: DistillConfig, **fields: Any) -> DistillConfig:
    """``distill`` with the ``fields`` that are not None put in."""
    given = {k: v for k, v in fields.items() if v is not None}
    return replace(distill, **given) if given else distill


def _check_targets(ts: TransferSet, d: DistillConfig, rep: Reporter) -> None:
    """Fail early, saying why, if the transfer set cannot give the targets ``d`` asks for."""
    probe = torch.arange(1)
    if matches_logits(d):
        ts.teacher_logits(probe)  # fails for top-k sets
        return
    ts.targets(probe, d.T)  # T cannot always be re-derived
    if d.T != ts.T:
        rep.info(f"re-deriving soft targets at T={d.T:g} from {ts.form.rederived_from} logits "
                 f"(the transfer set was made at T={ts.T:g})")


def _student_step(ts: TransferSet, d: DistillConfig) -> StepLoss:
    """The loss of a batch of the transfer set ``ts``, and its statistics: the total, hard and
    soft losses and the agreement with the teacher's predictions."""
    teacher_pred = ts.teacher_argmax()
    labels = ts.columns["labels"] if d.alpha > 0 else None
    crit, logits = criterion(d), matches_logits(d)

    def step(z: torch.Tensor, idx: torch.Tensor):
        target = ts.teacher_logits(idx) if logits else ts.targets(idx, d.T)
        y = None if labels is None else labels[idx].long().to(z.device)
        total, hard, soft = crit(z, to_device(target, z.device), y)
        agree = (z.argmax(-1) == teacher_pred[idx].to(z.device)).float().mean()
        return total, torch.stack([total.detach(), hard.detach(), soft.detach(), agree])

    return step


def _student_eval_data(ts: TransferSet, name: str, eval_data: str | None,
                       data_options: DataOptions | None, rep: Reporter) -> Data | None:
    """The data of ``--eval-data`` for a student of ``ts`` (a table read with the data
    options the transfer set records, unless given), refused unless its classes and example
    shape match."""
    options = recorded_options(data_options, ts.meta)
    eval_ds = _eval_data(eval_data, str(ts.meta.get("data_source", "")), options,
                         ts.meta.get("class_names"), f"transfer set {name}",
                         [] if ts.is_text else list(ts.columns["inputs"].shape[1:]),
                         "the transfer set's are", rep,
                         ts.meta.get("feature_names"))
    if eval_ds is not None and eval_ds.labels is not None and (
            int(eval_ds.labels.max()) >= ts.num_classes):
        raise UsageError(f"--eval-data has labels up to {int(eval_ds.labels.max())}, but the "
                         f"transfer set has {ts.num_classes} classes", "Use matching data")
    return eval_ds


def _student_record(ts: TransferSet, name: str, transfer_sha: str, arch: Architecture,
                    d: DistillConfig, cfg: TrainConfig, data_options: DataOptions | None,
                    words: WordsConfig | None = None) -> tuple[dict, dict]:
    """What a student's model file records of its training, and the fingerprint of the
    settings that a resumed run must match."""
    teachers = [{k: t.get(k) for k in ("file", "sha256", "format", "training")}
                for t in ts.meta.get("teachers", [])]
    training = {"command": "train-student", "architecture": arch.spec(),
                "transfer": name, "transfer_sha256": transfer_sha,
                "data": ts.meta.get("data_source"), "T": d.T, "alpha": d.alpha, "loss": d.loss,
                "center": d.center if d.loss == "mse" else None,
                "targets": ts.form.label(),
                "tail": d.tail if ts.form.has_tail and d.loss == "kd" else None,
                "teachers": teachers,
                **_recorded(recorded_options(data_options, ts.meta)),
                **cfg.settings(), **(words.settings() if words else {})}
    if ts.meta.get("class_names"):
        training["class_names"] = ts.meta["class_names"]
    fingerprint = {"command": "train-student", "transfer_sha256": transfer_sha,
                   "arch": arch.to_dict(), **d.settings(ts.form.has_tail), "config": cfg.settings(),
                   **({"words": words.settings()} if words else {})}
    return training, fingerprint
