"""Hugging Face text classifiers (a tiny BERT and its tokenizer, built here) as teachers."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TEXT_MAX_LEN, TEXT_NAMES

from kdcli.errors import FormatError, ModelError, UnsafePickleError
from kdcli.teachers.formats import detect_format, load_teacher

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

NAMES = TEXT_NAMES


class Marker:
    """Unpickling this creates a marker file: the proof that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def corpus(text_corpus) -> dict[str, list]:
    return text_corpus


@pytest.fixture(scope="module")
def bert(text_bert) -> Path:
    return text_bert


@pytest.fixture(scope="module")
def teacher(bert):
    return load_teacher(bert)


def reference(folder: Path, first: list[str], second: list[str] | None = None) -> torch.Tensor:
    """transformers' own logits: its tokenizer and model, one padded batch, eval mode."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        return model.eval()(**tok(first, second, padding=True, truncation=True,
                                  return_tensors="pt")).logits


def copy_of(bert: Path, tmp_path: Path, drop: tuple[str, ...] = ()) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(bert, folder, ignore=lambda _d, names: [n for n in names if n in drop])
    return folder


def edit_config(folder: Path, **fields) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **fields}))


def test_logits_equal_transformers_on_texts_of_mixed_lengths(bert, teacher, corpus):
    texts = corpus["mixed"]
    assert len(texts) == 20 and detect_format(bert) == "huggingface-text"
    assert teacher.takes_text and teacher.class_names == NAMES and teacher.num_classes == 2
    assert teacher.meta["max_length"] == TEXT_MAX_LEN and teacher.output == "logits"
    before = teacher.runner.truncated
    z = teacher.logits(texts)
    assert teacher.runner.truncated - before >= 3  # the plot summaries are longer than 48
    want = reference(bert, texts)
    torch.testing.assert_close(z, want, atol=1e-5, rtol=1e-5)
    assert (want[:, 1] - want[:, 0]).std() > 1e-3  # the texts do get different logits


def test_sentence_pairs_equal_transformers(bert, teacher, corpus):
    a, b = corpus["mixed"][:10], corpus["mixed"][10:]
    z = teacher.logits(list(zip(a, b, strict=True)))
    torch.testing.assert_close(z, reference(bert, a, b), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(z, teacher.logits(a), atol=1e-4)  # the second text counts


def test_length_grouping_keeps_the_input_order(teacher, corpus):
    from kdcli.teachers.hf_text import TOKEN_BUDGET, plan_batches

    texts = corpus["mixed"]
    runner = teacher.runner
    lengths = [len(s) for s in runner.encode(texts)["input_ids"]]
    plan = plan_batches(lengths, budget=64)
    assert sorted(i for rows in plan for i in rows) == list(range(len(texts)))
    assert len(plan) > 2 and [i for rows in plan for i in rows] != list(range(len(texts)))
    one_by_one = torch.cat([teacher.logits([t]) for t in texts])
    runner.budget = 64  # many sub-batches of similar lengths
    try:
        grouped = teacher.logits(texts)
    finally:
        runner.budget = TOKEN_BUDGET
    torch.testing.assert_close(grouped, one_by_one, atol=1e-5, rtol=1e-5)
    assert plan_batches(lengths, group=False) == [list(range(len(texts)))]


def test_inspect_shows_the_text_classifier(bert):
    from kdcli.inspection import inspect_file

    info = inspect_file(bert)
    assert info["format"] == "huggingface-text" and info["class_names"] == NAMES
    assert info["architecture"] == ["BertForSequenceClassification"]
    assert info["max_length"] == TEXT_MAX_LEN and "tokenizer.json" in info["tokenizer_files"]


def test_a_folder_without_a_tokenizer_gets_one_line(bert, tmp_path):
    folder = copy_of(bert, tmp_path, drop=("tokenizer.json", "tokenizer_config.json"))
    with pytest.raises(FormatError, match="has no tokenizer") as e:
        load_teacher(folder)
    assert "\n" not in str(e.value)


def test_remote_code_in_config_is_refused_and_not_run(bert, tmp_path):
    folder = copy_of(bert, tmp_path)
    marker = tmp_path / "ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    edit_config(folder, auto_map={
        "AutoModelForSequenceClassification": "modeling_evil.EvilForSequenceClassification"})
    with pytest.raises(FormatError, match="asks for remote code") as e:
        load_teacher(folder)
    assert "\n" not in str(e.value) and not marker.exists()


@pytest.mark.parametrize("name", ["tokenizer.json", "vocab.pkl"])
def test_a_pickle_posing_as_the_tokenizer_is_not_unpickled(bert, tmp_path, name):
    folder = copy_of(bert, tmp_path, drop=("tokenizer.json", "tokenizer_config.json"))
    marker = tmp_path / "unpickled"
    (folder / name).write_bytes(pickle.dumps(Marker(marker), protocol=4))
    with pytest.raises(UnsafePickleError, match="never unpickles") as e:
        load_teacher(folder)
    assert "\n" not in str(e.value) and not marker.exists()
    pickle.loads((folder / name).read_bytes())  # the file was a working payload
    assert marker.exists()


def test_a_multi_label_model_is_refused_not_read_as_a_softmax(bert, tmp_path):
    folder = copy_of(bert, tmp_path)
    edit_config(folder, problem_type="multi_label_classification")
    with pytest.raises(ModelError, match="multi-label") as e:
        load_teacher(folder)
    assert "\n" not in str(e.value)


def test_an_image_checkpoint_is_still_the_image_format(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ViTForImageClassification(cfg).save_pretrained(tmp_path / "vit")
    assert detect_format(tmp_path / "vit") == "huggingface"


def test_tokenizer_files_and_templates_must_stay_in_the_folder(bert, tmp_path):
    """A tokenizer_config.json naming a file outside, or a link out of a subfolder that
    transformers reads (chat templates), is refused before transformers reads anything."""
    import json
    import shutil

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not for kdcli")
    named = tmp_path / "named"
    shutil.copytree(bert, named)
    cfg = json.loads((named / "tokenizer_config.json").read_text())
    cfg["fast_tokenizer_files"] = ["../outside/secret.txt"]
    (named / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="fast_tokenizer_files names .*not a file in the"):
        load_teacher(named)
    linked = tmp_path / "linked"
    shutil.copytree(bert, linked)
    (linked / "additional_chat_templates").mkdir()
    (linked / "additional_chat_templates" / "x.jinja").symlink_to(outside / "secret.txt")
    with pytest.raises(FormatError, match="x.jinja is a link to .*outside the checkpoint"):
        load_teacher(linked)


def test_one_string_is_not_a_batch_of_characters(teacher):
    t = teacher
    with pytest.raises(ModelError, match="takes a batch of texts, not one string"):
        t.logits("the movie was good")


def test_a_tokenizer_with_ids_beyond_the_embedding_is_refused(bert, tmp_path):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bert, bad)
    tok = json.loads((bad / "tokenizer.json").read_text())
    word = next(w for w in tok["model"]["vocab"] if w.isalpha() and len(w) > 2)
    tok["model"]["vocab"][word] = 5000  # same count, an id the embedding lacks
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(FormatError, match="ids up to 5,000"):
        load_teacher(bad)
