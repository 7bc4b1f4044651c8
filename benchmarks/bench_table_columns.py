"""Tables as a data scientist has them (issue: tables): a scikit-learn pipeline exported by
skl2onnx with one input per column, distilled by kdcli straight from the raw CSV (strings,
gaps and all), next to a hard-label twin and scikit-learn's own MLP on the same pipeline.

Data: the Palmer penguins (``palmerpenguins`` package: 344 rows, 3 species, the category
columns ``island`` and ``sex``, 19 missing values), split 60/40 stratified by species with
seed 0. ``--hide F`` also removes a fraction F of the number cells at random (seed 0, the
same cells for every model) to make the gaps matter; the default 0.3 is stated in the table.

Per seed (0-2):

* the teacher: ``ColumnTransformer`` (``OneHotEncoder(handle_unknown="ignore")`` on the
  categories; ``SimpleImputer(median)`` + ``StandardScaler`` on the numbers) before a
  ``RandomForestClassifier(300)`` (``--teacher rf``) or a ``LogisticRegression`` (``--teacher
  lr``), exported with skl2onnx (one input per column);
* ``kdcli soft-targets`` on ``train.csv`` (T 4), ``kdcli train-student --arch mlp:32``,
  ``kdcli train --arch mlp:32`` (the twin), ``kdcli export`` of the student (checked against
  torch on the test rows), ``kdcli eval`` of the three;
* scikit-learn's ``MLPClassifier((32,))`` after the same ColumnTransformer, for reference.

Only the kdcli command line touches the CSV files. A table goes to stdout, ``results-TEACHER.json``
to ``--out``; say which CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

KDCLI = [sys.executable, "-m", "kdcli"]
CATS = ["island", "sex"]


def _frame(df):
    X = df.drop(columns="species").copy()
    for c in CATS:
        X[c] = X[c].fillna("").astype(str)
    for c in X.columns:
        if c not in CATS:
            X[c] = X[c].astype(np.float32)
    return X


def _pipeline(model):
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    nums = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g", "year"]
    return Pipeline([("cols", ColumnTransformer([
        ("cat", OneHotEncoder(handle_unknown="ignore"), CATS),
        ("num", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), nums)])),
        ("model", model)])


def _kdcli(*args: str, cwd: Path) -> dict:
    r = subprocess.run([*KDCLI, *args, "--json"], cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"kdcli {' '.join(args)} failed:\n{r.stderr}")
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/kdcli-tables"))
    ap.add_argument("--hide", type=float, default=0.3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--teacher", choices=("rf", "lr"), default="rf")
    args = ap.parse_args()
    from palmerpenguins import load_penguins
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    args.out.mkdir(parents=True, exist_ok=True)
    df = load_penguins()
    rng = np.random.default_rng(0)
    nums = [c for c in df.columns if c not in CATS + ["species"]]
    hide = rng.random((len(df), len(nums))) < args.hide
    df[nums] = df[nums].mask(hide)
    tr, te = train_test_split(df, test_size=0.4, random_state=0, stratify=df.species)
    tr.to_csv(args.out / "train.csv", index=False)
    te.to_csv(args.out / "test.csv", index=False)
    gaps = int(tr[nums].isna().sum().sum() + te[nums].isna().sum().sum())
    rows = []
    for seed in range(args.seeds):
        d = args.out / f"seed{seed}"
        d.mkdir(exist_ok=True)
        for f in ("train.csv", "test.csv"):
            (d / f).write_bytes((args.out / f).read_bytes())
        teacher = _pipeline(RandomForestClassifier(300, random_state=seed)
                            if args.teacher == "rf" else LogisticRegression(max_iter=2000))
        teacher.fit(_frame(tr), tr.species)
        types = [(c, StringTensorType([None, 1]) if c in CATS else FloatTensorType([None, 1]))
                 for c in _frame(tr).columns]
        onx = convert_sklearn(teacher, initial_types=types, target_opset=17,
                              options={id(teacher.steps[-1][1]): {"zipmap": False}})
        (d / "teacher.onnx").write_bytes(onx.SerializeToString())
        mlp = _pipeline(MLPClassifier((32,), max_iter=2000, random_state=seed))
        mlp.fit(_frame(tr), tr.species)
        sk_errors = int((mlp.predict(_frame(te)) != te.species).sum())
        common = ["--label-column", "species", "--seed", str(seed), "--force", "--quiet"]
        _kdcli("soft-targets", "teacher.onnx", "--data", "train.csv", "--T", "4",
               "--out", "ts.safetensors", *common[:2], "--force", "--quiet", cwd=d)
        _kdcli("train-student", "--transfer", "ts.safetensors", "--arch", "mlp:32",
               "--out", "student.kdcli", "--eval-data", "test.csv", *common, cwd=d)
        _kdcli("train", "--data", "train.csv", "--arch", "mlp:32", "--out", "twin.kdcli",
               "--eval-data", "test.csv", *common, cwd=d)
        exp = _kdcli("export", "student.onnx", "--model", "student.kdcli", "--data",
                     "test.csv", "--label-column", "species", "--force", "--quiet", cwd=d)
        ev = _kdcli("eval", "teacher.onnx", "student.kdcli", "student.onnx", "twin.kdcli",
                    "--data", "test.csv", "--label-column", "species", "--quiet", cwd=d)
        errs = {Path(m["model"]).name: m["errors"] for m in ev["models"]}
        rows.append({"seed": seed, "teacher": errs["teacher.onnx"],
                     "student": errs["student.kdcli"], "student_onnx": errs["student.onnx"],
                     "twin": errs["twin.kdcli"], "sklearn_mlp": sk_errors,
                     "export_max_diff": exp["max_abs_diff"], "test_rows": len(te)})
        print(rows[-1], flush=True)
    summary = {"rows": rows, "hidden_fraction": args.hide, "missing_cells": gaps,
               "test_rows": len(te), "teacher": args.teacher}
    (args.out / f"results-{args.teacher}.json").write_text(json.dumps(summary, indent=2))
    print(f"\npenguins, {len(tr)} train / {len(te)} test rows, {args.hide:.0%} of number "
          f"cells hidden ({gaps} missing in all); test errors, seeds 0-{args.seeds - 1}")
    print(f"{'model':32} {'errors':>16} {'mean':>6}")
    for key, name in (("teacher", f"teacher (skl2onnx {args.teacher} pipeline)"),
                      ("student", "distilled mlp:32 (kdcli)"),
                      ("student_onnx", "its ONNX export, raw columns"),
                      ("twin", "hard-label mlp:32 (kdcli train)"),
                      ("sklearn_mlp", "scikit-learn MLP(32) pipeline")):
        v = [r[key] for r in rows]
        print(f"{name:32} {'/'.join(map(str, v)):>16} {statistics.mean(v):6.1f}")


if __name__ == "__main__":
    main()
