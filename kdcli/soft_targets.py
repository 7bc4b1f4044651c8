"""``kdcli soft-targets``: run teachers over data and write a transfer set."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

from kdcli import __version__
from kdcli.errors import DataError, ModelError, UsageError
from kdcli.files import atomic_output, check_output
from kdcli.output import Reporter, Timer
from kdcli.teachers import Teacher, TeacherOptions, load_teacher
from kdcli.transfer import (
    COMBINE_RULES,
    TRANSFER_FORMAT,
    TRANSFER_FORMAT_VERSION,
    SafetensorsWriter,
    combine_members,
)


def check_temperature(T: float, flag: str = "--T") -> float:
    """Return T if it is a finite positive number, else raise UsageError."""
    if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
        raise UsageError(f"{flag} must be a finite number above 0, got {T}", "Try --T 20")
    return float(T)


def resolve_device(device: str) -> str:
    """Map ``auto`` to ``cuda`` when a GPU is present, else ``cpu``."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"unknown --device {device!r}", "Use auto, cpu or cuda")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA GPU is available", "Use --device cpu")
    return device


def soft_targets(
    teachers: list[str | Path],
    T: float = 20.0,
    data: str = "mnist:train",
    out: str | Path = "transfer.safetensors",
    *,
    options: list[TeacherOptions] | None = None,
    combine: str = "mean-probs",
    weights: list[float] | None = None,
    batch_size: int = 1024,
    device: str = "auto",
    precision: str = "fp32",
    classes: list[int] | None = None,
    exclude_classes: list[int] | None = None,
    limit: int | None = None,
    jitter: int = 0,
    copies: int = 0,
    seed: int = 0,
    force: bool = False,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Run one teacher or an ensemble over data and write a transfer set.

    Args:
        teachers: Teacher model files; several form an ensemble.
        T: Softmax temperature of the soft targets.
        data: Data spec (see :mod:`kdcli.data`).
        out: Output transfer-set path.
        options: Per-teacher :class:`TeacherOptions` (one for all, or one each).
        combine: ``mean-probs`` (the paper's arithmetic mean at T) or ``mean-logits``.
        weights: Per-teacher weights (default: equal).
        batch_size: Examples per teacher call.
        device: ``auto``, ``cpu`` or ``cuda``.
        precision: ``fp32`` (exact) or ``bf16`` (autocast).
        classes: Keep only examples with these labels.
        exclude_classes: Drop examples with these labels.
        limit: Use only the first N examples.
        jitter: Largest random shift, in pixels, of the augmented copies.
        copies: How many jittered copies of each example to add.
        seed: Seed of the augmentation.
        force: Overwrite ``out`` if it exists.
        reporter: Where progress and tables go (default: quiet).

    Returns:
        A summary: counts, per-teacher accuracy, disagreement, timing.
    """
    import torch

    from kdcli.augment import jitter as jitter_batch
    from kdcli.data import load_data

    rep = reporter or Reporter()
    T = check_temperature(T)
    if not teachers:
        raise UsageError("no teacher given", "Name at least one teacher file")
    if combine not in COMBINE_RULES:
        raise UsageError(f"unknown --combine {combine!r}", f"Use one of {', '.join(COMBINE_RULES)}")
    if precision not in ("fp32", "bf16"):
        raise UsageError(f"unknown --precision {precision!r}", "Use fp32 or bf16")
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}", "Try 1024")
    if copies < 0 or jitter < 0:
        raise UsageError("--copies and --jitter must be 0 or more", "Try --jitter 2 --copies 1")
    if copies and not jitter:
        raise UsageError("--copies needs --jitter K", "Add --jitter 2")
    m = len(teachers)
    weights = _check_weights(weights, m)
    opts = _per_member(options, m)
    check_output(out, force)
    dev = resolve_device(device)

    ds = load_data(data, limit=limit)
    ds = _filter_classes(ds, classes, exclude_classes)
    inputs, labels = ds.inputs, ds.labels
    if copies:
        gen = torch.Generator().manual_seed(seed)
        extra = [jitter_batch(inputs, jitter, gen) for _ in range(copies)]
        inputs = torch.cat([inputs, *extra])
        labels = None if labels is None else labels.repeat(copies + 1)
    n = int(inputs.shape[0])

    members = [load_teacher(p, o, device=dev, precision=precision)
               for p, o in zip(teachers, opts, strict=True)]
    for t, o in zip(members, opts, strict=True):
        if t.format != "kdcli" and inputs.dtype == torch.uint8 and \
                o.scale is None and o.mean is None and o.std is None:
            rep.warn(f"{t.name} gets raw 8-bit values (0-255): no --scale/--mean/--std given. "
                     "If it was trained on [0, 1] inputs, pass --scale 255")
    first = [t.logits(inputs[:batch_size]) for t in members]
    c = _check_classes(members, labels)

    meta = {
        "format": TRANSFER_FORMAT,
        "format_version": str(TRANSFER_FORMAT_VERSION),
        "kdcli_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "T": repr(T),
        "combine": combine,
        "weights": json.dumps(weights),
        "teachers": json.dumps([t.describe() for t in members]),
        "num_classes": str(c),
        "num_examples": str(n),
        "data_source": ds.source,
        "inputs_sha256": hashlib.sha256(memoryview(inputs.contiguous().numpy())).hexdigest(),
        "precision": precision,
        "classes": json.dumps(sorted(classes) if classes else None),
        "exclude_classes": json.dumps(sorted(exclude_classes) if exclude_classes else None),
        "jitter": str(jitter),
        "copies": str(copies),
        "seed": str(seed),
    }
    specs: dict[str, Any] = {"inputs": (inputs.dtype, tuple(inputs.shape))}
    if labels is not None:
        specs["labels"] = (torch.int64, (n,))
    if m > 1:
        specs["member_logits"] = (torch.float32, (m, n, c))
    specs["logits"] = (torch.float32, (n, c))
    specs["soft_targets"] = (torch.float32, (n, c))

    correct = torch.zeros(m + 1, dtype=torch.long)
    disagree = 0
    with atomic_output(out, force) as tmp, Timer() as timer, \
            SafetensorsWriter(tmp, specs, meta) as writer:
        writer.write("inputs", 0, inputs)
        if labels is not None:
            writer.write("labels", 0, labels)
        with rep.progress(f"soft targets T={T:g}", n) as advance:
            for start in range(0, n, batch_size):
                x = inputs[start:start + batch_size]
                outs = first if start == 0 else [t.logits(x) for t in members]
                z = torch.stack(outs)  # [M, B, C]
                _check_finite(z, members, start)
                logits, probs = combine_members(z, weights, combine, T)
                if m > 1:
                    for i in range(m):
                        writer.write("member_logits", (i * n + start) * c, z[i])
                    preds = z.argmax(-1)
                    disagree += int((preds != preds[0]).any(0).sum())
                writer.write("logits", start * c, logits)
                writer.write("soft_targets", start * c, probs)
                if labels is not None:
                    y = labels[start:start + batch_size]
                    correct[:m] += (z.argmax(-1) == y).sum(-1)
                    correct[m] += int((logits.argmax(-1) == y).sum())
                advance(x.shape[0])
    for t in members:
        for note in t.notes:
            rep.info(note)

    summary: dict[str, Any] = {
        "out": str(out), "examples": n, "classes": c, "T": T, "combine": combine,
        "weights": weights, "seconds": round(timer.seconds, 3),
        "samples_per_s": round(n / max(timer.seconds, 1e-9), 1),
        "teachers": [{"file": str(t.path), "format": t.format, "output": t.output,
                      "accuracy": (float(correct[i]) / n if labels is not None else None)}
                     for i, t in enumerate(members)],
    }
    if labels is not None:
        summary["ensemble_accuracy"] = float(correct[m]) / n
    if m > 1:
        summary["disagreement"] = disagree / n
    rows = [[Path(t["file"]).name, t["format"], t["output"],
             "-" if t["accuracy"] is None else f"{100 * t['accuracy']:.2f}%"]
            for t in summary["teachers"]]
    if m > 1:
        rows.append(["ensemble", combine, "logits",
                     "-" if labels is None else f"{100 * summary['ensemble_accuracy']:.2f}%"])
    rep.table(f"Transfer set {out}: {n:,} examples, {c} classes, T={T:g}, "
              f"{summary['samples_per_s']:,.0f} samples/s",
              ["teacher", "format", "output", "accuracy"], rows)
    if m > 1:
        rep.info(f"members disagree on {100 * summary['disagreement']:.2f}% of examples")
    return summary


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
    if not classes and not exclude:
        return ds
    if ds.labels is None:
        raise UsageError("--classes/--exclude-classes need labelled data", "Use labelled data")
    present = set(ds.labels.unique().tolist())
    for c in (classes or []) + (exclude or []):
        if c not in present:
            raise UsageError(f"class {c} does not occur in {ds.source}",
                             f"Choose from {sorted(present)}")
    import torch

    keep = torch.ones(len(ds), dtype=torch.bool)
    if classes:
        keep &= torch.isin(ds.labels, torch.tensor(classes))
    if exclude:
        keep &= ~torch.isin(ds.labels, torch.tensor(exclude))
    if not bool(keep.any()):
        raise DataError("no examples are left after filtering classes", "Relax the filter")
    return ds.subset(keep)


def _check_classes(members: list[Teacher], labels) -> int:
    counts = {t.name: t.num_classes for t in members}
    if len(set(counts.values())) != 1:
        raise ModelError(f"ensemble members disagree on the class count: {counts}",
                         "Use teachers trained on the same classes")
    c = int(next(iter(counts.values())))
    if labels is not None and int(labels.max()) >= c:
        raise ModelError(f"the teacher has {c} classes, but the data has label "
                         f"{int(labels.max())}", "Use a teacher trained on all classes")
    return c


def _check_finite(z, members: list[Teacher], start: int) -> None:
    import torch

    ok = torch.isfinite(z).all(-1)  # [M, B]
    if not bool(ok.all()):
        i, row = (~ok).nonzero()[0].tolist()
        rows = (start + (~ok[i]).nonzero()[:5, 0]).tolist()
        raise ModelError(f"teacher {members[i].name} output NaN or Inf (first bad rows {rows})",
                         "Check the teacher and its --scale/--mean/--std")
