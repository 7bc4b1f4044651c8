"""Every teacher format, built and saved by the test itself, loads and gives the same logits."""

import pickle
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kdcli.errors import FormatError, ModelError, UnsafePickleError, UsageError
from kdcli.teachers.base import TeacherOptions
from kdcli.teachers.formats import detect_format, load_teacher

sys.path.insert(0, str(Path(__file__).parent))

X = torch.randint(0, 256, (37, 28, 28), dtype=torch.uint8)  # raw MNIST-like pixels


def expected(model, x=X):
    with torch.no_grad():
        return model(x.float() / 255)


def export_onnx(model, path, batch=None, flat=False, extra_output=False):
    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            y = self.m(x)
            return (y, torch.softmax(y, -1)) if extra_output else y

    shape = (batch or 2, 784) if flat else (batch or 2, 28, 28)
    names = ["scores", "prob"] if extra_output else ["scores"]
    torch.onnx.export(Wrap().eval(), (torch.zeros(shape),), str(path), dynamo=False,
                      input_names=["pixels"], output_names=names,
                      dynamic_axes=None if batch else {"pixels": {0: "n"}})
    return path


def run(path, **opts):
    t = load_teacher(path, TeacherOptions(scale=255.0, **opts), probe=X)
    return t, t.logits(X)


def test_kdcli_model_file(teacher_file):
    from kdcli.students.model_file import load_model

    t = load_teacher(teacher_file)
    assert t.format == "kdcli"
    with torch.no_grad():
        torch.testing.assert_close(t.logits(X), load_model(teacher_file).model(X))


def test_torchscript(tmp_path, tiny):
    p = tmp_path / "ts.bin"  # no telling extension: detected by content
    torch.jit.save(torch.jit.script(tiny), str(p))
    t, z = run(p)
    assert t.format == "torchscript"
    torch.testing.assert_close(z, expected(tiny))


@pytest.mark.parametrize("dynamic", [True, False])
def test_torch_export(tmp_path, tiny, dynamic):
    p = tmp_path / "m.pt2"
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    ep = torch.export.export(tiny, (torch.zeros(8, 1, 28, 28),), dynamic_shapes=shapes)
    torch.export.save(ep, str(p))
    t, z = run(p)
    assert t.format == "torch.export"
    assert t.input_shape == [1, 28, 28]  # taken from the program's input spec
    assert t.fixed_batch == (None if dynamic else 8)
    torch.testing.assert_close(z, expected(tiny))


@pytest.mark.parametrize("batch,flat", [(None, False), (1, False), (5, True)])
def test_onnx(tmp_path, tiny, batch, flat):
    p = export_onnx(tiny, tmp_path / "m.onnx", batch=batch, flat=flat)
    t, z = run(p)
    assert t.format == "onnx" and t.fixed_batch == batch
    torch.testing.assert_close(z, expected(tiny), rtol=1e-5, atol=1e-5)


def test_onnx_with_several_outputs_needs_output_name(tmp_path, tiny):
    p = export_onnx(tiny, tmp_path / "m.onnx", extra_output=True)
    with pytest.raises(UsageError, match="--output"):
        load_teacher(p)
    t, z = run(p, output_name="scores")
    torch.testing.assert_close(z, expected(tiny), rtol=1e-5, atol=1e-5)
    t, z = run(p, output_name="prob")  # probabilities are detected and made logits
    assert t.output == "probs"
    torch.testing.assert_close(torch.softmax(z, -1), torch.softmax(expected(tiny), -1),
                               rtol=1e-4, atol=1e-6)


def test_state_dict_with_kdcli_arch(tmp_path, tiny):
    p = tmp_path / "sd.pt"
    torch.save(tiny.state_dict(), p)  # keys fc1.*, fc2.*: mapped by order and shape
    with pytest.raises(UsageError, match="--arch"):
        load_teacher(p)
    t, z = run(p, arch="mlp:32")
    assert t.format == "state_dict"
    torch.testing.assert_close(z, expected(tiny))
    with pytest.raises(FormatError, match="does not fit"):
        load_teacher(p, TeacherOptions(arch="mlp:64"))


def test_nested_checkpoint_and_safetensors_state_dict(tmp_path, tiny):
    p = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": tiny.state_dict()}, p)
    _, z = run(p, arch="mlp:32")
    torch.testing.assert_close(z, expected(tiny))
    s = tmp_path / "sd.safetensors"
    save_file(tiny.state_dict(), str(s))
    t, z = run(s, arch="mlp:32")
    assert t.format == "state_dict"
    torch.testing.assert_close(z, expected(tiny))


def test_state_dict_with_user_factory(tmp_path, tiny, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    p = tmp_path / "sd.pt"
    torch.save(tiny.state_dict(), p)
    _, z = run(p, arch="conftest:tiny_factory")
    torch.testing.assert_close(z, expected(tiny))
    with pytest.raises(UsageError, match="cannot import"):
        load_teacher(p, TeacherOptions(arch="no_such_module:f"))


def test_pickled_module_needs_trust_flag(tmp_path, tiny, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    p = tmp_path / "full.pt"
    torch.save(tiny, p)
    with pytest.raises(UnsafePickleError, match="runs code.*--trust-pickle"):
        load_teacher(p)
    t, z = run(p, trust_pickle=True)
    assert t.format == "pickle"
    torch.testing.assert_close(z, expected(tiny))


@pytest.mark.parametrize("kind", ["probs", "log-probs"])
def test_probability_outputs_become_logits(tmp_path, tiny, kind):
    model = torch.nn.Sequential(tiny, torch.nn.Softmax(-1) if kind == "probs"
                                else torch.nn.LogSoftmax(-1))
    p = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(model), str(p))
    t, z = run(p)
    assert t.output == kind  # detected
    ref = expected(tiny)
    # log p equals the logits up to a constant per row, so the softmax is the same.
    torch.testing.assert_close(torch.softmax(z, -1), torch.softmax(ref, -1), atol=1e-6,
                               rtol=1e-4)
    t2, _ = run(p, output="logits")  # an explicit flag wins over detection
    assert t2.output == "logits"


def test_input_shape_flag_and_mismatch_error(tmp_path):
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(),
                               torch.nn.Linear(2 * 26 * 26, 10)).eval()
    p = tmp_path / "conv.pt"
    torch.jit.save(torch.jit.script(conv), str(p))
    t, _ = run(p)  # tries [28, 28], [784], then finds [1, 28, 28]
    assert t.input_shape == [1, 28, 28]
    _, z = run(p, input_shape=[1, 28, 28])
    assert z.shape == (37, 10)
    with pytest.raises(ModelError, match="--input-shape"):
        load_teacher(p, TeacherOptions(input_shape=[3, 28, 28]), probe=X)
    bad = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(100, 10)).eval()
    torch.jit.save(torch.jit.script(bad), str(tmp_path / "bad.pt"))
    with pytest.raises(ModelError, match="--input-shape"):
        load_teacher(tmp_path / "bad.pt", probe=X)


def test_onnx_input_shape_mismatch_names_the_expected_shape(tmp_path, tiny):
    p = export_onnx(tiny, tmp_path / "m.onnx", flat=True)
    t = load_teacher(p)
    with pytest.raises(ModelError, match=r"\[784\]"):
        t.logits(torch.zeros(2, 30, 30))


def test_corrupt_and_unknown_files(tmp_path, tiny, teacher_file):
    cases = {}
    ts = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(tiny), str(ts))
    cases["torchscript"] = ts.read_bytes()[: ts.stat().st_size // 2]
    sd = tmp_path / "sd.pt"
    torch.save(tiny.state_dict(), sd)
    cases["torch.save"] = sd.read_bytes()[:300]
    cases["pickle"] = pickle.dumps({"a": 1})[:-3]
    cases["safetensors"] = teacher_file.read_bytes()[:200]
    onx = export_onnx(tiny, tmp_path / "m.onnx")
    cases["onnx"] = onx.read_bytes()[: onx.stat().st_size // 3]
    cases["unknown"] = b"hello, I am not a model" * 10
    for name, data in cases.items():
        p = tmp_path / f"bad-{name}.bin"
        p.write_bytes(data)
        with pytest.raises((FormatError, ModelError)):
            load_teacher(p, TeacherOptions(arch="mlp:32"))
            pytest.fail(name)


def test_detect_format_by_content(tmp_path, tiny, teacher_file):
    p = tmp_path / "model.onnx"
    torch.jit.save(torch.jit.script(tiny), str(p))  # misleading extension
    assert detect_format(p) == "torchscript"
    assert detect_format(teacher_file) == "kdcli"
    onnx_file = export_onnx(tiny, tmp_path / "model.pt")  # ONNX behind a .pt name
    assert detect_format(onnx_file) == "onnx"


def test_kdcli_model_trained_on_named_classes_keeps_its_class_names(tmp_path):
    """`train` records a table's class names at the top level of the model file; the
    teacher must read them there (and the transfer-set metadata record them)."""
    from kdcli.config import TrainConfig
    from kdcli.data.base import DataOptions
    from kdcli.output import Reporter
    from kdcli.students.base import Architecture
    from kdcli.train import train

    table = tmp_path / "pets.csv"
    gen = torch.Generator().manual_seed(0)
    rows = [f"{a:.3f},{b:.3f},{['cat', 'dog', 'eel'][i % 3]}"
            for i, (a, b) in enumerate(torch.rand(30, 2, generator=gen).tolist())]
    table.write_text("a,b,kind\n" + "\n".join(rows) + "\n")
    out = tmp_path / "pets.safetensors"
    train(str(table), arch=Architecture.parse("mlp:8"), out=out, config=TrainConfig(epochs=1),
          eval_data="none", data_options=DataOptions(label_column="kind"),
          reporter=Reporter("quiet"))
    t = load_teacher(out)
    assert t.class_names == ["cat", "dog", "eel"]
    assert t.describe()["class_names"] == ["cat", "dog", "eel"]


class _TextFormat:
    """A stand-in format entry for a model that reads raw text (what text formats plug into)."""

    name = "text-stand-in"


def test_a_text_model_gets_its_texts_as_they_are_and_is_probed_on_texts(tmp_path):
    from kdcli.teachers.base import TEXT, InputSpec, Teacher
    from kdcli.teachers.probe import settle

    seen = []

    def runner(texts):  # scores from the texts' lengths: [B, 3]
        seen.append(list(texts))
        n = torch.tensor([float(len(t)) for t in texts])
        return torch.stack([n, -n, n / 2], 1)

    t = Teacher(path=tmp_path / "m", format="text-stand-in", fmt=_TextFormat(), sha256="",
                runner=runner, inputs=(InputSpec("text", TEXT),))
    assert t.takes_text
    probed = settle(t, None)  # no data: probed on two short texts
    assert probed.num_classes == 3 and probed.output == "logits" and seen[-1] == [
        "a short probe text", "another one"]
    z = probed.logits(["ab", "abcd"])
    assert seen[-1] == ["ab", "abcd"]  # untouched: no float cast, no reshape, no scaling
    assert torch.equal(z, torch.tensor([[2.0, -2.0, 1.0], [4.0, -4.0, 2.0]]))
    with pytest.raises(ModelError, match="fails on texts"):
        settle(Teacher(path=tmp_path / "m", format="x", fmt=_TextFormat(), sha256="",
                       runner=lambda texts: 1 / 0, inputs=(InputSpec("text", TEXT),)), ["a"])
