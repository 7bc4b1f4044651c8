"""``kdcli eval``: error count, accuracy, NLL, calibration and agreement of models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.errors import DataError, UsageError
from kdcli.output import Reporter

if TYPE_CHECKING:
    import torch


def predict(fn: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
            batch_size: int = 1000) -> torch.Tensor:
    """Run ``fn`` over ``inputs`` in batches; return ``[N, C]`` float32 logits."""
    import torch

    with torch.inference_mode():
        return torch.cat([fn(inputs[i:i + batch_size]).float()
                          for i in range(0, inputs.shape[0], batch_size)])


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor,
                           bins: int = 15) -> dict[str, float]:
    """Errors, accuracy, mean NLL and expected calibration error (ECE, ``bins`` bins).

    Args:
        logits: ``[N, C]``.
        labels: ``[N]`` int64.
    """
    import torch
    import torch.nn.functional as F

    if int(labels.max()) >= logits.shape[1]:
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
             batch_size: int = 1000, trust_pickle: bool = False,
             reporter: Reporter | None = None) -> dict[str, Any]:
    """Evaluate one or more models (any teacher format) on labelled data.

    Args:
        models: Model files: kdcli, ONNX, TorchScript, torch.export, ...
        data: A labelled data spec.
        limit: Use only the first N examples.
        batch_size: Examples per forward pass.
        trust_pickle: Allow pickled modules (runs code from the file).
        reporter: Output sink.

    Returns:
        ``{"models": [...metrics...], "agreement": [[...]]}``.
    """
    from kdcli.data import load_data
    from kdcli.teachers import TeacherOptions, load_teacher

    rep = reporter or Reporter()
    if not models:
        raise UsageError("no model given", "Name at least one model file")
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}", "Try 1000")
    ds = load_data(data, limit=limit)
    if ds.labels is None:
        raise DataError(f"{ds.source} has no labels", "Evaluate on labelled data, e.g. mnist:test")
    results, preds = [], []
    for path in models:
        t = load_teacher(path, TeacherOptions(trust_pickle=trust_pickle), role="model",
                         probe=ds.inputs[:batch_size])
        with rep.progress(f"eval {t.name}", len(ds)) as advance:
            def fn(x, t=t, advance=advance):
                y = t.logits(x)
                advance(x.shape[0])
                return y
            logits = predict(fn, ds.inputs, batch_size)
        m = classification_metrics(logits, ds.labels)
        m.update(model=str(path), format=t.format, params=_param_count(t),
                 file_bytes=Path(path).stat().st_size)
        results.append(m)
        preds.append(logits.argmax(-1))
    agreement = [[float((a == b).float().mean()) for b in preds] for a in preds]
    rep.table(f"Evaluation on {ds.source} ({len(ds):,} examples)",
              ["model", "errors", "accuracy", "NLL", "ECE", "params", "size"],
              [[Path(r["model"]).name, r["errors"], f"{100 * r['accuracy']:.2f}%", r["nll"],
                r["ece"], r["params"] if r["params"] is not None else "-",
                _human_bytes(r["file_bytes"])] for r in results])
    if len(models) > 1:
        names = [Path(str(p)).name for p in models]
        rep.table("Top-1 agreement", ["", *names],
                  [[names[i], *(f"{100 * a:.2f}%" for a in row)]
                   for i, row in enumerate(agreement)])
    return {"data": ds.source, "models": results, "agreement": agreement}


def _param_count(t) -> int | None:
    runner_model = getattr(t, "module", None)
    if t.format == "onnx":
        import onnx
        from onnx import numpy_helper

        m = onnx.load(str(t.path))
        arrays = (numpy_helper.to_array(i) for i in m.graph.initializer)
        # Learned tensors only: not scalar constants (scale, mean, std) or integer shapes.
        return int(sum(a.size for a in arrays if a.ndim >= 1 and a.dtype.kind == "f"))
    if runner_model is not None and hasattr(runner_model, "parameters"):
        return sum(p.numel() for p in runner_model.parameters())
    return None


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
