"""JSON Lines tables as a data source: one JSON object per line, read by ``pyarrow.json``.

Each object is one example, its keys the columns (``{"f1": 0.3, "f2": 1.2, "label": "red"}``);
blank lines are skipped. Columns are chosen and checked exactly as for CSV and Parquet
(:func:`kdcli.data.tables.from_table`): ``--label-column`` / ``--feature-columns``, integer
labels as class indices and string labels as class names, numeric features, and missing
values (a key absent from a line, or ``null``) refused with the column and row. A line that
is not JSON, not an object, or gives a column another JSON type than earlier lines is
refused with its line number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.json as pjson

from kdcli.data.base import DataOptions, Loaded, first_line
from kdcli.data.tables import MAX_BLOCK, from_table
from kdcli.errors import DataError

_HINT = ("Give UTF-8 text, one JSON object per line, each column of one type (numbers "
         "unquoted)")


def read(path: Path, split: str, options: DataOptions) -> Loaded:
    """Read a ``.jsonl`` file as examples.

    Returns:
        As :func:`kdcli.data.tables.read`: float32 features ``[N, F]``, labels, class names
        for string labels, and the feature names.

    Raises:
        DataError: a line that is not a JSON object, a column whose type changes, a missing
            column, or a non-numeric or missing value, naming the line or column and row.
    """
    return from_table(_read_json(path), path, options)


def _read_json(path: Path) -> pa.Table:
    # The whole file as one block (up to MAX_BLOCK), so every line is read with one schema.
    block = int(min(MAX_BLOCK, max(1 << 20, path.stat().st_size + 1)))
    try:
        table = pjson.read_json(path, read_options=pjson.ReadOptions(use_threads=False,
                                                                     block_size=block))
        table.validate(full=True)  # pyarrow keeps strings that are not UTF-8; refuse them
        return table
    except (pa.ArrowException, OSError, ValueError) as e:
        bad = _first_bad_line(path)
        if bad is not None:
            raise DataError(f"{path} {bad}", _HINT) from e
        if "straddl" in str(e):
            raise DataError(f"{path} has a line longer than {MAX_BLOCK >> 20} MiB, the most "
                            "kdcli reads in one piece",
                            "Split the long lines, or store the data as .npz or Parquet") from e
        raise DataError(f"cannot read {path} as JSON Lines: {first_line(e)!r}", _HINT) from e


def _first_bad_line(path: Path) -> str | None:
    """What is wrong with the first bad line, found by reading the file again in Python
    (pyarrow's message counts rows per block, without blank lines); None if none is."""
    kinds: dict[str, tuple[str, int]] = {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                return f"line {n} is not UTF-8 text"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                return f"line {n} is not JSON ({getattr(e, 'msg', e)})"
            if not isinstance(obj, dict):
                return f"line {n} is a JSON {_kind(obj)}, not an object"
            for key, value in obj.items():
                if value is None:
                    continue
                kind, first = kinds.setdefault(key, (_kind(value), n))
                if kind != _kind(value):
                    return (f"column {key!r} holds a {_kind(value)} on line {n} but a {kind} "
                            f"on line {first}")
    return None


def _kind(value: Any) -> str:
    """A JSON value's type as JSON names it (ints and floats are both numbers)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), "null")
