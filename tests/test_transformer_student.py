"""The transformer family on the teacher's subword tokenizer (``--tokenizer``): shapes and
padding, a short overfit, the teacher's embeddings as a start, distillation from a Hugging
Face teacher with ``--tokenizer teacher``, and an ONNX export that takes ``input_ids`` and
``attention_mask`` with its tokenizer beside it (real Rotten Tomatoes sentences, conftest's
tiny BERT and its WordPiece tokenizer)."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tokenizers import Tokenizer

from kdcli.config import TrainConfig, WordsConfig, student_config
from kdcli.data.base import DataOptions
from kdcli.errors import (
    FormatError,
    ModelError,
    OutputExistsError,
    UnsafePickleError,
    UsageError,
)
from kdcli.evaluate import evaluate
from kdcli.export import main_export
from kdcli.io.storage import read_safetensors
from kdcli.soft_targets import soft_targets
from kdcli.students.base import Architecture
from kdcli.students.model_file import load_model
from kdcli.students.subwords import read_beside, sha256_text
from kdcli.students.transformer import TransformerClassifier
from kdcli.teachers import base as teacher_base
from kdcli.teachers.formats import load_teacher
from kdcli.train import train, train_student

TEXT = DataOptions(text_columns=("text",))


def test_shapes_padding_and_an_empty_text():
    torch.manual_seed(0)
    net = TransformerClassifier(vocab_size=50, max_len=8, layers=2, dim=16, heads=4,
                                num_classes=3).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [9, 0, 0, 0, 0], [0, 0, 0, 0, 0], [4, 3, 2, 1, 8]])
    with torch.no_grad():
        z = net(ids)
        assert z.shape == (4, 3) and torch.isfinite(z).all()
        for i, n in enumerate([3, 1, 0, 5]):  # each text alone, unpadded: the same logits
            alone = net(ids[i:i + 1, :max(n, 1)])
            torch.testing.assert_close(alone, z[i:i + 1], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(net(torch.tensor([[7, 6, 5]])), z[:1])  # positions count


def test_specs_defaults_and_refusals():
    arch = Architecture.parse("transformer:2")
    assert arch.config.shape == (2, 128, 4) and arch.spec() == "transformer:2"
    assert Architecture.parse("transformer:1,64,2").config.shape == (1, 64, 2)
    for bad in ("transformer:2,30,4", "transformer:0", "transformer:1,2,3,4"):
        with pytest.raises(UsageError):
            Architecture.parse(bad)


def test_the_word_vocabulary_is_refused_in_one_line(text_reviews, tmp_path):
    with pytest.raises(UsageError, match="subword tokenizer") as e:
        train(text_reviews + "[:20]", arch=Architecture.parse("transformer:1,16,2"),
              out=tmp_path / "s.safetensors", config=TrainConfig(epochs=1),
              eval_data="none", data_options=TEXT)
    assert "\n" not in e.value.message and "--tokenizer" in e.value.hint


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, text_reviews, text_bert) -> tuple:
    """transformer:1,32,2 trained on 40 reviews with the tiny BERT's tokenizer.json (no
    start from its embeddings: a file, not the folder)."""
    folder = tmp_path_factory.mktemp("transformer")
    out = folder / "student.safetensors"
    summary = train(text_reviews + "[:40]", arch=Architecture.parse("transformer:1,32,2"),
                    out=out, config=TrainConfig(epochs=40, batch_size=8, lr=3e-3),
                    eval_data=text_reviews + "[:40]", data_options=TEXT,
                    words=WordsConfig(max_words=24,
                                      tokenizer=str(text_bert / "tokenizer.json")))
    return out, summary


def test_a_short_run_overfits_forty_reviews(overfit, text_bert, text_corpus):
    out, summary = overfit
    assert summary["test_errors"] == 0 and summary["tokenizer"].endswith("tokenizer.json")
    mf = load_model(out)
    text = (text_bert / "tokenizer.json").read_text(encoding="utf-8")
    assert mf.preprocessing.tokenizer["sha256"] == sha256_text(text)
    assert mf.preprocessing.words is None and mf.preprocessing.raw_shape == [24]
    # the student is a text teacher: texts in, its own tokenizer
    t = load_teacher(out)
    z = t.runner(text_corpus["mixed"])
    assert z.shape == (len(text_corpus["mixed"]), 2) and torch.isfinite(z).all()


def test_the_export_takes_token_ids_and_writes_its_tokenizer_beside(overfit, text_reviews,
                                                                    text_corpus, tmp_path):
    out, _ = overfit
    onnx_path = tmp_path / "student.onnx"
    report = main_export(out, onnx_path, data=text_reviews)
    assert report["agreement"] == 1.0 and report["max_abs_diff"] < 1e-4
    beside = tmp_path / "tokenizer.json"
    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert meta["tokenizer_sha256"] == sha256_text(beside.read_text(encoding="utf-8"))
    assert json.loads(meta["preprocessing"])["tokenizer"]["size"] > 100
    # what a user does: the tokenizer beside it, both axes dynamic, equal to torch
    tok = Tokenizer.from_file(str(beside))
    texts = text_corpus["mixed"]
    enc = tok.encode_batch(texts)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    assert ids.shape[1] == 24  # the plot summaries are cut at --max-words
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    got = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    want = load_teacher(out).runner(texts).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    one = sess.run(None, {"input_ids": ids[:1, :5], "attention_mask": mask[:1, :5]})[0]
    assert one.shape == (1, 2)
    # the tokenizer beside it is checked by its hash; a second export refuses to overwrite
    assert read_beside(onnx_path, meta) == beside.read_text(encoding="utf-8")
    with pytest.raises(OutputExistsError):
        main_export(out, tmp_path / "other.onnx", data=text_reviews)
    assert not (tmp_path / "other.onnx").exists()
    beside.write_text(beside.read_text(encoding="utf-8").replace("[UNK]", "[unk]"))
    with pytest.raises(FormatError, match="SHA-256"):
        read_beside(onnx_path, meta)
    beside.write_bytes(pickle.dumps({"model": "x"}))
    with pytest.raises(UnsafePickleError):
        read_beside(onnx_path, meta)


def test_a_pickled_tokenizer_and_a_tampered_one_are_refused(overfit, text_reviews, tmp_path):
    fake = tmp_path / "tokenizer.json"
    fake.write_bytes(pickle.dumps({"vocab": ["a"]}))
    with pytest.raises(UnsafePickleError):
        train(text_reviews + "[:20]", arch=Architecture.parse("transformer:1,16,2"),
              out=tmp_path / "s.safetensors", config=TrainConfig(epochs=1),
              eval_data="none", data_options=TEXT, words=WordsConfig(tokenizer=str(fake)))
    assert not (tmp_path / "s.safetensors").exists()
    # a model file whose tokenizer is not the one its hash names
    out, _ = overfit
    tensors, meta, _ = read_safetensors(out)
    pre = json.loads(meta["preprocessing"])
    pre["tokenizer"]["json"] = pre["tokenizer"]["json"].replace("[UNK]", "[unk]")
    meta = {**meta, "preprocessing": json.dumps(pre)}
    from kdcli.students.model_file import _check_tokenizer

    with pytest.raises(FormatError, match="SHA-256"):
        _check_tokenizer(out, pre["tokenizer"])


def test_distilled_from_the_bert_teacher_with_its_tokenizer_and_embeddings(
        tmp_path, text_reviews, text_bert):
    teacher = tmp_path / "bert"
    shutil.copytree(text_bert, teacher)
    transfer = tmp_path / "t.safetensors"
    soft_targets([str(teacher)], T=2.0, data=text_reviews + "[:64]", out=transfer,
                 data_options=TEXT, precision="fp32")
    out = tmp_path / "student.safetensors"
    summary = train_student(transfer, arch=Architecture.parse("transformer:1,32,2"), out=out,
                            config=student_config(epochs=2, batch_size=16, precision="fp32"),
                            eval_data="none", words=WordsConfig(max_words=32,
                                                                tokenizer="teacher"))
    assert summary["tokenizer"] == "teacher"
    mf = load_model(out)
    # the teacher's width is 32: its embeddings are the start, moved only by two epochs
    emb = read_safetensors(next(teacher.glob("*.safetensors")))[0]
    word = emb["bert.embeddings.word_embeddings.weight"]
    got = mf.model[-1].tokens.weight[1:]
    assert torch.corrcoef(torch.stack([got.flatten(), word.flatten()]))[0, 1] > 0.9
    shutil.rmtree(teacher)  # recorded by name only: without the folder, the path is asked
    with pytest.raises(UsageError, match="by name") as e:
        train_student(transfer, arch=Architecture.parse("transformer:1,32,2"),
                      out=tmp_path / "s2.safetensors", config=student_config(epochs=1),
                      eval_data="none", words=WordsConfig(tokenizer="teacher"))
    assert "--tokenizer path/to/bert" in e.value.hint


@pytest.fixture(scope="module")
def exported(overfit, text_reviews, tmp_path_factory) -> tuple:
    """The overfit student's ONNX export, with its tokenizer.json beside it."""
    out, _ = overfit
    onnx_path = tmp_path_factory.mktemp("export") / "student.onnx"
    main_export(out, onnx_path, data=text_reviews)
    return out, onnx_path


def test_eval_and_soft_targets_take_the_export_as_they_take_the_model_file(
        exported, text_reviews, tmp_path):
    out, onnx_path = exported
    result = evaluate([str(out), str(onnx_path)], data=text_reviews, data_options=TEXT)
    file_row, onnx_row = result["models"]
    assert file_row["errors"] == onnx_row["errors"]
    assert file_row["accuracy"] == onnx_row["accuracy"]
    # learned tensors only in both: not the graph's attention scale (0.5 at head width 16)
    assert file_row["params"] == onnx_row["params"] == sum(
        p.numel() for p in load_model(out).model.parameters())
    assert result["agreement"][0][1] == 1.0
    t = load_teacher(onnx_path)
    assert t.inputs[0].dtype == teacher_base.TEXT  # texts in, as onnx_text's
    # as a teacher: the export's soft targets are the model file's
    sets = []
    for i, teacher in enumerate((out, onnx_path)):
        transfer = tmp_path / f"t{i}.safetensors"
        soft_targets([str(teacher)], T=2.0, data=text_reviews + "[:32]", out=transfer,
                     data_options=TEXT, precision="fp32")
        sets.append(read_safetensors(transfer)[0])
    logits = [k for k in sets[0] if "logit" in k or "target" in k]
    assert logits
    for k in logits:
        torch.testing.assert_close(sets[0][k], sets[1][k], atol=1e-4, rtol=1e-4)


def _copy_export(onnx_path, folder, **props) -> object:
    """The export and its tokenizer copied to ``folder``, its metadata changed by
    ``props`` (None: removed)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(onnx_path.with_name("tokenizer.json"), folder / "tokenizer.json")
    proto = onnx.load(str(onnx_path))
    meta = {p.key: p.value for p in proto.metadata_props}
    meta.update(props)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {k: v for k, v in meta.items() if v is not None})
    onnx.save(proto, str(folder / "student.onnx"))
    return folder / "student.onnx"


def test_the_exports_tokenizer_missing_tampered_or_outside_is_refused(exported, tmp_path):
    _, onnx_path = exported
    cases = []
    missing = _copy_export(onnx_path, tmp_path / "missing")
    (tmp_path / "missing" / "tokenizer.json").unlink()
    cases.append((missing, FormatError, "no tokenizer.json is beside it"))
    tampered = _copy_export(onnx_path, tmp_path / "tampered")
    beside = tmp_path / "tampered" / "tokenizer.json"
    beside.write_text(beside.read_text(encoding="utf-8").replace("[UNK]", "[unk]"))
    cases.append((tampered, FormatError, "SHA-256"))
    # a name that leads out of the folder, where a good tokenizer waits: never read
    shutil.copy(onnx_path.with_name("tokenizer.json"), tmp_path / "x.json")
    outside = _copy_export(onnx_path, tmp_path / "outside", tokenizer_file="../x.json")
    cases.append((outside, FormatError, "not a file name in its folder"))
    pickled = _copy_export(onnx_path, tmp_path / "pickled")
    (tmp_path / "pickled" / "tokenizer.json").write_bytes(pickle.dumps({"model": "x"}))
    cases.append((pickled, UnsafePickleError, "pickle"))
    # a foreign model with the same inputs but no kdcli tokenizer: the folder is asked
    foreign = _copy_export(onnx_path, tmp_path / "foreign", tokenizer_file=None,
                           tokenizer_sha256=None)
    cases.append((foreign, ModelError, "names no tokenizer"))
    for path, error, words in cases:
        with pytest.raises(error, match=words) as e:
            load_teacher(path)
        assert "\n" not in e.value.message, path
    assert "Hugging Face folder" in e.value.hint


def test_a_sweep_of_transformers_shares_one_tokenizer(cli, tmp_path, text_reviews, text_bert,
                                                      monkeypatch):
    """``kdcli sweep --family transformer --tokenizer teacher`` over a Hugging Face teacher:
    the folder is identified by its digest (not read as one file), its tokenizer is found
    although the set is in --out-dir, fitted once for the grid, and the width is D."""
    from kdcli.training import tokens

    fits = []
    fit_tokens = tokens.fit_tokens
    monkeypatch.setattr(tokens, "fit_tokens", lambda *a, **k: fits.append(1) or
                        fit_tokens(*a, **k))
    args = ["sweep", text_bert, "--family", "transformer", "--layers", "1", "--hidden",
            "16,32", "--T", "2", "--data", text_reviews, "--text-column", "text",
            "--tokenizer", "teacher", "--max-words", "32", "--epochs", "1",
            "--eval-data", text_reviews, "--out-dir", "sw", "--json"]
    r = cli(*args)
    assert r.exit_code == 0, r.stderr
    points = json.loads(r.stdout)["points"]
    assert [(p["architecture"], p["status"]) for p in points] == [
        ("transformer:1,16", "trained"), ("transformer:1,32", "trained")]
    assert len(fits) == 1  # one tokenizer for the grid
    shas = set()
    for p in points:
        mf = load_model(p["file"])
        net = mf.model[-1]
        assert isinstance(net, TransformerClassifier)
        assert net.tokens.weight.shape[1] == p["hidden"]
        shas.add(mf.preprocessing.tokenizer["sha256"])
        (row,) = evaluate([p["file"]], data=text_reviews, data_options=TEXT)["models"]
        assert row["errors"] == p["test_errors"]
    assert shas == {sha256_text((text_bert / "tokenizer.json").read_text(encoding="utf-8"))}
    r = cli(*args)  # resumed: the set's teacher is the same folder, the students are kept
    assert r.exit_code == 0, r.stderr
    assert [p["status"] for p in json.loads(r.stdout)["points"]] == ["kept", "kept"]


def test_a_folder_of_the_teachers_name_with_another_tokenizer_is_refused(
        cli, tmp_path, text_reviews, text_bert):
    """``--tokenizer teacher`` finds the teacher by name; a folder of that name whose
    tokenizer was trained on other texts (the plot summaries) is not the teacher the set
    records: one line naming both digests and ``--tokenizer PATH``."""
    from conftest import rotten_tomatoes_rows
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    made = tmp_path / "made"
    shutil.copytree(text_bert, made / "bert")
    transfer = tmp_path / "t.safetensors"
    soft_targets([str(made / "bert")], T=2.0, data=text_reviews + "[:32]", out=transfer,
                 data_options=TEXT, precision="fp32")
    other = tmp_path / "bert"  # beside the set: the same weights, another tokenizer
    shutil.copytree(text_bert, other)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    plots = [r["text"] for r in rotten_tomatoes_rows() if r["category"] == "plot"][:300]
    tok.train_from_iterator(plots, trainers.WordPieceTrainer(
        vocab_size=600, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.save(str(other / "tokenizer.json"))
    assert tok.get_vocab() != Tokenizer.from_file(str(text_bert / "tokenizer.json")).get_vocab()
    r = cli("train-student", "--transfer", transfer, "--arch", "transformer:1,32,2",
            "--tokenizer", "teacher", "--epochs", "1", "--eval-data", "none", "--out",
            "s.safetensors")
    assert r.exit_code == 1
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("Error:")]
    recorded = json.loads(read_safetensors(transfer)[1]["teachers"])[0]["sha256"]
    assert "is not the teacher" in line and f"teachers record {recorded[:12]}" in line
    assert "tokenizer files hash to SHA-256" in line
    assert "--tokenizer PATH" in line and not (tmp_path / "s.safetensors").exists()
    # the folder it was made from, given by path, is taken
    r = cli("train-student", "--transfer", transfer, "--arch", "transformer:1,32,2",
            "--tokenizer", made / "bert", "--epochs", "1", "--eval-data", "none", "--out",
            "s.safetensors")
    assert r.exit_code == 0, r.stderr
