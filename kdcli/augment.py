"""Batch augmentation: random whole-pixel shifts ("jitter"), vectorized over the batch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdcli.errors import UsageError

if TYPE_CHECKING:
    import torch


def random_shifts(b: int, k: int, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``b`` random shifts ``(dy, dx)``, each a whole number in ``-k..k``."""
    import torch

    dy = torch.randint(-k, k + 1, (b,), generator=generator)
    dx = torch.randint(-k, k + 1, (b,), generator=generator)
    return dy, dx


def jitter(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by a random whole number of pixels in ``-k..k`` on each axis.

    Pixels shifted in from outside are zero (in raw units), as in the paper's MNIST runs.

    Args:
        x: Raw images ``[B, H, W]`` or ``[B, C, H, W]``, any dtype.
        k: Largest shift in pixels (0 returns ``x`` unchanged).
        generator: Source of randomness (for reproducibility).

    Returns:
        Shifted images with the shape and dtype of ``x``.
    """
    if k == 0:
        return x
    _check_images(x)
    return shift(x, *random_shifts(x.shape[0], k, generator), k)


def shift(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, k: int) -> torch.Tensor:
    """Shift image ``i`` of ``x`` by ``dy[i]`` rows and ``dx[i]`` columns (``|shift| <= k``),
    filling with zeros."""
    import torch
    import torch.nn.functional as F

    _check_images(x)
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    padded = F.pad(x, (k, k, k, k))
    rows = torch.arange(h)[None, :] - dy[:, None] + k  # [B, H]
    cols = torch.arange(w)[None, :] - dx[:, None] + k  # [B, W]
    bi = torch.arange(b)[:, None, None]
    if x.dim() == 3:
        return padded[bi, rows[:, :, None], cols[:, None, :]]
    return padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _check_images(x: torch.Tensor) -> None:
    if x.dim() not in (3, 4):
        raise UsageError(f"--jitter needs image inputs, but examples have shape "
                         f"{tuple(x.shape[1:])}", "Drop --jitter for non-image data")
