"""Arrays as a data source: ``.npz`` / ``.safetensors`` holding ``inputs`` (any shape) and
optional integer ``labels``, or ``.npy`` holding inputs only. ``.npy`` and safetensors
inputs are memory-mapped; a kdcli transfer set works as a data source too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kdcli.data.base import DataOptions, Loaded, first_line
from kdcli.errors import DataError, FormatError
from kdcli.io import storage


def read_numpy(path: Path, split: str, options: DataOptions) -> Loaded:
    """A ``.npy`` (memory-mapped when it can be) or ``.npz`` file.

    Raises:
        DataError: not a NumPy file, a pickled object array, no ``inputs`` array, or
            arrays that are not numbers or do not match.
    """
    _check_magic(path)
    if path.suffix == ".npy":
        try:
            mapped = storage.map_npy(path)
        except OSError as e:
            raise DataError(f"cannot read {path}: {e}", "Check the file") from e
        if mapped is not None:
            tensor, mfile = mapped
            if tensor.dim() == 0:
                raise DataError(f"inputs in {path} are a scalar", "Store an [N, ...] array")
            return Loaded(((tensor[:, None] if tensor.dim() == 1 else tensor), mfile))

    def refused(e: Exception) -> DataError:
        if "allow_pickle" in str(e):  # numpy refuses object arrays without unpickling
            return DataError(f"{path} holds a pickled object array, which kdcli never "
                             "loads (it could run code)", "Save numeric arrays only")
        return DataError(f"cannot read {path}: {first_line(e)}",
                         "The file is corrupt or truncated")

    try:
        obj = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises many kinds here
        raise refused(e) from e
    if isinstance(obj, np.ndarray):
        return Loaded(*_check_arrays(path, obj, None))
    with obj:
        if "inputs" not in obj.files:
            raise DataError(f"{path} has no 'inputs' array (has {obj.files[:10]})",
                            "Save it with np.savez(path, inputs=..., labels=...)")
        try:
            inputs = obj["inputs"]
            labels = obj["labels"] if "labels" in obj.files else None
        except Exception as e:  # noqa: BLE001
            raise refused(e) from e
        return Loaded(*_check_arrays(path, inputs, labels))


def read_safetensors(path: Path, split: str, options: DataOptions) -> Loaded:
    """Memory-map ``inputs`` (and read ``labels``) from a safetensors file.

    Raises:
        DataError: not a valid safetensors file, no ``inputs``, or labels that are not one
            integer class index per input.
    """
    try:
        tensors, _, mapped = storage.read_safetensors(path)
    except FormatError as e:
        raise DataError(f"{path} is not a valid safetensors file: {e.message}",
                        "The file is truncated or corrupt") from e
    if "text_spans" in tensors:
        raise DataError(f"{path} is a transfer set of texts, which is not read as data yet",
                        "Give the text data it was made from (kdcli inspect shows its "
                        "data_source)")
    if "inputs" not in tensors:
        raise DataError(f"{path} has no 'inputs' tensor (has {sorted(tensors)})",
                        "Store the examples under the name 'inputs'")
    inputs, labels = tensors["inputs"], tensors.get("labels")
    if inputs.dim() == 0:
        raise DataError(f"inputs in {path} are a scalar", "Store an [N, ...] array")
    if inputs.dim() == 1:
        inputs = inputs[:, None]
    if labels is not None:
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise DataError(f"labels in {path} have dtype {labels.dtype}",
                            "Store integer class indices")
        if labels.dim() != 1 or len(labels) != len(inputs):
            raise DataError(f"{path} has {len(inputs)} inputs but labels of shape "
                            f"{tuple(labels.shape)}", "Give one integer label per input")
        labels = labels.clone()
    return Loaded((inputs, mapped), labels)


def _check_magic(path: Path) -> None:
    """Refuse a .npy/.npz that does not start as one, before numpy calls it a pickle."""
    with open(path, "rb") as f:
        head = f.read(6)
    if not (head == b"\x93NUMPY" or head.startswith((b"PK\x03\x04", b"PK\x05\x06"))):
        raise DataError(f"{path} is not a NumPy file: it starts with neither the .npy "
                        f"header nor a zip (.npz) header ({len(head)} bytes read: {head!r})",
                        "The file is truncated, corrupt or of another format")


def _check_arrays(path: Path, inputs: np.ndarray,
                  labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    for name, a in (("inputs", inputs), ("labels", labels)):
        if a is not None and a.dtype.kind not in "biuf":
            raise DataError(f"{name} in {path} have dtype {a.dtype} ({a.dtype.kind!r}), "
                            "not numbers", "Store numeric arrays (ints or floats)")
    if not inputs.dtype.isnative:  # big-endian: the same values in this machine's order
        inputs = inputs.astype(inputs.dtype.newbyteorder("="))
    if labels is not None and not labels.dtype.isnative:
        labels = labels.astype(labels.dtype.newbyteorder("="))
    if inputs.ndim == 0:
        raise DataError(f"inputs in {path} are a scalar", "Store an [N, ...] array")
    if inputs.ndim == 1:
        inputs = inputs[:, None]
    if labels is not None:
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"labels in {path} have dtype {labels.dtype}",
                            "Store integer class indices")
        if labels.dtype.kind == "u" and labels.size and \
                int(labels.max()) > np.iinfo(np.int64).max:
            raise DataError(f"labels in {path} include {int(labels.max())}, not a class index",
                            "Labels must be class indices 0..C-1")
        if labels.ndim != 1 or len(labels) != len(inputs):
            raise DataError(f"{path} has {len(inputs)} inputs but labels of shape {labels.shape}",
                            "Give one integer label per input")
    return inputs, labels
