"""ONNX models that take a subword tokenizer's ``input_ids`` and ``attention_mask``.

A kdcli export of a subword student (``kdcli export``, see
:mod:`kdcli.students.subwords`) takes exactly these two inputs, int64 ``[batch, tokens]``,
and records the tokenizer written beside it in its metadata: ``tokenizer_file`` (a plain
file name in the model's folder) and ``tokenizer_sha256``. Such a model is a text teacher
(:data:`~kdcli.teachers.base.TEXT`): :class:`TokensFeed` reads that tokenizer (JSON only,
its hash checked, never a path out of the folder) and makes the batch's texts the two
inputs as the export's check did, truncated and padded by the written tokenizer itself.

A model with the same two inputs but no such metadata (a Hugging Face model converted by
another tool) has no tokenizer kdcli can trust; it is refused, pointing at the Hugging Face
folder, which kdcli reads with its own tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdcli.errors import ModelError, quote_name
from kdcli.students.subwords import graph_inputs, read_beside, tokenizer_class
from kdcli.teachers.onnx_text import TextFeed

#: The inputs of a kdcli subword export, in its order.
TOKEN_INPUTS = ("input_ids", "attention_mask")


def takes_tokens(inputs: Sequence[Any]) -> bool:
    """Whether a session's inputs are exactly a tokenizer's ``input_ids`` and
    ``attention_mask`` (in any order)."""
    return sorted(i.name for i in inputs) == sorted(TOKEN_INPUTS)


def tokens_feed(path: Path, meta: dict[str, str]) -> TokensFeed:
    """The feed of the model at ``path`` (its ``metadata_props`` ``meta``): its tokenizer,
    read from beside it and checked against the hash it records.

    Raises:
        ModelError: the metadata names no kdcli tokenizer (a foreign model).
        FormatError: the tokenizer is missing, outside the folder, another one (hash) or a
            pickle (from :func:`~kdcli.students.subwords.read_beside`).
    """
    if not meta.get("tokenizer_sha256"):
        raise ModelError(f"{quote_name(path)} takes input_ids and attention_mask, but its "
                         "metadata names no tokenizer (tokenizer_file, tokenizer_sha256), "
                         "so kdcli cannot make them from texts",
                         "Give the Hugging Face folder (config, weights and tokenizer.json) "
                         "instead, or export it with kdcli export")
    return TokensFeed(read_beside(path, meta), path)


class TokensFeed:
    """Makes a batch of texts the ``input_ids`` and ``attention_mask`` of the model's own
    tokenizer (its truncation and padding as written beside the model).

    Attributes:
        text: The tokenizer's JSON, as checked against the model's metadata.
        where: The model, for error messages.
    """

    def __init__(self, text: str, where: Path) -> None:
        self.text, self.where = text, where
        self.tokenizer = tokenizer_class().from_str(text)
        self._texts = TextFeed(1, where)  # one text per example, or a one-line refusal

    def __call__(self, texts: Sequence[Any]) -> dict[str, np.ndarray]:
        """The session's inputs for ``texts``.

        Raises:
            ModelError: an example is not one text (a sentence pair, a number).
        """
        strings = [str(t) for t in self._texts(texts)]
        if not strings:
            return {name: np.zeros((0, 1), dtype=np.int64) for name in TOKEN_INPUTS}
        return graph_inputs(self.tokenizer, strings)
