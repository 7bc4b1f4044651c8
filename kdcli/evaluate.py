"""``kdcli eval``: error count, accuracy, NLL, calibration and agreement of models."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kdcli.checks import check_batch_size
from kdcli.data.base import (
    Data,
    DataOptions,
    absent_text,
    align_classes,
    check_same_classes,
    no_labels,
    table_columns,
)
from kdcli.data.sources import load_data
from kdcli.errors import DataError, ModelError, UsageError
from kdcli.output import Reporter, distinct_names
from kdcli.teachers.base import Teacher, TeacherOptions
from kdcli.teachers.formats import load_teacher, one_class_order


def predict(fn: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
            batch_size: int = 1000) -> torch.Tensor:
    """Run ``fn`` over ``inputs`` in batches; return ``[N, C]`` float32 logits on the CPU."""
    with torch.inference_mode():
        return torch.cat([fn(inputs[i:i + batch_size]).float().cpu()
                          for i in range(0, inputs.shape[0], batch_size)])


def _in_one_order(ds: Data, models: list[Teacher], rep: Reporter,
                  ) -> tuple[list[Teacher], list[str] | None, list[str]]:
    """The models with their outputs in one class order (the first that names its classes),
    the data's labels numbered in it (a test set may lack some of the classes, which is
    said), the class names and the classes the data lacks; refused where names differ."""
    models, order = one_class_order(models)
    absent: list[str] = []
    if order is not None:
        absent = align_classes(ds, order)
        if absent:
            rep.warn(absent_text(absent, ds.source))
    for t in models:
        check_same_classes(t.class_names, t.name, ds.class_names, ds.source)
    return models, ds.class_names or order, absent


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor,
                           bins: int = 15) -> dict[str, float]:
    """Errors, accuracy, mean NLL and expected calibration error (ECE, ``bins`` bins).

    Args:
        logits: ``[N, C]``.
        labels: ``[N]`` int64.
    """
    bad = ~torch.isfinite(logits).all(-1)
    if bool(bad.any()):
        rows = bad.nonzero()[:5, 0].tolist()
        raise ModelError(f"the model outputs NaN or Inf on {int(bad.sum())} of {len(logits)} "
                         f"examples (rows {rows})", "The model or its inputs are broken; check "
                         "the model file and its --scale/--mean/--std")
    if int(labels.max()) >= logits.shape[1] or int(labels.min()) < 0:
        raise DataError(f"labels go up to {int(labels.max())}, but the model has "
                        f"{logits.shape[1]} classes", "Evaluate on data with the model's classes")
    probs = logits.softmax(-1)
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    idx = torch.bucketize(conf, edges[1:-1])
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if bool(sel.any()):
            ece += float(sel.float().mean() * (correct[sel].mean() - conf[sel].mean()).abs())
    n = labels.shape[0]
    errors = int(n - correct.sum())
    return {"examples": n, "errors": errors, "accuracy": 1 - errors / n,
            "nll": float(F.cross_entropy(logits, labels)), "ece": ece}


def evaluate(models: list[str | Path], data: str = "mnist:test", *, limit: int | None = None,
             batch_size: int = 1000, options: list | None = None,
             trust_pickle: bool = False, reporter: Reporter | None = None,
             data_options: DataOptions | None = None) -> dict[str, Any]:
    """Evaluate one or more models (any teacher format) on labelled data.

    Args:
        models: Model files: kdcli, ONNX, TorchScript, torch.export, ...
        data: A labelled data spec.
        limit: Use only the first N examples.
        batch_size: Examples per forward pass.
        options: How to feed each model (:class:`kdcli.teachers.base.TeacherOptions`, one for all
            or one per model); the CLI builds them from the shared model options.
        trust_pickle: Allow pickled modules (runs code from the file), when ``options`` is
            not given.
        reporter: Output sink.
        data_options: How a table or image folder given as ``data`` is read.

    Returns:
        ``{"models": [...metrics...], "agreement": [[...]], "class_names": [...] | None}``.
    """
    rep = reporter or Reporter()
    if not models:
        raise UsageError("no model given", "Name at least one model file")
    check_batch_size(batch_size, "Try 1000")
    ds = load_data(data, limit=limit, options=data_options, reporter=rep)
    if ds.labels is None:
        raise no_labels(ds, "evaluate on labelled data, e.g. mnist:test")
    opts = options or [TeacherOptions(trust_pickle=trust_pickle)]
    if len(opts) not in (1, len(models)):
        raise UsageError(f"got options for {len(opts)} models but {len(models)} models",
                         "Give the model options once for all models, or once per model")
    loaded = [load_teacher(path, opts[i if len(opts) > 1 else 0], role="model",
                           probe=ds.inputs[:batch_size],
                           table=table_columns(ds, data_options))
              for i, path in enumerate(models)]
    loaded, class_names, absent = _in_one_order(ds, loaded, rep)
    for t in loaded:  # how each model takes the data (columns by name, unknown categories)
        for note in t.notes:
            rep.info(note)
    results, preds = [], []
    names = distinct_names(models)  # runs/a/m.onnx and runs/b/m.onnx: a/m.onnx, b/m.onnx
    for path, t, name in zip(models, loaded, names, strict=True):
        with rep.progress(f"eval {name}", len(ds)) as advance:
            def fn(x, t=t, advance=advance):
                y = t.logits(x)
                advance(x.shape[0])
                return y
            logits = predict(fn, ds.inputs, batch_size)
        m = classification_metrics(logits, ds.labels)
        m.update(model=str(path), format=t.format, params=t.param_count(),
                 file_bytes=_size(Path(path)))
        if ds.is_text:  # what a text student is for: its speed, next to its teacher's
            m.update(zip(("ms_per_text_1", "ms_per_text_64"), latency(t, ds.inputs),
                         strict=True))
        results.append(m)
        preds.append(logits.argmax(-1))
    agreement = [[float((a == b).float().mean()) for b in preds] for a in preds]
    speed = ["ms/text (1)", "ms/text (64)"] if ds.is_text else []
    rep.table(f"Evaluation on {ds.source} ({len(ds):,} examples)",
              ["model", "errors", "accuracy", "NLL", "ECE", "params", "size", *speed],
              [[name, r["errors"], f"{100 * r['accuracy']:.2f}%", r["nll"],
                r["ece"], r["params"] if r["params"] is not None else "-",
                _human_bytes(r["file_bytes"]),
                *(f"{r[k]:.3g}" for k in ("ms_per_text_1", "ms_per_text_64") if k in r)]
               for name, r in zip(names, results, strict=True)])
    if class_names:
        rep.info(f"classes: {', '.join(f'{i} {n}' for i, n in enumerate(class_names[:20]))}"
                 + (f", ... ({len(class_names)} in all)" if len(class_names) > 20 else ""))
    if len(models) > 1:
        rep.table("Top-1 agreement", ["", *names],
                  [[names[i], *(f"{100 * a:.2f}%" for a in row)]
                   for i, row in enumerate(agreement)])
    return {"data": ds.source, "models": results, "agreement": agreement,
            "class_names": class_names, "absent_classes": absent}


#: The texts :func:`latency` times one at a time, and the batches of 64 it times.
LATENCY_SINGLE, LATENCY_BATCHES = 200, 20


def latency(t: Teacher, texts: Any) -> tuple[float, float]:
    """A model's milliseconds per text: the median over single texts (the first
    :data:`LATENCY_SINGLE`) and over batches of 64 (the first :data:`LATENCY_BATCHES`),
    after one warm-up call."""
    strings = texts[:max(LATENCY_SINGLE, 64 * LATENCY_BATCHES)].strings()
    with torch.inference_mode():
        t.logits(strings[:64])

        def median(batches: list[list[Any]]) -> float:
            times = []
            for b in batches:
                start = time.perf_counter()
                t.logits(b)
                times.append((time.perf_counter() - start) / len(b))
            return 1e3 * statistics.median(times)

        one = median([[s] for s in strings[:LATENCY_SINGLE]])
        many = [strings[i:i + 64] for i in range(0, len(strings) - 63, 64)] or [strings]
        return one, median(many)


def _size(path: Path) -> int:
    """A model file's bytes, or a checkpoint folder's (its files, not its subfolders')."""
    if path.is_dir():  # links are not followed (a link out of the folder is not read)
        with os.scandir(path) as entries:
            return sum(e.stat(follow_symlinks=False).st_size for e in entries
                       if e.is_file(follow_symlinks=False))
    return path.stat().st_size


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
