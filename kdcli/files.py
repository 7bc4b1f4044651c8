"""Safe file handling: atomic outputs, the ``--force`` rule, and hashing."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kdcli.errors import DataError, OutputExistsError, UsageError


def check_output(path: str | os.PathLike, force: bool) -> Path:
    """Fail early if ``path`` exists and may not be overwritten.

    Args:
        path: Where an output will be written.
        force: Whether an existing file may be replaced.

    Returns:
        The path as a :class:`Path`.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is false.
        UsageError: ``path`` is a directory or its parent does not exist.
    """
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"output {p} is a directory", "Give a file path")
    if p.exists() and not force:
        raise OutputExistsError(f"{p} already exists", "Pass --force to overwrite it")
    if not p.parent.exists():
        raise UsageError(f"the folder {p.parent} does not exist", "Create it first")
    return p


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it into place on success.

    If the body raises, the temporary file is removed and ``path`` is untouched, so
    bad input never leaves a half-written output.

    Args:
        path: The final output path.
        force: Whether an existing file may be replaced.
    """
    final = check_output(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp_path
        if final.exists() and not force:  # appeared while we worked
            raise OutputExistsError(f"{final} already exists", "Pass --force to overwrite it")
        # mkstemp (and some writers) make 0600 files; outputs get normal permissions
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Return ``path`` as a Path; raise DataError if it is missing, a folder, or empty."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} {p} does not exist", "Check the path")
    if p.is_dir():
        raise DataError(f"{what} {p} is a directory", "Give a file path")
    if p.stat().st_size == 0:
        raise DataError(f"{what} {p} is empty", "Regenerate it")
    return p
