"""The types every data source shares, and the checks made on whatever a source returns.

A source module (:mod:`kdcli.data.mnist`, :mod:`kdcli.data.idx`, :mod:`kdcli.data.images`,
:mod:`kdcli.data.arrays`, :mod:`kdcli.data.tables`) imports from here only (a table format
such as :mod:`kdcli.data.jsonl` also reuses ``tables``' column logic); the table that lists
them and :func:`~kdcli.data.sources.load_data` live in :mod:`kdcli.data.sources`.

How tables and image folders are read (label and feature columns, channels, image size) is
one :class:`DataOptions`, taken by every command that reads data.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from kdcli.data.text import Texts
from kdcli.errors import DataError, KdcliError, UsageError, quote_name

# The splits a spec may name after a colon: ``mnist:test``, ``DIR:train``.
SPLITS = ("train", "test")


@dataclass(frozen=True)
class DataOptions:
    """How a table or an image folder becomes examples (other sources ignore these).

    Attributes:
        label_column: A table's label column. None: ``label`` when the table has one, else
            unlabelled; ``"none"``: unlabelled even if there is one.
        feature_columns: A table's feature columns, in order (None: every other column of
            numbers or categories).
        missing: What a missing number in a table's features is: ``impute`` (None, the
            default: NaN, filled in by the student) or ``error`` (refused, naming the row).
        text_columns: A table's text column, or two for sentence pairs: the examples are
            these texts (:mod:`kdcli.data.text`) instead of numeric features.
        channels: Images as 1 (grayscale) or 3 (RGB) channels (None: RGB if any image is in
            colour, else grayscale).
        image_size: ``(H, W)`` to resize every image to (None: the images must share a size).
    """

    label_column: str | None = None
    feature_columns: tuple[str, ...] | None = None
    missing: str | None = None
    text_columns: tuple[str, ...] | None = None
    channels: int | None = None
    image_size: tuple[int, int] | None = None

    def check(self) -> None:
        """Raise UsageError for values no source can take."""
        if self.channels not in (None, 1, 3):
            raise UsageError(f"--channels must be 1 or 3, got {self.channels}",
                             "Use --channels 1 (grayscale) or 3 (RGB)")
        if self.image_size is not None and (len(self.image_size) != 2
                                            or min(self.image_size) <= 0):
            raise UsageError(f"--image-size must be two positive numbers H,W, got "
                             f"{self.image_size}", "Try --image-size 32,32")
        if self.missing not in (None, "impute", "error"):
            raise UsageError(f"unknown --missing {self.missing!r}",
                             "Use --missing impute (the default) or --missing error")
        if self.feature_columns is not None and not self.feature_columns:
            raise UsageError("--feature-columns is empty", "Name at least one column")
        if self.text_columns is not None:
            if len(self.text_columns) not in (1, 2) or not all(self.text_columns):
                raise UsageError(f"--text-column takes one column name, or two for sentence "
                                 f"pairs, got {','.join(self.text_columns)!r}",
                                 "Try --text-column text, or --text-column premise,hypothesis")
            if len(set(self.text_columns)) != len(self.text_columns):
                raise UsageError("--text-column names the same column twice",
                                 "Name two different columns for sentence pairs")
            if self.feature_columns is not None:
                raise UsageError("--text-column and --feature-columns together: kdcli reads "
                                 "an example as text or as numeric features, not both",
                                 "Give one of them")

    def recorded(self) -> dict[str, Any]:
        """The non-default options, as JSON-ready values (kept in output metadata)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in self.__dict__.items() if v is not None}


def recorded_options(explicit: DataOptions | None, training: dict[str, Any]) -> DataOptions:
    """The data options a model file's (or transfer set's) record keeps, each overridden by
    the one given in ``explicit`` (the command line's; None or an unset field: the
    record's)."""
    rec = training.get("data_options") or {}
    try:
        kept = DataOptions(
            label_column=rec.get("label_column"),
            feature_columns=tuple(rec["feature_columns"]) if rec.get("feature_columns") else None,
            missing=rec.get("missing"),
            text_columns=tuple(rec["text_columns"]) if rec.get("text_columns") else None,
            channels=rec.get("channels"),
            image_size=tuple(rec["image_size"]) if rec.get("image_size") else None)
    except (AttributeError, TypeError) as e:
        raise DataError(f"bad data_options {rec!r} in the model file",
                        "Pass the data options (--label-column, ...) explicitly") from e
    given = {k: v for k, v in (explicit.__dict__ if explicit else {}).items() if v is not None}
    return replace(kept, **given)


@dataclass
class Data:
    """A labelled or unlabelled set of examples held in memory as tensors.

    Attributes:
        inputs: ``[N, *sample_shape]`` in the dtype the source stores (uint8 for MNIST and
            images: ``[N, H, W]`` grayscale, ``[N, C, H, W]`` colour; float32 for tables),
            or N texts or pairs of texts (:class:`~kdcli.data.text.Texts`).
        labels: ``[N]`` int64 class indices, or None.
        source: The spec this was loaded from, recorded in output metadata.
        files: Memory-mapped files the inputs live in.
        class_names: Names of classes 0..C-1 (folder names or a label column's strings),
            or None for numeric labels.
        feature_names: A table's feature column names, or None.
        notes: What the user is told once about how the source was read (columns left
            out, say).
        label_hint: For unlabelled data, a column that looks like its labels (named in the
            "has no labels" error), or None.
        categories: A table's category columns, each with its categories in code order:
            such a column of ``inputs`` holds codes (indices into them), the others
            numbers, NaN where missing (see :mod:`kdcli.data.tables`). None: no categories.
    """

    inputs: torch.Tensor | Texts
    labels: torch.Tensor | None
    source: str
    files: list = field(default_factory=list)
    class_names: list[str] | None = None
    feature_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    label_hint: str | None = None
    categories: dict[str, list[str]] | None = None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def is_text(self) -> bool:
        """Whether the examples are texts (:class:`~kdcli.data.text.Texts`)."""
        return isinstance(self.inputs, Texts)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    @property
    def num_classes(self) -> int | None:
        """One more than the largest label, or None for unlabelled data."""
        if self.labels is None or len(self.labels) == 0:
            return None
        return int(self.labels.max()) + 1

    def release(self) -> None:
        """Drop the resident pages of memory-mapped inputs (they are re-read on use)."""
        for f in self.files:
            f.release()


@dataclass
class Loaded:
    """What a source's reader returns: inputs (a numpy array, or ``(tensor, MappedFile)``
    when memory-mapped), labels (numpy, tensor or None), optional names, and the notes,
    label hint and categories of :class:`Data`."""

    inputs: Any
    labels: Any = None
    class_names: list[str] | None = None
    feature_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    label_hint: str | None = None
    categories: dict[str, list[str]] | None = None


class Reader(Protocol):
    """A source's reader, named in the table of :mod:`kdcli.data.sources`."""

    def __call__(self, source: Path | str, split: str, options: DataOptions) -> Loaded:
        """Read one source.

        Args:
            source: The path, or the bundled name (``mnist``) for a source that is no path.
            split: ``train``, ``test`` or ``""`` (the part after a colon, if it names one).
            options: How tables and image folders are read.

        Returns:
            The examples, before the checks of :func:`validate`.

        Raises:
            DataError: the source is malformed, naming what and where.
        """


def no_labels(data: Data, needs: str, error: type[KdcliError] = DataError) -> KdcliError:
    """The error for unlabelled data where labels are needed: for a table it names
    ``--label-column`` and, when the table has a column that looks like its labels, that
    column.

    Args:
        data: The unlabelled data.
        needs: What to do instead, as a clause, e.g. ``give labelled --eval-data``.
        error: The error's class.
    """
    if data.label_hint is not None:
        return error(f"{data.source} has no labels; its column {quote_name(data.label_hint)} "
                     "looks like them", f"Pass --label-column {quote_name(data.label_hint)} "
                     f"({needs})")
    if data.feature_names is not None:
        return error(f"{data.source} has no labels", "Pass --label-column with the table's "
                     f"label column ({needs})")
    return error(f"{data.source} has no labels", needs[:1].upper() + needs[1:])


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), for an error."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def check_same_classes(a: list[str] | None, a_source: str, b: list[str] | None,
                       b_source: str) -> None:
    """Refuse two sets of class names that differ (say, train and test folders).

    Numeric labels (None on either side) are not compared.

    Raises:
        DataError: naming both sources and the classes only one of them has.
    """
    if a is None or b is None or list(a) == list(b):
        return
    only_a = [c for c in a if c not in b][:3]
    only_b = [c for c in b if c not in a][:3]
    what = (f"{a_source} has {only_a} that {b_source} lacks" if only_a else
            f"{b_source} has {only_b} that {a_source} lacks" if only_b else
            f"the same classes in another order ({a[:3]}... vs {b[:3]}...)")
    raise DataError(f"classes differ between {a_source} and {b_source}: {what}",
                    "Give both the same class folders (or label values)")


def align_classes(data: Data, names: list[str] | None) -> list[str]:
    """Number ``data``'s labels by ``names`` when its class names are some or all of them
    (a test set that lacks a class the model has; string labels, numbered in sorted order,
    of a model whose classes come in another order); return the classes it lacks, in order.

    Names that are not a subset of ``names`` are left as they are (for
    :func:`check_same_classes` to compare).
    """
    have = data.class_names
    if names is None or have is None or list(have) == list(names) or \
            not set(have) <= set(names):
        return []
    index = torch.tensor([list(names).index(c) for c in have], dtype=torch.long)
    if data.labels is not None:
        data.labels = index[data.labels]
    data.class_names = list(names)
    return [c for c in names if c not in have]


def absent_text(absent: list[str], source: str) -> str:
    """The note that ``source`` lacks the classes ``absent``: ``class c does not occur in
    test.csv``."""
    shown = ", ".join(quote_name(c) for c in absent[:5]) + (", ..." if len(absent) > 5 else "")
    return (f"class{'es' if len(absent) > 1 else ''} {shown} of the model "
            f"{'do' if len(absent) > 1 else 'does'} not occur in {source}: "
            "evaluated on the others")


def validate(data: Data) -> None:
    """Check that data is non-empty, finite and consistently labelled.

    Raises:
        DataError: naming what is wrong.
    """
    if len(data) == 0:
        raise DataError(f"data {data.source} holds no examples", "Check the file or the slice")
    if data.is_text:
        pass  # texts are checked as they are read (kdcli.data.text)
    elif data.inputs.dtype == torch.bool or data.inputs.is_complex():
        raise DataError(f"inputs of {data.source} have dtype {data.inputs.dtype}",
                        "Store real-valued inputs")
    elif data.inputs.is_floating_point():
        # a table's missing numbers are NaN (imputed by the student); infinities never are
        finite = (lambda c: ~torch.isinf(c)) if data.feature_names is not None else torch.isfinite
        step = max(1, (64 << 20) // max(1, data.inputs[0].numel() * data.inputs.element_size()))
        for start in range(0, len(data), step):
            chunk = data.inputs[start:start + step]
            chunk = chunk.reshape(len(chunk), -1)
            ok = finite(chunk).all(1)
            if not bool(ok.all()):
                bad = (start + (~ok).nonzero()[:5, 0]).tolist()
                if data.feature_names is not None and chunk.dim() == 2:  # a table's cell
                    r, c = (int(v) for v in torch.isinf(chunk).nonzero()[0])
                    raise DataError(f"column {data.feature_names[c]!r} of "
                                    f"{data.source} holds an infinite value in row "
                                    f"{start + r + 1}", "Fix the value, or leave the row out")
                raise DataError(f"inputs of {data.source} contain NaN or Inf (rows {bad})",
                                "Clean the data")
            data.release()
    if data.labels is not None:
        if data.labels.shape != (len(data),):
            raise DataError(
                f"{data.source} has {len(data)} inputs but labels of shape "
                f"{tuple(data.labels.shape)}", "Give one integer label per input")
        if len(data.labels) and int(data.labels.min()) < 0:
            raise DataError(f"labels of {data.source} include {int(data.labels.min())}",
                            "Labels must be class indices 0..C-1")


@dataclass(frozen=True)
class TableColumns:
    """A table's feature columns as the models that run on it see them.

    Attributes:
        names: The data's feature columns, in order.
        categories: Its category columns, each with its categories in code order.
        by_name: Whether these are the table's default columns (False: the user chose
            them with ``--feature-columns``: a model that records its columns then gets them
            by position, the user's order, unless they are its own columns in another
            order; and category columns are not left out for a model of numbers).
    """

    names: list[str]
    categories: dict[str, list[str]]
    by_name: bool = True


def table_columns(ds: Data, options: DataOptions | None) -> TableColumns | None:
    """The columns of table data ``ds`` that a model is fed by (None: not a table)."""
    if ds.feature_names is None or ds.is_text:
        return None
    return TableColumns(list(ds.feature_names), dict(ds.categories or {}),
                        options is None or options.feature_columns is None)
