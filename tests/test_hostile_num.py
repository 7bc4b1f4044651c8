"""Hostile and broken inputs, round 2: random or wrong numbers are refused, never taken
silently (issue 27, "Correctness"). Every test builds its broken file or option for real."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcli.errors import FormatError, ModelError


def one_line_error(result, code: int = 1) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


# --- Hugging Face folders: missing weights, impossible preprocessing ----------------------


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory, tiny_vit_folder) -> Path:
    return tiny_vit_folder(tmp_path_factory.mktemp("vit") / "vit")


def _copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    p = folder / "model.safetensors"
    save_file(edit(load_file(p)), p, metadata={"format": "pt"})


def test_hf_folder_missing_weights_is_refused(tmp_path, vit_folder):
    from kdcli.teachers.formats import load_teacher

    folder = _copy_folder(vit_folder, tmp_path / "half")
    _edit_weights(folder, lambda sd: {k: v for k, v in sd.items() if "classifier" not in k})
    with pytest.raises(FormatError, match="classifier"):
        load_teacher(folder, probe=torch.rand(2, 1, 8, 8))


def test_hf_folder_unexpected_weights_are_refused(tmp_path, vit_folder):
    from kdcli.teachers.formats import load_teacher

    folder = _copy_folder(vit_folder, tmp_path / "extra")
    _edit_weights(folder, lambda sd: {**sd, "stray.weight": torch.zeros(3)})
    with pytest.raises(FormatError, match="stray.weight"):
        load_teacher(folder, probe=torch.rand(2, 1, 8, 8))


def test_hf_index_naming_part_of_the_weights_is_refused(tmp_path, vit_folder, cli):
    from safetensors.torch import load_file, save_file

    folder = _copy_folder(vit_folder, tmp_path / "sharded")
    sd = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(sd)[: len(sd) // 2]  # the index names only half of the model's weights
    save_file({k: sd[k] for k in keys}, folder / "model-00001-of-00001.safetensors",
              metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}))
    np.save(tmp_path / "x.npy", np.random.rand(4, 1, 8, 8).astype(np.float32))
    r = cli("soft-targets", folder, "--data", tmp_path / "x.npy", "--out", tmp_path / "t.st")
    assert "missing" in one_line_error(r)
    assert not (tmp_path / "t.st").exists()


@pytest.mark.parametrize("proc", [
    {"image_std": [float("inf")]}, {"image_std": [-0.5]}, {"image_std": [0.0]},
    {"image_mean": [float("nan")]}, {"rescale_factor": -1 / 255}, {"rescale_factor": 1e-30},
    {"rescale_factor": float("inf")}, {"rescale_factor": 0},
])
def test_hf_impossible_preprocessing_is_refused(tmp_path, vit_folder, proc):
    from kdcli.teachers.formats import load_teacher

    folder = _copy_folder(vit_folder, tmp_path / "proc")
    base = {"do_normalize": True, "image_mean": [0.5], "image_std": [0.5], "do_rescale": True,
            "rescale_factor": 1 / 255, "size": {"height": 8, "width": 8}}
    (folder / "preprocessor_config.json").write_text(json.dumps({**base, **proc}))
    with pytest.raises(FormatError, match="preprocessor_config"):
        load_teacher(folder, probe=torch.rand(2, 1, 8, 8))


# --- options that cannot be meant ---------------------------------------------------------


@pytest.fixture(scope="module")
def ts_file(tmp_path_factory) -> Path:
    """A TorchScript teacher over [B, 28, 28] inputs, and 16 grey examples beside it."""
    from conftest import TinyMLP

    folder = tmp_path_factory.mktemp("opts")
    p = folder / "tiny.pt"
    torch.jit.save(torch.jit.script(TinyMLP().eval()), str(p))
    rng = np.random.default_rng(0)
    np.savez(folder / "x.npz", inputs=rng.integers(0, 256, (16, 28, 28), dtype=np.uint8),
             labels=np.arange(16) % 4)
    return p


@pytest.mark.parametrize("args", [
    ["--scale", "0"], ["--scale", "nan"], ["--scale", "inf"], ["--scale", "-1"],
    ["--mean", "nan"], ["--mean", "inf"], ["--mean", "0.5,,0.5"], ["--std", "0"],
    ["--std", "-1"], ["--std", "nan"], ["--std", ""],
    ["--classes", ""], ["--classes", "1,,2"], ["--classes", "1", "--exclude-classes", "2"],
    ["--exclude-classes", ""], ["--weights", "1,"], ["--arch", ""], ["--arch", " "],
])
def test_soft_targets_refuses_options_that_cannot_be_meant(cli, tmp_path, ts_file, args):
    out = tmp_path / "never.safetensors"
    r = cli("soft-targets", ts_file, "--data", ts_file.parent / "x.npz", "--out", out, *args)
    assert args[0] in one_line_error(r)
    assert not out.exists()


def test_soft_targets_refuses_a_mean_per_channel_for_grey_inputs(cli, tmp_path, ts_file):
    out = tmp_path / "never.safetensors"
    r = cli("soft-targets", ts_file, "--data", ts_file.parent / "x.npz", "--out", out,
            "--mean", "1,2,3", "--std", "1")
    assert "--mean" in one_line_error(r)
    assert not out.exists()


def test_output_name_that_the_model_lacks_is_refused(cli, tmp_path, ts_file, teacher_file):
    for model in (ts_file, teacher_file):
        out = tmp_path / "never.safetensors"
        r = cli("soft-targets", model, "--data", ts_file.parent / "x.npz", "--out", out,
                "--output", "probabilities")
        assert "--output" in one_line_error(r)
        assert not out.exists()


@pytest.mark.parametrize("args", [
    ["--arch", ""], ["--arch", "mlp:"], ["--arch", "mlp:30,,30"],
])
def test_train_refuses_empty_architectures(cli, tmp_path, ts_file, args):
    r = cli("train", "--data", ts_file.parent / "x.npz", "--out", tmp_path / "m.safetensors",
            "--epochs", "1", *args)
    assert "arch" in one_line_error(r)
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("args", [["--T", "1,,2"], ["--T", ""], ["--seeds", "-1"],
                                  ["--seeds", "0,,1"], ["--hidden", "30,,30"]])
def test_sweep_refuses_empty_or_negative_grid_values(cli, tmp_path, ts_file, args):
    r = cli("sweep", ts_file, "--data", ts_file.parent / "x.npz", "--out-dir",
            tmp_path / "sw", *args)
    assert args[0] in one_line_error(r)
    assert not (tmp_path / "sw").exists()


def test_preprocessing_options_for_a_kdcli_model_are_refused(cli, tmp_path, teacher_file):
    out = tmp_path / "never.safetensors"
    for args in (["--mean", "1,2,3"], ["--scale", "255"], ["--output", "logits"]):
        # refused before the data is read: the missing data file is never reached
        r = cli("soft-targets", teacher_file, "--data", tmp_path / "missing.npz", "--out", out,
                *args)
        assert "kdcli model" in one_line_error(r)
        assert not out.exists()


# --- outputs that are not class scores ----------------------------------------------------


class _Labels(torch.nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x)
        if self.kind == "argmax":
            return z.argmax(1)  # a label-only classifier: int64 [B]
        if self.kind == "int":
            return (z * 100).to(torch.int32)
        return z > 0  # bool [B, 3]


@pytest.mark.parametrize("kind", ["argmax", "int", "bool"])
def test_integer_or_boolean_outputs_are_not_logits(tmp_path, kind):
    from kdcli.teachers.formats import load_teacher

    p = tmp_path / f"{kind}.pt"
    torch.jit.save(torch.jit.script(_Labels(kind).eval()), str(p))
    with pytest.raises(ModelError, match="not class scores"):
        load_teacher(p, probe=torch.rand(4, 4))


def test_onnx_label_output_and_regressor_are_refused(tmp_path, cli):
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.linear_model import LinearRegression, LogisticRegression

    rng = np.random.default_rng(0)
    X = rng.random((40, 4)).astype(np.float32)
    y = (X[:, 0] > 0.5).astype(np.int64)
    reg = tmp_path / "reg.onnx"
    reg.write_bytes(skl2onnx.to_onnx(LinearRegression().fit(X, X[:, 1]), X[:1],
                                     target_opset=17).SerializeToString())
    clf = tmp_path / "clf.onnx"
    clf.write_bytes(skl2onnx.to_onnx(LogisticRegression().fit(X, y), X[:1],
                                     options={"zipmap": False},
                                     target_opset=17).SerializeToString())
    np.save(tmp_path / "x.npy", X)
    for model, extra, match in ((reg, [], "regress"), (clf, ["--output", "label"], "scores")):
        r = cli("soft-targets", model, "--data", tmp_path / "x.npy", "--out", tmp_path / "t.st",
                *extra)
        assert match in one_line_error(r)
        assert not (tmp_path / "t.st").exists()


# --- transfer sets and model files that lie -----------------------------------------------


@pytest.fixture(scope="module")
def small_set(tmp_path_factory, ts_file) -> Path:
    """A dense transfer set (T=2) of the TorchScript teacher on 16 grey examples."""
    from kdcli.soft_targets import soft_targets
    from kdcli.teachers.base import TeacherOptions

    out = tmp_path_factory.mktemp("set") / "t.safetensors"
    soft_targets([ts_file], T=2.0, data=str(ts_file.parent / "x.npz"), out=out,
                 options=[TeacherOptions(scale=255.0)])
    return out


def _parts(path: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    from kdcli.io.storage import read_header

    meta = read_header(path).metadata
    return load_file(str(path)), {k: v for k, v in meta.items() if k != "data_sha256"} | {
        "format_version": "2"}


def _topk(tensors: dict, meta: dict, k: int) -> tuple[dict, dict]:
    from kdcli.transfer.ensemble import top_k_targets

    tk = top_k_targets(tensors["logits"], k, float(meta["T"]))
    return ({"inputs": tensors["inputs"], "labels": tensors["labels"],
             "topk_logits": tk.logits, "topk_indices": tk.indices.to(torch.int32),
             "tail_logmass": tk.tail_logmass.float()},
            {**meta, "targets": "top-k", "top_k": str(k), "targets_dtype": "float32"})


def _lying_sets(tensors: dict, meta: dict) -> dict[str, tuple[dict, dict, str]]:
    teachers = json.loads(meta["teachers"])
    tk, tkm = _topk(tensors, meta, 3)
    full, fullm = _topk(tensors, meta, 10)
    two = json.dumps(teachers * 2)
    shape = json.dumps([{**teachers[0], "input_shape": [20, 20]}])
    one = tensors["logits"][:, :1]
    return {
        "short class names": (tensors, {**meta, "class_names": json.dumps(["a", "b"])},
                              "class_names"),
        "top-k dtype": (tk, {**tkm, "targets_dtype": "float16"}, "targets_dtype"),
        "zero tail": ({**tk, "tail_logmass": torch.full_like(tk["tail_logmass"], -np.inf)},
                      tkm, "tail"),
        "tail where nothing is left out": (
            {**full, "tail_logmass": torch.full_like(full["tail_logmass"], -3.0)}, fullm,
            "tail"),
        "tail too heavy for the top k": (
            {**tk, "tail_logmass": torch.full_like(tk["tail_logmass"], -1e-4)}, tkm, "tail"),
        "ensemble without weights": (tensors, {**meta, "teachers": two}, "weights"),
        "ensemble without member logits": (
            tensors, {**meta, "teachers": two, "weights": "[0.5, 0.5]"}, "member_logits"),
        "input shape 20x20": (tensors, {**meta, "teachers": shape}, "input_shape"),
        "one class": ({**tensors, "logits": one, "soft_targets": torch.ones_like(one),
                       "labels": torch.zeros_like(tensors["labels"])},
                      {**meta, "num_classes": "1"}, "class"),
    }


def test_lying_transfer_sets_are_refused(cli, tmp_path, small_set):
    from safetensors.torch import save_file

    tensors, meta = _parts(small_set)
    good = tmp_path / "good.safetensors"
    save_file(_topk(tensors, meta, 3)[0], str(good), metadata=_topk(tensors, meta, 3)[1])
    assert cli("inspect", good, "--verify").exit_code == 0  # the hand-made top-k set is valid
    for case, (t, m, match) in _lying_sets(tensors, meta).items():
        p = tmp_path / "bad.safetensors"
        save_file({k: v.contiguous() for k, v in t.items()}, str(p), metadata=m)
        for args in (["inspect", p, "--verify"],
                     ["train-student", "--transfer", p, "--out", tmp_path / "s.safetensors",
                      "--epochs", "1", "--hidden", "8", "--eval-data", "none"]):
            r = cli(*args)
            line = one_line_error(r)
            assert match in line and "unexpected" not in line, (case, line)
            assert not (tmp_path / "s.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.float16])
def test_model_weights_of_another_dtype_are_refused(cli, tmp_path, teacher_file, dtype):
    from safetensors.torch import load_file, save_file

    from kdcli.io.storage import read_header

    meta = read_header(teacher_file).metadata
    meta = {k: v for k, v in meta.items() if k != "data_sha256"} | {"format_version": "1"}
    tensors = load_file(str(teacher_file))
    key = sorted(tensors)[-1]
    tensors[key] = (tensors[key] * 100).to(dtype)
    p = tmp_path / "m.safetensors"
    save_file(tensors, str(p), metadata=meta)
    for args in (["inspect", p], ["eval", p, "--data", "mnist:test[:20]"]):
        assert "float32" in one_line_error(cli(*args))


@pytest.mark.parametrize("family", ["cnn", "resnet"])
def test_model_with_a_width_below_one_channel_is_refused(cli, tmp_path, teacher_file, family):
    from safetensors.torch import load_file, save_file

    from kdcli.io.storage import read_header

    meta = read_header(teacher_file).metadata
    meta = {k: v for k, v in meta.items() if k != "data_sha256"} | {"format_version": "1"}
    arch = json.loads(meta["architecture"]) | {"family": family, "width": 1e-300,
                                               "hidden": [], "depth": 8}
    meta["architecture"] = json.dumps(arch)
    p = tmp_path / "m.safetensors"
    save_file(load_file(str(teacher_file)), str(p), metadata=meta)
    assert "width" in one_line_error(cli("inspect", p))
    r = cli("train", "--data", "mnist[:20]", "--arch", f"{family}:{'8,' * (family == 'resnet')}"
            "0.001", "--out", tmp_path / "n.safetensors")
    assert "width" in one_line_error(r)


# --- image folders: 16-bit images, a lying cache ------------------------------------------


def test_16_bit_pngs_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    from kdcli.data.base import DataOptions
    from kdcli.data.images import load_image_folder

    folder = tmp_path / "deep"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 65536, (2, 6, 5)).astype(np.uint16)
    for i, k in enumerate("ab"):
        Image.fromarray(pixels[i]).save(folder / k / f"{i}.png")
    assert Image.open(folder / "a" / "0.png").mode.startswith("I")
    x = np.asarray(load_image_folder(folder, DataOptions()).inputs[0])
    np.testing.assert_array_equal(x, np.round(pixels / 257).astype(np.uint8))


@pytest.fixture
def png_folder(tmp_path) -> Path:
    from PIL import Image

    folder = tmp_path / "imgs"
    rng = np.random.default_rng(1)
    for k in "ab":
        (folder / k).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(1, 256, (6, 5), dtype=np.uint8)).save(
                folder / k / f"{k}{i}.png")
    return folder


def _cache_entry(image_cache: Path) -> Path:
    (d,) = (image_cache / "images").iterdir()
    return d


@pytest.mark.parametrize("lie", ["zeros", "float", "shape", "one row", "manifest shape"])
def test_a_lying_image_cache_entry_is_not_used(png_folder, image_cache, lie):
    from kdcli.data.base import DataOptions
    from kdcli.data.images import load_image_folder

    def inputs() -> np.ndarray:
        got = load_image_folder(png_folder, DataOptions()).inputs
        return got[0].numpy().copy() if isinstance(got, tuple) else np.array(got)

    truth = inputs()
    assert truth.shape == (6, 6, 5) and truth.any()
    d = _cache_entry(image_cache)
    manifest = json.loads((d / "manifest.json").read_text())
    forged = {"zeros": np.zeros_like(truth), "float": truth.astype(np.float32) / 255,
              "shape": np.zeros((6, 7, 5), np.uint8), "one row": truth.copy(),
              "manifest shape": np.zeros((6, 7, 5), np.uint8)}[lie]
    if lie == "one row":
        forged[4] = 0
    np.save(d / "inputs.npy", forged)
    if lie == "manifest shape":
        (d / "manifest.json").write_text(json.dumps({**manifest, "shape": [6, 7, 5]}))
    np.testing.assert_array_equal(inputs(), truth)


# --- runs that end at chance or with an absurd loss ---------------------------------------


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tables")
    rng = np.random.default_rng(0)
    y = np.arange(200) % 4
    x = (rng.normal(size=(200, 8)) + 3 * np.eye(8)[y]).astype(np.float32)
    np.savez(folder / "t.npz", inputs=x, labels=y)
    np.savez(folder / "big.npz", inputs=x * 1e30, labels=y)
    return folder


@pytest.mark.parametrize("args", [["t.npz", "--lr", "1e10"], ["big.npz", "--no-normalize"]])
def test_a_run_ending_at_chance_or_with_an_absurd_loss_says_so(cli, tables, args):
    r = cli("train", "--data", tables / args[0], *args[1:], "--epochs", "1", "--hidden", "16",
            "--out", "m.safetensors")
    assert r.exit_code == 0, r.output
    said = " ".join(r.stderr.split())
    assert "absurd loss" in said and "near chance" in said, said


def test_a_run_that_learns_gives_no_failure_warning(cli, tables):
    r = cli("train", "--data", tables / "t.npz", "--epochs", "2", "--batch-size", "20",
            "--hidden", "16", "--out", "m.safetensors")
    assert r.exit_code == 0, r.output
    assert "chance" not in r.stderr and "absurd" not in r.stderr, r.stderr


# --- a transfer set overwritten during training --------------------------------------------


def test_a_transfer_set_overwritten_during_training_is_refused(tmp_path, small_set,
                                                                monkeypatch):
    import shutil

    import kdcli.train
    from kdcli.io.storage import read_header
    from kdcli.students.base import Architecture
    from kdcli.train import TrainConfig, train_student

    ts = tmp_path / "t.safetensors"
    shutil.copy(small_set, ts)
    fit = kdcli.train.fit

    def fit_then_overwrite(*args, **kw):
        history = fit(*args, **kw)
        with open(ts, "r+b") as f:  # another process writes into the set mid-run
            f.seek(read_header(ts).data_start + 3)
            f.write(b"\xff" * 64)
        return history

    monkeypatch.setattr(kdcli.train, "fit", fit_then_overwrite)
    out = tmp_path / "s.safetensors"
    with pytest.raises(FormatError, match="modified while it was being read"):
        train_student(ts, arch=Architecture.parse("mlp:8"), out=out, eval_data=None,
                      config=TrainConfig(epochs=1, lr=0.01))
    assert not out.exists()
