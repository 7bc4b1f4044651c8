"""Modalities: the kinds of examples kdcli distils on, and how to pick one.

:data:`MODALITIES` names each modality by ``module:object`` and :func:`get` imports it on
demand, so no modality imports this table. The modality follows from the shape of one raw
example (:func:`modality_for`), or for a student from its preprocessing
(:func:`modality_of`: text students have a vocabulary); adding one is a module with a
:class:`~kdcli.modalities.base.Modality` and an entry here, plus its tests.
"""

from __future__ import annotations

import importlib

import torch

from kdcli.errors import UsageError
from kdcli.modalities.base import Modality
from kdcli.preprocessing import NORMALIZE_BY, Preprocessing

MODALITIES: dict[str, str] = {
    "image": "kdcli.modalities.image:IMAGE",
    "table": "kdcli.modalities.table:TABLE",
    "text": "kdcli.modalities.text:TEXT",
    "tokens": "kdcli.modalities.text:TOKENS",
}


def get(name: str) -> Modality:
    """The modality named ``name`` (a key of :data:`MODALITIES`)."""
    module, _, attr = MODALITIES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def modality_for(raw_shape: list[int] | tuple[int, ...]) -> Modality:
    """The modality of examples of ``raw_shape``: ``[F]`` is a table row; anything else
    (``[H, W]``, ``[C, H, W]``, ...) an image."""
    return get("table" if len(raw_shape) == 1 else "image")


def modality_of(pre: Preprocessing) -> Modality:
    """The modality of a student's inputs: tokens for a student with a subword tokenizer
    (``pre.tokenizer``), text for one with a vocabulary (``pre.words``), a table for one
    with a table encoding (``pre.table``), else by the raw shape (:func:`modality_for`)."""
    if pre.tokenizer is not None:
        return get("tokens")
    if pre.words is not None:
        return get("text")
    return get("table") if pre.table is not None else modality_for(pre.raw_shape)


def normalize_by(rule: str, raw_shape: list[int] | tuple[int, ...]) -> str:
    """Resolve a ``--normalize-by`` rule for examples of ``raw_shape``.

    ``auto`` is the modality's rule: ``[F]`` (a table row) -> ``feature``; ``[C, H, W]``
    (colour images) -> ``channel``; anything else (``[H, W]`` grayscale images, ...) ->
    ``scalar``.

    Raises:
        UsageError: an unknown rule, or ``channel`` for examples that are not ``[C, H, W]``.
    """
    if rule not in NORMALIZE_BY:
        raise UsageError(f"unknown --normalize-by {rule!r}",
                         f"Use one of {', '.join(NORMALIZE_BY)}")
    if rule == "auto":
        return modality_for(raw_shape).normalize_by(list(raw_shape))
    if rule == "channel" and len(raw_shape) != 3:
        raise UsageError(f"--normalize-by channel needs [C, H, W] images, but examples have "
                         f"shape {list(raw_shape)}", "Use --normalize-by scalar or feature")
    return rule


def fit_preprocessing(inputs: torch.Tensor, normalize: bool = True,
                      by: str = "auto") -> Preprocessing:
    """A student's preprocessing fitted on its training inputs (see
    :meth:`Preprocessing.fit`), standardising by the rule ``by`` (see :func:`normalize_by`)."""
    raw = list(inputs.shape[1:])
    return Preprocessing.fit(inputs, normalize, normalize_by(by, raw) if normalize else "scalar")
