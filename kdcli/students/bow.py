"""The bag-of-words family (``bow:DIM[,N]``): a fastText-style text classifier.

Word ids ``[B, L]`` (0 is padding; see :mod:`kdcli.students.words`) are embedded, and so
are their word n-grams up to order N (default 2), hashed into as many buckets as the
vocabulary has words; the mean of all those embeddings goes through dropout to a linear
head (Joulin et al. 2016, "Bag of Tricks for Efficient Text Classification"). The baseline
that is hard to beat on short texts, and the fastest student. Every step is a standard ONNX
operator (Gather, Mul, Add, Mod, ReduceSum), so the exported graph runs anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from kdcli.checks import check_width
from kdcli.errors import UsageError
from kdcli.students.common import check_dropout

#: The multiplier of the n-gram hash (a prime): ``h = (h * P + id) mod buckets``.
HASH_PRIME = 1_000_003
#: The largest n-gram order.
MAX_ORDER = 3


class BagOfWords(nn.Module):
    """Mean of word and hashed word n-gram embeddings, dropout, linear head.

    Args:
        vocab_size: Words in the vocabulary (ids 0 = padding .. vocab_size - 1).
        dim: Embedding width.
        order: Largest n-gram order (1: words only).
        num_classes: Output size.
        dropout: Dropout on the mean embedding.
    """

    def __init__(self, vocab_size: int, dim: int, order: int, num_classes: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.order, self.buckets = order, max(1, vocab_size)
        self.words = nn.Embedding(vocab_size, dim, padding_idx=0)
        # one table for all n-grams of order 2..N; index 0 (no n-gram) is a zero vector
        self.ngrams = nn.Embedding(self.buckets + 1, dim, padding_idx=0) if order > 1 else None
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        nn.init.normal_(self.words.weight, std=0.1)
        with torch.no_grad():
            self.words.weight[0].zero_()
            if self.ngrams is not None:
                nn.init.normal_(self.ngrams.weight, std=0.1)
                self.ngrams.weight[0].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` of word ids ``[B, L]`` (int64, 0 = padding)."""
        ids = nn.functional.pad(ids, (0, self.order - 1))  # every n-gram slice exists
        valid = ids != 0
        total = self.words(ids).sum(1)
        count = valid.sum(1)
        h, ok = ids, valid
        for n in range(2, self.order + 1 if self.ngrams is not None else 2):
            h = h[:, :-1] * HASH_PRIME + ids[:, n - 1:]
            ok = ok[:, :-1] & valid[:, n - 1:]
            h = torch.remainder(h + n, self.buckets)  # the order is part of the hash
            index = torch.where(ok, h + 1, torch.zeros_like(h))
            total = total + self.ngrams(index).sum(1)
            count = count + ok.sum(1)
        mean = total / count.clamp(min=1).unsqueeze(1).to(total.dtype)
        return self.head(self.dropout(mean))


@dataclass
class BowConfig:
    """A bag-of-words text classifier (``bow:64`` or ``bow:64,2``).

    Attributes:
        hidden: ``[DIM]``, the embedding width.
        depth: N, the largest word n-gram order (1 to :data:`MAX_ORDER`; 0 means 2).
        dropout: Dropout probability on the mean embedding.
    """

    USAGE: ClassVar[str] = "bow:DIM[,N] (e.g. bow:64; N: word n-grams up to N, default 2)"
    OTHERS: ClassVar[tuple[str, str]] = ("a bag of words takes an embedding width, an n-gram "
                                         "order and dropout only", "Use e.g. bow:64,2")
    TEXT: ClassVar[bool] = True  # takes word ids of a text, see kdcli.students.words
    # Embeddings learn far too slowly under SGD at the image students' lr (0.05): a bow:64
    # student of Rotten Tomatoes stayed at the majority class (55.5%), 73.2% with Adam.
    TRAIN_DEFAULTS: ClassVar[dict[str, Any]] = {"optimizer": "adam", "lr": 0.005}

    hidden: list[int] = field(default_factory=lambda: [64])
    depth: int = 0
    dropout: float = 0.0

    @staticmethod
    def parse(rest: str) -> dict[str, Any]:
        """The fields of the spec after ``bow:`` (ValueError when unreadable)."""
        parts = [p.strip() for p in rest.split(",")] if rest.strip() else []
        if not 1 <= len(parts) <= 2:
            raise ValueError(rest)
        return {"hidden": [int(parts[0])], "depth": int(parts[1]) if len(parts) > 1 else 0}

    @property
    def order(self) -> int:
        return self.depth or 2

    def spec(self) -> str:
        return f"{self.hidden[0]},{self.order}" if self.depth else str(self.hidden[0])

    def check(self) -> None:
        if not (isinstance(self.hidden, list) and len(self.hidden) == 1):
            raise UsageError(f"a bag of words has one embedding width, got {self.hidden!r}",
                             "Use e.g. bow:64")
        check_width(self.hidden[0])
        if not (isinstance(self.depth, int) and 0 <= self.depth <= MAX_ORDER):
            raise UsageError(f"the n-gram order of bow must be 1 to {MAX_ORDER}, got "
                             f"{self.depth}", "Use e.g. bow:64,2")
        check_dropout("dropout", self.dropout)

    def build(self, raw: list[int], num_classes: int, vocab_size: int = 2,
              ) -> tuple[nn.Module, list[int]]:
        """The network for word ids ``[B, L]`` (``raw`` is ``[max_len]``)."""
        return BagOfWords(vocab_size, self.hidden[0], self.order, num_classes,
                          self.dropout), list(raw)
