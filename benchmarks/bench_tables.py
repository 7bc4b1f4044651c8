"""Distilling tree ensembles on scikit-learn's bundled tables, against scikit-learn itself.

For wine, breast cancer and digits (stratified splits, ``random_state=0``):

* the teacher: a scikit-learn tree ensemble, converted to ONNX by skl2onnx at its defaults
  (ZipMap probabilities), as a user would save it;
* the baseline: ``StandardScaler`` + ``MLPClassifier(64, 64)``, several seeds;
* kdcli: a 2x64 MLP on hard labels (``kdcli train``) and a 2x64 student distilled from the
  teacher (``kdcli soft-targets`` + ``kdcli train-student``), at kdcli's defaults, from CSV
  files, several seeds.

Every number is a count of test errors. Run: ``python benchmarks/bench_tables.py [--seeds 3]``
(needs scikit-learn and skl2onnx).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import report

# name: (loader, test fraction, teacher)
TABLES = {
    "wine": ("load_wine", 0.4, "gradient boosting"),
    "breast cancer": ("load_breast_cancer", 0.3, "random forest"),
    "digits": ("load_digits", 0.3, "random forest"),
}


def write_csv(path: Path, x: np.ndarray, y: np.ndarray, names: list[str]) -> None:
    """A CSV with a header and a ``label`` column, as a user would export a table."""
    header = ",".join([*names, "label"])
    np.savetxt(path, np.column_stack([x, y]), delimiter=",", header=header, comments="",
               fmt=["%.10g"] * x.shape[1] + ["%d"])


def prepare(name: str, folder: Path) -> dict:
    """Split a table, write it as CSV, fit and convert its teacher, and its sklearn baseline."""
    import sklearn.datasets
    from skl2onnx import to_onnx
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.model_selection import train_test_split

    loader, frac, kind = TABLES[name]
    folder.mkdir(parents=True, exist_ok=True)
    bunch = getattr(sklearn.datasets, loader)()
    x, y = bunch.data.astype(np.float64), bunch.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=frac, random_state=0, stratify=y)
    names = [f"f{i}" for i in range(x.shape[1])]
    stem = name.replace(" ", "_")
    train_csv, test_csv = folder / f"{stem}_train.csv", folder / f"{stem}_test.csv"
    write_csv(train_csv, xtr, ytr, names)
    write_csv(test_csv, xte, yte, names)
    teacher = (GradientBoostingClassifier(random_state=0) if kind == "gradient boosting"
               else RandomForestClassifier(n_estimators=300, random_state=0)).fit(xtr, ytr)
    onnx_path = folder / f"{stem}_teacher.onnx"
    onnx_path.write_bytes(to_onnx(teacher, xtr[:1].astype(np.float32)).SerializeToString())
    return {"train": str(train_csv), "test": str(test_csv), "teacher": str(onnx_path),
            "teacher_kind": kind, "test_rows": len(yte),
            "teacher_errors": int((teacher.predict(xte) != yte).sum()),
            "xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte}


def sklearn_baseline(t: dict, seeds: list[int]) -> list[int]:
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    errors = []
    for s in seeds:
        m = make_pipeline(StandardScaler(), MLPClassifier((64, 64), max_iter=2000,
                                                          random_state=s))
        m.fit(t["xtr"], t["ytr"])
        errors.append(int((m.predict(t["xte"]) != t["yte"]).sum()))
    return errors


def kdcli_runs(t: dict, seeds: list[int], folder: Path) -> tuple[list[int], list[int]]:
    from kdcli.output import Reporter
    from kdcli.soft_targets import soft_targets
    from kdcli.students.base import Architecture
    from kdcli.train import STUDENT_LR, STUDENT_WARMUP, TrainConfig, train, train_student

    quiet = Reporter("quiet")
    arch = Architecture.parse("mlp:64,64")
    transfer = folder / "transfer.safetensors"
    soft_targets([t["teacher"]], data=t["train"], out=transfer, force=True, reporter=quiet)
    hard, distilled = [], []
    for s in seeds:
        r = train(t["train"], arch=arch, out=folder / "hard.safetensors", force=True,
                  config=TrainConfig(seed=s), eval_data=t["test"], reporter=quiet)
        hard.append(r["test_errors"])
        r = train_student(transfer, arch=arch, out=folder / "student.safetensors", force=True,
                          config=TrainConfig(lr=STUDENT_LR, warmup=STUDENT_WARMUP, seed=s),
                          eval_data=t["test"], reporter=quiet)
        distilled.append(r["test_errors"])
    return hard, distilled


def fmt(errors: list[int]) -> str:
    mean = statistics.mean(errors)
    sd = statistics.stdev(errors) if len(errors) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f} ({', '.join(map(str, errors))})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    seeds = list(range(args.seeds))
    rows, result = [], {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in TABLES:
            folder = Path(tmp) / name.replace(" ", "_")
            t = prepare(name, folder)
            base = sklearn_baseline(t, seeds)
            hard, distilled = kdcli_runs(t, seeds, folder)
            gap = statistics.mean(distilled) - statistics.mean(base)
            rows.append((f"{name} ({t['test_rows']} test rows)",
                         f"teacher ({t['teacher_kind']}) {t['teacher_errors']} | sklearn MLP "
                         f"{fmt(base)} | kdcli hard {fmt(hard)} | kdcli distilled "
                         f"{fmt(distilled)} | distilled - sklearn {gap:+.1f}"))
            result[name] = {"test_rows": t["test_rows"], "teacher": t["teacher_errors"],
                            "sklearn_mlp": base, "kdcli_hard": hard,
                            "kdcli_distilled": distilled, "gap": round(gap, 2)}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    report("tables: tree-ensemble teacher -> 2x64 MLP student (test errors)", rows, result)


if __name__ == "__main__":
    main()
