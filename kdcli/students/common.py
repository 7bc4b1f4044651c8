"""Checks and shapes that several model families share: dropout, max-norm, width
multipliers, a text family's one or two widths, and image inputs."""

from __future__ import annotations

import math
from typing import Any

from kdcli.checks import MAX_CNN_WIDTH, check_width
from kdcli.errors import UsageError


def check_dropout(name: str, p: object) -> None:
    """A dropout probability (field ``name``, e.g. ``input_dropout``) in ``[0, 1)``."""
    if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
        raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1), got {p}",
                         "Pass a probability such as 0.5")


def check_max_norm(max_norm: object) -> None:
    """A max-norm bound: None (unconstrained) or a positive finite number."""
    if max_norm is not None and not (isinstance(max_norm, (int, float)) and
                                     0 < max_norm < math.inf):
        raise UsageError(f"--max-norm must be positive, got {max_norm}",
                         "Pass e.g. --max-norm 3.5")


def check_width_multiplier(width: object, family: str, title: str, base: int,
                           example: str) -> None:
    """A channel width multiplier from ``1/base`` (one channel in the narrowest layer,
    which has ``base`` channels at 1.0) to :data:`~kdcli.checks.MAX_CNN_WIDTH`."""
    if isinstance(width, bool) or not (isinstance(width, (int, float)) and
                                       1 / base <= width <= MAX_CNN_WIDTH):
        raise UsageError(f"the {title} width multiplier must be from 1/{base} (one channel) "
                         f"to {MAX_CNN_WIDTH:g}, got {width}", f"Use e.g. {family}:{example}")


def parse_two_widths(rest: str) -> dict[str, Any]:
    """``hidden`` of a spec of one or two widths, such as ``150`` or ``150,300`` (a text
    family's size and embedding width); ValueError when unreadable."""
    parts = [int(p) for p in rest.split(",")] if rest.strip() else []
    if not 1 <= len(parts) <= 2:
        raise ValueError(rest)
    return {"hidden": parts}


def check_two_widths(hidden: object, title: str, family: str) -> None:
    """``hidden``: one or two widths (see :func:`parse_two_widths`)."""
    if not (isinstance(hidden, list) and 1 <= len(hidden) <= 2):
        raise UsageError(f"a {title} takes one or two widths, got {hidden!r}",
                         f"Use e.g. {family}:100 or {family}:100,300")
    for width in hidden:
        check_width(width)


def image_shape(raw: list[int], what: str, smallest: int) -> list[int]:
    """``[C, H, W]`` for examples of shape ``[H, W]`` (grayscale) or ``[C, H, W]``."""
    if len(raw) == 2:
        shape = [1, *raw]
    elif len(raw) == 3:
        shape = list(raw)
    else:
        raise UsageError(f"{what} needs image inputs, but examples have shape {raw}",
                         "Use an MLP (--arch mlp:...) for non-image data")
    if shape[1] < smallest or shape[2] < smallest:
        raise UsageError(f"images of shape {raw} are too small for {what}",
                         f"Use images of at least {smallest}x{smallest} pixels or an MLP")
    return shape
