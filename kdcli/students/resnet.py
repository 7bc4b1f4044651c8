"""The ResNet family: a CIFAR-style ResNet (He et al. 2016, section 4.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from kdcli.errors import UsageError
from kdcli.students.common import check_dropout, check_width_multiplier, image_shape
from kdcli.students.layers import BasicBlock, ByteDropout


@dataclass
class ResNetConfig:
    """A ResNet (``resnet:20,0.5``).

    Attributes:
        depth: 6n+2 (8, 14, 20, ...).
        width: Width multiplier (1.0 = 16/32/64 channels in the three stages).
        dropout: Dropout probability before the output layer.
    """

    USAGE: ClassVar[str] = "resnet:DEPTH[,WIDTH] (e.g. resnet:8 or resnet:20,0.5)"
    OTHERS: ClassVar[tuple[str, str]] = (
        "a ResNet takes no hidden widths, --input-dropout or --max-norm",
        "Drop them, or use an MLP")

    depth: int = 0
    width: float = 1.0
    dropout: float = 0.0

    @staticmethod
    def parse(rest: str) -> dict[str, Any]:
        """The fields of the spec after ``resnet:`` (ValueError when unreadable)."""
        depth, _, width = rest.partition(",")
        return {"depth": int(depth), "width": float(width) if width.strip() else 1.0}

    def spec(self) -> str:
        return f"{self.depth}" + (f",{self.width:g}" if self.width != 1.0 else "")

    def check(self) -> None:
        check_dropout("dropout", self.dropout)
        d = self.depth
        if isinstance(d, bool) or not isinstance(d, int) or d < 8 or (d - 2) % 6 or d > 1000:
            raise UsageError(f"ResNet depth must be 6n+2 and at least 8, got {self.depth}",
                             "Use resnet:8, resnet:14 or resnet:20")
        check_width_multiplier(self.width, "resnet", "ResNet", 16, "8,0.5")

    def build(self, raw: list[int], num_classes: int) -> tuple[nn.Module, list[int]]:
        """A 3x3 stem, three stages of ``n = (depth - 2) / 6`` basic blocks at 16, 32 and 64
        channels (times the width), the last two starting with stride 2, then global average
        pooling and one Linear layer; for images of ``raw`` shape (at least 8x8)."""
        in_shape = image_shape(raw, "a ResNet", 8)
        widths = [max(1, round(c * self.width)) for c in (16, 32, 64)]
        blocks = (self.depth - 2) // 6
        layers: list[nn.Module] = [nn.Conv2d(in_shape[0], widths[0], 3, padding=1, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU()]
        c_in = widths[0]
        for stage, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(c_in, w, 2 if stage and not b else 1))
                c_in = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if self.dropout:
            layers.append(ByteDropout(self.dropout))
        layers.append(nn.Linear(c_in, num_classes))
        return nn.Sequential(*layers), in_shape
