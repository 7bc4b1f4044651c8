"""Text students on Rotten Tomatoes: hard-label twins against distilled students, without
and with Tang et al.'s (2019) augmentation, next to their teachers and a scikit-learn
TF-IDF + logistic regression (issue: text part 2).

Needs the split and the teachers that ``bench_text_teachers.py`` writes to ``--teachers``
(``train.jsonl``, ``test.jsonl``, ``tfidf-lr.onnx``, ``bert-small/``); run that first. All
runs go through the ``kdcli`` command line, as a user would run them:

* the teacher: the ensemble of the two (``mean-probs``), labelling ``train.jsonl`` at
  ``--T`` (one transfer set), and ``train.jsonl`` with ``--copies`` augmented copies of
  each text (``--word-mask 0.1 --word-replace 0.1 --ngram-sample 0.25``, the paper's rates);
  with ``--ablation``, also one set per rule alone;
* per family (``bow:64``, ``bilstm:150``) and seed: ``kdcli train`` on the hard labels (the
  twin), ``kdcli train-student`` on each transfer set (alpha 0.1, kd at T). Every run takes
  about the same number of optimizer steps (``--steps``, at batch 256): a set ten times
  larger gets a tenth of the epochs;
* each student's test accuracy (``train-student --eval-data test.jsonl``), its parameters,
  and the latency of its ONNX export (``kdcli export``; onnxruntime, 2 threads) per text:
  the median of single texts and of batches of 64 over the test texts.

A table goes to stdout and ``students.json`` to ``--out``; say which CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

KDCLI = [sys.executable, "-m", "kdcli"]
AUG = ["--word-mask", "0.1", "--word-replace", "0.1", "--ngram-sample", "0.25"]
RULES = {"mask only": ["--word-mask", "0.1"], "replace only": ["--word-replace", "0.1"],
         "n-gram only": ["--ngram-sample", "0.25"]}


def kdcli(*args: str) -> dict:
    """Run a kdcli command with --json; return its result."""
    r = subprocess.run([*KDCLI, *args, "--json"], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"kdcli {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout)


def rows_of(path: Path) -> int:
    return sum(1 for line in path.open(encoding="utf-8") if line.strip())


def latency(onnx_path: Path, texts: list[str]) -> tuple[float, float]:
    """Median seconds per text of single texts and of batches of 64 (onnxruntime)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    s = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    one, batch = [], []
    for t in texts[:500]:
        a = time.perf_counter()
        s.run(None, {"text": np.array([t], dtype=object)})
        one.append(time.perf_counter() - a)
    for i in range(0, len(texts) - 63, 64):
        a = time.perf_counter()
        s.run(None, {"text": np.array(texts[i:i + 64], dtype=object)})
        batch.append((time.perf_counter() - a) / 64)
    return statistics.median(one), statistics.median(batch)


def cpu() -> str:
    info = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), "unknown")
    return f"{name} ({'with' if 'avx512_bf16' in info else 'without'} AVX-512 BF16)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teachers", type=Path, default=Path("/tmp/kdcli-rt"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/kdcli-rt/students"))
    ap.add_argument("--families", nargs="+", default=["bow:64", "bilstm:150"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--T", default="2")
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps of each run")
    ap.add_argument("--ablation", action="store_true", help="one set per augmentation rule")
    args = ap.parse_args()
    src, out = args.teachers, args.out
    out.mkdir(parents=True, exist_ok=True)
    train, test = src / "train.jsonl", src / "test.jsonl"
    teachers = [str(src / "bert-small"), str(src / "tfidf-lr.onnx")]
    text = ["--text-column", "text"]
    sets = {"kd": ([], 0), "kd + augmentation": (AUG, args.copies)}
    if args.ablation:
        sets.update({f"kd + {k}": (v, args.copies) for k, v in RULES.items()})
    made = {}
    for name, (aug, copies) in sets.items():
        path = out / f"{name.replace(' ', '').replace('+', '-')}.safetensors"
        t0 = time.perf_counter()
        r = kdcli("soft-targets", *teachers, "--data", str(train), *text, "--T", args.T,
                  "--copies", str(copies), *aug, "--seed", "0", "--out", str(path), "--force")
        made[name] = (path, r["examples"])
        print(f"{name}: {r['examples']:,} rows labelled in {time.perf_counter() - t0:.0f} s "
              f"(ensemble train accuracy {r.get('ensemble_accuracy')})", flush=True)
    n = rows_of(train)
    results = []
    for family in args.families:
        for seed in args.seeds:
            runs = {"hard labels (twin)": ("train", n)} | {k: ("student", v[1])
                                                             for k, v in made.items()}
            for variant, (kind, rows) in runs.items():
                epochs = max(1, math.ceil(args.steps / math.ceil(rows / 256)))
                tag = "".join(c for c in variant if c.isalnum())
                model = out / f"{family.replace(':', '-')}-{tag}-{seed}.safetensors"
                common = ["--arch", family, "--epochs", str(epochs), "--seed", str(seed),
                          "--eval-data", str(test), *text, "--out", str(model), "--force", "-q"]
                t0 = time.perf_counter()
                if kind == "train":
                    r = kdcli("train", "--data", str(train), *common)
                else:
                    r = kdcli("train-student", "--transfer", str(made[variant][0]), *common)
                results.append({"family": family, "variant": variant, "seed": seed,
                                "accuracy": r["test_accuracy"], "errors": r["test_errors"],
                                "params": r["params"], "epochs": epochs,
                                "seconds": round(time.perf_counter() - t0, 1),
                                "model": str(model)})
                print(json.dumps(results[-1]), flush=True)
    texts = [json.loads(line)["text"] for line in test.open(encoding="utf-8")]
    for family in args.families:  # the latency of one export per family
        first = next(r for r in results if r["family"] == family)
        onnx_path = Path(first["model"]).with_suffix(".onnx")
        kdcli("export", str(onnx_path), "--model", first["model"], "--data", str(test), *text,
              "--force", "-q")
        both = kdcli("eval", first["model"], str(onnx_path), "--data", str(test), *text, "-q")
        print(f"{family}: the ONNX export agrees with torch on "
              f"{100 * both['agreement'][0][1]:.2f}% of the {len(texts):,} test texts "
              f"({both['models'][0]['errors']} and {both['models'][1]['errors']} errors)")
        one, batch = latency(onnx_path, texts)
        for r in results:
            if r["family"] == family:
                r["latency_ms_1"], r["latency_ms_64"] = one * 1e3, batch * 1e3
    (out / "students.json").write_text(json.dumps({"cpu": cpu(), "results": results},
                                                  indent=1))
    show(results, args.families, len(texts))


def show(results: list[dict], families: list[str], n: int) -> None:
    """The table: per family and variant, accuracy over the seeds, params, latency."""
    print(f"\n{cpu()}; test set {n:,} texts")
    print(f"{'student':12} {'variant':24} {'accuracy (mean ± sd)':>22} {'params':>10} "
          f"{'ms/text (1)':>11} {'ms/text (64)':>12}")
    for family in families:
        for variant in dict.fromkeys(r["variant"] for r in results):
            accs = [r["accuracy"] for r in results
                    if r["family"] == family and r["variant"] == variant]
            if not accs:
                continue
            r = next(r for r in results if r["family"] == family and r["variant"] == variant)
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            print(f"{family:12} {variant:24} {100 * statistics.mean(accs):>15.2f} ± "
                  f"{100 * sd:.2f} {r['params']:>10,} {r['latency_ms_1']:>11.3f} "
                  f"{r['latency_ms_64']:>12.4f}")


if __name__ == "__main__":
    main()
