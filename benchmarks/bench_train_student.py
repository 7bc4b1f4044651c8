"""kdcli's training loop against the PyTorch KD tutorial's loop, same model, batch and loss.

The tutorial loop: a DataLoader over a TensorDataset of preprocessed float inputs, soft
targets and labels; a 784-800-800-10 MLP; batch 256; the tutorial's loss
(0.9 * T^2 * KL + 0.1 * CE) and SGD with Nesterov momentum (kdcli's default optimizer).
kdcli: ``train_student`` on a transfer-set file (index batching over memory-mapped tensors).
Both are timed on their second epoch. Peak RSS of the CLI is measured in a subprocess.
"""

import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import kdcli_peak_rss, report
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdcli.models import Architecture
from kdcli.soft_targets import soft_targets
from kdcli.train import TrainConfig, train, train_student
from kdcli.transfer import load_transfer_set

T, ALPHA, BATCH, LR = 20.0, 0.1, 256, 0.02


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


def kdcli_epoch_seconds(transfer: Path, out: Path, precision: str) -> float:
    s = train_student(transfer, arch=Architecture.parse("mlp:800,800"), alpha=ALPHA, T=T,
                      out=out, eval_data="none", force=True,
                      config=TrainConfig(epochs=2, batch_size=BATCH, lr=LR, precision=precision))
    return s["history"][-1]["seconds"]


def peak_rss_mb(transfer: Path, out: Path) -> float:
    return kdcli_peak_rss(["train-student", "--transfer", str(transfer), "--hidden", "800",
                           "--epochs", "1", "--eval-data", "none", "--out", str(out),
                           "--force", "-q"])[0]


def gemm_ceiling(precision: str) -> float:
    """Samples/s of the bare model on one fixed batch: no data handling at all."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 800), nn.ReLU(), nn.Linear(800, 800), nn.ReLU(),
                          nn.Linear(800, 10))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True)
    x, y = torch.randn(BATCH, 784), torch.randint(0, 10, (BATCH,))
    best = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        for _ in range(150):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                z = model(x)
            loss = F.cross_entropy(z.float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        best = max(best, 150 * BATCH / (time.perf_counter() - t0))
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
    fp32 = n / kdcli_epoch_seconds(transfer, tmp / "s.safetensors", "fp32")
    bf16 = n / kdcli_epoch_seconds(transfer, tmp / "s.safetensors", "bf16")
    rss = peak_rss_mb(transfer, tmp / "s2.safetensors")
    ceil32, ceil16 = gemm_ceiling("fp32"), gemm_ceiling("bf16")
    size_mb = transfer.stat().st_size / 2**20
    result = {"tutorial_samples_per_s": tut, "fp32_samples_per_s": fp32,
              "bf16_samples_per_s": bf16, "fp32_ratio": fp32 / tut, "bf16_ratio": bf16 / tut,
              "fp32_gemm_ceiling": ceil32, "bf16_gemm_ceiling": ceil16,
              "peak_rss_mb": rss, "transfer_mb": size_mb,
              "targets_met": {"fp32": fp32 / tut >= 1.25, "bf16": bf16 / tut >= 2.5,
                              "rss": rss <= size_mb + 500}}
    report("train-student, 784-800-800-10, batch 256, 60,000 examples", [
        ("tutorial loop (DataLoader), fp32", f"{tut:,.0f} samples/s  1.00x"),
        ("kdcli, fp32", f"{fp32:,.0f} samples/s  {fp32 / tut:.2f}x  (target >= 1.25x)"),
        ("kdcli, bf16 autocast", f"{bf16:,.0f} samples/s  {bf16 / tut:.2f}x  (target >= 2.5x)"),
        ("fp32 GEMM ceiling (fixed batch)", f"{ceil32:,.0f} samples/s  {ceil32 / tut:.2f}x;"
                                            f" kdcli fp32 at {fp32 / ceil32:.0%} of it"),
        ("bf16 GEMM ceiling (fixed batch)", f"{ceil16:,.0f} samples/s  {ceil16 / tut:.2f}x;"
                                            f" kdcli bf16 at {bf16 / ceil16:.0%} of it"),
        ("peak RSS of the CLI (VmHWM)", f"{rss:,.0f} MB  (transfer set {size_mb:,.0f} MB + "
                                        f"500 MB allowed)"),
    ], result)


if __name__ == "__main__":
    main()
