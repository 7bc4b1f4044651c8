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


def _tiny_vit_folder(folder: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, num_labels=3)
    transformers.ViTForImageClassification(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory) -> Path:
    return _tiny_vit_folder(tmp_path_factory.mktemp("vit") / "vit")


def _copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    p = folder / "model.safetensors"
    save_file(edit(load_file(p)), p, metadata={"format": "pt"})


def test_hf_folder_missing_weights_is_refused(tmp_path, vit_folder):
    from kdcli.teachers import load_teacher

    folder = _copy_folder(vit_folder, tmp_path / "half")
    _edit_weights(folder, lambda sd: {k: v for k, v in sd.items() if "classifier" not in k})
    with pytest.raises(FormatError, match="classifier"):
        load_teacher(folder, probe=torch.rand(2, 1, 8, 8))


def test_hf_folder_unexpected_weights_are_refused(tmp_path, vit_folder):
    from kdcli.teachers import load_teacher

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
    {"rescale_factor": float("inf")},
])
def test_hf_impossible_preprocessing_is_refused(tmp_path, vit_folder, proc):
    from kdcli.teachers import load_teacher

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
    ["--exclude-classes", ""], ["--weights", "1,"], ["--arch", ""], ["--arch", "mlp:"],
])
def test_soft_targets_refuses_options_that_cannot_be_meant(cli, ts_file, args):
    out = ts_file.parent / "never.safetensors"
    r = cli("soft-targets", ts_file, "--data", ts_file.parent / "x.npz", "--out", out, *args)
    assert one_line_error(r, 2 if r.exit_code == 2 else 1)
    assert args[0] in r.output or "--" in r.output
    assert not out.exists()


def test_soft_targets_refuses_a_mean_per_channel_for_grey_inputs(cli, ts_file):
    out = ts_file.parent / "never.safetensors"
    r = cli("soft-targets", ts_file, "--data", ts_file.parent / "x.npz", "--out", out,
            "--mean", "1,2,3", "--std", "1")
    assert "--mean" in one_line_error(r)
    assert not out.exists()


def test_output_name_that_the_model_lacks_is_refused(cli, ts_file, teacher_file):
    for model in (ts_file, teacher_file):
        out = ts_file.parent / "never.safetensors"
        r = cli("soft-targets", model, "--data", ts_file.parent / "x.npz", "--out", out,
                "--output", "probabilities")
        assert "--output" in one_line_error(r)
        assert not out.exists()


@pytest.mark.parametrize("args", [
    ["--arch", ""], ["--arch", "mlp:"], ["--arch", "mlp:30,,30"],
])
def test_train_refuses_empty_architectures(cli, ts_file, args):
    r = cli("train", "--data", ts_file.parent / "x.npz", "--out", ts_file.parent / "m.safetensors",
            "--epochs", "1", *args)
    assert "arch" in one_line_error(r)
    assert not (ts_file.parent / "m.safetensors").exists()


@pytest.mark.parametrize("args", [["--T", "1,,2"], ["--T", ""], ["--seeds", "-1"],
                                  ["--seeds", "0,,1"], ["--hidden", "30,,30"]])
def test_sweep_refuses_empty_or_negative_grid_values(cli, ts_file, args):
    r = cli("sweep", ts_file, "--data", ts_file.parent / "x.npz", "--out-dir",
            ts_file.parent / "sw", *args)
    assert args[0] in one_line_error(r)
    assert not (ts_file.parent / "sw").exists()


def test_preprocessing_options_for_a_kdcli_model_are_refused(cli, ts_file, teacher_file):
    out = ts_file.parent / "never.safetensors"
    for args in (["--mean", "1,2,3"], ["--scale", "255"]):
        r = cli("soft-targets", teacher_file, "--data", "mnist[:20]", "--out", out, *args)
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
    from kdcli.teachers import load_teacher

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
