"""Training on tables with categories or missing values: the student's column encoding.

``kdcli train`` and ``kdcli train-student`` call :func:`fit_table` on the training rows (the
transfer set's, for a student) when they are table rows with category columns or missing
numbers: the :class:`~kdcli.students.table_encoding.TableEncoding` is fitted there, the rows'
category codes are turned into the student's codes once, and the encoding goes into the
student's :class:`~kdcli.preprocessing.Preprocessing`, so that the model file, the teacher
loader and the ONNX export encode exactly as training did. Other tables train as before
(per-feature standardisation).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from kdcli.data.base import Data
from kdcli.errors import DataError, UsageError
from kdcli.output import Reporter
from kdcli.preprocessing import Preprocessing


def needs_encoding(inputs: torch.Tensor, names: list[str] | None,
                   categories: dict[str, list[str]] | None) -> bool:
    """Whether table rows ``[N, F]`` need a student's column encoding: they have category
    columns, or a missing number (NaN)."""
    if names is None or inputs.dim() != 2 or not inputs.is_floating_point():
        return False
    return bool(categories) or bool(torch.isnan(inputs).any())


def fit_table(inputs: torch.Tensor, names: list[str], categories: dict[str, list[str]] | None,
              max_categories: int, rep: Reporter) -> tuple[torch.Tensor, Preprocessing]:
    """Fit a student's column encoding on training rows and turn their category codes into
    the student's.

    Returns:
        The rows ``[N, F]`` (float32) with the student's codes, and the student's
        preprocessing (``raw_shape`` ``[F]``, the encoding in ``table``).
    """
    from kdcli.students.table_encoding import TableEncoding

    if max_categories < 2:
        raise UsageError(f"--max-categories must be 2 or more, got {max_categories}",
                         "Try --max-categories 32")
    enc = TableEncoding.fit(inputs, names, categories or {}, max_categories)
    cats = [c for c in enc.columns if c.kind == "category"]
    filled = [c.name for c in enc.columns if c.indicator]
    parts = []
    if cats:
        parts.append(f"{len(cats)} category column{'s' if len(cats) > 1 else ''} one-hot "
                     f"({sum(c.width for c in cats)} inputs"
                     + (f"; {', '.join(c.name for c in cats if c.other)} share an 'other' "
                        "column" if any(c.other for c in cats) else "") + ")")
    if filled:
        parts.append(f"missing numbers in {', '.join(filled[:5])}"
                     f"{', ...' if len(filled) > 5 else ''} filled with the training median, "
                     "with a 'was missing' input each")
    rep.info("table encoding: " + "; ".join(parts) + f": {enc.width} inputs in all")
    for name, what in constant_columns(inputs, names).items():
        rep.warn(f"column {name!r} is {what} in every training row: the student can learn "
                 "nothing from it. Leave it out of the data (--feature-columns)")
    pre = Preprocessing(raw_shape=[len(names)], units="table columns (numbers, NaN where "
                        "missing; category codes)", table=enc.to_json())
    return enc.recode(inputs, categories), pre


def constant_columns(inputs: torch.Tensor, names: list[str]) -> dict[str, str]:
    """The columns of rows ``[N, F]`` that hold no information: name -> ``missing`` (NaN in
    every row) or ``the same value`` (one value or code, and no gaps)."""
    out = {}
    for j, name in enumerate(names):
        v = inputs[:, j]
        missing = torch.isnan(v)
        if bool(missing.all()):
            out[name] = "missing"
        elif not bool(missing.any()) and bool((v == v[0]).all()):
            out[name] = "the same value"
    return out


def table_inputs(ts: Any, max_categories: int, rep: Reporter) -> tuple[Any, Preprocessing | None]:
    """A transfer set's inputs as a student trains on them: a table with categories or
    missing numbers through the student's column encoding (:func:`fit_table`), others as
    stored (``Rows``, and no preprocessing yet)."""
    rows, names = ts.columns["inputs"], ts.meta.get("feature_names")
    categories = ts.meta.get("categories")
    if names is None or len(rows.shape) != 2 or not rows.dtype.is_floating_point:
        return rows, None
    whole = rows.whole()
    if not needs_encoding(whole, names, categories):
        return rows, None
    return fit_table(whole, names, categories, max_categories, rep)


def refuse_gaps(inputs: Any, names: list[str] | None, source: str, model: str) -> None:
    """Refuse table rows with a missing number (NaN) for a model that cannot fill gaps in
    (one trained on rows without them), naming the column and row.

    Raises:
        DataError: the first gap.
    """
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        return
    nan = torch.isnan(inputs.reshape(len(inputs), -1))
    if not bool(nan.any()):
        return
    r, c = (int(v) for v in nan.nonzero()[0])
    col = names[c] if names is not None and c < len(names) else f"#{c + 1}"
    raise DataError(f"column {col!r} of {source} has a missing value in row {r + 1}, but "
                    f"{model} was trained on rows without gaps and cannot fill them in",
                    "Fill the gaps in first (--missing error lists them), or train the "
                    "model on data with gaps: kdcli students then fill them in themselves")


def encoded_table(ds: Data | None, pre: Preprocessing) -> Data | None:
    """Table data with its category codes turned into those of a student's encoding (for
    test errors); other data as is. Gaps are refused for a student without an encoding
    (:func:`refuse_gaps`)."""
    if ds is None or ds.is_text:
        return ds
    if pre.table is None:
        if ds.feature_names is not None:
            refuse_gaps(ds.inputs, ds.feature_names, ds.source, "the model")
        return ds
    from kdcli.students.table_encoding import TableEncoding

    return replace(ds, inputs=TableEncoding.from_json(pre.table).recode(ds.inputs,
                                                                       ds.categories))
