"""Texts as examples: one UTF-8 byte buffer and the byte spans of each example's texts.

An example of text data is one text, or a pair of texts (premise and hypothesis, two
sentences to compare): P = 1 or 2 texts per example. N examples are held as a 1-D uint8
``buffer`` and ``spans``, int64 ``[N, P, 2]``: text ``p`` of example ``i`` is
``buffer[spans[i, p, 0]:spans[i, p, 1]]``, decoded as UTF-8. A transfer set stores texts in
exactly this form (docs/formats.md), so a batch is written as two tensors, and a few bytes
per example are all the memory texts need beyond their own length.

The rules every text source follows (:func:`from_columns`):

* Text is UTF-8; a text that is not is refused with its row (or file).
* A missing text (a null cell) is refused with its rows; an empty text is kept (a teacher
  labels it too) and counted in a note.
* A text longer than :data:`MAX_TEXT_BYTES` is refused with its row: no teacher reads that
  far, and teachers truncate at their own maximum length anyway (counted and reported).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from kdcli.errors import DataError

#: The longest text kdcli reads: 1 MiB of UTF-8, far more than any text classifier reads
#: (BERT's 512 tokens are a few KiB).
MAX_TEXT_BYTES = 1 << 20
#: The examples shown in an error that names rows.
_SHOWN = 3


class Texts:
    """N examples of one text or a pair of texts each, as a UTF-8 buffer and byte spans.

    Indexing with a slice, an index tensor or a list gives the same texts in another order
    (sharing the buffer); :meth:`strings` decodes them; :meth:`compact` packs them for
    writing.

    Attributes:
        buffer: ``[bytes]`` uint8, the texts' UTF-8 bytes.
        spans: ``[N, P, 2]`` int64, each text's start and end in ``buffer``.
        columns: The names of the P texts of an example (a table's text columns), or None.
    """

    def __init__(self, buffer: torch.Tensor, spans: torch.Tensor,
                 columns: Sequence[str] | None = None) -> None:
        if buffer.dtype != torch.uint8 or buffer.dim() != 1:
            raise ValueError("the buffer of Texts is a 1-D uint8 tensor")
        if spans.dtype != torch.int64 or spans.dim() != 3 or spans.shape[2] != 2 \
                or spans.shape[1] not in (1, 2):
            raise ValueError("the spans of Texts are an int64 [N, P, 2] tensor, P = 1 or 2")
        self.buffer, self.spans = buffer, spans
        self.columns = list(columns) if columns is not None else None

    @classmethod
    def from_strings(cls, texts: Sequence[str] | Sequence[tuple[str, str]],
                     columns: Sequence[str] | None = None) -> Texts:
        """Texts of a list of strings, or of ``(text, text)`` pairs.

        Raises:
            DataError: a text that cannot be encoded as UTF-8 (a lone surrogate).
        """
        pairs = len(texts) > 0 and not isinstance(texts[0], str)
        cols = [[t[0] for t in texts], [t[1] for t in texts]] if pairs else [list(texts)]
        return from_columns(cols, "the texts", names=columns)

    def __len__(self) -> int:
        return int(self.spans.shape[0])

    def __repr__(self) -> str:
        return f"Texts(N={len(self)}, P={self.width}, bytes={self.nbytes:,})"

    @property
    def width(self) -> int:
        """P: 1 for single texts, 2 for pairs."""
        return int(self.spans.shape[1])

    @property
    def pairs(self) -> bool:
        """Whether every example is a pair of texts."""
        return self.width == 2

    @property
    def shape(self) -> torch.Size:
        """``[N]``: one example per row (an example has no tensor shape of its own)."""
        return torch.Size([len(self)])

    def __getitem__(self, key: slice | torch.Tensor | Sequence[int]) -> Texts:
        if isinstance(key, int):
            raise TypeError("index Texts with a slice or a list of rows, not one int")
        if not isinstance(key, (slice, torch.Tensor)):
            key = torch.as_tensor(list(key), dtype=torch.long)
        return Texts(self.buffer, self.spans[key], self.columns)

    @staticmethod
    def cat(parts: list[Texts]) -> Texts:
        """The examples of ``parts``, in order (one buffer; the spans moved along it)."""
        spans, offset = [], 0
        for t in parts:
            spans.append(t.spans + offset)
            offset += len(t.buffer)
        return Texts(torch.cat([t.buffer for t in parts]), torch.cat(spans), parts[0].columns)

    def lengths(self) -> torch.Tensor:
        """``[N]`` int64: each example's bytes, over its texts."""
        return (self.spans[..., 1] - self.spans[..., 0]).sum(-1)

    @property
    def nbytes(self) -> int:
        """The UTF-8 bytes of all the examples' texts."""
        return int(self.lengths().sum())

    def strings(self) -> list[str] | list[tuple[str, str]]:
        """The texts as Python strings: one per example, or a ``(text, text)`` pair."""
        raw = self.buffer.numpy().tobytes() if len(self.buffer) else b""
        flat = [raw[a:b].decode("utf-8") for a, b in self.spans.reshape(-1, 2).tolist()]
        if self.width == 1:
            return flat
        return list(zip(flat[0::2], flat[1::2], strict=True))

    def compact(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The texts packed in example order: a buffer holding exactly their bytes, and
        spans into it that tile it (each text starts where the one before ends)."""
        flat = self.spans.reshape(-1, 2)
        lengths = flat[:, 1] - flat[:, 0]
        ends = lengths.cumsum(0)
        spans = torch.stack([ends - lengths, ends], 1).reshape(self.spans.shape)
        if len(flat) and bool((flat[1:, 0] == flat[:-1, 1]).all()):  # already one run
            a, b = int(flat[0, 0]), int(flat[-1, 1])
            return self.buffer[a:b], spans
        buf = self.buffer.numpy()
        pieces = [buf[a:b] for a, b in flat.tolist()]
        packed = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
        return torch.from_numpy(packed), spans


def from_columns(columns: Sequence[Sequence[str | None]], where: str, *,
                 names: Sequence[str] | None = None,
                 say_rows: Callable[[list[int]], str] | None = None,
                 notes: list[str] | None = None) -> Texts:
    """Texts of P columns of N strings each, checked by the module's rules.

    Args:
        columns: P (1 or 2) sequences of N texts; None is a missing text.
        where: The source, named in errors (``reviews.csv``).
        names: The columns' names, named in errors and kept (:attr:`Texts.columns`); None
            for a source without columns.
        say_rows: How errors name rows (0-based) to the user: ``row 3 (line 4)``, a file
            name (default: ``row 3``, ``rows 3, 8, 9, ... (12 in all)``, 1-based).
        notes: Where the note about empty texts is added.

    Raises:
        DataError: a missing text, a text that is not valid UTF-8 or longer than
            :data:`MAX_TEXT_BYTES`, naming its column and rows.
    """
    say = say_rows or (lambda rows: _rows(rows, "row"))
    n = len(columns[0])
    encoded: list[list[bytes]] = []
    for p, col in enumerate(columns):
        label = f"column {names[p]!r} of {where}" if names else where
        missing = [i for i, t in enumerate(col) if t is None]
        if missing:
            raise DataError(f"{label} has no text in {say(missing)}",
                            "Fill in or drop the rows without text")
        out = []
        for i, t in enumerate(col):
            try:
                out.append(t.encode("utf-8"))
            except UnicodeEncodeError as e:
                raise DataError(f"{label} holds a text that is not valid Unicode in "
                                f"{say([i])} ({e.reason})", "Fix the text's encoding") from e
        long = [i for i, b in enumerate(out) if len(b) > MAX_TEXT_BYTES]
        if long:
            raise DataError(f"{label} holds a text of {len(out[long[0]]):,} bytes in "
                            f"{say(long)}, more than the {MAX_TEXT_BYTES >> 20} MiB "
                            "kdcli reads as one text", "Split long documents into passages "
                            "(text classifiers read a few hundred words)")
        empty = sum(1 for b in out if not b.strip())
        if empty and notes is not None:
            notes.append(f"{label}: {empty} of {n} texts are empty or blank (kept: teachers "
                         "label them too)")
        encoded.append(out)
    flat = [b for row in zip(*encoded, strict=True) for b in row]
    lengths = torch.tensor([len(b) for b in flat], dtype=torch.int64)
    ends = lengths.cumsum(0)
    spans = torch.stack([ends - lengths, ends], 1).reshape(n, len(columns), 2)
    buffer = np.frombuffer(b"".join(flat), dtype=np.uint8)
    return Texts(torch.from_numpy(buffer.copy()) if len(buffer) else
                 torch.zeros(0, dtype=torch.uint8), spans, names)


def _rows(rows: list[int], what: str) -> str:
    """``row 3`` or ``rows 3, 8, 9, ... (12 in all)``, 1-based."""
    if len(rows) == 1:
        return f"{what} {rows[0] + 1}"
    shown = ", ".join(str(i + 1) for i in rows[:_SHOWN])
    return f"{what}s {shown}" + (f", ... ({len(rows)} in all)" if len(rows) > _SHOWN else "")
