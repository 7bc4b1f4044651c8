"""Augmentation of texts for a transfer set (Tang et al. 2019, "Distilling Task-Specific
Knowledge from BERT into Simple Neural Networks", section 3).

``kdcli soft-targets --copies N`` on text data writes N perturbed copies of each text, each
labelled by the teachers. A text's words are its runs of non-space characters (punctuation
stays with its word); each copy of a text is made by, in order:

* masking (``--word-mask P``): each word becomes :data:`MASK` (``[UNK]``, the unknown
  token of BERT-family tokenizers, and an unknown word to the others) with probability P;
* replacement (``--word-replace P``): each word that was not masked becomes, with
  probability P, a word drawn from all the words of the data in proportion to their counts
  (the paper draws a word of the same part of speech; kdcli has no tagger, so the draw
  follows the data's word frequencies instead);
* n-gram sampling (``--ngram-sample P``): with probability P, only a random window of 1 to
  5 consecutive words is kept.

The words are joined by single spaces. The draws of copy ``c`` of text ``i`` come from a
generator seeded by ``(seed, c, i)`` alone, so any range of rows is the same however it is
batched and whichever process makes it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kdcli.errors import UsageError

#: What a masked word becomes.
MASK = "[UNK]"
#: The longest window n-gram sampling keeps.
MAX_WINDOW = 5


@dataclass(frozen=True)
class TextAugment:
    """The rates of Tang et al.'s three rules (the paper: 0.1, 0.1 and 0.25).

    Attributes:
        mask: Probability that a word is masked.
        replace: Probability that a word (not masked) is replaced.
        ngram: Probability that a copy keeps only a window of 1 to 5 words.
    """

    mask: float = 0.0
    replace: float = 0.0
    ngram: float = 0.0

    def check(self) -> None:
        """Raise UsageError for a rate outside [0, 1]."""
        for name, flag in (("mask", "--word-mask"), ("replace", "--word-replace"),
                           ("ngram", "--ngram-sample")):
            p = getattr(self, name)
            if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
                raise UsageError(f"{flag} must be a probability in [0, 1], got {p}",
                                 f"Try {flag} {0.25 if name == 'ngram' else 0.1}")

    @property
    def active(self) -> bool:
        """Whether any rule changes a text."""
        return bool(self.mask or self.replace or self.ngram)

    def settings(self) -> dict[str, Any]:
        """The rates, for file metadata."""
        return asdict(self)

    def describe(self) -> str:
        """``mask 0.1, replace 0.1, n-gram 0.25`` (the rules in use)."""
        parts = [f"{name} {p:g}" for name, p in (("mask", self.mask), ("replace", self.replace),
                                                 ("n-gram", self.ngram)) if p]
        return ", ".join(parts) or "none"


class WordPool:
    """The words of a corpus and their counts, to draw replacements from."""

    def __init__(self, texts: list[str]) -> None:
        counts = Counter(w for t in texts for w in t.split())
        self.words = sorted(counts)  # a fixed order: the same pool on every machine
        weights = np.array([counts[w] for w in self.words], dtype=np.float64)
        self.cdf = np.cumsum(weights / weights.sum()) if len(weights) else weights

    def draw(self, rng: np.random.Generator, n: int) -> list[str]:
        """``n`` words drawn in proportion to their counts."""
        if not self.words:
            return [MASK] * n
        idx = np.searchsorted(self.cdf, rng.random(n), side="right")
        return [self.words[min(int(i), len(self.words) - 1)] for i in idx]


def augment(text: str, aug: TextAugment, pool: WordPool, seed: int, copy: int,
            row: int) -> str:
    """Copy ``copy`` (1, 2, ...) of the text of row ``row``, by the module's rules."""
    rng = np.random.default_rng([seed, copy, row])
    words = text.split()
    n = len(words)
    if n == 0:
        return text
    u = rng.random((2, n))
    masked = u[0] < aug.mask
    replaced = (u[1] < aug.replace) & ~masked
    if replaced.any():
        new = iter(pool.draw(rng, int(replaced.sum())))
        words = [next(new) if r else w for w, r in zip(words, replaced, strict=True)]
    words = [MASK if m else w for w, m in zip(words, masked, strict=True)]
    if rng.random() < aug.ngram:
        size = int(rng.integers(1, MAX_WINDOW + 1))
        if size < n:
            start = int(rng.integers(0, n - size + 1))
            words = words[start:start + size]
    return " ".join(words)
