"""Tables as pandas writes them (issue 26's bugs): missing labels, the index column, columns
in another order than the teacher's, text/category/date columns, unlabelled and partial
test sets, and a failed run's checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kdcli.data.base import DataOptions
from kdcli.data.sources import load_data
from kdcli.errors import DataError, ModelError, UsageError
from kdcli.evaluate import evaluate
from kdcli.output import Reporter
from kdcli.soft_targets import soft_targets
from kdcli.students.base import Architecture
from kdcli.train import TrainConfig, train, train_student
from kdcli.training import loop
from kdcli.training.checkpoint import checkpoint_path

pd = pytest.importorskip("pandas")

QUIET = Reporter("quiet")
TARGET = DataOptions(label_column="target")
SMALL = Architecture.parse("mlp:32")


def wine(folder: Path) -> tuple[object, object]:
    """scikit-learn's wine table as a DataFrame with class names (a, b, c) in ``target``,
    split 60/40 as a user does (the index keeps the original row numbers)."""
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split

    frame = load_wine(as_frame=True).frame
    frame["target"] = frame["target"].map({0: "a", 1: "b", 2: "c"})
    return train_test_split(frame, test_size=0.4, random_state=0, stratify=frame["target"])


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, Path]:
    """Wine tables written with pandas, and a kdcli teacher trained on the train table."""
    d = tmp_path_factory.mktemp("wine")
    tr, te = wine(d)
    paths = {k: d / f"{k}.csv" for k in ("train", "test", "reversed", "no_c")}
    tr.to_csv(paths["train"], index=False)
    te.to_csv(paths["test"], index=False)
    cols = [c for c in te.columns if c != "target"]
    te[["target", *cols[::-1]]].to_csv(paths["reversed"], index=False)
    te[te.target != "c"].to_csv(paths["no_c"], index=False)
    paths["teacher"] = d / "teacher.safetensors"
    train(str(paths["train"]), arch=SMALL, out=paths["teacher"], eval_data=None,
          config=TrainConfig(epochs=20), data_options=TARGET, reporter=QUIET)
    return paths


def test_missing_labels_are_an_error_naming_the_rows(tmp_path, cli):
    tr, _ = wine(tmp_path)
    tr = tr.reset_index(drop=True)
    tr.loc[[3, 7], "target"] = None  # pandas writes an empty field
    tr.to_csv(tmp_path / "gaps.csv", index=False)
    with pytest.raises(DataError, match=r"'target' .* empty in rows 4, 8 \(lines 5, 9\)"):
        load_data(str(tmp_path / "gaps.csv"), options=TARGET)
    r = cli("train", "--data", "gaps.csv", "--label-column", "target", "--dry-run",
            "--out", "m.safetensors")
    assert r.exit_code == 1 and "rows 4, 8" in r.stderr
    # a numeric label column's empty field is a missing value, named the same way
    (tmp_path / "num.csv").write_text("a,label\n1,0\n2,\n3,1\n4,\n")
    with pytest.raises(DataError, match=r"missing value in rows 2, 4"):
        load_data(str(tmp_path / "num.csv"))


def test_pandas_index_column_is_left_out_and_said_once(tmp_path, cli):
    tr, _ = wine(tmp_path)
    tr.to_csv(tmp_path / "split.csv")  # the index: the rows the split kept, shuffled
    tr.reset_index(drop=True).to_csv(tmp_path / "whole.csv")  # the index: 0..N-1
    for name in ("split.csv", "whole.csv"):
        d = load_data(str(tmp_path / name), options=TARGET)
        assert d.feature_names[0] == "alcohol" and "" not in d.feature_names
        assert d.inputs.shape == (106, 13)
        assert len(d.notes) == 1 and "unnamed first column" in d.notes[0]
    r = cli("train", "--data", "split.csv", "--label-column", "target", "--dry-run",
            "--out", "m.safetensors")
    assert r.exit_code == 0 and r.stderr.count("unnamed first column") == 1
    # a named first column, or an unnamed one that is not distinct whole numbers, is kept
    (tmp_path / "id.csv").write_text("id,a,label\n0,1.5,0\n1,2.5,1\n")
    (tmp_path / "x.csv").write_text(",a,label\n0.5,1.5,0\n1.5,2.5,1\n")
    assert load_data(str(tmp_path / "id.csv")).feature_names == ["id", "a"]
    assert load_data(str(tmp_path / "x.csv")).feature_names == ["", "a"]
    # to_parquet keeps the split's index as a column and records it as the index
    tr.to_parquet(tmp_path / "split.parquet")
    d = load_data(str(tmp_path / "split.parquet"), options=TARGET)
    assert "__index_level_0__" not in d.feature_names and d.inputs.shape == (106, 13)
    assert len(d.notes) == 1 and "__index_level_0__" in d.notes[0]


def test_a_teacher_gets_the_tables_columns_by_name(tables, tmp_path):
    teacher = tables["teacher"]
    same = evaluate([teacher], str(tables["test"]), data_options=TARGET, reporter=QUIET)
    rev = evaluate([teacher], str(tables["reversed"]), data_options=TARGET, reporter=QUIET)
    assert same["models"][0]["errors"] == rev["models"][0]["errors"] <= 6
    a = soft_targets([teacher], data=str(tables["test"]), out=tmp_path / "a.safetensors",
                     data_options=TARGET)
    b = soft_targets([teacher], data=str(tables["reversed"]), out=tmp_path / "b.safetensors",
                     data_options=TARGET)
    assert a["teachers"][0]["accuracy"] == b["teachers"][0]["accuracy"] >= 0.9
    # a column the teacher takes that the data lacks is named
    import csv

    with open(tables["reversed"], newline="") as f:
        rows = list(csv.reader(f))
    lacking = tmp_path / "lacking.csv"
    with open(lacking, "w", newline="") as f:
        csv.writer(f).writerows([r[:-2] + r[-1:] for r in rows])  # drop the second-to-last
    with pytest.raises(DataError, match=f"no column {rows[0][-2]}, which model teacher"):
        evaluate([teacher], str(lacking), data_options=TARGET, reporter=QUIET)
    # columns the user chose with --feature-columns go by position: their order is the
    # user's word (a header in other case still works)
    few = DataOptions(label_column="target", feature_columns=("alcohol", "ash"))
    with pytest.raises(ModelError, match="takes rows of 13 columns, but the data has 2"):
        evaluate([teacher], str(tables["reversed"]), data_options=few, reporter=QUIET)
    # a teacher that records no names (or data without names) keeps the position
    from kdcli.teachers.inputs import match_columns

    assert match_columns(None, ["b", "a"], "t") is None
    assert match_columns(["a", "b"], None, "t") is None
    assert match_columns(["a", "b"], ["a", "b"], "t") is None
    assert match_columns(["a", "b"], ["b", "x", "a"], "t") == (2, 0)


def test_train_student_eval_data_reads_the_recorded_label_column(tables, tmp_path):
    ts = tmp_path / "ts.safetensors"
    soft_targets([tables["teacher"]], data=str(tables["train"]), out=ts, data_options=TARGET)
    s = train_student(ts, arch=SMALL, out=tmp_path / "s.safetensors",
                      eval_data=str(tables["reversed"]), config=TrainConfig(epochs=5),
                      reporter=QUIET)
    assert s["test_errors"] <= 20
    none = DataOptions(label_column="none")
    with pytest.raises(UsageError, match="--label-column target"):
        train_student(ts, arch=SMALL, out=tmp_path / "s2.safetensors",
                      eval_data=str(tables["test"]), config=TrainConfig(epochs=1),
                      reporter=QUIET, data_options=none)


def test_text_and_date_columns_are_left_out_unless_asked_for(tmp_path):
    """Identifiers, text and dates are left out by default and said once; categories are
    features (see tests/test_table_columns.py); a date named as a feature is refused."""
    import datetime

    n = 30
    frame = pd.DataFrame({"a": np.arange(n) / 2, "name": [f"w{i}" for i in range(n)],
                          "kind": pd.Categorical(["p", "q"] * (n // 2)),
                          "when": [datetime.date(2014, 9, 16)] * n, "label": [0, 1] * (n // 2)})
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    frame.to_csv(tmp_path / "t.csv", index=False)
    for name in ("t.parquet", "t.csv"):
        d = load_data(str(tmp_path / name))
        assert d.feature_names == ["a", "kind"] and d.labels.tolist() == [0, 1] * (n // 2)
        assert d.categories == {"kind": ["p", "q"]}
        assert len(d.notes) == 1 and "name, when" in d.notes[0]
    with pytest.raises(DataError) as e:
        load_data(str(tmp_path / "t.parquet"), options=DataOptions(feature_columns=("a", "when")))
    text = f"{e.value.message} {e.value.hint}"
    assert "'when'" in text and "dates" in text and "--feature-columns" in text
    assert "datetime" not in text
    named = load_data(str(tmp_path / "t.parquet"), options=DataOptions(feature_columns=("name",)))
    assert len(named.categories["name"]) == n  # named: a category, however many


def test_no_labels_names_the_label_column_option(tables, tmp_path):
    with pytest.raises(UsageError) as e:
        train(str(tables["train"]), arch=SMALL, out=tmp_path / "m.safetensors",
              eval_data=None, reporter=QUIET)
    assert "'target'" not in e.value.message and "target looks like" in e.value.message
    assert "--label-column target" in e.value.hint
    (tmp_path / "u.csv").write_text("a,b\n1,2\n3,4\n")
    with pytest.raises(DataError, match="has no labels") as e:
        evaluate([tables["teacher"]], str(tmp_path / "u.csv"), reporter=QUIET)
    assert "--label-column" in e.value.hint


def test_eval_on_a_test_set_lacking_a_class(tables):
    full = evaluate([tables["teacher"]], str(tables["test"]), data_options=TARGET,
                    reporter=QUIET)
    part = evaluate([tables["teacher"]], str(tables["no_c"]), data_options=TARGET,
                    reporter=QUIET)
    assert part["absent_classes"] == ["c"] and part["class_names"] == ["a", "b", "c"]
    assert part["models"][0]["examples"] == 53 and full["absent_classes"] == []
    assert part["models"][0]["errors"] <= full["models"][0]["errors"]


def test_an_onnx_classifier_on_a_test_set_lacking_a_class_aligns_by_its_labels(tmp_path):
    """skl2onnx records the class labels in the graph, not in the metadata: eval must still
    number the data's classes by them (before: 2% accuracy, no warning)."""
    import numpy as np
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tr, te = wine(tmp_path)
    x = tr.drop(columns="target").to_numpy(np.float32)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, tr.target)
    model = tmp_path / "lr.onnx"
    model.write_bytes(to_onnx(clf, x[:1], options={id(clf[-1]): {"zipmap": False}})
                      .SerializeToString())
    te[te.target != "a"].to_csv(tmp_path / "no_a.csv", index=False)
    r = evaluate([str(model)], str(tmp_path / "no_a.csv"), data_options=TARGET,
                 reporter=QUIET)
    assert r["absent_classes"] == ["a"] and r["class_names"] == ["a", "b", "c"]
    assert r["models"][0]["accuracy"] >= 0.9


def test_a_failed_runs_checkpoint_does_not_block_a_retry(tables, tmp_path, monkeypatch):
    out = tmp_path / "m.safetensors"
    kw = {"arch": SMALL, "out": out, "eval_data": None, "data_options": TARGET,
          "reporter": QUIET}
    train(str(tables["train"]), config=TrainConfig(epochs=4, stop_after=1), **kw)
    assert checkpoint_path(out).exists()
    with pytest.raises(UsageError) as e:  # other options, with --resume
        train(str(tables["train"]), config=TrainConfig(epochs=4, lr=0.01), resume=True, **kw)
    assert "--force" in e.value.hint
    # a run that diverges leaves no checkpoint: it would only diverge again
    monkeypatch.setattr(loop, "_blew_up", lambda loss, first, history: len(history) >= 2)
    with pytest.raises(UsageError, match="diverged"):
        train(str(tables["train"]), config=TrainConfig(epochs=4), force=True, **kw)
    assert not checkpoint_path(out).exists() and not out.exists()
    monkeypatch.undo()
    train(str(tables["train"]), config=TrainConfig(epochs=2, lr=0.05), **kw)
    assert out.exists()


def test_an_onnx_teacher_that_records_feature_names_gets_them_by_name(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g",
                              [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"feature_names": '["a", "b"]'})  # as kdcli export does
    onnx.save(model, tmp_path / "m.onnx")
    # the class is the larger of a and b; the table has them as b, a
    (tmp_path / "t.csv").write_text("b,a,label\n0,5,0\n9,1,1\n2,7,0\n8,3,1\n")
    r = evaluate([tmp_path / "m.onnx"], str(tmp_path / "t.csv"), reporter=QUIET)
    assert r["models"][0]["errors"] == 0  # by position: 4 errors
