"""``kdcli inspect``: what a transfer set, kdcli model or ONNX export holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdcli.errors import FormatError
from kdcli.files import require_file
from kdcli.output import Reporter


def inspect_file(path: str | Path, reporter: Reporter | None = None) -> dict[str, Any]:
    """Describe a kdcli file: its format, metadata, tensors and (for transfer sets) the
    soft targets' entropy and "dark knowledge" (each class's most similar other class).

    Args:
        path: A transfer set, kdcli model file or ONNX export.
        reporter: Output sink.
    """
    from kdcli.models import MODEL_FORMAT, read_safetensors_metadata
    from kdcli.transfer import TRANSFER_FORMAT

    rep = reporter or Reporter()
    p = require_file(path, "file")
    meta = read_safetensors_metadata(p)
    if meta is None:
        from kdcli.teachers import is_onnx_file

        if p.suffix == ".onnx" or is_onnx_file(p):
            return _inspect_onnx(p, rep)
        raise FormatError(f"{p} is not a kdcli file", "Give a transfer set, model or .onnx")
    fmt = meta.get("format")
    if fmt == TRANSFER_FORMAT:
        return _inspect_transfer(p, rep)
    if fmt == MODEL_FORMAT:
        return _inspect_model(p, rep)
    raise FormatError(f"{p} is a safetensors file without a kdcli format name",
                      "Give a file written by kdcli")


def _inspect_transfer(p: Path, rep: Reporter) -> dict[str, Any]:
    from kdcli.transfer import load_transfer_set

    ts = load_transfer_set(p, check_values=False)
    probs = ts.soft_targets
    entropy = float(-(probs * probs.clamp_min(1e-30).log()).sum(-1).mean())
    group = ts.labels if ts.labels is not None else ts.logits.argmax(-1)
    dark = []
    for c in range(ts.num_classes):
        sel = group == c
        if not bool(sel.any()):
            continue
        mean = probs[sel].mean(0).clone()
        mean[c] = -1
        other = int(mean.argmax())
        dark.append({"class": c, "examples": int(sel.sum()), "closest": other,
                     "soft_prob": float(mean[other])})
    tensors = {"inputs": ts.inputs, "labels": ts.labels, "member_logits": ts.member_logits,
               "logits": ts.logits, "soft_targets": ts.soft_targets}
    info = {
        "file": str(p), "kind": "transfer set", "format": ts.meta["format"],
        "format_version": int(ts.meta["format_version"]), "T": ts.T,
        "examples": len(ts), "classes": ts.num_classes,
        "combine": ts.meta.get("combine"), "weights": ts.meta.get("weights"),
        "teachers": ts.meta.get("teachers"), "data_source": ts.meta.get("data_source"),
        "inputs_sha256": ts.meta.get("inputs_sha256"), "created": ts.meta.get("created"),
        "kdcli_version": ts.meta.get("kdcli_version"),
        "tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                    for k, v in tensors.items() if v is not None},
        "mean_entropy_nats": entropy, "dark_knowledge": dark,
    }
    rep.table(f"Transfer set {p.name}", ["", "value"], [
        [k, _short(info[k])] for k in ("format", "format_version", "T", "examples", "classes",
                                       "combine", "weights", "data_source", "created",
                                       "kdcli_version", "mean_entropy_nats")])
    rep.table("Teachers", ["file", "format", "output", "sha256"],
              [[t.get("file"), t.get("format"), t.get("output"), str(t.get("sha256"))[:12]]
               for t in info["teachers"] or []])
    rep.table("Tensors", ["name", "dtype", "shape"],
              [[k, v["dtype"], str(v["shape"])] for k, v in info["tensors"].items()])
    rep.table("Dark knowledge: each class's most probable other class (mean soft target)",
              ["class", "examples", "closest", "soft prob"],
              [[d["class"], d["examples"], d["closest"], d["soft_prob"]] for d in dark])
    return info


def _inspect_model(p: Path, rep: Reporter) -> dict[str, Any]:
    from dataclasses import asdict

    from kdcli.models import count_params, load_model

    mf = load_model(p)
    info = {"file": str(p), "kind": "model", "format": mf.metadata["format"],
            "format_version": int(mf.metadata["format_version"]),
            "architecture": mf.arch.spec(), "architecture_detail": asdict(mf.arch),
            "preprocessing": asdict(mf.preprocessing), "classes": mf.num_classes,
            "params": count_params(mf.model), "training": mf.training,
            "created": mf.metadata.get("created"),
            "kdcli_version": mf.metadata.get("kdcli_version")}
    rows = [[k, _short(info[k])] for k in ("format", "format_version", "architecture",
                                           "params", "classes", "preprocessing", "created")]
    rows += [[f"training.{k}", _short(v)] for k, v in mf.training.items()
             if k not in ("teachers",)]
    rep.table(f"Model {p.name}", ["", "value"], rows)
    return info


def _inspect_onnx(p: Path, rep: Reporter) -> dict[str, Any]:
    import onnx

    proto = onnx.load(str(p))
    props = {e.key: e.value for e in proto.metadata_props}
    info = {"file": str(p), "kind": "onnx", "metadata": props,
            "opset": [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")],
            "inputs": [i.name for i in proto.graph.input],
            "outputs": [o.name for o in proto.graph.output], "nodes": len(proto.graph.node)}
    rep.table(f"ONNX {p.name}", ["", "value"],
              [[k, _short(info[k])] for k in ("opset", "inputs", "outputs", "nodes")]
              + [[k, _short(v)] for k, v in props.items()])
    return info


def _short(v: Any, n: int = 90) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= n else s[: n - 1] + "…"
