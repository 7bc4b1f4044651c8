"""--precision fp32 against bf16 on the CPU at hand: speed and test errors, and what auto picks.

One teacher (784-1200-1200-10, trained in fp32) labels the 60,000 MNIST training digits at
T = 20 in each precision; a 784-300-300-10 student is distilled from each transfer set in
the same precision, for EPOCHS epochs with seeds 0 and 1, and counted on the 10,000 test
digits. bf16 autocast pays only on CPUs with bf16 instructions (AMX or AVX-512 BF16): the
line "auto picks" says which this CPU has.
"""

import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import report

from kdcli.checks import cpu_bf16_flags, resolve_precision
from kdcli.config import student_config
from kdcli.soft_targets import soft_targets
from kdcli.students.base import Architecture
from kdcli.train import TrainConfig, train, train_student

EPOCHS, SEEDS, TEACHER_EPOCHS = 4, (0, 1), 3


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    teacher = tmp / "teacher.safetensors"
    train("mnist", arch=Architecture.parse("mlp:1200,1200"), out=teacher, eval_data="none",
          config=TrainConfig(epochs=TEACHER_EPOCHS, precision="fp32"))
    result, rows = {}, []
    for precision in ("fp32", "bf16"):
        transfer = tmp / f"transfer-{precision}.safetensors"
        t0 = time.perf_counter()
        soft_targets([teacher], T=20, data="mnist:train", out=transfer, precision=precision,
                     device="cpu")
        teacher_pass = time.perf_counter() - t0
        errors, epoch_s = [], []
        for seed in SEEDS:
            s = train_student(transfer, arch=Architecture.parse("mlp:300,300"), alpha=0.1,
                              out=tmp / "s.safetensors", force=True, eval_data="mnist:test",
                              config=student_config(epochs=EPOCHS, seed=seed,
                                                    precision=precision))
            errors.append(s["test_errors"])
            epoch_s += [r["seconds"] for r in s["history"][1:]]  # the first warms up
        result[precision] = {"soft_targets_seconds": teacher_pass, "test_errors": errors,
                             "student_epoch_seconds": statistics.median(epoch_s)}
        rows.append((f"{precision}: soft-targets (60,000 digits)", f"{teacher_pass:.1f} s"))
        rows.append((f"{precision}: student epoch (median)",
                     f"{statistics.median(epoch_s):.2f} s"))
        rows.append((f"{precision}: test errors, seeds {SEEDS}", ", ".join(map(str, errors))))
    speed = result["fp32"]["student_epoch_seconds"] / result["bf16"]["student_epoch_seconds"]
    auto = resolve_precision("auto", "cpu")
    result.update({"cpu": cpu_name(), "bf16_flags": cpu_bf16_flags(), "auto": auto[0],
                   "bf16_student_speedup": speed})
    rows.append(("bf16 / fp32 student speed-up", f"{speed:.2f}x"))
    rows.append(("CPU", f"{cpu_name()}, bf16 flags: {', '.join(cpu_bf16_flags()) or 'none'}"))
    rows.append(("auto picks", f"{auto[0]} ({auto[1]})"))
    report(f"precision: fp32 vs bf16, 784-300-300-10 students, {EPOCHS} epochs", rows, result)


if __name__ == "__main__":
    main()
