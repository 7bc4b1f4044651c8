"""The CNN family: ``Conv ReLU MaxPool Conv ReLU MaxPool Flatten Linear ReLU [Dropout]
Linear``, at 32/64 channels and 128 dense units times the width multiplier."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from kdcli.students.common import check_dropout, check_max_norm, check_width_multiplier, image_shape
from kdcli.students.layers import ByteDropout


@dataclass
class CnnConfig:
    """A CNN (``cnn:0.5``).

    Attributes:
        width: Width multiplier (1.0 = 32/64 channels and a 128-unit dense layer).
        dropout: Dropout probability before the output layer.
        input_dropout: Accepted and recorded as for an MLP, but a CNN has no input dropout
            layer (it only turns the default of ``--normalize`` off, as for an MLP).
        max_norm: Max L2 norm of each unit's incoming weights in the dense layers but the
            output layer (None: unconstrained).
    """

    USAGE: ClassVar[str] = "cnn:WIDTH (e.g. cnn:0.5)"
    OTHERS: ClassVar[tuple[str, str]] = ("a CNN takes no hidden widths or depth",
                                         "Give the width multiplier, e.g. cnn:0.5")
    BARE_STATE_DICT: ClassVar[bool] = True  # a bare state dict loads with --arch cnn:...

    width: float = 1.0
    dropout: float = 0.0
    input_dropout: float = 0.0
    max_norm: float | None = None

    @staticmethod
    def parse(rest: str) -> dict[str, Any]:
        """The fields of the spec after ``cnn:`` (ValueError when unreadable)."""
        return {"width": float(rest or 1.0)}

    def spec(self) -> str:
        return f"{self.width:g}"

    def check(self) -> None:
        check_dropout("dropout", self.dropout)
        check_dropout("input_dropout", self.input_dropout)
        check_max_norm(self.max_norm)
        check_width_multiplier(self.width, "cnn", "CNN", 32, "0.5")

    def build(self, raw: list[int], num_classes: int) -> tuple[nn.Module, list[int]]:
        """The network for images of ``raw`` shape (``[H, W]`` or ``[C, H, W]``, at least
        4x4), and the ``[C, H, W]`` shape it takes."""
        in_shape = image_shape(raw, "the CNN", 4)
        c1, c2, fc = (max(1, round(c * self.width)) for c in (32, 64, 128))
        h, w = in_shape[1] // 4, in_shape[2] // 4
        layers: list[nn.Module] = [
            nn.Conv2d(in_shape[0], c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(c2 * h * w, fc), nn.ReLU(),
        ]
        if self.dropout:
            layers.append(ByteDropout(self.dropout))
        layers.append(nn.Linear(fc, num_classes))
        return nn.Sequential(*layers), in_shape
