"""Colour images end to end: a ResNet teacher, crop-flip copies, a ResNet student, an ONNX
export with BatchNorm folded, and evaluation, on MNIST digits drawn in random colours."""

import json
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import load_file

from kdcli.data.augment import AugmentConfig
from kdcli.data.sources import load_data
from kdcli.output import Reporter
from kdcli.students.base import Architecture
from kdcli.students.model_file import load_model
from kdcli.train import TrainConfig, checkpoint_path, train
from kdcli.transfer.reader import load_transfer_set

sys.path.insert(0, str(Path(__file__).parent))
from conftest import colour_mnist  # noqa: E402


@pytest.fixture(scope="module")
def colour(tmp_path_factory):
    d = tmp_path_factory.mktemp("colour")
    return (colour_mnist("mnist[:320]", d / "train.npz", seed=0),
            colour_mnist("mnist:test[:200]", d / "test.npz", seed=1))


def test_colour_images_end_to_end(cli, colour, tmp_path):
    train_npz, test_npz = colour
    x = load_data(str(train_npz)).inputs
    assert x.dtype == torch.uint8 and x.shape == (320, 3, 28, 28)
    assert float(x.float().std((2, 3)).mean()) > 20  # coloured digits, not blank images
    start = time.perf_counter()
    common = ["--arch", "resnet:8,0.25", "--epochs", "1", "--batch-size", "64",
              "--eval-data", test_npz, "--json"]
    r = cli("train", "--data", train_npz, "--crop-pad", "2", "--out", "teacher.safetensors",
            *common)
    assert r.exit_code == 0, r.output
    teacher = json.loads(r.stdout)
    assert teacher["architecture"] == "resnet:8,0.25" and teacher["crop_pad"] == 2

    r = cli("soft-targets", "teacher.safetensors", "--data", train_npz, "--T", "4",
            "--augment", "crop-flip", "--copies", "1", "--out", "transfer.safetensors", "--json")
    assert r.exit_code == 0, r.output
    ts = load_transfer_set(tmp_path / "transfer.safetensors")
    assert ts.inputs.shape == (640, 3, 28, 28) and ts.meta["flip"] == "true"
    # the teacher ran in eval mode: its BatchNorm used the running statistics
    model = load_model(tmp_path / "teacher.safetensors").model
    with torch.no_grad():
        eval_logits = model.eval()(ts.inputs[300:364])
        train_logits = model.train()(ts.inputs[300:364])
    torch.testing.assert_close(ts.logits[300:364], eval_logits, rtol=0, atol=1e-5)
    assert not torch.allclose(ts.logits[300:364], train_logits, atol=1e-3)

    r = cli("train-student", "--transfer", "transfer.safetensors", "--alpha", "0.1",
            "--out", "student.safetensors", *common)
    assert r.exit_code == 0, r.output
    student = json.loads(r.stdout)
    mf = load_model(tmp_path / "student.safetensors")
    assert mf.arch == Architecture.parse("resnet:8,0.25")
    assert mf.preprocessing.raw_shape == [3, 28, 28]
    state = load_file(str(tmp_path / "student.safetensors"))
    assert int(state["1.1.num_batches_tracked"]) == 10  # 640 rows / 64: BN trained, and saved
    assert float(state["1.1.running_var"].sub(1).abs().max()) > 1e-3

    r = cli("export", "student.onnx", "--model", "student.safetensors", "--data", test_npz,
            "--outputs", "both", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert "BatchNormalization" not in report["op_counts"] and report["op_counts"]["Conv"] == 9
    assert report["max_abs_diff"] <= 1e-4 and report["agreement"] == 1.0
    graph_ops = {n.op_type for n in onnx.load(str(tmp_path / "student.onnx")).graph.node}
    assert "BatchNormalization" not in graph_ops

    r = cli("eval", "teacher.safetensors", "student.safetensors", "student.onnx",
            "--data", test_npz, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    t, s, o = res["models"]
    # eval mode in training too: the errors train-student recorded are the saved model's
    assert s["errors"] == student["test_errors"] == student["history"][-1]["test_errors"]
    assert t["errors"] == teacher["test_errors"]
    assert o["errors"] == s["errors"] and res["agreement"][1][2] == 1.0
    print(f"colour end to end: {time.perf_counter() - start:.1f} s, export max |diff| "
          f"{report['max_abs_diff']:.2g}")


def test_resnet_resume_restores_batchnorm_statistics(colour, tmp_path):
    """A run stopped after epoch 1 and resumed equals an uninterrupted one, BN buffers too."""
    train_npz, _ = colour
    kw = dict(arch=Architecture.parse("resnet:8,0.25"), eval_data="none",
              augment=AugmentConfig(crop_pad=2, flip=True), limit=128,
              reporter=Reporter("quiet"))
    cfg = dict(epochs=2, batch_size=64, seed=1)
    full, part = tmp_path / "full.safetensors", tmp_path / "part.safetensors"
    train(str(train_npz), out=full, config=TrainConfig(**cfg), **kw)
    train(str(train_npz), out=part, config=TrainConfig(**cfg, stop_after=1), **kw)
    ckpt = torch.load(checkpoint_path(part), weights_only=True)
    assert int(ckpt["model"]["1.1.num_batches_tracked"]) == 2  # the BN state is checkpointed
    train(str(train_npz), out=part, config=TrainConfig(**cfg), resume=True, **kw)
    a, b = load_file(str(full)), load_file(str(part))
    assert a.keys() == b.keys() and any("running_mean" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert int(a["1.1.num_batches_tracked"]) == 4
