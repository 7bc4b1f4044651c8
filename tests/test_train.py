"""kdcli train and train-student: reproducibility, resume, options and bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kdcli.data.augment import AugmentConfig
from kdcli.errors import FormatError, KdcliError, OutputExistsError, UsageError
from kdcli.students.base import Architecture
from kdcli.students.model_file import load_model
from kdcli.train import STUDENT_LR, STUDENT_WARMUP, TrainConfig, train, train_student
from kdcli.training.loop import learning_rate
from kdcli.transfer.reader import load_transfer_set


def same_weights(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_train_is_bit_identical_for_the_same_seed(tmp_path):
    kw = dict(arch=Architecture.parse("mlp:32", dropout=0.5, input_dropout=0.2, max_norm=3.0),
              eval_data="none")
    kw["augment"] = AugmentConfig(jitter=2)
    cfg = dict(epochs=2, batch_size=128)
    train("mnist[:1000]", out=tmp_path / "a.safetensors", config=TrainConfig(**cfg, seed=3), **kw)
    train("mnist[:1000]", out=tmp_path / "b.safetensors", config=TrainConfig(**cfg, seed=3), **kw)
    train("mnist[:1000]", out=tmp_path / "c.safetensors", config=TrainConfig(**cfg, seed=4), **kw)
    assert same_weights(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert not same_weights(tmp_path / "a.safetensors", tmp_path / "c.safetensors")
    m = load_model(tmp_path / "a.safetensors")
    assert float(m.model[1][1].weight.norm(dim=1).max()) <= 3.0 + 1e-4  # max-norm held
    assert m.training["jitter"] == 2 and m.training["command"] == "train"


def test_train_learns_mnist_and_records_metrics(tmp_path):
    s = train("mnist[:4000]", arch=Architecture.parse("mlp:64"), out=tmp_path / "m.safetensors",
              config=TrainConfig(epochs=3), eval_data="mnist:test[:1000]")
    assert s["test_errors"] < 150  # about 90% accuracy or better on 1,000 test digits
    assert [h["epoch"] for h in s["history"]] == [1, 2, 3]
    assert load_model(tmp_path / "m.safetensors").training["test_errors"] == s["test_errors"]


def test_student_trains_against_teacher_and_records_provenance(tmp_path, transfer_file):
    s = train_student(transfer_file, arch=Architecture.parse("mlp:32"), alpha=0.1,
                      out=tmp_path / "s.safetensors", config=TrainConfig(epochs=3, lr=0.02),
                      eval_data="mnist:test[:500]")
    assert s["agreement"] > 0.8 and s["T"] == 4.0 and s["loss"] == "kd"
    tr = load_model(tmp_path / "s.safetensors").training
    assert tr["transfer_sha256"] and tr["alpha"] == 0.1 and tr["teachers"][0]["sha256"]
    assert tr["test_errors"] == s["test_errors"]


def test_student_cnn_and_mse_and_alpha_zero(tmp_path, transfer_file):
    s = train_student(transfer_file, arch=Architecture.parse("cnn:0.25"), alpha=0.0,
                      loss="mse", out=tmp_path / "c.safetensors",
                      config=TrainConfig(epochs=1, lr=0.01), eval_data="none")
    assert s["hard"] == 0.0 and s["soft"] > 0
    assert load_model(tmp_path / "c.safetensors").arch.family == "cnn"


def test_other_T_re_derives_targets_and_says_so(tmp_path, transfer_file, cli):
    r = cli("train-student", "--transfer", transfer_file, "--hidden", "16", "--T", "2",
            "--epochs", "1", "--eval-data", "none", "--out", tmp_path / "s.safetensors")
    assert r.exit_code == 0, r.output
    assert "re-deriving soft targets at T=2" in r.stderr
    ts = load_transfer_set(transfer_file)
    expected = torch.softmax(ts.logits / 2, -1)
    torch.testing.assert_close(ts.targets_at(2.0), expected)
    assert load_model(tmp_path / "s.safetensors").training["T"] == 2.0


def test_student_training_is_bit_identical(tmp_path, transfer_file):
    for name in ("a", "b"):
        train_student(transfer_file, arch=Architecture.parse("mlp:16"), alpha=0.5,
                      out=tmp_path / f"{name}.safetensors", config=TrainConfig(epochs=2),
                      eval_data="none")
    assert same_weights(tmp_path / "a.safetensors", tmp_path / "b.safetensors")


def run_cli(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "kdcli", *map(str, args)], env=env, **kw)


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, transfer_file):
    base = ["train-student", "--transfer", transfer_file, "--hidden", "64", "--epochs", "6",
            "--eval-data", "none", "-q"]
    ref = tmp_path / "ref.safetensors"
    assert run_cli([*base, "--out", ref]).wait(timeout=300) == 0
    out = tmp_path / "s.safetensors"
    ckpt = Path(f"{out}.ckpt")
    proc = run_cli([*base, "--out", out])
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "killed before the end, so no model file"
    epoch = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= epoch < 6
    assert run_cli([*base, "--out", out, "--resume"]).wait(timeout=300) == 0
    assert same_weights(ref, out)
    assert not ckpt.exists()  # cleaned up after success


def test_sigint_leaves_a_resumable_checkpoint(tmp_path, transfer_file):
    base = ["train-student", "--transfer", transfer_file, "--hidden", "64", "--epochs", "4",
            "--eval-data", "none", "-q"]
    out = tmp_path / "s.safetensors"
    proc = run_cli([*base, "--out", out], stderr=subprocess.PIPE, text=True)
    while not Path(f"{out}.ckpt").exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("finished before the signal arrived")
    assert proc.returncode == 130 and err.startswith("Error: interrupted")
    p = run_cli([*base, "--out", out, "--resume"], stderr=subprocess.PIPE, text=True)
    _, err2 = p.communicate(timeout=300)
    assert p.returncode == 0, (out.exists(), err2)
    assert out.exists()


def test_resume_with_another_configuration_is_refused(tmp_path, transfer_file):
    out = tmp_path / "s.safetensors"
    cfg = TrainConfig(epochs=1)
    kw = dict(arch=Architecture.parse("mlp:16"), eval_data="none", out=out)
    train_student(transfer_file, config=cfg, **kw)
    torch.save({"fingerprint": json.dumps({"command": "train-student", "alpha": 0.9}),
                "epoch": 1}, f"{out}.ckpt")
    with pytest.raises(UsageError, match="different configuration.*alpha"):
        train_student(transfer_file, config=cfg, resume=True, force=True, **kw)
    with pytest.raises(UsageError, match="no checkpoint"):
        train_student(transfer_file, config=cfg, resume=True, force=True,
                      **{**kw, "out": tmp_path / "x.safetensors"})


def test_dry_run_writes_nothing(tmp_path, transfer_file):
    s = train_student(transfer_file, arch=Architecture.parse("mlp:16"),
                      out=tmp_path / "s.safetensors", eval_data="none",
                      config=TrainConfig(epochs=5, dry_run=True))
    assert len(s["history"]) == 1 and not (tmp_path / "s.safetensors").exists()


def test_bad_student_input(tmp_path, transfer_file, teacher_file):
    arch = Architecture.parse("mlp:8")
    tensors = load_file(str(transfer_file))
    meta = {k: (v if isinstance(v, str) else json.dumps(v))
            for k, v in load_transfer_set(transfer_file).meta.items() if k != "data_sha256"}
    meta["format_version"] = "2"  # rewritten by another writer: no kdcli checksum
    unlabelled = tmp_path / "unlabelled.safetensors"
    save_file({k: v for k, v in tensors.items() if k != "labels"}, str(unlabelled), meta)
    cases = {
        "missing": (dict(transfer=tmp_path / "none.safetensors"), KdcliError),
        "not a transfer set": (dict(transfer=teacher_file), FormatError),
        "alpha high": (dict(alpha=1.5), UsageError),
        "alpha negative": (dict(alpha=-0.1), UsageError),
        "alpha needs labels": (dict(transfer=unlabelled, alpha=0.3), UsageError),
        "T zero": (dict(T=0.0), UsageError),
        "loss": (dict(loss="l1"), UsageError),
    }
    out = tmp_path / "s.safetensors"
    for name, (kw, exc) in cases.items():
        kw = {"transfer": transfer_file, "arch": arch, "out": out, "eval_data": "none",
              "config": TrainConfig(epochs=1), **kw}
        with pytest.raises(exc):
            train_student(**kw)
            pytest.fail(name)
        assert not out.exists(), name
    train_student(unlabelled, arch=arch, alpha=0.0, out=out, eval_data="none",
                  config=TrainConfig(epochs=1))  # pure distillation needs no labels
    with pytest.raises(OutputExistsError):
        train_student(transfer_file, arch=arch, out=out, config=TrainConfig(epochs=1))


def test_cli_student_errors_are_one_line(cli, transfer_file):
    for args, text in ((["--hidden", "0"], "--hidden widths must be from 1"),
                       (["--alpha", "2"], "--alpha must lie in [0, 1]"),
                       (["--T", "-3"], "--T must be"),
                       (["--transfer", "nope.safetensors"], "does not exist")):
        r = cli("train-student", "--transfer", transfer_file, *args)
        assert r.exit_code == 1 and r.stderr.startswith("Error: "), (args, r.output)
        assert text in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_no_normalize_only_scales_inputs(tmp_path, cli):
    r = cli("train", "--data", "mnist[:500]", "--hidden", "8", "--layers", "1", "--epochs", "1",
            "--no-normalize", "--eval-data", "none", "--out", tmp_path / "m.safetensors", "-q")
    assert r.exit_code == 0, r.output
    pre = load_model(tmp_path / "m.safetensors").preprocessing
    assert (pre.scale, pre.mean, pre.std) == (255.0, 0.0, 1.0)
    s = train("mnist[:500]", arch=Architecture.parse("mlp:8"), out=tmp_path / "n.safetensors",
              config=TrainConfig(epochs=1), eval_data="none")
    pre = load_model(s["out"]).preprocessing
    assert abs(pre.mean - 0.13) < 0.01 and abs(pre.std - 0.31) < 0.01  # MNIST's statistics


def test_normalize_defaults_off_with_input_dropout(tmp_path):
    s = train("mnist[:300]", arch=Architecture.parse("mlp:8", input_dropout=0.2),
              out=tmp_path / "d.safetensors", config=TrainConfig(epochs=1), eval_data="none")
    assert load_model(s["out"]).preprocessing.mean == 0.0  # a dropped pixel is black


def test_outputs_get_normal_permissions_and_cuda_without_gpu_is_refused(tmp_path, cli,
                                                                        transfer_file):
    umask = os.umask(0)
    os.umask(umask)
    r = cli("train-student", "--transfer", transfer_file, "--hidden", "16", "--epochs", "1",
            "--eval-data", "none", "--out", "s.safetensors", "-q")
    assert r.exit_code == 0
    assert (Path("s.safetensors").stat().st_mode & 0o777) == 0o666 & ~umask
    if not torch.cuda.is_available():
        r = cli("train-student", "--transfer", transfer_file, "--device", "cuda",
                "--out", "g.safetensors")
        assert r.exit_code == 1 and "no CUDA GPU" in r.output and not Path("g.safetensors").exists()


def test_stop_after_keeps_the_checkpoint_and_resume_finishes(tmp_path, transfer_file):
    kw = {"arch": Architecture.parse("mlp:16"), "eval_data": None}
    ref, out = tmp_path / "ref.safetensors", tmp_path / "s.safetensors"
    train_student(transfer_file, out=ref, config=TrainConfig(epochs=3, lr=0.02), **kw)
    s = train_student(transfer_file, out=out, config=TrainConfig(epochs=3, lr=0.02,
                                                                 stop_after=1), **kw)
    assert s["stopped_after"] == 1 and not out.exists() and Path(f"{out}.ckpt").exists()
    train_student(transfer_file, out=out, config=TrainConfig(epochs=3, lr=0.02), resume=True,
                  **kw)
    assert same_weights(ref, out) and not Path(f"{out}.ckpt").exists()


def test_a_run_that_ends_at_chance_warns(cli, transfer_file):
    # lr 0.3 without a warmup or clipping blows the loss up; the retry at 0.15 keeps it
    # finite and below the blow-up rule, but leaves a model that predicts almost one class.
    # The run says so, naming a rate below the one it ended at.
    r = cli("train-student", "--transfer", transfer_file, "--hidden", "32", "--epochs", "2",
            "--lr", "0.3", "--warmup", "0", "--grad-clip", "0", "--eval-data",
            "mnist:test[:500]", "--out", "s.safetensors")
    assert r.exit_code == 0, r.stderr
    assert "near chance" in r.stderr and "--lr 0.15 is too high" in " ".join(r.stderr.split())
    assert "Try --lr 0.075" in " ".join(r.stderr.split())
    r = cli("train-student", "--transfer", transfer_file, "--hidden", "32", "--epochs", "2",
            "--eval-data", "mnist:test[:500]", "--out", "ok.safetensors")
    assert r.exit_code == 0 and "near chance" not in r.stderr


def test_learning_rate_warms_up_then_follows_the_schedule():
    cfg = TrainConfig(epochs=10, lr=0.5, warmup=2)  # 10 steps an epoch: 20 warmup steps
    lrs = [learning_rate(cfg, i, 100, 20) for i in range(100)]
    assert lrs[0] == pytest.approx(0.5 / 20) and lrs[19] == pytest.approx(0.5)
    assert all(b > a for a, b in zip(lrs[:19], lrs[1:20], strict=True))  # a linear ramp
    assert lrs[20] == pytest.approx(0.5)  # the cosine starts at the peak...
    assert all(b < a for a, b in zip(lrs[20:-1], lrs[21:], strict=True))
    assert lrs[-1] < 1e-3 and lrs[60] == pytest.approx(0.25)  # ...and halves half-way
    constant = TrainConfig(epochs=10, lr=0.5, warmup=2, schedule="constant")
    assert [learning_rate(constant, i, 100, 20) for i in (0, 9, 19, 20, 99)] == pytest.approx(
        [0.025, 0.25, 0.5, 0.5, 0.5])
    plain = TrainConfig(epochs=10, lr=0.5)  # no warmup: the cosine of before, unchanged
    assert [learning_rate(plain, i, 100, 0) for i in (0, 50)] == pytest.approx([0.5, 0.25])


def test_training_steps_follow_the_warmup_schedule(tmp_path, transfer_file, monkeypatch):
    seen = []
    step = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    cfg = TrainConfig(epochs=2, lr=0.05, warmup=1, batch_size=500)  # 2,000 rows: 4 steps
    train_student(transfer_file, arch=Architecture.parse("mlp:16"), eval_data="none",
                  out=tmp_path / "s.safetensors", config=cfg)
    assert seen[:4] == pytest.approx([0.0125, 0.025, 0.0375, 0.05])
    assert seen == pytest.approx([learning_rate(cfg, i, 8, 4) for i in range(8)])


def test_warmup_is_checked_and_students_warm_up_by_default(cli, transfer_file):
    import inspect

    from kdcli import cli as commands
    from kdcli.config import student_config

    for f in (commands.train_student_cmd, commands.sweep_cmd):
        params = inspect.signature(f).parameters
        assert (params["lr"].default, params["warmup"].default) == (STUDENT_LR, STUDENT_WARMUP)
    assert (student_config().lr, student_config().warmup) == (STUDENT_LR, STUDENT_WARMUP)
    assert inspect.signature(commands.train_cmd).parameters["warmup"].default == 0.0
    for bad in ("3", "-1", "nan"):
        r = cli("train-student", "--transfer", transfer_file, "--epochs", "2", "--warmup", bad,
                "--out", "s.safetensors")
        assert r.exit_code == 1 and "Error: --warmup must be between 0 and --epochs (2)" in r.stderr
        assert not Path("s.safetensors").exists()
    r = cli("train", "--data", "mnist[:300]", "--epochs", "1", "--warmup", "2", "--out", "t.st")
    assert r.exit_code == 1 and "--warmup must be between 0 and --epochs (1)" in r.stderr


def test_a_run_whose_loss_blows_up_stops_with_a_fix(cli, transfer_file):
    # Every retry at half the rate blows up too: after 4 halvings the run stops, naming a fix.
    # (without gradient clipping, which would keep the steps, and so the loss, finite)
    r = cli("train-student", "--transfer", transfer_file, "--hidden", "32", "--epochs", "2",
            "--lr", "1e6", "--grad-clip", "0", "--eval-data", "none", "--out", "s.safetensors")
    assert r.exit_code == 1
    err = " ".join(r.stderr.split())
    assert err.count("retrying the epoch at half the learning rate") == 4
    assert "Error: training diverged in epoch 1 (the loss is not finite) even at --lr 62500. " \
           "Lower --lr well below that, e.g. --lr 15625" in err
    assert not Path("s.safetensors").exists()


def test_a_loss_that_blows_up_is_retried_at_half_the_rate(cli, transfer_file):
    # Without a warmup, lr 0.5 blows this student's loss up in epoch 1 (to hundreds of times
    # its first value, still finite). The epoch is rolled back and rerun at lr 0.25, and the
    # run finishes, saying so; the rest of the run keeps the lower rate. (Gradient clipping,
    # on by default, would prevent the blow-up.)
    r = cli("train-student", "--transfer", transfer_file, "--hidden", "32", "--epochs", "2",
            "--lr", "0.5", "--warmup", "0", "--grad-clip", "0", "--eval-data", "mnist:test[:500]",
            "--out", "s.safetensors")
    assert r.exit_code == 0, r.stderr
    err = " ".join(r.stderr.split())
    assert "in epoch 1 at --lr 0.5; retrying the epoch at half the learning rate" in err
    assert load_model("s.safetensors").training["lr_scale"] == 0.5
    # Stopped after epoch 1 and resumed, the run keeps the lowered rate and ends the same.
    args = ("train-student", "--transfer", transfer_file, "--hidden", "32", "--epochs", "2",
            "--lr", "0.5", "--warmup", "0", "--grad-clip", "0", "--eval-data", "mnist:test[:500]",
            "--out", "r.safetensors", "--json")
    assert cli(*args, "--stop-after", "1").exit_code == 0
    r2 = cli(*args, "--resume")
    assert r2.exit_code == 0, r2.stderr
    history = json.loads(r2.stdout)["history"]
    assert [h.get("lr_scale") for h in history] == [0.5, 0.5]
    assert all(math.isfinite(h["train_loss"]) for h in history)
    assert history[1]["train_loss"] < history[0]["train_loss"]
    a, b = load_file("s.safetensors"), load_file("r.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_blow_up_rule():
    from kdcli.training.loop import _blew_up

    assert _blew_up(float("nan"), 2.0, []) and _blew_up(float("inf"), None, [])
    assert not _blew_up(5.9, 2.0, [])  # under 3x the untrained model's loss
    assert _blew_up(6.1, 2.0, [])
    assert _blew_up(4.0, 2.0, [{"train_loss": 1.0}])  # 4x the epoch before
    assert not _blew_up(2.5, 0.01, [{"train_loss": 0.5}, {"train_loss": 1.0}])
    assert not _blew_up(0.004, 2.0, [{"train_loss": 0.001}])  # near 0: noise, not a blow-up
    assert not _blew_up(100.0, None, [])  # nothing to compare with yet


def test_gradient_clipping_bounds_every_step(transfer_file, tmp_path):
    # Plain SGD: a step moves the weights by lr * |g|, so clipping |g| to 0.01 at lr 1 bounds
    # each step's L2 norm by 0.01, where the unclipped steps are far larger. lr 1e-30 gives
    # the initial weights (the same seed).
    from kdcli.output import Reporter

    kw = {"arch": Architecture.parse("mlp:32"), "eval_data": None, "alpha": 0.5,
          "reporter": Reporter("quiet"), "force": True}
    plain = {"epochs": 1, "momentum": 0.0, "warmup": 0.0, "schedule": "constant",
             "batch_size": 64}

    def weights(lr: float, clip: float) -> tuple[torch.Tensor, dict]:
        out = tmp_path / "s.safetensors"
        s = train_student(transfer_file, out=out, config=TrainConfig(lr=lr, grad_clip=clip,
                                                                     **plain), **kw)
        return torch.cat([p.detach().flatten() for p in load_model(out).model.parameters()]), s

    init, _ = weights(1e-30, 0.0)
    clipped, s = weights(1.0, 0.01)
    unclipped, _ = weights(1.0, 0.0)
    n_steps = -(-int(load_transfer_set(transfer_file).columns["inputs"].shape[0]) // 64)
    assert s["clipped"] == 1.0  # every step's gradient was over 0.01
    assert float((clipped - init).norm()) <= 0.01 * n_steps * (1 + 1e-4)
    assert float((unclipped - init).norm()) > 10 * float((clipped - init).norm())


def test_epochs_default_to_enough_steps_on_small_sets():
    # 20 epochs, unless that is under 2,000 steps: then as many as 2,000 steps need, at most
    # 1,000 epochs. An explicit --epochs is kept.
    cfg = TrainConfig()
    assert cfg.resolved(60000).epochs == 20  # 235 steps an epoch
    assert cfg.resolved(10000).epochs == 50  # 40 steps
    assert cfg.resolved(1257).epochs == 400  # sklearn's digits, 70%: 5 steps
    assert cfg.resolved(100).epochs == 1000  # 1 step: capped
    assert TrainConfig(epochs=3).resolved(100).epochs == 3
    assert TrainConfig(batch_size=32).resolved(1257).epochs == 50  # 40 steps


def test_long_runs_report_and_evaluate_about_fifty_times(tmp_path):
    from kdcli.output import Reporter

    rep = Reporter("quiet")
    s = train("mnist[:600]", arch=Architecture.parse("mlp:8"), out=tmp_path / "m.safetensors",
              config=TrainConfig(batch_size=600, lr=0.05), eval_data="mnist:test[:200]",
              reporter=rep)
    assert s["epochs"] == 1000 and len(s["history"]) == 1000  # 1 step an epoch: capped
    evaluated = [h["epoch"] for h in s["history"] if "test_errors" in h]
    assert evaluated == list(range(20, 1001, 20))
    assert s["test_errors"] == s["history"][-1]["test_errors"]
