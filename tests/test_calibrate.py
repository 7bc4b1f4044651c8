"""kdcli calibrate-bias: the fixed-point fit, and the paper's missing-class experiment."""

import json

import pytest
import torch

from kdcli.calibrate import calibrate_bias, fit_bias_shift
from kdcli.errors import UsageError
from kdcli.soft_targets import soft_targets
from kdcli.students.base import Architecture
from kdcli.students.model_file import load_model
from kdcli.train import TrainConfig, train_student


def test_fit_recovers_a_known_shift():
    torch.manual_seed(0)
    z = torch.randn(5000, 6) * 2
    true = torch.tensor([0.0, 3.5, 0.0, -1.0, 0.0, 0.0])
    target = torch.softmax(z.double() + true.double(), -1).mean(0)
    b, steps = fit_bias_shift(z, target.float())
    torch.testing.assert_close(b, true, atol=1e-3, rtol=0)  # median-zero, like the truth
    assert steps < 500
    got = torch.softmax(z.double() + b.double(), -1).mean(0)
    assert float((got - target).abs().max()) < 1e-5


def test_only_named_classes_move():
    torch.manual_seed(1)
    z = torch.randn(2000, 4)
    target = torch.softmax(z.double() + torch.tensor([0, 0, 2.0, 0]), -1).mean(0).float()
    b, _ = fit_bias_shift(z, target, free=[2])
    assert b[0] == b[1] == b[3] == 0 and float(b[2]) > 1


@pytest.fixture(scope="module")
def student_without_threes(tmp_path_factory, teacher_file):
    d = tmp_path_factory.mktemp("no3")
    soft_targets([teacher_file], T=4, data="mnist[:3000]", out=d / "t.safetensors",
                 exclude_classes=[3])
    train_student(d / "t.safetensors", arch=Architecture.parse("mlp:64"), alpha=0.0,
                  out=d / "s.safetensors", config=TrainConfig(epochs=4), eval_data="none")
    return d


def test_missing_class_is_restored_without_its_labels(student_without_threes, teacher_file,
                                                      cli):
    d = student_without_threes
    r = cli("calibrate-bias", "--model", d / "s.safetensors", "--teacher", teacher_file,
            "--data", "mnist[3000:6000]", "--eval-data", "mnist:test[:2000]",
            "--out", d / "c.safetensors", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    shifts = res["shifts"]
    assert shifts[3] == max(shifts) and shifts[3] > 1  # the 3 is raised most
    ev = res["eval"]
    assert ev["after"]["errors_per_class"][3] < ev["before"]["errors_per_class"][3]
    assert ev["after"]["errors"] < ev["before"]["errors"]
    tr = load_model(d / "c.safetensors").training
    assert tr["bias_shift"]["shifts"][3] == pytest.approx(shifts[3], abs=1e-3)
    assert tr["test_errors"] == ev["after"]["errors"]


def test_calibrate_from_transfer_set_and_labels(student_without_threes, transfer_file):
    d = student_without_threes
    res = calibrate_bias(d / "s.safetensors", d / "x.safetensors", transfer=transfer_file)
    assert res["shifts"][3] > 0 and res["source"].startswith("transfer set")
    res = calibrate_bias(d / "s.safetensors", d / "y.safetensors", target="labels",
                         data="mnist[:2000]", classes=[3])
    assert [v for i, v in enumerate(res["shifts"]) if i != 3] == [0.0] * 9
    with pytest.raises(UsageError, match="exactly one"):
        calibrate_bias(d / "s.safetensors", d / "z.safetensors")
