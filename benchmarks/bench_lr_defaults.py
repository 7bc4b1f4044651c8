"""Does train-student's default learning rate work on any transfer set?

For each case, a student is trained at kdcli's defaults (``kdcli.train.student_config``: lr
0.05 after a 1-epoch warmup, gradients clipped to norm 5, 20 epochs or enough for 2,000
steps, and the blow-up retry of ``kdcli.train.fit``) and at each lr of a small grid (the
other defaults unchanged). The table gives test errors; "retried" marks runs whose loss blew
up and were retried at a lower rate. Cases:

* the three scikit-learn tables of ``bench_tables.py`` (tree-ensemble teacher, 2x64, the
  default T);
* MNIST from a foreign teacher (a plain PyTorch MLP on raw 0-255 pixels, TorchScript),
  T=20, alpha 0.1, kd and mse, 2x300 student on 10,000 digits;
* 1,800 MNIST digits at T=20 (3% of the set, class-balanced), 2x800, alpha 0;
* a transfer set of only 7s and 8s, 2x800, alpha 0;
* the former quickstart's student: 2x300, alpha 0.1, 15 epochs, on the training set and two
  jittered copies (180,000 rows: one seed, and lr 0.02 and 0.1 only).

The MNIST cases need a kdcli teacher: ``--teacher``, such as the 2x1200 teacher of
examples/mnist-paper (the former quickstart's, 103 test errors). Run:
``python benchmarks/bench_lr_defaults.py --teacher teacher.safetensors``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench_tables import TABLES, prepare
from common import report

GRID = (0.01, 0.02, 0.05, 0.1)


def foreign_teacher(path: Path) -> None:
    """A teacher kdcli did not make: an MLP trained by plain PyTorch on raw pixels (0-255,
    unscaled), so its logits have their own scale. Saved with TorchScript."""
    import torch
    from torch import nn

    from kdcli.data.sources import load_data

    torch.manual_seed(0)
    d = load_data("mnist:train[:10000]")
    x, y = d.inputs.float().reshape(len(d), -1), d.labels
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    for _ in range(3):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.jit.script(net.eval()).save(str(path))


def cases(folder: Path, teacher: str | None) -> list[dict]:
    """(name, transfer-set arguments, student arguments) for every case."""
    out = []
    for name in TABLES:
        t = prepare(name, folder / name.replace(" ", "_"))
        out.append({"name": f"{name} (2x64)", "teachers": [t["teacher"]], "data": t["train"],
                    "T": None, "arch": "mlp:64,64", "alpha": 0.1, "loss": "kd",
                    "epochs": None, "eval": t["test"]})
    foreign = folder / "foreign.pt"
    foreign_teacher(foreign)
    for loss in ("kd", "mse"):
        out.append({"name": f"foreign raw-pixel teacher, {loss} (2x300)",
                    "teachers": [str(foreign)], "data": "mnist:train[:10000]", "T": 20.0,
                    "arch": "mlp:300,300", "alpha": 0.1, "loss": loss, "epochs": None,
                    "eval": "mnist:test"})
    if teacher:
        out.append({"name": "1,800 digits (2x800)", "teachers": [teacher],
                    "data": "mnist:train[balanced=1800,seed=0]", "T": 20.0,
                    "arch": "mlp:800,800", "alpha": 0.0, "loss": "kd", "epochs": None,
                    "eval": "mnist:test"})
        out.append({"name": "7s and 8s only (2x800)", "teachers": [teacher],
                    "data": "mnist:train", "classes": [7, 8], "T": 20.0,
                    "arch": "mlp:800,800", "alpha": 0.0, "loss": "kd", "epochs": None,
                    "eval": "mnist:test"})
        out.append({"name": "former quickstart (2x300, 15 epochs)", "teachers": [teacher],
                    "data": "mnist:train", "T": 20.0, "jitter": 2, "copies": 2,
                    "arch": "mlp:300,300", "alpha": 0.1, "loss": "kd", "epochs": 15,
                    "eval": "mnist:test", "seeds": 1, "grid": (0.02, 0.1)})  # 180,000 rows
    return out


def run_case(c: dict, folder: Path, seeds: list[int]) -> dict:
    from kdcli.output import Reporter
    from kdcli.soft_targets import soft_targets
    from kdcli.students.base import Architecture
    from kdcli.train import STUDENT_LR, student_config, train_student

    quiet = Reporter("quiet")
    transfer = folder / "transfer.safetensors"
    soft_targets(c["teachers"], T=c["T"], data=c["data"], out=transfer, force=True,
                 classes=c.get("classes"), jitter=c.get("jitter", 0),
                 copies=c.get("copies", 0), reporter=quiet)
    results: dict = {}
    seeds = seeds[:c.get("seeds", len(seeds))]
    for lr in (None, *c.get("grid", GRID)):
        if lr == STUDENT_LR:  # the defaults' first seed: the same run
            results[f"lr {lr:g}"] = results["default"][:1]
            continue
        for s in seeds if lr is None else seeds[:1]:
            cfg = student_config(epochs=c["epochs"], lr=lr or STUDENT_LR, seed=s)
            try:
                r = train_student(transfer, arch=Architecture.parse(c["arch"]),
                                  alpha=c["alpha"], loss=c["loss"],
                                  out=folder / "student.safetensors", config=cfg,
                                  eval_data=c["eval"], force=True, reporter=quiet)
                cell = f"{r['test_errors']}" + (" (retried)" if r.get("lr_scale") else "")
            except Exception as e:  # noqa: BLE001 - a diverged run is a result here
                cell = f"failed: {str(e)[:40]}"
            results.setdefault("default" if lr is None else f"lr {lr:g}", []).append(cell)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", help="kdcli teacher for the MNIST cases")
    ap.add_argument("--seeds", type=int, default=2, help="seeds at the defaults")
    args = ap.parse_args()
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    rows, result = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for c in cases(Path(tmp), args.teacher):
            case_dir = Path(tmp) / "run"
            case_dir.mkdir(exist_ok=True)
            r = run_case(c, case_dir, seeds)
            result[c["name"]] = r
            rows.append((c["name"], " | ".join(f"{k}: {', '.join(v)}" for k, v in r.items())))
            print(rows[-1][0], rows[-1][1], flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    report("train-student: the defaults against an lr grid (test errors)", rows, result)


if __name__ == "__main__":
    main()
