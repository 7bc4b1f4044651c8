"""``kdcli sweep``: train-student over a grid of temperatures and widths against one teacher.

The transfer set is derived once; each temperature re-derives its soft targets exactly from
the stored logits. Finished grid points are kept, so an interrupted sweep resumes where it
stopped. Results go to ``OUT_DIR/results.json`` and, with matplotlib installed
(``pip install kdcli[plot]``), a plot of test errors against T, one line per width.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdcli.errors import UsageError
from kdcli.output import Reporter


def sweep(teacher: str | Path, *, temperatures: list[float], hidden: list[int],
          layers: int = 2, data: str = "mnist:train", alpha: float = 0.0,
          epochs: int = 20, lr: float = 0.02, batch_size: int = 256, precision: str = "fp32",
          seed: int = 0, eval_data: str | None = "auto", out_dir: str | Path = "sweep",
          force: bool = False, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run the grid and return ``{"points": [...], "plot": path or None}``.

    Args:
        teacher: The teacher model file (any format kdcli loads).
        temperatures: The T values.
        hidden: The student widths (MLPs of ``layers`` hidden layers).
        layers: Hidden layers of each student.
        data: Transfer data.
        alpha: Weight on the hard labels.
        epochs: Epochs per student.
        lr: Learning rate per student.
        batch_size: Batch size per student.
        precision: ``fp32`` or ``bf16``.
        seed: Seed per student.
        eval_data: Data for test errors (``auto``: mnist:test for MNIST).
        out_dir: Folder for the transfer set, students, results and plot.
        force: Start afresh: delete what an earlier sweep left in ``out_dir``.
        reporter: Output sink.
    """
    from kdcli.files import sha256_file
    from kdcli.models import Architecture, load_model
    from kdcli.soft_targets import check_temperature, soft_targets
    from kdcli.train import TrainConfig, train_student
    from kdcli.transfer import load_transfer_set

    rep = reporter or Reporter()
    if not temperatures or not hidden:
        raise UsageError("the grid is empty", "Pass --T 2,4,8 and --hidden 30,300")
    for t in temperatures:
        check_temperature(t)
    if any(h <= 0 for h in hidden):
        raise UsageError(f"--hidden widths must be positive, got {hidden}", "e.g. 30,300")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    transfer = folder / "transfer.safetensors"
    if force:
        for old in [transfer, *folder.glob("student-h*-T*.safetensors*"),
                    folder / "results.json", folder / "sweep.png"]:
            old.unlink(missing_ok=True)
    teacher_sha = sha256_file(teacher)
    if transfer.exists():
        recorded = [t["sha256"] for t in load_transfer_set(transfer).meta["teachers"]]
        if recorded != [teacher_sha]:
            raise UsageError(f"{transfer} was made from another teacher",
                             "Use a new --out-dir, or pass --force to start afresh")
        rep.info(f"reusing {transfer}")
    else:
        soft_targets([teacher], T=temperatures[0], data=data, out=transfer,
                     reporter=Reporter("quiet"))
    points = []
    grid = [(h, t) for h in hidden for t in temperatures]
    with rep.progress("sweep (grid points)", len(grid)) as advance:
        for h, t in grid:
            out = folder / f"student-h{h}-T{t:g}.safetensors"
            if out.exists():
                training = load_model(out).training
                status = "kept"
            else:
                training = train_student(
                    transfer, arch=Architecture("mlp", hidden=[h] * layers), alpha=alpha, T=t,
                    out=out, eval_data=eval_data, reporter=Reporter("quiet"),
                    config=TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size,
                                       precision=precision, seed=seed))
                status = "trained"
            point = {"hidden": h, "T": t, "test_errors": training.get("test_errors"),
                     "file": str(out), "status": status}
            points.append(point)
            rep.info(f"hidden {h:>5}  T {t:>5g}  test errors {point['test_errors']}  ({status})")
            advance(1)
    (folder / "results.json").write_text(json.dumps({"teacher": str(teacher), "alpha": alpha,
                                                      "epochs": epochs, "points": points},
                                                     indent=2))
    plot = _plot(points, folder / "sweep.png", rep)
    cols = ["hidden", *(f"T={t:g}" for t in temperatures)]
    rows = [[h, *(next(p["test_errors"] for p in points if p["hidden"] == h and p["T"] == t)
                  for t in temperatures)] for h in hidden]
    rep.table(f"Test errors of distilled students ({folder})", cols, rows)
    return {"points": points, "plot": str(plot) if plot else None,
            "results": str(folder / "results.json")}


def _plot(points: list[dict], path: Path, rep: Reporter) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        rep.warn("matplotlib is not installed, so no plot: pip install 'kdcli[plot]'")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for h in sorted({p["hidden"] for p in points}):
        pts = sorted((p["T"], p["test_errors"]) for p in points if p["hidden"] == h)
        ax.plot([t for t, _ in pts], [e for _, e in pts], marker="o", label=f"{h} units")
    ax.set_xscale("log")
    ax.set_xlabel("temperature T")
    ax.set_ylabel("test errors")
    ax.set_title("Distilled students: test errors against T")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
