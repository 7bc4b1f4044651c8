"""The BiLSTM family (``bilstm:H[,E]``): Tang et al.'s (2019) student for distilling BERT.

Word ids ``[B, L]`` (0 is padding; see :mod:`kdcli.students.words`) are embedded (width E,
default 128), read by one bidirectional LSTM layer (H units each way), max-pooled over the
words, and classified by a small MLP (``2H -> H -> C``, ReLU, dropout). The backward
direction reads each text's own words reversed, so padding never reaches a word's state:
a text gets the same logits alone or in any padded batch. Both directions export as ONNX
``LSTM`` operators with a dynamic number of words.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from kdcli.students.common import WordWidthsConfig


class BiLSTM(nn.Module):
    """Embedding, a bidirectional LSTM layer, max-pooling over words, an MLP head.

    Args:
        vocab_size: Words in the vocabulary (ids 0 = padding .. vocab_size - 1).
        hidden: LSTM units in each direction.
        dim: Embedding width.
        num_classes: Output size.
        dropout: Dropout on the pooled features and the head's hidden layer.
    """

    def __init__(self, vocab_size: int, hidden: int, dim: int, num_classes: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.forward_lstm = nn.LSTM(dim, hidden, batch_first=True)
        self.backward_lstm = nn.LSTM(dim, hidden, batch_first=True)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * hidden, hidden), nn.ReLU(),
                                  nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` of word ids ``[B, L]`` (int64, right-padded with 0)."""
        valid = ids != 0
        n = valid.sum(1, keepdim=True)
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        rev = torch.where(pos < n, n - 1 - pos, pos)  # each text's words reversed, pads kept
        x = self.embed(ids)
        ahead, _ = self.forward_lstm(x)
        back, _ = self.backward_lstm(x.gather(1, rev.unsqueeze(-1).expand_as(x)))
        back = back.gather(1, rev.unsqueeze(-1).expand(-1, -1, back.shape[-1]))
        states = torch.cat([ahead, back], -1)
        # max over a text's words; a text without words pools to zeros
        pooled = states.masked_fill(~valid.unsqueeze(-1), float("-inf")).max(1).values
        pooled = torch.where(n > 0, pooled, torch.zeros_like(pooled))
        return self.head(pooled)


@dataclass
class BiLstmConfig(WordWidthsConfig):
    """A BiLSTM text classifier (``bilstm:150`` or ``bilstm:150,300``).

    Attributes:
        hidden: ``[H]`` or ``[H, E]``: LSTM units per direction, and the embedding width (default
            :data:`~kdcli.students.common.DEFAULT_EMBEDDING`).
        dropout: Dropout probability in the head.
    """

    USAGE: ClassVar[str] = "bilstm:H[,E] (e.g. bilstm:150; E: embedding width, default 128)"
    OTHERS: ClassVar[tuple[str, str]] = ("a BiLSTM takes its hidden and embedding widths and "
                                         "dropout only", "Use e.g. bilstm:150")
    TRAIN_DEFAULTS: ClassVar[dict[str, Any]] = {"optimizer": "adam", "lr": 0.002}
    TITLE: ClassVar[str] = "BiLSTM"
    NAME: ClassVar[str] = "bilstm"
    NETWORK: ClassVar[Any] = BiLSTM

    hidden: list[int] = field(default_factory=lambda: [150])
