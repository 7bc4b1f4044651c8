"""Tables as a data scientist has them: category columns and missing numbers read, encoded
inside the student and its ONNX graph, teachers that take one input per column (a skl2onnx
pipeline), transfer sets of version 5. Real data: the Palmer penguins (344 rows, two
category columns, missing values), which ships inside the palmerpenguins package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from kdcli.data.base import DataOptions
from kdcli.data.sources import load_data
from kdcli.errors import DataError, FormatError, ModelError
from kdcli.students.table_encoding import EncodeTable, TableEncoding

pd = pytest.importorskip("pandas")

CATS = ["island", "sex"]
SPECIES = DataOptions(label_column="species")


@pytest.fixture(scope="module")
def penguins(tmp_path_factory) -> Path:
    """The penguins split in two CSV files (train: 240 rows, test: 104), as pandas
    writes them (its NA for missing values)."""
    penguins = pytest.importorskip("palmerpenguins")
    df = penguins.load_penguins()
    idx = np.random.default_rng(0).permutation(len(df))
    d = tmp_path_factory.mktemp("penguins")
    df.iloc[idx[:240]].to_csv(d / "train.csv", index=False)
    df.iloc[idx[240:]].to_csv(d / "test.csv", index=False)
    return d


def _frame(df):
    """The features as a DataFrame of str categories ("" for missing) and float32 numbers."""
    X = df.drop(columns="species")
    X[CATS] = X[CATS].fillna("")
    return X.astype({c: str if c in CATS else np.float32 for c in X.columns})


@pytest.fixture(scope="module")
def pipeline_teacher(penguins) -> tuple[Path, np.ndarray]:
    """A scikit-learn pipeline as people deploy one trained on a DataFrame: a
    ColumnTransformer (OneHotEncoder; SimpleImputer + StandardScaler) before a logistic
    regression, exported by skl2onnx with one input per column. Returns the file and
    scikit-learn's own test-set probabilities."""
    pytest.importorskip("skl2onnx")
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    tr, te = pd.read_csv(penguins / "train.csv"), pd.read_csv(penguins / "test.csv")
    X = _frame(tr)
    nums = [c for c in X.columns if c not in CATS]
    pipe = Pipeline([("cols", ColumnTransformer([
        ("cat", OneHotEncoder(handle_unknown="ignore"), CATS),
        ("num", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), nums)])),
        ("model", LogisticRegression(max_iter=1000))])
    pipe.fit(X, tr.species)
    types = [(c, StringTensorType([None, 1]) if c in CATS else FloatTensorType([None, 1]))
             for c in X.columns]
    onx = convert_sklearn(pipe, initial_types=types, target_opset=17,
                          options={id(pipe): {"zipmap": False}})
    path = penguins / "pipeline.onnx"
    path.write_bytes(onx.SerializeToString())
    return path, pipe.predict_proba(_frame(te))


# --- reading ------------------------------------------------------------------------------

def test_categories_and_missing_numbers_are_features(penguins):
    ds = load_data(str(penguins / "train.csv"), options=SPECIES)
    assert ds.feature_names == ["island", "bill_length_mm", "bill_depth_mm",
                                "flipper_length_mm", "body_mass_g", "sex", "year"]
    assert ds.categories["island"] == ["Biscoe", "Dream", "Torgersen"]
    assert ds.categories["sex"][0] == ""  # a missing category is the category ""
    raw = pd.read_csv(penguins / "train.csv")
    got = [ds.categories["island"][int(c)] for c in ds.inputs[:, 0]]
    assert got == list(raw.island)
    missing = torch.isnan(ds.inputs[:, 1]).numpy()
    assert (missing == raw.bill_length_mm.isna().to_numpy()).all() and missing.any()


def test_missing_error_refuses_naming_the_row(penguins):
    with pytest.raises(DataError, match=r"column 'bill_length_mm' .* missing value in row"):
        load_data(str(penguins / "train.csv"),
                  options=DataOptions(label_column="species", missing="error"))


def test_identifiers_and_dates_are_left_out_and_said(tmp_path):
    n = 40
    pd.DataFrame({"id": [f"user-{i}" for i in range(n)], "colour": ["red", "blue"] * 20,
                  "when": pd.date_range("2024-01-01", periods=n).date, "x": np.arange(n) / 3,
                  "ok": [True, False, None, True] * 10, "label": [0, 1] * 20}
                 ).to_parquet(tmp_path / "t.parquet")
    ds = load_data(str(tmp_path / "t.parquet"))
    assert ds.feature_names == ["colour", "x", "ok"]
    assert ds.categories == {"colour": ["blue", "red"]}
    assert torch.isnan(ds.inputs[2::4, 2]).all()  # a missing boolean is a missing number
    assert any("left out 2 columns" in n and "id, when" in n for n in ds.notes)
    with pytest.raises(DataError, match="'when'.*dates"):
        load_data(str(tmp_path / "t.parquet"), options=DataOptions(feature_columns=("when",)))


def test_pandas_category_columns_are_categories(tmp_path):
    df = pd.DataFrame({"c": pd.Categorical(["a", "b", None, "a"]), "x": [1.0, 2, 3, 4],
                       "label": [0, 1, 0, 1]})
    df.to_parquet(tmp_path / "t.parquet")
    ds = load_data(str(tmp_path / "t.parquet"))
    assert ds.categories == {"c": ["", "a", "b"]}
    assert ds.inputs[:, 0].tolist() == [1, 2, 0, 1]


def test_infinity_is_still_refused(tmp_path):
    (tmp_path / "t.csv").write_text("x,label\n1,0\ninf,1\n")
    with pytest.raises(DataError, match="infinite"):
        load_data(str(tmp_path / "t.csv"))


# --- the encoding -------------------------------------------------------------------------

def test_encoding_fills_medians_flags_missing_and_one_hots():
    x = torch.tensor([[1.0, 0], [float("nan"), 1], [5.0, 2], [3.0, 2]])
    enc = TableEncoding.fit(x, ["n", "c"], {"c": ["a", "b", "z"]}, max_categories=2)
    n, c = enc.columns
    assert (n.fill, n.indicator) == (3.0, True)
    assert c.categories == ("z",) and c.other  # z is the most frequent; a, b share "other"
    rows = enc.recode(x, {"c": ["a", "b", "z"]})
    out = EncodeTable(enc)(rows)
    filled = torch.tensor([1.0, 3, 5, 3])
    std = filled.std(unbiased=False)
    assert torch.allclose(out[:, 0], (filled - filled.mean()) / std)
    assert out[:, 1].tolist() == [0, 1, 0, 0]  # was missing
    assert out[:, 2:].tolist() == [[0, 1], [0, 1], [1, 0], [1, 0]]  # z | other
    # a category never seen in training goes to "other" (or nowhere without one)
    unseen = enc.recode(torch.tensor([[1.0, 0]]), {"c": ["new"]})
    assert EncodeTable(enc)(unseen)[0, 2:].tolist() == [0, 1]
    plain = TableEncoding.fit(x, ["n", "c"], {"c": ["a", "b", "z"]})
    assert EncodeTable(plain)(plain.recode(torch.tensor([[1.0, 0]]), {"c": ["new"]}))[
        0, 2:].tolist() == [0, 0, 0]
    assert TableEncoding.from_json(json.loads(json.dumps(enc.to_json()))) == enc


def test_a_damaged_encoding_is_refused():
    with pytest.raises(FormatError, match="table encoding"):
        TableEncoding.from_json({"columns": [{"name": "x", "kind": "number", "fill": 0,
                                              "mean": 0, "std": 0, "indicator": False}]})


# --- teachers, transfer sets, students and export ------------------------------------------

def test_pipeline_teacher_distilled_into_a_student_that_takes_raw_columns(
        penguins, pipeline_teacher, tmp_path):
    from kdcli.evaluate import evaluate
    from kdcli.export import main_export
    from kdcli.soft_targets import soft_targets
    from kdcli.train import train_student
    from kdcli.transfer.reader import load_transfer_set

    teacher, sk_probs = pipeline_teacher
    test = str(penguins / "test.csv")
    # the pipeline, fed column by column by kdcli, gives scikit-learn's own probabilities
    from kdcli.data.base import table_columns
    from kdcli.teachers.formats import load_teacher

    ds = load_data(test, options=SPECIES)
    t = load_teacher(teacher, table=table_columns(ds, SPECIES))
    probs = torch.softmax(t.logits(ds.inputs), -1).numpy()
    assert np.allclose(probs, sk_probs, atol=1e-4)

    ts_path = tmp_path / "ts.safetensors"
    soft_targets([teacher], data=str(penguins / "train.csv"), out=ts_path, T=2.0,
                 data_options=SPECIES)
    ts = load_transfer_set(ts_path)
    assert ts.meta["format_version"] == "5" and ts.meta["categories"]["island"] == [
        "Biscoe", "Dream", "Torgersen"]
    from kdcli.inspection import inspect_file

    assert inspect_file(ts_path)["categories"]["sex"] == ["", "female", "male"]
    from kdcli.config import TrainConfig
    from kdcli.students.base import Architecture

    train_student(ts_path, arch=Architecture.parse("mlp:32"), out=tmp_path / "s.kdcli",
                  config=TrainConfig(epochs=40, lr=0.05, precision="fp32"), eval_data=test,
                  data_options=SPECIES)
    report = main_export(tmp_path / "s.kdcli", tmp_path / "s.onnx", data=test,
                         data_options=SPECIES)
    assert report["agreement"] == 1.0 and report["max_abs_diff"] < 1e-4
    sess = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ds.feature_names
    assert sess.get_inputs()[0].type == "tensor(string)"
    # a raw row with a missing number and a category never seen in training
    row = {i.name: np.array([["Atlantis" if i.name == "island" else "female"]], dtype=object)
           if i.type == "tensor(string)" else np.array([[np.nan]], dtype=np.float32)
           for i in sess.get_inputs()}
    assert np.isfinite(sess.run(None, row)[0]).all()
    shown = inspect_file(tmp_path / "s.kdcli")
    assert shown["preprocessing"]["table"]["columns"][0]["categories"] == [
        "Biscoe", "Dream", "Torgersen"]
    result = evaluate([str(teacher), str(tmp_path / "s.kdcli"), str(tmp_path / "s.onnx")],
                      test, data_options=SPECIES)
    errors = [m["errors"] for m in result["models"]]
    assert errors[1] == errors[2] and errors[1] <= 8  # 104 test rows
    params = [m["params"] for m in result["models"]]
    assert params[1] == params[2]  # the encoding's constants are not parameters


def test_a_test_set_with_other_categories_is_recoded(penguins, tmp_path):
    """A kdcli model's categories are its own: a test file whose columns hold fewer or other
    categories (so other codes) gives the same predictions row for row."""
    from kdcli.config import TrainConfig
    from kdcli.data.base import table_columns
    from kdcli.students.base import Architecture
    from kdcli.teachers.formats import load_teacher
    from kdcli.train import train

    train(str(penguins / "train.csv"), arch=Architecture.parse("mlp:16"), out=tmp_path / "m.kdcli",
          config=TrainConfig(epochs=5, precision="fp32"), data_options=SPECIES,
          eval_data="none")
    full = load_data(str(penguins / "test.csv"), options=SPECIES)
    raw = pd.read_csv(penguins / "test.csv")
    biscoe = raw[raw.island == "Biscoe"]  # one island: its code is 0, not Biscoe's 0 of 3
    biscoe.iloc[:, ::-1].to_csv(tmp_path / "b.csv", index=False)  # columns reversed, too
    part = load_data(str(tmp_path / "b.csv"), options=SPECIES)
    assert part.categories["island"] == ["Biscoe"]
    z_full = load_teacher(tmp_path / "m.kdcli", table=table_columns(full, SPECIES)).logits(
        full.inputs)
    z_part = load_teacher(tmp_path / "m.kdcli", table=table_columns(part, SPECIES)).logits(
        part.inputs)
    rows = torch.tensor((raw.island == "Biscoe").to_numpy())
    assert torch.allclose(z_full[rows], z_part, atol=1e-5)


def test_a_teacher_of_numbers_gets_the_number_columns(penguins, tmp_path):
    """A plain ONNX model of one float input (a booster, say) is given the number columns,
    and told so; a category column named for it is refused with its name."""
    pytest.importorskip("skl2onnx")
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    from kdcli.data.base import table_columns
    from kdcli.teachers.formats import load_teacher

    ds = load_data(str(penguins / "train.csv"), options=SPECIES)
    numbers = [j for j, c in enumerate(ds.feature_names) if c not in CATS]
    X = np.nan_to_num(ds.inputs[:, numbers].numpy())
    lr = LogisticRegression(max_iter=500).fit(X, ds.labels.numpy())
    path = tmp_path / "lr.onnx"
    path.write_bytes(to_onnx(lr, X[:1], options={"zipmap": False}).SerializeToString())
    t = load_teacher(path, probe=ds.inputs[:8], table=table_columns(ds, SPECIES))
    assert t.columns == tuple(numbers) and any("number columns" in n for n in t.notes)
    opts = DataOptions(label_column="species", feature_columns=("island", "year"))
    named = load_data(str(penguins / "train.csv"), options=opts)
    with pytest.raises(ModelError, match="'island' holds categories"):
        load_teacher(path, probe=named.inputs[:8], table=table_columns(named, opts))


def test_transfer_set_codes_are_checked(penguins, pipeline_teacher, tmp_path):
    """A version-5 set whose category codes leave their categories, or an older version
    that records categories, is refused naming what is wrong."""
    from safetensors import safe_open

    from kdcli.soft_targets import soft_targets
    from kdcli.transfer.reader import load_transfer_set

    ts_path = tmp_path / "ts.safetensors"
    soft_targets([pipeline_teacher[0]], data=str(penguins / "train.csv"), out=ts_path,
                 data_options=SPECIES)
    with safe_open(str(ts_path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    tensors["inputs"][3, 0] = 7.0  # island has 3 categories
    with pytest.raises(FormatError, match="'island' outside its 3 categories"):
        load_transfer_set(_resave(tensors, meta, tmp_path / "bad.safetensors"))
    tensors["inputs"][3, 0] = 1.0
    with pytest.raises(FormatError, match="categories, which .* from version 5"):
        load_transfer_set(_resave(tensors, dict(meta, format_version="4"),
                                  tmp_path / "old.safetensors"))
    names = json.loads(meta["feature_names"])
    for wrong, expect in ((names[:6], "6 feature_names for inputs of 7 columns"),
                          (names[:6] + names[:1], "name a column twice")):
        with pytest.raises(FormatError, match=expect):
            load_transfer_set(_resave(tensors, dict(meta, feature_names=json.dumps(wrong)),
                                      tmp_path / "names.safetensors"))


def _resave(tensors, meta, path):
    """Save a changed set with the checksums a writer would give it."""
    import hashlib

    from safetensors.torch import save_file

    from kdcli.io.storage import data_sha256, read_safetensors

    meta = {k: v for k, v in meta.items() if k != "data_sha256"}
    meta["inputs_sha256"] = hashlib.sha256(tensors["inputs"].numpy().tobytes()).hexdigest()
    save_file(tensors, str(path), metadata=meta)
    _, _, mapped = read_safetensors(path)
    meta["data_sha256"] = data_sha256(mapped)
    save_file(tensors, str(path), metadata=meta)
    return path


def test_calibrate_bias_on_a_table_student_with_categories(penguins, tmp_path):
    """calibrate-bias reads the table by the student's columns and codes: the calibrated
    mean prediction meets the label distribution, and the file still exports."""
    from kdcli.calibrate import calibrate_bias
    from kdcli.config import TrainConfig
    from kdcli.export import main_export
    from kdcli.students.base import Architecture
    from kdcli.train import train

    train(str(penguins / "train.csv"), arch=Architecture.parse("mlp:16"),
          out=tmp_path / "m.kdcli", config=TrainConfig(epochs=3, precision="fp32"),
          data_options=SPECIES, eval_data="none")
    raw = pd.read_csv(penguins / "test.csv")
    raw.iloc[:, ::-1].to_csv(tmp_path / "rev.csv", index=False)  # columns in another order
    result = calibrate_bias(tmp_path / "m.kdcli", tmp_path / "c.kdcli",
                            data=str(tmp_path / "rev.csv"), target="labels",
                            data_options=SPECIES)
    assert np.allclose(result["after"], result["target_distribution"], atol=1e-3)
    report = main_export(tmp_path / "c.kdcli", tmp_path / "c.onnx",
                         data=str(penguins / "test.csv"), data_options=SPECIES)
    assert report["agreement"] == 1.0


def test_a_label_like_column_read_as_a_feature_is_said(penguins):
    """Without --label-column, the species (a string column named like labels) would be a
    category feature of an unlabelled table: kdcli says so, naming the option."""
    ds = load_data(str(penguins / "train.csv"))
    assert ds.labels is None and "species" in ds.feature_names
    assert any("'species' looks like labels" in n or "species looks like labels" in n
               and "--label-column species" in n for n in ds.notes)
    quiet = load_data(str(penguins / "train.csv"), options=DataOptions(label_column="none"))
    assert not any("looks like labels" in n for n in quiet.notes)


@pytest.fixture(scope="module")
def table_student(penguins, tmp_path_factory) -> Path:
    """A kdcli student trained on the penguins (categories and gaps: its own encoding)."""
    from kdcli.config import TrainConfig
    from kdcli.students.base import Architecture
    from kdcli.train import train

    out = tmp_path_factory.mktemp("student") / "m.kdcli"
    train(str(penguins / "train.csv"), arch=Architecture.parse("mlp:16"), out=out,
          config=TrainConfig(epochs=3, precision="fp32"), data_options=SPECIES,
          eval_data="none")
    return out


def _logits(model: Path, data: Path, options: DataOptions = SPECIES) -> torch.Tensor:
    from kdcli.data.base import table_columns
    from kdcli.teachers.formats import load_teacher

    ds = load_data(str(data), options=options)
    t = load_teacher(model, probe=ds.inputs[:4], table=table_columns(ds, options))
    return t.logits(ds.inputs)


def test_files_as_users_have_them_give_the_same_predictions(penguins, table_student,
                                                            tmp_path):
    """An all-empty category column (read as numbers by pyarrow), a category that looks
    like a number, and --feature-columns naming the model's columns in another order all
    give the predictions of the file as trained."""
    raw = pd.read_csv(penguins / "test.csv")
    full = _logits(table_student, penguins / "test.csv")
    nosex = raw.assign(sex=None)
    nosex.to_csv(tmp_path / "nosex.csv", index=False)
    expect = _logits(table_student, _write(raw.assign(sex=""), tmp_path / "blank.csv"))
    assert torch.allclose(_logits(table_student, tmp_path / "nosex.csv"), expect)
    numeric = raw.assign(island=raw.island.where(raw.index % 10 != 0, "0"))
    got = _logits(table_student, _write(numeric, tmp_path / "num.csv"))
    kept = torch.tensor(np.asarray(raw.index % 10 != 0))
    assert torch.allclose(got[kept], full[kept], atol=1e-6)
    order = ("sex", "year", "island", "bill_depth_mm", "bill_length_mm", "body_mass_g",
             "flipper_length_mm")
    opts = DataOptions(label_column="species", feature_columns=order)
    assert torch.allclose(_logits(table_student, penguins / "test.csv", opts), full)


def _write(df, path: Path) -> Path:
    df.to_csv(path, index=False)
    return path


def test_gaps_for_a_model_trained_without_them_are_refused(penguins, tmp_path):
    """A student trained on complete rows cannot fill gaps in: eval, calibrate-bias and
    export name the column and row instead of writing NaN."""
    from kdcli.calibrate import calibrate_bias
    from kdcli.config import TrainConfig
    from kdcli.evaluate import evaluate
    from kdcli.export import main_export
    from kdcli.students.base import Architecture
    from kdcli.train import train

    cols = ("bill_length_mm", "bill_depth_mm", "flipper_length_mm")
    opts = DataOptions(label_column="species", feature_columns=cols)
    full = _write(pd.read_csv(penguins / "train.csv").dropna(), tmp_path / "full.csv")
    train(str(full), arch=Architecture.parse("mlp:8"), out=tmp_path / "f.kdcli",
          config=TrainConfig(epochs=1, precision="fp32"), data_options=opts, eval_data="none")
    test = str(penguins / "test.csv")
    gap = r"column 'bill_length_mm' of .*test.csv.* missing value in row \d+"
    with pytest.raises(DataError, match=gap):
        calibrate_bias(tmp_path / "f.kdcli", tmp_path / "c.kdcli", data=test,
                       target="labels", data_options=opts)
    assert not (tmp_path / "c.kdcli").exists()
    with pytest.raises(DataError, match=gap):
        main_export(tmp_path / "f.kdcli", tmp_path / "f.onnx", data=test, data_options=opts)
    with pytest.raises(DataError, match="cannot take gaps"):
        evaluate([str(tmp_path / "f.kdcli")], test, data_options=opts)


def test_missing_error_refuses_an_empty_category_in_a_csv(penguins):
    with pytest.raises(DataError, match=r"column 'sex' .* missing value"):
        load_data(str(penguins / "train.csv"),
                  options=DataOptions(label_column="species", missing="error",
                                      feature_columns=("sex", "year")))


def test_damaged_encodings_and_column_names_are_refused(penguins, table_student, tmp_path):
    """A model file whose encoding is malformed, holds values float32 cannot, or names
    other columns; a transfer set whose feature_names do not name its columns once."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from kdcli.students.model_file import load_model

    with safe_open(str(table_student), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    cases = {"std": (lambda c: c[1].update(std=1e-320), "std 1e-320 is not a positive"),
             "dup": (lambda c: c[2].update(name=c[1]["name"]), "listed twice"),
             "kind": (lambda c: c[0].update(kind="text"), "kind 'text'")}
    for name, (edit, expect) in cases.items():
        pre = json.loads(meta["preprocessing"])
        edit(pre["table"]["columns"])
        bad = dict(meta, preprocessing=json.dumps(pre))
        bad.pop("data_sha256")
        save_file(tensors, str(tmp_path / f"{name}.kdcli"), metadata=bad)
        with pytest.raises(FormatError, match=expect):
            load_model(tmp_path / f"{name}.kdcli")


def test_a_pipeline_given_the_wrong_column_types_is_refused(penguins, pipeline_teacher,
                                                            tmp_path):
    """A pipeline of one input per column given numbers for a string input, or categories
    for a number input, stops in one line naming both; a column it needs is named when
    missing."""
    raw = pd.read_csv(penguins / "test.csv")
    codes = raw.assign(island=raw.island.astype("category").cat.codes)
    with pytest.raises(ModelError, match=r"takes strings as its input 'island', but the "
                                         r"data's column 'island' holds numbers"):
        _logits(pipeline_teacher[0], _write(codes, tmp_path / "codes.csv"))
    words = raw.assign(year=raw.year.map(lambda y: f"y{y}"))
    with pytest.raises(ModelError, match=r"takes numbers as its input 'year', but the "
                                         r"data's column 'year' holds categories"):
        _logits(pipeline_teacher[0], _write(words, tmp_path / "words.csv"))
    with pytest.raises(DataError, match="no column '?sex'?, which teacher pipeline.onnx"):
        _logits(pipeline_teacher[0], _write(raw.drop(columns="sex"), tmp_path / "nosex.csv"))


def test_constant_columns_and_unknown_categories_are_said(penguins, cli, tmp_path):
    """A column that tells the student nothing is warned of when it trains; categories it
    has no input for are named when it is evaluated, with where those rows go."""
    tr = pd.read_csv(penguins / "train.csv")
    tr = tr[(tr.island != "Torgersen") & tr.sex.notna()].assign(gone=np.nan, year_const=2007)
    tr.to_csv(tmp_path / "train.csv", index=False)
    te = pd.read_csv(penguins / "test.csv").assign(gone=np.nan, year_const=2007)
    te.to_csv(tmp_path / "test.csv", index=False)
    r = cli("train", "--data", "train.csv", "--label-column", "species", "--arch", "mlp:8",
            "--epochs", "1", "--eval-data", "none", "--out", "m.kdcli")
    assert r.exit_code == 0, r.output
    assert "column 'gone' is missing in every training row" in r.output
    assert "column 'year_const' is the same value in every training row" in r.output
    assert "column 'island' is" not in r.output
    r = cli("eval", "m.kdcli", "--data", "test.csv", "--label-column", "species")
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert ("m.kdcli: column 'island' has 1 category it has no input of its own for "
            "(Torgersen); those rows go to none of its inputs (all 0)") in said
    assert "column 'sex' has 1 category it has no input of its own for ((missing))" in said
    r = cli("eval", "m.kdcli", "--data", "train.csv", "--label-column", "species")
    assert "no input of its own" not in r.output  # the categories it was trained on
