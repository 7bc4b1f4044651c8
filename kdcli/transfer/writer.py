"""Writing a transfer set: teachers run over row ranges, streamed to files.

A :class:`RangeWriter` runs the teachers over a range of rows of the :class:`Source` and
writes them, in the layout its targets form gives, as one complete transfer-set file.
:func:`write_set` writes the whole set: one file (under torchrun, per-rank part files that
rank 0 merges), or shards of a bounded size and their index.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kdcli.data.augment import AugmentConfig, Draw
from kdcli.data.text import Texts
from kdcli.data.text_augment import TextAugment, WordPool
from kdcli.data.text_augment import augment as augment_text
from kdcli.errors import DistributedError, ModelError, OutputExistsError, UsageError
from kdcli.io.files import atomic_output, check_output, remove_stale_temps, temp_path, write_error
from kdcli.io.storage import PageBudget, SafetensorsWriter, read_safetensors, to_bytes
from kdcli.output import Reporter
from kdcli.resources import check_disk
from kdcli.teachers.base import Teacher
from kdcli.transfer.ensemble import combine_members
from kdcli.transfer.layout import (
    INDEX_SUFFIX,
    TEXT_BYTES,
    TEXT_SPANS,
    Layout,
    bytes_per_row,
    file_specs,
    is_index_path,
    own_shards,
    row_count,
    shard_paths,
    transfer_layout,
    write_index,
    write_rows,
)
from kdcli.transfer.targets import Targets


class Source:
    """The transfer set's inputs in order: the kept examples, then each augmented copy.

    An augmented copy's random draws come from generators seeded per block of examples, so
    any row range is the same whichever process computes it and however it is batched.
    """

    BLOCK = 4096

    def __init__(self, ds, keep, copies: int, augment: AugmentConfig, seed: int,
                 text_augment: TextAugment | None = None) -> None:
        self.ds, self.keep, self.copies, self.augment, self.seed = ds, keep, copies, augment, seed
        self.text_augment = text_augment or TextAugment()
        self.base = len(ds) if keep is None else len(keep)
        self.n = self.base * (copies + 1)
        self.budget = PageBudget(getattr(ds, "files", []))
        self.text = isinstance(ds.inputs, Texts)
        self.pool: WordPool | None = None  # the words replacements are drawn from
        # the SHA-256 state after all the inputs' bytes (set by sha256()): a file whose data
        # section starts with all of them continues it instead of hashing them again
        self.inputs_hash: Any = None
        # bytes of one row's inputs (of a text set: its texts, on average, at least 1)
        self.row_bytes = -(-ds.inputs.nbytes // max(1, len(ds))) if self.text else \
            ds.inputs[0].numel() * ds.inputs.element_size()

    def rows(self, a: int, b: int):
        """Inputs and labels (or None) of transfer rows ``[a, b)``."""
        for f in self.budget.files:  # a mapped data file truncated meanwhile: not SIGBUS
            f.check_intact()
        xs, ys = [], []
        for copy in range(a // self.base, (b - 1) // self.base + 1):
            lo = max(a, copy * self.base) - copy * self.base
            hi = min(b, (copy + 1) * self.base) - copy * self.base
            if self.keep is None:
                x = self.ds.inputs[lo:hi]
                y = None if self.ds.labels is None else self.ds.labels[lo:hi]
            else:
                x = self.ds.inputs[self.keep[lo:hi]]
                y = None if self.ds.labels is None else self.ds.labels[self.keep[lo:hi]]
            if copy:
                x = self._augment(x, copy, lo, hi)
            xs.append(x)
            ys.append(y)
            self.budget.add((hi - lo) * self.row_bytes)
        x = xs[0] if len(xs) == 1 else Texts.cat(xs) if self.text else torch.cat(xs)
        y = None if ys[0] is None else (ys[0] if len(ys) == 1 else torch.cat(ys))
        return x, y

    def _augment(self, x, copy: int, lo: int, hi: int):
        if self.text:  # each text's draws seeded by (seed, copy, row): see text_augment
            if self.pool is None:
                kept = self.ds.inputs if self.keep is None else self.ds.inputs[self.keep]
                self.pool = WordPool(kept.strings())
            strings = x.strings()
            return Texts.from_strings([augment_text(t, self.text_augment, self.pool, self.seed,
                                                    copy, lo + j)
                                       for j, t in enumerate(strings)], x.columns)
        draws = []
        for blk in range(lo // self.BLOCK, (hi - 1) // self.BLOCK + 1):
            gen = torch.Generator().manual_seed(  # torch takes seeds below 2^64
                ((self.seed * 1_000_003 + copy) * 1_000_003 + blk) % (1 << 64))
            s = slice(max(lo, blk * self.BLOCK) - blk * self.BLOCK,
                      min(hi, (blk + 1) * self.BLOCK) - blk * self.BLOCK)
            draws.append(self.augment.draw(self.BLOCK, gen)[s])
        return self.augment.apply(x, Draw.cat(draws))

    def sha256(self, nbytes: int = 8 << 20) -> str:
        """The SHA-256 of all the inputs' bytes, in row order (``inputs_sha256``; of a
        text set, its texts' UTF-8 bytes, in row order: its ``text_bytes``)."""
        chunk = max(1, nbytes // max(1, self.row_bytes))
        h = hashlib.sha256()
        for a in range(0, self.n, chunk):
            x, _ = self.rows(a, min(self.n, a + chunk))
            h.update(to_bytes(x.compact()[0] if self.text else x))
        if not self.text:
            self.inputs_hash = h.copy()
        return h.hexdigest()

    def text_bytes(self, a: int, b: int) -> int:
        """The UTF-8 bytes of the texts of rows ``[a, b)`` (0 for a set that is not text)."""
        return self.rows(a, b)[0].nbytes if self.text and b > a else 0


def write_set(out: Path, meta: dict[str, str], writer: RangeWriter, dist, force: bool,
              max_shard: int, shard_size: str | int | None) -> list[dict[str, Any]] | None:
    """Write the whole set: one file, or (for an index ``out``) shards of at most
    ``max_shard`` bytes, which are returned."""
    n = writer.source.n
    if not is_index_path(out):
        _write_single(out, n, meta, writer, dist, force)
        return None
    layout = writer.layout()
    header = len(json.dumps(meta)) + 200 * (len(layout) + 4)  # a generous bound
    row = bytes_per_row(layout) + (writer.source.row_bytes if writer.source.text else 0)
    rows_per_shard = (max_shard - header) // row
    if rows_per_shard < 1:
        raise UsageError(f"--shard-size {shard_size} cannot hold one example "
                         f"({header + row:,} bytes with header)",
                         "Give a larger --shard-size")
    return _write_sharded(out, n, rows_per_shard, meta, writer, dist, force)


def check_room(out: Path, n: int, writer: RangeWriter) -> None:
    """Refuse a set larger than the free space of its folder, before writing a byte."""
    src = writer.source  # texts: about the originals' mean length a row
    check_disk(n * (bytes_per_row(writer.layout()) + (src.row_bytes if src.text else 0)),
               out.parent,
               f"the transfer set of {n:,} rows", "Lower --copies or --limit, or free space")


class RangeWriter:
    """Runs the teachers over a range of rows and writes them to one transfer-set file."""

    def __init__(self, members: list[Teacher], source: Source, weights: list[float],
                 combine: str, T: float, form: Targets, batch_size: int,
                 rep: Reporter) -> None:
        self.members, self.source, self.weights, self.combine = members, source, weights, combine
        self.T, self.form, self.batch_size, self.rep = T, form, batch_size, rep
        # correct per member, then the ensemble; then the rows the members disagree on
        # (Python ints: a tensor's in-place adds cost more than the counting, per batch)
        self.counts = [0] * (len(members) + 2)

    @property
    def stats(self) -> torch.Tensor:
        """:attr:`counts` as a tensor ``[M + 2]`` (what ranks sum)."""
        return torch.tensor(self.counts, dtype=torch.long)

    def layout(self) -> Layout:
        """The tensors of a transfer-set file of these rows."""
        x0, y0 = self.source.rows(0, 1)
        return transfer_layout(x0, y0 is not None, self.form.columns())

    def write(self, path: Path, a: int, b: int, meta: dict[str, str], advance) -> None:
        """Write rows ``[a, b)`` as a complete transfer-set file at ``path``."""
        src, n = self.source, b - a
        if n <= 0:
            return
        layout = self.layout()
        cursor = 0  # of a text set: where the next batch's texts go in text_bytes
        with SafetensorsWriter(path, file_specs(layout, n, src.text_bytes(a, b)), meta) as w, \
                weight_cast_cache(self.members):
            if (a, b) == (0, src.n) and src.inputs_hash is not None:
                w.already_hashed("inputs", src.inputs_hash)  # the same bytes, in row order
            for start in range(a, b, self.batch_size):
                stop = min(b, start + self.batch_size)
                x, y = src.rows(start, stop)
                z = torch.stack([t.logits(x) for t in self.members])  # [M, B, C]
                _check_finite(z, self.members, start)
                logits, probs = combine_members(z, self.weights, self.combine, self.T)
                labels = {} if y is None else {"labels": y}
                if src.text:
                    cursor, inputs = _write_texts(w, x, cursor)
                else:
                    inputs = {"inputs": x}
                write_rows(w, layout, n, start - a, {**inputs, **labels,
                                                     **self.form.rows(z, logits, probs, self.T)})
                self._count(z, logits, y)
                advance(stop - start)

    def _count(self, z: torch.Tensor, logits: torch.Tensor, y: torch.Tensor | None) -> None:
        """Add a batch to :attr:`counts`: members' logits ``z`` ``[M, B, C]``, the
        ensemble's ``logits`` ``[B, C]``, labels ``y`` ``[B]`` or None."""
        m = len(self.members)
        preds = z.argmax(-1)  # [M, B]
        if m > 1:
            self.counts[m + 1] += int((preds != preds[0]).any(0).sum())
        if y is None:
            return
        if m == 1:  # the ensemble is its one member
            right = int((preds[0] == y).sum())
            self.counts[0] += right
            self.counts[1] += right
            return
        for i, r in enumerate((preds == y).sum(-1).tolist()):
            self.counts[i] += r
        self.counts[m] += int((logits.argmax(-1) == y).sum())


def _write_texts(w: SafetensorsWriter, x: Texts, cursor: int) -> tuple[int, dict[str, Any]]:
    """Write a batch's texts into ``text_bytes`` from byte ``cursor`` on; return the next
    cursor and the batch's ``text_spans`` rows (spans in the file's buffer)."""
    buf, spans = x.compact()
    if len(buf):
        w.write(TEXT_BYTES, cursor, buf)
    return cursor + len(buf), {TEXT_SPANS: spans + cursor}


def weight_cast_cache(members: list[Teacher]) -> contextlib.AbstractContextManager:
    """One bf16 autocast region around the whole teacher pass when a PyTorch teacher runs in
    bf16. Each batch's own autocast region then nests in it, so autocast keeps the bf16
    copies of the weights it made for the first batch instead of casting every weight again
    for every batch (the same copies, so the same numbers)."""
    bf16 = [t for t in members if t.module is not None and t.precision == "bf16"]
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(bf16[0].device).type, dtype=torch.bfloat16)


def _write_single(out: Path, n: int, meta: dict[str, str], writer: RangeWriter, dist,
                  force: bool) -> None:
    """One file. Under torchrun, ranks write their rows to part files that rank 0 merges."""
    if not dist.enabled:
        with atomic_output(out, force) as tmp, \
                writer.rep.progress(f"soft targets T={writer.T:g}", n) as advance:
            writer.write(tmp, 0, n, meta, advance)
        return
    parts = [out.with_name(f".{out.name}.part{r:05d}-of-{dist.world:05d}.tmp")
             for r in range(dist.world)]
    a, b = dist.split(n)
    ok = False
    try:
        with writer.rep.progress(f"soft targets T={writer.T:g} (rank 0)", b - a) as advance:
            writer.write(parts[dist.rank], a, b, meta, advance)
        ok = True
    finally:
        all_ok = dist.all_ok(ok)
        try:
            if all_ok and dist.main:
                with atomic_output(out, force) as tmp:
                    merge_shards([p for p in parts if p.exists()], tmp, writer.layout(), n,
                                 meta)
        finally:
            dist.barrier()
            parts[dist.rank].unlink(missing_ok=True)
    if not all_ok:
        raise DistributedError("another rank failed while writing soft targets",
                               "See that rank's error above; nothing was written")


@contextlib.contextmanager
def _on_every_rank(dist, failed: str, hint: str) -> Iterator[None]:
    """Run a step on every rank and agree on its outcome: a rank whose own step failed
    raises its error, and the others raise DistributedError(``failed``, ``hint``)."""
    ok = False
    try:
        yield
        ok = True
    finally:
        ok = dist.all_ok(ok)
    if not ok:
        raise DistributedError(failed, hint)


def _write_sharded(index: Path, n: int, rows_per_shard: int, meta: dict[str, str],
                   writer: RangeWriter, dist, force: bool) -> list[dict[str, Any]]:
    """Shard files of at most ``rows_per_shard`` rows plus the index; under torchrun each
    rank writes a contiguous run of shards.

    Every shard is written under a temporary name first. Only when all are complete does
    rank 0 check ``--force`` again and delete the old set (its index, then the shards of
    that name found in the folder, never files an old index names); each rank then renames
    its shards into place, and rank 0 publishes the index last. A failure at any point
    leaves the old set or no index, never an index naming missing shards."""
    count = math.ceil(n / rows_per_shard)
    finals = shard_paths(index, count)
    mine = range(*dist.split(count))
    temps = {i: temp_path(finals[i]) for i in mine}
    stem = re.escape(index.name.removesuffix(INDEX_SUFFIX))  # any count: a killed run's
    remove_stale_temps(index, rf"{stem}-\d{{5}}-of-\d{{5}}\.safetensors")  # may differ

    def rows(i: int) -> tuple[int, int]:
        return i * rows_per_shard, min(n, (i + 1) * rows_per_shard)

    try:
        with _on_every_rank(dist, "another rank failed while writing soft targets",
                            "See that rank's error above; nothing was written"):
            _write_shards(writer, meta, {i: (temps[i], finals[i], *rows(i)) for i in mine},
                          count)
        with _on_every_rank(dist, "rank 0 could not replace the old set",
                            "See its error above; nothing was written"):
            if dist.main:
                check_sharded_output(index, force)
                index.unlink(missing_ok=True)  # no index may name a half-replaced set
                for old in own_shards(index):
                    old.unlink()
        with _on_every_rank(dist, "a rank could not rename its shards into place",
                            "See its error above; no index was written"):
            for i in mine:
                os.replace(temps[i], finals[i])
        shards = [{"file": finals[i].name, "row_start": rows(i)[0],
                   "rows": rows(i)[1] - rows(i)[0],
                   "bytes": finals[i].stat().st_size} for i in range(count)]
        with _on_every_rank(dist, "rank 0 could not write the index", "See its error above"):
            if dist.main:
                with atomic_output(index, force=True) as tmp:
                    write_index(tmp, meta, shards)
    finally:
        for t in temps.values():
            with contextlib.suppress(OSError):  # read-only: the write error is the news
                t.unlink(missing_ok=True)
    return shards


def _write_shards(writer: RangeWriter, meta: dict[str, str],
                  mine: dict[int, tuple[Path, Path, int, int]], count: int) -> None:
    """Write this rank's shards: ``mine`` maps a shard's number to its temporary and final
    paths and its rows ``[a, b)``."""
    with writer.rep.progress(f"soft targets T={writer.T:g}",
                             sum(b - a for _, _, a, b in mine.values())) as advance:
        for i, (temp, final, a, b) in mine.items():
            shard_meta = {**meta, "shard_index": str(i + 1), "shard_count": str(count),
                          "shard_row_start": str(a), "shard_rows": str(b - a)}
            try:
                writer.write(temp, a, b, shard_meta, advance)
            except (OSError, RuntimeError) as e:
                err = write_error(final, e)
                if err is None:
                    raise
                raise err from e


def check_sharded_output(index: Path, force: bool) -> None:
    """Refuse, without ``force``, to replace an index or any shard of its name."""
    check_output(index, force)
    existing = own_shards(index)
    if existing and not force:
        raise OutputExistsError(f"{existing[0]} (a shard of {index.name}) already exists",
                                "Pass --force to replace the set")
    for f in existing:
        check_output(f, force=True)


def _check_finite(z, members: list[Teacher], start: int) -> None:
    """Refuse teacher logits ``z`` ``[M, B, C]`` (of rows from ``start`` on) with NaN or Inf."""
    if math.isfinite(float(z.sum())):  # no NaN or Inf in z: the sum is finite (a sum
        return  # that overflows is checked element by element below); 10x cheaper
    ok = torch.isfinite(z)
    if not bool(ok.all()):
        ok = ok.all(-1)  # [M, B]
        i, row = (~ok).nonzero()[0].tolist()
        rows = (start + (~ok[i]).nonzero()[:5, 0]).tolist()
        raise ModelError(f"teacher {members[i].name} output NaN or Inf (first bad rows {rows})",
                         "Check the teacher and its --scale/--mean/--std")


def merge_shards(parts: list[Path], out: Path, layout: Layout, n: int, meta: dict[str, str],
                 chunk_bytes: int = 64 << 20) -> None:
    """Concatenate row-range files (in row order) into one transfer-set file of ``n`` rows,
    laid out as ``layout``, at ``out``."""
    text = sum(read_safetensors(p)[0][TEXT_BYTES].numel() for p in parts) \
        if TEXT_SPANS in layout else 0
    with SafetensorsWriter(out, file_specs(layout, n, text), meta) as writer:
        start = cursor = 0  # rows and (of a text set) text bytes written so far
        for part in parts:
            tensors, _, mapped = read_safetensors(part)
            rows = row_count(tensors)
            if TEXT_SPANS in layout:  # the part's texts, and its spans moved past earlier ones
                text_bytes = tensors.pop(TEXT_BYTES)
                tensors[TEXT_SPANS] = tensors[TEXT_SPANS] + cursor
                for i in range(0, len(text_bytes), chunk_bytes):
                    writer.write(TEXT_BYTES, cursor + i, text_bytes[i:i + chunk_bytes])
                cursor += len(text_bytes)
            for name, t in tensors.items():
                col = layout[name]
                step = max(1, chunk_bytes // col.row_bytes)
                for i in range(0, rows, step):
                    chunk = t.narrow(col.row_dim, i, min(step, rows - i))
                    write_rows(writer, layout, n, start + i, {name: chunk})
                mapped.release()
            start += rows
