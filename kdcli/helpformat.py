"""How ``--help`` reads: plain text that fits the terminal (80 columns at most), the same on
a terminal and in a pipe.

Typer's Rich help puts each option in a table of six columns (long name, short name,
negative names, type, help) and leaves the help about 18 characters at 80 columns; it cuts
defaults with "…" and reads ``[hf]`` as markup. Here every option is one row of two columns,
``--name METAVAR`` and its help, wrapped at spaces only (never inside ``--no-flip`` or
``mean-probs``); a name too wide for its column puts the help on the lines below. Options
are grouped under their ``rich_help_panel``. A command's examples are shell commands, one
per line, broken only before an option with a ``\\`` so that each can be pasted.

Start-up module: imports neither torch nor Rich.
"""

from __future__ import annotations

import inspect
import textwrap
from typing import Any

from typer.core import TyperCommand, TyperGroup

INDENT = "  "
NAME_COLUMN = 24  # widest name column; a wider name puts its help on the next line
GAP = 2  # spaces between a name and its help


def wrap(text: str, width: int, indent: str = INDENT, hang: str | None = None) -> list[str]:
    """``text``'s words in lines of at most ``width`` columns, broken at spaces only (and
    not inside ``[default: x]``)."""
    text = " ".join(text.split()).replace("[default: ", "[default:\xa0")
    return [line.replace("\xa0", " ") for line in textwrap.wrap(
        text, width, initial_indent=indent, subsequent_indent=indent if hang is None else hang,
        break_on_hyphens=False, break_long_words=False)] or [""]


def paragraphs(text: str, width: int) -> list[str]:
    """A docstring's lines: each paragraph rewrapped, a paragraph opened by ``\\b`` kept line
    for line (formulas), a blank line between paragraphs."""
    out: list[str] = []
    for para in inspect.cleandoc(text).partition("\f")[0].split("\n\n"):
        if out:
            out.append("")
        if para.startswith("\b"):
            out += [INDENT + line for line in para.strip("\b\n").splitlines()]
        else:
            out += wrap(para, width)
    return out


def definitions(rows: list[tuple[str, str]], width: int, col: int) -> list[str]:
    """Rows of (name, help) as two columns, the first ``col`` wide; a wider name gets a line
    of its own, with its help below, indented to the help column."""
    hang = " " * (len(INDENT) + col + GAP)
    out: list[str] = []
    for name, text in rows:
        if len(name) <= col:
            lines = wrap(text, width, hang, hang)
            out.append(INDENT + name.ljust(col + GAP) + lines[0][len(hang):])
            out += lines[1:]
        else:
            out.append(INDENT + name)
            out += wrap(text, width, hang, hang) if text else []
    return [line.rstrip() for line in out]


def example(text: str, width: int) -> list[str]:
    """One example: a caption (``# ...``) wrapped, or a command broken before its options
    with shell line continuations (`` \\``) where it does not fit."""
    if text.startswith("#"):
        return ["", *wrap(text[1:], width, INDENT + "# ", INDENT + "# ")]
    units: list[str] = []  # the command and its arguments, then each option with its value
    for word in text.split():
        if word.startswith("-") or not units:
            units.append(word)
        else:
            units[-1] += " " + word
    lines, line = [], INDENT + units[0]
    for unit in units[1:]:
        if len(line) + 1 + len(unit) + 2 > width:
            lines.append(line + " \\")
            line = INDENT + "    " + unit
        else:
            line += " " + unit
    return [*lines, line]


def _param_row(param: Any, ctx: Any) -> tuple[str, str]:
    """(name, help) of an option or an argument: ``--name METAVAR`` and the help with its
    default, ``NAME...`` and its help for an argument."""
    if param.param_type_name == "option":
        return param.get_help_record(ctx)
    name = param.metavar or param.name.upper()
    text = param.help or ""
    if param.required:
        text += "  [required]"
    elif param.default is not None and not param.multiple:
        text += f"  [default: {param.default}]"
    return name + ("..." if param.nargs != 1 else ""), text


def _sections(command: Any, ctx: Any) -> dict[str, list[tuple[str, str]]]:
    """The help's sections in order: Arguments, Options, then each panel of options."""
    sections: dict[str, list[tuple[str, str]]] = {"Arguments": [], "Options": []}
    for param in command.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        title = "Arguments" if param.param_type_name == "argument" else \
            getattr(param, "rich_help_panel", None) or "Options"
        sections.setdefault(title, []).append(_param_row(param, ctx))
    return {title: rows for title, rows in sections.items() if rows}


def _usage(command: Any, ctx: Any) -> str:
    """The usage line: ``Usage: kdcli train [OPTIONS]``, arguments by their metavars."""
    pieces = ["[OPTIONS]"]
    for param in command.get_params(ctx):
        if param.param_type_name == "argument":
            name = (param.metavar or param.name.upper()) + ("..." if param.nargs != 1 else "")
            pieces.append(name if param.required else f"[{name}]")
    if isinstance(command, TyperGroup):
        pieces.append("COMMAND [ARGS]...")
    return f"Usage: {ctx.command_path} {' '.join(pieces)}"


def render(command: Any, ctx: Any, width: int,
           commands: list[tuple[str, str]] | None = None) -> str:
    """The whole help of ``command``: usage, description, sections, commands, examples."""
    lines = wrap(_usage(command, ctx), width, "", " " * 7)
    if command.help:
        lines += ["", *paragraphs(command.help, width)]
    groups = list(_sections(command, ctx).items())
    if commands:
        groups.append(("Commands", list(commands)))
    col = min(max(len(name) for _, rows in groups for name, _ in rows), NAME_COLUMN)
    for title, rows in groups:
        lines += ["", f"{title}:", *definitions(rows, width, col)]
    if command.epilog:
        lines += ["", "Examples:"]
        for text in command.epilog.splitlines():
            shown = example(text, width)
            lines += shown[1:] if lines[-1] == "Examples:" and shown[0] == "" else shown
    return "\n".join(lines) + "\n"


class Command(TyperCommand):
    """A command whose ``--help`` is :func:`render`'s plain text."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        """Write the help into click's ``formatter``, at its width (80 columns at most)."""
        formatter.write(render(self, ctx, formatter.width))


class Group(TyperGroup):
    """The command group: its ``--help`` is :func:`render`'s plain text, each command with
    its description's first paragraph."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        """Write the help into click's ``formatter``, at its width (80 columns at most)."""
        rows = [(name, inspect.cleandoc(cmd.help or "").split("\n\n")[0])
                for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        formatter.write(render(self, ctx, formatter.width, rows))
