"""ONNX-ML classifiers (scikit-learn via skl2onnx; XGBoost and LightGBM via onnxmltools) as
teachers: their probabilities, tempered exactly, on scikit-learn's bundled tables."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from kdcli.errors import ModelError
from kdcli.teachers.base import LOG_PROB_FLOOR, TeacherOptions
from kdcli.teachers.formats import load_teacher

pytest.importorskip("sklearn")
skl2onnx = pytest.importorskip("skl2onnx")

from sklearn.datasets import load_breast_cancer, load_iris  # noqa: E402
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402

SKLEARN = {
    "random-forest": lambda: RandomForestClassifier(n_estimators=8, max_depth=4, random_state=0),
    "gradient-boosting": lambda: GradientBoostingClassifier(n_estimators=10, max_depth=2,
                                                            random_state=0),
    "logistic-regression": lambda: LogisticRegression(max_iter=2000),
    "mlp": lambda: MLPClassifier(hidden_layer_sizes=(16,), max_iter=300, random_state=0),
}


def table(binary: bool) -> tuple[np.ndarray, np.ndarray]:
    X, y = (load_breast_cancer if binary else load_iris)(return_X_y=True)
    if binary:
        X = X[:, :8] / X[:, :8].max(0)  # a few features on one scale keeps the MLP quick
    return X.astype(np.float32), y


def fit(name: str, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning from the small MLP
        return SKLEARN[name]().fit(X, y)


def tempered(p: np.ndarray, T: float) -> torch.Tensor:
    q = torch.from_numpy(p.astype(np.float64)) ** (1 / T)
    return (q / q.sum(-1, keepdim=True)).float()


def onnxruntime_probs(path, X) -> np.ndarray:
    """The model's own probabilities, straight from onnxruntime (the last output)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    dtype = {"tensor(double)": np.float64, "tensor(int64)": np.int64}.get(
        sess.get_inputs()[0].type, np.float32)
    out = sess.run(None, {name: X.astype(dtype)})[-1]
    if isinstance(out, list):  # ZipMap: one map per example
        out = np.array([[row[k] for k in row] for row in out])
    return np.asarray(out)


def check_probs(path, X, proba, classes, T=3.0, **opts):
    """At T=1 kdcli's probabilities are predict_proba; at T, the model's own probabilities
    raised to 1/T and renormalised."""
    x = torch.from_numpy(X)
    t = load_teacher(path, TeacherOptions(**opts), probe=x)
    assert t.output == "probs" and t.num_classes == classes
    z = t.logits(x)
    assert bool(torch.isfinite(z).all()) and float(z.min()) >= LOG_PROB_FLOOR
    torch.testing.assert_close(torch.softmax(z, -1), torch.from_numpy(proba).float(),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.softmax(z / T, -1),
                               tempered(onnxruntime_probs(path, X), T), atol=1e-6, rtol=1e-5)
    return t


@pytest.mark.parametrize("binary", [False, True], ids=["3-class", "binary"])
@pytest.mark.parametrize("zipmap", [True, False], ids=["zipmap", "tensor"])
@pytest.mark.parametrize("name", list(SKLEARN))
def test_sklearn_probabilities_tempered_exactly(tmp_path, name, zipmap, binary):
    X, y = table(binary)
    clf = fit(name, X, y)
    onx = skl2onnx.to_onnx(clf, X[:1], options={"zipmap": zipmap}, target_opset=17)
    p = tmp_path / "model.bin"  # no telling extension
    p.write_bytes(onx.SerializeToString())
    t = check_probs(p, X, clf.predict_proba(X), 2 if binary else 3)
    assert t.format == "onnx"
    # label + probabilities: the probabilities are chosen without --output, and it says so
    assert any("using its probabilities" in n for n in t.notes)


def test_zero_probabilities_give_finite_floored_logits(tmp_path):
    X, y = table(False)
    clf = fit("random-forest", X, y)
    proba = clf.predict_proba(X)
    assert (proba == 0).any()
    p = tmp_path / "rf.onnx"
    p.write_bytes(skl2onnx.to_onnx(clf, X[:1], target_opset=17).SerializeToString())
    z = load_teacher(p, probe=torch.from_numpy(X)).logits(torch.from_numpy(X))
    assert bool(torch.isfinite(z).all())
    assert float(z[torch.from_numpy(proba == 0)].max()) == LOG_PROB_FLOOR


def test_string_labels_become_class_names(tmp_path):
    X, y = table(False)
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    clf = fit("logistic-regression", X, names)
    p = tmp_path / "named.onnx"
    p.write_bytes(skl2onnx.to_onnx(clf, X[:1], target_opset=17).SerializeToString())
    t = check_probs(p, X, clf.predict_proba(X), 3)
    assert t.class_names == list(clf.classes_)
    assert t.describe()["class_names"] == ["setosa", "versicolor", "virginica"]


@pytest.mark.parametrize("dtype", [np.float64, np.int64])
def test_inputs_are_cast_as_declared(tmp_path, dtype):
    X, y = table(False)
    Xd = np.round(X).astype(dtype) if dtype == np.int64 else X.astype(dtype)
    clf = fit("random-forest", Xd.astype(np.float32), y)
    onx = skl2onnx.to_onnx(clf, Xd[:1], target_opset=17)
    p = tmp_path / "typed.onnx"
    p.write_bytes(onx.SerializeToString())
    t = check_probs(p, Xd, clf.predict_proba(Xd.astype(np.float32)), 3)
    assert t.input_dtype == np.dtype(dtype).name


def test_declared_shape_contradicting_the_model_is_one_line_error():
    from onnxruntime.datasets import get_example

    path = get_example("logreg_iris.onnx")  # onnxruntime's own: declares [3, 2], uses 4
    with pytest.raises(ModelError) as e:
        load_teacher(path, probe=torch.from_numpy(table(False)[0]))
    msg = str(e.value)
    assert "[3, 2]" in msg and "4 features" in msg and "\n" not in msg


def test_single_logistic_output_is_two_classes(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.Sigmoid()).eval()
    p = tmp_path / "logistic.pt"
    torch.jit.save(torch.jit.script(net), str(p))
    x = torch.from_numpy(table(False)[0])
    t = load_teacher(p, probe=x)
    assert t.num_classes == 2 and t.output == "probs" and t.binary
    with torch.no_grad():
        q = net(x)[:, 0]
    torch.testing.assert_close(torch.softmax(t.logits(x), -1), torch.stack([1 - q, q], 1),
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("zipmap", [True, False], ids=["zipmap", "tensor"])
@pytest.mark.parametrize("binary", [False, True], ids=["3-class", "binary"])
def test_xgboost_via_onnxmltools(tmp_path, zipmap, binary):
    xgb = pytest.importorskip("xgboost")
    omt = pytest.importorskip("onnxmltools")
    from onnxmltools.convert.common.data_types import FloatTensorType

    X, y = table(binary)
    clf = xgb.XGBClassifier(n_estimators=8, max_depth=3, random_state=0).fit(X, y)
    onx = omt.convert_xgboost(clf, initial_types=[("input", FloatTensorType([None, X.shape[1]]))],
                              target_opset=15)
    if not zipmap:  # onnxmltools' XGBoost converter has no ZipMap; check its tensor output
        assert not any(n.op_type == "ZipMap" for n in onx.graph.node)
    p = tmp_path / "xgb.onnx"
    p.write_bytes(onx.SerializeToString())
    check_probs(p, X, clf.predict_proba(X), 2 if binary else 3)


@pytest.mark.parametrize("zipmap", [True, False], ids=["zipmap", "tensor"])
@pytest.mark.parametrize("binary", [False, True], ids=["3-class", "binary"])
def test_lightgbm_via_onnxmltools(tmp_path, zipmap, binary):
    lgb = pytest.importorskip("lightgbm")
    omt = pytest.importorskip("onnxmltools")
    from onnxmltools.convert.common.data_types import FloatTensorType

    X, y = table(binary)
    clf = lgb.LGBMClassifier(n_estimators=8, num_leaves=7, min_child_samples=5,
                             verbose=-1).fit(X, y)
    onx = omt.convert_lightgbm(clf, initial_types=[("input", FloatTensorType([None, X.shape[1]]))],
                               zipmap=zipmap, target_opset=15)
    assert any(n.op_type == "ZipMap" for n in onx.graph.node) == zipmap
    p = tmp_path / "lgbm.onnx"
    p.write_bytes(onx.SerializeToString())
    check_probs(p, X, clf.predict_proba(X), 2 if binary else 3)


def test_inspect_shows_an_onnx_ml_model(tmp_path):
    from kdcli.inspection import inspect_file

    X, y = table(False)
    p = tmp_path / "rf.onnx"
    p.write_bytes(skl2onnx.to_onnx(fit("random-forest", X, y), X[:1],
                                   target_opset=17).SerializeToString())
    info = inspect_file(p)
    assert info["scores_output"] == "output_probability" and info["classes"] == 3
    assert info["class_labels"] == [0, 1, 2] and info["class_names"] is None
    assert "TreeEnsembleClassifier" in info["ml_operators"]
    assert info["input_specs"][0]["shape"] == [None, 4]
    assert "none" in info["preprocessing"]


def test_tree_ensemble_distilled_into_an_mlp_exported_and_run(tmp_path):
    """End to end: a tree ensemble on a bundled table -> soft targets -> MLP -> ONNX."""
    import onnxruntime as ort
    from sklearn.datasets import load_wine

    from kdcli.export import main_export
    from kdcli.soft_targets import soft_targets
    from kdcli.students.base import Architecture
    from kdcli.students.model_file import load_model
    from kdcli.train import TrainConfig, train_student
    from kdcli.transfer.reader import load_transfer_set

    X, y = load_wine(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train_idx, test_idx = order[:130], order[130:]
    # standardised per feature, as one would for any MLP (the features' scales differ 1000x)
    X = ((X - X[train_idx].mean(0)) / X[train_idx].std(0)).astype(np.float32)
    np.savez(tmp_path / "wine-train.npz", inputs=X[train_idx], labels=y[train_idx])
    np.savez(tmp_path / "wine-test.npz", inputs=X[test_idx], labels=y[test_idx])
    forest = RandomForestClassifier(n_estimators=30, random_state=0).fit(X[train_idx],
                                                                         y[train_idx])
    teacher = tmp_path / "forest.onnx"
    teacher.write_bytes(skl2onnx.to_onnx(forest, X[:1], target_opset=17).SerializeToString())

    T = 2.0
    s = soft_targets([teacher], T=T, data=str(tmp_path / "wine-train.npz"),
                     out=tmp_path / "transfer.safetensors", device="cpu")
    assert s["teachers"][0]["output"] == "probs" and s["classes"] == 3
    ts = load_transfer_set(tmp_path / "transfer.safetensors")
    torch.testing.assert_close(ts.columns["soft_targets"][:],
                               tempered(forest.predict_proba(X[train_idx]), T),
                               atol=1e-5, rtol=1e-4)
    r = train_student(tmp_path / "transfer.safetensors", arch=Architecture.parse("mlp:32"),
                      alpha=0.1, out=tmp_path / "student.safetensors",
                      config=TrainConfig(epochs=12, batch_size=16, lr=0.05),
                      eval_data=str(tmp_path / "wine-test.npz"))
    assert r["test_errors"] <= 4  # of 48
    main_export(tmp_path / "student.safetensors", tmp_path / "student.onnx",
                data=str(tmp_path / "wine-test.npz"))
    sess = ort.InferenceSession(str(tmp_path / "student.onnx"),
                                providers=["CPUExecutionProvider"])
    (onnx_logits,) = sess.run(["logits"], {"input": X[test_idx]})
    with torch.no_grad():
        torch_logits = load_model(tmp_path / "student.safetensors").model(
            torch.from_numpy(X[test_idx]))
    np.testing.assert_allclose(onnx_logits, torch_logits.numpy(), atol=1e-4)
    assert (onnx_logits.argmax(1) == y[test_idx]).mean() >= 0.8


def test_default_temperature_is_low_for_probability_teachers(tmp_path, teacher_file):
    """Vote fractions are already soft: at the paper's T = 20 p^(1/T) is nearly uniform, so
    soft-targets defaults to T = 2 when every teacher outputs probabilities (and says so)."""
    from kdcli.output import Reporter
    from kdcli.soft_targets import LOGITS_T, PROBS_T, soft_targets
    from kdcli.transfer.reader import load_transfer_set

    X, y = table(binary=False)
    path = tmp_path / "forest.onnx"
    path.write_bytes(skl2onnx.to_onnx(fit("random-forest", X, y), X[:1].astype(np.float32))
                     .SerializeToString())
    np.savez(tmp_path / "x.npz", inputs=X.astype(np.float32), labels=y)
    soft_targets([path], data=str(tmp_path / "x.npz"), out=tmp_path / "t.safetensors")
    assert load_transfer_set(tmp_path / "t.safetensors").T == PROBS_T == 2.0
    soft_targets([path], T=5.0, data=str(tmp_path / "x.npz"), out=tmp_path / "t5.safetensors")
    assert load_transfer_set(tmp_path / "t5.safetensors").T == 5.0  # --T wins
    soft_targets([teacher_file], data="mnist[:50]", out=tmp_path / "k.safetensors",
                 reporter=Reporter("quiet"))
    assert load_transfer_set(tmp_path / "k.safetensors").T == LOGITS_T == 20.0  # logits
