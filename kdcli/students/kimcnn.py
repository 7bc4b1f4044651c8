"""The Kim CNN family (``kimcnn:F[,E]``): Kim's (2014) convolutional sentence classifier.

Word ids ``[B, L]`` (0 is padding; see :mod:`kdcli.students.words`) are embedded (width E,
default 128) and convolved with F filters of each width 3, 4 and 5 (ReLU); each filter's
largest output over the text is kept, and the 3F features go through dropout to a linear
layer. The convolution is wide: a text is read as if padded with ``width - 1`` zero
embeddings on both sides, so a text shorter than a filter still has windows, and only
windows that touch one of its words count. A text therefore gets the same logits alone or
in any padded batch. Exports as ONNX ``Conv`` operators with a dynamic number of words.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from kdcli.students.common import WordWidthsConfig

#: The filter widths (Kim's).
WIDTHS = (3, 4, 5)


class KimCNN(nn.Module):
    """Embedding, wide 1-d convolutions of several widths, max over positions, a linear head.

    Args:
        vocab_size: Words in the vocabulary (ids 0 = padding .. vocab_size - 1).
        filters: Filters of each width.
        dim: Embedding width.
        num_classes: Output size.
        dropout: Dropout on the pooled features.
    """

    def __init__(self, vocab_size: int, filters: int, dim: int, num_classes: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.convs = nn.ModuleList(nn.Conv1d(dim, filters, w, padding=w - 1) for w in WIDTHS)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.head = nn.Linear(filters * len(WIDTHS), num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` of word ids ``[B, L]`` (int64, right-padded with 0)."""
        n = (ids != 0).sum(1, keepdim=True)  # [B, 1] words of each text
        x = self.embed(ids).transpose(1, 2)  # [B, E, L]; padding embeds to zeros
        pooled = []
        for w, conv in zip(WIDTHS, self.convs, strict=True):
            h = torch.relu(conv(x))  # [B, F, L + w - 1]: output p reads words p-w+1 .. p
            pos = torch.arange(h.shape[-1], device=ids.device).unsqueeze(0)
            touches = (pos <= n + (w - 2)) & (n > 0)  # [B, L + w - 1]
            # ReLU outputs are >= 0, so zeroing the other windows leaves each maximum as
            # it is; a text without words pools to zeros
            pooled.append((h * touches.unsqueeze(1).to(h.dtype)).amax(-1))
        return self.head(self.dropout(torch.cat(pooled, -1)))


@dataclass
class KimCnnConfig(WordWidthsConfig):
    """A Kim CNN text classifier (``kimcnn:100`` or ``kimcnn:100,300``).

    Attributes:
        hidden: ``[F]`` or ``[F, E]``: filters of each width (3, 4 and 5), and the embedding
            width (default :data:`~kdcli.students.common.DEFAULT_EMBEDDING`).
        dropout: Dropout probability on the pooled features (Kim used 0.5).
    """

    USAGE: ClassVar[str] = ("kimcnn:F[,E] (e.g. kimcnn:100: F filters of each width 3, 4 and "
                            "5; E: embedding width, default 128)")
    OTHERS: ClassVar[tuple[str, str]] = ("a Kim CNN takes its filter count, embedding width "
                                         "and dropout only", "Use e.g. kimcnn:100")
    TRAIN_DEFAULTS: ClassVar[dict[str, Any]] = {"optimizer": "adam", "lr": 0.001}
    TITLE: ClassVar[str] = "Kim CNN"
    NAME: ClassVar[str] = "kimcnn"
    NETWORK: ClassVar[Any] = KimCNN

    hidden: list[int] = field(default_factory=lambda: [100])
