"""kdcli sweep: the grid, its table, resuming, and the plot."""

import json

import pytest

from kdcli.config import DistillConfig
from kdcli.errors import UsageError
from kdcli.students.model_file import load_model
from kdcli.sweep import sweep
from kdcli.train import student_config


def test_sweep_trains_the_grid_and_resumes(tmp_path, teacher_file):
    kw = dict(temperatures=[2.0, 8.0], hidden=[8, 16], data="mnist[:1500]",
              config=student_config(epochs=1),
              eval_data="mnist:test[:300]", out_dir=tmp_path / "sw")
    res = sweep(teacher_file, **kw)
    points = res["points"]
    assert [(p["hidden"], p["T"]) for p in points] == [(8, 2.0), (8, 8.0), (16, 2.0), (16, 8.0)]
    assert all(p["status"] == "trained" and p["test_errors"] >= 0 for p in points)
    assert load_model(points[1]["file"]).training["T"] == 8.0
    saved = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert saved["points"][0]["test_errors"] == points[0]["test_errors"]
    again = sweep(teacher_file, **kw)  # finished points are kept, not retrained
    assert [p["status"] for p in again["points"]] == ["kept"] * 4
    assert [p["test_errors"] for p in again["points"]] == [p["test_errors"] for p in points]
    assert res["plot"] and (tmp_path / "sw" / "sweep.png").stat().st_size > 1000
    fresh = sweep(teacher_file, **kw, force=True)  # --force starts afresh
    assert [p["status"] for p in fresh["points"]] == ["trained"] * 4
    assert (saved["lr"], saved["warmup"]) == (0.05, 1.0)


@pytest.mark.parametrize("change", [{"lr": 0.02}, {"warmup": 0.0}, {"epochs": 2},
                                    {"grad_clip": 0.0}, {"alpha": 0.5}])
def test_sweep_refuses_to_keep_students_trained_otherwise(tmp_path, teacher_file, change):
    kw = dict(temperatures=[4.0], hidden=[8], data="mnist[:600]", config=student_config(epochs=1),
              eval_data="none", out_dir=tmp_path / "sw")
    sweep(teacher_file, **kw)
    key = next(iter(change))
    other = ({**kw, "distill": DistillConfig(**change)} if key == "alpha"
             else {**kw, "config": student_config(**{"epochs": 1, **change})})
    with pytest.raises(UsageError, match="trained with other settings: " + key):
        sweep(teacher_file, **other)
    assert [p["status"] for p in sweep(teacher_file, **kw)["points"]] == ["kept"]


def test_sweep_with_another_teacher_needs_force(tmp_path, teacher_file):
    from kdcli.students.base import Architecture
    from kdcli.train import TrainConfig, train

    other = tmp_path / "other.safetensors"
    train("mnist[:500]", arch=Architecture.parse("mlp:16"), out=other,
          config=TrainConfig(epochs=1), eval_data=None)
    kw = dict(temperatures=[2.0], hidden=[8], data="mnist[:500]",
              config=student_config(epochs=1), eval_data=None,
              out_dir=tmp_path / "sw")
    sweep(teacher_file, **kw)
    with pytest.raises(UsageError, match="another teacher.*--force"):
        sweep(other, **kw)
    assert sweep(other, **kw, force=True)["points"][0]["status"] == "trained"


def test_sweep_rejects_bad_grids(tmp_path, teacher_file):
    with pytest.raises(UsageError):
        sweep(teacher_file, temperatures=[], hidden=[8], out_dir=tmp_path)
    with pytest.raises(UsageError):
        sweep(teacher_file, temperatures=[0.0], hidden=[8], out_dir=tmp_path)
    with pytest.raises(UsageError):
        sweep(teacher_file, temperatures=[1.0], hidden=[0], out_dir=tmp_path)


def test_sweep_with_seeds_reports_mean_and_sd_and_resumes(cli, tmp_path, teacher_file):
    import statistics

    args = ["sweep", teacher_file, "--T", "4", "--hidden", "8", "--data", "mnist[:1500]",
            "--epochs", "1", "--lr", "0.03", "--warmup", "0.5", "--eval-data", "mnist:test[:300]",
            "--out-dir", "sw"]
    r = cli(*args, "--seeds", "0,1", "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    points = res["points"]
    assert [(p["hidden"], p["T"], p["seed"]) for p in points] == [(8, 4.0, 0), (8, 4.0, 1)]
    a, b = (load_model(p["file"]) for p in points)
    assert a.training["seed"] == 0 and b.training["seed"] == 1
    assert (a.training["lr"], a.training["warmup"]) == (0.03, 0.5)  # the options reach training
    assert not all((x == y).all() for x, y in zip(a.model.state_dict().values(),
                                                   b.model.state_dict().values(), strict=True))
    errs = [p["test_errors"] for p in points]
    (g,) = res["summary"]
    assert g["test_errors"] == errs and g["mean"] == statistics.mean(errs)
    assert g["sd"] == statistics.stdev(errs)
    # A third seed trains only the new students; the table shows mean ± sd.
    r = cli(*args, "--seeds", "0,1,2")
    assert r.exit_code == 0, r.stderr
    assert "±" in r.stdout and "over seeds 0,1,2" in r.stdout
    saved = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert [p["status"] for p in saved["points"]] == ["kept", "kept", "trained"]
    assert saved["summary"][0]["test_errors"][:2] == errs
    r = cli(*args, "--seeds", "1,1")
    assert r.exit_code == 1 and "distinct" in r.stderr


def test_sweep_passes_the_device_to_training(cli, tmp_path, teacher_file):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the error on a machine without a GPU")
    r = cli("sweep", teacher_file, "--T", "4", "--hidden", "8", "--data", "mnist[:300]",
            "--epochs", "1", "--eval-data", "mnist:test[:100]", "--out-dir", "sw",
            "--device", "cuda")
    assert r.exit_code == 1 and "no CUDA GPU" in r.stderr
    assert not list((tmp_path / "sw").glob("student-*"))


def test_sweep_refuses_a_transfer_set_made_at_another_precision(tmp_path, teacher_file,
                                                                monkeypatch):
    kw = dict(temperatures=[2.0], hidden=[8], data="mnist[:600]",
              config=student_config(epochs=1), eval_data="none", out_dir=tmp_path / "sw")
    sweep(teacher_file, **kw)  # auto is pinned to fp32 in the tests
    monkeypatch.setenv("KDCLI_AUTO_PRECISION", "bf16")
    with pytest.raises(UsageError, match="made at --precision fp32.*runs at bf16"):
        sweep(teacher_file, **kw)
