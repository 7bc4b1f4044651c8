"""The teacher formats table, and loading a teacher from any of them.

:data:`FORMATS` names one module per format, in detection order; each module exposes its
entry as ``FORMAT`` (a :class:`~kdcli.teachers.base.TeacherFormat`) and is imported only when
the table is walked that far. A new format is one module, one line here, and its tests.

* ``huggingface-text``: a ``transformers`` sequence classifier and its tokenizer
  (:mod:`kdcli.teachers.hf_text`); it takes texts.
* ``huggingface``: a ``transformers`` image or audio checkpoint folder (:mod:`kdcli.teachers.hf`).
* ``kdcli``: a kdcli model file (safetensors with ``format: kdcli.model``).
* ``safetensors-state-dict``: a plain safetensors file, loaded as a state dict with ``--arch``
  (a kdcli spec or ``package.module:factory``); recorded as ``state_dict``.
* ``torch.export``: ``torch.export.save`` programs (``.pt2``), dynamic or fixed batch.
* ``torchscript``: ``torch.jit.save`` archives.
* ``torch.save``: a state dict (loaded with ``weights_only=True``, recorded as ``state_dict``)
  or a fully pickled ``nn.Module``, only with ``trust_pickle=True`` (recorded as ``pickle``).
* ``onnx``: ONNX models, including ONNX-ML classifiers (:mod:`kdcli.teachers.onnx`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

from kdcli.checks import check_preprocessing_options
from kdcli.data.base import TableColumns
from kdcli.errors import DataError, FormatError, UsageError
from kdcli.io.files import require_file
from kdcli.teachers.base import (
    OUTPUT_KINDS,
    LoadRequest,
    Teacher,
    TeacherFormat,
    TeacherOptions,
    short,
)
from kdcli.teachers.inputs import IDENTITY, match_columns
from kdcli.teachers.probe import settle
from kdcli.teachers.safety import zip_names


class Entry(NamedTuple):
    """One line of :data:`FORMATS`: the module that holds the format's ``FORMAT``, and how
    error hints name the files it reads (without importing the module)."""

    module: str
    files: str


#: The formats, tried in this order on a path's content.
FORMATS: tuple[Entry, ...] = (
    Entry("kdcli.teachers.hf_text", "a Hugging Face text-classifier folder"),
    Entry("kdcli.teachers.hf", "a Hugging Face checkpoint folder"),
    Entry("kdcli.teachers.kdcli_model", "a kdcli .safetensors model"),
    Entry("kdcli.teachers.state_dict", "a safetensors state dict (with --arch)"),
    Entry("kdcli.teachers.torch_export", "a torch.export .pt2"),
    Entry("kdcli.teachers.torchscript", "TorchScript"),
    Entry("kdcli.teachers.pickled", "a torch.save state dict (with --arch)"),
    Entry("kdcli.teachers.onnx", "ONNX"),
)


def entries() -> Iterator[TeacherFormat]:
    """The table's entries in detection order, each module imported when it is reached."""
    for entry in FORMATS:
        yield importlib.import_module(entry.module).FORMAT


def _known_files() -> str:
    """What each format reads, for hints: ``a Hugging Face checkpoint folder, ... or ONNX``."""
    files = [e.files for e in FORMATS]
    return ", ".join(files[:-1]) + " or " + files[-1]


def find_format(path: Path, role: str = "teacher") -> TeacherFormat:
    """The table entry for ``path``, found by content.

    Raises:
        DataError: the path is missing, empty, or a folder that is no checkpoint.
        FormatError: no format matches, or the file is corrupt.
    """
    p = Path(path)
    if p.is_dir():
        for fmt in entries():
            if fmt.folders and fmt.detect(p):
                return fmt
        raise DataError(f"{role} {p} is a directory without a config.json",
                        "Give a model file, or a Hugging Face checkpoint folder "
                        "(config.json and model.safetensors)")
    require_file(p, role)
    for fmt in entries():
        if fmt.detect(p):
            return fmt
    if zip_names(p):
        raise FormatError(f"{p} is a zip archive but not a PyTorch file",
                          f"Give one of: {_known_files()}")
    raise FormatError(f"{p} is not a model format kdcli knows",
                      f"Give one of: {_known_files()}")


def detect_format(path: Path) -> str:
    """Name a model file's format from its content (see :data:`FORMATS`)."""
    return find_format(Path(path)).name


def find_inspector(path: Path) -> TeacherFormat | None:
    """The entry whose ``kdcli inspect`` view describes ``path``, or None."""
    return next((fmt for fmt in entries() if fmt.inspects(Path(path))), None)


def file_class_names(path: str | Path) -> list[str] | None:
    """The class names a model file records, read without loading it (None: none, or the
    file is not a model; the loader reports that)."""
    p = Path(path)
    if not p.is_file():  # a folder, or a FIFO that would block: the loader reports it
        return None
    try:
        fmt = find_format(p)
    except (DataError, FormatError):
        return None
    return fmt.class_names(p)


def load_teacher(path: str | Path, opts: TeacherOptions | None = None, device: str = "cpu",
                 precision: str = "fp32", role: str = "teacher",
                 probe: torch.Tensor | None = None,
                 table: TableColumns | None = None) -> Teacher:
    """Load a teacher from any supported format and probe it: its spec is then complete.

    Args:
        path: The model file, or a Hugging Face checkpoint folder.
        opts: Loading and input options (see :class:`TeacherOptions`).
        device: ``cpu`` or ``cuda`` (PyTorch formats; ONNX uses CUDA if its provider exists).
        precision: ``fp32`` or ``bf16`` (autocast, PyTorch formats only).
        role: What to call the file in error messages (``teacher``, ``model``).
        probe: A few raw examples of the data the teacher will see. They settle the input
            shape (when the file does not say), the output kind and the classes. Without
            them, random inputs of the file's own input shape are used.
        table: The data's table columns: a model whose file records the columns it takes
            gets them by name (see :func:`~kdcli.teachers.inputs.match_columns`), category
            columns as the model takes them (see :meth:`TeacherFormat.with_categories`).

    Raises:
        DataError: the file is missing or empty.
        FormatError: the format is unknown, or the file is corrupt.
        UnsafePickleError: the file is a pickle and ``trust_pickle`` is off.
        ModelError: the model cannot run on the probe.
    """
    opts = opts or TeacherOptions()
    if opts.output is not None and opts.output not in OUTPUT_KINDS:
        raise UsageError(f"unknown --teacher-output {opts.output!r}",
                         f"Use one of {', '.join(OUTPUT_KINDS)}")
    p = Path(path)
    fmt = find_format(p, role)
    req = LoadRequest(p, opts, fmt.digest(p), device, precision)
    check_teacher_options(p, opts, fmt)
    t = fmt.load(req)
    if table is not None and not t.takes_text:
        t = _fed_columns(t, fmt, table, f"{role} {p.name}")
    return settle(t, probe)


def _fed_columns(t: Teacher, fmt: TeacherFormat, table: TableColumns, name: str) -> Teacher:
    """The teacher given the data's table columns: by name where its file records them;
    else by position, leaving out category columns (said once) when it takes numbers."""
    theirs = fmt.feature_names(t.path)
    same = theirs is not None and sorted(theirs) == sorted(table.names)  # another order
    columns = match_columns(theirs, table.names if table.by_name or same else None, name)
    if columns is not None:
        t = replace(t, columns=columns, notes=(*t.notes, f"{t.name}: takes the table's "
                                               "columns by name, in the order its file "
                                               "records"))
    elif theirs is None and table.categories and table.by_name:  # default columns
        numbers = tuple(j for j, c in enumerate(table.names) if c not in table.categories)
        left = [c for c in table.names if c in table.categories]
        t = replace(t, columns=numbers, notes=(*t.notes, f"{t.name}: takes numbers, so it "
                                               f"is given the table's {len(numbers)} number "
                                               f"columns, not its category columns "
                                               f"{short(left)}"))
    order = list(t.columns) if t.columns is not None else range(len(table.names))
    names = [table.names[j] for j in order]
    return fmt.with_categories(t, [table.categories.get(c) for c in names], names)


def check_teacher_options(path: str | Path, opts: TeacherOptions,
                          fmt: TeacherFormat | None = None) -> None:
    """Refuse options that are impossible, or that the model's format would ignore:
    ``--output`` picks among an ONNX model's outputs, and a kdcli model does its own
    preprocessing. Cheap unless such an option is given (the format is found by content).

    Raises:
        UsageError: naming the option.
    """
    check_preprocessing_options(opts.scale, opts.mean, opts.std)
    pre = {**IDENTITY, **opts.preprocessing()}
    if opts.output_name is None and pre == IDENTITY:
        return
    name = Path(path).name
    fmt = fmt or find_format(Path(path))
    if opts.output_name is not None and not fmt.picks_output:
        raise UsageError(f"--output {opts.output_name!r}: teacher {name} is a {fmt.name} "
                         "model with one output; --output picks among an ONNX model's outputs",
                         "Drop --output for this model")
    if fmt.own_preprocessing and pre != IDENTITY:
        raise UsageError(f"--scale/--mean/--std were given for {name}, a kdcli model that "
                         "does its own preprocessing (from its file)",
                         "Drop them, or give them once per model with 1/0/1 for this one")


def one_class_order(models: list[Teacher]) -> tuple[list[Teacher], list[str] | None]:
    """The models with their outputs in one class order: that of the first that names its
    classes (its own names, or those its file records), each other model whose names are
    the same classes in another order reordered to it (:meth:`Teacher.in_class_order`).
    Returns the models and that order (None: none names its classes)."""
    named = [t.class_names if t.class_names is not None else t.fmt.class_names(t.path)
             for t in models]
    order = next((n for n in named if n is not None), None)
    return ([t.in_class_order(order) for t in models] if order is not None else models), order
