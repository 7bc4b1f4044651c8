"""Images: examples of shape ``[H, W]`` (grayscale) or ``[C, H, W]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcli.errors import ModelError
from kdcli.modalities.base import Modality, not_images
from kdcli.preprocessing import Preprocessing


class Image(Modality):
    """Images, standardised per channel by default when they have channels (``[C, H, W]``),
    else with one mean and std; a teacher's images are laid out and resized to its size."""

    name = "image"

    def normalize_by(self, raw_shape: list[int]) -> str:
        return "channel" if len(raw_shape) == 3 else "scalar"

    def teacher_layout(self, x: torch.Tensor, pre: Preprocessing, shape: list[int] | None,
                       name: str) -> torch.Tensor:
        """With ``pre.size`` (image checkpoints): channels first, grey made RGB (or the
        reverse) and a bilinear resize; else a reshape to ``shape``."""
        if not pre.size:
            return super().teacher_layout(x, pre, shape, name)
        return _image_layout(x, shape[0] if shape else x.shape[1], list(pre.size), name)


def _image_layout(x: torch.Tensor, channels: int, size: list[int], name: str) -> torch.Tensor:
    """Images ``[B, H, W]``, ``[B, C, H, W]`` or ``[B, H, W, C]`` -> ``[B, channels, *size]``."""
    if x.dim() == 3:
        x = x[:, None]
    elif x.dim() == 4 and x.shape[1] != channels and x.shape[-1] in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)  # channels last, as image files decode
    if x.dim() != 4:
        raise not_images(name, list(x.shape[1:]))
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


IMAGE = Image()
