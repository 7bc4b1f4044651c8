"""Transfer sets of raw text: soft-targets from text teachers (a tiny BERT and a TF-IDF +
logistic-regression ONNX pipeline, built here, alone and as an ensemble across tokenizers),
read back exactly, checked strictly, sharded, inspected, and refused where text is not
taken yet."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TEXT_MAX_LEN, TEXT_NAMES
from safetensors.torch import load_file, save_file

from kdcli.errors import FormatError, UsageError
from kdcli.inspection import inspect_file
from kdcli.soft_targets import soft_targets
from kdcli.students.base import Architecture
from kdcli.teachers.formats import load_teacher
from kdcli.train import train_student
from kdcli.transfer.reader import load_transfer_set

pytest.importorskip("transformers")
skl2onnx = pytest.importorskip("skl2onnx")


@pytest.fixture(scope="module")
def texts(text_corpus) -> list[str]:
    """Reviews of mixed lengths, three long plot summaries (truncated by the BERT), an
    empty text and non-ASCII ones."""
    return text_corpus["mixed"] + ["Un film très réussi, naïf et drôle.", "日本語のレビュー"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, texts) -> str:
    """The texts as a JSON Lines table, labelled rotten/fresh (alternately)."""
    path = tmp_path_factory.mktemp("text") / "reviews.jsonl"
    path.write_text("".join(json.dumps({"review": t, "label": TEXT_NAMES[i % 2]}) + "\n"
                            for i, t in enumerate(texts)), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tfidf(text_tfidf):
    """The TF-IDF + logistic-regression ONNX pipeline of conftest (classes fresh, rotten)."""
    return text_tfidf


def write(teachers, data, out, **kw):
    return soft_targets([str(t) for t in teachers], T=kw.pop("T", 4.0), data=data, out=out,
                        data_options=kw.pop("data_options", None) or _opts("review"),
                        precision="fp32", batch_size=kw.pop("batch_size", 7), **kw)


def _opts(*columns):
    from kdcli.data.base import DataOptions

    return DataOptions(text_columns=columns)


def test_a_text_set_keeps_every_text_and_the_teachers_logits(tmp_path, text_bert, data, texts):
    out = tmp_path / "t.safetensors"
    summary = write([text_bert], data, out)
    ts = load_transfer_set(out)
    assert ts.is_text and len(ts) == len(texts)
    assert ts.texts(slice(0, len(ts))).strings() == texts
    assert ts.texts(torch.tensor([4, 0, 21])).strings() == [texts[4], texts[0], texts[21]]
    teacher = load_teacher(text_bert, precision="fp32")
    torch.testing.assert_close(ts.logits, teacher.logits(texts), atol=1e-5, rtol=1e-5)
    # labels are numbered in the teacher's order (rotten 0, fresh 1), not sorted
    assert ts.meta["class_names"] == TEXT_NAMES
    assert ts.labels.tolist() == [i % 2 for i in range(len(texts))]
    assert ts.meta["format_version"] == "4" and ts.meta["inputs"] == "text"
    assert ts.meta["text_columns"] == ["review"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(text_bert, local_files_only=True)
    longer = sum(len(ids) > TEXT_MAX_LEN for ids in tok(texts)["input_ids"])
    assert summary["teachers"][0]["truncated"] == longer >= 3  # the plot summaries too
    raw = load_file(out)
    assert set(raw) == {"text_bytes", "text_spans", "labels", "logits", "soft_targets"}
    assert bytes(raw["text_bytes"].numpy()) == "".join(texts).encode()


def test_sentence_pairs_keep_both_texts(tmp_path, text_bert, texts):
    path = tmp_path / "pairs.jsonl"
    pairs = list(zip(texts[:10], texts[5:15], strict=True))
    path.write_text("".join(json.dumps({"a": a, "b": b}) + "\n" for a, b in pairs))
    out = tmp_path / "p.safetensors"
    write([text_bert], str(path), out, data_options=_opts("a", "b"))
    ts = load_transfer_set(out)
    assert ts.texts(slice(0, 10)).strings() == pairs and not ts.has_labels
    teacher = load_teacher(text_bert, precision="fp32")
    torch.testing.assert_close(ts.logits, teacher.logits(pairs), atol=1e-5, rtol=1e-5)


def test_an_ensemble_across_tokenizers_averages_a_bert_and_a_tfidf_model(
        tmp_path, text_bert, tfidf, data, texts):
    out = tmp_path / "ens.safetensors"
    summary = write([text_bert, tfidf], data, out, T=2.0)
    ts = load_transfer_set(out)
    bert, lr = load_teacher(text_bert, precision="fp32"), load_teacher(tfidf)
    assert lr.class_names == ["fresh", "rotten"] != TEXT_NAMES
    # the TF-IDF model's columns are taken in the BERT's class order
    expected = torch.stack([bert.logits(texts), lr.logits(texts)[:, [1, 0]]])
    torch.testing.assert_close(ts.member_logits, expected, atol=1e-5, rtol=1e-5)
    mean = (expected / 2.0).softmax(-1).mean(0)
    torch.testing.assert_close(ts.soft_targets, mean, atol=1e-6, rtol=1e-5)
    assert len(summary["teachers"]) == 2 and "disagreement" in summary
    assert ts.meta["class_names"] == TEXT_NAMES
    assert ts.meta["teachers"][1]["class_order"] == [1, 0]


def test_a_sharded_text_set_equals_the_single_file(tmp_path, tfidf, data, texts):
    single, index = tmp_path / "one.safetensors", tmp_path / "set.index.json"
    write([tfidf], data, single)
    summary = write([tfidf], data, index, shard_size="3KB")
    assert summary["shards"] > 2
    a, b = load_transfer_set(single), load_transfer_set(index)
    assert b.texts(slice(0, len(b))).strings() == texts
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))
    assert b.texts(order).strings() == [texts[i] for i in order]
    torch.testing.assert_close(a.logits, b.logits)
    assert a.meta["inputs_sha256"] == b.meta["inputs_sha256"]


def test_inspect_shows_the_first_texts_and_the_teachers_top_classes(tmp_path, tfidf, data,
                                                                    texts, cli):
    out = tmp_path / "t.safetensors"
    write([tfidf], data, out)
    info = inspect_file(out, verify=True)
    assert [r["text"] for r in info["rows"]] == texts[:5]
    teacher = load_teacher(tfidf)
    probs = teacher.logits(texts[:5]).softmax(-1)
    for r, p in zip(info["rows"], probs, strict=True):
        assert r["top"][0]["name"] == teacher.class_names[int(p.argmax())]
        assert r["top"][0]["prob"] == pytest.approx(float(p.max()), abs=1e-4)
    assert info["tensors"]["text_bytes"]["shape"] == [len("".join(texts).encode())]
    shown = cli("inspect", str(out))
    assert shown.exit_code == 0 and "teacher's top classes" in shown.stdout
    assert texts[0][:20] in " ".join(shown.stdout.split())


def test_a_student_that_takes_no_text_refuses_a_text_set_in_one_line(tmp_path, tfidf, data,
                                                                    cli):
    out = tmp_path / "t.safetensors"
    write([tfidf], data, out)
    with pytest.raises(UsageError, match="holds texts, but mlp:8 does not take text"):
        train_student(out, arch=Architecture.parse("mlp:8"), out=tmp_path / "s.safetensors")
    r = cli("train-student", "--transfer", str(out), "--out", str(tmp_path / "s.safetensors"))
    assert r.exit_code == 1 and r.stderr.strip().splitlines() == [
        f"Error: {out} holds texts, but mlp:300,300 does not take text. Use a text student, "
        "e.g. --arch bow:64"]
    assert not (tmp_path / "s.safetensors").exists()
    from kdcli.errors import DataError

    with pytest.raises(DataError, match="is a transfer set of texts"):
        soft_targets([str(tfidf)], data=str(out), out=tmp_path / "again.safetensors")


def test_a_text_teacher_on_images_and_augmentation_of_the_wrong_kind_are_refused(
        tmp_path, tfidf, teacher_file, data):
    from kdcli.data.text_augment import TextAugment
    from kdcli.errors import ModelError

    with pytest.raises(ModelError, match="takes text, but the data holds examples of shape"):
        soft_targets([str(tfidf)], data="mnist:test[:20]", out=tmp_path / "x.safetensors")
    with pytest.raises(UsageError, match="--jitter, --crop-pad and --flip augment images"):
        write([tfidf], data, tmp_path / "y.safetensors", copies=1, jitter=1)
    with pytest.raises(UsageError, match="augment texts, but mnist"):
        soft_targets([str(teacher_file)], data="mnist:test[:20]", out=tmp_path / "z.safetensors",
                     copies=1, text_augment=TextAugment(mask=0.1))
    with pytest.raises(UsageError, match="must be a probability in"):
        write([tfidf], data, tmp_path / "w.safetensors", copies=1,
              text_augment=TextAugment(ngram=1.5))
    assert not list(tmp_path.glob("*.safetensors"))


def test_augmented_copies_of_texts_follow_tang_et_al_and_are_reproducible(tmp_path, tfidf,
                                                                         data, texts):
    from kdcli.data.text_augment import MASK, TextAugment

    aug = TextAugment(mask=0.1, replace=0.1, ngram=0.25)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.index.json"
    write([tfidf], data, a, copies=3, text_augment=aug, seed=7)
    write([tfidf], data, b, copies=3, text_augment=aug, seed=7, batch_size=5, shard_size="4KB")
    ta, tb = load_transfer_set(a), load_transfer_set(b)
    n = len(texts)
    got = ta.texts(slice(0, len(ta))).strings()
    assert len(ta) == 4 * n and got[:n] == texts  # the originals, then each copy
    assert tb.texts(slice(0, len(tb))).strings() == got  # any batching, any shards
    assert ta.labels.tolist() == ta.labels[:n].tolist() * 4
    torch.testing.assert_close(ta.logits, load_teacher(tfidf).logits(got)[:, [0, 1]])
    copies = got[n:]
    words = sum(len(t.split()) for t in texts if len(t.split()) > 5)
    masked = sum(t.split().count(MASK) for t in copies)
    assert 0.03 * 3 * words < masked < 0.12 * 3 * words  # about 0.1 of the words, some cut
    short = sum(1 for t, c in zip(texts * 3, copies, strict=True)
                if len(t.split()) > 5 and len(c.split()) <= 5)
    assert 0.1 * 3 * n < short < 0.45 * 3 * n  # n-gram windows of 1 to 5 words, p 0.25
    assert ta.meta["text_augment"] == json.dumps(aug.settings()) and ta.meta["copies"] == "3"
    other = tmp_path / "c.safetensors"
    write([tfidf], data, other, copies=3, text_augment=aug, seed=8)
    assert load_transfer_set(other).texts(slice(n, 4 * n)).strings() != copies


def tampered(tmp_path, source, **change):
    """A copy of the text set ``source`` with tensors or metadata changed (and its
    checksums left stale: the structural checks come first)."""
    from safetensors import safe_open

    with safe_open(str(source), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(source)
    for k, v in change.items():
        if k.startswith("meta_"):
            meta[k[5:]] = v
        elif v is None:
            tensors.pop(k)
        else:
            tensors[k] = v
    out = tmp_path / "bad.safetensors"
    save_file(tensors, out, metadata=meta)
    return out


@pytest.mark.parametrize("what,error", [
    ("gap", "text 1 of row 2 spans bytes .* which do not follow the text before it"),
    ("overlong", "the texts end at byte"),
    ("bad_utf8", "text_bytes is not UTF-8 at byte"),
    ("mid_char", "starts inside a UTF-8 character"),
    ("shape", r"text_spans has shape \(\d+, 3, 2\)"),
    ("no_kind", "holds text_bytes, text_spans but does not record text inputs"),
    ("old_version", "from version 4, but is version 3"),
    ("no_bytes", "lacks the tensor"),
    ("columns", "text_columns .* does not name the 1 texts of a row"),
])
def test_the_reader_checks_every_promise_of_a_text_set(tmp_path, tfidf, data, texts,
                                                      what, error):
    out = tmp_path / "t.safetensors"
    write([tfidf], data, out)
    raw = load_file(out)
    buf, spans = raw["text_bytes"], raw["text_spans"]
    change = {
        "gap": {"text_spans": spans.clone().index_put_((torch.tensor([2]),), spans[2] + 1)},
        "overlong": {"text_bytes": torch.cat([buf, torch.tensor([65], dtype=torch.uint8)])},
        "bad_utf8": {"text_bytes": buf.clone().index_fill_(0, torch.tensor([3]), 0xFF)},
        "mid_char": {},
        "shape": {"text_spans": spans.repeat(1, 3, 1)},
        "no_kind": {"meta_inputs": "tensor"},
        "old_version": {"meta_format_version": "3"},
        "no_bytes": {"text_bytes": None},
        "columns": {"meta_text_columns": json.dumps(["a", "b"])},
    }[what]
    if what == "mid_char":  # move a boundary into the 3-byte character 日
        i = next(i for i, t in enumerate(texts) if t.startswith("日"))
        s = spans.clone()
        s[i - 1, 0, 1] += 1
        s[i, 0, 0] += 1
        change = {"text_spans": s}
    with pytest.raises(FormatError, match=error):
        load_transfer_set(tampered(tmp_path, out, **change), verify=False)


def test_the_checksum_covers_the_texts(tmp_path, tfidf, data):
    out = tmp_path / "t.safetensors"
    write([tfidf], data, out)
    raw = bytearray(out.read_bytes())
    text = b"Un film"
    at = raw.index(text)
    raw[at:at + 2] = b"Ux"
    out.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="fails its checksum"):
        load_transfer_set(out)


def test_eval_reads_text_and_takes_each_models_classes_in_one_order(text_bert, tfidf, data,
                                                                   texts):
    from kdcli.evaluate import evaluate

    result = evaluate([str(text_bert), str(tfidf)], data=data, data_options=_opts("review"))
    assert result["class_names"] == TEXT_NAMES
    labels = torch.tensor([i % 2 for i in range(len(texts))])  # rotten, fresh, ...
    bert, lr = load_teacher(text_bert, precision="fp32"), load_teacher(tfidf)
    for got, logits in zip(result["models"], [bert.logits(texts), lr.logits(texts)[:, [1, 0]]],
                           strict=True):
        assert got["errors"] == int((logits.argmax(-1) != labels).sum())
        assert got["ms_per_text_1"] > 0 and got["ms_per_text_64"] > 0  # text: latency too
    assert result["models"][0]["file_bytes"] > 10_000  # the folder's files, not its entry


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_ranks_write_the_same_text_set_as_one_process(tmp_path, tfidf, data, texts):
    from test_distributed import torchrun

    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    write([tfidf], data, one)
    r = torchrun("soft-targets", tfidf, "--data", data, "--text-column", "review", "--T", "4",
                 "--batch-size", "7", "--precision", "fp32", "-q", "--out", two)
    assert r.returncode == 0, r.stderr
    a, b = load_transfer_set(one), load_transfer_set(two)
    assert b.texts(slice(0, len(b))).strings() == texts
    assert torch.equal(a.columns["text_spans"].whole(), b.columns["text_spans"].whole())
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "two.safetensors"]
