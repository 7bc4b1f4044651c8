"""Moving batches to the device the work runs on, and the GPU's fast-math settings.

On a CUDA GPU a batch is copied from pinned (page-locked) host memory with a non-blocking
copy, so the copy overlaps the GPU's work on the batch before; on the CPU nothing moves.
"""

from __future__ import annotations

import torch


def host_to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on ``device``: unchanged on the CPU; on a GPU, copied from pinned memory
    without waiting (``non_blocking``), so the host can prepare the next batch meanwhile."""
    dev = torch.device(device)
    if dev.type != "cuda" or x.device.type == "cuda":
        return x.to(dev)
    if x.device.type == "cpu" and not x.is_pinned():
        x = x.pin_memory()
    return x.to(dev, non_blocking=True)


def use_tf32() -> None:
    """Let fp32 matrix multiplies and convolutions on a CUDA GPU use TF32 tensor cores
    (10-bit mantissa products, fp32 accumulation): several times faster on Ampere and later
    GPUs, and well within the noise of training. bf16 autocast is unaffected."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

