"""kdcli's training loop against the eager fixed-batch step ceiling and the PyTorch KD
tutorial's loop, same model, batch and loss.

The ceiling: the same 784-800-800-10 MLP, batch 256, kdcli's own loss (0.9 * T^2 * KL +
0.1 * CE, `training.losses.criterion`), gradient clipping to norm 5 and SGD with Nesterov
momentum, on one batch of tensors already in memory: forward, loss, backward, clip, step and
nothing else. kdcli's loop reaches at most this; the target is 90% of it, fp32 and bf16.
The tutorial loop: a DataLoader over a TensorDataset of preprocessed float inputs, soft
targets and labels, with the tutorial's loss and no clipping.
kdcli: ``train_student`` on a transfer-set file (index batching over memory-mapped tensors),
at the same settings as the ceiling. All are timed on their second epoch (the ceiling: the
best of two rounds of 150 steps). Peak RSS of the CLI is measured in a subprocess.
"""

import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import kdcli_peak_rss, report
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdcli.config import DistillConfig, student_config
from kdcli.soft_targets import soft_targets
from kdcli.students.base import Architecture
from kdcli.train import TrainConfig, train, train_student
from kdcli.training.losses import criterion
from kdcli.transfer.reader import load_transfer_set

T, ALPHA, BATCH, LR, CLIP = 20.0, 0.1, 256, 0.02, 5.0
TARGET = 0.9  # of the ceiling


def tutorial_epoch_seconds(ts) -> float:
    x = ((ts.inputs.float() / 255 - 0.1307) / 0.3081).reshape(len(ts), -1)
    loader = DataLoader(TensorDataset(x, ts.soft_targets.clone(), ts.labels.clone()),
                        batch_size=BATCH, shuffle=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 800), nn.ReLU(), nn.Linear(800, 800), nn.ReLU(),
                          nn.Linear(800, 10))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True)
    ce = nn.CrossEntropyLoss()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        running = 0.0
        for xb, pb, yb in loader:
            opt.zero_grad()
            z = model(xb)
            soft_prob = F.log_softmax(z / T, dim=-1)
            soft_loss = torch.sum(pb * (pb.log() - soft_prob)) / soft_prob.size()[0] * T**2
            loss = (1 - ALPHA) * soft_loss + ALPHA * ce(z, yb)
            loss.backward()
            opt.step()
            running += loss.item()
        times.append(time.perf_counter() - t0)
    return times[-1]


def kdcli_epoch_seconds(transfer: Path, out: Path, precision: str,
                        device: str = "cpu") -> float:
    s = train_student(transfer, arch=Architecture.parse("mlp:800,800"), alpha=ALPHA, T=T,
                      out=out, eval_data="none", force=True,
                      config=student_config(epochs=2, batch_size=BATCH, lr=LR, grad_clip=CLIP,
                                            precision=precision, device=device))
    return s["history"][-1]["seconds"]


def peak_rss_mb(transfer: Path, out: Path) -> float:
    return kdcli_peak_rss(["train-student", "--transfer", str(transfer), "--hidden", "800",
                           "--epochs", "1", "--eval-data", "none", "--out", str(out),
                           "--force", "-q"])[0]


def step_ceiling(precision: str, device: str = "cpu", steps: int = 150) -> float:
    """Samples/s of the bare step on one fixed batch: kdcli's loss and clipping, no data
    handling at all (the eager fixed-batch step ceiling)."""
    torch.manual_seed(0)
    dev = torch.device(device)
    model = nn.Sequential(nn.Linear(784, 800), nn.ReLU(), nn.Linear(800, 800), nn.ReLU(),
                          nn.Linear(800, 10)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True)
    crit = criterion(DistillConfig(alpha=ALPHA, T=T))
    x, y = torch.randn(BATCH, 784, device=dev), torch.randint(0, 10, (BATCH,), device=dev)
    p = torch.softmax(torch.randn(BATCH, 10, device=dev), -1)
    best = 0.0
    for _ in range(2):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                z = model(x)
            loss = crit(z.float(), p, y)[0]
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, steps * BATCH / (time.perf_counter() - t0))
    return best


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    teacher = tmp / "teacher.safetensors"
    train("mnist[:2000]", arch=Architecture.parse("mlp:64"), out=teacher,
          config=TrainConfig(epochs=1), eval_data="none")
    transfer = tmp / "transfer.safetensors"
    soft_targets([teacher], T=T, data="mnist:train", out=transfer)
    ts = load_transfer_set(transfer)
    n = len(ts)
    tut = n / tutorial_epoch_seconds(ts)
    ceil32 = step_ceiling("fp32")
    fp32 = n / kdcli_epoch_seconds(transfer, tmp / "s.safetensors", "fp32")
    ceil16 = step_ceiling("bf16")
    bf16 = n / kdcli_epoch_seconds(transfer, tmp / "s.safetensors", "bf16")
    ceil32, ceil16 = max(ceil32, step_ceiling("fp32")), max(ceil16, step_ceiling("bf16"))
    rss = peak_rss_mb(transfer, tmp / "s2.safetensors")
    size_mb = transfer.stat().st_size / 2**20
    result = {"tutorial_samples_per_s": tut, "fp32_samples_per_s": fp32,
              "bf16_samples_per_s": bf16, "fp32_ceiling": ceil32, "bf16_ceiling": ceil16,
              "fp32_of_ceiling": fp32 / ceil32, "bf16_of_ceiling": bf16 / ceil16,
              "fp32_vs_tutorial": fp32 / tut, "bf16_vs_tutorial": bf16 / tut,
              "peak_rss_mb": rss, "transfer_mb": size_mb,
              "targets_met": {"fp32": fp32 / ceil32 >= TARGET, "bf16": bf16 / ceil16 >= TARGET,
                              "rss": rss <= size_mb + 500}}
    report("train-student, 784-800-800-10, batch 256, 60,000 examples", [
        ("fp32 step ceiling (fixed batch)", f"{ceil32:,.0f} samples/s"),
        ("kdcli, fp32", f"{fp32:,.0f} samples/s  {fp32 / ceil32:.0%} of the ceiling "
                        f"(target >= {TARGET:.0%})"),
        ("bf16 step ceiling (fixed batch)", f"{ceil16:,.0f} samples/s"),
        ("kdcli, bf16 autocast", f"{bf16:,.0f} samples/s  {bf16 / ceil16:.0%} of the ceiling "
                                 f"(target >= {TARGET:.0%})"),
        ("tutorial loop (DataLoader), fp32", f"{tut:,.0f} samples/s; kdcli fp32 "
                                             f"{fp32 / tut:.2f}x, bf16 {bf16 / tut:.2f}x"),
        ("peak RSS of the CLI (VmHWM)", f"{rss:,.0f} MB  (transfer set {size_mb:,.0f} MB + "
                                        f"500 MB allowed)"),
    ], result)


if __name__ == "__main__":
    main()
