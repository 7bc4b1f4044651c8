"""Peak memory of soft-targets and train-student as the transfer set grows 8x.

A synthetic teacher (64 -> 256 -> C=1000 MLP, random weights) labels N random 64-feature
inputs (a memory-mapped .npy) into a dense transfer set: N x 1000 float32 logits and
probabilities, 0.8 GB at N = 100k and 6.6 GB at N = 800k. Each command runs in its own
process, which reports its own peak RSS (VmHWM, which counts the memory-mapped pages it
holds). The target: peak RSS within 20% from N = 100k to N = 800k.

Usage: python benchmarks/bench_memory.py [--sizes 100000,400000,800000] [--dir DIR]
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import kdcli_peak_rss, report

from kdcli.preprocessing import Preprocessing
from kdcli.students.base import Architecture, build_model
from kdcli.students.model_file import save_model

C, FEATURES = 1000, 64


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,400000,800000")
    ap.add_argument("--dir", default=None, help="scratch folder (needs ~8 GB free)")
    ap.add_argument("--top-k", type=int, default=None, help="also store top-k instead")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        d = Path(d)
        torch.manual_seed(0)
        arch = Architecture("mlp", hidden=[256])
        pre = Preprocessing(1.0, 0.0, 1.0, [FEATURES], "float32")
        teacher = d / "teacher.safetensors"
        save_model(teacher, build_model(arch, pre, C), arch, pre, C, {"command": "synthetic"})
        rows = []
        result = {}
        for n in sizes:
            data = d / f"x{n}.npy"
            np.save(data, np.random.default_rng(0).standard_normal((n, FEATURES), np.float32))
            transfer = d / f"t{n}.safetensors"
            extra = ["--top-k", str(a.top_k)] if a.top_k else []
            st_mb, st_s = kdcli_peak_rss(["soft-targets", str(teacher), "--data", str(data),
                                          "--T", "4", "--out", str(transfer), "--batch-size",
                                          "2048", "-q", *extra])
            size_gb = transfer.stat().st_size / 1e9
            ts_mb, ts_s = kdcli_peak_rss(["train-student", "--transfer", str(transfer),
                                          "--hidden", "64", "--layers", "1", "--alpha", "0",
                                          "--epochs", "1", "--eval-data", "none", "--out",
                                          str(d / "s.safetensors"), "--force", "-q"])
            rows.append((f"N={n:,} ({size_gb:.1f} GB)",
                         f"soft-targets {st_mb:,.0f} MB ({st_s:.0f} s), "
                         f"train-student {ts_mb:,.0f} MB ({ts_s:.0f} s)"))
            result[n] = {"file_gb": round(size_gb, 2), "soft_targets_mb": round(st_mb),
                         "train_student_mb": round(ts_mb), "soft_targets_s": round(st_s, 1),
                         "train_student_s": round(ts_s, 1)}
            transfer.unlink()
            data.unlink()
        lo, hi = result[sizes[0]], result[sizes[-1]]
        for cmd in ("soft_targets", "train_student"):
            growth = hi[f"{cmd}_mb"] / lo[f"{cmd}_mb"]
            result[f"{cmd}_growth"] = round(growth, 3)
            rows.append((f"{cmd} growth {sizes[0]:,} -> {sizes[-1]:,}",
                         f"{growth:.2f}x ({'met' if growth <= 1.2 else 'NOT met'}: <= 1.20x)"))
    report("peak RSS vs transfer-set size (C=1000, dense float32)", rows, result)


if __name__ == "__main__":
    main()
