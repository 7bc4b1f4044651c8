"""Data sources: the one place that turns a ``--data`` string into tensors.

Sources are a table (:data:`SOURCES`): each entry names what it claims (a bundled name, file
suffixes, folders, or files it recognises by content) and the reader, in its own module,
that returns a :class:`~kdcli.data.base.Loaded`; :func:`load_data` turns that into the same
:class:`~kdcli.data.base.Data` for every source. A reader's module is imported when a spec
needs it, so no source module imports this one. Accepted specs (any may end in a slice such
as ``[:1000]``, or in ``[balanced=N]`` / ``[balanced=N,seed=S]``: N examples, as many of each
class, drawn with seed S, default 0; see :func:`balanced_index`):

* ``mnist`` / ``mnist:train`` / ``mnist:test``: the MNIST copy bundled with kdcli
  (:mod:`kdcli.data.mnist`).
* a folder holding the four standard MNIST IDX files, optionally with ``:train``/``:test``.
* a text folder: ``DIR/CLASS/*.txt`` (labelled) or ``DIR/*.txt`` (unlabelled), one UTF-8
  text per file (:mod:`kdcli.data.text_files`).
* an image folder: ``DIR/CLASS/*.png`` (labelled, classes in sorted order like torchvision's
  ``ImageFolder``) or a flat folder of images (unlabelled); see :mod:`kdcli.data.images`.
* a table: ``.csv``, ``.tsv`` (optionally ``.gz``) or ``.parquet``; see :mod:`kdcli.data.tables`.
  With ``--text-column`` its examples are the texts of that column (or two, for pairs).
* a JSON Lines table (``.jsonl``, one object per line); see :mod:`kdcli.data.jsonl`.
* an IDX images file (``*-images-idx3-ubyte`` or ``.gz``); its labels file is found by
  the standard name (``images-idx3`` -> ``labels-idx1``) when present (:mod:`kdcli.data.idx`).
* ``.npz`` / ``.safetensors`` holding ``inputs`` (any shape) and optional integer ``labels``,
  or ``.npy`` holding inputs only (:mod:`kdcli.data.arrays`). A kdcli transfer set works as
  a data source too.
"""

from __future__ import annotations

import importlib
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from kdcli.data.base import SPLITS, Data, DataOptions, Loaded, Reader, validate
from kdcli.data.text import Texts
from kdcli.errors import DataError, UsageError, quote_name
from kdcli.output import Reporter

_SLICE = re.compile(r"^(?P<base>.*)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")
_BALANCED = re.compile(r"^(?P<base>.*)\[\s*balanced\s*=\s*(?P<n>\d+)\s*"
                       r"(?:,\s*seed\s*=\s*(?P<seed>\d+)\s*)?\]$")


@dataclass(frozen=True)
class Source:
    """One entry of the data-source table: what it claims, and its reader.

    Attributes:
        name: What the entry reads (shown in docs).
        reader: ``"module:function"``, a :class:`~kdcli.data.base.Reader`, imported on use.
        names: Bare names (not paths) it reads, such as ``mnist``.
        suffixes: File suffixes it reads, lower case (``.csv.gz`` for a compressed one).
        folders: Whether it reads folders.
        files: Whether it may read any file (``claims`` then decides).
        claims: ``"module:function"``, ``(path) -> bool``: asked once the kind above
            matches, for a source known by its content; None to take every such path.
    """

    name: str
    reader: str
    names: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    folders: bool = False
    files: bool = False
    claims: str | None = None

    def matches(self, name: str, path: Path | None) -> bool:
        """Whether this entry reads ``name`` (``path`` is None for a bundled name)."""
        if path is None:
            return name in self.names
        kind = self.folders if path.is_dir() else self.files or _suffix(path) in self.suffixes
        return kind and (self.claims is None or _function(self.claims)(path))

    def read(self, source: Path | str, split: str, options: DataOptions) -> Loaded:
        """Run the reader (see :class:`~kdcli.data.base.Reader`)."""
        reader: Reader = _function(self.reader)
        return reader(source, split, options)


# The data-source table: the first entry that matches a spec reads it. A new source is one
# module with a reader, one entry here, and its tests.
SOURCES: list[Source] = [
    Source("bundled MNIST", "kdcli.data.mnist:read", names=("mnist",)),
    Source("MNIST IDX folder", "kdcli.data.idx:read_folder", folders=True,
           claims="kdcli.data.idx:is_idx_folder"),
    Source("text folder", "kdcli.data.text_files:read", folders=True,
           claims="kdcli.data.text_files:is_text_folder"),
    Source("image folder", "kdcli.data.images:read", folders=True),
    Source("numpy arrays", "kdcli.data.arrays:read_numpy", suffixes=(".npz", ".npy")),
    Source("safetensors arrays", "kdcli.data.arrays:read_safetensors", suffixes=(".safetensors",)),
    Source("CSV/TSV table", "kdcli.data.tables:read",
           suffixes=(".csv", ".tsv", ".csv.gz", ".tsv.gz")),
    Source("Parquet table", "kdcli.data.tables:read", suffixes=(".parquet", ".pq")),
    Source("JSON Lines table", "kdcli.data.jsonl:read", suffixes=(".jsonl",)),
    Source("IDX file", "kdcli.data.idx:read_file", files=True,
           claims="kdcli.data.idx:is_idx_file"),
]


def load_data(spec: str, limit: int | None = None, options: DataOptions | None = None,
              reporter: Reporter | None = None) -> Data:
    """Load a data source.

    Args:
        spec: A data spec (see the module docstring).
        limit: Keep only the first ``limit`` examples (after any slice).
        options: How tables and image folders are read (default: :class:`DataOptions`).
        reporter: Where the source's notes (``Data.notes``: columns left out, ...) are said.

    Returns:
        The validated data.

    Raises:
        DataError: The source is missing, malformed or empty.
    """
    opts = options or DataOptions()
    opts.check()
    spec = spec.strip()
    base, sl = _split_slice(spec)
    got = _read(base, opts)
    inputs, labels = got.inputs, got.labels
    files = []
    if isinstance(inputs, Texts):
        inputs_t = inputs
    elif isinstance(inputs, tuple):  # memory-mapped: (tensor, MappedFile)
        inputs_t, mapped = inputs
        files.append(mapped)
    else:
        inputs_t = torch.from_numpy(inputs.copy() if not inputs.flags.writeable else inputs)
    inputs_t = _widen_unsigned(inputs_t, base)
    if labels is None:
        labels_t = None
    elif isinstance(labels, torch.Tensor):
        labels_t = labels.long()
    else:
        labels_t = torch.from_numpy(labels.astype("int64"))
    if isinstance(sl, tuple):  # [balanced=N,seed=S]
        index = balanced_index(labels_t, *sl, source=base)
        inputs_t, labels_t = inputs_t[index], labels_t[index]
    elif sl is not None:
        inputs_t = inputs_t[sl]
        labels_t = None if labels_t is None else labels_t[sl]
    if limit is not None:
        if limit <= 0:
            raise DataError(f"--limit must be positive, got {limit}", "Pass a count above 0")
        inputs_t = inputs_t[:limit]
        labels_t = None if labels_t is None else labels_t[:limit]
    if isinstance(inputs_t, torch.Tensor) and not inputs_t.is_contiguous():
        inputs_t = inputs_t.contiguous()
    data = Data(inputs_t, labels_t,
                spec if limit is None else f"{spec}[:{limit}]", files,
                got.class_names, got.feature_names, list(got.notes), got.label_hint,
                got.categories)
    validate(data)
    for note in data.notes if reporter is not None else ():
        reporter.info(escape(note))
    return data


def recorded_data(training: dict[str, Any], *keys: str) -> str | None:
    """The data source a model file's training record names under the first of ``keys``
    it has, if it is one bundled with kdcli (``mnist``, ``mnist:test[:1000]``); None if it
    names none.

    A file must never choose what else kdcli reads: a recorded path (``/etc/shadow``,
    ``../x.npz``, a folder) is used only when the user names it again with ``--data``.

    Raises:
        UsageError: the record names a path, which is not opened.
    """
    spec = next((training.get(k) for k in keys if training.get(k)), None)
    if spec is None:
        return None
    base = _split_slice(str(spec).strip())[0]
    name, _, split = base.partition(":")
    if isinstance(spec, str) and name in _bundled() and split in ("", *SPLITS):
        return spec
    shown = quote_name(str(spec)[:200])
    raise UsageError(f"the model file records its data as {shown}, a path kdcli does not "
                     "open unless you name it", f"Pass --data {shown} if you trust it, or "
                     "other data the model takes")


def balanced_index(labels: torch.Tensor | None, n: int, seed: int,
                   source: str = "the data") -> torch.Tensor:
    """The rows of a class-balanced sample of ``n`` examples: ``n / C`` of each of the C
    classes present, the first of a permutation of that class's rows drawn with ``seed``
    (``torch.Generator``), returned in their original order. The same data, ``n`` and seed
    always give the same rows.

    Raises:
        DataError: unlabelled data, ``n`` not a positive multiple of C, or a class with too
            few examples.
    """
    if labels is None:
        raise DataError(f"{source}[balanced={n}] needs labels, but {source} has none",
                        "Use a slice such as [:N] for unlabelled data")
    classes = torch.unique(labels)
    c = len(classes)
    if n <= 0 or n % c:
        lo = max(c, n // c * c)
        raise DataError(f"[balanced={n}] must be a positive multiple of the {c} classes of "
                        f"{source}", f"Use e.g. [balanced={lo}] or [balanced={lo + c}]")
    per = n // c
    members = [(labels == k).nonzero().flatten() for k in classes.tolist()]
    fewest = min(range(c), key=lambda i: len(members[i]))
    if len(members[fewest]) < per:
        raise DataError(f"{source} has only {len(members[fewest])} examples of class "
                        f"{int(classes[fewest])}, fewer than the {per} that [balanced={n}] "
                        "takes from each class",
                        f"Use at most [balanced={c * len(members[fewest])}]")
    gen = torch.Generator().manual_seed(seed)
    picked = [rows[torch.randperm(len(rows), generator=gen)[:per]] for rows in members]
    return torch.cat(picked).sort().values


def _split_slice(spec: str) -> tuple[str, slice | tuple[int, int] | None]:
    b = _BALANCED.match(spec)
    if b:
        return b["base"], (int(b["n"]), int(b["seed"] or 0))
    m = _SLICE.match(spec)
    if not m:
        return spec, None
    start = int(m["start"]) if m["start"] else None
    stop = int(m["stop"]) if m["stop"] else None
    return m["base"], slice(start, stop)


def _bundled() -> set[str]:
    """The names the table reads that are not paths (``mnist``)."""
    return {name for source in SOURCES for name in source.names}


def _function(ref: str) -> Any:
    """The function ``"module:name"`` names, its module imported on first use."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()


def _read(base: str, opts: DataOptions) -> Loaded:
    """Find the table entry that reads ``base`` and run it."""
    name, _, split = base.partition(":")
    path: Path | None = None
    if name not in _bundled():
        path = Path(name)
        if split and split not in SPLITS:
            # A colon that is not a split (a Windows drive, say): treat the whole as a path.
            path, split = Path(base), ""
        if not path.exists():
            raise DataError(f"data source {base!r} does not exist",
                            f"Use mnist, mnist:test, or a path to one of: {_known()}")
        _check_kind(path)
    for source in SOURCES:
        if source.matches(name, path):
            return source.read(path if path is not None else name, split, opts)
    raise DataError(f"unknown data format for {path}", f"Use one of: {_known()}")


def _known() -> str:
    """The sources a path may be, from the table: ``image folder, numpy .npz/.npy (...)``."""
    return ", ".join(s.name + (f" ({'/'.join(s.suffixes)})" if s.suffixes else "")
                     for s in SOURCES if not s.names)


def _check_kind(path: Path) -> None:
    """Only regular files and folders are data: a FIFO would block, a device never end."""
    st = path.stat()
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise DataError(f"data source {quote_name(path)} is not a regular file or folder "
                        "(a FIFO, device or socket)", "Give a data file or folder")
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise DataError(f"data file {quote_name(path)} is empty", "Check the file")


def _widen_unsigned(inputs: torch.Tensor | Texts, source: str) -> torch.Tensor | Texts:
    """uint16, uint32 and uint64 inputs as the signed type that holds their values exactly
    (int32, int64, int64), the one rule of every command (kdcli stores no unsigned type
    wider than 8 bits)."""
    if not isinstance(inputs, torch.Tensor):
        return inputs
    wider = {torch.uint16: torch.int32, torch.uint32: torch.int64, torch.uint64: torch.int64}
    if inputs.dtype not in wider:
        return inputs
    out = inputs.to(wider[inputs.dtype])
    if inputs.dtype == torch.uint64 and out.numel() and int(out.min()) < 0:
        raise DataError(f"inputs of {source} are uint64 values of 2^63 or more",
                        "Scale the inputs to a smaller range, or store them as floats")
    return out
