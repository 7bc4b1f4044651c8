"""soft_targets() with a Hugging Face teacher against a bare transformers inference loop.

A small ViT (built from a config, no download) is saved with ``save_pretrained``. Both sides
run it on the same float ``pixel_values`` (no processor config, so kdcli's preprocessing is
the identity), in batches of the same size, fp32 and bf16 autocast, in the same run.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import best_of, report

from kdcli.soft_targets import soft_targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--examples", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=96,
                    num_hidden_layers=3, num_attention_heads=4, intermediate_size=192,
                    num_labels=10)
    tmp = Path(tempfile.mkdtemp())
    ViTForImageClassification(cfg).save_pretrained(tmp / "vit")
    model = ViTForImageClassification.from_pretrained(tmp / "vit", local_files_only=True).eval()
    n, b = args.examples, args.batch
    x = torch.randn(n, 3, 32, 32)
    np.save(tmp / "pixels.npy", x.numpy())
    params = sum(p.numel() for p in model.parameters())
    result, rows = {}, []
    for precision in ("fp32", "bf16"):
        def bare(precision=precision):
            with torch.inference_mode(), torch.autocast(
                    "cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                for i in range(0, n, b):
                    model(pixel_values=x[i:i + b]).logits.float()

        loop_times = []

        def kd(precision=precision, loop_times=loop_times):
            s = soft_targets([tmp / "vit"], T=4, data=str(tmp / "pixels.npy"),
                             out=tmp / "t.safetensors", batch_size=b, precision=precision,
                             force=True, device="cpu")
            loop_times.append(s["seconds"])

        t_bare, t_kd = best_of(bare, args.repeats), best_of(kd, args.repeats)
        t_loop = min(loop_times)
        ratio, whole = t_bare / t_loop, t_bare / t_kd
        result[precision] = {"bare_samples_per_s": n / t_bare,
                             "kdcli_loop_samples_per_s": n / t_loop,
                             "kdcli_call_samples_per_s": n / t_kd,
                             "ratio": ratio, "ratio_whole_call": whole}
        rows.append((f"{precision} bare transformers loop", f"{n / t_bare:,.0f} samples/s"))
        rows.append((f"{precision} kdcli teacher pass + file write",
                     f"{n / t_loop:,.0f} samples/s  ratio {ratio:.3f}"))
        rows.append((f"{precision} kdcli whole call", f"{n / t_kd:,.0f} samples/s  ratio "
                     f"{whole:.3f} (adds loading the checkpoint, the probe batch, hashing)"))
    result["target_met"] = all(result[p]["ratio"] >= 0.95 for p in ("fp32", "bf16"))
    rows.append(("target: ratio >= 0.95 (fp32 and bf16)",
                 "met" if result["target_met"] else "NOT met"))
    report(f"soft-targets, ViT ({params:,} parameters, 3x32x32) on {n:,} inputs, batch {b}",
           rows, result)


if __name__ == "__main__":
    main()
