"""Safe file handling: atomic outputs, the ``--force`` rule, and hashing.

Outputs are written under a temporary name next to the final path,
``.NAME.HOST.PID.tmp``, and renamed into place only when complete. A later run to the
same output removes temporaries that dead processes on this host left behind (after a
SIGKILL or a power cut). SIGTERM is handled like SIGINT (see :func:`handle_signals`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import re
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kdcli.distributed import launched_world
from kdcli.errors import (
    DataError,
    OutputExistsError,
    OutputWriteError,
    Terminated,
    UsageError,
    quote_name,
)

_WRITE_ERRORS = {errno.ENOSPC: "no space left on the device",
                 errno.EDQUOT: "the disk quota is exceeded",
                 errno.EROFS: "the file system is read-only",
                 errno.EACCES: "permission denied",
                 errno.EPERM: "permission denied",
                 errno.EFBIG: "the file is too large for the file system"}
_counter = itertools.count()


# Signals a command received, those put off (not yet raised), and how often one was put off.
_received: list[int] = []
_pending: list[int] = []
_deferred = [0]
_anywhere = [0]  # inside signals_raise_here()
_lock = threading.Lock()  # a re-delivery never races the handler's removal
_KDCLI_DIR = str(Path(__file__).resolve().parent.parent)
_RETRY_S, _MAX_DEFERRALS = 0.05, 40  # put off for at most 2 s, then raised wherever it lands


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` and SIGINT into KeyboardInterrupt while the
    body runs (main thread only), raised only where it is safe.

    A signal that lands inside a library (an import, a callback from native code) is not
    raised there, where it could be swallowed, leave a module half-imported or abort the
    process from C++; it is delivered again 50 ms later until it lands in kdcli's own code
    (for at most 2 s). A signal that was received but never raised (swallowed by a library)
    still ends the command with the error, never exit 0.

    Not under torchrun: there SIGTERM is how torchrun stops the other ranks when one fails,
    and a Python handler would wait for a blocked collective to time out. Such a rank dies
    at once; the next run removes its temporaries (their names carry its pid).
    """
    if launched_world() != "1":
        yield
        return
    try:
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s, handler in old.items():
            if handler is not signal.SIG_IGN:
                signal.signal(s, _on_signal)
    except ValueError:  # not the main thread
        yield
        return
    _received.clear()
    _pending.clear()
    _deferred[0] = 0
    try:
        yield
        if _received:  # received, but swallowed or still put off: the run was stopped
            _pending.clear()
            _raise_for(_received[-1])
    finally:
        with _lock:
            _pending.clear()
            for s, handler in old.items():
                signal.signal(s, handler)


@contextlib.contextmanager
def signals_raise_here() -> Iterator[None]:
    """Mark a wait (on a worker thread, a timer) where a signal may be raised wherever it
    lands, though the wait's own frames are the standard library's."""
    if _pending:
        _pending.clear()
        _raise_for(_received[-1])
    _anywhere[0] += 1
    try:
        yield
    finally:
        _anywhere[0] -= 1


def _raise_for(signum: int) -> None:
    if signum == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt()


def _on_signal(signum: int, frame: Any) -> None:
    _received.append(signum)
    if _anywhere[0] or _safe_to_raise(frame) or _deferred[0] >= _MAX_DEFERRALS:
        _pending.clear()
        _raise_for(signum)
    _deferred[0] += 1
    _pending.append(signum)
    timer = threading.Timer(_RETRY_S, _redeliver, (signum,))
    timer.daemon = True
    timer.start()


def _redeliver(signum: int) -> None:
    with _lock:
        if _pending and signal.getsignal(signum) is _on_signal:
            os.kill(os.getpid(), signum)


def _safe_to_raise(frame: Any) -> bool:
    """Whether the signal landed in code that kdcli called (kdcli's own frames, or a
    library's Python frames below them, such as torch's modules and optimizers in a training
    step), outside any import. Raising in an import would leave a module half-imported."""
    ours = False
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith("<frozen importlib"):
            return False
        ours = ours or name.startswith(_KDCLI_DIR)
        frame = frame.f_back
    return ours


def exit_on_signals() -> None:
    """Outside a command (starting up, finishing), SIGTERM and SIGINT print one line and end
    the process at once: nothing is being written then. For the console script only."""
    if launched_world() != "1":
        return
    with contextlib.suppress(ValueError):
        for s in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(s) is not signal.SIG_IGN:
                signal.signal(s, _exit_now)


def hold_signals_for_exit() -> None:
    """Ignore SIGTERM and SIGINT from here on: the command is over (its outputs complete or
    removed) and the interpreter exits. There Python no longer runs handlers, so a signal
    would kill the process without a word (exit 143 after a complete run)."""
    if launched_world() != "1" or threading.current_thread() is not threading.main_thread():
        return
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


def _exit_now(signum: int, frame: Any) -> None:  # noqa: ARG001 - the signal API
    what = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
    os.write(2, f"Error: {what}\n".encode())
    os._exit(128 + signum)


def write_error(path: str | os.PathLike, exc: BaseException) -> OutputWriteError | None:
    """The one-line error for a failed write of ``path``, or None if ``exc`` is not one."""
    reason = write_failure(path, exc)
    if reason is None:
        return None
    return OutputWriteError(f"cannot write {path}: {reason}",
                            "Free space or choose a writable output path; nothing was written")


def folder_write_error(folder: str | os.PathLike, exc: BaseException, what: str,
                       hint: str) -> OutputWriteError:
    """The one-line error for ``what`` (e.g. ``cannot create --out-dir X``) failing in
    ``folder``; ``exc`` is re-raised if it is not a write failure."""
    reason = write_failure(Path(folder) / "x", exc)
    if reason is None:
        raise exc
    return OutputWriteError(f"{what}: {reason}", hint)


def write_failure(path: str | os.PathLike, exc: BaseException) -> str | None:
    """Why writing ``path`` failed (a full disk, a read-only folder, ...), or None if
    ``exc`` is not a write failure."""
    reason = None
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRORS:
        reason = _WRITE_ERRORS[exc.errno]
    elif isinstance(exc, RuntimeError) and re.search(  # torch.save's writer; a short
            r"write failed|failed writing|No space left|unexpected pos \d+ vs \d+",  # write
            str(exc)):
        reason = "no space left on the device" if _full(Path(path).parent) else \
            "the write failed (is the disk full?)"
    return reason


def _full(folder: Path) -> bool:
    """Whether the file system of ``folder`` has (almost) no space left for this user."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs on Windows
        return False
    return st.f_bavail * st.f_frsize < (64 << 10)


def temp_path(final: Path) -> Path:
    """A fresh temporary name next to ``final`` that identifies this process."""
    n = next(_counter)
    tag = f"{_host()}.{os.getpid()}" + (f"-{n}" if n else "")
    return final.with_name(f".{final.name}.{tag}.tmp")


def remove_stale_temps(final: Path, names: str | None = None) -> list[Path]:
    """Delete temporaries of ``final`` left by dead processes of this host.

    Args:
        final: The output whose temporaries are removed.
        names: A regular expression matching several final names in ``final``'s folder
            (the shards of a set, whatever their count), instead of ``final``'s own name.

    Returns:
        The files removed.
    """
    name = names or re.escape(final.name)
    pattern = re.compile(rf"^\.{name}\.{re.escape(_host())}\.(\d+)"
                         r"(?:-\d+)?\.tmp$")
    removed = []
    try:
        entries = list(os.scandir(final.parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m and entry.is_file(follow_symlinks=False) and not _alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _host() -> str:
    import socket  # here, not at start-up: `kdcli --help` imports this module

    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def check_output(path: str | os.PathLike, force: bool,
                 inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Fail early if ``path`` may not be written.

    Args:
        path: Where an output will be written.
        force: Whether an existing file may be replaced.
        inputs: The command's input files: an output may never replace one of them.

    Returns:
        The path as a :class:`Path`.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is false.
        UsageError: ``path`` is one of ``inputs``, is not a regular file (a directory, a
            device), or its parent does not exist.
    """
    p = Path(path)
    for i in inputs:
        if _same(p, Path(i)):
            raise UsageError(f"the output {p} is also an input of this command",
                             "Choose another output path (--force does not allow this)")
    if p.is_dir():
        raise UsageError(f"output {p} is a directory", "Give a file path")
    if p.exists() and not p.is_file():
        raise UsageError(f"output {p} is not a regular file (a device or pipe)",
                         "Give a regular file path (--force does not allow this)")
    if p.exists() and not force:
        raise OutputExistsError(f"{p} already exists", "Pass --force to overwrite it")
    if not p.parent.exists():
        raise UsageError(f"the folder {p.parent} does not exist", "Create it first")
    return p


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def data_files(spec: str | os.PathLike | None) -> list[Path]:
    """The local file a data spec (``path.npz[:100]``, ``mnist``) reads, if any."""
    if spec is None:
        return []
    text = str(spec)
    for cand in (text, text.split("[", 1)[0]):
        if cand and Path(cand).is_file():
            return [Path(cand)]
    return []


def check_writable(folder: str | os.PathLike) -> None:
    """Fail early (before an hour of work) if files cannot be created in ``folder``.

    Raises:
        OutputWriteError: the folder is read-only, full or not writable.
    """
    probe = temp_path(Path(folder) / "write-check")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
    except OSError as e:
        raise folder_write_error(folder, e, f"cannot write in {folder}",
                                 "Choose a writable output folder") from e
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False,
                  inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it into place on success.

    If the body raises (bad input, a full disk, Ctrl-C, SIGTERM under
    :func:`handle_signals`), the temporary file is removed and ``path`` is untouched, so
    bad input never leaves a half-written output. Stale temporaries of ``path`` from dead
    processes are removed first.

    Args:
        path: The final output path.
        force: Whether an existing file may be replaced.
        inputs: The command's inputs, which ``path`` may not name.

    Raises:
        OutputWriteError: the disk is full or the folder read-only (one line, no file).
    """
    final = check_output(path, force, inputs)
    remove_stale_temps(final)
    tmp_path = temp_path(final)
    umask = os.umask(0)
    os.umask(umask)
    try:
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            yield tmp_path
            if final.exists() and not force:  # appeared while we worked
                raise OutputExistsError(f"{final} already exists", "Pass --force to overwrite it")
            check_output(final, force=True, inputs=inputs)  # replaced by a device meanwhile?
            # mkstemp (and some writers) make 0600 files; outputs get normal permissions
            os.chmod(tmp_path, 0o666 & ~umask)
            os.replace(tmp_path, final)
        except (OSError, RuntimeError) as e:
            err = write_error(final, e)
            if err is None:
                raise
            raise err from e
    finally:
        with contextlib.suppress(OSError):  # a read-only folder: the write error is the news
            tmp_path.unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with os.fdopen(open_regular(path, follow=True), "rb") as f:
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


def inside_folder(folder: str | os.PathLike, name: str | os.PathLike) -> Path | None:
    """Where ``folder/name`` leads, or None if it leads out of ``folder``.

    Links are followed by reading them (``lstat``, ``readlink``), one component at a time,
    so no path outside ``folder`` is ever looked at: an absolute name, ``..`` above the
    folder, or a link whose target lies outside gives None before anything about that
    target is touched. A link loop gives None too. The result need not exist.

    Args:
        folder: The folder the user named (resolved once: the user chose it).
        name: A path relative to ``folder``, as a file names it.
    """
    import stat

    root = Path(os.path.realpath(folder))
    if os.path.isabs(name):
        return None
    current, pending, hops = root, list(Path(name).parts), 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if current == root:
                return None
            current = current.parent
            continue
        nxt = current / part
        try:
            st = os.lstat(nxt)
        except OSError:  # missing (or unreadable): nothing below it can be opened
            return None if ".." in pending else current.joinpath(part, *pending)
        if not stat.S_ISLNK(st.st_mode):
            current = nxt
            continue
        hops += 1
        target = os.readlink(nxt)
        if hops > 40 or os.path.isabs(target) and not Path(
                os.path.normpath(target)).is_relative_to(root):
            return None
        if os.path.isabs(target):
            current = root
            target = os.path.relpath(os.path.normpath(target), root)
        pending = list(Path(target).parts) + pending
    return current


def open_regular(path: str | os.PathLike, what: str = "file", follow: bool = False) -> int:
    """Open ``path`` for reading without blocking on a FIFO, and (unless ``follow``)
    without following a link in its last component; return the descriptor of a regular
    file.

    Raises:
        DataError: ``path`` is a link (unless ``follow``), a folder, a FIFO, a device or a
            socket (nothing is read).
        OSError: it cannot be opened (missing, no permission).
    """
    import stat

    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | \
        (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(f"{what} {quote_name(path)} is a link, which kdcli does not "
                            "follow here", "Give the file itself") from e
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DataError(f"{what} {quote_name(path)} is not a regular file (a folder, FIFO, "
                        "device or socket)", "Give a regular file")
    os.set_blocking(fd, True)
    return fd
