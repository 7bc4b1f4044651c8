"""torchrun: two gloo processes on loopback give the same results as one process."""

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from kdcli.transfer.reader import load_transfer_set

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")


def torchrun(*args, nproc: int = 2, timeout: float = 240, script: str | None = None):
    """Run ``torchrun --standalone --nproc-per-node N -m kdcli ARGS`` (or a script)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    target = [script] if script else ["-m", "kdcli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(nproc), *target, *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def max_diff(a, b) -> float:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


# Half an epoch of warmup, so that the schedule still ends at lr 0: the last steps then
# cannot amplify the ranks' different summation order beyond rounding.
STUDENT = ["train-student", "--hidden", "32", "--alpha", "0.1", "--eval-data", "none",
           "--batch-size", "100", "--warmup", "0.5", "-q"]


def test_two_ranks_train_the_same_student_as_one_process(tmp_path, transfer_file):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    args = [*STUDENT, "--transfer", transfer_file, "--epochs", "1"]
    single = subprocess.run([sys.executable, "-m", "kdcli", *map(str, args), "--out", one],
                            capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr
    r = torchrun(*args, "--out", two)
    assert r.returncode == 0, r.stderr
    assert max_diff(one, two) <= 1e-5
    assert load_file(str(two)).keys() == load_file(str(one)).keys()
    assert not list(tmp_path.glob("*.ckpt")) and not list(tmp_path.glob(".*tmp"))


def test_two_ranks_train_with_jitter_like_one_process(tmp_path):
    """Hard-label kdcli train with jitter: the shifts are drawn for the global batch."""
    args = ["train", "--data", "mnist[:1000]", "--hidden", "32", "--layers", "1",
            "--jitter", "2", "--epochs", "1", "--batch-size", "128", "--eval-data", "none", "-q"]
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    assert subprocess.run([sys.executable, "-m", "kdcli", *args, "--out", str(one)],
                          timeout=240).returncode == 0
    r = torchrun(*args, "--out", two)
    assert r.returncode == 0, r.stderr
    assert max_diff(one, two) <= 1e-5


# What 2-rank soft-targets promises against one process (README, "Scaling out").
SOFT_TARGETS_TOL = 1e-5


@pytest.mark.parametrize("out_name", ["t.safetensors", "t.index.json"])
def test_two_rank_soft_targets_equal_one_process(tmp_path, teacher_file, out_name):
    args = ["soft-targets", teacher_file, "--T", "3", "--data", "mnist[:1001]", "--jitter", "2",
            "--copies", "1", "-q"]
    if out_name.endswith(".json"):
        args += ["--shard-size", "300KB"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = tmp_path / "a" / out_name, tmp_path / "b" / out_name
    # one process with 2 threads against 2 ranks with 1 thread each: the float sums may be
    # split differently (on CPUs with AMX the logits then differ by up to ~7e-6)
    assert subprocess.run([sys.executable, "-m", "kdcli", *map(str, args), "--out", str(a)],
                          env={**os.environ, "OMP_NUM_THREADS": "2"},
                          timeout=240).returncode == 0
    r = torchrun(*args, "--out", b)
    assert r.returncode == 0, r.stderr
    ta, tb = load_transfer_set(a), load_transfer_set(b)
    assert ta.columns.keys() == tb.columns.keys()
    for name in ta.columns:
        x, y = ta.columns[name].whole(), tb.columns[name].whole()
        if name in ("inputs", "labels"):
            assert torch.equal(x, y), name  # data: bit-identical
        else:  # the README's promise: logits and soft targets within 1e-5
            torch.testing.assert_close(y, x, rtol=SOFT_TARGETS_TOL, atol=SOFT_TARGETS_TOL)
    assert {k: v for k, v in ta.meta.items() if k != "created"} == \
        {k: v for k, v in tb.meta.items() if k != "created"}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == \
        sorted(p.name for p in (tmp_path / "b").iterdir())  # no part files left behind


@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 2)])
def test_resume_across_a_change_of_world_size(tmp_path, transfer_file, first, second):
    base = [*STUDENT, "--transfer", transfer_file, "--epochs", "2"]
    ref = tmp_path / "ref.safetensors"
    assert subprocess.run([sys.executable, "-m", "kdcli", *map(str, base), "--out", str(ref)],
                          timeout=240).returncode == 0
    out = tmp_path / "s.safetensors"

    def run(nproc, *extra):
        if nproc == 1:
            return subprocess.run([sys.executable, "-m", "kdcli", *map(str, base), "--out",
                                   str(out), *extra], capture_output=True, text=True,
                                  timeout=240)
        return torchrun(*base, "--out", out, *extra, nproc=nproc)

    r = run(first, "--stop-after", "1")
    assert r.returncode == 0, r.stderr
    assert not out.exists() and (tmp_path / "s.safetensors.ckpt").exists()
    r = run(second, "--resume")
    assert r.returncode == 0, r.stderr
    assert max_diff(ref, out) <= 1e-5


def _job_with_a_bad_rank_1(tmp_path, transfer_file, rank1_code: str, epochs: int):
    """Run train-student under torchrun with ``rank1_code`` executed first on rank 1."""
    script = tmp_path / "job.py"
    bad = textwrap.indent(textwrap.dedent(rank1_code).strip(), "    ")
    script.write_text("\n".join([
        "import os, signal, sys, threading",
        "import kdcli.transfer.reader",
        "from kdcli.cli import main",
        "from kdcli.errors import DataError",
        'if os.environ["RANK"] == "1":',
        bad,
        f"sys.argv = ['kdcli', 'train-student', '--transfer', {str(transfer_file)!r},",
        f"            '--hidden', '32', '--epochs', '{epochs}', '--eval-data', 'none',",
        f"            '--out', {str(tmp_path / 's.safetensors')!r}]",
        "main()",
    ]) + "\n")
    compile(script.read_text(), str(script), "exec")  # the job itself must be valid
    t0 = time.time()
    r = torchrun(script=str(script), timeout=120)
    assert r.returncode != 0 and time.time() - t0 < 60
    assert not (tmp_path / "s.safetensors").exists()
    return r


def test_a_dying_rank_ends_the_job_in_bounded_time(tmp_path, transfer_file):
    r = _job_with_a_bad_rank_1(tmp_path, transfer_file, """
        threading.Timer(2.0, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    """, epochs=500)
    assert "Signal 9 (SIGKILL)" in r.stderr  # rank 1 died, and torchrun ended the job


def test_a_failing_rank_reports_its_error_with_its_rank(tmp_path, transfer_file):
    r = _job_with_a_bad_rank_1(tmp_path, transfer_file, """
        def broken(self, idx, T):
            raise DataError("shard unreadable on this machine", "Check the disk")
        kdcli.transfer.reader.TransferSet.targets = broken
    """, epochs=2)
    assert "[rank 1] Error: shard unreadable on this machine. Check the disk" in r.stderr


def test_commands_that_are_not_distributed_refuse_torchrun(cli, monkeypatch, teacher_file):
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = cli("inspect", teacher_file)
    assert r.exit_code == 1 and "kdcli inspect does not run under torchrun" in r.output
