"""torchrun with 2 processes against 1 process, for train-student and soft-targets.

Same global batch, seed and data. On a 2-core machine two ranks split the same cores that
one process already uses with 2 threads, so no speed-up is expected: this measures the
overhead of DDP (gradient all-reduce over gloo) and of merging the ranks' soft targets,
and checks that both runs agree (max weight difference, identical transfer sets).

Usage: python benchmarks/bench_distributed.py [--epochs 3] [--nproc 2]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import report
from safetensors.torch import load_file

from kdcli.students.base import Architecture
from kdcli.train import TrainConfig, train


def timed(cmd: list[str], env: dict) -> tuple[float, dict]:
    """Wall seconds of ``cmd`` (a kdcli command with --json) and its JSON result."""
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True).stdout
    return time.perf_counter() - t0, json.loads(out[out.index("{"):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=2)
    a = ap.parse_args()
    threads = os.cpu_count() or 1
    one_env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    many_env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // a.nproc))}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(a.nproc), "-m", "kdcli"]
    single = [sys.executable, "-m", "kdcli"]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        teacher = d / "teacher.safetensors"
        train("mnist", arch=Architecture("mlp", hidden=[1200, 1200]), out=teacher,
              config=TrainConfig(epochs=1, precision="bf16"), eval_data=None)
        st = ["soft-targets", str(teacher), "--T", "20", "--json"]
        st1, st1_json = timed([*single, *st, "--out", str(d / "t1.safetensors")], one_env)
        stn, stn_json = timed([*run, *st, "--out", str(d / "tn.safetensors")], many_env)
        a1, an = load_file(str(d / "t1.safetensors")), load_file(str(d / "tn.safetensors"))
        same = all(torch.equal(a1[k], an[k]) for k in a1)

        ts = ["train-student", "--transfer", str(d / "t1.safetensors"), "--hidden", "800",
              "--epochs", str(a.epochs), "--eval-data", "none", "--json", "--force"]
        tr1, tr1_json = timed([*single, *ts, "--out", str(d / "s1.safetensors")], one_env)
        trn, trn_json = timed([*run, *ts, "--out", str(d / "sn.safetensors")], many_env)
        # steady-state throughput: epochs after the first, from the runs' own epoch timings
        ep1 = [h["seconds"] for h in tr1_json["history"][1:]]
        epn = [h["seconds"] for h in trn_json["history"][1:]]
        w1, wn = load_file(str(d / "s1.safetensors")), load_file(str(d / "sn.safetensors"))
        diff = max(float((w1[k] - wn[k]).abs().max()) for k in w1)
    n = 60_000
    sps1, spsn = n * len(ep1) / sum(ep1), n * len(epn) / sum(epn)
    rows = [
        ("soft-targets 60k, 1 process", f"{st1:.1f} s wall, teacher pass and write "
                                        f"{st1_json['samples_per_s']:,.0f} samples/s"),
        (f"soft-targets 60k, {a.nproc} ranks",
         f"{stn:.1f} s wall ({st1 / stn:.2f}x), {stn_json['samples_per_s']:,.0f} samples/s; "
         f"tensors {'identical' if same else 'DIFFER'}"),
        ("train-student 2x800, 1 process", f"{tr1:.1f} s wall, {sps1:,.0f} samples/s"),
        (f"train-student 2x800, {a.nproc} ranks",
         f"{trn:.1f} s wall ({tr1 / trn:.2f}x), {spsn:,.0f} samples/s ({spsn / sps1:.2f}x); "
         f"max weight diff after {a.epochs} epochs {diff:.1e}"),
    ]
    report(f"torchrun {a.nproc} ranks vs 1 process on {threads} cores", rows,
           {"soft_targets_s": [st1, stn], "train_student_s": [tr1, trn],
            "train_student_samples_per_s": [sps1, spsn],
            "soft_targets_identical": same, "max_weight_diff": diff,
            "wall_speedup_soft_targets": st1 / stn, "wall_speedup_train_student": tr1 / trn,
            "epoch_speedup_train_student": spsn / sps1})


if __name__ == "__main__":
    main()
