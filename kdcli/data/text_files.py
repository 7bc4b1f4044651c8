"""Folders of ``.txt`` files as a data source: one text per file.

Layouts (those of the classic review data sets, such as IMDb's ``aclImdb``):

* ``DIR/CLASS/*.txt``: labelled. Classes are the sub-folder names in sorted order (class
  ``i`` is the ``i``-th name), as for image folders; files in deeper folders count too.
* ``DIR/*.txt`` (no sub-folders with text files): unlabelled.
* ``DIR:train`` / ``DIR:test``: the folder ``DIR/train`` or ``DIR/test`` read as above.

Files are ordered as image folders order them (by name, numbers compared as numbers, then by
class), and links are never followed out of the folder (:func:`kdcli.data.images.scan`).
A file's text is its content decoded as UTF-8, without a byte-order mark and without the
white space around it (a trailing newline). A file that is not UTF-8 is refused with its
name and the byte where decoding failed; the rules of :mod:`kdcli.data.text` (length, empty
texts) apply, naming files.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kdcli.data.base import DataOptions, Loaded, first_line
from kdcli.data.images import EXTENSIONS, scan
from kdcli.data.text import MAX_TEXT_BYTES, from_columns
from kdcli.errors import DataError, quote_name
from kdcli.io.files import open_regular
from kdcli.resources import check_memory

SUFFIX = ".txt"
#: The most entries of one folder :func:`is_text_folder` looks at.
_LOOK = 2000


def is_text_folder(path: Path) -> bool:
    """Whether ``path`` is a folder of text files: ``.txt`` files in it, in its sub-folders
    or (for ``DIR:train`` layouts) theirs, and no images. Links are not followed."""
    found_text = found_image = False
    level = [path]
    for _ in range(3):
        below = []
        for d in level:
            try:
                with os.scandir(d) as it:
                    for k, e in enumerate(it):
                        if k >= _LOOK:
                            break
                        if e.name.startswith("."):
                            continue
                        suffix = os.path.splitext(e.name)[1].lower()
                        if e.is_dir(follow_symlinks=False):
                            below.append(Path(e.path))
                        elif suffix == SUFFIX:
                            found_text = True
                        elif suffix in EXTENSIONS:
                            found_image = True
            except OSError:
                continue
        if found_text or found_image:
            break
        level = below[:_LOOK]
    return found_text and not found_image


def read(path: Path, split: str, options: DataOptions) -> Loaded:
    """Read a folder of ``.txt`` files (see the module docstring).

    Returns:
        The texts (:class:`~kdcli.data.text.Texts`), labels and class names (None for a
        flat folder).

    Raises:
        DataError: no text files; a file that is not UTF-8, too long or unreadable (naming
            it); a link leading out of the folder.
    """
    folder = path / split if split else path
    if split and not folder.is_dir():
        raise DataError(f"{quote_name(path)} has no {split!r} folder for {path}:{split}",
                        f"Give {path} itself, or a folder with {split}/CLASS/*.txt")
    files, classes = scan(folder, (SUFFIX,), "text files")
    check_memory(sum(st.st_size for _, _, st, _ in files) * 3, f"the texts of {folder}",
                 "Split the folder, or give a table")
    texts = [_read_text(named, real, st) for named, real, st, _ in files]
    notes: list[str] = []
    rel = [str(named.relative_to(folder)) for named, *_ in files]

    def say(rows: list[int]) -> str:
        shown = ", ".join(quote_name(rel[i]) for i in rows[:3])
        return f"file {shown}" if len(rows) == 1 else \
            f"files {shown}" + (f", ... ({len(rows)} in all)" if len(rows) > 3 else "")

    inputs = from_columns([texts], str(folder), say_rows=say, notes=notes)
    labels = None
    if classes is not None:
        import numpy as np

        labels = np.array([k for *_, k in files], dtype=np.int64)
    return Loaded(inputs, labels, classes, None, notes)


def _read_text(named: Path, real: Path, st: os.stat_result) -> str:
    """One file's text (see the module docstring)."""
    if st.st_size > MAX_TEXT_BYTES + 4:
        raise DataError(f"text file {quote_name(named)} holds {st.st_size:,} bytes, more than "
                        f"the {MAX_TEXT_BYTES >> 20} MiB kdcli reads as one text",
                        "Split long documents into passages")
    try:
        fd = open_regular(real, "text file")
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise DataError(f"{quote_name(named)} is not a regular file",
                                "Give text files")
            raw = f.read(MAX_TEXT_BYTES + 5)
    except OSError as e:
        raise DataError(f"cannot read text file {quote_name(named)}: {first_line(e)}",
                        "Check the file's permissions, or remove it") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"text file {quote_name(named)} is not UTF-8 (byte {e.start}: "
                        f"{raw[e.start:e.start + 1]!r})", "Convert it to UTF-8 (e.g. iconv -f "
                        "latin1 -t utf-8), or remove it") from e
    return text.strip()
