"""JSON Lines tables (``.jsonl``) as a data source: the same Data as the CSV of the same
table, training on scikit-learn's wine table, and one-line refusals of bad lines."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from kdcli.data.base import DataOptions
from kdcli.data.sources import load_data
from kdcli.errors import DataError
from kdcli.output import Reporter
from kdcli.students.base import Architecture
from kdcli.train import train

CULTIVARS = ["barolo", "grignolino", "barbera"]


def write_wine(folder: Path) -> dict[str, Path]:
    """scikit-learn's wine table split 60/40 (stratified), each part as ``.jsonl`` and
    ``.csv`` with the cultivar names as string labels in the first column."""
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split

    d = load_wine()
    names = [n.replace("/", "_") for n in d.feature_names]
    xtr, xte, ytr, yte = train_test_split(d.data, d.target, test_size=0.4, random_state=0,
                                          stratify=d.target)
    paths = {}
    for part, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        rows = [{"cultivar": CULTIVARS[lab], **dict(zip(names, map(float, row), strict=True))}
                for row, lab in zip(x, y, strict=True)]
        paths[f"{part}.jsonl"] = folder / f"wine-{part}.jsonl"
        paths[f"{part}.jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[f"{part}.csv"] = folder / f"wine-{part}.csv"
        with open(paths[f"{part}.csv"], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["cultivar", *names])
            w.writeheader()
            w.writerows({k: repr(v) if isinstance(v, float) else v for k, v in r.items()}
                        for r in rows)
    return paths


def test_wine_jsonl_gives_the_csvs_data_and_trains(tmp_path):
    paths = write_wine(tmp_path)
    opts = DataOptions(label_column="cultivar")
    a = load_data(str(paths["train.jsonl"]), options=opts)
    b = load_data(str(paths["train.csv"]), options=opts)
    assert a.inputs.shape == (106, 13) and a.inputs.dtype == torch.float32
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert a.class_names == b.class_names == sorted(CULTIVARS)
    assert a.feature_names == b.feature_names and a.feature_names[0] == "alcohol"

    two = DataOptions(label_column="cultivar", feature_columns=("proline", "alcohol"))
    c = load_data(f"{paths['train.jsonl']}[:5]", options=two)
    assert c.feature_names == ["proline", "alcohol"]
    assert torch.equal(c.inputs, a.inputs[:5][:, [12, 0]])

    s = train(str(paths["train.jsonl"]), arch=Architecture.parse("mlp:64,64"),
              out=tmp_path / "m.safetensors", eval_data=str(paths["test.jsonl"]),
              data_options=opts, reporter=Reporter("quiet"))
    assert s["test_errors"] <= 4, s["test_errors"]  # as the CSV gives (2 of 72 measured)


def test_integer_labels_and_blank_lines(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"a": 1, "b": 0.5, "label": 2}\n\n{"a": 2, "b": 1.5, "label": 0}\n'
                 '{"b": 2.5, "a": 3, "label": 1}')
    d = load_data(str(p))
    assert d.labels.tolist() == [2, 0, 1] and d.class_names is None
    assert d.feature_names == ["a", "b"] and d.inputs.tolist() == [[1, 0.5], [2, 1.5], [3, 2.5]]


BAD = {
    "not json": ('{"a": 1, "label": 0}\n{"a": 2, "label": 1\n', "line 2 is not JSON"),
    "not UTF-8": (b'{"a": 1, "label": 0}\n{"a": 2, "label": "\xff"}\n',
                  "line 2 is not UTF-8 text"),
    "not an object": ('{"a": 1, "label": 0}\n\n[2, 1]\n', "line 3 is a JSON array"),
    "type changes": ('{"a": 1, "label": 0}\n{"a": "2", "label": 1}\n',
                     "column 'a' holds a string on line 2 but a number on line 1"),
    "missing label": ('{"a": 1, "label": 0}\n{"a": 2}\n',
                      "column 'label' of bad.jsonl has a missing value in row 2"),
}


def test_an_absent_key_or_null_is_a_missing_number(cli, tmp_path):
    """A missing number is NaN (filled in by the student), or with --missing error refused
    naming its row."""
    for text, column in (('{"a": 1, "b": 2, "label": 0}\n{"a": 2, "label": 1}\n', 1),
                         ('{"a": 1, "label": 0}\n{"a": null, "label": 1}\n', 0)):
        (tmp_path / "gap.jsonl").write_text(text)
        d = load_data(str(tmp_path / "gap.jsonl"))
        assert torch.isnan(d.inputs[1, column]) and not torch.isnan(d.inputs[0]).any()
        r = cli("train", "--data", "gap.jsonl", "--epochs", 1, "--out", "m.safetensors",
                "--missing", "error", "--force")
        assert r.exit_code == 1 and "of gap.jsonl has a missing value in row 2" in r.stderr


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_line_is_one_line_naming_it(cli, tmp_path, case):
    text, expect = BAD[case]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(text) if isinstance(text, bytes) else bad.write_text(text)
    with pytest.raises(DataError, match="bad.jsonl"):
        load_data(str(bad))
    r = cli("train", "--data", "bad.jsonl", "--epochs", 1, "--out", "m.safetensors")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 1, r.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert expect in lines[0], lines[0]
    assert not (tmp_path / "m.safetensors").exists()
