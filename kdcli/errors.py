"""kdcli's exceptions, and the one table that maps errors to what the user sees.

Every error kdcli raises on purpose is a :class:`KdcliError` (:class:`Terminated`, for
SIGTERM, is an interrupt instead). Its message says what is wrong; its ``hint`` says how to
fix it. :func:`user_message` turns any exception into one line and an exit code, which the
wrapper of every command (:func:`kdcli.cli.command`) prints after ``Error:``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator


class KdcliError(Exception):
    """Base class of every error kdcli reports to the user.

    Args:
        message: What is wrong.
        hint: How to fix it (shown after the message).
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}. {self.hint}" if self.hint else self.message


class UsageError(KdcliError):
    """An option or argument has a bad value."""


class DataError(KdcliError):
    """A data file is missing, malformed or inconsistent."""


class FormatError(KdcliError):
    """A model or transfer-set file is not in the format kdcli expects."""


class ModelError(KdcliError):
    """A model cannot be built, loaded or run."""


class UnsafePickleError(FormatError):
    """A file holds a pickled object that would run code when loaded."""


class OutputExistsError(KdcliError):
    """The output path exists and ``--force`` was not given."""


class ExportError(KdcliError):
    """ONNX export or its verification failed."""


class DistributedError(KdcliError):
    """A rank failed, or the ranks of a torchrun job could not reach each other."""


class ResourceError(KdcliError):
    """A command would need more memory (or disk) than the machine has."""


class OutputWriteError(KdcliError):
    """An output could not be written (disk full, read-only folder, no permission)."""


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM; handled like Ctrl-C (temporaries are removed).

    A :class:`KeyboardInterrupt`, not a :class:`KdcliError`, so that ``except Exception``
    never swallows it.
    """


def quote_name(name: object) -> str:
    """A name (a path, a column, a class folder) as it may appear in a message: as it is
    when printable, else Python's quoted form, so a name holding a line break or a
    terminal escape cannot add lines of its own to an error."""
    s = str(name)
    return s if s.isprintable() else repr(s)


def one_line(text: str) -> str:
    """``text`` with every unprintable character (line breaks, escapes) written as its
    backslash escape: the last guard that keeps an error on one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def first_line(exc: BaseException, limit: int | None = 200) -> str:
    """The first line of ``exc``'s message (its type's name when the message is empty), cut
    to ``limit`` characters: how kdcli quotes a library's error in its own."""
    s = str(exc).strip()
    line = s.splitlines()[0] if s else type(exc).__name__
    return line if limit is None else line[:limit]


def user_message(exc: BaseException) -> tuple[str, int]:
    """Map any exception to the one-line message and exit code the CLI shows.

    This is the single error-mapping table of the CLI.

    Args:
        exc: The exception that ended a command.

    Returns:
        The message (without the ``Error:`` prefix) and the process exit code.
    """
    message, code = _message(exc)
    return one_line(message), code


_NOT_WRITTEN = "Outputs were not written; rerun (with --resume where supported)"


def _message(exc: BaseException) -> tuple[str, int]:
    if isinstance(exc, KdcliError):
        return str(exc), exc.exit_code
    if isinstance(exc, Terminated):
        return f"terminated (SIGTERM). {_NOT_WRITTEN}", 143
    if isinstance(exc, KeyboardInterrupt):
        return f"interrupted. {_NOT_WRITTEN}", 130
    if type(exc).__name__ in ("DistError", "DistBackendError", "DistNetworkError",
                              "DistStoreError") or "ProcessGroup" in str(exc)[:200]:
        first = first_line(exc, limit=None)
        return (f"a distributed collective failed ({first}). Another rank probably failed "
                "or timed out; see its error above (KDCLI_DIST_TIMEOUT sets the timeout)", 1)
    if isinstance(exc, RecursionError):
        return ("an input file nests its structure too deeply to read. Check that the file "
                "is what it claims to be", 1)
    if isinstance(exc, MemoryError):
        return "out of memory. Lower --batch-size or use a smaller --limit", 1
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {exc.filename}. Check the path", 1
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename}. Choose a writable path", 1
    if isinstance(exc, IsADirectoryError):
        return f"{exc.filename} is a directory. Give a file path", 1
    return (
        f"unexpected {type(exc).__name__}: {exc}. "
        "Rerun with KDCLI_DEBUG=1 for a traceback and report it",
        1,
    )


@contextlib.contextmanager
def quiet_libraries(show: bool = True) -> Iterator[None]:
    """Hold back library warnings and log records while a command runs.

    torch and onnx warn or log (sometimes a whole traceback) before raising the error kdcli
    then reports on one line. The held warnings are shown if the command succeeds (and
    ``show``: not with --json or --quiet), and dropped if it fails; with KDCLI_DEBUG=1
    everything is shown as it happens.
    """
    if os.environ.get("KDCLI_DEBUG") == "1":
        yield
        return
    loggers = [logging.getLogger(n) for n in ("torch", "onnx", "onnxscript", "onnxruntime")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    ok = False
    try:
        with warnings.catch_warnings(record=True) as held:
            yield
        ok = True
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if ok and show:
            for w in held:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
