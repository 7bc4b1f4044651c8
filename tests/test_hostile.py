"""Hostile and broken inputs: no code runs, no path outside the outputs is touched, errors
are one line. Every test builds its hostile file for real."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdcli.errors import FormatError, UnsafePickleError
from kdcli.output import Reporter
from kdcli.teachers.base import TeacherOptions
from kdcli.teachers.formats import load_teacher


class Payload:
    """Unpickling this creates ``marker``: proof that a file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class OpaquePayload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def torch_saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def rewrite_zip(src: Path, dst: Path, edits: dict, extra: dict | None = None) -> Path:
    """Copy a zip archive, passing each entry whose name ends with a key through its edit."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        root = zi.namelist()[0].split("/")[0]
        for info in zi.infolist():
            data = zi.read(info.filename)
            for suffix, edit in edits.items():
                if info.filename.endswith(suffix):
                    data = edit(data)
            zo.writestr(info, data)
        for name, data in (extra or {}).items():
            zo.writestr(f"{root}/{name}", data)
    return dst


def one_line_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def good_pt2(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    p = tmp_path_factory.mktemp("pt2") / "good.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(2, 784),)), str(p))
    return p


def _use_pickle(key: str):
    def edit(data: bytes) -> bytes:
        doc = json.loads(data)
        doc["config"][key]["use_pickle"] = True
        return json.dumps(doc).encode()
    return edit


# --------------------------------------------------------------- code in model files

def test_pt2_pickled_weight_runs_no_code(tmp_path, good_pt2, cli, teacher_file):
    marker = tmp_path / "marker"
    evil = rewrite_zip(good_pt2, tmp_path / "evil.pt2", {
        "model_weights_config.json": _use_pickle("1.weight"),
        "data/weights/weight_0": lambda _: torch_saved(Payload(marker))})
    with pytest.raises(UnsafePickleError, match="--trust-pickle"):
        load_teacher(evil)
    for args in (["soft-targets", str(evil), "--data", "mnist:test[:20]", "--out", "t.st"],
                 ["eval", str(evil), "--data", "mnist:test[:20]"],
                 ["calibrate-bias", "--teacher", str(evil), "--model", str(teacher_file),
                  "--data", "mnist:test[:20]", "--out", "c.st"]):
        line = one_line_error(cli(*args))
        assert "--trust-pickle" in line and "pickle" in line
    assert not marker.exists()
    assert not (tmp_path / "t.st").exists()


def test_pt2_pickled_sample_inputs_and_legacy_payloads_run_no_code(tmp_path, good_pt2):
    marker = tmp_path / "marker"
    cases = {
        "sample": ({"sample_inputs/model.pt": lambda _: torch_saved(Payload(marker))}, {}),
        "legacy-weights": ({}, {"data/weights/model.pt": torch_saved(Payload(marker))}),
        "2.7-state-dict": ({}, {"serialized_state_dict.pt": torch_saved(Payload(marker))}),
        "raw-pickle": ({}, {"data/constants/model.pt": pickle.dumps(Payload(marker))}),
    }
    for name, (edits, extra) in cases.items():
        evil = rewrite_zip(good_pt2, tmp_path / f"{name}.pt2", edits, extra)
        with pytest.raises(UnsafePickleError, match="--trust-pickle"):
            load_teacher(evil)
    assert not marker.exists()


def test_pt2_opaque_constant_and_native_code_are_refused(tmp_path, good_pt2):
    marker = tmp_path / "marker"
    opaque = {"config": {"c": {"path_name": "opaque_obj_0", "is_param": False,
                               "use_pickle": False, "tensor_meta": None}}}
    evil = rewrite_zip(good_pt2, tmp_path / "opaque.pt2",
                       {"model_constants_config.json": lambda _: json.dumps(opaque).encode()},
                       {"data/constants/opaque_obj_0": pickle.dumps(OpaquePayload(marker))})
    with pytest.raises(UnsafePickleError, match="pickle"):
        load_teacher(evil)
    native = rewrite_zip(good_pt2, tmp_path / "aoti.pt2", {},
                         {"data/aotinductor/model/model.so": b"\x7fELF"})
    with pytest.raises(UnsafePickleError, match="native code"):
        load_teacher(native)
    assert not marker.exists()


def test_pt2_with_trust_pickle_still_loads_legitimate_pickled_weights(tmp_path, good_pt2):
    weight = nn.Parameter(torch.randn(10, 784))
    pickled = rewrite_zip(good_pt2, tmp_path / "pickled.pt2", {
        "model_weights_config.json": _use_pickle("1.weight"),
        "data/weights/weight_0": lambda _: torch_saved(weight)})
    with pytest.raises(UnsafePickleError):
        load_teacher(pickled)
    t = load_teacher(pickled, TeacherOptions(trust_pickle=True))
    x = torch.rand(3, 784)
    expected = x @ weight.detach().T + t.module.state_dict()["1.bias"]
    assert torch.allclose(t.logits(x), expected, atol=1e-5)
    assert load_teacher(good_pt2).logits(x).shape == (3, 10)  # a plain .pt2 needs no flag


def test_pt2_payload_is_found_whatever_the_archive_root_is_called(tmp_path):
    marker = tmp_path / "marker"
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    good = tmp_path / "data.pt2"  # the archive's root folder is then "data" too
    torch.export.save(torch.export.export(model, (torch.zeros(2, 784),)), str(good))
    evil = rewrite_zip(good, tmp_path / "sample.pt2",
                       {"sample_inputs/model.pt": lambda _: torch_saved(Payload(marker))})
    with pytest.raises(UnsafePickleError):
        load_teacher(evil)
    assert not marker.exists()


def test_torchscript_pickles_run_no_code(tmp_path, tiny, cli):
    good = tmp_path / "good.ts"
    torch.jit.save(torch.jit.script(tiny), str(good))
    marker = tmp_path / "marker"
    for entry in ("/data.pkl", "/constants.pkl"):
        evil = rewrite_zip(good, tmp_path / f"evil{entry[1:5]}.ts",
                           {entry: lambda _: pickle.dumps(Payload(marker), protocol=2)})
        with pytest.raises(FormatError, match="posix.system|Unknown type"):
            load_teacher(evil)
        one_line_error(cli("eval", str(evil), "--data", "mnist:test[:20]"))
    assert not marker.exists()
    assert load_teacher(good, probe=torch.rand(2, 784)).logits(torch.rand(2, 784)).shape == (2, 10)


def test_torch_save_payload_needs_trust_pickle(tmp_path, cli):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(torch_saved({"state_dict": Payload(marker)}))
    line = one_line_error(cli("soft-targets", str(evil), "--data", "mnist:test[:20]",
                              "--arch", "mlp:32", "--out", "t.st"))
    assert "--trust-pickle" in line
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafePickleError):
        load_teacher(legacy)
    assert not marker.exists()


def test_checkpoint_payload_runs_no_code(tmp_path, cli):
    from kdcli.train import TrainConfig, train

    marker = tmp_path / "marker"
    out = tmp_path / "m.safetensors"
    Path(f"{out}.ckpt").write_bytes(torch_saved({"fingerprint": Payload(marker)}))
    with pytest.raises(FormatError, match="damaged"):
        from kdcli.students.base import Architecture
        train("mnist[:64]", arch=Architecture.parse("mlp:8"), out=out,
              config=TrainConfig(epochs=1), eval_data=None, resume=True)
    line = one_line_error(cli("train", "--data", "mnist[:64]", "--arch", "mlp:8",
                              "--epochs", "1", "--resume", "--out", str(out),
                              "--eval-data", "none"))
    assert "checkpoint" in line
    assert not marker.exists() and not out.exists()


def test_numpy_object_arrays_run_no_code(tmp_path):
    from kdcli.data.sources import load_data
    from kdcli.errors import DataError

    marker = tmp_path / "marker"
    arr = np.empty(2, dtype=object)
    arr[0] = Payload(marker)
    np.save(tmp_path / "x.npy", arr, allow_pickle=True)
    np.savez(tmp_path / "d.npz", inputs=arr, labels=np.zeros(2, dtype=np.int64))
    for name in ("d.npz", "x.npy"):
        with pytest.raises(DataError):
            load_data(str(tmp_path / name))
    assert not marker.exists()


def test_numpy_strings_and_big_endian(tmp_path):
    from kdcli.data.sources import load_data
    from kdcli.errors import DataError

    np.save(tmp_path / "s.npy", np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(DataError, match="not numbers"):
        load_data(str(tmp_path / "s.npy"))
    x = np.arange(12, dtype=">f4").reshape(3, 4)
    np.savez(tmp_path / "be.npz", inputs=x, labels=np.array([0, 1, 2], dtype=">i8"))
    ds = load_data(str(tmp_path / "be.npz"))
    assert torch.equal(torch.as_tensor(np.asarray(ds.inputs[:3])), torch.arange(12.).reshape(3, 4))
    assert ds.labels.tolist() == [0, 1, 2]


# --------------------------------------------------------------- hostile indexes

@pytest.fixture(scope="module")
def ts_teacher(tmp_path_factory) -> Path:
    from conftest import TinyMLP

    p = tmp_path_factory.mktemp("ts") / "teacher.ts"
    torch.jit.save(torch.jit.script(TinyMLP().eval()), str(p))
    return p


def _sharded(teacher: Path, index: Path, force: bool = False, n: int = 300) -> dict:
    from kdcli.soft_targets import soft_targets

    return soft_targets([teacher], T=4.0, data=f"mnist[:{n}]", out=index, shard_size="100KB",
                        force=force, reporter=Reporter("quiet"))


def test_force_deletes_only_the_sets_own_shards(tmp_path, ts_teacher):
    from kdcli.transfer.reader import load_transfer_set

    d = tmp_path / "out"
    d.mkdir()
    victims = [tmp_path / "victim.txt", d / "notes.safetensors",
               d / "other-00001-of-00002.safetensors"]
    for v in victims:
        v.write_text("keep me")
    index = d / "x.index.json"
    index.write_text(json.dumps({"format": "kdcli.transfer-set-index", "format_version": 1,
                                 "metadata": {}, "shards": [
                                     {"file": "../victim.txt"}, {"file": str(victims[0])},
                                     {"file": "notes.safetensors"},
                                     {"file": "other-00001-of-00002.safetensors"}]}))
    stale = d / "x-00007-of-00009.safetensors"  # a shard of an older set of this name
    stale.write_text("old")
    summary = _sharded(ts_teacher, index, force=True)
    assert all(v.read_text() == "keep me" for v in victims)
    assert not stale.exists()
    ts = load_transfer_set(index)
    assert len(ts) == 300 and summary["shards"] == len(ts.shards) > 1


def test_existing_shards_are_not_overwritten_without_force(tmp_path, ts_teacher, cli):
    index = tmp_path / "x.index.json"
    shard = tmp_path / "x-00001-of-00004.safetensors"
    shard.write_text("someone's file")
    line = one_line_error(cli("soft-targets", str(ts_teacher), "--scale", "255", "--data",
                              "mnist[:300]", "--shard-size", "100KB", "--out", str(index)))
    assert "--force" in line and shard.name in line
    assert shard.read_text() == "someone's file" and not index.exists()


def test_a_second_run_keeps_the_first_set_until_the_new_one_is_complete(tmp_path, ts_teacher,
                                                                         monkeypatch):
    import errno

    from kdcli.errors import KdcliError
    from kdcli.transfer.reader import load_transfer_set
    from kdcli.transfer.writer import RangeWriter

    index = tmp_path / "x.index.json"
    _sharded(ts_teacher, index)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(KdcliError, match="exists"):  # no --force: nothing deleted
        _sharded(ts_teacher, index, n=200)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    real_write, calls = RangeWriter.write, []

    def full_disk(self, path, *args):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(self, path, *args)

    monkeypatch.setattr(RangeWriter, "write", full_disk)
    with pytest.raises(KdcliError, match="no space left") as e:
        _sharded(ts_teacher, index, force=True, n=200)
    assert "\n" not in str(e.value) and "x-0000" in str(e.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporaries
    assert len(load_transfer_set(index)) == 300


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink", "nested"])
def test_reader_refuses_shards_outside_the_index_folder(tmp_path, ts_teacher, how):
    from kdcli.transfer.reader import load_transfer_set

    d = tmp_path / "set"
    d.mkdir()
    index = d / "x.index.json"
    _sharded(ts_teacher, index)
    doc = json.loads(index.read_text())
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"s" * 12345)
    first = d / doc["shards"][0]["file"]
    if how == "absolute":
        doc["shards"][0]["file"] = str(secret)
    elif how == "dotdot":
        doc["shards"][0]["file"] = "../secret.bin"
    elif how == "nested":
        doc["shards"][0]["file"] = "sub/../../secret.bin"
    else:
        first.unlink()
        first.symlink_to(secret)
    index.write_text(json.dumps(doc))
    with pytest.raises(FormatError) as e:
        load_transfer_set(index)
    assert "12345" not in str(e.value) and "12,345" not in str(e.value)
    assert "folder" in str(e.value)


# --------------------------------------------------------------- outputs

def test_sigterm_is_one_line_and_leaves_no_temporary(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "m.safetensors"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kdcli", "train", "--data", "mnist[:500]",
                             "--arch", "mlp:16", "--epochs", "200", "--eval-data", "none",
                             "--quiet", "--out", str(out)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = Path(f"{out}.ckpt")
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert ckpt.exists(), proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: terminated"), err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.name]  # the checkpoint, no .tmp


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys

    from kdcli.io.files import _host, atomic_output, temp_path

    out = tmp_path / "o.bin"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = out.with_name(f".{out.name}.{_host()}.{int(dead.stdout)}.tmp")
    stale.write_bytes(b"x" * 1000)
    live = out.with_name(f".{out.name}.{_host()}.{os.getppid()}.tmp")  # a live process's
    live.write_bytes(b"y")
    other_host = out.with_name(f".{out.name}.elsewhere.{int(dead.stdout)}.tmp")
    other_host.write_bytes(b"z")
    assert temp_path(out).name.startswith(f".{out.name}.{_host()}.{os.getpid()}")
    with atomic_output(out) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new"
    assert not stale.exists() and live.exists() and other_host.exists()


def _assert_disk_full(r, folder: Path) -> None:
    line = one_line_error(r)
    assert "no space left" in line or "disk is full" in line, line
    assert sorted(p.name for p in folder.iterdir()) == []


def test_real_disk_full_gives_one_line_and_no_partial_file(small_disk, cli, ts_teacher):
    for out, extra in (("t.safetensors", []), ("t.index.json", ["--shard-size", "100KB"])):
        r = cli("soft-targets", str(ts_teacher), "--scale", "255", "--data", "mnist[:1000]",
                "--out", str(small_disk / out), *extra)
        _assert_disk_full(r, small_disk)


def test_disk_full_while_writing_gives_one_line_and_no_partial_file(tmp_path, monkeypatch,
                                                                     cli, ts_teacher):
    import errno

    from kdcli.io import storage as storage
    real, calls = storage.SafetensorsWriter.write, []

    def full(self, name, first, chunk):
        calls.append(name)
        if len(calls) % 4 == 3:  # part-way through a file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, first, chunk)

    monkeypatch.setattr(storage.SafetensorsWriter, "write", full)
    d = tmp_path / "o"
    d.mkdir()
    for out, extra in (("t.safetensors", []), ("t.index.json", ["--shard-size", "100KB"])):
        r = cli("soft-targets", str(ts_teacher), "--scale", "255", "--data", "mnist[:300]",
                "--out", str(d / out), *extra)
        _assert_disk_full(r, d)
        assert str(d) in r.output


def test_read_only_folder_is_refused_before_training(tmp_path, monkeypatch, cli):
    import errno

    real = os.open

    def read_only(path, flags, *a):
        if flags & os.O_CREAT and str(path).startswith(str(tmp_path)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, flags, *a)

    monkeypatch.setattr(os, "open", read_only)
    line = one_line_error(cli("train", "--data", "mnist[:100]", "--arch", "mlp:8",
                              "--epochs", "50", "--eval-data", "none",
                              "--out", str(tmp_path / "m.safetensors")))
    assert "read-only" in line and str(tmp_path) in line
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_are_not_lost_and_bad_epochs_are_refused(tmp_path, cli):
    out = tmp_path / "m.safetensors"
    ckpt = Path(f"{out}.ckpt")
    base = ["train", "--data", "mnist[:200]", "--arch", "mlp:8", "--epochs", "3",
            "--eval-data", "none", "--quiet", "--out", str(out)]
    assert cli(*base, "--stop-after", "1").exit_code == 0 and ckpt.exists()
    saved = ckpt.read_bytes()
    line = one_line_error(cli(*base))  # a fresh run, no --resume: refused
    assert "--resume" in line and "--force" in line and ckpt.read_bytes() == saved
    state = torch.load(ckpt, weights_only=True)
    for epoch in (7, -4):
        state["epoch"] = epoch
        torch.save(state, ckpt)
        line = one_line_error(cli(*base, "--resume"))
        assert f"epoch {epoch}" in line and not out.exists()
    state["epoch"] = 1
    torch.save(state, ckpt)
    assert cli(*base, "--resume").exit_code == 0 and out.exists() and not ckpt.exists()


def test_outputs_onto_inputs_and_devices_are_refused_even_with_force(tmp_path, cli,
                                                                      teacher_file):
    import shutil

    teacher = tmp_path / "teacher.safetensors"
    shutil.copy(teacher_file, teacher)
    before = teacher.read_bytes()
    cases = [["soft-targets", str(teacher), "--data", "mnist[:50]", "--out", str(teacher)],
             ["export", str(teacher), "--model", str(teacher)],
             ["calibrate-bias", "--model", str(teacher), "--teacher", str(teacher),
              "--data", "mnist[:50]", "--out", str(teacher)],
             ["soft-targets", str(teacher), "--data", "mnist[:50]", "--out", "/dev/null"],
             ["export", "/dev/null", "--model", str(teacher)]]
    for args in cases:
        line = one_line_error(cli(*args, "--force"))
        assert "input" in line or "not a regular file" in line, line
    assert teacher.read_bytes() == before
    data = tmp_path / "d.npz"
    np.savez(data, inputs=np.zeros((20, 4), np.float32), labels=np.arange(20) % 2)
    line = one_line_error(cli("train", "--data", str(data), "--arch", "mlp:4", "--epochs", "1",
                              "--eval-data", "none", "--out", str(data), "--force"))
    assert "input" in line and data.stat().st_size > 0


# --------------------------------------------------------------- --arch package.module:factory

def test_arch_factory_refuses_library_callables_and_non_modules(tmp_path, monkeypatch, tiny,
                                                                 cli):
    from kdcli.errors import ModelError, UsageError

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "marker"
    (tmp_path / "usercode.py").write_text(
        "import os\nfrom os import system\nfrom conftest import TinyMLP\n"
        f"MARKER = {str(marker)!r}\n"
        "def make():\n    return TinyMLP()\n"
        "def not_a_module():\n    open(MARKER, 'w').close()\n    return 3\n"
        "value = 5\n"
        "class Net(TinyMLP):\n    pass\n")
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    sd = tmp_path / "sd.pt"
    torch.save(tiny.state_dict(), sd)
    for spec in ("os:system", "builtins:breakpoint", "subprocess:Popen", "posix:system",
                 "torch:load", "usercode:system", "usercode:value", "usercode:_private",
                 "usercode:os.system"):
        with pytest.raises(UsageError):
            load_teacher(sd, TeacherOptions(arch=spec))
    with pytest.raises(ModelError, match="returned int"):
        load_teacher(sd, TeacherOptions(arch="usercode:not_a_module"), probe=torch.rand(2, 784))
    marker.unlink()  # the user's own function ran: that is what --arch is for
    for spec in ("usercode:make", "usercode:Net"):
        t = load_teacher(sd, TeacherOptions(arch=spec), probe=torch.rand(2, 784))
        assert t.logits(torch.rand(2, 784)).shape == (2, 10)
    line = one_line_error(cli("soft-targets", str(sd), "--arch", "os:system",
                              "--data", "mnist[:20]", "--out", "t.st"))
    assert "os" in line and not (tmp_path / "t.st").exists()


def test_arch_help_says_it_runs_code(runner):
    from kdcli.cli import app

    r = runner.invoke(app, ["soft-targets", "--help"], env={"COLUMNS": "300"})
    assert "RUNS your code" in " ".join(r.output.split())
