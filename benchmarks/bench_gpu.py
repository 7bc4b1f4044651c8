"""On one CUDA GPU: train-student against a bare CUDA loop and the eager fixed-batch step
ceiling, and soft-targets against a bare teacher loop, fp32 (TF32 matmuls) and bf16.

The bare CUDA loop trains the same 784-800-800-10 MLP with the same loss, clipping and
batches drawn from the same transfer set, held on the GPU: no file, no checks, no records.
Run by benchmarks/gpu_check.sh.
"""

import tempfile
import time
from pathlib import Path

import torch
from bench_train_student import ALPHA, BATCH, CLIP, LR, T, kdcli_epoch_seconds, step_ceiling
from common import report
from torch import nn

from kdcli.config import DistillConfig
from kdcli.data.sources import load_data
from kdcli.modalities import fit_preprocessing
from kdcli.soft_targets import soft_targets
from kdcli.students.base import Architecture, build_model
from kdcli.students.model_file import save_model
from kdcli.train import TrainConfig, train
from kdcli.training.losses import criterion
from kdcli.transfer.reader import load_transfer_set


def bare_cuda_epoch(ts, precision: str) -> float:
    """Samples/s of one epoch of a bare loop over the transfer set, held on the GPU."""
    dev = torch.device("cuda")
    x = ((ts.inputs.float() / 255 - 0.1307) / 0.3081).reshape(len(ts), -1).to(dev)
    p, y = ts.soft_targets.to(dev), ts.labels.to(dev)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 800), nn.ReLU(), nn.Linear(800, 800), nn.ReLU(),
                          nn.Linear(800, 10)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True)
    crit = criterion(DistillConfig(alpha=ALPHA, T=T))
    best = 0.0
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        perm = torch.randperm(len(ts), device=dev)
        for i in range(0, len(ts), BATCH):
            idx = perm[i:i + BATCH]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                z = model(x[idx])
            loss = crit(z.float(), p[idx], y[idx])[0]
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
        torch.cuda.synchronize()
        best = max(best, len(ts) / (time.perf_counter() - t0))
    return best


def bare_teacher(model, data, precision: str, batch: int) -> float:
    """Samples/s of a bare inference loop of ``model`` over ``data``'s inputs on the GPU."""
    dev = torch.device("cuda")
    n, best = len(data), 0.0
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast(
                "cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            outs = [model(data.inputs[i:i + batch].pin_memory().to(dev, non_blocking=True))
                    .float().cpu() for i in range(0, n, batch)]
        del outs
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark needs one")
    name = torch.cuda.get_device_name()
    tmp = Path(tempfile.mkdtemp())
    teacher = tmp / "teacher.safetensors"
    train("mnist[:2000]", arch=Architecture.parse("mlp:64"), out=teacher, eval_data="none",
          config=TrainConfig(epochs=1, device="cuda"))
    transfer = tmp / "transfer.safetensors"
    soft_targets([teacher], T=T, data="mnist:train", out=transfer, device="cuda")
    ts = load_transfer_set(transfer)
    n, rows, result = len(ts), [], {"gpu": name}
    for precision in ("fp32", "bf16"):
        ceiling = step_ceiling(precision, "cuda", steps=300)
        bare = bare_cuda_epoch(ts, precision)
        kd = n / kdcli_epoch_seconds(transfer, tmp / "s.safetensors", precision, "cuda")
        result[f"train_student_{precision}"] = {"kdcli": kd, "bare_cuda_loop": bare,
                                                "ceiling": ceiling}
        rows.append((f"train-student {precision}: kdcli", f"{kd:,.0f} samples/s"))
        rows.append(("  bare CUDA loop", f"{bare:,.0f} samples/s (kdcli {kd / bare:.2f}x)"))
        rows.append(("  eager fixed-batch ceiling", f"{ceiling:,.0f} samples/s "
                                                     f"(kdcli {kd / ceiling:.0%})"))
    data = load_data("mnist:train")
    arch = Architecture.parse("mlp:1200,1200")
    pre = fit_preprocessing(data.inputs)
    big = tmp / "big.safetensors"
    model = build_model(arch, pre, 10).eval()
    save_model(big, model, arch, pre, 10, {})
    model = model.cuda()
    for precision in ("fp32", "bf16"):
        bare = bare_teacher(model, data, precision, 4096)
        s = soft_targets([big], T=20, data="mnist:train", out=tmp / "t.safetensors",
                         batch_size=4096, precision=precision, force=True, device="cuda")
        kd = n / s["seconds"]
        result[f"soft_targets_{precision}"] = {"kdcli": kd, "bare": bare}
        rows.append((f"soft-targets {precision} (1200x1200 teacher): kdcli",
                     f"{kd:,.0f} samples/s, {kd / bare:.2f}x the bare loop ({bare:,.0f})"))
    report(f"GPU check on {name}", rows, result)


if __name__ == "__main__":
    main()
