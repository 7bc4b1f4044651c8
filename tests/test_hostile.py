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
from kdcli.teachers import TeacherOptions, load_teacher


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
    assert load_teacher(good).logits(torch.rand(2, 784)).shape == (2, 10)


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
        from kdcli.models import Architecture
        train("mnist[:64]", arch=Architecture.parse("mlp:8"), out=out,
              config=TrainConfig(epochs=1), eval_data=None, resume=True)
    line = one_line_error(cli("train", "--data", "mnist[:64]", "--arch", "mlp:8",
                              "--epochs", "1", "--resume", "--out", str(out),
                              "--eval-data", "none"))
    assert "checkpoint" in line
    assert not marker.exists() and not out.exists()


def test_numpy_object_arrays_run_no_code(tmp_path):
    from kdcli.data import load_data
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
    from kdcli.data import load_data
    from kdcli.errors import DataError

    np.save(tmp_path / "s.npy", np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(DataError, match="not numbers"):
        load_data(str(tmp_path / "s.npy"))
    x = np.arange(12, dtype=">f4").reshape(3, 4)
    np.savez(tmp_path / "be.npz", inputs=x, labels=np.array([0, 1, 2], dtype=">i8"))
    ds = load_data(str(tmp_path / "be.npz"))
    assert torch.equal(torch.as_tensor(np.asarray(ds.inputs[:3])), torch.arange(12.).reshape(3, 4))
    assert ds.labels.tolist() == [0, 1, 2]
