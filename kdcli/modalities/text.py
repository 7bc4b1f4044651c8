"""Texts: a text student's raw inputs are word ids ``[B, L]`` (0 = padding), L up to its
``raw_shape[0]``, made from raw strings by its vocabulary (:mod:`kdcli.students.words`),
in Python for training and evaluation and inside the exported ONNX graph."""

from __future__ import annotations

import torch
from torch import nn

from kdcli.modalities.base import InputSpec, Modality
from kdcli.preprocessing import Preprocessing


class Text(Modality):
    """Word ids of texts: int64, a dynamic batch and a dynamic number of words."""

    name = "text"

    def normalize_by(self, raw_shape: list[int]) -> str:
        return "scalar"  # ids are not standardised

    def inputs(self, raw_shape: list[int]) -> list[InputSpec]:
        return [InputSpec("input_ids", torch.int64, tuple(raw_shape))]

    def dynamic_axes(self, raw_shape: list[int]) -> dict[str, dict[int, str]]:
        return {"input_ids": {0: "batch", 1: "words"}}

    def student_preprocess(self, pre: Preprocessing, in_shape: list[int]) -> nn.Module:
        return nn.Identity()  # the vocabulary runs outside the network (ids in)


TEXT = Text()


class Tokens(Text):
    """Subword tokens of texts (a student with the teacher's tokenizer): inside kdcli one
    tensor of token ids + 1 (0 = padding), as :class:`Text`; its ONNX graph takes the
    tokenizer's ``input_ids`` and ``attention_mask``, int64 ``[batch, tokens]``."""

    name = "tokens"

    def inputs(self, raw_shape: list[int]) -> list[InputSpec]:
        return [InputSpec("input_ids", torch.int64, tuple(raw_shape)),
                InputSpec("attention_mask", torch.int64, tuple(raw_shape))]

    def example_inputs(self, raw_shape: list[int], rows: int) -> dict[str, torch.Tensor]:
        return {s.name: torch.ones(rows, *s.shape, dtype=s.dtype)
                for s in self.inputs(raw_shape)}

    def dynamic_axes(self, raw_shape: list[int]) -> dict[str, dict[int, str]]:
        return {s.name: {0: "batch", 1: "tokens"} for s in self.inputs(raw_shape)}


TOKENS = Tokens()
