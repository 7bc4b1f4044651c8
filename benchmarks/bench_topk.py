"""Top-k soft targets: file size and student quality against dense targets.

Part 1, many classes: a synthetic teacher (a linear map from 64 features to C = 32,000
logits, random weights scaled so that its distributions have a long tail, as a language
model's do) labels 10,000 random inputs. Students of the teacher's own form (linear, so that
they can represent it) are trained on dense targets and on top-K targets for K = 8, 32 and
128 with each tail rule;
reported: the file size, and each student's top-1 agreement with the dense-target student and
with the teacher on held-out inputs.

Part 2, MNIST: a 2x300 student distilled from a real teacher with dense targets and with
K = 3, at T = 20 and T = 4, over several seeds: are the test errors within the seed noise?

Usage: python benchmarks/bench_topk.py [--teacher runs/mnist-paper/teacher.safetensors]
       [--skip-synthetic] [--skip-mnist] [--seeds 3]
"""

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import report

from kdcli.data.augment import AugmentConfig
from kdcli.evaluate import predict
from kdcli.preprocessing import Preprocessing
from kdcli.soft_targets import soft_targets
from kdcli.students.base import Architecture, build_model
from kdcli.students.model_file import load_model, save_model
from kdcli.train import TrainConfig, train, train_student
from kdcli.transfer.reader import load_transfer_set

C, FEATURES, N_TRAIN, N_TEST, T_SYN = 32_000, 64, 10_000, 2_000, 2.0


def synthetic(d: Path, epochs: int) -> tuple[list[tuple[str, str]], dict]:
    torch.manual_seed(0)
    arch = Architecture("mlp", hidden=[])
    pre = Preprocessing(1.0, 0.0, 1.0, [FEATURES], "float32")
    teacher_model = build_model(arch, pre, C)
    with torch.no_grad():
        teacher_model[1][-1].weight.mul_(12.0)  # top-1 holds ~18% of the mass at T=2
    teacher = d / "teacher.safetensors"
    save_model(teacher, teacher_model, arch, pre, C, {"command": "synthetic"})
    rng = np.random.default_rng(0)
    np.save(d / "train.npy", rng.standard_normal((N_TRAIN, FEATURES), np.float32))
    x_test = torch.from_numpy(rng.standard_normal((N_TEST, FEATURES), np.float32))
    with torch.inference_mode():
        p = torch.softmax(predict(teacher_model, x_test) / T_SYN, -1)
    mass = {k: float(p.topk(k, -1).values.sum(-1).mean()) for k in (1, 8, 32, 128)}
    teacher_pred = p.argmax(-1)

    rows = [("teacher top-k mass at T=2", ", ".join(f"K={k}: {v:.3f}" for k, v in mass.items()))]
    result: dict = {"classes": C, "train": N_TRAIN, "test": N_TEST, "T": T_SYN,
                    "teacher_topk_mass": mass, "epochs": epochs}
    preds = {}
    cfg = TrainConfig(epochs=epochs, lr=3e-2, optimizer="adam", batch_size=256,
                      precision="bf16")
    runs = [(None, "student")] + [(k, tail) for k in (8, 32, 128)
                                  for tail in ("student", "uniform", "renormalize")]
    sizes = {}
    for k, tail in runs:
        name = "dense" if k is None else f"top-{k} {tail}"
        out = d / ("dense.safetensors" if k is None else f"top{k}.safetensors")
        if not out.exists():
            soft_targets([teacher], T=T_SYN, data=str(d / "train.npy"), out=out, top_k=k,
                         targets_dtype="float16" if k else "float32")
            sizes[k] = out.stat().st_size
        student = d / "student.safetensors"
        train_student(out, arch=Architecture("mlp", hidden=[]), alpha=0.0, tail=tail,
                      eval_data=None, out=student, config=cfg, force=True)
        with torch.inference_mode():
            preds[name] = predict(load_model(student).model, x_test).argmax(-1)
        if k is None:
            out.unlink()  # 2.6 GB
        agree_teacher = float((preds[name] == teacher_pred).float().mean())
        agree_dense = float((preds[name] == preds["dense"]).float().mean())
        rows.append((name, f"file {sizes[k] / 1e6:,.1f} MB ({sizes[k] / N_TRAIN:,.0f} B/example); "
                           f"agrees with the dense student {100 * agree_dense:.1f}%, the "
                           f"teacher {100 * agree_teacher:.1f}%"))
        result[name] = {"bytes": sizes[k], "agreement_with_dense_student": agree_dense,
                        "agreement_with_teacher": agree_teacher}
    return rows, result


def mnist(d: Path, teacher: Path | None, seeds: int) -> tuple[list[tuple[str, str]], dict]:
    if teacher is None or not teacher.exists():
        teacher = d / "teacher.safetensors"
        train("mnist", arch=Architecture("mlp", hidden=[1200, 1200], dropout=0.5,
                                         input_dropout=0.2, max_norm=3.5),
              out=teacher, config=TrainConfig(epochs=30, precision="bf16"),
              augment=AugmentConfig(jitter=2))
    rows: list[tuple[str, str]] = []
    result: dict = {"teacher": str(teacher), "errors": {}}
    for T in (20.0, 4.0):
        dense, topk = d / f"dense-T{T:g}.safetensors", d / f"top3-T{T:g}.safetensors"
        soft_targets([teacher], T=T, out=dense)
        soft_targets([teacher], T=T, out=topk, top_k=3)
        tail = float(load_transfer_set(topk).columns["tail_logmass"].whole().exp().mean())
        errors: dict[str, list[int]] = {"dense": [], "top-3": []}
        for seed in range(seeds):
            for name, path in (("dense", dense), ("top-3", topk)):
                s = train_student(path, arch=Architecture("mlp", hidden=[300, 300]), alpha=0.0,
                                  out=d / "s.safetensors", force=True,
                                  config=TrainConfig(epochs=30, lr=0.02, seed=seed,
                                                     precision="bf16"))
                errors[name].append(s["test_errors"])
        for name, v in errors.items():
            size = (dense if name == "dense" else topk).stat().st_size
            rows.append((f"MNIST 2x300, T={T:g}, {name}",
                         f"test errors {v} (mean {statistics.mean(v):.1f}, sd "
                         f"{statistics.stdev(v) if len(v) > 1 else 0:.1f}); file "
                         f"{size / 1e6:.1f} MB" + (f"; mean tail mass {tail:.3f}"
                                                   if name != "dense" else "")))
        result["errors"][f"T={T:g}"] = errors
        result[f"tail_mass_T={T:g}"] = tail
    return rows, result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", type=Path, default=Path("runs/mnist-paper/teacher.safetensors"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10, help="synthetic students' epochs")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--skip-mnist", action="store_true")
    ap.add_argument("--dir", default=None, help="scratch folder (needs ~3 GB free)")
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows, result = [], {}
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        if not a.skip_synthetic:
            r, res = synthetic(Path(d), a.epochs)
            rows += r
            result["synthetic"] = res
        if not a.skip_mnist:
            r, res = mnist(Path(d), a.teacher, a.seeds)
            rows += r
            result["mnist"] = res
    report("top-k soft targets vs dense", rows, result)


if __name__ == "__main__":
    main()
