"""The transfer-set file layout: format names, the tensors of a file, shards and the index.

A transfer set is one ``.safetensors`` file, or a sharded set: files of a bounded size that
each hold a contiguous range of rows, plus an ``.index.json`` file naming them (spec:
docs/formats.md). A file's tensors are described by :class:`Column` records: each tensor
holds one row per example, or (an ensemble's ``member_logits``) one block of rows per
member. Which target tensors a file has is the business of its targets form
(:mod:`kdcli.transfer.targets`).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch

from kdcli.errors import FormatError
from kdcli.io.files import inside_folder
from kdcli.io.storage import DATA_SHA256, SafetensorsWriter

TRANSFER_FORMAT = "kdcli.transfer-set"
# 1: dense single files; 2 adds top-k targets and shards; 3 adds data_sha256 (required);
# 4 adds text sets (text_bytes and text_spans in place of inputs); 5 adds table columns
# (categories as codes, named in the categories metadata; missing numbers as NaN)
TRANSFER_FORMAT_VERSION = 5
#: The version kdcli writes: the lowest that holds the set.
TENSOR_VERSION, TEXT_VERSION, COLUMNS_VERSION = 3, 4, 5
#: A text set's tensors: every text's UTF-8 bytes, in row order, and each row's spans in it.
TEXT_BYTES, TEXT_SPANS = "text_bytes", "text_spans"
INDEX_FORMAT = "kdcli.transfer-set.index"
INDEX_FORMAT_VERSION = 1
SHARD_KEYS = ("shard_index", "shard_count", "shard_row_start", "shard_rows", DATA_SHA256)
INDEX_SUFFIX = ".index.json"


class Column(NamedTuple):
    """One tensor of a transfer-set file.

    Attributes:
        dtype: Its torch dtype.
        row_shape: The shape of one example's row.
        blocks: 0 for a ``[N, *row_shape]`` tensor; M for ``[M, N, *row_shape]``, M blocks
            of N rows (an ensemble's members), whose examples lie along dimension 1.
    """

    dtype: torch.dtype
    row_shape: tuple[int, ...]
    blocks: int = 0

    @property
    def row_dim(self) -> int:
        """The dimension that indexes examples."""
        return 1 if self.blocks else 0

    @property
    def row_elements(self) -> int:
        """Elements of one row of one block."""
        return math.prod(self.row_shape)

    @property
    def row_bytes(self) -> int:
        """Bytes one example takes in this tensor (over all its blocks)."""
        return self.row_elements * self.dtype.itemsize * max(self.blocks, 1)

    def shape(self, n: int) -> tuple[int, ...]:
        """The tensor's shape in a file of ``n`` rows."""
        return (self.blocks, n, *self.row_shape) if self.blocks else (n, *self.row_shape)


Layout = dict[str, Column]


def transfer_layout(inputs: Any, labels: bool, targets: Layout) -> Layout:
    """The row tensors of a transfer-set file: the inputs (shaped and typed as a batch of
    ``inputs``; for :class:`~kdcli.data.text.Texts`, their spans, whose bytes are the one
    tensor that is not rows, :data:`TEXT_BYTES`), the labels if any, then the ``targets``
    form's own tensors."""
    if isinstance(inputs, torch.Tensor):
        layout = {"inputs": Column(inputs.dtype, tuple(inputs.shape[1:]))}
    else:
        layout = {TEXT_SPANS: Column(torch.int64, (inputs.width, 2))}
    if labels:
        layout["labels"] = Column(torch.int64, ())
    return {**layout, **targets}


def file_specs(layout: Layout, n: int, text_bytes: int = 0,
               ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The tensors (name -> (dtype, shape)) of a file of ``n`` rows laid out as ``layout``
    (for a text set, whose texts take ``text_bytes`` bytes, :data:`TEXT_BYTES` first)."""
    specs = {TEXT_BYTES: (torch.uint8, (text_bytes,))} if TEXT_SPANS in layout else {}
    return {**specs, **{name: (col.dtype, col.shape(n)) for name, col in layout.items()}}


def rows_tensor(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor whose first dimension counts a file's examples: ``inputs``, or a text
    set's :data:`TEXT_SPANS`."""
    return tensors[TEXT_SPANS] if TEXT_SPANS in tensors else tensors["inputs"]


def row_count(tensors: dict[str, torch.Tensor]) -> int:
    """The examples of a file (-1 for a 0-d rows tensor, which validation refuses)."""
    t = rows_tensor(tensors)
    return int(t.shape[0]) if t.dim() else -1


def bytes_per_row(layout: Layout) -> int:
    """Bytes one example takes in a file laid out as ``layout``."""
    return sum(col.row_bytes for col in layout.values())


def write_rows(writer: SafetensorsWriter, layout: Layout, n: int, first: int,
               rows: dict[str, torch.Tensor]) -> None:
    """Write ``rows`` (name -> a batch of rows; ``[M, B, ...]`` for a column of M blocks)
    into a file of ``n`` rows, from row ``first`` on."""
    for name, t in rows.items():
        col = layout[name]
        for b in range(col.blocks):
            writer.write(name, (b * n + first) * col.row_elements, t[b])
        if not col.blocks:
            writer.write(name, first * col.row_elements, t)


def shard_paths(index_path: str | Path, count: int) -> list[Path]:
    """Shard file names of a sharded set: ``transfer.index.json`` ->
    ``transfer-00001-of-00003.safetensors``, ..."""
    p = Path(index_path)
    stem = p.name.removesuffix(INDEX_SUFFIX)
    return [p.with_name(f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors") for i in range(count)]


def is_index_path(path: str | Path) -> bool:
    """Whether ``path`` names a sharded set's index (by its suffix)."""
    return str(path).endswith(INDEX_SUFFIX)


def write_index(path: Path, meta: dict[str, str], shards: list[dict[str, Any]]) -> None:
    """Write the index of a sharded set (shard files are named relative to it)."""
    doc = {"format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION,
           "metadata": meta, "shards": shards}
    path.write_text(json.dumps(doc, indent=1) + "\n")


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
        raise FormatError(f"{where} is named {clip(repr(name))}, not a file name in the "
                          "index's folder", "Regenerate the set (kdcli writes plain names)")
    f = index.parent / name
    real = inside_folder(index.parent, name)  # reads links; touches nothing outside
    if real is None or real.parent != Path(os.path.realpath(index.parent)):
        raise FormatError(f"{where}, {name}, is a link that leads out of the index's folder",
                          "Copy the shard files next to the index")
    return f


def clip(v: Any, n: int = 60) -> str:
    """``str(v)``, cut to ``n`` characters (for values quoted from a file in a message)."""
    s = str(v)
    return s if len(s) <= n else s[:n - 1] + "…"
