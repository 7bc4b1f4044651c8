"""The MLP family: ``[Dropout(input_dropout)] (Linear ReLU [Dropout])* Linear``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from kdcli.checks import check_width
from kdcli.errors import UsageError
from kdcli.students.common import check_dropout, check_max_norm
from kdcli.students.layers import ByteDropout


@dataclass
class MlpConfig:
    """An MLP (``mlp:1200,1200``).

    Attributes:
        hidden: Hidden widths, e.g. ``[1200, 1200]`` (none: a linear model).
        dropout: Dropout probability on hidden units.
        input_dropout: Dropout probability on the inputs.
        max_norm: Max L2 norm of each hidden unit's incoming weights (None: unconstrained).
    """

    USAGE: ClassVar[str] = "mlp:WIDTH,WIDTH,... (e.g. mlp:1200,1200)"
    OTHERS: ClassVar[tuple[str, str]] = ("an MLP takes no width multiplier or depth",
                                         "Give the widths, e.g. mlp:300,300")
    FLAT_INPUT: ClassVar[bool] = True  # takes flattened examples
    BARE_STATE_DICT: ClassVar[bool] = True  # a bare state dict loads with --arch mlp:...

    hidden: list[int] = field(default_factory=list)
    dropout: float = 0.0
    input_dropout: float = 0.0
    max_norm: float | None = None

    @staticmethod
    def parse(rest: str) -> dict[str, Any]:
        """The fields of the spec after ``mlp:`` (ValueError when unreadable)."""
        # "mlp:" has no hidden layer (a linear model); an empty width ("1,,2") does not parse
        return {"hidden": [int(h) for h in rest.split(",")] if rest.strip() else []}

    def spec(self) -> str:
        return ",".join(map(str, self.hidden))

    def check(self) -> None:
        if not isinstance(self.hidden, list):
            raise UsageError(f"hidden widths must be a list, got {self.hidden!r}",
                             "Use mlp:WIDTH,WIDTH")
        check_dropout("dropout", self.dropout)
        check_dropout("input_dropout", self.input_dropout)
        check_max_norm(self.max_norm)
        for h in self.hidden:
            check_width(h)

    def build(self, raw: list[int], num_classes: int) -> tuple[nn.Module, list[int]]:
        """The network for flattened examples of ``raw`` shape, and the shape it takes."""
        n_in = math.prod(raw) if raw else 1
        in_shape = [n_in]
        layers: list[nn.Module] = [ByteDropout(self.input_dropout)] if self.input_dropout else []
        for h in self.hidden:
            layers += [nn.Linear(n_in, h), nn.ReLU()]
            if self.dropout:
                layers.append(ByteDropout(self.dropout))
            n_in = h
        layers.append(nn.Linear(n_in, num_classes))
        return nn.Sequential(*layers), in_shape
