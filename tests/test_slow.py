"""Long checks on the full MNIST (run with ``pytest -m slow``)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdcli.students.base import Architecture
from kdcli.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_2x800_on_hard_labels_reaches_the_paper_range(tmp_path):
    """Issue acceptance: kdcli train --hidden 800 --layers 2 --epochs 20 -> <= 180 errors."""
    s = train("mnist", arch=Architecture.parse("mlp:800,800"), out=tmp_path / "m.safetensors",
              config=TrainConfig(epochs=20))
    assert s["test_errors"] <= 180


@pytest.mark.slow
def test_quickstart_script_runs_end_to_end(tmp_path):
    kdcli = shutil.which("kdcli") or str(Path(sys.executable).parent / "kdcli")
    env = {**os.environ, "PATH": f"{Path(kdcli).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(ROOT / "examples" / "quickstart.sh"), "--epochs", "1"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("teacher.safetensors", "twin.safetensors", "transfer.safetensors",
                 "student.safetensors", "student.onnx"):
        assert (tmp_path / "quickstart" / name).exists(), name
    assert "Top-1 agreement" in r.stdout and "student.onnx" in r.stdout


@pytest.mark.slow
def test_paper_reproduction_quick_mode(tmp_path):
    script = ROOT / "examples" / "mnist-paper" / "reproduce.py"
    r = subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    table = (tmp_path / "results.md").read_text()
    assert "| teacher 2x1200" in table and "| 2x300 |" in table and "3's bias raised" in table
    log = (tmp_path / "commands.txt").read_text().splitlines()
    assert len(log) == 14 and all(" s  kdcli " in line for line in log)
    # The extras reuse the main run's teacher, and add a second one and an ensemble.
    r = subprocess.run([sys.executable, str(script), "--quick", "--extras", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    extras = (tmp_path / "results-extras.md").read_text()
    assert "both teachers (ensemble) | + 2 jittered copies |" in extras
    log = (tmp_path / "commands-extras.txt").read_text()
    assert "kdcli inspect teacher.safetensors" in log and "--out teacher-s1.safetensors" in log
    assert "--out teacher.safetensors" not in log  # the main run's teacher was reused
    # Section 6 on small parts of the data reuses the same teacher.
    r = subprocess.run([sys.executable, str(script), "--quick", "--small-data", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    small = (tmp_path / "results-small-data.md").read_text()
    for row in ("| 1% | 600 |", "| 3% | 1,800 |", "| 100% | 60,000 |",
                "| 3% of the training set, soft targets | 57.0% |", "share of the gap"):
        assert row in small, row
    log = (tmp_path / "commands-small-data.txt").read_text()
    assert "--data mnist:train[balanced=1800,seed=0]" in log
    assert "--out teacher.safetensors" not in log  # the main run's teacher was reused
