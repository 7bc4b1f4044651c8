"""--precision auto: bf16 autocast where the hardware has bf16 units, fp32 elsewhere."""

from __future__ import annotations

import json

import pytest

from kdcli import checks
from kdcli.checks import (
    AUTO_PRECISION_ENV,
    cpu_bf16_flags,
    precision_note,
    resolve_precision,
)
from kdcli.config import TrainConfig
from kdcli.errors import UsageError
from kdcli.output import Reporter
from kdcli.students.base import Architecture
from kdcli.students.model_file import load_model
from kdcli.train import train

EPYC_ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n"
ZEN3 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"


@pytest.fixture
def no_override(monkeypatch):
    monkeypatch.delenv(AUTO_PRECISION_ENV, raising=False)


@pytest.mark.parametrize("text, flags", [(EPYC_ZEN4, ["avx512_bf16"]),
                                         (SAPPHIRE, ["amx_bf16"]), (ZEN3, [])])
def test_cpu_flags_are_read_from_cpuinfo(tmp_path, text, flags):
    f = tmp_path / "cpuinfo"
    f.write_text(text)
    assert cpu_bf16_flags(f) == flags


def test_unreadable_cpuinfo_means_no_bf16(tmp_path):
    assert cpu_bf16_flags(tmp_path / "missing") == []


@pytest.mark.parametrize("flags, chosen", [(["avx512_bf16"], "bf16"), (["amx_bf16"], "bf16"),
                                           ([], "fp32")])
def test_auto_follows_the_cpu(monkeypatch, no_override, flags, chosen):
    monkeypatch.setattr(checks, "cpu_bf16_flags", lambda: flags)
    got, why = resolve_precision("auto", "cpu")
    assert got == chosen
    assert ("bf16 instructions" in why) and (bool(flags) == ("no bf16" not in why))


def test_explicit_precision_is_kept_whatever_the_cpu(monkeypatch, no_override):
    monkeypatch.setattr(checks, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    assert resolve_precision("fp32", "cpu")[0] == "fp32"
    monkeypatch.setattr(checks, "cpu_bf16_flags", lambda: [])
    assert resolve_precision("bf16", "cpu")[0] == "bf16"
    assert precision_note("fp32", "cpu") is None


def test_environment_overrides_auto(monkeypatch):
    monkeypatch.setattr(checks, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    monkeypatch.setenv(AUTO_PRECISION_ENV, "fp32")
    assert resolve_precision("auto", "cpu") == ("fp32", f"{AUTO_PRECISION_ENV}=fp32")
    monkeypatch.setenv(AUTO_PRECISION_ENV, "fp8")
    with pytest.raises(UsageError, match=AUTO_PRECISION_ENV):
        resolve_precision("auto", "cpu")


def test_unknown_precision_is_a_usage_error():
    with pytest.raises(UsageError, match="auto, fp32 or bf16"):
        resolve_precision("fp16", "cpu")


def test_train_records_what_auto_chose_and_says_it(tmp_path, monkeypatch, no_override, capsys):
    monkeypatch.setattr(checks, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "m.safetensors"
    train("mnist[:512]", arch=Architecture.parse("mlp:16"), out=out,
          config=TrainConfig(epochs=1), eval_data="none", reporter=Reporter("rich"))
    assert load_model(out).training["precision"] == "bf16"
    assert "bf16 (auto: this CPU has bf16 instructions (avx512_bf16))" \
        in capsys.readouterr().out
    assert TrainConfig().precision == "auto"


def test_soft_targets_and_student_record_the_concrete_precision(cli, teacher_file, monkeypatch,
                                                                no_override):
    monkeypatch.setattr(checks, "cpu_bf16_flags", lambda: [])
    monkeypatch.setenv("COLUMNS", "200")
    r = cli("soft-targets", teacher_file, "--data", "mnist[:300]", "--out", "t.safetensors")
    assert r.exit_code == 0, r.output
    assert "fp32 (auto: this CPU has no bf16 instructions" in r.output
    from kdcli.transfer.reader import load_transfer_set

    assert load_transfer_set("t.safetensors").meta["precision"] == "fp32"
    monkeypatch.setattr(checks, "cpu_bf16_flags", lambda: ["amx_bf16"])
    r = cli("train-student", "--transfer", "t.safetensors", "--hidden", "8", "--epochs", "1",
            "--eval-data", "none", "--out", "s.safetensors", "--json")
    assert r.exit_code == 0, r.output
    assert load_model("s.safetensors").training["precision"] == "bf16"
    assert json.loads(r.stdout)["precision"] == "bf16"


def test_help_says_auto_is_the_default(cli):
    for command in ("train", "train-student", "soft-targets", "sweep"):
        r = cli(command, "--help")
        assert "auto" in r.output and "bf16" in r.output, command


def test_host_to_device_leaves_cpu_tensors_alone():
    import torch

    from kdcli.devices import host_to_device

    x = torch.arange(6)
    assert host_to_device(x, "cpu") is x


cuda = pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_host_to_device_copies_from_pinned_memory_to_the_gpu():
    import torch

    from kdcli.devices import host_to_device

    x = torch.arange(6)
    y = host_to_device(x, "cuda")
    assert y.device.type == "cuda" and torch.equal(y.cpu(), x)


@cuda
def test_student_and_soft_targets_on_cuda_match_the_cpu(tmp_path, teacher_file):
    from kdcli.soft_targets import soft_targets
    from kdcli.transfer.reader import load_transfer_set

    outs = {}
    for dev in ("cpu", "cuda"):
        out = tmp_path / f"t-{dev}.safetensors"
        soft_targets([teacher_file], T=4.0, data="mnist[:512]", out=out, device=dev,
                     precision="fp32")
        outs[dev] = load_transfer_set(out)
    import torch

    assert torch.allclose(outs["cpu"].soft_targets, outs["cuda"].soft_targets, atol=1e-3)
    s = train("mnist[:512]", arch=Architecture.parse("mlp:16"), out=tmp_path / "m.safetensors",
              eval_data="mnist:test[:200]", config=TrainConfig(epochs=1, device="cuda"))
    assert s["precision"] in ("bf16", "fp32") and s["test_errors"] < 200

