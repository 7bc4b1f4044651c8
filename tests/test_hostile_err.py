"""Errors that must be one line with the right cause (issue 27): read-only folders and full
disks, Hugging Face configs of the wrong type, broken tables, library code as ``--arch``,
misleading messages and options that crashed. Every test builds the broken file or option
for real and checks the exit code, the single ``Error:`` line and that nothing was written."""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcli.models import Architecture
from kdcli.output import Reporter
from kdcli.train import TrainConfig, train


def one_line_error(result, code: int = 1) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "unexpected" not in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def ts_teacher(tmp_path_factory) -> Path:
    from conftest import TinyMLP

    p = tmp_path_factory.mktemp("ts") / "teacher.ts"
    torch.jit.save(torch.jit.script(TinyMLP().eval()), str(p))
    return p


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A kdcli MLP of 784x100 (314 KB of weights: more than the small disk holds)."""
    out = tmp_path_factory.mktemp("model") / "m.safetensors"
    train("mnist[:200]", arch=Architecture.parse("mlp:100"), out=out,
          config=TrainConfig(epochs=1), eval_data=None, reporter=Reporter("quiet"))
    return out


# --------------------------------------------------------------- read-only folders, full disks

def _mount(folder: Path, options: str):
    """Mount a real tmpfs on ``folder`` (needs root and mount); skip where it cannot be."""
    folder.mkdir()
    if not shutil.which("mount") or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
            capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    return folder


@pytest.fixture
def read_only_mount(tmp_path):
    d = _mount(tmp_path / "ro", "size=256k,ro")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    d = _mount(tmp_path / "disk", "size=256k")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.fixture
def simulated_read_only(tmp_path, monkeypatch):
    """A folder whose creates, deletes and renames fail with EROFS, as on a read-only mount
    (for machines where a real one cannot be mounted)."""
    d = tmp_path / "ro"
    d.mkdir()

    def inside(path) -> bool:
        return str(os.path.abspath(os.fspath(path))).startswith(str(d))

    def guard(module, name: str, writes) -> None:
        real = getattr(module, name)

        def fake(*args, **kwargs):
            target = writes(*args, **kwargs)
            if target is not None and inside(target):
                raise OSError(errno.EROFS, "Read-only file system", os.fspath(target))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, fake)

    guard(os, "open", lambda path, flags, *a, **k: path if flags & os.O_CREAT else None)
    guard(builtins, "open", lambda file, mode="r", *a, **k: file if isinstance(
        file, (str, os.PathLike)) and set(mode) & set("wax+") else None)
    guard(os, "unlink", lambda path, *a, **k: path)
    guard(os, "mkdir", lambda path, *a, **k: path)
    guard(os, "replace", lambda src, dst, *a, **k: dst)
    return d


def _read_only_cases(ro: Path, teacher: Path, model: Path) -> list[tuple[list[str], str]]:
    sweep = ["sweep", str(model), "--T", "2", "--hidden", "4", "--epochs",
             "1", "--data", "mnist[:60]", "--eval-data", "none"]
    return [(["soft-targets", str(teacher), "--scale", "255", "--data", "mnist[:50]", "--out",
              str(ro / "t.safetensors")], "t.safetensors"),
            (["soft-targets", str(teacher), "--scale", "255", "--data", "mnist[:300]",
              "--shard-size", "100KB", "--out", str(ro / "t.index.json")], "t-0000"),
            (["export", str(ro / "m.onnx"), "--model", str(model)], "m.onnx"),
            ([*sweep, "--out-dir", str(ro)], "transfer.safetensors"),
            ([*sweep, "--out-dir", str(ro / "sub")], "sub")]


@pytest.mark.parametrize("how", ["mounted", "simulated"])
def test_read_only_folders_give_one_line_naming_the_path(request, how, cli, ts_teacher,
                                                         model_file):
    ro = request.getfixturevalue("read_only_mount" if how == "mounted"
                                 else "simulated_read_only")
    for args, name in _read_only_cases(ro, ts_teacher, model_file):
        line = one_line_error(cli(*args))
        assert "read-only" in line and f"{ro}/{name}" in line, line
        assert list(ro.iterdir()) == []


def test_full_disk_while_checkpointing_or_exporting_is_one_line(small_disk, cli, model_file):
    for args in (["train", "--data", "mnist[:100]", "--arch", "mlp:200", "--epochs", "2",
                  "--eval-data", "none", "--quiet", "--out", str(small_disk / "m.safetensors")],
                 ["export", str(small_disk / "m.onnx"), "--model", str(model_file)]):
        line = one_line_error(cli(*args))
        assert "no space left" in line and str(small_disk) in line, line
        assert "--opset" not in line
        assert list(small_disk.iterdir()) == []


# --------------------------------------------------------------- Hugging Face configs

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A tiny ViT built from its config class (no download), with a processor config."""
    pytest.importorskip("transformers")
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    num_labels=3)
    folder = tmp_path_factory.mktemp("hf") / "vit"
    ViTForImageClassification(cfg).eval().save_pretrained(folder)
    ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5],
                      image_std=[0.25]).save_pretrained(folder)
    return folder


HF_CASES = {  # name: (file, fields replaced, the field the error names)
    "id2label a list": ("config.json", {"id2label": ["a", "b", "c"]}, "id2label"),
    "id2label keys not numbers": ("config.json", {"id2label": {"a": "x", "b": "y"}}, "id2label"),
    "num_labels a string": ("config.json", {"num_labels": "3"}, "num_labels"),
    "image_size a string": ("config.json", {"image_size": "8"}, "image_size"),
    "size a string": ("preprocessor_config.json", {"size": "8"}, "size"),
    "size zero": ("preprocessor_config.json", {"size": 0}, "size"),
    "size negative": ("preprocessor_config.json", {"size": {"height": -8, "width": 8}}, "size"),
    "crop_size a list": ("preprocessor_config.json",
                         {"do_center_crop": True, "crop_size": [8, 8]}, "crop_size"),
    "image_mean a dict": ("preprocessor_config.json", {"image_mean": {"a": 1}}, "image_mean"),
    "image_std a string": ("preprocessor_config.json", {"image_std": "0.5"}, "image_std"),
    "rescale_factor a string": ("preprocessor_config.json", {"rescale_factor": "1/255"},
                                "rescale_factor"),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hugging_face_fields_of_the_wrong_type_are_one_line(case, tmp_path, cli, hf_folder):
    name, fields, field = HF_CASES[case]
    folder = tmp_path / "vit"
    shutil.copytree(hf_folder, folder)
    doc = json.loads((folder / name).read_text())
    doc.update(fields)
    (folder / name).write_text(json.dumps(doc))
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((6, 1, 8, 8), np.float32))
    for args in (["soft-targets", str(folder), "--data", str(tmp_path / "x.npy"), "--out",
                  str(tmp_path / "t.safetensors")], ["inspect", str(folder)]):
        line = one_line_error(cli(*args))
        assert f"{name}: {field} must be" in line, line
        assert not (tmp_path / "t.safetensors").exists()


def test_hugging_face_folder_saved_by_transformers_is_still_read(cli, hf_folder, tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((6, 1, 8, 8), np.float32))
    r = cli("soft-targets", str(hf_folder), "--data", str(tmp_path / "x.npy"), "--quiet",
            "--out", str(tmp_path / "t.safetensors"))
    assert r.exit_code == 0, r.output
    assert cli("inspect", str(hf_folder)).exit_code == 0
