"""soft_targets() against a bare inference loop over the same teacher, data and batch."""

import math
import tempfile
from pathlib import Path

import torch
from common import best_of, report

from kdcli.data.sources import load_data
from kdcli.modalities import fit_preprocessing
from kdcli.soft_targets import soft_targets
from kdcli.students.base import Architecture, build_model
from kdcli.students.model_file import save_model

BATCH = 1024
ROUNDS = 5
TARGET = 0.95  # of the bare loop's samples/s, the teacher pass and file write


def main() -> None:
    torch.manual_seed(0)
    data = load_data("mnist:train")
    tmp = Path(tempfile.mkdtemp())
    arch = Architecture.parse("mlp:1200,1200")
    pre = fit_preprocessing(data.inputs)
    model = build_model(arch, pre, 10).eval()
    teacher = tmp / "teacher.safetensors"
    save_model(teacher, model, arch, pre, 10, {})
    n = len(data)
    result, rows = {}, []
    for precision in ("fp32", "bf16"):
        def bare(precision=precision):
            with torch.inference_mode(), torch.autocast(
                    "cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                for i in range(0, n, BATCH):
                    model(data.inputs[i:i + BATCH]).float()

        loop_times = []

        def kd(precision=precision, loop_times=loop_times):
            s = soft_targets([teacher], T=20, data="mnist:train", out=tmp / "t.safetensors",
                             batch_size=BATCH, precision=precision, force=True, device="cpu")
            loop_times.append(s["seconds"])

        # Interleaved rounds, the best of each: the machine's drift hits both alike.
        t_bare = t_kd = math.inf
        for _ in range(ROUNDS):
            t_bare, t_kd = min(t_bare, best_of(bare, 1)), min(t_kd, best_of(kd, 1))
        t_loop = min(loop_times)
        ratio, whole = t_bare / t_loop, t_bare / t_kd
        result[precision] = {"bare_samples_per_s": n / t_bare,
                             "kdcli_loop_samples_per_s": n / t_loop,
                             "kdcli_call_samples_per_s": n / t_kd,
                             "ratio": ratio, "ratio_whole_call": whole}
        rows.append((f"{precision} bare inference_mode loop", f"{n / t_bare:,.0f} samples/s"))
        rows.append((f"{precision} kdcli teacher pass + file write",
                     f"{n / t_loop:,.0f} samples/s  ratio {ratio:.2f}"))
        rows.append((f"{precision} kdcli whole call", f"{n / t_kd:,.0f} samples/s  ratio "
                     f"{whole:.2f} (adds MNIST decoding, hashing, teacher loading)"))
    result["target_met"] = {p: result[p]["ratio"] >= TARGET for p in ("fp32", "bf16")}
    rows.append((f"target: ratio >= {TARGET} (fp32, bf16)",
                 ", ".join("met" if ok else "NOT met" for ok in result["target_met"].values())))
    speedup = (result["bf16"]["kdcli_loop_samples_per_s"]
               / result["fp32"]["kdcli_loop_samples_per_s"])
    rows.append(("bf16 / fp32 speed-up (kdcli)", f"{speedup:.2f}x"))
    report("soft-targets, 784-1200-1200-10 teacher on 60,000 MNIST digits", rows, result)


if __name__ == "__main__":
    main()
