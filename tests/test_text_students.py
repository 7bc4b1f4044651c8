"""Text students (the bow family): shapes, a short overfit, training on hard labels and on a
transfer set of texts, the student as a text teacher, and an ONNX export that takes raw
strings and equals torch (real Rotten Tomatoes sentences)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcli.config import TrainConfig, WordsConfig, student_config
from kdcli.data.base import DataOptions
from kdcli.errors import UsageError
from kdcli.export import main_export
from kdcli.soft_targets import soft_targets
from kdcli.students.base import Architecture
from kdcli.students.bilstm import BiLSTM
from kdcli.students.bow import BagOfWords
from kdcli.students.kimcnn import KimCNN
from kdcli.students.model_file import load_model
from kdcli.teachers.formats import load_teacher
from kdcli.train import train, train_student
from kdcli.training.text import encode

TEXT = DataOptions(text_columns=("text",))


@pytest.fixture(scope="module")
def reviews(text_reviews) -> str:
    """conftest's 200 labelled review sentences (JSON Lines, column ``text``)."""
    return text_reviews


@pytest.mark.parametrize("order", [1, 2, 3])
def test_bag_of_words_shapes_padding_and_one_word_texts(order):
    torch.manual_seed(0)
    net = BagOfWords(vocab_size=50, dim=8, order=order, num_classes=3)
    ids = torch.tensor([[5, 6, 7, 0, 0], [9, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    z = net(ids)
    assert z.shape == (3, 3) and torch.isfinite(z).all()
    # padding changes nothing: the same texts with more padding, or none
    torch.testing.assert_close(net(ids[:, :3]), z)
    torch.testing.assert_close(net(torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], 1)), z)
    assert torch.allclose(z[2], net.head.bias)  # no word: the mean of nothing is 0
    if order > 1:  # word order matters through the n-grams, not without them
        assert not torch.allclose(net(torch.tensor([[7, 6, 5]])), z[:1])
    else:
        torch.testing.assert_close(net(torch.tensor([[7, 6, 5]])), z[:1])


def test_the_bilstm_reads_each_text_alone_whatever_the_padding():
    torch.manual_seed(0)
    net = BiLSTM(vocab_size=50, hidden=8, dim=6, num_classes=3).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [9, 0, 0, 0, 0], [0, 0, 0, 0, 0], [4, 3, 2, 1, 8]])
    with torch.no_grad():
        z = net(ids)
        assert z.shape == (4, 3) and torch.isfinite(z).all()
        for i, n in enumerate([3, 1, 0, 5]):  # each text alone, unpadded
            alone = net(ids[i:i + 1, :max(n, 1)])
            torch.testing.assert_close(alone, z[i:i + 1], atol=1e-6, rtol=1e-5)
        # the backward direction reads the words reversed: order matters
        assert not torch.allclose(net(torch.tensor([[7, 6, 5]])), z[:1])


def test_the_kim_cnn_reads_each_text_alone_whatever_the_padding():
    torch.manual_seed(0)
    net = KimCNN(vocab_size=50, filters=4, dim=6, num_classes=3).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0, 0], [9, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0],
                        [4, 3, 2, 1, 8, 11]])
    with torch.no_grad():
        z = net(ids)
        assert z.shape == (4, 3) and torch.isfinite(z).all()
        for i, n in enumerate([3, 1, 0, 6]):  # each text alone, unpadded (shorter than 5)
            alone = net(ids[i:i + 1, :max(n, 1)])
            torch.testing.assert_close(alone, z[i:i + 1], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(z[2], net.head.bias)  # no word: every feature 0
        # windows of two or more words: order matters, and one word differs from none
        assert not torch.allclose(net(torch.tensor([[7, 6, 5]])), z[:1])
        assert not torch.allclose(z[1], z[2])


@pytest.mark.parametrize("spec,epochs,batch", [("bow:16", 60, 8), ("bilstm:16,16", 40, 8),
                                               ("kimcnn:8,16", 40, 8)])
def test_a_short_run_overfits_forty_reviews_and_exports_raw_strings(tmp_path, reviews, spec,
                                                                    epochs, batch):
    out = tmp_path / "student.safetensors"
    summary = train(reviews + "[:40]", arch=Architecture.parse(spec), out=out,
                    config=TrainConfig(epochs=epochs, batch_size=batch),
                    eval_data=reviews + "[:40]",
                    data_options=TEXT, words=WordsConfig(min_count=1))
    assert summary["test_errors"] == 0 and summary["optimizer"] == "adam"
    mf = load_model(out)
    assert mf.class_names == ["fresh", "rotten"] and mf.preprocessing.words["words"][:2] == [
        "<pad>", "<unk>"]
    assert summary["vocab_size"] == 20000 and summary["max_words"] == 128
    from kdcli.inspection import inspect_file

    shown = inspect_file(out)["preprocessing"]["words"]  # the vocabulary's size, not its words
    assert shown["size"] == len(mf.preprocessing.words["words"]) and len(shown["sha256"]) == 64
    report = main_export(out, tmp_path / "student.onnx", data=reviews)
    assert report["agreement"] == 1.0 and report["max_abs_diff"] < 1e-4
    # learned tensors only, in both formats: not the vocabulary's nodes' constants
    counts = [load_teacher(p).param_count() for p in (out, tmp_path / "student.onnx")]
    assert counts[0] == counts[1] == sum(p.numel() for p in mf.model.parameters())


@pytest.fixture(scope="module")
def student(tmp_path_factory, text_tfidf, reviews) -> tuple:
    """A bow:16 student distilled from the TF-IDF pipeline on the 200 reviews."""
    folder = tmp_path_factory.mktemp("student")
    transfer = folder / "t.safetensors"
    soft_targets([str(text_tfidf)], T=2.0, data=reviews, out=transfer, data_options=TEXT,
                 precision="fp32")
    out = folder / "student.safetensors"
    summary = train_student(transfer, arch=Architecture.parse("bow:16"), out=out,
                            config=student_config(epochs=15, batch_size=16, precision="fp32"),
                            eval_data=reviews, words=WordsConfig(min_count=1, max_words=12))
    return out, summary, transfer


def test_a_student_distilled_from_a_text_set_agrees_with_its_teacher(student, text_tfidf,
                                                                      reviews, text_corpus):
    out, summary, _ = student
    assert summary["agreement"] > 0.8 and summary["max_words"] == 12
    # the student file is a text teacher: texts in, tokenized as in training
    t = load_teacher(out)
    assert t.takes_text and t.class_names == ["fresh", "rotten"]
    texts = text_corpus["train"][:50]
    mf = load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(t.logits(texts), mf.model(encode(texts, mf.preprocessing)))
    every = text_corpus["train"]  # the transfer set's texts
    agree = (t.logits(every).argmax(-1) == load_teacher(text_tfidf).logits(every).argmax(-1))
    assert float(agree.float().mean()) == pytest.approx(summary["agreement"], abs=0.05)


def test_the_export_takes_raw_strings_and_equals_torch(student, tmp_path, text_corpus,
                                                       reviews):
    import onnxruntime as ort

    out, _, _ = student
    onnx_path = tmp_path / "student.onnx"
    # the text column is the one the student's record keeps
    report = main_export(out, onnx_path, data=reviews)
    assert report["agreement"] == 1.0 and report["max_abs_diff"] < 1e-4
    assert report["checked"] == 200
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [("text", "tensor(string)")]
    texts = text_corpus["mixed"] + ["", "ÜBER café's 日本語 !!!", "word " * 500]
    got = session.run(None, {"text": np.array(texts, dtype=object)})[0]
    mf = load_model(out)
    with torch.no_grad():
        ref = mf.model(encode(texts, mf.preprocessing)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    one = session.run(None, {"text": np.array(texts[:1], dtype=object)})[0]
    np.testing.assert_allclose(one, ref[:1], atol=1e-5)


def test_students_and_data_of_the_other_kind_are_refused_in_one_line(student, reviews, cli):
    _, _, transfer = student
    with pytest.raises(UsageError, match="holds texts, but mlp:8 does not take text"):
        train_student(transfer, arch=Architecture.parse("mlp:8"), out="x.safetensors")
    with pytest.raises(UsageError, match="bow:16 is a text student, but mnist"):
        train("mnist[:100]", arch=Architecture.parse("bow:16"), out="x.safetensors")
    r = cli("train", "--data", reviews, "--text-column", "text", "--out", "m.safetensors")
    assert r.exit_code == 1 and r.stderr.strip().splitlines() == [
        f"Error: {reviews} holds texts, but mlp:800,800 does not take text. Use a text "
        "student, e.g. --arch bow:64"]


def test_a_student_of_augmented_copies_takes_its_words_from_the_original_texts(
        tmp_path, text_tfidf, reviews, text_corpus):
    from kdcli.data.text_augment import TextAugment
    from kdcli.students.words import WordVocab

    transfer = tmp_path / "aug.safetensors"
    soft_targets([str(text_tfidf)], T=2.0, data=reviews + "[:40]", out=transfer,
                 data_options=TEXT, copies=3, text_augment=TextAugment(mask=0.3, replace=0.3))
    out = tmp_path / "s.safetensors"
    train_student(transfer, arch=Architecture.parse("bow:8"), out=out,
                  config=student_config(epochs=1), eval_data=None)
    vocab = WordVocab.from_json(load_model(out).preprocessing.words)
    assert vocab == WordVocab.fit(text_corpus["train"][:40], size=20000, min_count=2)
    assert "unk" not in vocab.words  # [UNK] of the masked copies is not a word of the data
