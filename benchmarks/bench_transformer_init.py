"""Does a transformer student gain from starting at its teacher's input embeddings?

Reads the folder that ``bench_text_teachers.py`` writes (``--data``: ``train.jsonl``,
``test.jsonl`` and the ``bert-small/`` teacher, Rotten Tomatoes sentences split by movie),
labels the training sentences with the teacher (``kdcli soft-targets``), then distils
``transformer:L,D,H`` students with the teacher's tokenizer, each from a random start
(``--tokenizer bert-small/tokenizer.json``) and from the teacher's embeddings
(``--tokenizer bert-small``: as they are when D is the teacher's width, a fixed PCA when it
is narrower), for each seed. Prints test accuracy per run and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kdcli.config import WordsConfig, student_config
from kdcli.data.base import DataOptions
from kdcli.evaluate import evaluate
from kdcli.output import Reporter
from kdcli.soft_targets import soft_targets
from kdcli.students.base import Architecture
from kdcli.train import train_student

TEXT = DataOptions(text_columns=("text",))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/kdcli-rt"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/kdcli-tf"))
    ap.add_argument("--archs", nargs="+", default=["transformer:1,128,2", "transformer:1,64,2"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=4000, help="training sentences used")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rep = Reporter("quiet")
    teacher = args.data / "bert-small"
    transfer = args.out / "bert-train.safetensors"
    if not transfer.exists():
        soft_targets([str(teacher)], T=2.0, data=f"{args.data / 'train.jsonl'}[:{args.limit}]",
                     out=transfer, data_options=TEXT, precision="fp32", reporter=rep)
    test = str(args.data / "test.jsonl")
    rows = []
    for spec in args.archs:
        for seed in args.seeds:
            for start, tok in (("random", teacher / "tokenizer.json"), ("teacher", teacher)):
                out = args.out / f"{spec.replace(':', '-')}-{start}-{seed}.safetensors"
                t0 = time.perf_counter()
                s = train_student(transfer, arch=Architecture.parse(spec), out=out, force=True,
                                  config=student_config(epochs=args.epochs, batch_size=32,
                                                        seed=seed, precision="fp32"),
                                  loss="mse", alpha=0.0, eval_data="none", reporter=rep,
                                  words=WordsConfig(max_words=64, tokenizer=str(tok)))
                r = evaluate([str(out)], data=test, data_options=TEXT, reporter=rep)
                acc = r["models"][0]["accuracy"]
                rows.append({"arch": spec, "start": start, "seed": seed, "accuracy": acc,
                             "seconds": round(time.perf_counter() - t0, 1),
                             "train_loss": s.get("train_loss")})
                print(json.dumps(rows[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
