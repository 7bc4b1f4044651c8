"""What a table's column is as a feature, and how it becomes one: numbers (NaN where
missing), categories (codes into their sorted values), or neither (see
:mod:`kdcli.data.tables`); and rows named as a user counts them, for messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdcli.errors import DataError

# A string column with more distinct values than this (or than half its rows, when over
# 20) is no category by default: identifiers or free text.
MAX_DEFAULT_CATEGORIES = 1000


def kind(col: Any, named: bool = True) -> str:
    """What a column is as a feature: ``number``, ``category`` (strings that are not
    numbers, dictionary columns) or ``other`` (dates, binary, nested types; and by default,
    when not ``named``, string columns of mostly distinct values: identifiers, text)."""
    if holds_numbers(col):
        return "number"
    t = col.type
    if pa.types.is_dictionary(t):  # declared categories (pandas' category dtype)
        v = t.value_type
        return "category" if pa.types.is_string(v) or pa.types.is_large_string(v) else "other"
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        return "other"
    if named:
        return "category"
    k = pc.count_distinct(col).as_py()
    many = k > MAX_DEFAULT_CATEGORIES or (k > 20 and k > col.length() // 2)
    return "other" if many else "category"


def codes(col: Any) -> tuple[np.ndarray, list[str]]:
    """A category column as codes (indices into its sorted categories; a missing value is
    the category ``""``) and the categories."""
    values = pc.fill_null(col.cast(pa.string()), "")
    cats = sorted(str(v) for v in pc.unique(values).to_pylist())
    codes = pc.index_in(values, value_set=pa.array(cats, pa.string()))
    return codes.to_numpy(zero_copy_only=False).astype(np.float32), cats


# A string column is numbers with typos (its first bad value reported) when at least this
# share of its values parse as numbers; otherwise it is categories (which may look like
# numbers: an island called "0").
NUMBER_SHARE = 0.9


def holds_numbers(col: Any) -> bool:
    """Whether a column is numbers: numbers, booleans, all-missing, or a string column
    whose values nearly all (:data:`NUMBER_SHARE`) parse as numbers (so that a typo is
    reported, not read as a category). Text, categories, dates and other types are not."""
    t = col.type
    if (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
            or pa.types.is_decimal(t) or pa.types.is_null(t)):
        return True
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        return False
    values = [v for v in col.to_pylist() if v is not None]
    return bool(values) and sum(map(parses, values)) >= NUMBER_SHARE * len(values)


def parses(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def check_present(col: Any, name: str, path: Path, empty: bool = False) -> None:
    """Refuse a missing value (and, with ``empty``, an empty string: a CSV's missing
    category), naming the column and rows."""
    if empty and not col.null_count:
        blank = pc.equal(pc.utf8_trim_whitespace(col.cast(pa.string())), "")
        if pc.any(blank).as_py():
            raise DataError(f"column {name!r} of {path} has a missing value in "
                            f"{rows(path, blank)}", "Fill or drop rows with missing values")
    if col.null_count:
        raise DataError(f"column {name!r} of {path} has a missing value in "
                        f"{rows(path, pc.is_null(col))}",
                        "Fill or drop rows with missing values")


def numeric(col: Any, name: str, path: Path) -> np.ndarray:
    """A numeric column as a numpy array (integers stay integers, bools become 0/1).

    Raises:
        DataError: a column of text, categories, dates or another type that holds no
            numbers, or a value that is not a number, naming the column (and row).
    """
    t = col.type
    if (pa.types.is_integer(t) or pa.types.is_floating(t)) and not col.null_count:
        return col.to_numpy()
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) \
            or pa.types.is_decimal(t) or pa.types.is_null(t):  # missing values: NaN
        return col.cast(pa.float64()).to_numpy(zero_copy_only=False)
    one_hot = ("Leave it out of --feature-columns, or turn it into numbers first (one 0/1 "
               "column per category)")
    if pa.types.is_temporal(t):
        raise DataError(f"column {name!r} of {path} holds dates or times ({t}), "
                        "not numbers", "Leave it out of --feature-columns, or turn it into "
                        "numbers first (say, days since a start date)")
    if pa.types.is_dictionary(t):
        raise DataError(f"column {name!r} of {path} holds categories, not numbers",
                        one_hot)
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise DataError(f"column {name!r} of {path} has type {t}, not numbers",
                        "Leave it out of --feature-columns")
    values = col.to_pylist()
    at = next((i for i, v in enumerate(values) if not parses(v)), 0)
    shown = str(values[at])[:40]  # a string: quoted, and escaped to one line
    if not holds_numbers(col):
        raise DataError(f"column {name!r} of {path} holds text, not numbers "
                        f"({shown!r} in {row(path, at)})", one_hot)
    raise DataError(f"column {name!r} of {path} is not numeric: {shown!r} in "
                    f"{row(path, at)}",
                    "Fix the value, or leave the column out with --feature-columns")


def row(path: Path, i: int) -> str:
    """Data row ``i`` (0-based) as a user counts it: 1-based, and the file line for an
    uncompressed CSV/TSV (one header line; other sources' rows need not be lines)."""
    if path.suffix.lower() in (".csv", ".tsv"):
        return f"row {i + 1} (line {i + 2})"
    return f"row {i + 1}"


def rows(path: Path, mask: Any) -> str:
    """The rows where ``mask`` (a boolean column) is true, as :func:`_row` says them: the
    first, or the first three and how many in all."""
    rows = np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))
    return rows_at(path, [int(i) for i in rows])


def rows_at(path: Path, rows: list[int], lines: bool = True) -> str:
    """Rows (0-based) as :func:`_row` says them: the first, or the first three and how many
    in all (without file lines when ``lines`` is False: quoted texts may span lines)."""
    if not lines:
        path = path.with_suffix(".table")
    if len(rows) == 1:
        return row(path, int(rows[0]))
    shown = ", ".join(str(int(i) + 1) for i in rows[:3])
    more = f", ... ({len(rows)} rows in all)" if len(rows) > 3 else ""
    lines = (" (lines " + ", ".join(str(int(i) + 2) for i in rows[:3]) + (", ..." if more else "")
             + ")") if path.suffix.lower() in (".csv", ".tsv") else ""
    return f"rows {shown}{more}{lines}"
