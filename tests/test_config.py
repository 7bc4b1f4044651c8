"""kdcli.config: the training and distillation settings, and their one set of defaults."""

import inspect
import subprocess
import sys

import pytest

from kdcli.config import (
    STUDENT_GRAD_CLIP,
    STUDENT_LR,
    STUDENT_WARMUP,
    SWEEP_ALPHA,
    DistillConfig,
    TrainConfig,
    student_config,
)
from kdcli.errors import UsageError


def test_importing_the_config_does_not_import_torch():
    code = ("import sys, kdcli.config; "
            "print([m for m in ('torch', 'kdcli.students.base', 'kdcli.train') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("bad, message", [
    ({"alpha": 1.5}, "--alpha must lie in [0, 1]"), ({"alpha": float("nan")}, "--alpha"),
    ({"loss": "l1"}, "unknown --loss 'l1'"), ({"tail": "guess"}, "unknown --tail 'guess'"),
    ({"T": 0.0}, "--T must be a finite number"),
])
def test_distill_config_checks_each_setting(bad, message):
    DistillConfig().check()
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DistillConfig(**bad).check()


def test_distill_config_resolves_T_and_fingerprints_tail_only_for_top_k():
    d = DistillConfig(alpha=0.2).resolved(20.0)
    assert d.T == 20.0 and DistillConfig(T=4.0).resolved(20.0).T == 4.0
    assert d.settings(top_k=False) == {"alpha": 0.2, "T": 20.0, "loss": "kd", "center": True,
                                       "tail": None}
    assert d.settings(top_k=True)["tail"] == "student"


def test_configs_are_keyword_only():
    with pytest.raises(TypeError):
        TrainConfig(20)
    with pytest.raises(TypeError):
        DistillConfig(4.0)


def test_train_student_shorthands_override_the_distill_config():
    from kdcli.train import _with

    d = _with(DistillConfig(alpha=0.3, loss="mse"), T=2.0, alpha=None, loss=None, center=False,
              tail=None)
    assert d == DistillConfig(T=2.0, alpha=0.3, loss="mse", center=False)


def test_cli_defaults_are_the_configs():
    from kdcli import cli

    student = inspect.signature(cli.train_student_cmd).parameters
    assert (student["lr"].default, student["warmup"].default, student["grad_clip"].default) == \
        (STUDENT_LR, STUDENT_WARMUP, STUDENT_GRAD_CLIP)
    assert student["alpha"].default == DistillConfig().alpha
    assert student["tail"].default == DistillConfig().tail
    sweep = inspect.signature(cli.sweep_cmd).parameters
    assert (sweep["lr"].default, sweep["alpha"].default) == (STUDENT_LR, SWEEP_ALPHA)
    train = inspect.signature(cli.train_cmd).parameters
    assert (train["lr"].default, train["grad_clip"].default) == (TrainConfig().lr, 0.0)
    assert student_config(epochs=3) == TrainConfig(epochs=3, lr=STUDENT_LR, warmup=STUDENT_WARMUP,
                                                   grad_clip=STUDENT_GRAD_CLIP)


def test_sweep_refuses_a_temperature_in_its_distill_config(tmp_path):
    from kdcli.sweep import sweep

    with pytest.raises(UsageError, match="temperatures from --T"):  # before reading anything
        sweep(tmp_path / "teacher.safetensors", temperatures=[2.0], hidden=[8],
              distill=DistillConfig(T=4.0), out_dir=tmp_path)
