"""A table student's own encoding of its columns: missing numbers filled in, categories
one-hot, inside the model and its ONNX graph.

A student trained on a table with categories or missing values takes raw rows ``[B, F]``:
a number column holds the value (NaN where missing), a category column the value's code in
the student's categories (:meth:`TableEncoding.code_lookup`). :class:`EncodeTable` turns
them into the network's inputs, fitted on the training rows by :meth:`TableEncoding.fit`:

- **Numbers**: a missing value becomes the column's training median; the column is then
  standardised with the training mean and standard deviation (of the filled-in values).
  A column that had missing values in training also gets a 0/1 column "was missing".
- **Categories**: one 0/1 column per category seen in training, at most
  ``max_categories`` per column: when a column has more, the ``max_categories - 1`` most
  frequent keep a column each and the rest share one "other" column. A value never seen in
  training goes to "other" when the column has one, else to no column (all zeros), as
  scikit-learn's ``OneHotEncoder(handle_unknown="infrequent_if_exist")`` does.

The encoding is recorded in the student's :class:`~kdcli.preprocessing.Preprocessing`
(``table``, :meth:`TableEncoding.to_json`), so that the model file, the teacher loader and
the ONNX export (:func:`onnx_model`: one input per column, strings for categories) encode
exactly as training did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from kdcli.errors import FormatError

DEFAULT_MAX_CATEGORIES = 32


@dataclass(frozen=True)
class Column:
    """One raw column of a table student.

    Attributes:
        name: The column's name.
        kind: ``number`` or ``category``.
        fill: A number column's training median (what a missing value becomes).
        mean: The training mean of the filled-in column.
        std: Its training standard deviation (1 for a constant column).
        indicator: Whether the column gets a 0/1 "was missing" column.
        categories: A category column's kept categories, in code order.
        other: Whether it has an "other" column (for cut and unseen categories).
    """

    name: str
    kind: str
    fill: float = 0.0
    mean: float = 0.0
    std: float = 1.0
    indicator: bool = False
    categories: tuple[str, ...] = ()
    other: bool = False

    @property
    def width(self) -> int:
        """How many network inputs the column becomes."""
        if self.kind == "number":
            return 1 + int(self.indicator)
        return len(self.categories) + int(self.other)


@dataclass(frozen=True)
class TableEncoding:
    """How a table student encodes its raw columns (see the module docstring)."""

    columns: tuple[Column, ...]

    @classmethod
    def fit(cls, inputs: torch.Tensor, names: list[str], categories: dict[str, list[str]],
            max_categories: int = DEFAULT_MAX_CATEGORIES) -> TableEncoding:
        """Fit on training rows ``[N, F]`` whose category columns (``categories``: name ->
        the data's categories in code order) hold the data's codes."""
        cols = []
        x = inputs.double()
        for j, name in enumerate(names):
            v = x[:, j]
            if name in categories:
                counts = torch.bincount(v.long(), minlength=len(categories[name])).tolist()
                order = sorted(range(len(counts)), key=lambda i: (-counts[i],
                                                                   categories[name][i]))
                seen = [i for i in order if counts[i] > 0]
                cut = len(seen) > max_categories
                kept = seen[:max_categories - 1] if cut else seen
                cols.append(Column(name, "category", categories=tuple(
                    categories[name][i] for i in sorted(kept, key=lambda i: categories[name][i])),
                    other=cut))
                continue
            missing = torch.isnan(v)
            present = v[~missing]
            fill = float(present.median()) if len(present) else 0.0
            filled = torch.where(missing, torch.full_like(v, fill), v)
            std = float(filled.std(unbiased=False)) if len(v) > 1 else 1.0
            cols.append(Column(name, "number", fill=fill, mean=float(filled.mean()),
                               std=std if std > 0 and math.isfinite(std) else 1.0,
                               indicator=bool(missing.any())))
        return cls(tuple(cols))

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def width(self) -> int:
        """The network's input width."""
        return sum(c.width for c in self.columns)

    @property
    def has_categories(self) -> bool:
        return any(c.kind == "category" for c in self.columns)

    def code_lookup(self, j: int, have: list[str]) -> torch.Tensor:
        """For category column ``j``, the student's code of each of ``have`` (another
        file's categories, in its code order): the index of the kept category, else the
        "other" code (``len(categories)``: the other column, or none)."""
        own = {c: i for i, c in enumerate(self.columns[j].categories)}
        other = len(self.columns[j].categories)
        return torch.tensor([own.get(c, other) for c in have], dtype=torch.float32)

    def recode(self, inputs: torch.Tensor, categories: dict[str, list[str]] | None
               ) -> torch.Tensor:
        """Rows ``[N, F]`` in this encoding's column order whose category columns hold the
        codes of ``categories`` (the data's) -> the same rows with the student's codes."""
        out = inputs.float().clone()
        for j, c in enumerate(self.columns):
            if c.kind == "category":
                have = (categories or {}).get(c.name)
                if have is None:
                    raise FormatError(f"column {c.name!r} holds categories for the model, but "
                                      "the data holds numbers there",
                                      "Give the table the model was trained on")
                out[:, j] = self.code_lookup(j, have)[inputs[:, j].long()]
        return out

    def describe(self) -> str:
        """One line for ``inspect``: the category columns and the number columns."""
        cats = [f"{c.name} ({len(c.categories)}{' + other' if c.other else ''})"
                for c in self.columns if c.kind == "category"]
        nums = [c for c in self.columns if c.kind == "number"]
        gaps = sum(c.indicator for c in nums)
        return "; ".join([*(["categories " + ", ".join(cats)] if cats else []),
                          f"{len(nums)} numbers ({gaps} with a was-missing input)"]) + \
            f"; {self.width} network inputs"

    def to_json(self) -> dict[str, Any]:
        """The form a model file records (``Preprocessing.table``)."""
        return {"columns": [
            {"name": c.name, "kind": "number", "fill": c.fill, "mean": c.mean, "std": c.std,
             "indicator": c.indicator} if c.kind == "number" else
            {"name": c.name, "kind": "category", "categories": list(c.categories),
             "other": c.other} for c in self.columns]}

    @classmethod
    def from_json(cls, doc: Any, names: list[str] | None = None) -> TableEncoding:
        """Read :meth:`to_json`'s form, checking every field (and, given ``names``, that its
        columns are the file's ``feature_names``).

        Raises:
            FormatError: naming the column and field that are wrong.
        """
        def bad(what: str) -> FormatError:
            return FormatError(f"the model file's table encoding is malformed: {what}",
                               "Re-train the model with this kdcli")

        if not isinstance(doc, dict) or not isinstance(doc.get("columns"), list) \
                or not doc["columns"]:
            raise bad("no list of columns")
        cols = [_column_from_json(c, i, bad) for i, c in enumerate(doc["columns"])]
        got = [c.name for c in cols]
        if len(set(got)) != len(got):
            raise bad("a column is listed twice")
        if names is not None and got != list(names):
            raise bad(f"its columns {got[:5]} are not the file's feature_names {names[:5]}")
        return cls(tuple(cols))


_TINY = float(torch.finfo(torch.float32).tiny)  # the smallest normal float32
_MAX = float(torch.finfo(torch.float32).max)


def _column_from_json(c: Any, i: int, bad: Any) -> Column:
    """One column of :meth:`TableEncoding.from_json` (``bad(what)``: the error to raise)."""
    if not isinstance(c, dict) or not isinstance(c.get("name"), str):
        raise bad(f"column {i + 1} has no name")
    where = f"column {c['name'][:60]!r}"
    if c.get("kind") == "number":
        nums = [c.get(k) for k in ("fill", "mean", "std")]
        if not all(_is_float32(v) for v in nums):
            raise bad(f"{where}: fill, mean and std must be float32 numbers, got "
                      f"{[str(v)[:20] for v in nums]}")
        if not nums[2] >= _TINY:
            raise bad(f"{where}: std {nums[2]} is not a positive float32")
        if not isinstance(c.get("indicator"), bool):
            raise bad(f"{where}: indicator is not true or false")
        return Column(c["name"], "number", *map(float, nums), c["indicator"])
    if c.get("kind") == "category":
        cats = c.get("categories")
        if not isinstance(cats, list) or not cats or not all(isinstance(v, str) for v in cats):
            raise bad(f"{where}: categories is not a list of strings")
        if len(set(cats)) != len(cats):
            raise bad(f"{where}: a category is listed twice")
        if not isinstance(c.get("other"), bool):
            raise bad(f"{where}: other is not true or false")
        return Column(c["name"], "category", categories=tuple(cats), other=c["other"])
    raise bad(f"{where}: kind {str(c.get('kind'))[:20]!r} is not number or category")


def _is_float32(v: Any) -> bool:
    """Whether ``v`` is a number that float32 holds (finite, not beyond its range)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
        and abs(v) <= _MAX


class EncodeTable(nn.Module):
    """Raw table rows -> the network's inputs, by a :class:`TableEncoding`.

    Shapes: ``[B, F]`` float (numbers, NaN where missing; category codes) ->
    ``[B, encoding.width]`` float32. Its constants come from the encoding (which the model
    file records as JSON), so they are buffers that the state dict does not hold.
    """

    def __init__(self, encoding: TableEncoding) -> None:
        super().__init__()
        cols = encoding.columns
        num = [j for j, c in enumerate(cols) if c.kind == "number"]
        self._constant("num_index", torch.tensor(num, dtype=torch.long))
        self._constant("fill", torch.tensor([cols[j].fill for j in num]))
        self._constant("mean", torch.tensor([cols[j].mean for j in num]))
        self._constant("std", torch.tensor([cols[j].std for j in num]))
        flagged = [i for i, j in enumerate(num) if cols[j].indicator]
        self._constant("flagged", torch.tensor(flagged, dtype=torch.long))
        cat = [(j, cols[j].width) for j, c in enumerate(cols) if c.kind == "category"]
        self.cat_columns = [j for j, _ in cat]
        for k, (_, width) in enumerate(cat):
            self._constant(f"codes{k}", torch.arange(width, dtype=torch.float32))

    def _constant(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        parts = []
        if len(self.num_index):
            v = x.index_select(1, self.num_index)
            missing = torch.isnan(v)
            v = torch.where(missing, self.fill, v)
            parts.append((v - self.mean) / self.std)
            if len(self.flagged):
                parts.append(missing.index_select(1, self.flagged).float())
        for k, j in enumerate(self.cat_columns):
            parts.append((x[:, j:j + 1] == getattr(self, f"codes{k}")).float())
        return torch.cat(parts, dim=1)


def onnx_model(encoding: TableEncoding, output: str, opset: int) -> onnx.ModelProto:
    """A graph from one input per column (``[batch, 1]``: float for numbers, string for
    categories, named as the columns) to the student's raw rows ``[batch, F]`` (float32:
    numbers as given, categories as the student's codes through an ``ai.onnx.ml``
    ``LabelEncoder``; an unseen category gets the "other" code)."""
    nodes, inputs, parts = [], [], []
    for j, c in enumerate(encoding.columns):
        name = c.name
        if c.kind == "number":
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 1]))
            parts.append(name)
            continue
        inputs.append(helper.make_tensor_value_info(name, TensorProto.STRING, ["batch", 1]))
        other = len(c.categories)
        nodes.append(helper.make_node(
            "LabelEncoder", [name], [f"table_code{j}"], domain="ai.onnx.ml",
            keys_strings=list(c.categories) or [""],
            values_floats=[float(i) for i in range(len(c.categories))] or [float(other)],
            default_float=float(other)))
        parts.append(f"table_code{j}")
    nodes.append(helper.make_node("Concat", parts, [output], axis=1))
    graph = helper.make_graph(nodes, "table_columns", inputs, [
        helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", len(parts)])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid("ai.onnx.ml", 3)])


def column_feed(encoding: TableEncoding, rows: torch.Tensor,
                categories: dict[str, list[str]] | None) -> dict[str, np.ndarray]:
    """What the ONNX graph of :func:`onnx_model` takes for data rows ``[N, F]`` (in the
    encoding's column order; categories as the codes of the data's ``categories``): one
    ``[N, 1]`` array per column, strings for categories."""
    feed = {}
    for j, c in enumerate(encoding.columns):
        col = rows[:, j]
        if c.kind == "number":
            feed[c.name] = col.float().numpy().reshape(-1, 1)
        else:
            names = np.array((categories or {})[c.name], dtype=object)
            feed[c.name] = names[col.long().numpy()].reshape(-1, 1)
    return feed


def table_columns_of(pre: Any) -> bool:
    """Whether a student's ONNX graph takes one input per column: it has a column encoding
    with categories (strings cannot share a float tensor with numbers)."""
    return pre.table is not None and TableEncoding.from_json(pre.table).has_categories


def with_columns(proto: onnx.ModelProto, pre: Any) -> onnx.ModelProto:
    """A student's graph (rows ``[batch, F]`` in, as ``input``) with the columns' nodes of
    :func:`onnx_model` before it: one input per column, named as the columns."""
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    columns = onnx_model(TableEncoding.from_json(pre.table), "table_rows", opset)
    columns.ir_version = proto.ir_version
    merged = onnx.compose.merge_models(columns, proto, io_map=[("table_rows", "input")])
    merged.ir_version = proto.ir_version
    return merged


def table_check_inputs(pre: Any, rows: torch.Tensor, categories: dict[str, list[str]] | None
                       ) -> tuple[dict[str, Any], tuple[torch.Tensor]]:
    """Data rows (in the encoding's column order, categories as the data's codes) as the
    export's graph takes them (one ``[N, 1]`` array per column, or the rows as ``input``)
    and as the torch student takes them (the student's codes)."""
    enc = TableEncoding.from_json(pre.table)
    torch_rows = enc.recode(rows, categories)
    if enc.has_categories:
        return column_feed(enc, rows, categories), (torch_rows,)
    return {"input": torch_rows}, (torch_rows,)


def table_units(pre: Any) -> str:
    """What the export's inputs are, for its metadata."""
    enc = TableEncoding.from_json(pre.table)
    if not enc.has_categories:
        return (f"table rows as float32, shape [batch, {len(enc.columns)}], NaN where a "
                "number is missing; filled in and standardised inside")
    return ("one input per column, shape [batch, 1]: float32 for numbers (NaN where "
            "missing), strings for categories; encoded inside")
