"""XGBoost and LightGBM teachers converted with onnxmltools as the README says, run by
``soft-targets`` on a CSV that pandas wrote: kdcli's teacher predicts what the booster
predicts on every row. And what kdcli does with the missing values a booster handles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdcli.data.base import DataOptions
from kdcli.errors import DataError
from kdcli.soft_targets import soft_targets
from kdcli.transfer.reader import load_transfer_set

pd = pytest.importorskip("pandas")
omt = pytest.importorskip("onnxmltools")
pytest.importorskip("sklearn")

from onnxmltools.convert.common.data_types import FloatTensorType  # noqa: E402
from sklearn.datasets import load_wine  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402


def wine(missing: bool = False, boolean: bool = False):
    """scikit-learn's wine table split 60/40 as DataFrames; optionally every 5th value of one
    column missing, or proline replaced by a boolean column (as a user's table has)."""
    X, y = load_wine(return_X_y=True, as_frame=True)
    X = X.rename(columns=lambda c: c.replace("/", "_"))
    if missing:
        X.iloc[::5, 3] = np.nan
    if boolean:
        X = X.assign(rich=X["proline"] > 750).drop(columns="proline")
    return train_test_split(X, y, test_size=0.4, random_state=0, stratify=y)


def xgboost_onnx(X_tr, y_tr):
    """The README's XGBoost recipe: fit on float32 numpy (no column names, no booleans)."""
    xgb = pytest.importorskip("xgboost")
    clf = xgb.XGBClassifier(n_estimators=10, max_depth=3, random_state=0)
    clf.fit(X_tr.to_numpy(np.float32), y_tr)
    onx = omt.convert_xgboost(clf, initial_types=[("input", FloatTensorType([None,
                                                                            X_tr.shape[1]]))])
    return clf, onx, lambda X: clf.predict(X.to_numpy(np.float32))


def lightgbm_onnx(X_tr, y_tr):
    """The README's LightGBM recipe: the DataFrame as it is, ZipMap off."""
    lgb = pytest.importorskip("lightgbm")
    clf = lgb.LGBMClassifier(n_estimators=10, num_leaves=7, min_child_samples=5, verbose=-1)
    clf.fit(X_tr, y_tr)
    onx = omt.convert_lightgbm(clf, initial_types=[("input", FloatTensorType([None,
                                                                             X_tr.shape[1]]))],
                               zipmap=False)
    return clf, onx, clf.predict


BOOSTERS = {"xgboost": xgboost_onnx, "lightgbm": lightgbm_onnx}


def booster_and_table(tmp_path: Path, name: str, **table) -> tuple[Path, Path, np.ndarray,
                                                                     np.ndarray]:
    """The booster's ONNX file, the test rows as CSV, the booster's own predictions on them
    and the labels."""
    X_tr, X_te, y_tr, y_te = wine(**table)
    _, onx, predict = BOOSTERS[name](X_tr, y_tr)
    model = tmp_path / f"{name}.onnx"
    model.write_bytes(onx.SerializeToString())
    data = tmp_path / "test.csv"
    X_te.assign(label=y_te).to_csv(data, index=False)
    return model, data, np.asarray(predict(X_te)), y_te.to_numpy()


@pytest.mark.parametrize("boolean", [False, True], ids=["numbers", "a-bool-column"])
@pytest.mark.parametrize("name", sorted(BOOSTERS))
def test_a_booster_teacher_predicts_what_the_booster_predicts(tmp_path, name, boolean):
    model, data, predicted, y = booster_and_table(tmp_path, name, boolean=boolean)
    out = tmp_path / "transfer.safetensors"
    summary = soft_targets([model], data=str(data), out=out, precision="fp32")
    assert summary["teachers"][0]["accuracy"] == pytest.approx((predicted == y).mean())
    argmax = load_transfer_set(out).teacher_argmax().numpy()
    assert (argmax == predicted).all(), f"{(argmax != predicted).sum()} rows differ"
    assert 0.8 < (predicted == y).mean() < 1  # a real teacher, with errors to carry over


def test_xgboost_recipe_pitfalls_are_the_ones_the_readme_names():
    """The README's three pitfalls, as onnxmltools raises them today, so the README's advice
    is rechecked when onnxmltools changes."""
    xgb = pytest.importorskip("xgboost")
    from skl2onnx.common.data_types import FloatTensorType as SklearnFloatTensorType

    X_tr, _, y_tr, _ = wine(boolean=True)
    types = [("input", FloatTensorType([None, X_tr.shape[1]]))]
    clf = xgb.XGBClassifier(n_estimators=3, max_depth=2).fit(X_tr.to_numpy(np.float32), y_tr)
    with pytest.raises(RuntimeError, match="wrong type"):
        omt.convert_xgboost(clf, initial_types=[("input", SklearnFloatTensorType([None, 13]))])
    numbers = wine()[0]
    named = xgb.XGBClassifier(n_estimators=3, max_depth=2).fit(numbers, y_tr)
    with pytest.raises(RuntimeError, match="pattern 'f%d'"):
        omt.convert_xgboost(named, initial_types=types)
    X_f = X_tr.set_axis([f"f{i}" for i in range(X_tr.shape[1])], axis=1)
    boolean = xgb.XGBClassifier(n_estimators=3, max_depth=2).fit(X_f, y_tr)
    with pytest.raises(KeyError, match="split_condition"):
        omt.convert_xgboost(boolean, initial_types=types)


@pytest.mark.parametrize("name", sorted(BOOSTERS))
def test_missing_values_reach_the_booster_as_nan(tmp_path, name):
    """A booster handles NaN itself (its own branch at each split): kdcli hands it NaN where
    a number is missing, so its predictions are the booster's own on every row; with
    --missing error the table is refused, naming the column."""
    model, data, predicted, _ = booster_and_table(tmp_path, name, missing=True)
    out = tmp_path / "transfer.safetensors"
    soft_targets([model], data=str(data), out=out, precision="fp32")
    ts = load_transfer_set(out)
    assert ts.meta["format_version"] == "5"
    assert torch.isnan(ts.columns["inputs"].whole()).any()
    assert (ts.teacher_argmax().numpy() == predicted).all()
    with pytest.raises(DataError, match="alcalinity_of_ash.*missing value"):
        soft_targets([model], data=str(data), out=tmp_path / "strict.safetensors",
                     data_options=DataOptions(missing="error"))
    assert not (tmp_path / "strict.safetensors").exists()
