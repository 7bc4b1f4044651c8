"""Tables as a data source: CSV/TSV (read by ``pyarrow.csv``) and Parquet (``pyarrow.parquet``).

One row is one example. The label column is ``--label-column`` (default ``label`` when the
table has one; otherwise the table is unlabelled), the features are ``--feature-columns``
(default: every other column that holds numbers or categories, in table order). Integer
labels are class indices; string labels are class names, numbered in sorted order; an empty
or missing label is an error naming its rows.

Features become float32 ``[N, F]``:

- **Numbers** (integers, floats, decimals, booleans as 0/1, strings that parse as numbers):
  as they are; a missing value is NaN, imputed inside the student (see
  :mod:`kdcli.students.table_encoding`), or refused naming its row with ``--missing
  error``.
- **Categories** (strings, pandas ``category``/Parquet dictionary columns): each value's
  code, its index in the column's categories (sorted), which :attr:`Loaded.categories`
  lists; a missing value is the category ``""``. A string column whose values are mostly
  distinct (identifiers, free text: more than half the rows and more than 20 values, or
  over 1,000 values) is no category and is left out, and said once.
- **Dates, times and other types** are left out and said once; named in
  ``--feature-columns`` they are refused with the column's name and a hint.

An unnamed first column of distinct whole numbers (the index pandas' ``to_csv`` writes) is
left out and said once (:attr:`Loaded.notes`). The Kaggle MNIST layout is images: features
named ``pixel0`` .. ``pixel{n-1}`` with ``n`` a square and integer values in 0-255 become
uint8 ``[N, s, s]``, exactly what the IDX files give. Non-numeric values in a numeric
column and ragged rows are refused with the column and row.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import gzip
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from kdcli.data.base import DataOptions, Loaded, first_line
from kdcli.data.table_columns import (
    check_present,
    codes,
    kind,
    numeric,
    row,
    rows,
    rows_at,
)
from kdcli.errors import DataError, quote_name

_PIXEL = re.compile(r"^pixel(\d+)$")
# The longest CSV line (or file, read as one block) pyarrow is given: 256 MiB.
MAX_BLOCK = 256 << 20
_MAX_LABEL = 2**62  # larger values do not fit an int64 class index (and are not classes)


def read(path: Path, split: str, options: DataOptions) -> Loaded:
    """Read a CSV/TSV/Parquet file as examples.

    Returns:
        Features as float32 ``[N, F]`` (or uint8 images, see the module docstring), labels,
        class names for string labels, and the feature names.

    Raises:
        DataError: a missing column, a non-numeric or missing value, or a ragged row, each
            naming the column and row.
    """
    return from_table(_read_table(path), path, options)


def from_table(table: pa.Table, path: Path, options: DataOptions) -> Loaded:
    """Turn a table read from ``path`` into examples: the column logic every table source
    shares (:mod:`kdcli.data.jsonl` reads its files with it too).

    Args:
        table: The table as pyarrow read it, one row per example.
        path: The file it came from (named in errors).
        options: ``--label-column`` and ``--feature-columns``.

    Returns:
        As :func:`read`.

    Raises:
        DataError: as :func:`read`.
    """
    names = list(table.column_names)
    counts = collections.Counter(names)
    dup = next((c for c in names if counts[c] > 1), None)
    if dup is not None:
        raise DataError(f"{path} has the column name {dup!r} {counts[dup]} times",
                        "Give every column its own name")
    if table.num_rows == 0:
        raise DataError(f"{path} holds no rows (columns: {_few(names)})",
                        "Give a table with a header and at least one row")
    label = _label_column(names, options, path)
    if options.text_columns is not None:
        return _texts(table, label, options.text_columns, path)
    index = _pandas_index(table, label, options)
    features, skipped = _feature_columns(table, label, index, options, path)
    columns, categories = [], {}
    for name in features:
        col = table.column(name)
        category = kind(col) == "category"  # parses every string once: asked once
        if options.missing == "error":
            check_present(col, name, path, empty=category)
        if category:
            values, categories[name] = codes(col)
            columns.append(values)
        else:
            columns.append(numeric(col, name, path))
    inputs = np.stack(columns, axis=1) if columns else np.zeros((table.num_rows, 0))
    if inputs.size and not categories:
        inputs = _as_images(inputs, features)
    inputs = inputs.astype(np.float32) if inputs.dtype != np.uint8 else inputs
    labels, class_names = (None, None) if label is None else _labels(table, label, path)
    notes = []
    if index is not None:
        notes.append(f"{path}: left out its column {index!r}, the row index pandas wrote "
                     "with the table" if index not in ("", "Unnamed: 0") else
                     f"{path}: left out its unnamed first column, the row index pandas' "
                     "to_csv writes")
    if skipped:
        notes.append(f"{path}: left out {len(skipped)} column{'s' if len(skipped) > 1 else ''} "
                     f"that {'hold' if len(skipped) > 1 else 'holds'} neither numbers nor "
                     f"categories: {_few(skipped)} (text, identifiers or dates)")
    hint = _label_like(table, skipped + list(categories)) if label is None else None
    if hint in features and options.label_column is None:
        notes.append(f"{path}: its column {quote_name(hint)} looks like labels but is read "
                     f"as a feature (the table has no column 'label'); pass --label-column "
                     f"{quote_name(hint)}, or --label-column none to read it as a feature")
    return Loaded(inputs, labels, class_names, features, notes, hint, categories or None)


def _texts(table: pa.Table, label: str | None, text_columns: tuple[str, ...],
           path: Path) -> Loaded:
    """The examples of a table read with ``--text-column``: its text column (or two, for
    sentence pairs) as :class:`~kdcli.data.text.Texts`, and the labels."""
    from kdcli.data.text import from_columns

    names = list(table.column_names)
    missing = [c for c in text_columns if c not in names]
    if missing:
        like = _text_like(table, names)
        raise DataError(f"{path} has no column {missing[0]!r} (columns: {_few(names)})",
                        f"Pass --text-column {quote_name(like)}" if like else
                        "Pass --text-column with the table's text column")
    if label in text_columns:
        raise DataError(f"column {label!r} of {path} is both the label and a text column",
                        "Pick another --label-column or --text-column")
    columns = []
    for name in text_columns:
        col = table.column(name)
        t = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):  # pyarrow: not UTF-8
            values = col.to_pylist()
            row = next((i for i, v in enumerate(values) if v is not None and
                        not _is_utf8(v)), 0)
            raise DataError(f"column {name!r} of {path} holds bytes that are not UTF-8 in "
                            f"{rows_at(path, [row], lines=False)}", "Convert the file to "
                            "UTF-8 (e.g. iconv -f latin1 -t utf-8)")
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
            raise DataError(f"column {name!r} of {path} holds {t}, not text",
                            "Pass --text-column with a column of text")
        columns.append(col.to_pylist())
    notes: list[str] = []
    texts = from_columns(columns, str(path), names=list(text_columns),
                         say_rows=lambda rows: rows_at(path, rows, lines=False),
                         notes=notes)
    labels, class_names = (None, None) if label is None else _labels(table, label, path)
    hint = _label_like(table, [c for c in names if c not in text_columns]) \
        if label is None else None
    return Loaded(texts, labels, class_names, None, notes, hint)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _text_like(table: pa.Table, names: list[str]) -> str | None:
    """A column that looks like text to classify: strings averaging 20 characters or more
    (named in hints), or None."""
    for c in names:
        col = table.column(c)
        if (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)) \
                and col.length() - col.null_count:
            mean = pc.mean(pc.utf8_length(col)).as_py() or 0
            if mean >= 20:
                return c
    return None


def _read_table(path: Path) -> pa.Table:
    parquet = path.suffix.lower() in (".parquet", ".pq")
    bad: list[Any] = []

    def on_invalid(row: Any) -> str:
        bad.append(row)
        return "error"

    try:
        if parquet:
            return pq.read_table(path)
        _check_text(path)
        delimiter = "\t" if ".tsv" in "".join(path.suffixes).lower() else ","
        with _no_unraisable():
            return pcsv.read_csv(path, read_options=pcsv.ReadOptions(
                use_threads=False, block_size=_block_size(path)),
                parse_options=pcsv.ParseOptions(delimiter=delimiter,
                                                invalid_row_handler=on_invalid))
    except (pa.ArrowException, OSError) as e:
        if "straddl" in str(e) or ("Empty CSV file or block" in str(e)
                                   and _block_size(path) >= MAX_BLOCK):
            raise DataError(f"{path} has a line or field longer than "
                            f"{MAX_BLOCK >> 20} MiB, the most kdcli reads in one piece",
                            "Split the long lines, or store the data as .npz or "
                            "Parquet") from e
        if bad:
            r = bad[0]
            where = f"line {r.number}" if r.number is not None else "a row"
            raise DataError(f"{path} {where} has {r.actual_columns} fields, but the header "
                            f"has {r.expected_columns} columns",
                            "Give every row the same number of fields") from e
        first = _printable(first_line(e))
        kind = "Parquet" if parquet else "CSV"
        raise DataError(f"cannot read {path} as {kind}: {first}",
                        f"Check that the file is a valid {kind} table") from e


def _block_size(path: Path) -> int:
    """pyarrow's block: the whole file up to MAX_BLOCK (a line must fit in one block; its
    default of 1 MiB refused a 1 MB header). Compressed files may grow 8 times."""
    try:
        size = path.stat().st_size * (8 if path.suffix.lower() == ".gz" else 1)
    except OSError:
        size = 0
    return int(min(MAX_BLOCK, max(1 << 20, size + 1)))


def _check_text(path: Path) -> None:
    """Refuse a CSV whose start is not text (NUL bytes, or not UTF-8), before pyarrow
    prints the raw bytes."""
    head = b""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with contextlib.suppress(OSError, EOFError), opener(path, "rb") as f:
        head = f.read(1 << 16)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        ok = b"\0" not in head
    except UnicodeDecodeError:
        ok = False
    if not ok:
        raise DataError(f"{path} is not a UTF-8 text table: its first 64 KiB hold NUL bytes "
                        "or bytes that are not UTF-8 (a binary file, or another encoding)",
                        "Give a CSV/TSV file in UTF-8 (convert other encodings first)")


@contextlib.contextmanager
def _no_unraisable() -> Iterator[None]:
    """Hold back the 'Exception ignored in ...' tracebacks pyarrow prints when a row it
    hands to a callback is not UTF-8 (the read then fails and kdcli reports it)."""
    old = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    finally:
        sys.unraisablehook = old


def _printable(text: str) -> str:
    """pyarrow's message without the row it quotes (which may be binary junk), and with
    control characters and undecodable bytes escaped (one line)."""
    text = re.sub(r"(Expected \d+ columns, got \d+):.*", r"\1", text)
    return "".join(c if c.isprintable() and c != "\ufffd" else repr(c)[1:-1] for c in text)


def _label_column(names: list[str], opts: DataOptions, path: Path) -> str | None:
    label = opts.label_column
    if label is None:
        return "label" if "label" in names else None
    if label.lower() == "none":
        return None
    if label not in names:
        raise DataError(f"{path} has no label column {label!r} (columns: {_few(names)})",
                        "Pass --label-column with one of the table's columns, or none")
    return label


def _feature_columns(table: Any, label: str | None, index: str | None, opts: DataOptions,
                     path: Path) -> tuple[list[str], list[str]]:
    """The feature columns, and the columns left out because they hold no numbers."""
    names = list(table.column_names)
    if opts.feature_columns is not None:
        missing = [c for c in opts.feature_columns if c not in names]
        if missing:
            raise DataError(f"{path} has no column {missing[0]!r} (columns: {_few(names)})",
                            "Pass --feature-columns with the table's column names")
        if label in opts.feature_columns:
            raise DataError(f"column {label!r} of {path} is both the label and a feature",
                            "Drop it from --feature-columns, or pick another --label-column")
        return list(opts.feature_columns), []
    rest = [c for c in names if c not in (label, index)]
    skipped = [c for c in rest if kind(table.column(c), named=False) == "other"]
    features = [c for c in rest if c not in skipped]
    if not features:
        like = _text_like(table, skipped)
        if like is not None:
            raise DataError(f"{path} has no numeric feature columns; its column "
                            f"{quote_name(like)} holds text", f"Pass --text-column "
                            f"{quote_name(like)} to read the rows as texts")
        raise DataError(f"{path} has no numeric feature columns (columns: {_few(names)})",
                        "Pass --feature-columns, or give the table numeric columns")
    return features, skipped


def _pandas_index(table: Any, label: str | None, opts: DataOptions) -> str | None:
    """The name of the first column when it is the row index pandas' ``to_csv`` writes: no
    header (or pandas' ``Unnamed: 0`` for one read and written again), distinct whole
    numbers from 0 (0..N-1, or the rows a split kept). None otherwise, or when the user
    names the features."""
    if opts.feature_columns is not None or table.num_columns < 2:
        return None
    meta = table.schema.pandas_metadata or {}
    kept = [c for c in meta.get("index_columns", []) if isinstance(c, str)
            and c in table.column_names and c != label]
    if kept:  # to_parquet keeps a non-default index as a column, and says so
        return kept[0]
    name = table.column_names[0]
    col = table.column(0)
    if name not in ("", "Unnamed: 0") or name == label or not pa.types.is_integer(col.type):
        return None
    if col.null_count or pc.min(col).as_py() < 0:
        return None
    return name if pc.count_distinct(col).as_py() == table.num_rows else None


# Column names that say "the label" (compared in lower case).
_LABEL_NAMES = ("label", "labels", "target", "class", "classes", "y", "species", "outcome",
                "category", "diagnosis", "survived")


def _label_like(table: Any, skipped: list[str]) -> str | None:
    """A column that looks like the labels of a table read as unlabelled: one named like a
    label, else a text column of few distinct values (at most 20, and at most half the
    rows). Named in the "has no labels" error."""
    named = [c for c in table.column_names if c.strip().lower() in _LABEL_NAMES]
    if named:
        return named[0]
    for c in skipped:
        col = table.column(c)
        t = col.type
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
            k = pc.count_distinct(col.cast(pa.string())).as_py()
            if 2 <= k <= min(20, table.num_rows // 2):
                return c
    return None


def _as_images(inputs: np.ndarray, features: list[str]) -> np.ndarray:
    """Kaggle's ``pixel0..pixel{n-1}`` columns with values 0-255 -> uint8 ``[N, s, s]``."""
    n = len(features)
    side = math.isqrt(n)
    is_pixels = side * side == n and all(
        (m := _PIXEL.match(f)) is not None and int(m[1]) == i for i, f in enumerate(features))
    if (is_pixels and np.issubdtype(inputs.dtype, np.integer)
            and int(inputs.min()) >= 0 and int(inputs.max()) <= 255):
        return inputs.astype(np.uint8).reshape(len(inputs), side, side)
    return inputs.astype(np.float32)


def _labels(table: Any, label: str, path: Path) -> tuple[np.ndarray, list[str] | None]:
    """Integer class indices and, for string labels, the sorted class names."""
    col = table.column(label)
    check_present(col, label, path)
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        values = [str(v) for v in col.to_pylist()]
        empty = pc.equal(pc.utf8_trim_whitespace(col.cast(pa.string())), "")
        if pc.any(empty).as_py():
            raise DataError(f"label column {label!r} of {path} is empty in "
                            f"{rows(path, empty)}", "Give every row a label, or drop the "
                            "unlabelled rows")
        _check_one_kind(values, label, path)
        names = sorted(set(values))
        index = {c: i for i, c in enumerate(names)}
        return np.array([index[v] for v in values], dtype=np.int64), names
    if pa.types.is_boolean(t):
        return col.to_numpy().astype(np.int64), None
    if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise DataError(f"label column {label!r} of {path} has type {t}",
                        "Use integer class indices or class names")
    y = col.to_numpy()
    bad = np.nonzero((y < 0) | ~np.isfinite(y) | (y != np.floor(y)) | (y > _MAX_LABEL))[0]
    if len(bad):
        raise DataError(f"label column {label!r} of {path} holds {y[bad[0]].item()!r} in "
                        f"{row(path, int(bad[0]))}",
                        "Labels must be class indices 0, 1, ... or class names")
    return y.astype(np.int64), None


def _check_one_kind(values: list[str], label: str, path: Path) -> None:
    """Refuse string labels that mix whole numbers and names (``0``, ``1``, ``pos``): class
    indices and class names cannot be numbered together."""
    number = [i for i, v in enumerate(values) if re.fullmatch(r"\s*[-+]?\d+(\.0*)?\s*", v)]
    if not number or len(number) == len(values):
        return
    numbers = set(number)
    name = next(i for i in range(len(values)) if i not in numbers)
    raise DataError(f"label column {label!r} of {path} mixes numbers and names: "
                    f"{values[number[0]]!r} in {row(path, number[0])}, {values[name][:40]!r} "
                    f"in {row(path, name)}", "Use class indices 0, 1, ... or class names "
                    "throughout")


def _few(names: list[str], n: int = 8) -> str:
    shown = ", ".join(quote_name(name) for name in names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")
