"""ONNX models that take a table one column per input: scikit-learn pipelines exported by
skl2onnx from a DataFrame (a ``ColumnTransformer`` with ``OneHotEncoder``, ``SimpleImputer``
and ``StandardScaler`` in front of a model), and kdcli's own exports of table students with
categories.

Each input is one column, ``[N, 1]`` or ``[N]``, of numbers or strings, named as the
column. kdcli gives the model the data's columns of those names (see
:func:`~kdcli.teachers.formats.load_teacher`): numbers as the input's type (a missing number
as NaN), categories as their names (strings).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcli.errors import ModelError

STRING = "tensor(string)"
# The input types a column may have, and the numpy type it is fed as.
COLUMN_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32,
                "tensor(bool)": np.bool_, STRING: object}


def takes_columns(inputs: Sequence[Any]) -> bool:
    """Whether a session's inputs are table columns: two or more, each ``[N, 1]`` or
    ``[N]`` of a column type, one at least of numbers (several string inputs alone are
    texts, which kdcli refuses: a text model takes one)."""
    def column(i: Any) -> bool:
        dims = list(i.shape)
        return i.type in COLUMN_TYPES and (len(dims) == 1 or (
            len(dims) == 2 and (dims[1] == 1 or not isinstance(dims[1], int))))
    return len(inputs) >= 2 and all(column(i) for i in inputs) and \
        any(i.type != STRING for i in inputs)


# ONNX element types by number, as onnxruntime names them in "tensor(...)"
_ELEM = {1: "float", 11: "double", 7: "int64", 6: "int32", 9: "bool", 8: "string"}


class _GraphInput:
    """An ONNX graph's input as :func:`takes_columns` reads it (``type``, ``shape``), like
    an onnxruntime session's."""

    def __init__(self, value_info: Any) -> None:
        t = value_info.type.tensor_type
        self.type = f"tensor({_ELEM.get(t.elem_type, '?')})"
        self.shape = [d.dim_value if d.HasField("dim_value") else d.dim_param
                      for d in t.shape.dim]


def graph_columns(graph: Any) -> list[str] | None:
    """The input names of a graph that takes one input per table column, else None."""
    init = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init]
    return [i.name for i in inputs] if takes_columns([_GraphInput(i) for i in inputs]) \
        else None


class ColumnsFeed:
    """Table rows ``[B, k]`` (the model's columns, in its input order; category columns as
    codes of the data's categories) -> one array per input, as the model declares it.

    Attributes:
        specs: Each input's name, ONNX type and rank.
        where: The model, for error messages.
        categories: For each input, the data's categories of its column (None: numbers);
            set by :meth:`bound`.
        columns: For each input, the data's column that feeds it (named in errors).
    """

    def __init__(self, specs: list[tuple[str, str, int]], where: Path,
                 categories: list[list[str] | None] | None = None,
                 columns: list[str] | None = None) -> None:
        self.specs, self.where = specs, where
        self.categories = categories or [None] * len(specs)
        self.columns = columns or [name for name, _, _ in specs]

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.specs]

    def bound(self, categories: list[list[str] | None], names: list[str]) -> ColumnsFeed:
        """This feed for data whose columns ``names`` have ``categories`` (per input).

        Raises:
            ModelError: a string input given numbers, or a number input given categories.
        """
        for (inp, kind, _), cats, col in zip(self.specs, categories, names, strict=True):
            if kind == STRING and cats is None:
                continue  # an all-empty column reads as numbers: checked as it runs
            if (kind == STRING) != (cats is not None):
                raise ModelError(
                    f"{self.where.name} takes {'strings' if kind == STRING else 'numbers'} "
                    f"as its input {inp!r}, but the data's column {col!r} holds "
                    f"{'numbers' if cats is None else 'categories'}",
                    "Give the table the model was trained on, with the same column types")
        return ColumnsFeed(self.specs, self.where,
                           [np.array(c, dtype=object) if c else None for c in categories],
                           names)

    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """The inputs of a batch of rows ``[B, k]``.

        Raises:
            ModelError: a missing number for an integer input.
        """
        feeds = {}
        for j, (name, kind, rank) in enumerate(self.specs):
            col = x[:, j]
            if kind == STRING:
                cats = self.categories[j]
                if cats is None and not bool(torch.isnan(col).all()):
                    raise ModelError(f"{self.where.name} takes strings as its input {name!r}, "
                                     f"but the data's column {self.columns[j]!r} holds "
                                     "numbers", "Give the table the model was trained on, "
                                     "with the same column types")
                arr = cats[col.long().numpy()] if cats is not None else \
                    np.full(len(col), "", dtype=object)  # an all-empty column
            else:
                values = col.double().numpy()
                if COLUMN_TYPES[kind] not in (np.float32, np.float64) and \
                        np.isnan(values).any():
                    raise ModelError(f"{self.where.name}'s input {name!r} takes whole numbers, "
                                     "but the column has missing values",
                                     "Fill them in, or leave the rows out")
                arr = values.astype(COLUMN_TYPES[kind])
            feeds[name] = arr if rank == 1 else arr.reshape(-1, 1)
        return feeds
