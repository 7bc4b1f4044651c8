#!/usr/bin/env python3
"""Reproduce the MNIST results of Hinton, Vinyals & Dean (2015) with kdcli commands only.

Every step below is a ``kdcli`` command (run with ``--json``); this script only sequences them,
times them and writes the results table. Usage::

    python examples/mnist-paper/reproduce.py            # the full table (about 25 min, 2 CPU cores)
    python examples/mnist-paper/reproduce.py --quick    # a smoke run (about 2 min)

Outputs go to ``--out`` (default ``runs/mnist-paper``). The full run writes ``results.md``
there and, with ``--update-readme``, replaces the results block of the main README.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAPER_T = ["1", "2", "2.5", "4", "8", "20"]


class Runner:
    """Runs kdcli commands in one folder and keeps their JSON results and wall times."""

    def __init__(self, folder: Path, kdcli: list[str]) -> None:
        self.folder, self.kdcli, self.log = folder, kdcli, []

    def __call__(self, *args: str) -> dict:
        cmd = [*self.kdcli, *args, "--json"]
        shown = "kdcli " + " ".join(args)
        print(f"$ {shown}", flush=True)
        t = time.perf_counter()
        r = subprocess.run(cmd, cwd=self.folder, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if r.returncode != 0:
            sys.exit(f"failed: {shown}\n{r.stderr}")
        self.log.append((shown, seconds))
        print(f"  done in {seconds:.0f} s", flush=True)
        return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few epochs: a smoke run")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "mnist-paper")
    ap.add_argument("--update-readme", action="store_true", help="write the table into README.md")
    args = ap.parse_args()
    q = args.quick
    ep_teacher, ep, ep_sweep = ("4", "2", "1") if q else ("240", "60", "30")
    seeds = ["0"] if q else ["0", "1"]
    temps = ["2", "20"] if q else PAPER_T
    args.out.mkdir(parents=True, exist_ok=True)
    kdcli = [shutil.which("kdcli")] if shutil.which("kdcli") else [sys.executable, "-m", "kdcli"]
    run = Runner(args.out, kdcli)
    common = ["--precision", "bf16", "--force"]
    start = time.perf_counter()
    rows = []

    # 1. The teacher: 2x1200 ReLU, dropout 0.2 on inputs and 0.5 on hidden units, max-norm,
    #    inputs jittered by up to 2 pixels.
    t = run("train", "--hidden", "1200", "--layers", "2", "--dropout", "0.5", "--input-dropout",
            "0.2", "--max-norm", "3", "--jitter", "2", "--epochs", ep_teacher,
            "--out", "teacher.safetensors", *common)
    rows.append(("teacher 2x1200, dropout, max-norm, jitter ±2 px", "67", f"{t['test_errors']}",
                 f"{t['seconds']:.0f} s"))

    # 2. The baseline: 2x800 on hard labels, no regularization.
    base = [run("train", "--hidden", "800", "--layers", "2", "--epochs", ep, "--seed", s,
                "--out", f"baseline-s{s}.safetensors", *common) for s in seeds]
    rows.append(("baseline 2x800, hard labels", "146", _errs(base), _secs(base)))

    # 3. Distilled 2x800 at T = 20 on the untranslated training set.
    run("soft-targets", "teacher.safetensors", "--T", "20", "--out", "transfer.safetensors",
        "--force")
    dist = [run("train-student", "--transfer", "transfer.safetensors", "--hidden", "800",
                "--alpha", "0", "--epochs", ep, "--seed", s,
                "--out", f"student800-s{s}.safetensors", *common) for s in seeds]
    rows.append(("distilled 2x800, T=20, alpha=0", "74", _errs(dist), _secs(dist)))
    a01 = run("train-student", "--transfer", "transfer.safetensors", "--hidden", "800",
              "--alpha", "0.1", "--epochs", ep, "--out", "student800-a01.safetensors", *common)
    rows.append(("distilled 2x800, T=20, alpha=0.1", "—", _errs([a01]), _secs([a01])))

    # 4. kdcli's extra: a transfer set with 2 jittered copies of each digit.
    run("soft-targets", "teacher.safetensors", "--T", "20", "--jitter", "2", "--copies", "2",
        "--out", "transfer-jitter.safetensors", "--force")
    jit = run("train-student", "--transfer", "transfer-jitter.safetensors", "--hidden", "800",
              "--alpha", "0", "--epochs", ep_sweep if not q else ep,
              "--out", "student800-jitter.safetensors", *common)
    rows.append(("distilled 2x800, T=20, + 2 jittered copies (kdcli extra)", "—",
                 _errs([jit]), _secs([jit])))

    # 5. Temperature sweeps for 2x300 and 2x30 students, with hard-label references.
    sw = run("sweep", "teacher.safetensors", "--T", ",".join(temps), "--hidden", "300,30",
             "--epochs", ep_sweep, "--precision", "bf16", "--out-dir", "sweep", "--force")
    hard = {h: run("train", "--hidden", h, "--layers", "2", "--epochs", ep_sweep,
                   "--out", f"baseline{h}.safetensors", *common) for h in ("300", "30")}

    # 6. Digit 3 left out of the transfer set, then its bias fitted back (no labels of 3s).
    run("soft-targets", "teacher.safetensors", "--T", "20", "--exclude-classes", "3",
        "--out", "transfer-no3.safetensors", "--force")
    run("train-student", "--transfer", "transfer-no3.safetensors", "--hidden", "800", "--alpha",
        "0", "--epochs", ep, "--out", "student-no3.safetensors", *common)
    cal3 = run("calibrate-bias", "--model", "student-no3.safetensors", "--teacher",
               "teacher.safetensors", "--data", "mnist:train", "--classes", "3",
               "--eval-data", "mnist:test", "--out", "student-no3-calibrated.safetensors",
               "--force")
    b, a = cal3["eval"]["before"], cal3["eval"]["after"]
    rows.append(("digit 3 left out of the transfer set", "206 (133 on 3s)",
                 f"{b['errors']} ({b['errors_per_class'][3]} on 3s)", ""))
    rows.append((f"... 3's bias raised by the fitted {cal3['shifts'][3]:+.2f} "
                 "(paper: +3.5 by hand)", "109 (14 on 3s)",
                 f"{a['errors']} ({a['errors_per_class'][3]} on 3s)", ""))

    # 7. A transfer set of only 7s and 8s.
    run("soft-targets", "teacher.safetensors", "--T", "20", "--classes", "7,8",
        "--out", "transfer-78.safetensors", "--force")
    run("train-student", "--transfer", "transfer-78.safetensors", "--hidden", "800", "--alpha",
        "0", "--epochs", ep, "--out", "student-78.safetensors", *common)
    cal78 = run("calibrate-bias", "--model", "student-78.safetensors", "--teacher",
                "teacher.safetensors", "--data", "mnist:train", "--eval-data", "mnist:test",
                "--out", "student-78-calibrated.safetensors", "--force")
    s78 = cal78["shifts"]
    others = sorted(v for i, v in enumerate(s78) if i not in (7, 8))
    rel = (s78[7] + s78[8]) / 2 - others[len(others) // 2]
    n_test = 10000
    rows.append(("transfer set of only 7s and 8s", "47.3%",
                 f"{100 * cal78['eval']['before']['errors'] / n_test:.1f}%", ""))
    rows.append((f"... 7 and 8 biases lowered by the fitted {-rel:.1f} (paper: 7.6 by hand)",
                 "13.2%", f"{100 * cal78['eval']['after']['errors'] / n_test:.1f}%", ""))

    total = time.perf_counter() - start
    table = _table(rows, sw, hard, temps, total, q)
    (args.out / "results.md").write_text(table)
    (args.out / "commands.txt").write_text(
        "\n".join(f"{s:8.1f} s  {c}" for c, s in run.log) + "\n")
    print(table)
    if args.update_readme and not q:
        _update_readme(table)


def _errs(results: list[dict]) -> str:
    return ", ".join(str(r["test_errors"]) for r in results) + (
        f" ({len(results)} seeds)" if len(results) > 1 else "")


def _secs(results: list[dict]) -> str:
    return ", ".join(f"{r['seconds']:.0f} s" for r in results)


def _table(rows, sw, hard, temps, total, quick) -> str:
    out = ["| experiment | paper | kdcli | time |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    out += ["", "Test errors of distilled students against T (alpha = 0), with the same net "
            "trained on hard labels for reference:", "",
            "| student | hard labels | " + " | ".join(f"T={t}" for t in temps) + " |",
            "|---|---|" + "---|" * len(temps)]
    for h in ("300", "30"):
        errs = {f"{p['T']:g}": p["test_errors"] for p in sw["points"] if str(p["hidden"]) == h}
        out.append(f"| 2x{h} | {hard[h]['test_errors']} | "
                   + " | ".join(str(errs[f'{float(t):g}']) for t in temps) + " |")
    mode = "quick smoke run" if quick else "full run"
    out += ["", f"Measured by `examples/mnist-paper/reproduce.py` ({mode}), {total / 60:.1f} "
            "minutes in all on this machine; every command and its time is in `commands.txt`."]
    return "\n".join(out) + "\n"


def _update_readme(table: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- mnist-paper:start -->", "<!-- mnist-paper:end -->"
    if start not in text or end not in text:
        sys.exit("README.md lacks the results markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{table}{end}{tail}")


if __name__ == "__main__":
    main()
