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

import json
import math
import mmap
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.errors import FormatError

if TYPE_CHECKING:
    import torch

# Bytes of mapped data read before the pages are dropped again.
PAGE_BUDGET_BYTES = 64 << 20

_DTYPES = {  # safetensors dtype name <-> torch dtype name
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32",
    "I64": "int64", "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
}


def torch_dtype(name: str):
    """The torch dtype of a safetensors dtype name such as ``F32``."""
    import torch

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

    def tensor(self, offset: int, dtype, shape: list[int]) -> torch.Tensor:
        """A zero-copy tensor of ``dtype`` and ``shape`` starting at byte ``offset``."""
        import torch

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


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str],
                                                 MappedFile]:
    """Memory-map a safetensors file: its tensors (zero-copy), metadata and the mapping.

    Raises:
        FormatError: the header is malformed or the file is truncated.
    """
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 1 or 8 + n > size:
            raise FormatError(f"{p} is not a safetensors file (bad header length)",
                              "The file is truncated or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise FormatError(f"{p} has a corrupt safetensors header", "Regenerate it") from e
    if not isinstance(header, dict):
        raise FormatError(f"{p} has a corrupt safetensors header", "Regenerate it")
    mapped = MappedFile(p)
    meta = header.pop("__metadata__", None) or {}
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        try:
            dtype = torch_dtype(info["dtype"])
            shape = [int(s) for s in info["shape"]]
            lo, hi = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{p}: tensor {name!r} has a bad header entry",
                              "The file is corrupt") from e
        if hi - lo != math.prod(shape) * dtype.itemsize or 8 + n + hi > size:
            raise FormatError(f"{p} is truncated or corrupt (tensor {name!r} runs past the end)",
                              "Regenerate the file")
        tensors[name] = mapped.tensor(8 + n + lo, dtype, shape)
        mapped.offsets[name] = 8 + n + lo
    return tensors, meta, mapped


def map_npy(path: str | Path) -> tuple[torch.Tensor, MappedFile] | None:
    """Memory-map a C-ordered ``.npy`` array; None if it needs a plain ``np.load``."""
    import numpy as np
    import torch

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

    The header is laid out up front from the declared shapes; ``write`` seeks to each
    chunk's place, so memory does not grow with the file. Closing checks that every byte
    was written.

    Args:
        path: The file to write (normally a temporary path).
        specs: ``name -> (torch dtype, shape)``, in file order.
        metadata: String-to-string ``__metadata__``.
    """

    def __init__(self, path: str | Path, specs: dict[str, tuple[Any, tuple[int, ...]]],
                 metadata: dict[str, str]) -> None:
        header: dict[str, Any] = {"__metadata__": metadata}
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
        self.written = dict.fromkeys(specs, 0)
        self.f = open(path, "wb")  # noqa: SIM115 - closed in __exit__
        self.f.write(len(raw).to_bytes(8, "little") + raw)
        self.f.truncate(self.base + offset)

    def write(self, name: str, first: int, chunk: torch.Tensor) -> None:
        """Write ``chunk`` into tensor ``name`` from flat (row-major) element ``first`` on."""
        start, itemsize, _ = self.layout[name]
        buf = to_bytes(chunk)
        self.f.seek(self.base + start + first * itemsize)
        self.f.write(buf)
        self.written[name] += len(buf)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.f.close()
        if exc_type is None:
            for name, (_, _, size) in self.layout.items():
                if self.written[name] != size:
                    raise FormatError(f"internal: tensor {name} got {self.written[name]} of "
                                      f"{size} bytes", "Report this bug")


def to_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (bf16 is viewed as int16, same bytes)."""
    import torch

    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")
