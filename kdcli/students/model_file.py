"""The kdcli model file: a student's weights, architecture and preprocessing in one
safetensors file (see ``docs/formats.md``)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcli import __version__
from kdcli.errors import FormatError, UsageError
from kdcli.io.files import require_file
from kdcli.io.storage import (
    DATA_SHA256,
    SafetensorsWriter,
    data_sha256,
    read_safetensors,
    read_safetensors_metadata,
)
from kdcli.preprocessing import Preprocessing
from kdcli.students.base import Architecture, build_model

MODEL_FORMAT = "kdcli.model"
# Version 2 adds data_sha256 (the checksum of the weights, always written), per-channel and
# per-feature mean/std (lists), class_names and feature_names. Version 1 files still load.
MODEL_FORMAT_VERSION = 2


@dataclass
class ModelFile:
    """A loaded kdcli model file: the module and everything its metadata says."""

    model: nn.Module
    arch: Architecture
    preprocessing: Preprocessing
    num_classes: int
    training: dict[str, Any]
    metadata: dict[str, str]
    class_names: list[str] | None = None
    feature_names: list[str] | None = None


def save_model(path: str | Path, model: nn.Module, arch: Architecture, pre: Preprocessing,
               num_classes: int, training: dict[str, Any], *,
               class_names: list[str] | None = None,
               feature_names: list[str] | None = None) -> None:
    """Write a kdcli model file (``format: kdcli.model``, version 2) at ``path``.

    The header records ``data_sha256``, the SHA-256 of the weights' bytes, which
    :func:`load_model` checks; ``class_names`` and ``feature_names`` are kept when given.
    The caller is responsible for atomicity (see :func:`kdcli.io.files.atomic_output`).
    """
    meta = {
        "format": MODEL_FORMAT,
        "format_version": str(MODEL_FORMAT_VERSION),
        "kdcli_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "architecture": json.dumps(arch.to_dict()),
        "preprocessing": json.dumps(pre.to_dict()),
        "num_classes": str(num_classes),
        "training": json.dumps(training, default=float),
    }
    if class_names is not None:
        meta["class_names"] = json.dumps(list(class_names))
    if feature_names is not None:
        meta["feature_names"] = json.dumps(list(feature_names))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    with SafetensorsWriter(path, specs, meta) as w:
        for k, v in state.items():
            w.write(k, 0, v)


def check_format(meta: dict[str, str], path: Path, name: str, version: int) -> None:
    """Check a file's format name and version, saying exactly what is wrong."""
    got = meta.get("format")
    if got != name:
        what = f"format {got!r}" if got else "no kdcli format name"
        raise FormatError(f"{path} has {what}, not {name!r}",
                          "Give a file written by kdcli (see docs/formats.md)")
    v = meta.get("format_version", "")
    if not v.isdigit():
        raise FormatError(f"{path} has no valid format_version", "The file is damaged")
    if int(v) > version:
        raise FormatError(f"{path} is {name} version {v}; this kdcli reads up to {version}",
                          "Upgrade kdcli")
    if int(v) < 1:
        raise FormatError(f"{path} has unsupported {name} version {v}", "Regenerate the file")


def load_model(path: str | Path) -> ModelFile:
    """Load a kdcli model file without any user code.

    The metadata is checked for impossible values, the weights' checksum (``data_sha256``,
    version 2) is verified, and the weights must be finite.

    Raises:
        FormatError: not a kdcli model file, a newer version, impossible metadata, a
            checksum mismatch, or tensors that do not fit the architecture.
    """
    p = require_file(path, "model file")
    meta = read_safetensors_metadata(p)
    if meta is None:
        raise FormatError(f"{p} is not a safetensors file", "Give a kdcli model .safetensors")
    check_format(meta, p, MODEL_FORMAT, MODEL_FORMAT_VERSION)
    arch, pre, num_classes, training, class_names, feature_names = _model_metadata(p, meta)
    tensors, _, mapped = read_safetensors(p)
    recorded = meta.get(DATA_SHA256)
    if recorded is None and int(meta["format_version"]) >= 2:
        raise FormatError(f"{p} is kdcli.model version 2 but records no {DATA_SHA256}",
                          "The file is damaged; regenerate it")
    if recorded is not None and data_sha256(mapped) != recorded:
        raise FormatError(f"{p} fails its checksum: its weights are not the bytes that were "
                          "written", "The file is damaged; regenerate or copy it again")
    _check_weight_dtypes(p, tensors)
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FormatError(f"{p} has NaN or Inf in weight {name!r}",
                              "The model is broken; retrain it (a lower --lr may help)")
    try:
        model = build_model(arch, pre, num_classes)
        model.load_state_dict({k: v.clone() for k, v in tensors.items()}, strict=True)
    except (RuntimeError, UsageError) as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        first = next((ln for ln in lines if not ln.startswith("Error(s) in loading")),
                     lines[0] if lines else type(e).__name__)[:300].rstrip(".")
        raise FormatError(f"{p} has tensors that do not fit its architecture: {first}",
                          "The file is damaged; regenerate it") from e
    model.eval()
    return ModelFile(model, arch, pre, num_classes, training, meta, class_names, feature_names)


def _check_weight_dtypes(p: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Weights are float32 (BatchNorm's ``num_batches_tracked`` int64), as kdcli writes
    them: another dtype would be cast silently on load."""
    for name, t in tensors.items():
        want = "int64" if name.endswith("num_batches_tracked") else "float32"
        got = str(t.dtype).removeprefix("torch.")
        if got != want:
            raise FormatError(f"{p} stores weight {name!r} as {got}, not {want}",
                              "The file is damaged or was not written by kdcli; regenerate it")


def _model_metadata(p: Path, meta: dict[str, str]
                    ) -> tuple[Architecture, Preprocessing, int, dict[str, Any],
                               list[str] | None, list[str] | None]:
    """Decode and range-check a model file's metadata (FormatError saying what is wrong)."""
    try:
        record = json.loads(meta["architecture"])
        pre = Preprocessing.from_dict(json.loads(meta["preprocessing"]))
        if pre.size is not None:  # a teacher's field: a student takes its raw shape
            raise TypeError("size")
        num_classes = int(meta["num_classes"])
        training = json.loads(meta.get("training", "{}"))
        class_names = _names(meta, "class_names", num_classes)
        feature_names = _names(meta, "feature_names", None)
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        what = {KeyError: f"missing key {e}", TypeError: "fields it does not know or lacks",
                RecursionError: "nested too deeply"}.get(type(e), str(e)[:100])
        raise FormatError(f"{p} has bad kdcli.model metadata ({what})",
                          "Regenerate the file") from None
    try:
        arch = Architecture.from_dict(record)
        arch.check()
    except TypeError:
        raise FormatError(f"{p} has bad kdcli.model metadata (fields it does not know or "
                          "lacks)", "Regenerate the file") from None
    except UsageError as e:
        raise FormatError(f"{p} records an impossible architecture: {e.message}",
                          "The file is damaged; regenerate it") from None
    raw = pre.raw_shape
    if not (isinstance(raw, list) and 1 <= len(raw) <= 4 and all(
            type(d) is int and 1 <= d <= 1 << 20 for d in raw) and math.prod(raw) <= 1 << 28):
        raise FormatError(f"{p} records an impossible raw_shape {str(raw)[:60]}",
                          "The file is damaged; regenerate it")
    scale = pre.scale
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise FormatError(f"{p} records preprocessing scale={scale!r}",
                          "The file is damaged; regenerate it")
    try:
        pre.check()  # mean and std: finite, std > 0, one value or one per channel/feature
    except UsageError as e:
        raise FormatError(f"{p} records impossible preprocessing: {e.message}",
                          "The file is damaged; regenerate it") from None
    if pre.tokenizer is not None:
        _check_tokenizer(p, pre.tokenizer)
    if pre.table is not None:
        _check_table(p, pre, feature_names)
    if not 1 <= num_classes <= 1 << 24:
        raise FormatError(f"{p} records num_classes={num_classes}",
                          "The file is damaged; regenerate it")
    if not isinstance(training, dict):
        raise FormatError(f"{p} has a training record that is not an object",
                          "The file is damaged; regenerate it")
    return arch, pre, num_classes, training, class_names, feature_names


def _check_table(p: Path, pre: Preprocessing, feature_names: list[str] | None) -> None:
    """A table student's encoding: well formed, its columns the file's ``feature_names``
    and its raw shape (FormatError naming what is wrong)."""
    from kdcli.students.table_encoding import TableEncoding

    try:
        enc = TableEncoding.from_json(pre.table, feature_names)
    except FormatError as e:
        raise FormatError(f"{p}: {e.message}", e.hint) from None
    if list(pre.raw_shape) != [len(enc.columns)]:
        raise FormatError(f"{p} records raw_shape {pre.raw_shape} for a table encoding of "
                          f"{len(enc.columns)} columns", "The file is damaged; regenerate it")


def _check_tokenizer(p: Path, field: Any) -> None:
    """A subword student's tokenizer: the JSON its hash says, a tokenizer (FormatError)."""
    from kdcli.students.subwords import check_record

    try:
        check_record(field)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own types
        raise FormatError(f"{p} records a bad tokenizer: {str(e).splitlines()[0][:200]}",
                          "The file is damaged; regenerate it") from None


def _names(meta: dict[str, str], key: str, count: int | None) -> list[str] | None:
    """A JSON list of strings from the metadata (``count`` long if given), or None."""
    if key not in meta:
        return None
    names = json.loads(meta[key])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{key} is not a list of strings")
    if count is not None and len(names) != count:
        raise ValueError(f"{len(names)} {key} for {count} classes")
    return names
