"""kdcli soft-targets: exactness, ensembles, the file format, options and bad input."""

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kdcli.data.sources import load_data
from kdcli.errors import FormatError, KdcliError, ModelError
from kdcli.io.storage import SafetensorsWriter
from kdcli.soft_targets import soft_targets
from kdcli.teachers.base import TeacherOptions
from kdcli.teachers.formats import load_teacher
from kdcli.teachers.inputs import prepare_input
from kdcli.transfer.reader import load_transfer_set
from kdcli.transfer.writer import _check_finite, weight_cast_cache

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TinyMLP  # noqa: E402


def scripted(tmp_path, seed=0, classes=10, name=None):
    p = tmp_path / (name or f"t{seed}.pt")
    torch.jit.save(torch.jit.script(TinyMLP(seed, classes).eval()), str(p))
    return p


def test_soft_targets_equal_softmax_of_logits_at_T(tmp_path, teacher_file):
    out = tmp_path / "ts.safetensors"
    soft_targets([teacher_file], T=7.5, data="mnist[:3000]", out=out, batch_size=256)
    ts = load_transfer_set(out)
    ref = np.exp(ts.logits.double().numpy() / 7.5)  # an independent computation (numpy)
    ref /= ref.sum(1, keepdims=True)
    assert np.abs(ts.soft_targets.numpy() - ref).max() <= 1e-6
    assert np.abs(ts.soft_targets.double().sum(1).numpy() - 1).max() <= 1e-6
    # the logits are the teacher's own, on the stored inputs
    t = load_teacher(teacher_file)
    torch.testing.assert_close(ts.logits, t.logits(ts.inputs), rtol=0, atol=0)
    assert ts.inputs.dtype == torch.uint8 and ts.inputs.shape == (3000, 28, 28)
    assert ts.labels.dtype == torch.int64


def test_file_is_plain_safetensors_with_full_metadata(tmp_path, teacher_file):
    out = tmp_path / "ts.safetensors"
    soft_targets([teacher_file], T=20, data="mnist[:500]", out=out)
    tensors = load_file(str(out))  # the reference reader accepts our streaming writer
    assert set(tensors) == {"inputs", "labels", "logits", "soft_targets"}
    ts = load_transfer_set(out)
    m = ts.meta
    assert m["format"] == "kdcli.transfer-set" and m["format_version"] == "3"
    assert float(m["T"]) == 20 and m["combine"] == "mean-probs" and m["weights"] == [1.0]
    assert m["num_classes"] == "10" and m["num_examples"] == "500"
    assert m["data_source"] == "mnist[:500]" and len(m["inputs_sha256"]) == 64
    (teacher,) = m["teachers"]
    assert teacher["file"] == "teacher.safetensors" and teacher["format"] == "kdcli"
    assert len(teacher["sha256"]) == 64 and "preprocessing" in teacher
    assert m["kdcli_version"] and m["created"].endswith("Z")


@pytest.mark.parametrize("combine", ["mean-probs", "mean-logits"])
def test_ensemble_combination(tmp_path, combine):
    paths = [scripted(tmp_path, s) for s in range(3)]
    w = [0.5, 0.3, 0.2]
    out = tmp_path / "ens.safetensors"
    summary = soft_targets(paths, T=3.0, data="mnist[:400]", out=out, combine=combine,
                           weights=w, options=[TeacherOptions(scale=255.0)], batch_size=96)
    ts = load_transfer_set(out)
    x = ts.inputs.float() / 255
    with torch.no_grad():
        z = torch.stack([TinyMLP(s)(x) for s in range(3)])
    torch.testing.assert_close(ts.member_logits, z)
    wt = torch.tensor(w)[:, None, None]
    if combine == "mean-probs":
        ref = (wt * torch.softmax(z / 3.0, -1)).sum(0)  # the paper's arithmetic mean
    else:
        ref = torch.softmax((wt * z).sum(0) / 3.0, -1)  # geometric mean
    torch.testing.assert_close(ts.soft_targets, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.softmax(ts.logits / 3.0, -1), ts.soft_targets,
                               atol=1e-6, rtol=1e-5)
    assert len(summary["teachers"]) == 3
    # the counts, over batches of 96: each member's, the ensemble's, the rows they split on
    preds = z.argmax(-1)  # [3, 400]
    for record, p in zip(summary["teachers"], preds, strict=True):
        assert record["accuracy"] == float((p == ts.labels).double().mean())
    assert summary["ensemble_accuracy"] == float((ts.logits.argmax(-1) == ts.labels)
                                                 .double().mean())
    assert summary["disagreement"] == float((preds != preds[0]).any(0).double().mean()) > 0
    # re-deriving at another T uses each member's logits exactly
    ref5 = (wt * torch.softmax(z / 5.0, -1)).sum(0) if combine == "mean-probs" else \
        torch.softmax((wt * z).sum(0) / 5.0, -1)
    torch.testing.assert_close(ts.targets_at(5.0), ref5, atol=1e-6, rtol=1e-5)


def test_class_filters_limit_and_jittered_copies(tmp_path, teacher_file):
    out = tmp_path / "a.safetensors"
    soft_targets([teacher_file], T=2, data="mnist[:1000]", out=out, exclude_classes=[3])
    ts = load_transfer_set(out)
    threes = int((load_data("mnist[:1000]").labels == 3).sum())
    assert threes > 0 and 3 not in ts.labels.tolist() and len(ts) == 1000 - threes
    out2 = tmp_path / "b.safetensors"
    soft_targets([teacher_file], T=2, data="mnist", out=out2, classes=[7, 8], limit=500)
    assert set(load_transfer_set(out2).labels.tolist()) == {7, 8}
    out3 = tmp_path / "c.safetensors"
    soft_targets([teacher_file], T=2, data="mnist[:100]", out=out3, jitter=2, copies=2)
    ts3 = load_transfer_set(out3)
    assert len(ts3) == 300 and torch.equal(ts3.labels[:100], ts3.labels[100:200])
    assert not torch.equal(ts3.inputs[:100], ts3.inputs[100:200])
    # every copy is its original shifted by whole pixels in -2..2, zero-filled
    padded = torch.nn.functional.pad(ts3.inputs[:100], (2, 2, 2, 2))
    shifts = torch.stack([padded[:, 2 - dy:30 - dy, 2 - dx:30 - dx]
                          for dy in range(-2, 3) for dx in range(-2, 3)], 1)  # [100, 25, 28, 28]
    for copy in (ts3.inputs[100:200], ts3.inputs[200:300]):
        match = (shifts == copy[:, None]).flatten(2).all(-1)  # [100, 25]
        assert bool(match.any(1).all())
        assert int(match[:, 12].sum()) < 50  # most copies really moved (index 12: no shift)


def test_nan_teacher_names_the_rows(tmp_path):
    ink = float(load_data("mnist[5:6]").inputs.float().sum())

    class Bad(torch.nn.Module):
        """NaN for exactly the example whose pixel sum is ``ink`` (MNIST row 5)."""

        def __init__(self):
            super().__init__()
            self.ink = ink

        def forward(self, x):
            s = x.flatten(1).sum(1, keepdim=True)
            return x.flatten(1)[:, :10] + torch.where(s == self.ink, float("nan"), 0.0)

    p = tmp_path / "bad.pt"
    torch.jit.save(torch.jit.script(Bad()), str(p))
    with pytest.raises(ModelError, match=r"NaN or Inf \(first bad rows \[5\]\)"):
        soft_targets([p], T=2, data="mnist[:50]", out=tmp_path / "o.safetensors",
                     options=[TeacherOptions(output="logits")])
    assert not (tmp_path / "o.safetensors").exists()


def bad_runs(tmp_path, teacher_file):
    five = scripted(tmp_path, 0, classes=5, name="five.pt")
    other = scripted(tmp_path, 1, classes=12, name="twelve.pt")
    (tmp_path / "corrupt.safetensors").write_bytes(teacher_file.read_bytes()[:300])
    return {
        "missing file": ([tmp_path / "nope.pt"], {}),
        "unknown format": ([tmp_path / "corrupt.safetensors"], {}),
        "classes do not cover labels": ([five], {}),
        "T zero": ([teacher_file], {"T": 0.0}),
        "T NaN": ([teacher_file], {"T": math.nan}),
        "T inf": ([teacher_file], {"T": math.inf}),
        "empty data": ([teacher_file], {"data": "mnist[5:5]"}),
        "class counts differ": ([teacher_file, other], {}),
        "weights count": ([teacher_file, teacher_file], {"weights": [1.0]}),
        "negative weight": ([teacher_file, teacher_file], {"weights": [1.0, -1.0]}),
        "unknown class": ([teacher_file], {"classes": [11]}),
    }


def test_bad_input_errors_and_leaves_no_output(tmp_path, teacher_file):
    for name, (teachers, kw) in bad_runs(tmp_path, teacher_file).items():
        out = tmp_path / "out.safetensors"
        kw = {"T": 2.0, "data": "mnist[:64]", **kw}
        with pytest.raises(KdcliError):
            soft_targets(teachers, out=out, **kw)
            pytest.fail(name)
        assert not out.exists(), name
        assert not list(tmp_path.glob(".out.safetensors*")), name


def test_cli_bad_input_is_one_line(cli, tmp_path, teacher_file):
    r = cli("soft-targets", teacher_file, "--T", "-1", "--data", "mnist[:10]")
    assert r.exit_code == 1 and r.stderr.startswith("Error: --T must be")
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli("soft-targets", tmp_path / "missing.pt")
    assert r.exit_code == 1 and "does not exist" in r.stderr
    torch.save(TinyMLP(), tmp_path / "full.pt")
    r = cli("soft-targets", tmp_path / "full.pt", "--data", "mnist[:10]")
    assert r.exit_code == 1 and "--trust-pickle" in r.stderr and "runs code" in r.stderr


def test_cli_writes_transfer_set_and_json(cli, tmp_path, teacher_file):
    r = cli("soft-targets", teacher_file, "--T", "20", "--data", "mnist[:300]", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["examples"] == 300 and summary["T"] == 20.0
    assert Path("transfer.safetensors").exists()
    r = cli("soft-targets", teacher_file, "--T", "20", "--data", "mnist[:300]")
    assert r.exit_code == 1 and "--force" in r.stderr  # no overwrite without --force
    r = cli("soft-targets", teacher_file, "-T", "3", "--data", "mnist[:300]", "--force", "-q")
    assert r.exit_code == 0 and r.stdout == ""
    assert load_transfer_set("transfer.safetensors").T == 3.0


def test_per_teacher_preprocessing_flags(cli, tmp_path):
    a, b = scripted(tmp_path, 0), scripted(tmp_path, 1)
    r = cli("soft-targets", a, b, "--data", "mnist[:64]", "--scale", "255", "--scale", "1",
            "--input-shape", "784", "--json")
    assert r.exit_code == 0, r.output
    teachers = load_transfer_set("transfer.safetensors").meta["teachers"]
    assert [t["preprocessing"]["scale"] for t in teachers] == [255.0, 1.0]
    assert [t["input_shape"] for t in teachers] == [[784], [784]]
    r = cli("soft-targets", a, b, "--data", "mnist[:64]", "--scale", "1", "--scale", "2",
            "--scale", "3", "--force")
    assert r.exit_code == 1 and "once per model" in r.stderr


def test_reader_rejects_damaged_transfer_sets(tmp_path, transfer_file):
    from safetensors.torch import save_file

    tensors = load_file(str(transfer_file))
    meta = load_transfer_set(transfer_file).meta
    # rewritten by another writer, without kdcli's checksum: an older version 2 file
    raw_meta = {k: (json.dumps(v) if isinstance(v, (list, dict)) or v is None else str(v))
                for k, v in meta.items() if k != "data_sha256"} | {"format_version": "2"}
    cases = {
        "version": ({}, {"format_version": "4"}, "version 4"),
        "name": ({}, {"format": "nope"}, "not 'kdcli.transfer-set'"),
        "missing": ({"soft_targets": None}, {}, "lacks the tensor"),
        "shape": ({"labels": tensors["labels"][:5]}, {}, "labels of shape"),
        "rows": ({"logits": tensors["logits"][:7]}, {}, "mismatched shapes"),
        "nan": ({"soft_targets": tensors["soft_targets"].clone().index_fill_(0, torch.tensor([4]),
                                                                              float("nan"))},
                {}, r"NaN or Inf in soft_targets \(rows \[4\]\)"),
    }
    for name, (tchange, mchange, match) in cases.items():
        t = {k: v for k, v in {**tensors, **tchange}.items() if v is not None}
        p = tmp_path / f"{name}.safetensors"
        save_file(t, str(p), metadata={**raw_meta, **mchange})
        with pytest.raises(FormatError, match=match):
            load_transfer_set(p)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(transfer_file.read_bytes()[:-100])
    with pytest.raises(FormatError, match="truncated"):
        load_transfer_set(trunc)


def test_inspect_shows_dark_knowledge(cli, transfer_file):
    r = cli("inspect", transfer_file, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["kind"] == "transfer set" and info["T"] == 4.0
    assert len(info["dark_knowledge"]) == 10 and info["mean_entropy_nats"] > 0
    assert all(d["closest"] != d["class"] for d in info["dark_knowledge"])
    r = cli("inspect", transfer_file)
    assert "Dark knowledge" in r.stdout
    with pytest.raises(FormatError, match="transfer set, not a model"):
        soft_targets([transfer_file], out="x.safetensors")


def test_kdcli_teacher_takes_raw_inputs_with_the_same_logits(teacher_file):
    x = load_data("mnist[:300]").inputs
    for precision in ("fp32", "bf16"):
        t = load_teacher(teacher_file, precision=precision)
        assert t.prepare(x).dtype == torch.uint8  # no float copy: the model converts them
        floats = prepare_input(x, t.preprocessing, t.input_shape, "float32")
        with weight_cast_cache([t]):
            old = t.check_output(t.forward(floats), len(x))
            torch.testing.assert_close(t.logits(x), old, rtol=0, atol=0)


def test_set_checksum_continues_the_inputs_hash(tmp_path, teacher_file, monkeypatch):
    taken = []
    own = SafetensorsWriter.already_hashed
    monkeypatch.setattr(SafetensorsWriter, "already_hashed",
                        lambda w, name, state: (taken.append(name), own(w, name, state)))
    out = tmp_path / "ts.safetensors"
    soft_targets([teacher_file], T=20, data="mnist[:1000]", out=out, batch_size=300)
    assert taken == ["inputs"]  # hashed once, for inputs_sha256, not again for the file
    raw = out.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    assert meta["data_sha256"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    inputs = load_data("mnist[:1000]").inputs.numpy().tobytes()
    assert meta["inputs_sha256"] == hashlib.sha256(inputs).hexdigest()
    w = SafetensorsWriter(tmp_path / "x.safetensors", {"a": (torch.uint8, (4,)),
                                                       "b": (torch.uint8, (4,))}, {})
    with w:
        with pytest.raises(ValueError):  # not the first tensor
            w.already_hashed("b", hashlib.sha256())
        w.write("a", 0, torch.zeros(4, dtype=torch.uint8))
        w.write("b", 0, torch.zeros(4, dtype=torch.uint8))


def test_finite_check_takes_huge_logits_and_finds_every_bad_one(tmp_path):
    t = [load_teacher(scripted(tmp_path), TeacherOptions(), probe=torch.zeros(1, 28, 28))]
    _check_finite(torch.full((1, 4, 3), 3e38), t, 0)  # finite, though their sum is not
    for bad in (float("nan"), float("inf"), -float("inf")):
        z = torch.zeros(1, 4, 3)
        z[0, 2, 1] = bad
        with pytest.raises(ModelError, match=r"first bad rows \[12\]"):
            _check_finite(z, t, 10)
    z = torch.full((1, 4, 3), 3e38)
    z[0, 3, 0] = -float("inf")  # the sum overflows to +inf as well
    with pytest.raises(ModelError, match=r"first bad rows \[3\]"):
        _check_finite(z, t, 0)


def test_writer_hashes_in_file_order_and_replaces_a_longer_file(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"x" * 5_000_000)  # longer than the new file: cut to its size
    a = torch.arange(600_000, dtype=torch.int32)  # 2.4 MB: some chunks hashed on the thread
    b = torch.arange(1000, dtype=torch.float32)
    sizes = [100, 300_000, 7, 70_000, 200_000, 29_893]  # small and large chunks, in order
    with SafetensorsWriter(path, {"a": (torch.int32, (600_000,)), "b": (torch.float32, (1000,))},
                           {"k": "v"}) as w:
        w.write("b", 500, b[500:])  # out of file order: hashed when read back
        start = 0
        for n in sizes:
            w.write("a", start, a[start:start + n])
            start += n
        w.write("b", 0, b[:500])
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert len(raw) == 8 + n + 2_404_000
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    assert meta["data_sha256"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    got = load_file(path)
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)
