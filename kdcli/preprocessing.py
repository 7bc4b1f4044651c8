"""The one preprocessing type: ``((x / scale) - mean) / std``, for students, teachers and export.

A :class:`Preprocessing` holds a scale, a mean and a std (each mean or std one number, or one
value per channel or per input value, by the one rule of :func:`stats_shape`), the raw
example shape and units a student was trained on, and for image checkpoints the size a
teacher's images are resized to. Students carry it inside the model (see
:class:`kdcli.students.layers.Preprocess`); teachers apply it to their inputs (see
:func:`kdcli.teachers.inputs.prepare_input`). Which rule ``--normalize-by auto`` means is the
modality's (see :func:`kdcli.modalities.normalize_by`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from kdcli.errors import UsageError

# How statistics are fitted: auto picks by the modality (see kdcli.modalities.normalize_by);
# scalar: one mean and std; channel: one per channel of [C, H, W] images; feature: one per
# input value (per column of an [N, F] table).
NORMALIZE_BY = ("auto", "scalar", "channel", "feature")
_FIT_ROWS = 20000  # examples the scalar statistics are fitted on (as ever)
_FIT_ROWS_PER = 100000  # examples per-channel and per-feature statistics are fitted on


def stats_shape(n: int, shape: list[int] | tuple[int, ...]) -> list[int]:
    """The shape that ``n`` mean or std values take to broadcast over one example.

    The one rule for students and teachers: a single value: ``[]``; one per input value
    (``n == prod(shape)``, e.g. per feature of a table row): ``shape``; one per channel
    (``n == shape[0]`` for examples of two or more dimensions, e.g. ``[C, H, W]``):
    ``[C, 1, ...]``.

    Raises:
        UsageError: ``n`` fits neither.
    """
    dims = list(shape)
    if n == 1:
        return []
    if n == math.prod(dims):
        return dims
    if len(dims) >= 2 and n == dims[0]:
        return [n] + [1] * (len(dims) - 1)
    raise UsageError(f"{n} mean/std values do not fit examples of shape {dims}",
                     "Give one value, one per channel of [C, H, W] images, or one per feature")


def stats_tensor(values: float | list[float], shape: list[int] | tuple[int, ...]
                 ) -> torch.Tensor:
    """Mean or std values as a float32 tensor that broadcasts over ``[B, *shape]``."""
    v = values if isinstance(values, (list, tuple)) else [values]
    return torch.tensor(v, dtype=torch.float32).reshape(stats_shape(len(v), shape))


def standardize(x: torch.Tensor, scale: float, mean: float | torch.Tensor,
                std: float | torch.Tensor) -> torch.Tensor:
    """``((x / scale) - mean) / std``, skipping the steps that are the identity.

    ``mean`` and ``std`` are numbers, or tensors that broadcast over ``x`` (always applied).
    """
    if scale != 1.0:
        x = x / scale
    if isinstance(mean, torch.Tensor) or isinstance(std, torch.Tensor) or \
            mean != 0.0 or std != 1.0:
        x = (x - mean) / std
    return x


@dataclass
class Preprocessing:
    """How raw inputs become a network's inputs: ``((x / scale) - mean) / std``.

    Attributes:
        scale: Raw units per unit of model input (255 for 8-bit pixels).
        mean: Mean subtracted after scaling: one number, or a list (one per channel or one
            per input value, as :func:`stats_shape` says).
        std: Standard deviation divided by after centring (a number or a list, like mean).
        raw_shape: Shape of one raw example a student takes, e.g. ``[28, 28]`` (empty for
            a teacher's, which takes the data's).
        units: Human-readable description of the raw units.
        size: ``[H, W]`` a teacher's images are resized to (image checkpoints), or None.
        words: A text student's word vocabulary (:meth:`kdcli.students.words.WordVocab.
            to_json`): its raw inputs are then word ids ``[B, L]``, L at most
            ``raw_shape[0]``, from texts (None: not a text student).
        table: A table student's encoding of its columns (:meth:`kdcli.students.
            table_encoding.TableEncoding.to_json`): missing numbers filled in and
            categories one-hot inside the model, instead of ``mean`` and ``std`` (None:
            the table is standardised by ``mean`` and ``std``).
        tokenizer: A subword text student's tokenizer (:func:`kdcli.students.subwords.
            record`: ``json``, the tokenizer.json text; ``sha256``, its hash; ``size``, its
            tokens): its raw inputs are then token ids + 1 ``[B, L]`` (0 = padding), L at
            most ``raw_shape[0]`` (None: no subword tokenizer).
    """

    scale: float = 1.0
    mean: float | list[float] = 0.0
    std: float | list[float] = 1.0
    raw_shape: list[int] = field(default_factory=list)
    units: str = "raw"
    size: list[int] | None = None
    words: dict[str, Any] | None = None
    table: dict[str, Any] | None = None
    tokenizer: dict[str, Any] | None = None

    @classmethod
    def fit(cls, inputs: torch.Tensor, normalize: bool, rule: str) -> Preprocessing:
        """Derive preprocessing from training inputs: scale by dtype (8-bit to [0, 1]), then,
        with ``normalize``, zero mean and unit variance from the data, one value overall
        (``rule`` ``scalar``), per channel (``channel``) or per input value (``feature``).
        A constant input (std 0) gets std 1, never inf. ``--normalize-by auto`` is resolved
        first (see :func:`kdcli.modalities.fit_preprocessing`)."""
        scale = 255.0 if inputs.dtype == torch.uint8 else 1.0
        units = "pixel values 0-255" if inputs.dtype == torch.uint8 else f"{inputs.dtype}"
        raw = list(inputs.shape[1:])
        if not normalize:
            return cls(scale, 0.0, 1.0, raw, units)
        if rule == "scalar":
            sample = inputs[: min(len(inputs), _FIT_ROWS)].float() / scale
            mean, std = float(sample.mean()), float(sample.std())
            return cls(scale, round(mean, 4), round(std if std > 0 else 1.0, 4), raw, units)
        mean_t, std_t = _moments(inputs[:_FIT_ROWS_PER], scale, rule == "channel")
        return cls(scale, mean_t.tolist(), std_t.tolist(), raw, units)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        """Read :meth:`to_dict`'s form (a model file's or a teacher's; TypeError for a key
        it does not know)."""
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The form files record: ``scale``, ``mean``, ``std``, then ``raw_shape`` and
        ``units`` for a student's (it has a raw shape), and ``size`` where one is set."""
        out: dict[str, Any] = {"scale": self.scale, "mean": self.mean, "std": self.std}
        if self.raw_shape:
            out.update(raw_shape=self.raw_shape, units=self.units)
        if self.size is not None:
            out["size"] = self.size
        if self.words is not None:
            out["words"] = self.words
        if self.table is not None:
            out["table"] = self.table
        if self.tokenizer is not None:
            out["tokenizer"] = self.tokenizer
        return out

    @property
    def is_text(self) -> bool:
        """Whether a student of this preprocessing takes texts (a word vocabulary or a
        subword tokenizer)."""
        return self.words is not None or self.tokenizer is not None

    @property
    def per_value(self) -> bool:
        """Whether mean or std is a list (per channel or per feature)."""
        return isinstance(self.mean, (list, tuple)) or isinstance(self.std, (list, tuple))

    def stats(self, shape: list[int] | tuple[int, ...]
              ) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """Mean and std for examples of ``shape``: the numbers, or (per value) float32
        tensors that broadcast over ``[B, *shape]`` (UsageError if they do not fit)."""
        if not self.per_value:
            return self.mean, self.std
        return stats_tensor(self.mean, shape), stats_tensor(self.std, shape)

    def check(self) -> None:
        """Raise UsageError if the statistics do not fit ``raw_shape`` or a std is not > 0."""
        for name in ("mean", "std"):
            v = getattr(self, name)
            values = v if isinstance(v, list) else [v]
            stats_shape(len(values), self.raw_shape)
            if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in values):
                raise UsageError(f"preprocessing {name} holds a non-finite value",
                                 "Give finite numbers")
            if name == "std" and not all(x > 0 for x in values):
                raise UsageError("preprocessing std must be positive", "Give std values > 0")


def _moments(inputs: torch.Tensor, scale: float, per_channel: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 mean and population std per channel (``[N, C, ...]``) or per input value,
    accumulated in float64 a chunk at a time; a std of 0 becomes 1."""
    total = sq = None
    for a in range(0, len(inputs), 4096):
        x = inputs[a:a + 4096].double() / scale
        x = x.transpose(0, 1).reshape(x.shape[1], -1).T if per_channel else x.reshape(len(x), -1)
        s, q = x.sum(0), (x * x).sum(0)
        total, sq = (s, q) if total is None else (total + s, sq + q)
    n = inputs.shape[0] * (math.prod(inputs.shape[2:]) if per_channel else 1)
    mean = total / n
    std = (sq / n - mean * mean).clamp_min(0).sqrt().float()
    std = torch.where(torch.isfinite(std) & (std > 0), std, torch.ones_like(std))
    return mean.float(), std
