"""The layers kdcli's model families share: the preprocessing inside every student, dropout
drawn from random bytes, and the ResNet's basic block."""

from __future__ import annotations

import torch
from torch import nn

from kdcli.preprocessing import Preprocessing, standardize, stats_tensor


class Preprocess(nn.Module):
    """Raw inputs ``[B, *raw_shape]`` -> float32 network inputs ``[B, *in_shape]``.

    Per-channel or per-feature statistics are buffers (``raw_mean``, ``raw_std``) that are
    not saved with the weights: the model file's metadata holds them.
    """

    def __init__(self, pre: Preprocessing, in_shape: list[int]) -> None:
        super().__init__()
        self.scale, self.mean, self.std = pre.scale, pre.mean, pre.std
        self.in_shape = list(in_shape)
        self.per_value = pre.per_value
        if self.per_value:
            self.register_buffer("raw_mean", stats_tensor(pre.mean, pre.raw_shape),
                                 persistent=False)
            self.register_buffer("raw_std", stats_tensor(pre.std, pre.raw_shape),
                                 persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_value:
            x = standardize(x.float(), self.scale, self.raw_mean, self.raw_std)
        else:
            x = standardize(x.float(), self.scale, self.mean, self.std)
        return x.reshape([x.shape[0], *self.in_shape])


class ByteDropout(nn.Dropout):
    """Dropout whose mask is drawn from random bytes: about 2x faster than ``nn.Dropout`` on
    CPUs, where dropout is limited by random-number generation.

    The drop probability is rounded to a multiple of 1/256 (0.5 is exact, 0.2 becomes
    51/256 = 0.199). Identity in eval mode, like ``nn.Dropout``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        threshold = round(self.p * 256)
        keep = torch.randint(0, 256, x.shape, dtype=torch.uint8, device=x.device)
        return x * (keep >= threshold) * (256.0 / (256 - threshold))


class BasicBlock(nn.Module):
    """``relu(branch(x) + shortcut(x))``: two 3x3 conv+BN in the branch; the shortcut is the
    identity, or a 1x1 conv+BN where the shape changes. Every conv is followed by its BN in
    an ``nn.Sequential``, which is what :func:`kdcli.students.base.fold_batchnorm` folds."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.branch(x) + self.shortcut(x)).relu()
