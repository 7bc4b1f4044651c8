"""Data sources: the one place that turns a ``--data`` string into tensors.

Accepted specs (any of them may end in a slice such as ``[:1000]`` or ``[5000:6000]``):

* ``mnist`` / ``mnist:train`` / ``mnist:test``: the MNIST copy bundled with kdcli.
* a folder holding the four standard MNIST IDX files, optionally with ``:train``/``:test``.
* an IDX images file (``*-images-idx3-ubyte`` or ``.gz``); its labels file is found by
  the standard name (``images-idx3`` -> ``labels-idx1``) when present.
* ``.npz`` / ``.safetensors`` holding ``inputs`` (any shape) and optional integer ``labels``,
  or ``.npy`` holding inputs only. A kdcli transfer set works as a data source too.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.errors import DataError

if TYPE_CHECKING:
    import numpy as np
    import torch

MNIST_DIR = Path(__file__).parent / "datasets" / "mnist"
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_SLICE = re.compile(r"^(?P<base>.*)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


@dataclass
class Data:
    """A labelled or unlabelled set of examples held in memory as tensors.

    Attributes:
        inputs: ``[N, *sample_shape]`` in the dtype the source stores (uint8 for MNIST).
        labels: ``[N]`` int64 class indices, or None.
        source: The spec this was loaded from, recorded in output metadata.
    """

    inputs: torch.Tensor
    labels: torch.Tensor | None
    source: str
    files: list = field(default_factory=list)  # memory-mapped files the inputs live in

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    @property
    def num_classes(self) -> int | None:
        """One more than the largest label, or None for unlabelled data."""
        if self.labels is None or len(self.labels) == 0:
            return None
        return int(self.labels.max()) + 1

    def subset(self, index: torch.Tensor) -> Data:
        """The examples at ``index`` (a bool mask or integer indices)."""
        labels = None if self.labels is None else self.labels[index]
        return Data(self.inputs[index], labels, self.source)

    def release(self) -> None:
        """Drop the resident pages of memory-mapped inputs (they are re-read on use)."""
        for f in self.files:
            f.release()


def load_data(spec: str, limit: int | None = None) -> Data:
    """Load a data source.

    Args:
        spec: A data spec (see the module docstring).
        limit: Keep only the first ``limit`` examples (after any slice).

    Returns:
        The validated data.

    Raises:
        DataError: The source is missing, malformed or empty.
    """
    import torch

    spec = spec.strip()
    base, sl = _split_slice(spec)
    inputs, labels = _load_arrays(base)
    files = []
    if isinstance(inputs, tuple):  # memory-mapped: (tensor, MappedFile)
        inputs_t, mapped = inputs
        files.append(mapped)
    else:
        inputs_t = torch.from_numpy(inputs.copy() if not inputs.flags.writeable else inputs)
    if labels is None:
        labels_t = None
    elif isinstance(labels, torch.Tensor):
        labels_t = labels.long()
    else:
        labels_t = torch.from_numpy(labels.astype("int64"))
    if sl is not None:
        inputs_t = inputs_t[sl]
        labels_t = None if labels_t is None else labels_t[sl]
    if limit is not None:
        if limit <= 0:
            raise DataError(f"--limit must be positive, got {limit}", "Pass a count above 0")
        inputs_t = inputs_t[:limit]
        labels_t = None if labels_t is None else labels_t[:limit]
    data = Data(inputs_t if inputs_t.is_contiguous() else inputs_t.contiguous(), labels_t,
                spec if limit is None else f"{spec}[:{limit}]", files)
    validate(data)
    return data


def validate(data: Data) -> None:
    """Check that data is non-empty, finite and consistently labelled.

    Raises:
        DataError: naming what is wrong.
    """
    import torch

    if len(data) == 0:
        raise DataError(f"data {data.source} holds no examples", "Check the file or the slice")
    if data.inputs.dtype == torch.bool or data.inputs.is_complex():
        raise DataError(f"inputs of {data.source} have dtype {data.inputs.dtype}",
                        "Store real-valued inputs")
    if data.inputs.is_floating_point():
        step = max(1, (64 << 20) // max(1, data.inputs[0].numel() * data.inputs.element_size()))
        for start in range(0, len(data), step):
            chunk = data.inputs[start:start + step]
            chunk = chunk.reshape(len(chunk), -1)
            ok = torch.isfinite(chunk).all(1)
            if not bool(ok.all()):
                bad = (start + (~ok).nonzero()[:5, 0]).tolist()
                raise DataError(f"inputs of {data.source} contain NaN or Inf (rows {bad})",
                                "Clean the data")
            data.release()
    if data.labels is not None:
        if data.labels.shape != (len(data),):
            raise DataError(
                f"{data.source} has {len(data)} inputs but labels of shape "
                f"{tuple(data.labels.shape)}", "Give one integer label per input")
        if len(data.labels) and int(data.labels.min()) < 0:
            raise DataError(f"labels of {data.source} include {int(data.labels.min())}",
                            "Labels must be class indices 0..C-1")


def _split_slice(spec: str) -> tuple[str, slice | None]:
    m = _SLICE.match(spec)
    if not m:
        return spec, None
    start = int(m["start"]) if m["start"] else None
    stop = int(m["stop"]) if m["stop"] else None
    return m["base"], slice(start, stop)


def _load_arrays(base: str) -> tuple[Any, Any]:
    """Inputs (a numpy array, or ``(tensor, MappedFile)`` when memory-mapped) and labels."""
    name, _, split = base.partition(":")
    if name == "mnist":
        check_bundled_mnist()
        return _load_idx_split(MNIST_DIR, split or "train", "mnist")
    path = Path(name)
    if split and split not in MNIST_FILES:
        # A colon that is not a split (a Windows drive, say): treat the whole as a path.
        path, split = Path(base), ""
    if not path.exists():
        raise DataError(f"data source {base!r} does not exist",
                        "Use mnist, mnist:test, or a path to IDX/.npz/.npy/.safetensors data")
    if path.is_dir():
        return _load_idx_split(path, split or "train", str(path))
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty", "Check the file")
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix in (".npz", ".npy"):
        return _load_numpy(path)
    if suffix == ".safetensors":
        return _load_safetensors(path)
    if "idx" in path.name or _looks_like_idx(path):
        return _load_idx_pair(path)
    raise DataError(f"unknown data format for {path}",
                    "Use IDX (optionally .gz), .npz, .npy or .safetensors")


@functools.cache
def check_bundled_mnist() -> None:
    """Verify the bundled MNIST against its SHA256SUMS, once per process (DataError if not)."""
    sums = (MNIST_DIR / "SHA256SUMS").read_text().split("\n")
    for line in filter(None, sums):
        digest, fname = line.split()
        f = MNIST_DIR / fname
        if not f.exists() or hashlib.sha256(f.read_bytes()).hexdigest() != digest:
            raise DataError(f"bundled MNIST file {fname} is missing or damaged",
                            "Reinstall kdcli")


def _load_idx_split(folder: Path, split: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in MNIST_FILES:
        raise DataError(f"unknown split {split!r} of {label}", "Use :train or :test")
    images, labels = MNIST_FILES[split]
    img = _find(folder, images)
    lab = _find(folder, labels)
    if img is None or lab is None:
        raise DataError(f"{folder} lacks the MNIST {split} files ({images}[.gz])",
                        "Point --data at an IDX images file instead")
    return _pair(read_idx(img), read_idx(lab), img)


def _find(folder: Path, stem: str) -> Path | None:
    for cand in (folder / stem, folder / f"{stem}.gz"):
        if cand.exists():
            return cand
    return None


def _load_idx_pair(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    images = read_idx(path)
    if images.ndim == 1:
        raise DataError(f"{path} is a 1-D IDX file (labels?)", "Point --data at the images file")
    lab_name = path.name.replace("images-idx3", "labels-idx1").replace("images", "labels")
    lab_path = path.with_name(lab_name)
    labels = read_idx(lab_path) if lab_name != path.name and lab_path.exists() else None
    return _pair(images, labels, path)


def _pair(images: np.ndarray, labels: np.ndarray | None, path: Path):
    if labels is not None:
        if labels.ndim != 1:
            raise DataError(f"labels next to {path} are not 1-D", "Check the labels file")
        if len(labels) != len(images):
            raise DataError(f"{path} has {len(images)} images but {len(labels)} labels",
                            "Use matching images and labels files")
    return images, labels


def _looks_like_idx(path: Path) -> bool:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and head[:2] == b"\0\0" and head[2] in _IDX_DTYPES


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (raw or gzipped) into a numpy array.

    Raises:
        DataError: wrong magic number, truncated or corrupt file.
    """
    import numpy as np

    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}", "The file is corrupt; fetch it again") from e
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})",
                        "Give a standard IDX file such as train-images-idx3-ubyte.gz")
    ndim = raw[3]
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path} has a corrupt IDX header", "The file is corrupt")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(shape))
    body = raw[4 + 4 * ndim:]
    if len(body) != count * dtype.itemsize:
        raise DataError(
            f"{path} holds {len(body)} data bytes, but its header promises shape {shape}",
            "The file is truncated or corrupt")
    if count == 0:
        raise DataError(f"{path} holds no examples", "Check the file")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _load_numpy(path: Path):
    import numpy as np

    from kdcli.storage import map_npy

    if path.suffix == ".npy":
        try:
            mapped = map_npy(path)
        except OSError as e:
            raise DataError(f"cannot read {path}: {e}", "Check the file") from e
        if mapped is not None:
            tensor, mfile = mapped
            if tensor.dim() == 0:
                raise DataError(f"inputs in {path} are a scalar", "Store an [N, ...] array")
            return ((tensor[:, None] if tensor.dim() == 1 else tensor), mfile), None
    def refused(e: Exception) -> DataError:
        if "allow_pickle" in str(e):  # numpy refuses object arrays without unpickling
            return DataError(f"{path} holds a pickled object array, which kdcli never "
                             "loads (it could run code)", "Save numeric arrays only")
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return DataError(f"cannot read {path}: {first}", "The file is corrupt or truncated")

    try:
        obj = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises many kinds here
        raise refused(e) from e
    if isinstance(obj, np.ndarray):
        return _check_arrays(path, obj, None)
    with obj:
        if "inputs" not in obj.files:
            raise DataError(f"{path} has no 'inputs' array (has {obj.files[:10]})",
                            "Save it with np.savez(path, inputs=..., labels=...)")
        try:
            inputs = obj["inputs"]
            labels = obj["labels"] if "labels" in obj.files else None
        except Exception as e:  # noqa: BLE001
            raise refused(e) from e
        return _check_arrays(path, inputs, labels)


def _load_safetensors(path: Path):
    """Memory-map ``inputs`` (and read ``labels``) from a safetensors file."""
    import torch

    from kdcli.errors import FormatError
    from kdcli.storage import read_safetensors

    try:
        tensors, _, mapped = read_safetensors(path)
    except FormatError as e:
        raise DataError(f"{path} is not a valid safetensors file: {e.message}",
                        "The file is truncated or corrupt") from e
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
    return (inputs, mapped), labels


def _check_arrays(path, inputs, labels):
    import numpy as np

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
        if labels.ndim != 1 or len(labels) != len(inputs):
            raise DataError(f"{path} has {len(inputs)} inputs but labels of shape {labels.shape}",
                            "Give one integer label per input")
    return inputs, labels
