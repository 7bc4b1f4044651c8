"""What kdcli shows at 80 columns (a small terminal, and what a pipe gets): ``eval`` names
every model in full and tells models with one file name apart; progress lines and epoch
lines stay on one line."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import torch
from rich.console import Console
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.output import Reporter, column_groups, distinct_names
from kdcli.training.loop import _epoch_line

NARROW = {"COLUMNS": "80", "TERM": "dumb", "NO_COLOR": "1"}
LONG = "student-with-a-rather-long-descriptive-name.pt"


def two_models(tmp_path: Path) -> tuple[list[Path], Path]:
    """Two TorchScript models whose paths share a long folder prefix and the file name, and
    a small labelled table."""
    torch.manual_seed(0)
    models = []
    for run in ("a", "b"):
        folder = tmp_path / "runs" / f"experiment-2026-12-07-learning-rate-sweep-{run}"
        folder.mkdir(parents=True)
        models.append(folder / LONG)
        torch.jit.save(torch.jit.script(torch.nn.Linear(4, 3)), str(models[-1]))
    data = tmp_path / "t.csv"
    rows = torch.randn(30, 4)
    data.write_text("a,b,c,d,label\n" + "".join(
        ",".join(f"{v:.3f}" for v in r) + f",{i % 3}\n" for i, r in enumerate(rows.tolist())))
    return models, data


def first_column(table: str) -> str:
    """The text of a Rich table's first column, its folded lines joined."""
    cells = [line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│")]
    return "".join(cells)


def test_eval_at_80_columns_names_each_model_in_full_and_apart(tmp_path):
    models, data = two_models(tmp_path)
    r = CliRunner().invoke(app, ["eval", *map(str, models), "--data", str(data)], env=NARROW)
    assert r.exit_code == 0, r.output
    names = [f"experiment-2026-12-07-learning-rate-sweep-{run}/{LONG}" for run in "ab"]
    assert distinct_names(models) == names
    results, agreement = r.stdout.split("Top-1 agreement")
    for table in results.split("┏")[1:]:  # one, or several that each name the models
        assert first_column(table) == "".join(names)  # folded, not cut: every character
    assert first_column(agreement) == "".join(names)
    assert "…" not in r.stdout
    assert max(map(len, r.stdout.splitlines())) <= 80
    # each number whole on one line, as --json gives it
    j = CliRunner().invoke(app, ["eval", *map(str, models), "--data", str(data), "--json"])
    shown = [line.split("│")[2:-1] for line in results.splitlines() if line.startswith("│")]
    for m in json.loads(j.stdout)["models"]:
        assert [f"{m['errors']:,}", f"{100 * m['accuracy']:.2f}%"] in \
            [[c.strip() for c in row[:2]] for row in shown]
        assert f"{m['params']:,}" in {c.strip() for row in shown for c in row}


def test_wide_tables_split_into_groups_that_fit():
    columns = ["model", "errors", "accuracy", "NLL", "ECE", "params", "size", "ms/text (1)",
               "ms/text (64)"]
    cells = [["teacher.onnx", "530", "76.72%", "0.4871", "0.0213", "30,460", "1.2 MB", "0.42",
              "0.146"], ["student-bow64-distilled.safetensors", "573", "74.84%", "0.5171",
                         "0.0313", "1,298,498", "5.2 MB", "0.17", "0.0251"]]
    assert column_groups(columns, cells, 200) == [list(range(1, 9))]
    assert column_groups(columns[:7], [r[:7] for r in cells], 80) == [list(range(1, 7))]
    groups = column_groups(columns, cells, 80)
    assert len(groups) == 2 and sum(groups, []) == list(range(1, 9))  # all, in order, once
    rep = Reporter("rich")
    rep.out = Console(file=io.StringIO(), width=80, color_system=None)
    rep.table("t", columns, cells)
    text = rep.out.file.getvalue()
    assert max(map(len, text.splitlines())) <= 80
    for cell in cells[1][1:]:  # every number on one line, whole
        assert cell in text


def test_distinct_names_are_the_shortest_telling_suffixes():
    assert distinct_names(["runs/a/m.onnx", "runs/b/m.onnx", "x.onnx"]) == [
        "a/m.onnx", "b/m.onnx", "x.onnx"]
    assert distinct_names(["runs/a/m", "a/m", "m", "m"]) == ["runs/a/m", "a/m", "m", "m"]
    assert distinct_names(["/abs/m", "rel/m"]) == ["abs/m", "rel/m"]


def progress_line(description: str, total: int, width: int) -> str:
    """The last line a progress bar drew on a terminal ``width`` characters wide."""
    rep = Reporter("rich")
    buf = io.StringIO()
    rep.err = Console(file=buf, force_terminal=True, width=width, color_system=None)
    with rep.progress(description, total) as advance:
        advance(total // 3)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    lines = [line for line in re.split(r"[\r\n]", text) if line.strip()]
    assert lines and all(len(line) <= width for line in lines), lines
    return lines[-1]


def test_progress_lines_fit_in_80_columns():
    line = progress_line(f"eval experiment-2026-12-07-learning-rate-sweep-a/{LONG}", 60_000, 80)
    assert line.startswith("eval experi") and "…" in line and "20000/60000" in line
    assert line.split()[1].endswith(".pt")  # the start and the end of the name are kept
    line = progress_line("soft targets T=2", 178, 80)
    assert line.startswith("soft targets T=2 ") and "59/178" in line and "eta" in line
    wide = progress_line("training", 1000, 200)
    assert "training" in wide and wide.count(":") >= 4  # elapsed and remaining time


def test_epoch_lines_fit_in_80_columns_with_every_statistic():
    record = {"epoch": 1000, "train_loss": 12.3456, "hard": 0.0071, "soft": 0.0034,
              "agreement": 0.9972, "lr_scale": 0.0625, "clipped": 0.0123, "test_errors": 12345,
              "seconds": 123.4}
    header, line = _epoch_line(record, 1000)
    assert len(header) <= 80 and len(line) <= 80
    assert header.split() == ["epoch", "loss", "hard", "soft", "agree", "lr", "clipped",
                              "test", "errors", "time"]
    assert line.split() == ["1000/1000", "12.3456", "0.0071", "0.0034", "0.9972", "0.0625",
                            "1%", "12345", "123.4s"]
    # a line of the same statistics has the same header, so it is printed once
    assert _epoch_line({**record, "epoch": 10, "train_loss": 0.5}, 1000)[0] == header


def test_train_prints_epoch_lines_under_one_header_at_80_columns(tmp_path):
    _, data = two_models(tmp_path)
    r = CliRunner().invoke(app, ["train", "--data", str(data), "--arch", "mlp:8", "--epochs",
                                 "3", "--eval-data", str(data), "--out",
                                 str(tmp_path / "m.safetensors")], env=NARROW)
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines() if r.stderr_bytes else r.output.splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("epoch ")]
    assert len(headers) == 1 and lines[headers[0]].split()[-3:] == ["test", "errors", "time"]
    assert [line.split()[0] for line in lines[headers[0] + 1:headers[0] + 4]] == [
        "1/3", "2/3", "3/3"]
