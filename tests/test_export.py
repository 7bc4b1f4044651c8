"""kdcli export: every model family, batch sizes, metadata, and verification failures."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import randomize_batchnorm

import kdcli.export as export_mod
from kdcli.data.sources import load_data
from kdcli.errors import ExportError
from kdcli.export import main_export
from kdcli.preprocessing import Preprocessing
from kdcli.students.base import Architecture, build_model
from kdcli.students.model_file import load_model, save_model

PRE = Preprocessing(255.0, 0.1307, 0.3081, [28, 28], "pixel values 0-255")


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory):
    torch.manual_seed(0)
    arch = Architecture.parse("cnn:0.25", dropout=0.3)
    path = tmp_path_factory.mktemp("cnn") / "cnn.safetensors"
    save_model(path, build_model(arch, PRE, 10).eval(), arch, PRE, 10,
               {"command": "train", "data": "mnist:train", "test_data": "mnist:test"})
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, teacher_file):
    out = tmp_path_factory.mktemp("onnx") / "teacher.onnx"
    report = main_export(teacher_file, out, outputs="both")
    return out, report


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_takes_raw_pixels_and_matches_torch_at_any_batch(exported, teacher_file):
    out, report = exported
    assert report["max_abs_diff"] <= 1e-4 and report["agreement"] == 1.0
    assert report["checked"] == 500 and report["op_counts"]["Gemm"] == 2
    sess = session(out)
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert [o.name for o in sess.get_outputs()] == ["logits", "probabilities"]
    model = load_model(teacher_file).model
    x = load_data("mnist:test[:1000]").inputs
    for n in (1, 7, 1000):
        logits, probs = sess.run(None, {"input": x[:n].float().numpy()})
        with torch.no_grad():
            ref = model(x[:n]).numpy()
        assert logits.shape == (n, 10) and np.abs(logits - ref).max() < 1e-4
        np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)


def test_metadata_round_trips(exported, teacher_file):
    out, _ = exported
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    mf = load_model(teacher_file)
    assert props["architecture"] == "mlp:64" and props["num_classes"] == "10"
    assert json.loads(props["preprocessing"])["scale"] == 255.0
    assert "pixel values 0-255" in props["input_units"] and props["kdcli_version"]
    assert json.loads(props["training"])["test_errors"] == mf.training["test_errors"]


def test_cnn_fixed_batch_and_probs_only(tmp_path, cnn_file):
    out = tmp_path / "cnn.onnx"
    report = main_export(cnn_file, out, outputs="probs", batch="7")
    assert report["batch"] == 7 and "Conv" in report["op_counts"]
    sess = session(out)
    assert sess.get_inputs()[0].shape == [7, 28, 28]
    assert [o.name for o in sess.get_outputs()] == ["probabilities"]


def test_exported_student_is_a_first_class_model(exported, teacher_file, cli, tmp_path):
    out, _ = exported
    r = cli("eval", teacher_file, out, "--data", "mnist:test[:2000]", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    a, b = res["models"]
    assert a["errors"] == b["errors"] and abs(a["nll"] - b["nll"]) < 1e-4
    assert a["params"] == b["params"]  # learned tensors only, in both formats
    assert res["agreement"][0][1] == 1.0
    r = cli("soft-targets", out, "--T", "5", "--data", "mnist[:500]", "--output", "logits",
            "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["teachers"][0]["format"] == "onnx"


def test_corrupted_export_fails_verification_and_is_removed(tmp_path, teacher_file,
                                                          monkeypatch, cli):
    real = export_mod._to_onnx

    def corrupting(*args, **kw):
        log = real(*args, **kw)
        path = args[5]
        proto = onnx.load(str(path))
        init = proto.graph.initializer[0]
        arr = onnx.numpy_helper.to_array(init).copy()
        arr.flat[: arr.size // 2] += 0.5
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
        onnx.save(proto, str(path))
        return log

    monkeypatch.setattr(export_mod, "_to_onnx", corrupting)
    with pytest.raises(ExportError, match="disagrees with torch"):
        main_export(teacher_file, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists() and not list(tmp_path.glob(".bad.onnx*"))
    r = cli("export", "bad.onnx", "--model", teacher_file)
    assert r.exit_code == 1 and r.stderr.startswith("Error: the ONNX model disagrees")
    assert not (tmp_path / "bad.onnx").exists()


def test_export_errors(cli, teacher_file, exported, tmp_path):
    out, _ = exported
    r = cli("export", out, "--model", teacher_file)  # exists without --force
    assert r.exit_code == 1 and "--force" in r.stderr
    r = cli("export", "x.onnx", "--model", "missing.safetensors")
    assert r.exit_code == 1 and "does not exist" in r.stderr
    r = cli("export", "y.onnx", "--model", out)  # an ONNX file is not a kdcli model
    assert r.exit_code == 1 and "kdcli export takes a kdcli model file" in r.stderr
    r = cli("export", "z.onnx", "--model", teacher_file, "--batch", "zero")
    assert r.exit_code == 1 and "--batch" in r.stderr
    for name in ("x.onnx", "y.onnx", "z.onnx"):
        assert not (tmp_path / name).exists()


def test_unexportable_model_gets_a_clear_error(tmp_path, teacher_file, monkeypatch):
    import torch.onnx

    def boom(*a, **k):
        raise RuntimeError("Unsupported operator aten::weird\nlong trace")

    monkeypatch.setattr(torch.onnx, "export", boom)
    with pytest.raises(ExportError, match="exporter failed: Unsupported operator aten::weird"):
        main_export(teacher_file, tmp_path / "w.onnx")
    assert not (tmp_path / "w.onnx").exists()


def test_export_is_quiet_unless_verbose(cli, teacher_file, capfd):
    r = cli("export", "q.onnx", "--model", teacher_file)
    assert r.exit_code == 0, r.output
    err = r.stderr + capfd.readouterr().err
    assert "torch.onnx" not in err and "Warning" not in err


def test_inspect_model_and_onnx_files(cli, teacher_file, exported):
    r = cli("inspect", teacher_file, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["kind"] == "model" and info["architecture"] == "mlp:64"
    assert info["params"] == 784 * 64 + 64 + 64 * 10 + 10 and info["format_version"] == 2
    r = cli("inspect", exported[0], "--json")
    info = json.loads(r.stdout)
    assert info["kind"] == "onnx" and info["inputs"] == ["input"]
    assert info["metadata"]["architecture"] == "mlp:64"
    r = cli("inspect", teacher_file)
    assert "mlp:64" in r.stdout and "training.command" in r.stdout


def test_resnet_exports_with_batchnorm_folded_and_matches_torch(tmp_path):
    """No BatchNormalization node, and parity with the unfolded model (a grayscale ResNet here;
    the colour one is exported in tests/test_colour.py)."""
    spec, raw = "resnet:14,0.25", [20, 20]
    torch.manual_seed(0)
    arch = Architecture.parse(spec)
    pre = Preprocessing(255.0, 0.45, 0.25, raw, "pixel values 0-255")
    model = build_model(arch, pre, 10)
    randomize_batchnorm(model)  # statistics and affine parameters far from their defaults
    data = tmp_path / "images.npz"
    x = torch.randint(0, 256, (200, *raw), dtype=torch.uint8)
    np.savez(data, inputs=x.numpy(), labels=np.zeros(200, dtype=np.int64))
    path = tmp_path / "r.safetensors"
    save_model(path, model.eval(), arch, pre, 10, {"command": "train", "data": str(data)})
    out = tmp_path / "r.onnx"
    report = main_export(path, out, data=str(data))  # a recorded path is named again
    ops = report["op_counts"]
    assert "BatchNormalization" not in ops and ops["Conv"] == sum(
        isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert report["max_abs_diff"] <= 1e-4 and report["agreement"] == 1.0
    assert report["checked"] == 200
    got = session(out).run(None, {"input": x[:9].float().numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - model(x[:9]).numpy()).max() <= 1e-4
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["architecture"] == spec and json.loads(props["architecture_json"])["depth"]
