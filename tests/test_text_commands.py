"""``kdcli sweep`` and ``kdcli calibrate-bias`` on texts: a grid of text students that share one
vocabulary, bias shifts of a text student on texts and on a set of texts, and its shifted file
exported to an ONNX graph that takes raw strings and equals torch (real Rotten Tomatoes
sentences)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdcli.calibrate import calibrate_bias
from kdcli.config import TrainConfig, WordsConfig, student_config
from kdcli.data.base import DataOptions
from kdcli.errors import UsageError
from kdcli.export import main_export
from kdcli.soft_targets import soft_targets
from kdcli.students.base import Architecture, final_linear
from kdcli.students.model_file import load_model
from kdcli.students.words import WordVocab
from kdcli.sweep import sweep
from kdcli.train import train
from kdcli.training.text import encode


def open_text(path: str) -> str:
    """A file's UTF-8 text."""
    from pathlib import Path

    return Path(path).read_text(encoding="utf-8")


TEXT = DataOptions(text_columns=("text",))
QUICK = student_config(epochs=2, batch_size=16, precision="fp32")


def test_a_sweep_of_text_students_shares_one_vocabulary_and_resumes(tmp_path, text_tfidf,
                                                                    text_reviews, text_corpus,
                                                                    monkeypatch):
    import kdcli.training.text as text

    fits = []
    fit_words = text.fit_words
    monkeypatch.setattr(text, "fit_words", lambda *a, **k: fits.append(1) or fit_words(*a, **k))
    kw = {"temperatures": [2.0], "hidden": [8, 16], "family": "bow",
          "data": text_reviews + "[:120]", "eval_data": text_reviews + "[120:]",
          "config": QUICK, "out_dir": tmp_path / "sweep", "data_options": TEXT,
          "words": WordsConfig(min_count=1, max_words=24)}
    result = sweep(text_tfidf, **kw)
    assert len(fits) == 1  # one vocabulary for the whole grid
    saved = json.loads((tmp_path / "sweep" / "results.json").read_text())
    points = saved["points"]
    assert [(p["architecture"], p["T"], p["status"]) for p in points] == [
        ("bow:8", 2.0, "trained"), ("bow:16", 2.0, "trained")]
    for p in points:
        assert 0 < p["test_accuracy"] <= 1 and p["test_errors"] == round(
            80 * (1 - p["test_accuracy"]))
    # the family's own optimizer, as train-student picks it
    assert saved["optimizer"] == "adam" and saved["lr"] == 0.005
    vocabs = [load_model(p["file"]).preprocessing.words for p in points]
    assert vocabs[0] == vocabs[1]
    assert WordVocab.from_json(vocabs[0]) == WordVocab.fit(text_corpus["train"][:120],
                                                           size=20000, min_count=1)
    assert result["summary"][1]["mean"] == points[1]["test_errors"]
    again = sweep(text_tfidf, **kw)  # resumes: the same settings, vocabulary included
    assert [p["status"] for p in again["points"]] == ["kept", "kept"]
    with pytest.raises(UsageError, match="trained with other settings: max_words 24 .now 12"):
        sweep(text_tfidf, **{**kw, "words": WordsConfig(min_count=1, max_words=12)})


def test_a_sweep_refuses_students_of_the_other_kind_in_one_line(tmp_path, text_tfidf,
                                                                text_reviews, teacher_file, cli):
    r = cli("sweep", text_tfidf, "--data", text_reviews + "[:40]", "--text-column", "text",
            "--hidden", "8", "--T", "2", "--out-dir", tmp_path / "a")
    transfer = tmp_path / "a" / "transfer.safetensors"
    assert r.exit_code == 1 and r.stderr.strip().splitlines() == [
        f"Error: {transfer} holds texts, but mlp:8,8 does not take text. Use a text student, "
        "e.g. --family bow"]
    assert not transfer.exists()  # the set it made for nothing is removed
    with pytest.raises(UsageError, match="bow:8 is a text student, but .* is not text. Use "
                                         "--family mlp"):
        sweep(teacher_file, temperatures=[2.0], hidden=[8], family="bow",
              data="mnist[:50]", eval_data=None, config=QUICK, out_dir=tmp_path / "b")
    with pytest.raises(UsageError, match="unknown family 'nope'"):
        sweep(teacher_file, temperatures=[2.0], hidden=[8], family="nope",
              out_dir=tmp_path / "c")


@pytest.fixture(scope="module")
def bow(tmp_path_factory, text_reviews):
    """A bow:8 student trained a few epochs on hard labels of 60 reviews."""
    out = tmp_path_factory.mktemp("bow") / "bow.safetensors"
    train(text_reviews + "[:60]", arch=Architecture.parse("bow:8"), out=out,
          config=TrainConfig(epochs=3, batch_size=16), eval_data=None, data_options=TEXT,
          words=WordsConfig(min_count=1, max_words=32))
    return out


def test_calibrate_bias_on_texts_moves_the_bias_and_exports_raw_strings(
        tmp_path, bow, text_tfidf, text_reviews, text_corpus):
    import onnxruntime as ort

    # a target far from the student's: the label frequencies of the rotten reviews and 5 fresh
    rows = [json.loads(line) for line in open_text(text_reviews).splitlines()]
    rows = [r for r in rows if r["label"] == "rotten"] + [
        r for r in rows if r["label"] == "fresh"][:5]
    skewed = tmp_path / "skewed.jsonl"
    skewed.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "calibrated.safetensors"
    # the student's record names its text column: --text-column is not needed again
    result = calibrate_bias(bow, out, data=str(skewed), target="labels",
                            eval_data=text_reviews + "[100:]")
    mf, shifted = load_model(bow), load_model(out)
    shift = torch.tensor(result["shifts"])
    assert shift.abs().max() > 0.5
    torch.testing.assert_close(final_linear(shifted.model).bias,
                               final_linear(mf.model).bias + shift)
    np.testing.assert_allclose(result["after"], result["target_distribution"], atol=1e-5)
    texts = text_corpus["train"]
    with torch.no_grad():  # the shifted student's mean prediction on the texts is the target
        z = shifted.model(encode(texts, shifted.preprocessing))
    labels = torch.tensor([shifted.class_names.index(r["label"]) for r in rows])
    assert result["target_distribution"] == pytest.approx(
        (torch.bincount(labels, minlength=2) / len(rows)).tolist())
    assert z.softmax(-1).mean(0)[labels[0]] > torch.softmax(
        mf.model(encode(texts, mf.preprocessing)), -1).mean(0)[labels[0]] + 0.1
    assert shifted.preprocessing.words == mf.preprocessing.words
    assert set(result["eval"]) == {"data", "before", "after"}
    assert shifted.training["test_errors"] == result["eval"]["after"]["errors"]
    # the ONNX graph of the shifted student takes raw strings and equals torch
    report = main_export(out, tmp_path / "calibrated.onnx", data=text_reviews)
    assert report["agreement"] == 1.0 and report["max_abs_diff"] < 1e-4
    session = ort.InferenceSession(str(tmp_path / "calibrated.onnx"),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {"text": np.array(texts, dtype=object)})[0]
    np.testing.assert_allclose(got, z.numpy(), atol=1e-5)


def test_calibrate_bias_matches_a_text_teacher_and_a_set_of_texts(tmp_path, bow, text_tfidf,
                                                                  text_reviews, cli):
    out = tmp_path / "t.safetensors"
    r = cli("calibrate-bias", "--model", bow, "--teacher", text_tfidf, "--data", text_reviews,
            "--text-column", "text", "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    by_teacher = json.loads(r.stdout)
    transfer = tmp_path / "set.safetensors"
    soft_targets([str(text_tfidf)], T=2.0, data=text_reviews, out=transfer, data_options=TEXT,
                 precision="fp32")
    by_set = calibrate_bias(bow, tmp_path / "s.safetensors", transfer=transfer)
    # the teacher's mean prediction at T = 1 on the same texts, from the teacher or its set
    np.testing.assert_allclose(by_set["target_distribution"],
                               by_teacher["target_distribution"], atol=1e-5)
    np.testing.assert_allclose(by_set["shifts"], by_teacher["shifts"], atol=1e-4)
    np.testing.assert_allclose(by_set["after"], by_set["target_distribution"], atol=1e-5)


def test_calibrate_bias_refuses_a_model_and_data_of_other_kinds(tmp_path, bow, teacher_file,
                                                                text_reviews, cli):
    with pytest.raises(UsageError, match="bow:8 is a text student, but mnist"):
        calibrate_bias(bow, tmp_path / "x.safetensors", data="mnist:test[:50]",
                       target="labels")
    r = cli("calibrate-bias", "--model", teacher_file, "--data", text_reviews, "--text-column",
            "text", "--target", "labels", "--out", tmp_path / "y.safetensors")
    assert r.exit_code == 1 and r.stderr.strip().splitlines() == [
        f"Error: {text_reviews} holds texts, but mlp:64 does not take text. Calibrate a text "
        "student on texts"]
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()
