"""The transformer family (``transformer:L[,D[,H]]``): a small encoder on the teacher's
subword tokenizer.

Token ids (+ 1, 0 for padding; see :mod:`kdcli.students.subwords`) get token and position
embeddings (width D, default 128), go through L pre-norm ``nn.TransformerEncoder`` layers
(H heads, default 4; feed-forward width 4D, GELU; padding masked), are mean-pooled over
the text's tokens and classified by a linear head. It takes a subword tokenizer only
(``--tokenizer``), never the word vocabulary. Its token embeddings may start from the
teacher's input embeddings (:func:`init_from_teacher`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from kdcli.checks import check_width
from kdcli.errors import FormatError, UsageError, quote_name
from kdcli.students.common import check_dropout

#: The width when the spec gives none.
DEFAULT_WIDTH = 128
#: The heads when the spec gives none.
DEFAULT_HEADS = 4
#: The most layers.
MAX_LAYERS = 48


class TransformerClassifier(nn.Module):
    """Token and position embeddings, a pre-norm encoder, masked mean pooling, linear head.

    Args:
        vocab_size: Token ids + 1 (0 is padding).
        max_len: The most tokens of a text (positions).
        layers: Encoder layers.
        dim: Width.
        heads: Attention heads (they divide ``dim``).
        num_classes: Output size.
        dropout: Dropout in the encoder and before the head.
    """

    def __init__(self, vocab_size: int, max_len: int, layers: int, dim: int, heads: int,
                 num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.positions = nn.Embedding(max_len, dim)
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)
        with torch.no_grad():
            self.tokens.weight[0].zero_()
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(dim),
                                             enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` of token ids + 1 ``[B, L]`` (int64, right-padded with 0)."""
        valid = ids != 0
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        # a text without tokens attends to its first position, so no row is all masked
        keep = valid | ((pos == 0) & ~valid.any(1, keepdim=True))
        x = self.tokens(ids) + self.positions(pos)
        x = self.encoder(x, src_key_padding_mask=~keep)
        w = valid.unsqueeze(-1).to(x.dtype)
        pooled = (x * w).sum(1) / w.sum(1).clamp(min=1.0)
        return self.head(pooled)


@dataclass
class TransformerConfig:
    """A small transformer encoder (``transformer:2``, ``transformer:2,128,4``).

    Attributes:
        hidden: ``[L]``, ``[L, D]`` or ``[L, D, H]``: layers, width (default
            :data:`DEFAULT_WIDTH`) and heads (default :data:`DEFAULT_HEADS`).
        dropout: Dropout in the encoder and before the head.
    """

    USAGE: ClassVar[str] = ("transformer:L[,D[,H]] (e.g. transformer:2,128,4; layers, width "
                            f"(default {DEFAULT_WIDTH}), heads (default {DEFAULT_HEADS}))")
    OTHERS: ClassVar[tuple[str, str]] = ("a transformer takes its layers, width, heads and "
                                         "dropout only", "Use e.g. transformer:2,128,4")
    TEXT: ClassVar[bool] = True  # takes token ids of a text
    SUBWORDS: ClassVar[bool] = True  # the teacher's tokenizer only, see kdcli.students.subwords
    # Adam at 1e-3 after a 1-epoch warmup, as small encoders are trained (no AdamW: the
    # loop's Adam has no decoupled weight decay).
    TRAIN_DEFAULTS: ClassVar[dict[str, Any]] = {"optimizer": "adam", "lr": 0.001,
                                                "warmup": 1.0}

    hidden: list[int] = field(default_factory=lambda: [2])
    dropout: float = 0.0

    @staticmethod
    def parse(rest: str) -> dict[str, Any]:
        """The fields of the spec after ``transformer:`` (ValueError when unreadable)."""
        parts = [int(p) for p in rest.split(",")] if rest.strip() else []
        if not 1 <= len(parts) <= 3:
            raise ValueError(rest)
        return {"hidden": parts}

    @property
    def shape(self) -> tuple[int, int, int]:
        """Layers, width and heads."""
        h = list(self.hidden) + [DEFAULT_WIDTH, DEFAULT_HEADS][len(self.hidden) - 1:]
        return h[0], h[1], h[2]

    def spec(self) -> str:
        return ",".join(map(str, self.hidden))

    def check(self) -> None:
        if not (isinstance(self.hidden, list) and 1 <= len(self.hidden) <= 3
                and all(type(h) is int for h in self.hidden)):
            raise UsageError(f"a transformer takes layers, width and heads, got "
                             f"{self.hidden!r}", "Use e.g. transformer:2,128,4")
        layers, dim, heads = self.shape
        if not 1 <= layers <= MAX_LAYERS:
            raise UsageError(f"a transformer has 1 to {MAX_LAYERS} layers, got {layers}",
                             "Use e.g. transformer:2,128,4")
        check_width(dim)
        if not (1 <= heads <= dim and dim % heads == 0):
            raise UsageError(f"the heads of a transformer must divide its width {dim}, got "
                             f"{heads}", f"Use e.g. transformer:{layers},{dim},"
                             f"{DEFAULT_HEADS if dim % DEFAULT_HEADS == 0 else 1}")
        check_dropout("dropout", self.dropout)

    def build(self, raw: list[int], num_classes: int, vocab_size: int = 2,
              ) -> tuple[nn.Module, list[int]]:
        """The network for token ids + 1 ``[B, L]`` (``raw`` is ``[max_len]``)."""
        layers, dim, heads = self.shape
        return TransformerClassifier(vocab_size, raw[0], layers, dim, heads, num_classes,
                                     self.dropout), list(raw)


def teacher_embeddings(folder: Path) -> torch.Tensor:
    """The input token embeddings ``[V, hidden]`` of the Hugging Face checkpoint ``folder``:
    the 2-D weight named like an embedding (``word_embeddings``, ``embed_tokens``, ``wte``,
    ...) whose rows are the config's ``vocab_size``, read from safetensors only.

    Raises:
        FormatError: no such weight (or pickled weights: refused).
    """
    from kdcli.io.storage import read_safetensors
    from kdcli.teachers.hf_files import read_config, weight_files

    vocab = read_config(folder).get("vocab_size")
    for p in weight_files(folder):
        tensors, _, _ = read_safetensors(p)
        for name, t in tensors.items():
            if t.dim() == 2 and t.shape[0] == vocab and any(
                    k in name for k in ("word_embeddings", "embed_tokens", "wte", "embeddings")):
                return t.float().clone()
    raise FormatError(f"{quote_name(folder)} has no input embeddings of {vocab} tokens in its "
                      "safetensors weights", "Give the tokenizer.json instead of the folder "
                      "to train without the teacher's embeddings")


def init_from_teacher(net: nn.Module, folder: Path) -> str:
    """Start ``net``'s token embeddings (``net.tokens``: row ``i + 1`` is token ``i``) from
    the teacher's input embeddings: as they are when the widths match, else projected on
    their first D principal components (a fixed PCA of the teacher's rows, scaled to the
    teacher's norm); a wider student keeps its own initialisation past the teacher's width.

    Returns:
        What was done, in words.
    """
    emb = teacher_embeddings(folder)
    table = net.tokens.weight
    rows = min(emb.shape[0], table.shape[0] - 1)
    dim, width = table.shape[1], emb.shape[1]
    if dim < width:
        centred = emb - emb.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        proj = centred @ v[:dim].T
        emb = proj * (emb.norm(dim=1).mean() / proj.norm(dim=1).mean().clamp(min=1e-12))
        how = f"projected from {width} to {dim} dimensions (PCA)"
    else:
        how = "as they are" if dim == width else f"in the first {width} of {dim} dimensions"
    with torch.no_grad():
        table[1:rows + 1, :min(dim, width)] = emb[:rows, :min(dim, width)]
    return f"token embeddings from {folder.name}'s ({rows:,} tokens, {how})"
