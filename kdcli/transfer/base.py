"""The transfer-set file: a teacher's soft targets, in safetensors (spec: docs/formats.md).

A transfer set is one ``.safetensors`` file, or a sharded set: files of a bounded size that
each hold a contiguous range of rows, plus an ``.index.json`` file naming them. Targets are
``dense`` (all C logits and probabilities per example) or ``top-k`` (the K largest logits,
their class indices, and the log of the probability mass outside them).

Writing streams rows straight to their place in a file (`io.storage.SafetensorsWriter`);
reading memory-maps every file and gathers rows on demand under a page budget, so neither
grows in memory with the number of examples.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from kdcli.errors import DataError, FormatError, UsageError
from kdcli.io.files import inside_folder
from kdcli.io.storage import (
    DATA_SHA256,
    MappedFile,
    PageBudget,
    SafetensorsWriter,
    data_sha256,
    read_safetensors,
)
from kdcli.students.model_file import check_format

if TYPE_CHECKING:
    import torch

TRANSFER_FORMAT = "kdcli.transfer-set"
# 1: dense single files; 2 adds top-k targets and shards; 3 adds data_sha256 (required)
TRANSFER_FORMAT_VERSION = 3
INDEX_FORMAT = "kdcli.transfer-set.index"
INDEX_FORMAT_VERSION = 1
COMBINE_RULES = ("mean-probs", "mean-logits")
STORAGE_FORMS = ("dense", "top-k")
SHARD_KEYS = ("shard_index", "shard_count", "shard_row_start", "shard_rows", DATA_SHA256)
# How far a stored row of soft targets may be from summing to 1, and from
# softmax(logits / T) (float32 rounding over C classes stays far below this).
SUM_TOLERANCE = 1e-3
INDEX_SUFFIX = ".index.json"


def to_device(target: torch.Tensor | TopK, device: torch.device | str) -> torch.Tensor | TopK:
    """Dense or top-k targets (what :meth:`TransferSet.targets` returns) on ``device``."""
    from kdcli.devices import host_to_device

    if isinstance(target, TopK):
        return TopK(*(host_to_device(t, device) for t in target))
    return host_to_device(target, device)


class TopK(NamedTuple):
    """Top-k soft targets of a batch.

    Attributes:
        logits: ``[B, K]`` float32, the teacher's K largest logits, largest first.
        indices: ``[B, K]`` int64 class indices of those logits.
        tail_logmass: ``[B]`` float32, ``log(1 - sum of the top-K probabilities at T)``;
            ``-inf`` when nothing is left out.
    """

    logits: torch.Tensor
    indices: torch.Tensor
    tail_logmass: torch.Tensor


def combine_members(member_logits: torch.Tensor, weights: list[float], rule: str,
                    T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine ensemble members' logits into one teacher.

    Args:
        member_logits: ``[M, B, C]`` float32.
        weights: ``M`` non-negative weights (normalized here).
        rule: ``mean-probs`` (arithmetic mean of softmax(z/T), the paper's rule) or
            ``mean-logits`` (weighted mean of logits: a geometric mean of probabilities).
        T: Temperature.

    Returns:
        ``(logits [B, C], probs [B, C])`` with ``probs == softmax(logits / T)``. For
        ``mean-probs`` the logits are ``T * log(probs)``.
    """
    import torch

    if member_logits.shape[0] == 1:  # one teacher: its logits (what the weighted sum gives)
        logits = member_logits[0]
        return logits, torch.softmax(logits / T, dim=-1)
    w = torch.tensor(weights, dtype=torch.float64)
    w = (w / w.sum()).to(member_logits.dtype)[:, None, None]
    if rule == "mean-logits":
        logits = (w * member_logits).sum(0)
        return logits, torch.softmax(logits / T, dim=-1)
    if rule != "mean-probs":
        raise UsageError(f"unknown --combine {rule!r}", f"Use one of {', '.join(COMBINE_RULES)}")
    log_p = torch.logsumexp(torch.log_softmax(member_logits / T, dim=-1) + w.log(), dim=0)
    return T * log_p, log_p.exp()


def top_k_targets(logits: torch.Tensor, k: int, T: float) -> TopK:
    """Reduce dense logits ``[B, C]`` to their top ``k`` and the tail mass at ``T``."""
    import torch

    vals, idx = logits.topk(k, dim=-1)
    scaled = logits / T
    lse_all = torch.logsumexp(scaled, -1)
    tail = torch.logsumexp(scaled.scatter(-1, idx, float("-inf")), -1) - lse_all
    return TopK(vals, idx, tail)


# --------------------------------------------------------------------------- layout


def transfer_specs(n: int, input_shape: tuple[int, ...], input_dtype, *, labels: bool,
                   members: int, num_classes: int, top_k: int | None,
                   targets_dtype) -> dict[str, tuple[Any, tuple[int, ...]]]:
    """The tensors (name -> (dtype, shape)) of a transfer-set file holding ``n`` rows."""
    import torch

    specs: dict[str, tuple[Any, tuple[int, ...]]] = {"inputs": (input_dtype, (n, *input_shape))}
    if labels:
        specs["labels"] = (torch.int64, (n,))
    if top_k is None:
        if members > 1:
            specs["member_logits"] = (torch.float32, (members, n, num_classes))
        specs["logits"] = (torch.float32, (n, num_classes))
        specs["soft_targets"] = (torch.float32, (n, num_classes))
    else:
        specs["topk_logits"] = (targets_dtype, (n, top_k))
        specs["topk_indices"] = (torch.int32, (n, top_k))
        specs["tail_logmass"] = (torch.float32, (n,))
    return specs


def bytes_per_row(specs: dict[str, tuple[Any, tuple[int, ...]]]) -> int:
    """Bytes one example takes in a file laid out by :func:`transfer_specs`."""
    total = 0
    for name, (dtype, shape) in specs.items():
        rows = shape[1] if name == "member_logits" else shape[0]
        total += math.prod(shape) * dtype.itemsize // max(rows, 1)
    return total


def row_dim(name: str) -> int:
    """The dimension that indexes examples in tensor ``name``."""
    return 1 if name == "member_logits" else 0


def shard_paths(index_path: str | Path, count: int) -> list[Path]:
    """Shard file names of a sharded set: ``transfer.index.json`` ->
    ``transfer-00001-of-00003.safetensors``, ..."""
    p = Path(index_path)
    stem = p.name.removesuffix(INDEX_SUFFIX)
    return [p.with_name(f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors") for i in range(count)]


def is_index_path(path: str | Path) -> bool:
    return str(path).endswith(INDEX_SUFFIX)


def write_index(path: Path, meta: dict[str, str], shards: list[dict[str, Any]]) -> None:
    """Write the index of a sharded set (shard files are named relative to it)."""
    doc = {"format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION,
           "metadata": meta, "shards": shards}
    path.write_text(json.dumps(doc, indent=1) + "\n")


def merge_shards(parts: list[Path], out: Path, specs: dict[str, tuple[Any, tuple[int, ...]]],
                 meta: dict[str, str], chunk_bytes: int = 64 << 20) -> None:
    """Concatenate row-range files (in row order) into one transfer-set file at ``out``."""
    n = specs["inputs"][1][0]
    with SafetensorsWriter(out, specs, meta) as writer:
        start = 0
        for part in parts:
            tensors, _, mapped = read_safetensors(part)
            rows = int(tensors["inputs"].shape[0])
            for name, t in tensors.items():
                if name == "member_logits":
                    for m in range(t.shape[0]):
                        _copy_rows(writer, name, (m * n + start) * t.shape[2], t[m],
                                   chunk_bytes)
                else:
                    per_row = math.prod(t.shape[1:])
                    _copy_rows(writer, name, start * per_row, t, chunk_bytes)
                mapped.release()
            start += rows


def _copy_rows(writer: SafetensorsWriter, name: str, first: int, t: torch.Tensor,
               chunk_bytes: int) -> None:
    per_row = max(1, math.prod(t.shape[1:]))
    step = max(1, chunk_bytes // (per_row * t.element_size()))
    for i in range(0, t.shape[0], step):
        writer.write(name, first + i * per_row, t[i:i + step])


# --------------------------------------------------------------------------- reading


class Rows:
    """One tensor of a transfer set, split by examples over its files.

    Indexing with a slice or an index tensor gathers those examples into memory. Sets that
    fit the page budget are read through the memory map (zero-copy); larger ones with
    ``pread``, so the process holds only the rows it asked for.
    """

    def __init__(self, parts: list[torch.Tensor], budget: PageBudget, dim: int = 0,
                 sources: list[tuple[MappedFile, int]] | None = None) -> None:
        import torch

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
        import torch

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
        import torch

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
        import torch

        if len(self.parts) == 1:
            return self.parts[0]
        return torch.cat(self.parts, dim=self.dim)


@dataclass
class TransferSet:
    """A memory-mapped transfer set, single-file or sharded.

    Attributes:
        columns: Its tensors by name, each a :class:`Rows` over the files.
        T: The temperature the soft targets were made at.
        storage: ``dense`` or ``top-k``.
        num_classes: C.
        top_k: K for top-k sets, else None.
        meta: The decoded ``__metadata__`` (JSON fields parsed).
        path: The file, or the index file of a sharded set.
        shards: One record per shard file (``file``, ``row_start``, ``rows``, ``bytes``).
        budget: The page budget shared by all columns.
    """

    columns: dict[str, Rows]
    T: float
    storage: str
    num_classes: int
    top_k: int | None
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    shards: list[dict[str, Any]] = field(default_factory=list)
    budget: PageBudget = field(default_factory=PageBudget)

    def __len__(self) -> int:
        return len(self.columns["inputs"])

    def __repr__(self) -> str:
        k = f", K={self.top_k}" if self.top_k else ""
        return (f"TransferSet({self.path}, N={len(self)}, C={self.num_classes}, "
                f"T={self.T:g}, {self.storage}{k}, shards={len(self.shards)})")

    def _whole(self, name: str) -> torch.Tensor | None:
        col = self.columns.get(name)
        return None if col is None else col.whole()

    # Whole tensors, for small sets, inspection and tests. Training gathers rows instead.
    @property
    def inputs(self) -> torch.Tensor:
        return self._whole("inputs")

    @property
    def labels(self) -> torch.Tensor | None:
        t = self._whole("labels")
        return None if t is None else t.long()

    @property
    def logits(self) -> torch.Tensor | None:
        return self._whole("logits")

    @property
    def soft_targets(self) -> torch.Tensor | None:
        return self._whole("soft_targets")

    @property
    def member_logits(self) -> torch.Tensor | None:
        return self._whole("member_logits")

    @property
    def has_labels(self) -> bool:
        return "labels" in self.columns

    @property
    def is_ensemble(self) -> bool:
        return len(self.meta.get("teachers") or []) > 1

    def rederive_problem(self, T: float) -> str | None:
        """Why soft targets at ``T`` cannot be derived from this set, or None if they can."""
        if T == self.T or self.storage == "dense":
            return None
        if self.top_k < self.num_classes:
            return (f"it stores only the top {self.top_k} of {self.num_classes} logits, so the "
                    f"normalization at T={T:g} is unknown")
        if self.is_ensemble and self.meta.get("combine") == "mean-probs":
            return ("its ensemble was combined by mean-probs at the stored T, and the members' "
                    "logits are not stored")
        return None

    def targets(self, idx: torch.Tensor, T: float) -> torch.Tensor | TopK:
        """Soft targets at ``T`` of the examples ``idx``: ``[B, C]`` probabilities, or
        :class:`TopK` for a top-k set at its stored T.

        Raises:
            UsageError: ``T`` differs from the stored T and cannot be re-derived.
        """
        import torch

        problem = self.rederive_problem(T)
        if problem:
            raise UsageError(
                f"cannot re-derive soft targets at T={T:g} from this T={self.T:g} transfer set: "
                f"{problem}", f"Train at --T {self.T:g}, or regenerate the set with --T {T:g}")
        if self.storage == "top-k":
            tk = TopK(self.columns["topk_logits"][idx].float(),
                      self.columns["topk_indices"][idx].long(),
                      self.columns["tail_logmass"][idx].float())
            if T == self.T:
                return tk
            return torch.softmax(self._scatter(tk.logits, tk.indices) / T, dim=-1)
        if T == self.T:
            return self.columns["soft_targets"][idx].float()
        if "member_logits" in self.columns:
            _, probs = combine_members(self.columns["member_logits"][idx].float(),
                                       self.meta["weights"], self.meta["combine"], T)
            return probs
        return torch.softmax(self.columns["logits"][idx].float() / T, dim=-1)

    def teacher_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """All C teacher logits ``[B, C]`` of the examples ``idx`` (for logit matching)."""
        if self.storage == "dense":
            return self.columns["logits"][idx].float()
        if self.top_k < self.num_classes:
            raise UsageError(f"--loss mse needs all {self.num_classes} logits, but this set "
                             f"stores only the top {self.top_k}",
                             "Use --loss kd, or regenerate the set without --top-k")
        return self._scatter(self.columns["topk_logits"][idx].float(),
                             self.columns["topk_indices"][idx].long())

    def _scatter(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        import torch

        out = torch.full((vals.shape[0], self.num_classes), float("-inf"))
        return out.scatter(-1, idx, vals)

    def teacher_argmax(self) -> torch.Tensor:
        """The teacher's predicted class of every example, ``[N]`` int64."""
        import torch

        name = "logits" if self.storage == "dense" else "topk_indices"
        out = torch.empty(len(self), dtype=torch.int64)  # filled in place: no small blocks
        for start, chunk in self.columns[name].chunks():  # left pinning the heap
            out[start:start + len(chunk)] = (chunk.argmax(-1) if self.storage == "dense"
                                             else chunk[:, 0])
        return out

    def mean_targets(self, T: float) -> torch.Tensor:
        """The teacher's mean predicted distribution ``[C]`` (float64) at ``T``."""
        import torch

        chunk = self.chunk_rows()
        total = torch.zeros(self.num_classes, dtype=torch.float64)
        for a in range(0, len(self), chunk):
            t = self.dense_targets(torch.arange(a, min(len(self), a + chunk)), T)
            total += t.double().sum(0)
        return total / len(self)

    def chunk_rows(self, nbytes: int = 16 << 20) -> int:
        """How many rows of dense ``[rows, C]`` float32 targets fit in ``nbytes``."""
        return max(1, nbytes // (4 * self.num_classes))

    def dense_probs(self, t: TopK, T: float) -> torch.Tensor:
        """Top-k targets as ``[B, C]`` probabilities, the tail mass left out (zero)."""
        import torch

        return torch.softmax(self._scatter(t.logits, t.indices) / T, -1) * \
            (1 - t.tail_logmass.exp())[:, None]

    def targets_at(self, T: float) -> torch.Tensor:
        """All soft targets at ``T`` as one dense ``[N, C]`` tensor (small sets only)."""
        import torch

        return self.dense_targets(torch.arange(len(self)), T)

    def dense_targets(self, index: torch.Tensor, T: float) -> torch.Tensor:
        """The soft targets of rows ``index`` at ``T`` as ``[B, C]`` probabilities, whatever
        the storage (of a top-k set, the tail mass is left out)."""
        t = self.targets(index, T)
        return self.dense_probs(t, T) if isinstance(t, TopK) else t

    def check_values(self) -> None:
        """Check every stored target row, in one pass of chunks (FormatError naming rows).

        Dense sets: ``logits`` and ``soft_targets`` finite, soft targets non-negative, rows
        summing to 1 and equal to ``softmax(logits / T)`` (within :data:`SUM_TOLERANCE`),
        ensemble members finite. Top-k sets: ``topk_logits`` finite and non-increasing,
        indices in ``[0, C)`` and distinct per row, ``tail_logmass`` not NaN or positive.
        Labels: in ``[0, C)``. Float inputs: finite.
        """
        checks = _DENSE_CHECKS if self.storage == "dense" else _TOPK_CHECKS
        if self.columns["inputs"].dtype.is_floating_point:
            checks = (("inputs", _inputs_ok), *checks)
        for name, rule in (*checks, ("labels", _labels_ok)):
            if name not in self.columns:
                continue
            for start, chunk in self.columns[name].chunks():
                problem = rule(self, start, chunk)
                if problem:
                    what, ok = problem
                    rows = (start + (~ok).nonzero()[:5, 0]).tolist()
                    raise FormatError(f"{self.path} has {what} (rows {rows})",
                                      "Regenerate it with kdcli soft-targets; check the "
                                      "teacher's outputs")


def _finite_rows(chunk: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.isfinite(chunk.float()).reshape(len(chunk), -1).all(-1)


def _inputs_ok(ts: TransferSet, start: int, chunk: torch.Tensor):
    ok = _finite_rows(chunk)
    return None if bool(ok.all()) else ("NaN or Inf in inputs", ok)


def _logits_ok(ts: TransferSet, start: int, chunk: torch.Tensor):
    ok = _finite_rows(chunk)
    return None if bool(ok.all()) else (f"NaN or Inf in {'logits'}", ok)


def _soft_ok(ts: TransferSet, start: int, chunk: torch.Tensor):
    import torch

    p = chunk.float()
    ok = _finite_rows(p)
    if not bool(ok.all()):
        return "NaN or Inf in soft_targets", ok
    ok = (p >= 0).all(-1)
    if not bool(ok.all()):
        return "negative soft targets", ok
    ok = (p.double().sum(-1) - 1).abs() <= SUM_TOLERANCE
    if not bool(ok.all()):
        return f"soft-target rows that do not sum to 1 (tolerance {SUM_TOLERANCE:g})", ok
    z = ts.columns["logits"][torch.arange(start, start + len(chunk))].float()
    ok = (torch.softmax(z.double() / ts.T, -1) - p.double()).abs().amax(-1) <= SUM_TOLERANCE
    if not bool(ok.all()):
        return (f"soft targets that are not softmax(logits / T) at the recorded T={ts.T:g}",
                ok)
    return None


def _members_ok(ts: TransferSet, start: int, chunk: torch.Tensor):
    ok = _finite_rows(chunk.transpose(0, 1))
    return None if bool(ok.all()) else ("NaN or Inf in member_logits", ok)


def _topk_logits_ok(ts: TransferSet, start: int, chunk: torch.Tensor):
    v = chunk.float()
    ok = _finite_rows(v)
    if not bool(ok.all()):
        return "NaN or Inf in topk_logits", ok
    ok = (v.diff(dim=-1) <= 0).all(-1)
    return None if bool(ok.all()) else ("topk_logits that are not sorted largest first", ok)


def _topk_indices_ok(ts: TransferSet, start: int, chunk: torch.Tensor):
    idx = chunk.long()
    ok = ((idx >= 0) & (idx < ts.num_classes)).all(-1)
    if not bool(ok.all()):
        return f"top-k indices outside [0, {ts.num_classes})", ok
    ok = (idx.sort(-1).values.diff(dim=-1) != 0).all(-1)
    return None if bool(ok.all()) else ("duplicate top-k indices in a row", ok)


def _tail_ok(ts: TransferSet, start: int, chunk: torch.Tensor):
    import torch

    ok = ~(torch.isnan(chunk) | (chunk > 0))
    return None if bool(ok.all()) else ("a NaN or positive tail_logmass", ok)


def _tail_agrees(ts: TransferSet, start: int, chunk: torch.Tensor):
    """The tail mass must be 0 (``-inf``) exactly when K = C, and with K < C no more than
    the C - K left-out classes can hold: each at most the smallest top-k probability."""
    import torch

    if ts.top_k == ts.num_classes:
        ok = chunk == float("-inf")
        return None if bool(ok.all()) else ("a tail_logmass above 0 mass, but K = C "
                                            "leaves no class out", ok)
    ok = torch.isfinite(chunk)
    if not bool(ok.all()):
        return ("a tail_logmass of -inf (no mass outside the top k), but with K < C the "
                "left-out classes always hold some", ok)
    rows = ts.columns["topk_logits"][torch.arange(start, start + len(chunk))]
    v = rows.double() / ts.T
    log_qk = v[:, -1] - torch.logsumexp(v, -1)
    tail = chunk.double()
    log_odds = tail - torch.log(-torch.expm1(tail))  # log(t / (1 - t))
    eps = 2.0 ** -10 if rows.dtype == torch.float16 else 2.0 ** -22
    tol = 1e-3 + 2 * eps * v.abs().amax(-1)
    ok = log_odds <= math.log(ts.num_classes - ts.top_k) + log_qk + tol
    return None if bool(ok.all()) else ("a tail_logmass larger than the classes outside "
                                        "the top k can hold", ok)


def _labels_ok(ts: TransferSet, start: int, chunk: torch.Tensor):
    ok = (chunk >= 0) & (chunk < ts.num_classes)
    return None if bool(ok.all()) else (f"labels outside [0, {ts.num_classes})", ok)


_DENSE_CHECKS = (("logits", _logits_ok), ("soft_targets", _soft_ok),
                 ("member_logits", _members_ok))
_TOPK_CHECKS = (("topk_logits", _topk_logits_ok), ("topk_indices", _topk_indices_ok),
                ("tail_logmass", _tail_ok), ("tail_logmass", _tail_agrees))


def file_stamps(ts: TransferSet) -> list[tuple[Path, int, int]]:
    """``(path, size, mtime_ns)`` of each file of ``ts``, from its open descriptor: taken
    after the checks, compared by :func:`check_unchanged` when the reading is done."""
    return [(f.path, (st := os.fstat(f.fd)).st_size, st.st_mtime_ns) for f in ts.budget.files]


def check_unchanged(ts: TransferSet, stamps: list[tuple[Path, int, int]]) -> None:
    """Refuse a set whose files were written to since ``stamps`` were taken: its checksums
    were verified once, when it was opened, so the rows read since may not be those bytes.

    Raises:
        FormatError: a file's size or modification time changed.
    """
    for (path, size, mtime), now in zip(stamps, file_stamps(ts), strict=True):
        if now[1:] != (size, mtime):
            raise FormatError(f"{path} was modified while it was being read (its size or "
                              "modification time changed after its checksum was verified), "
                              "so what was read may not be what was checked",
                              "Leave the transfer set unchanged while it is in use, and rerun")


def load_transfer_set(path: str | Path, check_values: bool = True,
                      verify: bool = True) -> TransferSet:
    """Open and validate a transfer set: one file, or a sharded set's ``.index.json``.

    Every file's header, dtypes, shapes and metadata are checked when it is opened (see
    docs/formats.md).

    Args:
        path: The ``.safetensors`` file or ``.index.json`` index.
        check_values: Check every stored target row (:meth:`TransferSet.check_values`).
        verify: Verify each file's ``data_sha256`` and the set's ``inputs_sha256``, in one
            sequential read of each file as it is opened.

    Raises:
        DataError: the file, or a shard the index names, is missing.
        FormatError: anything about its format, shapes, values, checksums or shards is wrong.
    """
    import hashlib

    from kdcli.io.files import require_file

    p = require_file(path, "transfer set")
    if is_index_path(p) or _looks_like_json(p):
        ts = _load_sharded(p, verify)
    else:
        tensors, raw_meta, mapped = read_safetensors(p)
        meta = _check_file(p, tensors, raw_meta)
        _check_counts(p, tensors, meta, int(tensors["inputs"].shape[0]))
        if verify:
            inputs_hash = hashlib.sha256()
            _verify_file(p, tensors, raw_meta, mapped, inputs_hash)
            _verify_inputs(p, meta, inputs_hash.hexdigest())
        budget = PageBudget([mapped])
        columns = {k: Rows([v], budget, row_dim(k), [(mapped, mapped.offsets[k])])
                   for k, v in tensors.items()}
        n = len(columns["inputs"])
        ts = _make_set(p, columns, meta, budget,
                       [{"file": p.name, "row_start": 0, "rows": n, "bytes": mapped.size}])
    if check_values:
        ts.check_values()
    return ts


def _verify_file(p: Path, tensors: dict[str, torch.Tensor], raw_meta: dict[str, str],
                 mapped: MappedFile, inputs_hash: Any) -> None:
    """Check a file's ``data_sha256`` (required from version 3 on), feeding its ``inputs``
    bytes to ``inputs_hash`` (a SHA-256 running over the set's files) in the same read."""
    recorded = raw_meta.get(DATA_SHA256)
    if recorded is None and int(raw_meta["format_version"]) >= 3:
        raise FormatError(f"{p} is {TRANSFER_FORMAT} version {raw_meta['format_version']} but "
                          f"records no {DATA_SHA256}", "The file is damaged; regenerate it")
    x = tensors["inputs"]
    lo = mapped.offsets["inputs"]
    digest = data_sha256(mapped, (lo, lo + x.numel() * x.element_size()), inputs_hash)
    if recorded is not None and digest != recorded:
        raise FormatError(f"{p} fails its checksum ({DATA_SHA256}): its tensors are not the "
                          "bytes that were written",
                          "The file is damaged; regenerate it or copy it again")


def _verify_inputs(p: Path, meta: dict[str, Any], digest: str) -> None:
    recorded = meta.get("inputs_sha256")
    if recorded is not None and digest != recorded:
        raise FormatError(f"{p} records an inputs_sha256 that its inputs do not have",
                          "The inputs were altered or the metadata belongs to another set; "
                          "regenerate it")


def _check_counts(p: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                  n: int) -> None:
    """The metadata's example and class counts must agree with a whole set's tensors."""
    recorded = meta.get("num_examples")
    if recorded is not None and str(recorded) != str(n):
        raise FormatError(f"{p} records num_examples={recorded}, but holds {n} examples",
                          "Regenerate it")


def _looks_like_json(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(1) == b"{"


def _make_set(p: Path, columns: dict[str, Rows], meta: dict[str, Any], budget: PageBudget,
              shards: list[dict[str, Any]]) -> TransferSet:
    storage = meta.get("targets", "dense")
    key = "logits" if storage == "dense" else "topk_logits"
    c = int(meta["num_classes"]) if storage == "top-k" else int(columns[key].shape[1])
    k = int(columns[key].shape[1]) if storage == "top-k" else None
    if storage == "top-k":
        check_class_memory(p, c, 1)
    return TransferSet(columns, float(meta["T"]), storage, c, k, meta, p, shards, budget)


def check_class_memory(p: Path, classes: int, rows: int) -> None:
    """Refuse a set whose dense targets of ``rows`` examples (``[rows, C]`` float32, made
    twice when top-k targets are scattered) cannot fit in memory."""
    from kdcli.resources import check_memory

    check_memory(2 * 4 * rows * classes, f"{p} claims {classes:,} classes: dense targets of "
                 f"{rows:,} example{'s' if rows > 1 else ''}",
                 "Lower --batch-size, or check the file" if rows > 1 else
                 "The file is damaged or hostile; regenerate it")


def _check_file(p: Path, tensors: dict[str, torch.Tensor], raw_meta: dict[str, str]
                ) -> dict[str, Any]:
    """Validate one transfer-set file's metadata and tensor shapes; return decoded metadata."""
    check_format(raw_meta, p, TRANSFER_FORMAT, TRANSFER_FORMAT_VERSION)
    meta = _decode_meta(p, raw_meta)
    storage = meta.get("targets", "dense")
    if storage not in STORAGE_FORMS:
        raise FormatError(f"{p} has unknown targets form {storage!r}", "Upgrade kdcli")
    need = ["inputs"] + (["logits", "soft_targets"] if storage == "dense"
                         else ["topk_logits", "topk_indices", "tail_logmass"])
    missing = [k for k in need if k not in tensors]
    if missing:
        raise FormatError(f"{p} lacks the tensor(s) {', '.join(missing)}",
                          "Regenerate it with kdcli soft-targets")
    inputs = tensors["inputs"]
    n = inputs.shape[0] if inputs.dim() else -1
    if storage == "dense":
        logits, soft = tensors["logits"], tensors["soft_targets"]
        if logits.dim() != 2 or logits.shape[0] != n or soft.shape != logits.shape:
            raise FormatError(
                f"{p} has mismatched shapes: inputs {tuple(inputs.shape)}, logits "
                f"{tuple(logits.shape)}, soft_targets {tuple(soft.shape)}",
                "Inputs, logits and soft targets need the same row count N and logits/soft "
                "targets the same [N, C]; regenerate the file")
        members = tensors.get("member_logits")
        if members is not None and (members.dim() != 3 or members.shape[1:] != logits.shape):
            raise FormatError(f"{p} has member_logits of shape {tuple(members.shape)}, "
                              f"expected [M, {n}, {logits.shape[1]}]", "Regenerate the file")
    else:
        vals, idx, tail = tensors["topk_logits"], tensors["topk_indices"], tensors["tail_logmass"]
        c = int(meta.get("num_classes", 0))
        if vals.dim() != 2 or vals.shape[0] != n or idx.shape != vals.shape or \
                tail.shape != (n,):
            raise FormatError(
                f"{p} has mismatched shapes: inputs {tuple(inputs.shape)}, topk_logits "
                f"{tuple(vals.shape)}, topk_indices {tuple(idx.shape)}, tail_logmass "
                f"{tuple(tail.shape)}", "Regenerate the file")
        if not 0 < vals.shape[1] <= c:
            raise FormatError(f"{p} stores K={vals.shape[1]} of num_classes={c}",
                              "Regenerate the file")
    labels = tensors.get("labels")
    if labels is not None and labels.shape != (n,):
        raise FormatError(f"{p} has labels of shape {tuple(labels.shape)} for {n} inputs",
                          "Regenerate the file")
    if n == 0:
        raise FormatError(f"{p} holds no examples", "Regenerate it from non-empty data")
    _check_dtypes(p, tensors)
    _check_meta_agrees(p, tensors, meta, storage)
    _check_meta_describes(p, tensors, meta, storage)
    return meta


# The dtypes docs/formats.md allows for each tensor (inputs: any numeric dtype).
_ALLOWED_DTYPES = {
    "labels": ("int64",), "logits": ("float32",), "soft_targets": ("float32",),
    "member_logits": ("float32",), "topk_logits": ("float32", "float16"),
    "topk_indices": ("int32",), "tail_logmass": ("float32",),
}


def _check_dtypes(p: Path, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        allowed = _ALLOWED_DTYPES.get(name)
        got = str(t.dtype).removeprefix("torch.")
        if allowed and got not in allowed:
            raise FormatError(f"{p} stores {name} as {got}, not {' or '.join(allowed)}",
                              "Regenerate it with kdcli soft-targets")
        if name == "inputs" and got == "bool":
            raise FormatError(f"{p} stores inputs as bool", "Regenerate it")


def _check_meta_agrees(p: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                       storage: str) -> None:
    """Metadata that describes the tensors must agree with them."""
    def bad(what: str) -> FormatError:
        return FormatError(f"{p} has metadata that contradicts its tensors: {what}",
                           "Regenerate it with kdcli soft-targets")

    key = "logits" if storage == "dense" else "topk_logits"
    try:
        c = int(meta["num_classes"]) if "num_classes" in meta else None
        k = int(meta["top_k"]) if "top_k" in meta else None
    except ValueError:
        raise bad(f"num_classes {meta.get('num_classes')!r}, top_k "
                  f"{meta.get('top_k')!r}") from None
    if storage == "dense" and c is not None and c != tensors[key].shape[1]:
        raise bad(f"num_classes={c}, logits have {tensors[key].shape[1]} columns")
    if storage == "top-k" and k is not None and k != tensors[key].shape[1]:
        raise bad(f"top_k={k}, topk_logits have {tensors[key].shape[1]} columns")
    combine = meta.get("combine")
    if combine is not None and combine not in COMBINE_RULES:
        raise FormatError(f"{p} records an unknown combine rule {_clip(combine)!r}",
                          f"It must be one of {', '.join(COMBINE_RULES)}; regenerate the set")
    weights, teachers = meta.get("weights"), meta.get("teachers")
    if weights is not None:
        if not (isinstance(weights, list) and weights and all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and
                math.isfinite(w) and w >= 0 for w in weights) and sum(weights) > 0):
            raise bad(f"weights {_clip(weights)} are not non-negative numbers")
        if abs(sum(weights) - 1) > 1e-6:
            raise bad(f"weights {_clip(weights)} do not sum to 1")
    if teachers is not None and not (isinstance(teachers, list) and
                                     all(isinstance(t, dict) for t in teachers)):
        raise bad("teachers is not a list of records")
    members = tensors.get("member_logits")
    m = int(members.shape[0]) if members is not None else None
    counts = {"weights": len(weights) if isinstance(weights, list) else None,
              "teachers": len(teachers) if isinstance(teachers, list) else None,
              "member_logits": m}
    known = {name: v for name, v in counts.items() if v is not None}
    if len(set(known.values())) > 1:
        raise bad("different member counts: " +
                  ", ".join(f"{name} {v}" for name, v in known.items()))


def _check_meta_describes(p: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                          storage: str) -> None:
    """The rest of what the metadata says about the tensors: at least two classes and as
    many class names, the stored top-k dtype, an ensemble's weights and member logits, and
    the teachers' input shapes."""
    def bad(what: str) -> FormatError:
        return FormatError(f"{p} has metadata that contradicts its tensors: {what}",
                           "Regenerate it with kdcli soft-targets")

    c = int(meta["num_classes"]) if storage == "top-k" else int(tensors["logits"].shape[1])
    if c < 2:
        raise bad(f"{c} class(es); a classifier's targets need at least 2")
    names = meta.get("class_names")
    if names is not None and len(names) != c:
        raise bad(f"{len(names)} class_names for {c} classes")
    if storage == "top-k" and "targets_dtype" in meta:
        got = str(tensors["topk_logits"].dtype).removeprefix("torch.")
        if meta["targets_dtype"] != got:
            raise bad(f"targets_dtype {_clip(meta['targets_dtype'])!r}, but topk_logits are "
                      f"stored as {got}")
    teachers = meta.get("teachers")
    if isinstance(teachers, list) and len(teachers) > 1:
        if meta.get("weights") is None:
            raise bad(f"{len(teachers)} teachers but no weights")
        if storage == "dense" and "member_logits" not in tensors:
            raise bad(f"{len(teachers)} teachers but no member_logits")
    sample = list(tensors["inputs"].shape[1:])
    for t in teachers if isinstance(teachers, list) else []:
        shape, pre = t.get("input_shape"), t.get("preprocessing")
        if shape is None or (isinstance(pre, dict) and pre.get("size")):
            continue  # not recorded, or resized images (any input size)
        if not (isinstance(shape, list) and all(type(d) is int and d > 0 for d in shape) and
                math.prod(shape) == math.prod(sample)):
            raise bad(f"teacher {_clip(t.get('file'))!r} has input_shape {_clip(shape)}, "
                      f"but the inputs are {sample}")


def _decode_meta(p: Path, raw: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = dict(raw)
    try:
        for k in ("weights", "teachers", "classes", "class_names", "feature_names",
                  "data_options"):
            if k in meta:
                meta[k] = json.loads(meta[k])
        T = float(meta["T"])
    except (KeyError, ValueError, RecursionError) as e:
        what = "nested too deeply" if isinstance(e, RecursionError) else _clip(e)
        raise FormatError(f"{p} has bad or missing metadata ({what})", "Regenerate it") from None
    if not (T > 0 and math.isfinite(T)):
        raise FormatError(f"{p} records T={meta['T']}", "Regenerate it with a positive --T")
    for k in ("class_names", "feature_names"):
        names = meta.get(k)
        if names is not None and not (isinstance(names, list) and
                                      all(isinstance(n, str) for n in names)):
            raise FormatError(f"{p} records {k} that are not a list of strings",
                              "Regenerate it")
    return meta


def _load_sharded(p: Path, verify: bool = True) -> TransferSet:
    import hashlib

    shards, index_meta = _read_index(p)
    inputs_hash = hashlib.sha256()
    budget = PageBudget()
    parts: dict[str, list[torch.Tensor]] = {}
    sources: dict[str, list[tuple[MappedFile, int]]] = {}
    row = 0
    for i, s in enumerate(shards):
        f = shard_file(p, s.get("file") if isinstance(s, dict) else None, i, len(shards))
        tensors, mapped = _open_shard(p, f, (i, len(shards)), s, index_meta, verify,
                                      inputs_hash)
        n = int(tensors["inputs"].shape[0])
        if int(s.get("row_start", -1)) != row or int(s.get("rows", -1)) != n:
            raise FormatError(f"shard {f.name} holds {n} rows, but {p.name} records rows "
                              f"{s.get('row_start')}+{s.get('rows')} (expected start {row})",
                              "Regenerate the set")
        row += n
        budget.files.append(mapped)
        for k, v in tensors.items():
            parts.setdefault(k, []).append(v)
            sources.setdefault(k, []).append((mapped, mapped.offsets[k]))
    if row != int(index_meta.get("num_examples", -1)):
        raise FormatError(f"{p} records {index_meta.get('num_examples')} examples, but its "
                          f"shards hold {row}", "Regenerate the set")
    if any(len(v) != len(shards) for v in parts.values()):
        raise FormatError(f"the shards of {p} hold different tensors", "Regenerate the set")
    columns = {k: Rows(v, budget, row_dim(k), sources[k]) for k, v in parts.items()}
    meta = _decode_meta(p, index_meta)
    if verify:
        _verify_inputs(p, meta, inputs_hash.hexdigest())
    return _make_set(p, columns, meta, budget, shards)


def _read_index(p: Path) -> tuple[list[Any], dict[str, Any]]:
    """A sharded set's index: its shard entries and metadata (their fields checked)."""
    try:
        doc = json.loads(p.read_text())
        fmt, shards, index_meta = doc.get("format"), doc["shards"], doc["metadata"]
        version = int(doc.get("format_version", 0))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError,
            RecursionError) as e:
        what = "nested too deeply" if isinstance(e, RecursionError) else _clip(e)
        raise FormatError(f"{p} is not a valid transfer-set index ({what})",
                          "Regenerate it with kdcli soft-targets") from None
    if fmt != INDEX_FORMAT:
        raise FormatError(f"{p} has format {fmt!r}, not {INDEX_FORMAT!r}",
                          "Give a transfer-set file or index written by kdcli")
    if version > INDEX_FORMAT_VERSION or version < 1:
        raise FormatError(f"{p} is index version {version}; this kdcli reads up to "
                          f"{INDEX_FORMAT_VERSION}", "Upgrade kdcli")
    if not isinstance(shards, list) or not shards:
        raise FormatError(f"{p} names no shards", "Regenerate the set")
    _check_index_fields(p, shards, index_meta)
    return shards, index_meta


def _open_shard(p: Path, f: Path, which: tuple[int, int], s: dict[str, Any],
                index_meta: dict[str, Any], verify: bool,
                inputs_hash) -> tuple[dict[str, torch.Tensor], MappedFile]:
    """Map shard ``which = (i, count)`` (file ``f``, index entry ``s``) of the index ``p``,
    refused unless it exists, has the recorded size, is a valid transfer-set file and agrees
    with the index's metadata (with ``verify``, its checksums are checked too)."""
    i, count = which
    if not f.is_file():
        raise DataError(f"shard {i + 1} of {count}, {f}, named by {p}, does not exist",
                        "Copy every shard file next to the index, or regenerate the set")
    if "bytes" in s and os.path.getsize(f) != int(s["bytes"]):
        raise FormatError(f"shard {f} has {os.path.getsize(f)} bytes, but {p} records "
                          f"{s['bytes']}", "The shard is truncated or was replaced; "
                          "regenerate the set")
    tensors, raw_meta, mapped = read_safetensors(f)
    _check_file(f, tensors, raw_meta)
    if verify:
        _verify_file(f, tensors, raw_meta, mapped, inputs_hash)
    diff = sorted(k for k in set(raw_meta) | set(index_meta) if k not in SHARD_KEYS
                  and raw_meta.get(k) != index_meta.get(k))
    if diff:
        k = diff[0]
        raise FormatError(
            f"shard {f.name} disagrees with {p.name} on {', '.join(diff)} "
            f"({k}: {_clip(raw_meta.get(k))} vs {_clip(index_meta.get(k))})",
            "The shards come from different runs; regenerate the set")
    return tensors, mapped


def _check_index_fields(p: Path, shards: list[Any], index_meta: Any) -> None:
    """The index's own fields must have the types docs/formats.md gives them."""
    if not isinstance(index_meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in index_meta.items()):
        raise FormatError(f"{p}: metadata must be an object of strings",
                          "Regenerate it with kdcli soft-targets")
    for i, s in enumerate(shards):
        ok = isinstance(s, dict) and isinstance(s.get("file"), str) and all(
            type(s.get(k)) is int and s[k] >= 0 for k in ("row_start", "rows")) and (
            "bytes" not in s or (type(s["bytes"]) is int and s["bytes"] >= 0))
        if not ok:
            raise FormatError(f"{p}: shard entry {i + 1} is malformed ({_clip(s)})",
                              "Each needs a file name and integer row_start, rows and bytes; "
                              "regenerate the set")


def _is_run(idx: torch.Tensor) -> bool:
    """True if ``idx`` is ``a, a+1, ..., b``."""
    return len(idx) > 0 and int(idx[-1]) - int(idx[0]) == len(idx) - 1 and \
        bool((idx.diff() == 1).all())


def _clip(v: Any, n: int = 60) -> str:
    s = str(v)
    return s if len(s) <= n else s[:n - 1] + "…"


def own_shards(index: str | Path) -> list[Path]:
    """The shard files of the set named by ``index`` that exist now, found by their name
    (``STEM-NNNNN-of-NNNNN.safetensors`` in the index's folder), never by what an index
    file says: these, and only these, may be replaced when the set is rewritten."""
    p = Path(index)
    stem = p.name.removesuffix(INDEX_SUFFIX)
    pattern = re.compile(rf"^{re.escape(stem)}-\d{{5}}-of-\d{{5}}\.safetensors$")
    try:
        entries = sorted(os.scandir(p.parent), key=lambda e: e.name)
    except OSError:
        return []
    return [p.parent / e.name for e in entries
            if pattern.match(e.name) and (e.is_symlink() or e.is_file())]


def shard_file(index: Path, name: Any, i: int, count: int) -> Path:
    """The path of shard ``i`` named ``name`` by ``index``: a plain file name in the index's
    folder. Absolute paths, folders, ``..`` and symlinks that lead out of the folder are
    refused, before anything about the named file is looked at."""
    bad = (not isinstance(name, str) or not name or name in (".", "..") or "/" in name
           or "\\" in name or "\x00" in name or Path(name).is_absolute())
    where = f"shard {i + 1} of {count} in {index}"
    if bad:
        raise FormatError(f"{where} is named {_clip(repr(name))}, not a file name in the "
                          "index's folder", "Regenerate the set (kdcli writes plain names)")
    f = index.parent / name
    real = inside_folder(index.parent, name)  # reads links; touches nothing outside
    if real is None or real.parent != Path(os.path.realpath(index.parent)):
        raise FormatError(f"{where}, {name}, is a link that leads out of the index's folder",
                          "Copy the shard files next to the index")
    return f
