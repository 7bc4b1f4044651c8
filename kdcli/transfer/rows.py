"""The rows of a transfer set's tensors, gathered on demand from its files.

A :class:`Rows` is one tensor split by examples over the files of a set (one file, or the
shards of a sharded set). Reading memory-maps every file and gathers rows on demand under a
page budget, so memory does not grow with the number of examples.
"""

from __future__ import annotations

import math

import torch

from kdcli.io.storage import MappedFile, PageBudget


class Rows:
    """One tensor of a transfer set, split by examples over its files.

    Indexing with a slice or an index tensor gathers those examples into memory. Sets that
    fit the page budget are read through the memory map (zero-copy); larger ones with
    ``pread``, so the process holds only the rows it asked for.
    """

    def __init__(self, parts: list[torch.Tensor], budget: PageBudget, dim: int = 0,
                 sources: list[tuple[MappedFile, int]] | None = None) -> None:
        self.parts, self.budget, self.dim, self.sources = parts, budget, dim, sources
        sizes = [int(p.shape[dim]) for p in parts]
        self.ends = torch.tensor(sizes).cumsum(0)
        self.starts = self.ends - torch.tensor(sizes)
        self.n = int(self.ends[-1])
        shape = list(parts[0].shape)
        shape[dim] = self.n
        self.shape = torch.Size(shape)
        self.dtype = parts[0].dtype
        self.row_bytes = math.prod(shape) // max(self.n, 1) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: slice | torch.Tensor) -> torch.Tensor:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.n)
            if step != 1:
                raise ValueError("Rows slices take no step")
            key = torch.arange(start, max(start, stop))
        paged = self.sources is not None and self.budget.paged
        if not paged:
            self.budget.add(len(key) * self.row_bytes)
        take = self._pread if paged else self._take
        if len(self.parts) == 1:
            return take(0, key)
        shard = torch.searchsorted(self.ends, key, right=True)
        shape = list(self.shape)
        shape[self.dim] = len(key)
        out = torch.empty(shape, dtype=self.dtype)
        for s in shard.unique().tolist():
            sel = (shard == s).nonzero()[:, 0]
            taken = take(s, key[sel] - self.starts[s])
            if self.dim == 0:
                out[sel] = taken
            else:
                out[:, sel] = taken
        return out

    def _take(self, s: int, idx: torch.Tensor) -> torch.Tensor:
        if self.sources is not None:
            self.sources[s][0].check_intact()  # a truncated file: an error, not SIGBUS
        part = self.parts[s]
        if self.dim == 0:
            if _is_run(idx):
                return part[int(idx[0]):int(idx[-1]) + 1]
            return part[idx]
        return part[:, idx]

    def _pread(self, s: int, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` of part ``s``, read with pread (one read per run of adjacent rows)."""
        mapped, offset = self.sources[s]
        part = self.parts[s]
        blocks = part.shape[0] if self.dim == 1 else 1  # ensemble members
        rows = int(part.shape[self.dim])
        rb = self.row_bytes // blocks if self.dim == 1 else self.row_bytes
        order = idx.argsort()
        sorted_idx = idx[order].tolist()
        shape = list(part.shape)
        shape[self.dim] = len(idx)
        out = torch.empty(shape, dtype=self.dtype)
        raw = memoryview(out.view(torch.uint8).numpy()).cast("B") if len(idx) else None
        for b in range(blocks):
            base = offset + b * rows * rb
            out_base = b * len(idx) * rb
            j = 0
            while j < len(sorted_idx):
                k = j
                while k + 1 < len(sorted_idx) and sorted_idx[k + 1] == sorted_idx[k] + 1:
                    k += 1
                mapped.read_into(raw[out_base + j * rb:out_base + (k + 1) * rb],
                                 base + sorted_idx[j] * rb)
                j = k + 1
        if bool((order == torch.arange(len(idx))).all()):
            return out
        unsorted = torch.empty_like(out)
        if self.dim == 0:
            unsorted[order] = out
        else:
            unsorted[:, order] = out
        return unsorted

    def chunks(self, nbytes: int = 8 << 20):
        """Yield ``(start, tensor)`` for consecutive blocks of about ``nbytes`` each."""
        size = max(1, nbytes // max(1, self.row_bytes))
        for start in range(0, self.n, size):
            yield start, self[start:min(self.n, start + size)]

    def whole(self) -> torch.Tensor:
        """The whole tensor (zero-copy for a single file; small sets and tests only)."""
        if len(self.parts) == 1:
            return self.parts[0]
        return torch.cat(self.parts, dim=self.dim)


def _is_run(idx: torch.Tensor) -> bool:
    """True if ``idx`` is ``a, a+1, ..., b``."""
    return len(idx) > 0 and int(idx[-1]) - int(idx[0]) == len(idx) - 1 and \
        bool((idx.diff() == 1).all())
