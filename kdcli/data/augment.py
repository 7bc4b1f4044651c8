"""Batch augmentation of raw images, vectorized over the batch, in one place.

:class:`AugmentConfig` holds every augmentation setting. ``kdcli train`` applies it to each
training batch, and ``kdcli soft-targets`` to the augmented copies of its transfer set, so
both read the same options the same way:

* ``jitter K``: shift each image by a random whole number of pixels in ``-K..K`` on each
  axis, filling with zeros (the paper's MNIST teacher).
* ``crop_pad P``: pad each side by ``P`` pixels (``pad_mode`` ``zero`` or ``reflect``) and take
  a random crop of the original size: the standard augmentation of CIFAR-style image
  models. With zero padding it is the same as ``jitter P``.
* ``flip``: mirror each image left-right with probability 1/2.

The random draws come from a generator the caller seeds, drawn for a whole batch first
(:meth:`AugmentConfig.draw`) and applied to any slice of it (:meth:`AugmentConfig.apply`):
that is how distributed ranks agree and how transfer-set copies stay reproducible.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from kdcli.checks import check_jitter
from kdcli.errors import UsageError

PAD_MODES = ("zero", "reflect")


@dataclass(frozen=True)
class Draw:
    """The random draws of one batch: shifts ``dy``, ``dx`` and flips (None where unused)."""

    dy: torch.Tensor | None = None
    dx: torch.Tensor | None = None
    flip: torch.Tensor | None = None

    def __getitem__(self, rows: slice) -> Draw:
        return Draw(*(None if t is None else t[rows] for t in (self.dy, self.dx, self.flip)))

    @staticmethod
    def cat(draws: list[Draw]) -> Draw:
        """The draws of consecutive row ranges, joined."""
        def join(name: str):
            parts = [getattr(d, name) for d in draws]
            return None if parts[0] is None else torch.cat(parts)

        return Draw(join("dy"), join("dx"), join("flip"))


@dataclass(frozen=True)
class AugmentConfig:
    """Random image augmentation, shared by ``train`` and the copies of ``soft-targets``.

    Attributes:
        jitter: Largest random shift in pixels, zero-filled (0: none).
        crop_pad: Padding in pixels for a random crop of the original size (0: none).
        pad_mode: ``zero`` or ``reflect``: how the crop's padding is filled.
        flip: Mirror left-right with probability 1/2.
    """

    jitter: int = 0
    crop_pad: int = 0
    pad_mode: str = "zero"
    flip: bool = False

    @classmethod
    def from_options(cls, preset: str | None = None, **overrides: Any) -> AugmentConfig:
        """A preset (see :data:`PRESETS`) with the options given (not None) overriding it."""
        if preset is not None and preset not in PRESETS:
            raise UsageError(f"unknown --augment {preset!r}", f"Use one of {', '.join(PRESETS)}")
        base = PRESETS[preset] if preset else cls()
        aug = replace(base, **{k: v for k, v in overrides.items() if v is not None})
        aug.check()
        return aug

    def check(self) -> None:
        """Raise UsageError for impossible settings."""
        for name in ("jitter", "crop_pad"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be 0 or more, got {value}",
                                 f"Try --{name.replace('_', '-')} {2 if name == 'jitter' else 4}")
        if self.jitter and self.crop_pad:
            raise UsageError("--jitter and --crop-pad both shift the images",
                             "Pass one of them (--crop-pad P with zero padding is --jitter P)")
        if self.pad_mode not in PAD_MODES:
            raise UsageError(f"unknown --pad-mode {self.pad_mode!r}",
                             f"Use one of {', '.join(PAD_MODES)}")

    @property
    def active(self) -> bool:
        """Whether it changes any image."""
        return bool(self.jitter or self.crop_pad or self.flip)

    @property
    def shift(self) -> int:
        """The largest shift in pixels, from ``jitter`` or ``crop_pad``."""
        return self.jitter or self.crop_pad

    def settings(self) -> dict[str, Any]:
        """The settings, for fingerprints and file metadata."""
        return asdict(self)

    def describe(self) -> str:
        """A short description, e.g. ``crop-pad 4 (reflect), flip``."""
        parts = [f"jitter {self.jitter}"] if self.jitter else []
        if self.crop_pad:
            parts.append(f"crop-pad {self.crop_pad}" +
                         (f" ({self.pad_mode})" if self.pad_mode != "zero" else ""))
        if self.flip:
            parts.append("flip")
        return ", ".join(parts) or "none"

    def check_shape(self, sample_shape: list[int] | tuple[int, ...]) -> None:
        """Refuse augmentation of examples that are not images ``[H, W]`` or ``[C, H, W]``."""
        if not self.active:
            return
        shape = list(sample_shape)
        if len(shape) not in (2, 3):
            raise UsageError(f"augmentation ({self.describe()}) needs image inputs, but "
                             f"examples have shape {shape}",
                             "Drop --jitter/--crop-pad/--flip/--augment for non-image data")
        if self.jitter:
            check_jitter(self.jitter, shape)
        if self.crop_pad and self.pad_mode == "zero" and self.crop_pad >= min(shape[-2:]):
            raise UsageError(f"--crop-pad {self.crop_pad} is not smaller than the "
                             f"{shape[-2]}x{shape[-1]} images", "Use a smaller --crop-pad, e.g. 4")
        if self.crop_pad and self.pad_mode == "reflect" and self.crop_pad >= min(shape[-2:]):
            raise UsageError(f"--crop-pad {self.crop_pad} with reflect padding needs images "
                             f"larger than {self.crop_pad} pixels, not {shape[-2:]}",
                             "Use a smaller --crop-pad, or --pad-mode zero")

    def draw(self, b: int, generator: torch.Generator | None = None) -> Draw:
        """Draw the random choices for ``b`` images (shifts first, then flips)."""
        dy = dx = flip = None
        if self.shift:
            dy, dx = random_shifts(b, self.shift, generator)
        if self.flip:
            flip = torch.randint(0, 2, (b,), generator=generator).bool()
        return Draw(dy, dx, flip)

    def apply(self, x: torch.Tensor, d: Draw) -> torch.Tensor:
        """Augment raw images ``x`` (``[B, H, W]`` or ``[B, C, H, W]``, any dtype) with the
        draws ``d`` of the same ``B`` images."""
        if d.dy is not None:
            x = shift(x, d.dy, d.dx, self.shift,
                      "reflect" if self.crop_pad and self.pad_mode == "reflect" else "zero")
        if d.flip is not None:
            mask = d.flip.reshape(-1, *([1] * (x.dim() - 1)))
            x = torch.where(mask, x.flip(-1), x)
        return x


# Named settings for ``--augment``: the usual choice for natural images is ``crop-flip``.
PRESETS: dict[str, AugmentConfig] = {
    "none": AugmentConfig(),
    "crop-flip": AugmentConfig(crop_pad=4, flip=True),
}


def random_shifts(b: int, k: int, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``b`` random shifts ``(dy, dx)``, each a whole number in ``-k..k``."""
    dy = torch.randint(-k, k + 1, (b,), generator=generator)
    dx = torch.randint(-k, k + 1, (b,), generator=generator)
    return dy, dx


def shift(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, k: int,
          mode: str = "zero") -> torch.Tensor:
    """Shift image ``i`` of ``x`` by ``dy[i]`` rows and ``dx[i]`` columns (``|shift| <= k``).

    Pixels shifted in from outside are zeros (``mode="zero"``), or the image mirrored at its
    edge, not repeating the edge pixel (``mode="reflect"``, as ``torch.nn.functional.pad``'s
    reflect mode; needs ``k`` smaller than the image). This is a random crop of the image
    padded by ``k`` on each side.
    """
    _check_images(x)
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    rows = torch.arange(h)[None, :] - dy[:, None]  # [B, H], in -k .. h-1+k
    cols = torch.arange(w)[None, :] - dx[:, None]  # [B, W]
    if mode == "reflect":
        source = x
        rows, cols = _reflect(rows, h), _reflect(cols, w)
    else:
        source = F.pad(x, (k, k, k, k))
        rows, cols = rows + k, cols + k
    bi = torch.arange(b)[:, None, None]
    if x.dim() == 3:
        return source[bi, rows[:, :, None], cols[:, None, :]]
    out = source.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    # contiguous: with the channels-last strides of this gather, training the ResNet on the
    # CPU (torch 2.13) aborted with heap corruption in free()
    return out.contiguous()


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Indices outside ``0..n-1`` mirrored back inside (-1 -> 1, n -> n-2)."""
    i = i.abs()
    return (n - 1) - ((n - 1) - i).abs()


def _check_images(x: torch.Tensor) -> None:
    if x.dim() not in (3, 4):
        raise UsageError(f"augmentation needs image inputs, but examples have shape "
                         f"{tuple(x.shape[1:])}", "Drop --jitter/--crop-pad/--flip/--augment")
