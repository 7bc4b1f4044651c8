"""How a teacher's inputs are made from raw examples: layout, scale, mean and std.

The one place that turns a batch of raw examples into what a teacher model takes (see
:func:`prepare_input`); the preprocessing is a dict of ``scale``, ``mean``, ``std`` and
optionally an image ``size``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from kdcli.errors import ModelError

IDENTITY = {"scale": 1.0, "mean": 0.0, "std": 1.0}


def prepare_input(raw: torch.Tensor, pre: dict[str, Any], shape: list[int] | None,
                  dtype: str, name: str = "teacher") -> torch.Tensor:
    """Raw examples -> what the model takes: ``((x / scale) - mean) / std`` in its layout.

    The layout comes first: a reshape to ``shape`` or, for image checkpoints with a
    ``size``, channels first, grey made RGB (or the reverse) and a bilinear resize. Then
    ``mean`` and ``std`` (numbers, or one value per channel/feature: the model input's
    dimension 1) apply, and the result is cast to the model's ``dtype``.

    Args:
        raw: ``[B, *sample_shape]`` raw inputs.
        pre: ``scale``, ``mean``, ``std`` and optionally ``size``.
        shape: The per-example shape the model takes (None: the data's).
        dtype: The model's input dtype, e.g. ``float32``.
        name: The teacher, for error messages.
    """
    x = raw.float()
    if pre.get("size"):
        x = _image_layout(x, shape[0] if shape else x.shape[1], list(pre["size"]), name)
    else:
        shape = shape or list(raw.shape[1:])
        if math.prod(shape) != math.prod(raw.shape[1:]):
            raise ModelError(
                f"teacher {name} expects examples of shape {shape} "
                f"({math.prod(shape)} values), but the data has {list(raw.shape[1:])}",
                "Give data that fits the teacher, or the right --input-shape")
        x = x.reshape(raw.shape[0], *shape)
    scale, mean, std = pre.get("scale", 1.0), pre.get("mean", 0.0), pre.get("std", 1.0)
    if scale != 1.0:
        x = x / scale
    if mean != 0.0 or std != 1.0:
        x = (x - _along_dim1(mean, x, "mean", name)) / _along_dim1(std, x, "std", name)
    return x.to(getattr(torch, dtype))


def _along_dim1(v: float | list[float], x: torch.Tensor, what: str, name: str) -> Any:
    if not isinstance(v, (list, tuple)):
        return v
    if len(v) == 1:
        return float(v[0])
    if x.dim() < 2 or x.shape[1] != len(v):
        raise ModelError(f"teacher {name}: --{what} has {len(v)} values, but its inputs have "
                         f"{x.shape[1] if x.dim() > 1 else 1} channels or features",
                         f"Give one --{what} value, or one per channel")
    return torch.tensor(v, dtype=x.dtype).view(1, -1, *[1] * (x.dim() - 2))


def _image_layout(x: torch.Tensor, channels: int, size: list[int], name: str) -> torch.Tensor:
    """Images ``[B, H, W]``, ``[B, C, H, W]`` or ``[B, H, W, C]`` -> ``[B, channels, *size]``."""
    if x.dim() == 3:
        x = x[:, None]
    elif x.dim() == 4 and x.shape[1] != channels and x.shape[-1] in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)  # channels last, as image files decode
    if x.dim() != 4:
        raise ModelError(f"teacher {name} takes images, but the data has examples of shape "
                         f"{list(x.shape[1:])}", "Give images [H, W], [C, H, W] or [H, W, C]")
    c = x.shape[1]
    if c != channels:
        if c == 1:
            x = x.expand(-1, channels, -1, -1)  # grey -> RGB, as the processor converts
        elif c == 4 and channels == 3:
            x = x[:, :3]  # drop alpha
        elif c == 3 and channels == 1:  # ITU-R 601-2 luma, as PIL's "L"
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise ModelError(f"teacher {name} takes {channels}-channel images, the data has "
                             f"{c} channels", "Give images with the model's channels")
    if list(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x


def describe_preprocessing(pre: dict[str, Any]) -> str:
    """A short text of a preprocessing dict, for tables: ``resize 224x224, /255, ...``."""
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
