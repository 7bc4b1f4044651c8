"""Every ``--help`` reads at 80 columns, in a terminal or a pipe: no line wider, no value cut
with "…", no help text lost, no markup swallowed, examples that can be pasted."""

import functools
import re

import pytest
import typer
from typer.testing import CliRunner

from kdcli.cli import app

PLAIN = {"COLUMNS": "80", "TERM": "dumb", "NO_COLOR": "1"}
ROOT = typer.main.get_command(app)
COMMANDS = list(ROOT.commands)


def _help(args: list[str], columns: str = "80") -> str:
    return _render(tuple(args), columns)


@functools.cache
def _render(args: tuple[str, ...], columns: str) -> str:
    r = CliRunner().invoke(app, [*args, "--help"], env={**PLAIN, "COLUMNS": columns})
    assert r.exit_code == 0, r.output
    return r.output


def _words(text: str) -> str:
    return " ".join(text.replace("\b", "").split())


def test_the_commands_are_all_tested():
    assert {"train", "eval", "soft-targets", "train-student", "export", "calibrate-bias",
            "sweep", "inspect"} <= set(COMMANDS)


@pytest.mark.parametrize("command", [None, *COMMANDS])
@pytest.mark.parametrize("columns", ["80", "200"])
def test_help_fits_80_columns_and_loses_nothing(command, columns):
    args = [command] if command else []
    out = _help(args, columns)
    wide = [line for line in out.splitlines() if len(line) > 80]
    assert wide == [], "\n".join(wide)
    assert "…" not in out and "\x1b" not in out
    obj = ROOT.commands[command] if command else ROOT
    flat = _words(out.replace(" \\\n", " "))
    assert _words(obj.help) in flat  # the whole description, every paragraph
    for param in obj.params:
        if getattr(param, "help", None):
            assert _words(param.help) in flat, (param.name, param.help)
        names = [*param.opts, *param.secondary_opts] if param.param_type_name == "option" \
            else []
        for name in names:
            assert re.search(rf"(^|[ ,]){re.escape(name)}([ ,]|$)", out, re.M), name
    for example in (obj.epilog or "").splitlines():
        assert _words(example.lstrip("# ")) in flat, example


@pytest.mark.parametrize("command", COMMANDS)
def test_metavars_read_as_words_and_flags_take_none(command):
    options = _help([command]).partition("\nOptions:\n")[2].partition("\nExamples:\n")[0]
    assert "--json" in options or "--verify" in options
    assert "<" not in options  # no <bool>, <str>, <list[Path]>
    if "--force" in options:
        assert re.search(r"^  -f, --force  ", options, re.M)  # a flag: no value shown
    for line in options.splitlines():
        if line.startswith("  --data "):
            assert line.split()[1] == "SPEC"


@pytest.mark.parametrize("command", COMMANDS)
def test_examples_break_only_between_options(command):
    out = _help([command])
    examples = out.partition("\nExamples:\n")[2].splitlines()
    assert any(line.startswith("  kdcli " + command) for line in examples)
    for line, after in zip(examples, [*examples[1:], ""], strict=True):
        assert line == "" or line.startswith(("  kdcli ", "  # ", "      --")), line
        if after.startswith("      --"):
            assert line.endswith(" \\")  # a shell line continuation


def test_markup_is_shown_literally():
    assert 'pip install "kdcli[hf]"' in _words(_help(["soft-targets"]))
    assert 'pip install "kdcli[hf]"' in _words(_help([]))


def test_help_names_only_the_commands_own_options():
    student = _help(["train-student"])
    assert "--input-dropout" not in student
    assert "--input-dropout" in _help(["train"])
    seed = [line for line in _help(["soft-targets"]).splitlines() if "--seed" in line]
    assert seed and "weights" not in seed[0]


def test_examples_cover_tables_and_a_foreign_teacher():
    examples = _words(" ".join(_help([c]).partition("\nExamples:\n")[2] for c in COMMANDS)
                      .replace(" \\\n", " "))
    assert "kdcli train --data penguins.csv --label-column species" in examples
    assert "kdcli soft-targets teacher.onnx --data train.csv --label-column species" in examples
