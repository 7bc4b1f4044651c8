"""Everything kdcli shows: progress bars and messages on stderr, result tables, JSON.

Library functions take a :class:`Reporter` and never print directly. The CLI builds one
from ``--json`` / ``--quiet``; Python callers get a quiet one by default.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from os import PathLike
from pathlib import PurePath
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table
from rich.text import Text

from kdcli.distributed import launched_rank


class _RateColumn(ProgressColumn):
    """Samples per second, the unit every kdcli progress bar counts in."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("-- samples/s", style="progress.data.speed")
        return Text(f"{speed:,.0f} samples/s", style="progress.data.speed")


class Reporter:
    """Routes a command's output to the right place for the chosen mode.

    Args:
        mode: ``"rich"`` (progress and tables), ``"json"`` (one JSON document on stdout,
            nothing on stderr but errors) or ``"quiet"`` (nothing but errors).
    """

    def __init__(self, mode: str = "quiet") -> None:
        if mode not in ("rich", "json", "quiet"):
            raise ValueError(mode)
        if launched_rank() != "0":  # under torchrun only rank 0 speaks
            mode = "quiet"
        self.mode = mode
        self.err = Console(stderr=True, highlight=False)
        self.out = Console(highlight=False)

    @property
    def chatty(self) -> bool:
        return self.mode == "rich"

    def info(self, message: str) -> None:
        """A one-line message on stderr (rich mode only)."""
        if self.chatty:
            self.err.print(message)

    def warn(self, message: str) -> None:
        """A warning on stderr; shown in every mode but quiet and json."""
        if self.chatty:
            self.err.print(f"[yellow]Warning:[/yellow] {message}")

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Any]:
        """A progress bar counting samples; yields ``advance(n)``.

        Args:
            description: Shown left of the bar.
            total: Number of samples the bar counts to.
        """
        if not self.chatty or not self.err.is_terminal:  # no bars in logs and pipes
            yield lambda n=1: None
            return
        description, columns = _progress_columns(description, total, self.err.width)
        with Progress(*columns, console=self.err, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Print a results table on stdout (rich mode only)."""
        if not self.chatty:
            return
        self.out.print(f"[bold]{title}[/bold]")
        cells = [[_fmt(v) for v in row] for row in rows]
        for group in column_groups(columns, cells, self.out.width):
            table = Table()
            for i in (0, *group):  # folded, never cut: a narrow console shows every character
                table.add_column(columns[i], justify="left" if i == 0 else "right",
                                 overflow="fold")
            for row in cells:
                table.add_row(*(row[i] for i in (0, *group)))
            self.out.print(table)

    def result(self, data: dict[str, Any]) -> None:
        """Emit the command's machine-readable result (json mode only)."""
        if self.mode == "json":
            sys.stdout.write(json.dumps(data, indent=2, default=_json_default) + "\n")
            sys.stdout.flush()


#: The widest a rate ("1,000,000 samples/s") and a time ("0:00:00") read, and the shortest bar.
_RATE_WIDTH, _TIME_WIDTH, _MIN_BAR, _MAX_BAR = 19, 7, 10, 40


def _progress_columns(description: str, total: int, width: int) -> tuple[str, list[Any]]:
    """A progress line's columns, sized to fit on one line of ``width`` characters: where
    it is narrow the elapsed time goes, then the bar shrinks, then the description loses
    its middle (its start and end tell models apart).

    Args:
        description: Shown left of the bar.
        total: Number of samples the bar counts to.
        width: The console's width.

    Returns:
        The description as shown and the columns.
    """
    elapsed = [TimeElapsedColumn(table_column=Column(no_wrap=True))]
    tail = [TextColumn("eta", table_column=Column(no_wrap=True)),
            TimeRemainingColumn(table_column=Column(no_wrap=True))]
    fixed = 2 * len(f"{total}") + 1 + _RATE_WIDTH + 3 + _TIME_WIDTH + 6  # 6 gaps of 1
    if width - fixed - _TIME_WIDTH - 1 - len(description) < _MIN_BAR:
        elapsed, fixed = [], fixed - 1
    else:
        fixed += _TIME_WIDTH + 1
    room = width - fixed - 1  # what the description and the bar share
    description = _middle(description, max(room - _MIN_BAR, 8))
    bar = max(1, min(_MAX_BAR, room - len(description)))
    return description, [
        TextColumn("{task.description}", style="bold", markup=False,
                   table_column=Column(no_wrap=True)),
        BarColumn(bar_width=bar),
        MofNCompleteColumn(table_column=Column(no_wrap=True)),
        _RateColumn(table_column=Column(no_wrap=True)),
        *elapsed, *tail,
    ]


def _middle(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, its middle replaced by "…" if longer."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def distinct_names(paths: Sequence[str | PathLike[str]]) -> list[str]:
    """The shortest trailing parts of each path that tell it from the others: the file name
    alone unless another path ends the same (``runs/a/m.onnx``, ``runs/b/m.onnx`` become
    ``a/m.onnx``, ``b/m.onnx``). A path given twice keeps one name.

    Args:
        paths: Model files as the user named them.

    Returns:
        One name per path, in order.
    """
    parts = [PurePath(p).parts or (str(p),) for p in paths]
    names = []
    for mine in parts:
        others = [q for q in parts if q != mine]
        k = 1
        while k < len(mine) and any(q[-k:] == mine[-k:] for q in others):
            k += 1
        names.append(str(PurePath(*mine[-k:])))
    return names


#: The least a table's first column (the names) gets when a table is split, and the most a
#: column's header asks for (a longer header word folds).
_MIN_NAMES, _HEADER_WORD = 16, 10


def column_groups(columns: Sequence[str], cells: Sequence[Sequence[str]],
                  width: int) -> list[list[int]]:
    """The columns after the first, in groups that each fit ``width`` beside the first
    column: one group when the table fits with its names folded to :data:`_MIN_NAMES`
    characters, else as many tables as it takes (each repeats the first column), so that a
    number is never split across lines. Names fold in the first column, headers at their
    spaces.

    Args:
        columns: The headers.
        cells: The rows' cells as shown.
        width: The console's width.

    Returns:
        Indices of the columns of each table, in order.
    """
    def need(i: int) -> int:  # a cell's text and 3 characters of padding and border
        widest = max((len(row[i]) for row in cells), default=0)
        header = max((len(w) for w in columns[i].split()), default=0)
        return max(widest, min(header, _HEADER_WORD)) + 3

    rest = list(range(1, len(columns)))
    if 1 + min(need(0), _MIN_NAMES) + sum(map(need, rest)) <= width or not rest:
        return [rest]  # it fits, folding the names if need be
    names = min(need(0), max(_MIN_NAMES, width // 3))
    groups: list[list[int]] = [[]]
    used = 1 + names
    for i in rest:
        if groups[-1] and used + need(i) > width:
            groups.append([])
            used = 1 + names
        groups[-1].append(i)
        used += need(i)
    return groups


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3g}"
        return f"{v:,.4f}".rstrip("0").rstrip(".")
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__fspath__"):
        return str(o)
    raise TypeError(type(o).__name__)


class Timer:
    """Wall-clock stopwatch: ``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
