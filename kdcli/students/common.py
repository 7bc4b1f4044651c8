"""Checks and shapes that several model families share: dropout, max-norm, width
multipliers, image inputs, and the configuration of a word family of one or two widths."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kdcli.checks import MAX_CNN_WIDTH, check_width
from kdcli.errors import UsageError


def check_dropout(name: str, p: object) -> None:
    """A dropout probability (field ``name``, e.g. ``input_dropout``) in ``[0, 1)``."""
    if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
        raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1), got {p}",
                         "Pass a probability such as 0.5")


def check_max_norm(max_norm: object) -> None:
    """A max-norm bound: None (unconstrained) or a positive finite number."""
    if max_norm is not None and not (isinstance(max_norm, (int, float)) and
                                     0 < max_norm < math.inf):
        raise UsageError(f"--max-norm must be positive, got {max_norm}",
                         "Pass e.g. --max-norm 3.5")


def check_width_multiplier(width: object, family: str, title: str, base: int,
                           example: str) -> None:
    """A channel width multiplier from ``1/base`` (one channel in the narrowest layer,
    which has ``base`` channels at 1.0) to :data:`~kdcli.checks.MAX_CNN_WIDTH`."""
    if isinstance(width, bool) or not (isinstance(width, (int, float)) and
                                       1 / base <= width <= MAX_CNN_WIDTH):
        raise UsageError(f"the {title} width multiplier must be from 1/{base} (one channel) "
                         f"to {MAX_CNN_WIDTH:g}, got {width}", f"Use e.g. {family}:{example}")


#: A word family's embedding width when its spec gives none.
DEFAULT_EMBEDDING = 128


@dataclass
class WordWidthsConfig:
    """The configuration shared by word families sized ``NAME:W[,E]``: W (the family's own
    width) and the embedding width E (default :data:`DEFAULT_EMBEDDING`). A family
    subclasses it with its ``USAGE``, ``OTHERS``, ``TRAIN_DEFAULTS``, ``TITLE`` (how
    errors name it), ``NAME``, default ``hidden`` and ``NETWORK``, called as
    ``NETWORK(vocab_size, W, E, num_classes, dropout)``.

    Attributes:
        hidden: ``[W]`` or ``[W, E]``.
        dropout: Dropout probability (where the family puts it).
    """

    TEXT: ClassVar[bool] = True  # takes word ids of a text, see kdcli.students.words
    TITLE: ClassVar[str]
    NAME: ClassVar[str]
    NETWORK: ClassVar[Any]

    hidden: list[int] = field(default_factory=lambda: [100])
    dropout: float = 0.0

    @staticmethod
    def parse(rest: str) -> dict[str, Any]:
        """The fields of the spec after ``NAME:`` (ValueError when unreadable)."""
        parts = [int(p) for p in rest.split(",")] if rest.strip() else []
        if not 1 <= len(parts) <= 2:
            raise ValueError(rest)
        return {"hidden": parts}

    def spec(self) -> str:
        return ",".join(map(str, self.hidden))

    def check(self) -> None:
        if not (isinstance(self.hidden, list) and 1 <= len(self.hidden) <= 2):
            raise UsageError(f"a {self.TITLE} takes one or two widths, got {self.hidden!r}",
                             f"Use e.g. {self.NAME}:{self.hidden_default()} or "
                             f"{self.NAME}:{self.hidden_default()},300")
        for width in self.hidden:
            check_width(width)
        check_dropout("dropout", self.dropout)

    @classmethod
    def hidden_default(cls) -> int:
        """The family's default W."""
        return cls.__dataclass_fields__["hidden"].default_factory()[0]

    def build(self, raw: list[int], num_classes: int, vocab_size: int = 2) -> tuple[Any, list[int]]:
        """The network for word ids ``[B, L]`` (``raw`` is ``[max_len]``)."""
        dim = self.hidden[1] if len(self.hidden) > 1 else DEFAULT_EMBEDDING
        return self.NETWORK(vocab_size, self.hidden[0], dim, num_classes, self.dropout), \
            list(raw)


def image_shape(raw: list[int], what: str, smallest: int) -> list[int]:
    """``[C, H, W]`` for examples of shape ``[H, W]`` (grayscale) or ``[C, H, W]``."""
    if len(raw) == 2:
        shape = [1, *raw]
    elif len(raw) == 3:
        shape = list(raw)
    else:
        raise UsageError(f"{what} needs image inputs, but examples have shape {raw}",
                         "Use an MLP (--arch mlp:...) for non-image data")
    if shape[1] < smallest or shape[2] < smallest:
        raise UsageError(f"images of shape {raw} are too small for {what}",
                         f"Use images of at least {smallest}x{smallest} pixels or an MLP")
    return shape
