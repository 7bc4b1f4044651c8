"""How a teacher's inputs are made from raw examples: layout, scale, mean and std.

The one place that turns a batch of raw examples into what a teacher model takes (see
:func:`prepare_input`): the data's modality lays the examples out (images: channels and
size), then the teacher's :class:`~kdcli.preprocessing.Preprocessing` applies.
"""

from __future__ import annotations

from typing import Any

import torch

from kdcli.errors import DataError, ModelError, UsageError, quote_name
from kdcli.modalities import modality_for
from kdcli.preprocessing import Preprocessing, standardize

IDENTITY = {"scale": 1.0, "mean": 0.0, "std": 1.0}


def prepare_input(raw: torch.Tensor, pre: Preprocessing, shape: list[int] | None,
                  dtype: str, name: str = "teacher") -> torch.Tensor:
    """Raw examples -> what the model takes: ``((x / scale) - mean) / std`` in its layout.

    The layout comes first: a reshape to ``shape`` or, for image checkpoints with a
    ``size``, channels first, grey made RGB (or the reverse) and a bilinear resize (see
    :meth:`kdcli.modalities.base.Modality.teacher_layout`). Then ``mean`` and ``std``
    (numbers, or one value per channel or per input value of the model's input, by
    :func:`kdcli.preprocessing.stats_shape`) apply, and the result is cast to ``dtype``.

    Args:
        raw: ``[B, *sample_shape]`` raw inputs.
        pre: The teacher's preprocessing (``scale``, ``mean``, ``std``, ``size``).
        shape: The per-example shape the model takes (None: the data's).
        dtype: The model's input dtype, e.g. ``float32``.
        name: The teacher, for error messages.
    """
    x = modality_for(list(raw.shape[1:])).teacher_layout(raw.float(), pre, shape, name)
    try:
        mean, std = pre.stats(list(x.shape[1:]))
    except UsageError as e:
        raise ModelError(f"teacher {name}: {e.message} (its inputs)",
                         "Give one --mean and --std value, or one per channel") from None
    return standardize(x, pre.scale, mean, std).to(getattr(torch, dtype))


def raw_layout(raw: torch.Tensor, pre: Preprocessing, shape: list[int] | None,
               name: str = "teacher") -> torch.Tensor:
    """Raw examples in the layout a model that converts its inputs itself takes: reshaped
    to ``shape`` (None: the data's), in their own dtype: the model's own ``float()`` then
    gives the values :func:`prepare_input` gives with the identity ``pre``, without a
    float copy of the batch here.

    Raises:
        ModelError: ``pre`` is not the identity, or ``shape`` does not fit the data.
    """
    if pre.size or (pre.scale, pre.mean, pre.std) != (1.0, 0.0, 1.0):
        raise ModelError(f"internal: teacher {name} takes raw inputs but has preprocessing "
                         f"{pre.to_dict()}", "Report this bug")
    return modality_for(list(raw.shape[1:])).teacher_layout(raw, pre, shape, name)


def match_columns(theirs: list[str] | None, ours: list[str] | None,
                  name: str) -> tuple[int, ...] | None:
    """Where the columns a model takes (``theirs``, the feature names its file records) are
    among the data's (``ours``): the indices that give them by name, in the model's order.

    Returns:
        None when either side names no columns (they are then taken by position) or the
        names are the same, in the same order.

    Raises:
        DataError: the data lacks a column the model takes, naming it.
    """
    if theirs is None or ours is None or list(theirs) == list(ours):
        return None
    missing = [c for c in theirs if c not in ours]
    if missing:
        raise DataError(f"the data has no column {quote_name(missing[0])}, which {name} "
                        f"takes ({len(missing)} of its {len(theirs)} columns are missing; "
                        "it records its columns by name)",
                        "Give a table with the columns the model was trained on")
    return tuple(ours.index(c) for c in theirs)


def refuse_categories(name: str, categories: list[list[str] | None], names: list[str],
                      t: Any) -> Any:
    """``t``, a model that takes numbers, unless one of its columns ``names`` holds
    categories (``categories[j]`` not None).

    Raises:
        ModelError: naming the column.
    """
    j = next((j for j, c in enumerate(categories) if c is not None), None)
    if j is None:
        return t
    raise ModelError(f"{name} takes numbers, but the data's column {names[j]!r} holds "
                     "categories", "Leave it out with --feature-columns, or give a model that "
                     "takes its columns by name (a kdcli model, or an ONNX pipeline with one "
                     "input per column)")


def check_gaps(name: str, x: torch.Tensor, out: Any) -> None:
    """Refuse a model of table rows that gives NaN for rows with missing numbers (a network
    trained without gaps; boosters and kdcli students with gaps take them).

    Raises:
        DataError: naming the model.
    """
    if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.dim() != 2 \
            or len(out) != len(x):
        return
    lost = ~torch.isfinite(out).all(1)  # [B]: cheap; the inputs are looked at only then
    if bool(lost.any()) and bool((lost & torch.isnan(x).any(1)).any()):
        raise DataError(f"{name} gives no scores for rows with missing numbers: it cannot "
                        "take gaps", "Fill the gaps in first (--missing error lists them), "
                        "or use a teacher that takes them (a booster, a pipeline with an "
                        "imputer, a kdcli student trained on data with gaps)")


def describe_preprocessing(pre: dict[str, Any]) -> str:
    """A short text of a recorded preprocessing (see
    :meth:`~kdcli.preprocessing.Preprocessing.to_dict`), for tables: ``resize 224x224,
    /255, ...``."""
    parts = []
    if pre.get("size"):
        parts.append("resize " + "x".join(str(s) for s in pre["size"]))
    if pre.get("scale", 1.0) != 1.0:
        parts.append(f"/{pre['scale']:g}")
    for k in ("mean", "std"):
        v = pre.get(k, 0.0 if k == "mean" else 1.0)
        if v != (0.0 if k == "mean" else 1.0):
            parts.append(f"{k} " + (f"{v:g}" if not isinstance(v, (list, tuple))
                                    else "[" + ",".join(f"{e:g}" for e in v) + "]"))
    return ", ".join(parts) or "none"
