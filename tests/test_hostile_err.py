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
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcli.output import Reporter
from kdcli.students.base import Architecture
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


def test_torch_saves_short_write_is_a_write_error(tmp_path):
    """What torch.save raises when the disk fills (seen on a real full tmpfs), for machines
    where the test below cannot mount one."""
    from kdcli.io.files import write_error

    e = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2496 vs 2390")
    err = write_error(tmp_path / "m.safetensors.ckpt", e)
    assert err is not None and "m.safetensors.ckpt" in str(err) and "\n" not in str(err)
    assert write_error(tmp_path / "x", RuntimeError("mat1 and mat2 shapes differ")) is None


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
def hf_folder(tmp_path_factory, tiny_vit_folder) -> Path:
    """A tiny ViT built from its config class (no download), with a processor config."""
    pytest.importorskip("transformers")
    from transformers import ViTImageProcessor

    folder = tiny_vit_folder(tmp_path_factory.mktemp("hf") / "vit")
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


# --------------------------------------------------------------- tables

def _train_args(data: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--arch", "mlp:4", "--epochs", "1",
            "--eval-data", "none", "--quiet", "--out", str(data.parent / "m.safetensors"),
            *extra]


def test_duplicate_column_names_are_named(tmp_path, cli):
    data = tmp_path / "d.csv"
    data.write_text("a,a,label\n1,2,0\n3,4,1\n")
    line = one_line_error(cli(*_train_args(data)))
    assert "'a' 2 times" in line
    assert not (tmp_path / "m.safetensors").exists()


def test_a_long_header_reads_and_a_too_long_line_is_one_line(tmp_path, cli, monkeypatch):
    from kdcli.data import tables as tables
    from kdcli.data.sources import load_data

    wide = tmp_path / "wide.csv"  # a 1.2 MB header: more than pyarrow's default block
    names = ["x" * 600_000 + "a", "x" * 600_000 + "b"]
    wide.write_text(f"{names[0]},{names[1]},label\n1,2,0\n3,4,1\n")
    assert load_data(str(wide)).feature_names == names
    monkeypatch.setattr(tables, "MAX_BLOCK", 1 << 20)  # the bound, made small to test
    long = tmp_path / "long.csv"
    long.write_text("a,label\n" + "1" * (2 << 20) + ",0\n2,1\n")
    line = one_line_error(cli(*_train_args(long)))
    assert "longer than 1 MiB" in line and "block" not in line
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("junk", ["random", "nul", "late"])
def test_binary_junk_as_csv_is_one_line_without_raw_bytes(tmp_path, cli, junk, monkeypatch):
    import re
    import sys

    printed = []  # what Python would print as "Exception ignored in ... Traceback"
    monkeypatch.setattr(sys, "unraisablehook", printed.append)
    data = tmp_path / "junk.csv"
    noise = np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes()
    data.write_bytes({"random": noise, "nul": b"a,label\n1,0\x00\n",
                      "late": b"a,label\n" + b"1,0\n" * 40_000 + noise}[junk])
    r = cli(*_train_args(data))
    line = one_line_error(r)
    assert "not a UTF-8 text table" in line or "cannot read" in line, line
    assert line.isascii() and line.isprintable() and "Traceback" not in r.output
    assert not re.search(r"got \d+:", line) and printed == []
    assert not (tmp_path / "m.safetensors").exists()


# --------------------------------------------------------------- misleading messages

@pytest.mark.parametrize("head", [b"\x93NUMPZ\x01\x00" + b"x" * 200, b"\x93NUMP"])
def test_npy_without_a_numpy_header_is_not_called_a_pickle(tmp_path, cli, head):
    data = tmp_path / "d.npy"
    data.write_bytes(head)
    line = one_line_error(cli(*_train_args(data)))
    assert "not a NumPy file" in line and "pickle" not in line


def test_random_bytes_as_a_checkpoint_are_not_called_pickles(tmp_path, cli):
    out = tmp_path / "m.safetensors"
    Path(f"{out}.ckpt").write_bytes(np.random.default_rng(0).integers(0, 256, 4000,
                                                                      np.uint8).tobytes())
    line = one_line_error(cli("train", "--data", "mnist[:100]", "--arch", "mlp:4",
                              "--epochs", "2", "--eval-data", "none", "--quiet",
                              "--out", str(out), "--resume"))
    assert "not a torch.save archive" in line and "pickle" not in line
    assert not out.exists()


def test_labels_are_shown_as_stored(tmp_path, cli):
    x = np.zeros((4, 3), np.float32)
    big = tmp_path / "big.npz"
    np.savez(big, inputs=x, labels=np.array([0, 1, 2**63 + 5, 1], np.uint64))
    line = one_line_error(cli(*_train_args(big)))
    assert f"include {2**63 + 5}," in line
    table = tmp_path / "t.csv"
    table.write_text("a,label\n1,0\n2,inf\n3,1\n")
    line = one_line_error(cli(*_train_args(table)))
    assert "holds inf in row 2" in line and "-9223372036854775808" not in line
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_wide_unsigned_inputs_follow_one_rule_in_every_command(tmp_path, cli, dtype):
    from conftest import TinyMLP

    from kdcli.transfer.reader import load_transfer_set

    teacher = tmp_path / "teacher.ts"
    torch.jit.save(torch.jit.script(TinyMLP().eval()), str(teacher))
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, inputs=rng.integers(0, 60_000, (12, 784)).astype(dtype),
             labels=np.arange(12) % 3)
    r = cli("soft-targets", str(teacher), "--data", str(data), "--quiet", "--out",
            str(tmp_path / "t.safetensors"))
    assert r.exit_code == 0, r.output
    ts = load_transfer_set(tmp_path / "t.safetensors")
    assert ts.columns["inputs"][:].dtype == (torch.int32 if dtype == np.uint16 else torch.int64)
    assert r.exit_code == 0 and cli(*_train_args(data)).exit_code == 0
    huge = tmp_path / "huge.npz"
    np.savez(huge, inputs=np.full((4, 2), 2**63 + 1, np.uint64), labels=np.arange(4) % 2)
    line = one_line_error(cli(*_train_args(huge, "--force")))
    assert "2^63" in line


# --------------------------------------------------------------- options and --arch

@pytest.mark.parametrize("seed", [str(2**63), str(2**64), "-1"])
def test_seeds_out_of_range_are_one_line(tmp_path, cli, ts_teacher, model_file, seed):
    for args in (["train", "--data", "mnist[:50]", "--arch", "mlp:4", "--epochs", "1",
                  "--eval-data", "none", "--out", str(tmp_path / "m.safetensors")],
                 ["soft-targets", str(ts_teacher), "--data", "mnist[:20]", "--out",
                  str(tmp_path / "t.safetensors")],
                 ["sweep", str(model_file), "--T", "2", "--hidden", "4", "--data",
                  "mnist[:20]", "--out-dir", str(tmp_path / "sweep")]):
        line = one_line_error(cli(*args, f"--seed={seed}"))
        assert "must be from 0 to 2^63 - 1" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("columns", ["", " , "])
def test_an_empty_feature_columns_is_one_line(tmp_path, cli, columns):
    data = tmp_path / "d.csv"
    data.write_text("a,b,label\n1,2,0\n3,4,1\n")
    line = one_line_error(cli(*_train_args(data, "--feature-columns", columns)))
    assert "--feature-columns is empty" in line


def test_a_teacher_with_no_output_columns_is_one_line(tmp_path, cli):
    class NoScores(torch.nn.Module):
        def forward(self, x):
            return x[:, :0]

    teacher = tmp_path / "none.ts"
    torch.jit.save(torch.jit.trace(NoScores(), torch.zeros(2, 4)), str(teacher))
    np.save(tmp_path / "x.npy", np.zeros((6, 4), np.float32))  # unlabelled
    line = one_line_error(cli("soft-targets", str(teacher), "--data", str(tmp_path / "x.npy"),
                              "--out", str(tmp_path / "t.safetensors")))
    assert "no class scores" in line and not (tmp_path / "t.safetensors").exists()


def test_arch_refuses_installed_libraries_and_reports_factories_that_fail(tmp_path, cli,
                                                                         monkeypatch):
    from kdcli.teachers.safety import check_factory

    pytest.importorskip("PIL")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "mynet.py").write_text(
        "import torch\nfrom PIL.Image import new\n"
        "def boom():\n    raise RuntimeError('no weights\\nInjected: line')\n"
        "def needs(width, depth):\n    return torch.nn.Linear(4, 2)\n"
        "def make(width=2):\n    return torch.nn.Linear(4, width)\n")
    sd = tmp_path / "sd.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), sd)
    np.save(tmp_path / "x.npy", np.zeros((6, 4), np.float32))
    base = ["soft-targets", str(sd), "--data", str(tmp_path / "x.npy"), "--out",
            str(tmp_path / "t.safetensors"), "--arch"]
    cases = {"transformers:AutoModel": "library module transformers",
             "PIL.Image:new": "library module PIL.Image",
             "mynet:new": "PIL.Image's new",
             "mynet:boom": "raised RuntimeError: 'no weights'",
             "mynet:needs": "cannot be called without arguments"}
    for spec, want in cases.items():
        if spec.startswith("transformers"):
            pytest.importorskip("transformers")
        line = one_line_error(cli(*base, spec))
        assert want in line, line
        assert not (tmp_path / "t.safetensors").exists()
    with pytest.raises(Exception, match="library module"):
        check_factory("PIL:Image", "PIL", "Image")  # refused before anything is imported
    assert cli(*base, "mynet:make", "--quiet").exit_code == 0  # the user's own code works
