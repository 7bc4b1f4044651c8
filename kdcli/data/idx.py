"""IDX files as a data source: a folder holding the four standard MNIST files, or one IDX
images file (raw or ``.gz``) with its labels file found by the standard name
(``images-idx3`` -> ``labels-idx1``) when present."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from kdcli.data.base import DataOptions, Loaded
from kdcli.errors import DataError

# The files of each split in a folder of the standard MNIST layout (each may end in .gz).
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def is_idx_folder(path: Path) -> bool:
    """Whether a folder holds any of the standard MNIST IDX files."""
    return any(_find(path, f) is not None for pair in MNIST_FILES.values() for f in pair)


def is_idx_file(path: Path) -> bool:
    """Whether a file is IDX: by its name, else by its magic number."""
    return "idx" in path.name or _looks_like_idx(path)


def read_folder(path: Path, split: str, options: DataOptions) -> Loaded:
    """The ``split`` (default ``train``) of a folder of MNIST IDX files."""
    return Loaded(*load_split(path, split or "train", str(path)))


def read_file(path: Path, split: str, options: DataOptions) -> Loaded:
    """One IDX images file, with its labels file when there is one."""
    images = read_idx(path)
    if images.ndim == 1:
        raise DataError(f"{path} is a 1-D IDX file (labels?)", "Point --data at the images file")
    lab_name = path.name.replace("images-idx3", "labels-idx1").replace("images", "labels")
    lab_path = path.with_name(lab_name)
    labels = read_idx(lab_path) if lab_name != path.name and lab_path.is_file() else None
    return Loaded(*_pair(images, labels, path))


def load_split(folder: Path, split: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of one split of a folder in the MNIST layout.

    Args:
        folder: The folder holding the IDX files.
        split: ``train`` or ``test``.
        label: How errors name the folder.

    Raises:
        DataError: an unknown split, or the folder lacks its files.
    """
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


def _pair(images: np.ndarray, labels: np.ndarray | None,
          path: Path) -> tuple[np.ndarray, np.ndarray | None]:
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

    The header is read first: an array too large for the available memory is refused
    before it is decompressed, and a gzipped file is decompressed no further than its
    header's promise (a small file that inflates to gigabytes is stopped there).

    Raises:
        DataError: wrong magic number, truncated, corrupt, or more data than the header
            promises.
        ResourceError: the header's array does not fit in memory.
    """
    from kdcli.resources import check_memory

    gz = path.suffix == ".gz"
    try:
        raw = path.read_bytes()
        prefix = _gunzip(raw, _MAX_HEADER) if gz else raw[:_MAX_HEADER]
        dtype, shape, start = _header(prefix, path)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if nbytes == 0:
            raise DataError(f"{path} holds no examples", "Check the file")
        check_memory(nbytes, f"{path} (an array of shape {shape})",
                     "Check the file: its header may be damaged")
        if gz:  # one byte past the promise shows there is more
            raw = _gunzip(raw, start + nbytes + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {e}", "The file is corrupt; fetch it again") from e
    body = memoryview(raw)[start:]  # not a copy of the data
    if len(body) != nbytes:
        got = "more" if len(body) > nbytes else f"{len(body)}"
        raise DataError(f"{path} holds {got} data bytes, but its header promises shape {shape} "
                        f"({nbytes} bytes)", "The file is truncated or corrupt")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


# zlib's window bits for the gzip wrapper, and the longest IDX header (255 dimensions).
_GZIP, _MAX_HEADER = 31, 4 + 4 * 255


def _header(prefix: bytes, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """The dtype, shape and data offset an IDX file's first bytes declare.

    Raises:
        DataError: wrong magic number, or a header cut short.
    """
    if len(prefix) < 4 or prefix[:2] != b"\0\0" or prefix[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {prefix[:4].hex()})",
                        "Give a standard IDX file such as train-images-idx3-ubyte.gz")
    ndim = prefix[3]
    if ndim == 0 or len(prefix) < 4 + 4 * ndim:
        raise DataError(f"{path} has a corrupt IDX header", "The file is corrupt")
    shape = tuple(int.from_bytes(prefix[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.dtype(_IDX_DTYPES[prefix[2]]), shape, 4 + 4 * ndim


def _gunzip(raw: bytes, limit: int) -> bytes:
    """The gzip members of ``raw`` decompressed, but no more than ``limit`` bytes; each
    member read to its end has had its checksum checked.

    Raises:
        EOFError: a member ends before its end-of-stream marker.
        zlib.error: a damaged stream or checksum.
    """
    parts, n, data = [], 0, raw
    while data and n < limit:
        d = zlib.decompressobj(_GZIP)
        parts.append(d.decompress(data, limit - n))
        n += len(parts[-1])
        if n < limit and not d.eof:
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")
        data = d.unused_data.lstrip(b"\0")  # members may be padded with zeros, as gzip allows
    return b"".join(parts)
