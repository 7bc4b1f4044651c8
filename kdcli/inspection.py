"""``kdcli inspect``: what a transfer set, kdcli model, ONNX model or checkpoint folder holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from kdcli.errors import FormatError
from kdcli.io.files import require_file
from kdcli.io.storage import read_safetensors_metadata
from kdcli.output import Reporter
from kdcli.teachers.base import short
from kdcli.teachers.formats import find_inspector
from kdcli.transfer.layout import TRANSFER_FORMAT, is_index_path
from kdcli.transfer.reader import load_transfer_set

MAX_DARK_CLASSES = 1000  # a [C, C] table of mean soft targets beyond this is too big to show
SHOWN_ROWS = 5  # the rows of a text set shown with their texts


def inspect_file(path: str | Path, reporter: Reporter | None = None,
                 verify: bool = False) -> dict[str, Any]:
    """Describe a kdcli file: its format, metadata, tensors and (for transfer sets) the
    soft targets' entropy and "dark knowledge" (each class's most similar other class).

    Args:
        path: A transfer set, kdcli model file, ONNX model or Hugging Face checkpoint folder.
        reporter: Output sink.
        verify: For transfer sets, also verify the checksums (``data_sha256``,
            ``inputs_sha256``) and every stored row, as training does. Model files are
            always verified.
    """
    rep = reporter or Reporter()
    if Path(path).is_dir() and (fmt := find_inspector(Path(path))) is not None:
        return fmt.inspect(Path(path), rep)
    p = require_file(path, "file")
    if is_index_path(p):
        return _inspect_transfer(p, rep, verify)
    fmt = find_inspector(p)
    if fmt is not None:
        return fmt.inspect(p, rep)
    meta = read_safetensors_metadata(p)
    if meta is None:
        raise FormatError(f"{p} is not a kdcli file", "Give a transfer set, model or .onnx")
    if meta.get("format") == TRANSFER_FORMAT:
        return _inspect_transfer(p, rep, verify)
    raise FormatError(f"{p} is a safetensors file without a kdcli format name",
                      "Give a file written by kdcli")


def _inspect_transfer(p: Path, rep: Reporter, verify: bool = False) -> dict[str, Any]:
    ts = load_transfer_set(p, check_values=verify, verify=verify)
    c, n = ts.num_classes, len(ts)
    entropy, tail_mass, dark = _target_statistics(ts)
    file_bytes = sum(int(s.get("bytes", 0)) for s in ts.shards)
    info = {
        "file": str(p), "kind": "transfer set", "format": ts.meta["format"],
        "format_version": int(ts.meta["format_version"]), "T": ts.T,
        "examples": n, "classes": c, "storage": ts.storage, "top_k": ts.top_k,
        "shards": len(ts.shards), "bytes": file_bytes,
        "bytes_per_example": round(file_bytes / n, 1),
        "mean_tail_mass": tail_mass / n,
        "combine": ts.meta.get("combine"), "weights": ts.meta.get("weights"),
        "teachers": ts.meta.get("teachers"), "data_source": ts.meta.get("data_source"),
        "inputs_sha256": ts.meta.get("inputs_sha256"), "created": ts.meta.get("created"),
        "kdcli_version": ts.meta.get("kdcli_version"),
        "tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                    for k, v in ts.columns.items()},
        "mean_entropy_nats": entropy / n, "dark_knowledge": dark, "verified": verify,
        "class_names": ts.meta.get("class_names"), "feature_names": ts.meta.get("feature_names"),
        "categories": ts.meta.get("categories"),
    }
    if ts.is_text:
        info["tensors"]["text_bytes"] = {"dtype": "uint8",
                                         "shape": [sum(len(b) for b in ts.text_bytes)]}
        info["text_columns"] = ts.meta.get("text_columns")
        info["rows"] = _text_rows(ts)
    names = info["class_names"]
    for d in dark:
        if names:
            d["class_name"], d["closest_name"] = names[d["class"]], names[d["closest"]]
    _show_transfer(info, ts, rep)
    return info


def _text_rows(ts, count: int = SHOWN_ROWS, top: int = 3) -> list[dict[str, Any]]:
    """The first ``count`` rows of a text set: their texts, label and the teacher's ``top``
    classes with their probabilities at T = 1 (at the stored T when T = 1 cannot be derived
    from a top-k set)."""
    n = min(count, len(ts))
    idx = torch.arange(n)
    T = 1.0 if ts.rederive_problem(1.0) is None else ts.T
    probs = ts.dense_targets(idx, T)
    labels = ts.columns["labels"][idx].tolist() if ts.has_labels else [None] * n
    names = ts.meta.get("class_names")
    rows = []
    for i, (text, p) in enumerate(zip(ts.texts(idx).strings(), probs, strict=True)):
        k = min(top, len(p))
        values, classes = p.topk(k)
        rows.append({"row": i, "text": list(text) if isinstance(text, tuple) else text,
                     "label": labels[i], "T": T,
                     "top": [{"class": int(c), **({"name": names[int(c)]} if names else {}),
                              "prob": round(float(v), 4)} for v, c in zip(values, classes,
                                                                          strict=True)]})
    return rows


def _clip_text(text: str | list[str], width: int = 70) -> str:
    """A text on one line, cut to ``width`` characters (a pair joined by `` | ``)."""
    joined = " | ".join(text) if isinstance(text, list) else text
    one = " ".join(joined.split())
    return one if len(one) <= width else one[:width - 1] + "…"


def _target_statistics(ts) -> tuple[float, float, list[dict[str, Any]]]:
    """In one pass over the stored targets: the summed entropy, the summed tail mass (top-k
    sets) and, for up to MAX_DARK_CLASSES classes, each class's most probable other class."""
    c, n = ts.num_classes, len(ts)
    with_dark = c <= MAX_DARK_CLASSES
    sums = torch.zeros(c if with_dark else 0, c, dtype=torch.float64)  # per class: sum of targets
    counts = torch.zeros(c, dtype=torch.long)
    entropy = tail_mass = 0.0
    group_col = ts.columns.get("labels")
    pred = ts.teacher_argmax()
    step = ts.chunk_rows()
    for a in range(0, n, step):
        idx = torch.arange(a, min(n, a + step))
        tail_mass += ts.form.tail_mass(ts, idx)
        probs = ts.dense_targets(idx, ts.T).double()
        entropy += float(-(probs * probs.clamp_min(1e-30).log()).sum())
        group = group_col[idx].long() if group_col is not None else pred[idx]
        if with_dark:
            sums.index_add_(0, group, probs)
        counts += torch.bincount(group, minlength=c)
    dark = []
    for k in range(c if with_dark else 0):
        if counts[k] == 0:
            continue
        mean = sums[k] / counts[k]
        mean[k] = -1
        other = int(mean.argmax())
        dark.append({"class": k, "examples": int(counts[k]), "closest": other,
                     "soft_prob": float(mean[other])})
    return entropy, tail_mass, dark


def _show_transfer(info: dict[str, Any], ts, rep: Reporter) -> None:
    """The tables of ``kdcli inspect`` for a transfer set."""
    form = ts.form.describe(ts.meta)
    rows = [[k, short(info[k])] for k in ("format", "format_version", "T", "examples",
                                           "classes")]
    rows += [["storage", form],
             ["files", "1 file" if len(ts.shards) == 1 else f"{len(ts.shards)} shards"],
             ["bytes", f"{info['bytes']:,} ({info['bytes_per_example']:,} per example)"]]
    if ts.form.has_tail:
        rows.append(["mean tail mass", f"{info['mean_tail_mass']:.4g}"])
    rows += [[k, short(info[k])] for k in ("combine", "weights", "data_source", "created",
                                            "kdcli_version", "mean_entropy_nats",
                                            "class_names", "feature_names") if info[k]]
    if info.get("text_columns"):
        rows.append(["text columns", short(info["text_columns"])])
    if info.get("categories"):
        rows.append(["category columns", ", ".join(f"{k} ({len(v)})" for k, v in
                                                   info["categories"].items())])
    rows.append(["verified", "checksums and every row" if info["verified"]
                 else "no (use --verify)"])
    rep.table(f"Transfer set {Path(info['file']).name}", ["", "value"], rows)
    rep.table("Teachers", ["file", "format", "output", "sha256"],
              [[t.get("file"), t.get("format"), t.get("output"), str(t.get("sha256"))[:12]]
               for t in info["teachers"] or []])
    rep.table("Tensors", ["name", "dtype", "shape"],
              [[k, v["dtype"], str(v["shape"])] for k, v in info["tensors"].items()])
    if info.get("rows"):
        names = info["class_names"]
        rep.table(f"The first {len(info['rows'])} texts and the teacher's top classes "
                  f"(T={info['rows'][0]['T']:g})", ["row", "text", "label", "teacher"],
                  [[r["row"], escape(_clip_text(r["text"])),
                    "-" if r["label"] is None else
                    escape(names[r["label"]] if names else str(r["label"])),
                    escape(", ".join(f"{t.get('name', t['class'])} {t['prob']:.2f}"
                                     for t in r["top"]))] for r in info["rows"]])
    if info["classes"] <= MAX_DARK_CLASSES:
        rep.table("Dark knowledge: each class's most probable other class (mean soft target)",
                  ["class", "examples", "closest", "soft prob"],
                  [[d.get("class_name", d["class"]), d["examples"],
                    d.get("closest_name", d["closest"]), d["soft_prob"]]
                   for d in info["dark_knowledge"]])
    else:
        rep.info(f"(the dark-knowledge table is shown for up to {MAX_DARK_CLASSES} classes)")


