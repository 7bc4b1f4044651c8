"""Data sources: the one place that turns a ``--data`` string into tensors.

Sources are a table (:data:`SOURCES`): each entry names one spec pattern or file kind and
returns the same :class:`Data`. Accepted specs (any may end in a slice such as ``[:1000]``,
or in ``[balanced=N]`` / ``[balanced=N,seed=S]``: N examples, as many of each class, drawn
with seed S, default 0; see :func:`balanced_index`):

* ``mnist`` / ``mnist:train`` / ``mnist:test``: the MNIST copy bundled with kdcli.
* a folder holding the four standard MNIST IDX files, optionally with ``:train``/``:test``.
* an image folder: ``DIR/CLASS/*.png`` (labelled, classes in sorted order like torchvision's
  ``ImageFolder``) or a flat folder of images (unlabelled); see :mod:`kdcli.data.images`.
* a table: ``.csv``, ``.tsv`` (optionally ``.gz``) or ``.parquet``; see :mod:`kdcli.data.tables`.
* an IDX images file (``*-images-idx3-ubyte`` or ``.gz``); its labels file is found by
  the standard name (``images-idx3`` -> ``labels-idx1``) when present.
* ``.npz`` / ``.safetensors`` holding ``inputs`` (any shape) and optional integer ``labels``,
  or ``.npy`` holding inputs only. A kdcli transfer set works as a data source too.

How tables and image folders are read (label and feature columns, channels, image size) is
one :class:`DataOptions`, taken by every command that reads data.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.errors import DataError, UsageError, quote_name

if TYPE_CHECKING:
    import numpy as np
    import torch

MNIST_DIR = Path(__file__).parent.parent / "datasets" / "mnist"
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_SLICE = re.compile(r"^(?P<base>.*)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")
_BALANCED = re.compile(r"^(?P<base>.*)\[\s*balanced\s*=\s*(?P<n>\d+)\s*"
                       r"(?:,\s*seed\s*=\s*(?P<seed>\d+)\s*)?\]$")


@dataclass(frozen=True)
class DataOptions:
    """How a table or an image folder becomes examples (other sources ignore these).

    Attributes:
        label_column: A table's label column. None: ``label`` when the table has one, else
            unlabelled; ``"none"``: unlabelled even if there is one.
        feature_columns: A table's feature columns, in order (None: every other numeric
            column).
        channels: Images as 1 (grayscale) or 3 (RGB) channels (None: RGB if any image is in
            colour, else grayscale).
        image_size: ``(H, W)`` to resize every image to (None: the images must share a size).
    """

    label_column: str | None = None
    feature_columns: tuple[str, ...] | None = None
    channels: int | None = None
    image_size: tuple[int, int] | None = None

    def check(self) -> None:
        """Raise UsageError for values no source can take."""
        from kdcli.errors import UsageError

        if self.channels not in (None, 1, 3):
            raise UsageError(f"--channels must be 1 or 3, got {self.channels}",
                             "Use --channels 1 (grayscale) or 3 (RGB)")
        if self.image_size is not None and (len(self.image_size) != 2
                                            or min(self.image_size) <= 0):
            raise UsageError(f"--image-size must be two positive numbers H,W, got "
                             f"{self.image_size}", "Try --image-size 32,32")
        if self.feature_columns is not None and not self.feature_columns:
            raise UsageError("--feature-columns is empty", "Name at least one column")

    def recorded(self) -> dict[str, Any]:
        """The non-default options, as JSON-ready values (kept in output metadata)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in self.__dict__.items() if v is not None}


def recorded_options(explicit: DataOptions | None, training: dict[str, Any]) -> DataOptions:
    """``explicit`` if given, else the data options a model file's training record keeps."""
    if explicit is not None:
        return explicit
    rec = training.get("data_options") or {}
    try:
        return DataOptions(
            label_column=rec.get("label_column"),
            feature_columns=tuple(rec["feature_columns"]) if rec.get("feature_columns") else None,
            channels=rec.get("channels"),
            image_size=tuple(rec["image_size"]) if rec.get("image_size") else None)
    except (AttributeError, TypeError) as e:
        raise DataError(f"bad data_options {rec!r} in the model file",
                        "Pass the data options (--label-column, ...) explicitly") from e


def recorded_data(training: dict[str, Any], *keys: str) -> str | None:
    """The data source a model file's training record names under the first of ``keys``
    it has, if it is one bundled with kdcli (``mnist``, ``mnist:test[:1000]``); None if it
    names none.

    A file must never choose what else kdcli reads: a recorded path (``/etc/shadow``,
    ``../x.npz``, a folder) is used only when the user names it again with ``--data``.

    Raises:
        UsageError: the record names a path, which is not opened.
    """
    spec = next((training.get(k) for k in keys if training.get(k)), None)
    if spec is None:
        return None
    base = _split_slice(str(spec).strip())[0]
    name, _, split = base.partition(":")
    if isinstance(spec, str) and name == "mnist" and split in ("", *MNIST_FILES):
        return spec
    shown = quote_name(str(spec)[:200])
    raise UsageError(f"the model file records its data as {shown}, a path kdcli does not "
                     "open unless you name it", f"Pass --data {shown} if you trust it, or "
                     "other data the model takes")


@dataclass
class Data:
    """A labelled or unlabelled set of examples held in memory as tensors.

    Attributes:
        inputs: ``[N, *sample_shape]`` in the dtype the source stores (uint8 for MNIST and
            images: ``[N, H, W]`` grayscale, ``[N, C, H, W]`` colour; float32 for tables).
        labels: ``[N]`` int64 class indices, or None.
        source: The spec this was loaded from, recorded in output metadata.
        files: Memory-mapped files the inputs live in.
        class_names: Names of classes 0..C-1 (folder names or a label column's strings),
            or None for numeric labels.
        feature_names: A table's feature column names, or None.
    """

    inputs: torch.Tensor
    labels: torch.Tensor | None
    source: str
    files: list = field(default_factory=list)
    class_names: list[str] | None = None
    feature_names: list[str] | None = None

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


@dataclass
class Loaded:
    """What a source entry returns: inputs (a numpy array, or ``(tensor, MappedFile)`` when
    memory-mapped), labels (numpy, tensor or None) and optional names."""

    inputs: Any
    labels: Any = None
    class_names: list[str] | None = None
    feature_names: list[str] | None = None


@dataclass(frozen=True)
class Source:
    """One entry of the data-source table.

    Attributes:
        name: What the entry reads (shown in errors and docs).
        matches: ``(name, path, split)`` -> whether this entry reads the spec; ``path`` is
            None for a name that is not a path (``mnist``).
        load: ``(path_or_name, split, options)`` -> :class:`Loaded`.
    """

    name: str
    matches: Callable[[str, Path | None, str], bool]
    load: Callable[[Any, str, DataOptions], Loaded]


def load_data(spec: str, limit: int | None = None,
              options: DataOptions | None = None) -> Data:
    """Load a data source.

    Args:
        spec: A data spec (see the module docstring).
        limit: Keep only the first ``limit`` examples (after any slice).
        options: How tables and image folders are read (default: :class:`DataOptions`).

    Returns:
        The validated data.

    Raises:
        DataError: The source is missing, malformed or empty.
    """
    import torch

    opts = options or DataOptions()
    opts.check()
    spec = spec.strip()
    base, sl = _split_slice(spec)
    got = _load_arrays(base, opts)
    inputs, labels = got.inputs, got.labels
    files = []
    if isinstance(inputs, tuple):  # memory-mapped: (tensor, MappedFile)
        inputs_t, mapped = inputs
        files.append(mapped)
    else:
        inputs_t = torch.from_numpy(inputs.copy() if not inputs.flags.writeable else inputs)
    inputs_t = _widen_unsigned(inputs_t, base)
    if labels is None:
        labels_t = None
    elif isinstance(labels, torch.Tensor):
        labels_t = labels.long()
    else:
        labels_t = torch.from_numpy(labels.astype("int64"))
    if isinstance(sl, tuple):  # [balanced=N,seed=S]
        index = balanced_index(labels_t, *sl, source=base)
        inputs_t, labels_t = inputs_t[index], labels_t[index]
    elif sl is not None:
        inputs_t = inputs_t[sl]
        labels_t = None if labels_t is None else labels_t[sl]
    if limit is not None:
        if limit <= 0:
            raise DataError(f"--limit must be positive, got {limit}", "Pass a count above 0")
        inputs_t = inputs_t[:limit]
        labels_t = None if labels_t is None else labels_t[:limit]
    data = Data(inputs_t if inputs_t.is_contiguous() else inputs_t.contiguous(), labels_t,
                spec if limit is None else f"{spec}[:{limit}]", files,
                got.class_names, got.feature_names)
    validate(data)
    return data


def check_same_classes(a: list[str] | None, a_source: str, b: list[str] | None,
                       b_source: str) -> None:
    """Refuse two sets of class names that differ (say, train and test folders).

    Numeric labels (None on either side) are not compared.

    Raises:
        DataError: naming both sources and the classes only one of them has.
    """
    if a is None or b is None or list(a) == list(b):
        return
    only_a = [c for c in a if c not in b][:3]
    only_b = [c for c in b if c not in a][:3]
    what = (f"{a_source} has {only_a} that {b_source} lacks" if only_a else
            f"{b_source} has {only_b} that {a_source} lacks" if only_b else
            f"the same classes in another order ({a[:3]}... vs {b[:3]}...)")
    raise DataError(f"classes differ between {a_source} and {b_source}: {what}",
                    "Give both the same class folders (or label values)")


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


def balanced_index(labels: torch.Tensor | None, n: int, seed: int,
                   source: str = "the data") -> torch.Tensor:
    """The rows of a class-balanced sample of ``n`` examples: ``n / C`` of each of the C
    classes present, the first of a permutation of that class's rows drawn with ``seed``
    (``torch.Generator``), returned in their original order. The same data, ``n`` and seed
    always give the same rows.

    Raises:
        DataError: unlabelled data, ``n`` not a positive multiple of C, or a class with too
            few examples.
    """
    import torch

    if labels is None:
        raise DataError(f"{source}[balanced={n}] needs labels, but {source} has none",
                        "Use a slice such as [:N] for unlabelled data")
    classes = torch.unique(labels)
    c = len(classes)
    if n <= 0 or n % c:
        lo = max(c, n // c * c)
        raise DataError(f"[balanced={n}] must be a positive multiple of the {c} classes of "
                        f"{source}", f"Use e.g. [balanced={lo}] or [balanced={lo + c}]")
    per = n // c
    members = [(labels == k).nonzero().flatten() for k in classes.tolist()]
    fewest = min(range(c), key=lambda i: len(members[i]))
    if len(members[fewest]) < per:
        raise DataError(f"{source} has only {len(members[fewest])} examples of class "
                        f"{int(classes[fewest])}, fewer than the {per} that [balanced={n}] "
                        "takes from each class",
                        f"Use at most [balanced={c * len(members[fewest])}]")
    gen = torch.Generator().manual_seed(seed)
    picked = [rows[torch.randperm(len(rows), generator=gen)[:per]] for rows in members]
    return torch.cat(picked).sort().values


def _split_slice(spec: str) -> tuple[str, slice | tuple[int, int] | None]:
    b = _BALANCED.match(spec)
    if b:
        return b["base"], (int(b["n"]), int(b["seed"] or 0))
    m = _SLICE.match(spec)
    if not m:
        return spec, None
    start = int(m["start"]) if m["start"] else None
    stop = int(m["stop"]) if m["stop"] else None
    return m["base"], slice(start, stop)


def _is_mnist(name: str, path: Path | None, split: str) -> bool:
    return path is None and name == "mnist"


def _is_idx_folder(name: str, path: Path | None, split: str) -> bool:
    return path is not None and path.is_dir() and any(
        _find(path, f) is not None for pair in MNIST_FILES.values() for f in pair)


def _is_dir(name: str, path: Path | None, split: str) -> bool:
    return path is not None and path.is_dir()


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()


def _has_suffix(*suffixes: str) -> Callable[[str, Path | None, str], bool]:
    return lambda name, path, split: path is not None and _suffix(path) in suffixes


def _is_idx_file(name: str, path: Path | None, split: str) -> bool:
    return path is not None and ("idx" in path.name or _looks_like_idx(path))


def _read_mnist(name: str, split: str, opts: DataOptions) -> Loaded:
    check_bundled_mnist()
    return Loaded(*_load_idx_split(MNIST_DIR, split or "train", "mnist"))


def _read_table(path: Path, split: str, opts: DataOptions) -> Loaded:
    from kdcli.data.tables import load_table

    t = load_table(path, opts)
    return Loaded(t.inputs, t.labels, t.class_names, t.feature_names)


def _read_images(path: Path, split: str, opts: DataOptions) -> Loaded:
    from kdcli.data.images import load_image_folder

    f = load_image_folder(path, opts)
    return Loaded(f.inputs, f.labels, f.class_names)


# The data-source table: the first entry whose ``matches`` accepts a spec reads it. A new
# source is one entry here (and its tests).
SOURCES: list[Source] = [
    Source("bundled MNIST", _is_mnist, _read_mnist),
    Source("MNIST IDX folder",
           _is_idx_folder, lambda p, split, o: Loaded(*_load_idx_split(p, split or "train",
                                                                       str(p)))),
    Source("image folder", _is_dir, _read_images),
    Source("numpy .npz/.npy", _has_suffix(".npz", ".npy"),
           lambda p, split, o: Loaded(*_load_numpy(p))),
    Source("safetensors", _has_suffix(".safetensors"),
           lambda p, split, o: Loaded(*_load_safetensors(p))),
    Source("CSV/TSV table", _has_suffix(".csv", ".tsv", ".csv.gz", ".tsv.gz"), _read_table),
    Source("Parquet table", _has_suffix(".parquet", ".pq"), _read_table),
    Source("IDX file", _is_idx_file, lambda p, split, o: Loaded(*_load_idx_pair(p))),
]


def _load_arrays(base: str, opts: DataOptions) -> Loaded:
    """Find the table entry that reads ``base`` and run it."""
    name, _, split = base.partition(":")
    path: Path | None = None
    if name != "mnist":
        path = Path(name)
        if split and split not in MNIST_FILES:
            # A colon that is not a split (a Windows drive, say): treat the whole as a path.
            path, split = Path(base), ""
        if not path.exists():
            raise DataError(f"data source {base!r} does not exist",
                            "Use mnist, mnist:test, or a path to an image folder, a table "
                            "(.csv/.tsv/.parquet) or IDX/.npz/.npy/.safetensors data")
        _check_kind(path)
    for source in SOURCES:
        if source.matches(name, path, split):
            return source.load(path if path is not None else name, split, opts)
    raise DataError(f"unknown data format for {path}",
                    "Use an image folder, .csv/.tsv/.parquet, IDX (optionally .gz), .npz, "
                    ".npy or .safetensors")


def _check_kind(path: Path) -> None:
    """Only regular files and folders are data: a FIFO would block, a device never end."""
    import stat

    st = path.stat()
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise DataError(f"data source {quote_name(path)} is not a regular file or folder "
                        "(a FIFO, device or socket)", "Give a data file or folder")
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise DataError(f"data file {quote_name(path)} is empty", "Check the file")


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
        if cand.is_file():  # a regular file: a FIFO would block
            return cand
    return None


def _load_idx_pair(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    images = read_idx(path)
    if images.ndim == 1:
        raise DataError(f"{path} is a 1-D IDX file (labels?)", "Point --data at the images file")
    lab_name = path.name.replace("images-idx3", "labels-idx1").replace("images", "labels")
    lab_path = path.with_name(lab_name)
    labels = read_idx(lab_path) if lab_name != path.name and lab_path.is_file() else None
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


def _widen_unsigned(inputs: torch.Tensor, source: str) -> torch.Tensor:
    """uint16, uint32 and uint64 inputs as the signed type that holds their values exactly
    (int32, int64, int64), the one rule of every command (kdcli stores no unsigned type
    wider than 8 bits)."""
    import torch

    wider = {torch.uint16: torch.int32, torch.uint32: torch.int64, torch.uint64: torch.int64}
    if inputs.dtype not in wider:
        return inputs
    out = inputs.to(wider[inputs.dtype])
    if inputs.dtype == torch.uint64 and out.numel() and int(out.min()) < 0:
        raise DataError(f"inputs of {source} are uint64 values of 2^63 or more",
                        "Scale the inputs to a smaller range, or store them as floats")
    return out


def _check_magic(path: Path) -> None:
    """Refuse a .npy/.npz that does not start as one, before numpy calls it a pickle."""
    with open(path, "rb") as f:
        head = f.read(6)
    if not (head == b"\x93NUMPY" or head.startswith((b"PK\x03\x04", b"PK\x05\x06"))):
        raise DataError(f"{path} is not a NumPy file: it starts with neither the .npy "
                        f"header nor a zip (.npz) header ({len(head)} bytes read: {head!r})",
                        "The file is truncated, corrupt or of another format")


def _load_numpy(path: Path):
    import numpy as np

    from kdcli.io.storage import map_npy

    _check_magic(path)
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
    from kdcli.io.storage import read_safetensors

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
        if labels.dtype.kind == "u" and labels.size and \
                int(labels.max()) > np.iinfo(np.int64).max:
            raise DataError(f"labels in {path} include {int(labels.max())}, not a class index",
                            "Labels must be class indices 0..C-1")
        if labels.ndim != 1 or len(labels) != len(inputs):
            raise DataError(f"{path} has {len(inputs)} inputs but labels of shape {labels.shape}",
                            "Give one integer label per input")
    return inputs, labels
