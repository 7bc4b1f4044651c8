"""Text data: tables with --text-column (CSV, TSV, Parquet, JSON Lines), folders of .txt
files, and the rules for bad text (real Rotten Tomatoes sentences)."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import rotten_tomatoes_rows

from kdcli.data.base import DataOptions
from kdcli.data.sources import load_data
from kdcli.data.text import MAX_TEXT_BYTES, Texts
from kdcli.errors import DataError, UsageError


@pytest.fixture(scope="module")
def reviews() -> list[dict[str, str]]:
    """60 Rotten Tomatoes review sentences, fresh and rotten, some with non-ASCII letters."""
    rows = [r for r in rotten_tomatoes_rows() if r["category"] != "plot"]
    picked = rows[:50] + [r for r in rows if not r["text"].isascii()][:10]
    return [{"text": r["text"].strip(), "label": r["category"]} for r in picked]


def text_options(*columns: str, **kw) -> DataOptions:
    return DataOptions(text_columns=columns, **kw)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("kind", ["csv", "tsv", "parquet", "jsonl"])
def test_a_text_column_gives_the_texts_and_string_labels(tmp_path, reviews, kind):
    table = pa.table({"id": list(range(len(reviews))), "text": [r["text"] for r in reviews],
                      "label": [r["label"] for r in reviews]})
    path = tmp_path / f"reviews.{kind}"
    if kind == "parquet":
        pq.write_table(table, path)
    elif kind == "jsonl":
        write_jsonl(path, table.to_pylist())
    else:
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, path, pcsv.WriteOptions(delimiter="\t" if kind == "tsv" else ","))
    ds = load_data(str(path), options=text_options("text"))
    assert ds.is_text and isinstance(ds.inputs, Texts) and len(ds) == len(reviews)
    assert ds.inputs.strings() == [r["text"] for r in reviews]
    assert ds.class_names == ["fresh", "rotten"]
    assert ds.labels.tolist() == [ds.class_names.index(r["label"]) for r in reviews]
    assert ds.feature_names is None and ds.inputs.columns == ["text"]


def test_two_text_columns_are_sentence_pairs_and_slices_keep_them(tmp_path, reviews):
    rows = [{"premise": a["text"], "hypothesis": b["text"], "label": i % 3}
            for i, (a, b) in enumerate(zip(reviews, reviews[1:], strict=False))]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    ds = load_data(path + "[5:15]", options=text_options("premise", "hypothesis"))
    assert ds.inputs.pairs and len(ds) == 10
    assert ds.inputs.strings() == [(r["premise"], r["hypothesis"]) for r in rows[5:15]]
    assert ds.labels.tolist() == [r["label"] for r in rows[5:15]]
    balanced = load_data(path + "[balanced=9,seed=1]",
                         options=text_options("premise", "hypothesis"))
    assert torch.bincount(balanced.labels).tolist() == [3, 3, 3]
    by_text = {(r["premise"], r["hypothesis"]): r["label"] for r in rows}
    assert [by_text[p] for p in balanced.inputs.strings()] == balanced.labels.tolist()


def test_texts_gathered_in_any_order_pack_into_one_buffer_that_tiles():
    texts = Texts.from_strings(["naïve", "", "a longer text", "日本語"])
    picked = texts[torch.tensor([3, 0, 1])]
    buf, spans = picked.compact()
    assert bytes(buf.numpy()) == "日本語naïve".encode()
    assert spans[:, 0].tolist() == [[0, 9], [9, 15], [15, 15]]
    assert Texts(buf, spans).strings() == ["日本語", "naïve", ""]


def test_unlabelled_text_is_a_transfer_set_source(tmp_path, reviews):
    path = write_jsonl(tmp_path / "u.jsonl", [{"text": r["text"]} for r in reviews])
    ds = load_data(path, options=text_options("text"))
    assert ds.labels is None and len(ds) == len(reviews)


def make_folder(root, reviews, split: str = ""):
    base = root / split if split else root
    for i, r in enumerate(reviews):
        d = base / r["label"]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.txt").write_text(r["text"] + "\n", encoding="utf-8")
    return root


def test_a_folder_of_txt_files_per_class_is_labelled_text(tmp_path, reviews):
    folder = make_folder(tmp_path / "reviews", reviews)
    (folder / "fresh" / "notes.md").write_text("not a text of the set")
    ds = load_data(str(folder))
    assert ds.is_text and ds.class_names == ["fresh", "rotten"]
    order = sorted(range(len(reviews)), key=lambda i: i)  # named 0.txt .. N.txt
    assert ds.inputs.strings() == [reviews[i]["text"] for i in order]
    assert ds.labels.tolist() == [["fresh", "rotten"].index(reviews[i]["label"]) for i in order]


def test_the_train_and_test_folders_of_a_review_set_are_splits(tmp_path, reviews):
    root = make_folder(tmp_path / "aclImdb", reviews[:30], "train")
    make_folder(root, reviews[30:], "test")
    test = load_data(f"{root}:test")
    assert test.inputs.strings() == [r["text"] for r in reviews[30:]]
    with pytest.raises(DataError, match="no 'valid' folder|does not exist"):
        load_data(f"{root}:valid")


def test_a_flat_folder_is_unlabelled_text_and_a_bom_is_dropped(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    (folder / "2.txt").write_bytes("\ufeffSecond text.\n".encode())
    (folder / "10.txt").write_text("Tenth.")
    ds = load_data(str(folder))
    assert ds.labels is None and ds.inputs.strings() == ["Second text.", "Tenth."]


def test_a_file_that_is_not_utf8_is_named_with_its_byte(tmp_path, reviews):
    folder = make_folder(tmp_path / "r", reviews[:4])
    (folder / "fresh" / "bad.txt").write_bytes("un film très bon".encode("latin-1"))
    with pytest.raises(DataError, match=r"fresh/bad.txt.* is not UTF-8 \(byte 10"):
        load_data(str(folder))


def test_a_link_out_of_a_text_folder_is_refused_unread(tmp_path, reviews):
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    folder = make_folder(tmp_path / "r", reviews[:4])
    os.symlink(secret, folder / "fresh" / "leak.txt")
    with pytest.raises(DataError, match="outside"):
        load_data(str(folder))


def test_bad_texts_get_one_line_each(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_bytes(b"text,label\n" + b'"fine",pos\n' * 30000 + b'"caf\xe9",neg\n')
    with pytest.raises(DataError, match=r"not UTF-8 in row 30001"):
        load_data(str(csv), options=text_options("text"))
    long = write_jsonl(tmp_path / "long.jsonl",
                       [{"text": "ok"}, {"text": "x" * (MAX_TEXT_BYTES + 1)}])
    with pytest.raises(DataError, match=r"holds a text of 1,048,577 bytes in row 2"):
        load_data(long, options=text_options("text"))
    missing = write_jsonl(tmp_path / "m.jsonl", [{"text": "ok"}, {"text": None}, {"other": 1}])
    with pytest.raises(DataError, match=r"has no text in rows 2, 3"):
        load_data(missing, options=text_options("text"))
    nums = write_jsonl(tmp_path / "n.jsonl", [{"text": 1.5}, {"text": 2.0}])
    with pytest.raises(DataError, match="holds double, not text"):
        load_data(nums, options=text_options("text"))


def test_empty_texts_are_kept_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "  "}, {"text": "ok"}])
    ds = load_data(path, options=text_options("text"))
    assert ds.inputs.strings() == ["", "  ", "ok"]
    assert any("2 of 3 texts are empty or blank" in n for n in ds.notes)


def test_a_label_column_that_mixes_numbers_and_names_is_refused(tmp_path):
    csv = tmp_path / "mixed.csv"
    csv.write_text("text,label\ngood,1\nbad,0\nmeh,neutral\n")
    with pytest.raises(DataError, match=r"mixes numbers and names: '1' in row 1 \(line 2\), "
                                         r"'neutral' in row 3"):
        load_data(str(csv), options=text_options("text"))


def test_text_options_are_checked_before_reading():
    for bad in [("a", "b", "c"), ("a", "a"), ("",)]:
        with pytest.raises(UsageError, match="--text-column"):
            text_options(*bad).check()
    with pytest.raises(UsageError, match="not both"):
        DataOptions(text_columns=("t",), feature_columns=("x",)).check()


def test_a_table_of_text_without_text_column_names_the_option(tmp_path, reviews):
    path = write_jsonl(tmp_path / "r.jsonl", reviews)
    with pytest.raises(DataError, match="Pass --text-column text"):
        load_data(path)
