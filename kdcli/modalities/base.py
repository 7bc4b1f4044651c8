"""What a modality (a kind of example: images, table rows, ...) must answer.

A modality owns what differs between kinds of examples: the named inputs a model takes for
examples of a raw shape (:class:`InputSpec`), the rule that ``--normalize-by auto`` stands
for, the student's preprocessing module, the export's inputs (names, dtypes, a dummy batch,
dynamic axes) and the layout of a teacher's inputs. A batch is a mapping of input names to
tensors; images and table rows have one input, named ``input``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from kdcli.errors import ModelError
from kdcli.preprocessing import Preprocessing
from kdcli.students.layers import Preprocess


@dataclass(frozen=True)
class InputSpec:
    """One named input of a model.

    Attributes:
        name: The input's name (the ONNX graph's input name).
        dtype: What the model takes, e.g. ``torch.float32``.
        shape: The shape of one example's input.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


class Modality(ABC):
    """A kind of example. Subclasses set :attr:`name` and the rule of ``--normalize-by
    auto``; the rest defaults to one float32 input named ``input`` with a dynamic batch."""

    name: str

    @abstractmethod
    def normalize_by(self, raw_shape: list[int]) -> str:
        """The rule ``--normalize-by auto`` means: ``scalar``, ``channel`` or ``feature``."""

    def inputs(self, raw_shape: list[int]) -> list[InputSpec]:
        """The named inputs a model takes for examples of ``raw_shape``."""
        return [InputSpec("input", torch.float32, tuple(raw_shape))]

    def batch(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw examples ``[B, *raw_shape]`` as the named inputs, in their dtypes."""
        (spec,) = self.inputs(list(raw.shape[1:]))
        return {spec.name: raw.to(spec.dtype)}

    def example_inputs(self, raw_shape: list[int], rows: int) -> dict[str, torch.Tensor]:
        """A batch of ``rows`` zeros of every input (what an exporter traces)."""
        return {s.name: torch.zeros(rows, *s.shape, dtype=s.dtype)
                for s in self.inputs(raw_shape)}

    def dynamic_axes(self, raw_shape: list[int]) -> dict[str, dict[int, str]]:
        """Each input's axes that may vary between batches, named: the batch."""
        return {s.name: {0: "batch"} for s in self.inputs(raw_shape)}

    def student_preprocess(self, pre: Preprocessing, in_shape: list[int]) -> nn.Module:
        """The module inside a student that turns raw inputs into its network's inputs."""
        return Preprocess(pre, in_shape)

    def teacher_layout(self, x: torch.Tensor, pre: Preprocessing, shape: list[int] | None,
                       name: str) -> torch.Tensor:
        """Float examples ``[B, *raw_shape]`` in the layout a teacher takes: reshaped to
        ``shape`` (None: the data's). Only images are resized (``pre.size``)."""
        raw = list(x.shape[1:])
        if pre.size:
            raise not_images(name, raw)
        shape = shape or raw
        if math.prod(shape) != math.prod(raw):
            raise ModelError(
                f"teacher {name} expects examples of shape {shape} "
                f"({math.prod(shape)} values), but the data has {raw}",
                "Give data that fits the teacher, or the right --input-shape")
        return x.reshape(x.shape[0], *shape)


def not_images(name: str, raw: list[int]) -> ModelError:
    """The error for a teacher that takes images given examples that are not."""
    return ModelError(f"teacher {name} takes images, but the data has examples of shape "
                      f"{raw}", "Give images [H, W], [C, H, W] or [H, W, C]")
