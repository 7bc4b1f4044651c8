"""Opening a transfer set and serving its rows: :func:`load_transfer_set` and
:class:`TransferSet`.

Opening memory-maps every file and checks it (:mod:`kdcli.transfer.validation`) before a
row is served; a :class:`TransferSet` then serves rows of its columns, and its targets in
the form the loss takes, by asking its targets form (:mod:`kdcli.transfer.targets`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdcli.data.text import Texts
from kdcli.errors import DataError, FormatError, UsageError
from kdcli.io.files import require_file
from kdcli.io.storage import MappedFile, PageBudget, read_safetensors
from kdcli.transfer import validation
from kdcli.transfer.ensemble import TopK
from kdcli.transfer.layout import (
    INDEX_FORMAT,
    INDEX_FORMAT_VERSION,
    SHARD_KEYS,
    TEXT_BYTES,
    TEXT_SPANS,
    clip,
    is_index_path,
    row_count,
    shard_file,
)
from kdcli.transfer.rows import Rows
from kdcli.transfer.targets import Targets
from kdcli.transfer.validation import (
    check_counts,
    check_file,
    check_index_fields,
    decode_meta,
    verify_file,
    verify_inputs,
)


@dataclass
class TransferSet:
    """A memory-mapped transfer set, single-file or sharded, serving rows.

    Attributes:
        columns: Its tensors by name, each a :class:`Rows` over the files.
        T: The temperature the soft targets were made at.
        form: How its targets are stored (:class:`~kdcli.transfer.targets.Targets`).
        meta: The decoded ``__metadata__`` (JSON fields parsed).
        path: The file, or the index file of a sharded set.
        shards: One record per shard file (``file``, ``row_start``, ``rows``, ``bytes``).
        budget: The page budget shared by all columns.
        text_bytes: A text set's UTF-8 bytes, one tensor per file, into which each file's
            ``text_spans`` point (empty for other sets).
    """

    columns: dict[str, Rows]
    T: float
    form: Targets
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    shards: list[dict[str, Any]] = field(default_factory=list)
    budget: PageBudget = field(default_factory=PageBudget)
    text_bytes: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.columns[TEXT_SPANS if self.is_text else "inputs"])

    @property
    def is_text(self) -> bool:
        """Whether its examples are texts (``text_spans`` into ``text_bytes``)."""
        return TEXT_SPANS in self.columns

    def texts(self, idx: torch.Tensor | slice) -> Texts:
        """The texts (or pairs) of the examples ``idx`` of a text set, packed in order."""
        col = self.columns[TEXT_SPANS]
        idx = torch.arange(*idx.indices(len(self))) if isinstance(idx, slice) else idx
        spans = col[idx]  # in the buffer of each row's file
        shard = torch.searchsorted(col.ends, idx, right=True)
        pieces, out = [], torch.empty_like(spans)
        pos = 0
        for i, (s, row) in enumerate(zip(shard.tolist(), spans.tolist(), strict=True)):
            buf = self.text_bytes[s]
            for j, (a, b) in enumerate(row):
                pieces.append(buf[a:b])
                out[i, j, 0], out[i, j, 1] = pos, pos + (b - a)
                pos += b - a
        buffer = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.uint8)
        return Texts(buffer.clone(), out, self.meta.get("text_columns"))

    def __repr__(self) -> str:
        return (f"TransferSet({self.path}, N={len(self)}, C={self.num_classes}, "
                f"T={self.T:g}, {self.form.label()}, shards={len(self.shards)})")

    @property
    def storage(self) -> str:
        """``dense`` or ``top-k``: the name of its form."""
        return self.form.name

    @property
    def num_classes(self) -> int:
        """C."""
        return self.form.num_classes

    @property
    def top_k(self) -> int | None:
        """K for top-k sets, else None."""
        return self.form.top_k

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

    def rederive_problem(self, T: float) -> str | None:
        """Why soft targets at ``T`` cannot be derived from this set, or None if they can."""
        return None if T == self.T else self.form.rederive_problem(self, T)

    def _check_derivable(self, T: float) -> None:
        problem = self.rederive_problem(T)
        if problem:
            raise UsageError(
                f"cannot re-derive soft targets at T={T:g} from this T={self.T:g} transfer set: "
                f"{problem}", f"Train at --T {self.T:g}, or regenerate the set with --T {T:g}")

    def targets(self, idx: torch.Tensor, T: float) -> torch.Tensor | TopK:
        """Soft targets at ``T`` of the examples ``idx``: ``[B, C]`` probabilities, or
        :class:`~kdcli.transfer.ensemble.TopK` for a top-k set at its stored T.

        Raises:
            UsageError: ``T`` differs from the stored T and cannot be re-derived.
        """
        self._check_derivable(T)
        return self.form.targets(self, idx, T)

    def teacher_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """All C teacher logits ``[B, C]`` of the examples ``idx`` (for logit matching)."""
        return self.form.teacher_logits(self, idx)

    def teacher_argmax(self) -> torch.Tensor:
        """The teacher's predicted class of every example, ``[N]`` int64."""
        return self.form.teacher_argmax(self)

    def mean_targets(self, T: float) -> torch.Tensor:
        """The teacher's mean predicted distribution ``[C]`` (float64) at ``T``."""
        chunk = self.chunk_rows()
        total = torch.zeros(self.num_classes, dtype=torch.float64)
        for a in range(0, len(self), chunk):
            t = self.dense_targets(torch.arange(a, min(len(self), a + chunk)), T)
            total += t.double().sum(0)
        return total / len(self)

    def chunk_rows(self, nbytes: int = 16 << 20) -> int:
        """How many rows of dense ``[rows, C]`` float32 targets fit in ``nbytes``."""
        return max(1, nbytes // (4 * self.num_classes))

    def targets_at(self, T: float) -> torch.Tensor:
        """All soft targets at ``T`` as one dense ``[N, C]`` tensor (small sets only)."""
        return self.dense_targets(torch.arange(len(self)), T)

    def dense_targets(self, index: torch.Tensor, T: float) -> torch.Tensor:
        """The soft targets of rows ``index`` at ``T`` as ``[B, C]`` probabilities, whatever
        the storage (of a top-k set, the tail mass is left out)."""
        self._check_derivable(T)
        return self.form.dense_targets(self, index, T)


def load_transfer_set(path: str | Path, check_values: bool = True,
                      verify: bool = True) -> TransferSet:
    """Open and validate a transfer set: one file, or a sharded set's ``.index.json``.

    Every file's header, dtypes, shapes and metadata are checked when it is opened (see
    docs/formats.md).

    Args:
        path: The ``.safetensors`` file or ``.index.json`` index.
        check_values: Check every stored target row
            (:func:`~kdcli.transfer.validation.check_values`).
        verify: Verify each file's ``data_sha256`` and the set's ``inputs_sha256``, in one
            sequential read of each file as it is opened.

    Raises:
        DataError: the file, or a shard the index names, is missing.
        FormatError: anything about its format, shapes, values, checksums or shards is wrong.
    """
    p = require_file(path, "transfer set")
    if is_index_path(p) or _looks_like_json(p):
        ts = _load_sharded(p, verify)
    else:
        tensors, raw_meta, mapped = read_safetensors(p)
        meta, form = check_file(p, tensors, raw_meta)
        check_counts(p, tensors, meta, row_count(tensors))
        if verify:
            inputs_hash = hashlib.sha256()
            verify_file(p, tensors, raw_meta, mapped, inputs_hash)
            verify_inputs(p, meta, inputs_hash.hexdigest())
        budget = PageBudget([mapped])
        columns = _columns(form, {k: [v] for k, v in tensors.items()},
                           {k: [(mapped, mapped.offsets[k])] for k in tensors}, budget)
        n = row_count(tensors)
        ts = _make_set(p, columns, meta, form, budget,
                       [{"file": p.name, "row_start": 0, "rows": n, "bytes": mapped.size}],
                       [tensors[TEXT_BYTES]] if TEXT_BYTES in tensors else None)
    if check_values:
        validation.check_values(ts, ts.form, p)
    return ts


def _load_sharded(p: Path, verify: bool = True) -> TransferSet:
    """Open the sharded set whose index is ``p``: every shard checked, in row order."""
    shards, index_meta = _read_index(p)
    inputs_hash = hashlib.sha256()
    budget = PageBudget()
    parts: dict[str, list[torch.Tensor]] = {}
    form: Targets | None = None  # the first shard's
    sources: dict[str, list[tuple[MappedFile, int]]] = {}
    row = 0
    for i, s in enumerate(shards):
        f = shard_file(p, s.get("file") if isinstance(s, dict) else None, i, len(shards))
        tensors, mapped, shard_form = _open_shard(p, f, (i, len(shards)), s, index_meta,
                                                  verify, inputs_hash)
        n = row_count(tensors)
        if int(s.get("row_start", -1)) != row or int(s.get("rows", -1)) != n:
            raise FormatError(f"shard {f.name} holds {n} rows, but {p.name} records rows "
                              f"{s.get('row_start')}+{s.get('rows')} (expected start {row})",
                              "Regenerate the set")
        row += n
        form = form or shard_form
        budget.files.append(mapped)
        for k, v in tensors.items():
            parts.setdefault(k, []).append(v)
            sources.setdefault(k, []).append((mapped, mapped.offsets[k]))
    if row != int(index_meta.get("num_examples", -1)):
        raise FormatError(f"{p} records {index_meta.get('num_examples')} examples, but its "
                          f"shards hold {row}", "Regenerate the set")
    if any(len(v) != len(shards) for v in parts.values()):
        raise FormatError(f"the shards of {p} hold different tensors", "Regenerate the set")
    columns = _columns(form, parts, sources, budget)
    meta = decode_meta(p, index_meta)
    if verify:
        verify_inputs(p, meta, inputs_hash.hexdigest())
    return _make_set(p, columns, meta, form, budget, shards, parts.get(TEXT_BYTES))


def _read_index(p: Path) -> tuple[list[Any], dict[str, Any]]:
    """A sharded set's index: its shard entries and metadata (their fields checked)."""
    try:
        doc = json.loads(p.read_text())
        fmt, shards, index_meta = doc.get("format"), doc["shards"], doc["metadata"]
        version = int(doc.get("format_version", 0))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError,
            RecursionError) as e:
        what = "nested too deeply" if isinstance(e, RecursionError) else clip(e)
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
    check_index_fields(p, shards, index_meta)
    return shards, index_meta


def _open_shard(p: Path, f: Path, which: tuple[int, int], s: dict[str, Any],
                index_meta: dict[str, Any], verify: bool,
                inputs_hash) -> tuple[dict[str, torch.Tensor], MappedFile, Targets]:
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
    _, form = check_file(f, tensors, raw_meta)
    if verify:
        verify_file(f, tensors, raw_meta, mapped, inputs_hash)
    diff = sorted(k for k in set(raw_meta) | set(index_meta) if k not in SHARD_KEYS
                  and raw_meta.get(k) != index_meta.get(k))
    if diff:
        k = diff[0]
        raise FormatError(
            f"shard {f.name} disagrees with {p.name} on {', '.join(diff)} "
            f"({k}: {clip(raw_meta.get(k))} vs {clip(index_meta.get(k))})",
            "The shards come from different runs; regenerate the set")
    return tensors, mapped, form


def _columns(form: Targets, parts: dict[str, list[torch.Tensor]],
             sources: dict[str, list[tuple[MappedFile, int]]],
             budget: PageBudget) -> dict[str, Rows]:
    """Each tensor as :class:`Rows` over its ``parts`` (one per file), split by examples
    along the dimension its column in the form's layout gives (0 for the others)."""
    layout = form.columns()
    return {k: Rows(v, budget, layout[k].row_dim if k in layout else 0, sources[k])
            for k, v in parts.items() if k != TEXT_BYTES}


def _looks_like_json(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(1) == b"{"


def _make_set(p: Path, columns: dict[str, Rows], meta: dict[str, Any], form: Targets,
              budget: PageBudget, shards: list[dict[str, Any]],
              text_bytes: list[torch.Tensor] | None = None) -> TransferSet:
    form.check_memory(p)
    return TransferSet(columns, float(meta["T"]), form, meta, p,
                       shards, budget, text_bytes or [])


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
