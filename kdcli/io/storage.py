"""Tensor files on disk: memory-mapped reading with bounded resident memory, and streaming
safetensors writing.

Reading maps a file and hands out zero-copy tensors over it. The pages a program touches
stay resident (and count towards its RSS) until they are dropped, and a read fault maps a
whole cached folio around the page (up to megabytes on recent kernels), so random rows of a
mapped file quickly make a process as large as the file. Files larger than a
:class:`PageBudget` are therefore read with ``pread`` (rows go straight into the batch; the
kernel's page cache keeps the data warm and does not count towards the process), and mapped
pages that are touched are dropped (``madvise(MADV_DONTNEED)``) once more than the budget has
been read. Memory stays flat however large the files are.
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import hashlib
import json
import math
import mmap
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from kdcli.errors import FormatError

# Bytes of mapped data read before the pages are dropped again.
PAGE_BUDGET_BYTES = 64 << 20

_DTYPES = {  # safetensors dtype name <-> torch dtype name
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32",
    "I64": "int64", "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
}
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "F16": 2, "BF16": 2,
             "F32": 4, "F64": 8}


def torch_dtype(name: str):
    """The torch dtype of a safetensors dtype name such as ``F32``."""
    return getattr(torch, _DTYPES[name])


def st_dtype(dtype) -> str:
    """The safetensors dtype name of a torch dtype."""
    tname = str(dtype).removeprefix("torch.")
    for k, v in _DTYPES.items():
        if v == tname:
            return k
    raise FormatError(f"dtype {dtype} cannot be stored", "Use a numeric dtype")


class MappedFile:
    """A read-only, copy-on-write memory map of a file, handing out tensors over it.

    ``offsets`` maps tensor names to their byte offsets (for safetensors files), so rows can
    also be read with ``pread`` (:meth:`read_into`), which leaves no pages resident.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.size = self.path.stat().st_size
        self.offsets: dict[str, int] = {}
        self.data_start = 0  # where a safetensors file's data section starts
        self.fd = os.open(self.path, os.O_RDONLY)
        self.mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY) if self.size else None

    def __del__(self) -> None:
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` with the file's bytes from ``offset`` on (FormatError if short)."""
        got = os.preadv(self.fd, [buf], offset)
        if got != len(buf):
            raise FormatError(f"{self.path} ended early (read {got} of {len(buf)} bytes at "
                              f"{offset})", "The file was truncated while in use")

    def check_intact(self) -> None:
        """Refuse to read the map of a file that shrank since it was mapped: touching a page
        past its new end would kill the process with SIGBUS.

        Raises:
            FormatError: the file is shorter than when it was opened.
        """
        if self.mm is None:
            return
        now = os.fstat(self.fd).st_size
        if now < self.size:
            raise FormatError(f"{self.path} shrank from {self.size:,} to {now:,} bytes while in "
                              "use", "Another process truncated or replaced it; copy or "
                              "regenerate it, and rerun")

    def tensor(self, offset: int, dtype, shape: list[int]) -> torch.Tensor:
        """A zero-copy tensor of ``dtype`` and ``shape`` starting at byte ``offset``."""
        count = math.prod(shape)
        if count == 0 or self.mm is None:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self.mm, dtype=dtype, count=count, offset=offset).reshape(shape)

    def release(self) -> None:
        """Drop this file's resident pages (they are read back from the page cache on use)."""
        if self.mm is not None and hasattr(self.mm, "madvise"):
            self.mm.madvise(mmap.MADV_DONTNEED)


class PageBudget:
    """Counts bytes read from a group of mapped files and drops their pages past a budget."""

    def __init__(self, files: list[MappedFile] | None = None,
                 budget: int = PAGE_BUDGET_BYTES) -> None:
        self.files = list(files or [])
        self.budget = budget
        self.read = 0

    @property
    def paged(self) -> bool:
        """True when the files are larger than the budget (then rows are read with pread)."""
        return sum(f.size for f in self.files) > self.budget

    def add(self, nbytes: int) -> None:
        """Record ``nbytes`` read; drop all pages once the budget is exceeded."""
        if not self.paged:
            return  # everything fits: keep it resident
        self.read += nbytes
        if self.read > self.budget:
            self.release()

    def release(self) -> None:
        for f in self.files:
            f.release()
        self.read = 0


# The header reader's bounds: the header's size, and the tensors it may declare.
MAX_HEADER_BYTES = 100_000_000
MAX_TENSORS = 100_000
MAX_DIMS = 16
DATA_SHA256 = "data_sha256"  # metadata key: SHA-256 of the data section (after the header)
_PLACEHOLDER = "0" * 64


class Header(NamedTuple):
    """A checked safetensors header.

    Attributes:
        entries: ``name -> (dtype name, shape, start, end)``, offsets relative to
            ``data_start``, in file order.
        metadata: The ``__metadata__`` (string to string; empty if absent).
        data_start: Byte offset of the data section (8 + header length).
    """

    entries: dict[str, tuple[str, list[int], int, int]]
    metadata: dict[str, str]
    data_start: int


def _bad(p: Path, what: str, hint: str = "The file is damaged; regenerate it") -> FormatError:
    return FormatError(f"{p} is not a valid safetensors file: {what}", hint)


def looks_like_safetensors(path: str | Path) -> bool:
    """True if the file starts like a safetensors file (a sane length, then ``{``)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= MAX_HEADER_BYTES and 8 + n <= size and head[8:9] == b"{"


def read_header(path: str | Path) -> Header:
    """Read and check a safetensors header: the one header parser of kdcli.

    Checks what the safetensors library checks, with bounds: the header length (at most
    :data:`MAX_HEADER_BYTES`), valid UTF-8 JSON (deep nesting is refused, not a crash), an
    object whose ``__metadata__`` is an object of strings, and tensor entries with a known
    dtype, a shape of non-negative integers and ``data_offsets`` that match it, lie inside
    the file, do not overlap and cover the data section exactly.

    Raises:
        FormatError: anything about the header is wrong (the message says what).
    """
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise _bad(p, f"bad header length {n} for a file of {size} bytes",
                       "The file is truncated or not safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise _bad(p, "its header nests JSON too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(p, f"corrupt JSON header ({str(e)[:80]})") from None
    if not isinstance(header, dict):
        raise _bad(p, f"the header is a JSON {type(header).__name__}, not an object")
    meta = _header_metadata(p, header.pop("__metadata__", None))
    if len(header) > MAX_TENSORS:
        raise _bad(p, f"it declares {len(header):,} tensors (at most {MAX_TENSORS:,})")
    entries = {name: _entry(p, name, info) for name, info in header.items()}
    _check_layout(p, entries, 8 + n, size)
    return Header(entries, meta, 8 + n)


def _header_metadata(p: Path, meta: Any) -> dict[str, str]:
    """A header's ``__metadata__``: an object of strings (absent: empty)."""
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in meta.items()):
        raise _bad(p, "__metadata__ must be an object of strings, got "
                   f"{type(meta).__name__ if not isinstance(meta, dict) else 'other values'}")
    return meta


def _check_layout(p: Path, entries: dict[str, tuple[str, list[int], int, int]], start: int,
                  size: int) -> None:
    """The tensors' byte ranges do not overlap and cover the data section (from ``start``
    to the file's ``size``) exactly."""
    end = 0
    for name, (_, _, lo, hi) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if lo < end:
            raise _bad(p, f"tensor {name!r} (bytes {lo}-{hi}) overlaps another tensor")
        if lo > end:
            raise _bad(p, f"a gap of {lo - end} bytes lies before tensor {name!r}")
        end = hi
    if start + end > size:
        raise FormatError(f"{p} is truncated or corrupt (its tensors need {start + end:,} bytes, "
                          f"the file has {size:,})", "Regenerate the file")
    if start + end < size:
        raise _bad(p, f"{size - start - end:,} bytes follow its last tensor")


def _entry(p: Path, name: str, info: Any) -> tuple[str, list[int], int, int]:
    if not isinstance(info, dict):
        raise _bad(p, f"tensor {name!r} has a {type(info).__name__} entry, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _DTYPES:
        raise _bad(p, f"tensor {name!r} has unknown dtype {str(dtype)[:20]!r}")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(
            type(s) is int and s >= 0 for s in shape)):
        raise _bad(p, f"tensor {name!r} has a bad shape {str(shape)[:60]}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            type(o) is int and o >= 0 for o in offsets) and offsets[0] <= offsets[1]):
        raise _bad(p, f"tensor {name!r} has bad data_offsets {str(offsets)[:60]}")
    itemsize = _ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
        raise _bad(p, f"tensor {name!r} of shape {shape} and dtype {dtype} needs "
                   f"{math.prod(shape) * itemsize:,} bytes, its offsets span "
                   f"{offsets[1] - offsets[0]:,}")
    return dtype, shape, offsets[0], offsets[1]


def read_safetensors_metadata(path: str | Path) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file; None if the file is not safetensors.

    Raises:
        FormatError: the file starts like safetensors but its header is malformed.
    """
    if not looks_like_safetensors(path):
        return None
    return read_header(path).metadata


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str],
                                                 MappedFile]:
    """Memory-map a safetensors file: its tensors (zero-copy), metadata and the mapping.

    Raises:
        FormatError: the header is malformed (see :func:`read_header`) or the file truncated.
    """
    header = read_header(path)
    mapped = MappedFile(path)
    mapped.data_start = header.data_start
    tensors: dict[str, torch.Tensor] = {}
    for name, (dtype, shape, lo, _) in header.entries.items():
        tensors[name] = mapped.tensor(header.data_start + lo, torch_dtype(dtype), shape)
        mapped.offsets[name] = header.data_start + lo
    return tensors, header.metadata, mapped


def data_sha256(mapped: MappedFile, also: tuple[int, int] | None = None,
                also_hash: Any = None, chunk: int = 8 << 20) -> str:
    """SHA-256 of a mapped file's data section, read sequentially with ``pread``.

    Args:
        mapped: The file (from :func:`read_safetensors`).
        also: An absolute byte range ``(start, end)`` whose bytes are also fed to
            ``also_hash`` in the same pass (the ``inputs`` tensor, for ``inputs_sha256``).
        also_hash: A ``hashlib`` object for ``also``.
        chunk: Bytes per read.

    Returns:
        The hex digest of the data section.
    """
    h = hashlib.sha256()
    pos = mapped.data_start
    while pos < mapped.size:
        block = os.pread(mapped.fd, min(chunk, mapped.size - pos), pos)
        if not block:
            raise FormatError(f"{mapped.path} ended early while being read",
                              "The file was truncated while in use")
        h.update(block)
        if also is not None and also_hash is not None:
            lo, hi = max(also[0], pos), min(also[1], pos + len(block))
            if lo < hi:
                also_hash.update(block[lo - pos:hi - pos])
        pos += len(block)
    return h.hexdigest()


def map_npy(path: str | Path) -> tuple[torch.Tensor, MappedFile] | None:
    """Memory-map a C-ordered ``.npy`` array; None if it needs a plain ``np.load``."""
    p = Path(path)
    with open(p, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = reader(f)
        except ValueError:
            return None
        offset = f.tell()
    if fortran or dtype.hasobject or not dtype.isnative:
        return None
    try:
        tdtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    except TypeError:
        return None
    if offset + math.prod(shape) * dtype.itemsize > p.stat().st_size:
        return None  # truncated: let np.load report it
    mapped = MappedFile(p)
    return mapped.tensor(offset, tdtype, list(shape)), mapped


class SafetensorsWriter:
    """Write a safetensors file whose tensors arrive in chunks, in any order.

    The header is laid out up front from the declared shapes; each chunk is written at its
    place, so memory does not grow with the file. Closing checks that every byte was written.

    The data section's SHA-256 is computed in file order. A chunk that continues the bytes
    hashed so far (the first tensor's rows, written in order) is hashed at once: a large one
    on a worker thread, which hashlib runs outside the GIL, so it overlaps the work that
    makes the next chunk; a small one (under :data:`_HASH_INLINE` bytes) in the calling
    thread, where handing it over would cost more than hashing it. Closing reads back and
    hashes only the rest.

    Args:
        path: The file to write (normally a temporary path).
        specs: ``name -> (torch dtype, shape)``, in file order.
        metadata: String-to-string ``__metadata__``. The writer adds ``data_sha256``, the
            SHA-256 of the data section, filled in when the file is closed.
    """

    def __init__(self, path: str | Path, specs: dict[str, tuple[Any, tuple[int, ...]]],
                 metadata: dict[str, str]) -> None:
        metadata = {k: v for k, v in metadata.items() if k != DATA_SHA256}
        header: dict[str, Any] = {"__metadata__": {**metadata, DATA_SHA256: _PLACEHOLDER}}
        self.layout: dict[str, tuple[int, int, int]] = {}  # name -> (start, itemsize, size)
        offset = 0
        for name, (dtype, shape) in specs.items():
            itemsize = torch_dtype(st_dtype(dtype)).itemsize
            size = math.prod(shape) * itemsize
            header[name] = {"dtype": st_dtype(dtype), "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            self.layout[name] = (offset, itemsize, size)
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.base = 8 + len(raw)
        self.hash_at = 8 + raw.index(f'"{DATA_SHA256}":"{_PLACEHOLDER}"'.encode()) + \
            len(DATA_SHA256) + 4
        self.written = dict.fromkeys(specs, 0)
        self.hash = hashlib.sha256()
        self.hashed = 0  # bytes of the data section handed to the hash, in order
        self.pending: collections.deque[concurrent.futures.Future] = collections.deque()
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        # Opened without truncating: ext4 starts writing back, when it is closed, a file that
        # was truncated to zero (its auto_da_alloc rule), which cost 16 ms a 50 MB set here.
        # The size is set exactly below, and every byte is then written.
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            _pwrite_all(self.fd, len(raw).to_bytes(8, "little") + raw, 0)
            os.ftruncate(self.fd, self.base + offset)
        except BaseException:
            os.close(self.fd)
            raise

    def write(self, name: str, first: int, chunk: torch.Tensor) -> None:
        """Write ``chunk`` into tensor ``name`` from flat (row-major) element ``first`` on."""
        start, itemsize, _ = self.layout[name]
        buf = to_bytes(chunk)
        at = start + first * itemsize
        _pwrite_all(self.fd, buf, self.base + at)
        self.written[name] += len(buf)
        if at == self.hashed and len(buf):
            self._hash(buf)

    def already_hashed(self, name: str, state: Any) -> None:
        """Take ``state``, a hashlib SHA-256 object that has hashed exactly the bytes tensor
        ``name`` will be written with, as the hash of the data section so far; its chunks
        are then written without being hashed again. Call before any write; ``name`` must
        be the first tensor of the file.

        Raises:
            ValueError: ``name`` is not first, or something was already hashed.
        """
        start, _, size = self.layout[name]
        if start != 0 or self.hashed != 0:
            raise ValueError(f"{name} is not the first tensor, or bytes were already hashed")
        self.hash, self.hashed = state.copy(), size

    def _hash(self, buf: memoryview) -> None:
        """Hash ``buf``, the next bytes of the data section: on the worker thread (which
        keeps ``buf``, and so its tensor, alive until then) unless it is small and nothing
        is waiting there."""
        while self.pending and (len(self.pending) >= _MAX_PENDING_HASHES
                                or self.pending[0].done()):
            self.pending.popleft().result()  # bounded memory
        self.hashed += len(buf)
        if len(buf) < _HASH_INLINE and not self.pending:
            self.hash.update(buf)
            return
        if self.pool is None:
            self.pool = concurrent.futures.ThreadPoolExecutor(1, "kdcli-sha256")
        self.pending.append(self.pool.submit(self.hash.update, buf))

    def _finish_hashing(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        self.pending.clear()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        try:
            self._finish_hashing()
            if exc_type is None:
                for name, (_, _, size) in self.layout.items():
                    if self.written[name] != size:
                        raise FormatError(f"internal: tensor {name} got {self.written[name]} "
                                          f"of {size} bytes", "Report this bug")
                _pwrite_all(self.fd, self._digest().encode(), self.hash_at)
        finally:
            os.close(self.fd)

    def _digest(self, chunk: int = 8 << 20) -> str:
        """The data section's SHA-256: the bytes hashed while writing, then the rest read
        back from the file."""
        h = self.hash
        pos = self.base + self.hashed
        end = self.base + sum(size for _, _, size in self.layout.values())
        while pos < end:
            block = os.pread(self.fd, min(chunk, end - pos), pos)
            if not block:
                break
            h.update(block)
            pos += len(block)
        return h.hexdigest()


# Chunks handed to the hashing thread and not yet hashed, at most (each holds its tensor).
_MAX_PENDING_HASHES = 8
_HASH_INLINE = 256 << 10  # hashed in the caller: a hand-over took ~150 us, 8 KB ~5 us


def _pwrite_all(fd: int, buf: bytes | memoryview, pos: int) -> None:
    """Write all of ``buf`` at ``pos`` (a write may take only part of it)."""
    view = memoryview(buf).cast("B")
    while view:
        n = os.pwrite(fd, view, pos)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, pos = view[n:], pos + n


def to_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (bf16 is viewed as int16, same bytes)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")
