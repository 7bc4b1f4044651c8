"""Data sources: bundled MNIST, IDX/npz/npy/safetensors files, slices, and bad data."""

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kdcli.data.idx import read_idx
from kdcli.data.mnist import MNIST_DIR
from kdcli.data.sources import balanced_index, load_data
from kdcli.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist" / "SHA256SUMS"


def test_bundled_mnist_matches_sha256sums():
    sums = (MNIST_DIR / "SHA256SUMS").read_text().split("\n")
    entries = [line.split() for line in sums if line.strip()]
    assert len(entries) == 4
    for digest, name in entries:
        assert hashlib.sha256((MNIST_DIR / name).read_bytes()).hexdigest() == digest
    if SHARED.exists():  # the project's copy is the shared reference copy
        assert SHARED.read_text().split() == (MNIST_DIR / "SHA256SUMS").read_text().split()


def test_mnist_splits_and_label_counts():
    test = load_data("mnist:test")
    assert test.inputs.shape == (10000, 28, 28) and test.inputs.dtype == torch.uint8
    assert int((test.labels == 3).sum()) == 1010  # the count the paper quotes
    train = load_data("mnist[:100]")
    assert len(train) == 100 and train.source == "mnist[:100]"
    assert torch.equal(load_data("mnist:train[:100]").inputs, train.inputs)


def test_slices_and_limit():
    a = load_data("mnist:test[100:200]")
    b = load_data("mnist:test")
    assert torch.equal(a.inputs, b.inputs[100:200])
    assert len(load_data("mnist:test", limit=7)) == 7
    assert len(load_data("mnist:test[-5:]")) == 5


def test_balanced_sample_is_class_balanced_seeded_and_stable():
    full = load_data("mnist:train")
    a = load_data("mnist:train[balanced=1800,seed=0]")
    assert len(a) == 1800 and torch.bincount(a.labels).tolist() == [180] * 10
    assert a.source == "mnist:train[balanced=1800,seed=0]"
    # Each row is a real training digit with its own label, kept in the original order.
    index = balanced_index(full.labels, 1800, 0)
    assert bool((index[1:] > index[:-1]).all())
    assert torch.equal(a.inputs, full.inputs[index]) and torch.equal(a.labels, full.labels[index])
    # Seed 0 is the default; the same seed gives the same digits, another seed others.
    assert torch.equal(load_data("mnist:train[balanced=1800]").inputs, a.inputs)
    b = load_data("mnist:train[ balanced = 1800 , seed = 1 ]")
    assert torch.bincount(b.labels).tolist() == [180] * 10
    assert not torch.equal(a.inputs, b.inputs)
    # A smaller sample with the same seed is not a prefix of a larger one per se, but it
    # is a subset drawn the same way: the first rows of each class's permutation.
    small = balanced_index(full.labels, 100, 0)
    assert set(small.tolist()) <= set(index.tolist())


@pytest.mark.parametrize("spec, message", [
    ("mnist:train[balanced=1805]", "a positive multiple of the 10 classes"),
    ("mnist:train[balanced=0]", "a positive multiple"),
    ("mnist:test[balanced=10000]", "has only 892 examples of class 5"),
])
def test_balanced_sample_refuses_what_it_cannot_draw(spec, message):
    with pytest.raises(DataError, match=message):
        load_data(spec)


def test_balanced_sample_needs_labels(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((20, 3), dtype=np.float32))
    with pytest.raises(DataError, match="needs labels"):
        load_data(f"{tmp_path / 'x.npy'}[balanced=10]")


def write_idx(path: Path, arr: np.ndarray, code: int = 0x08, magic: bytes | None = None) -> Path:
    head = magic or bytes([0, 0, code, arr.ndim])
    body = head + b"".join(struct.pack(">I", s) for s in arr.shape) + arr.astype(">u1").tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(body)
    return path


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_files_by_path_pair_with_labels(tmp_path, suffix):
    imgs = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    write_idx(tmp_path / f"my-images-idx3-ubyte{suffix}", imgs)
    write_idx(tmp_path / f"my-labels-idx1-ubyte{suffix}", np.array([0, 2, 1], dtype=np.uint8))
    d = load_data(str(tmp_path / f"my-images-idx3-ubyte{suffix}"))
    assert d.inputs.shape == (3, 4, 4) and d.labels.tolist() == [0, 2, 1]
    assert np.array_equal(d.inputs.numpy(), imgs)


def test_npz_npy_and_safetensors(tmp_path):
    x = np.random.default_rng(0).random((5, 3, 2)).astype(np.float32)
    y = np.array([0, 1, 2, 1, 0])
    np.savez(tmp_path / "d.npz", inputs=x, labels=y)
    np.save(tmp_path / "d.npy", x)
    save_file({"inputs": torch.from_numpy(x), "labels": torch.from_numpy(y)},
              str(tmp_path / "d.safetensors"))
    for name, has_labels in (("d.npz", True), ("d.npy", False), ("d.safetensors", True)):
        d = load_data(str(tmp_path / name))
        assert d.inputs.shape == (5, 3, 2)
        assert (d.labels is not None) == has_labels


def bad_cases(tmp_path: Path) -> dict[str, str]:
    """Each bad-data case the CLI must reject with one line and exit 1."""
    imgs = np.zeros((3, 4, 4), dtype=np.uint8)
    cases = {}
    cases["magic"] = str(write_idx(tmp_path / "bad-images-idx3-ubyte", imgs,
                                   magic=b"\x12\x34\x08\x03"))
    d = tmp_path / "count"
    d.mkdir()
    write_idx(d / "x-images-idx3-ubyte", imgs)
    write_idx(d / "x-labels-idx1-ubyte", np.array([1, 2], dtype=np.uint8))
    cases["count mismatch"] = str(d / "x-images-idx3-ubyte")
    np.savez(tmp_path / "neg.npz", inputs=np.zeros((2, 3)), labels=np.array([0, -1]))
    cases["labels out of range"] = str(tmp_path / "neg.npz")
    np.savez(tmp_path / "nan.npz", inputs=np.array([[0.0, np.nan]]), labels=np.array([0]))
    cases["NaN"] = str(tmp_path / "nan.npz")
    (tmp_path / "empty.npz").write_bytes(b"")
    cases["empty file"] = str(tmp_path / "empty.npz")
    np.savez(tmp_path / "zero.npz", inputs=np.zeros((0, 3)))
    cases["no examples"] = str(tmp_path / "zero.npz")
    (tmp_path / "data.xyz").write_text("1,2,3\n")
    cases["unknown extension"] = str(tmp_path / "data.xyz")
    (tmp_path / "header.csv").write_text("a,b,label\n")
    cases["header-only table"] = str(tmp_path / "header.csv")
    trunc = write_idx(tmp_path / "t-images-idx3-ubyte", imgs)
    trunc.write_bytes(trunc.read_bytes()[:-5])
    cases["truncated"] = str(trunc)
    cases["missing"] = str(tmp_path / "nope.npz")
    np.savez(tmp_path / "floatlab.npz", inputs=np.zeros((2, 3)), labels=np.array([0.5, 1.0]))
    cases["float labels"] = str(tmp_path / "floatlab.npz")
    return cases


def test_bad_data_raises_data_error(tmp_path):
    for name, spec in bad_cases(tmp_path).items():
        with pytest.raises(DataError):
            load_data(spec)
            pytest.fail(f"{name} was accepted")


def test_bad_data_through_cli_is_one_line_exit_1_and_no_output(cli, tmp_path):
    for name, spec in bad_cases(tmp_path).items():
        out = tmp_path / "m.safetensors"
        r = cli("train", "--data", spec, "--epochs", "1", "--out", out, "--eval-data", "none")
        assert r.exit_code == 1, (name, r.output)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: "), (name, r.stderr)
        assert "Traceback" not in r.output
        assert not out.exists(), name
        assert not list(tmp_path.glob(".m.safetensors*")), name


def test_read_idx_rejects_wrong_magic(tmp_path):
    p = tmp_path / "x-images-idx3-ubyte"
    p.write_bytes(b"\x00\x00\x99\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="magic"):
        read_idx(p)


def test_read_idx_rejects_damaged_gzip_in_one_line(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 5), dtype=np.uint8)
    good = write_idx(tmp_path / "g-images-idx3-ubyte.gz", pixels)
    raw = good.read_bytes()
    assert read_idx(good).shape == (4, 5, 5)
    mid = len(raw) // 2  # inside the deflate stream
    damaged = {"truncated": raw[:-6], "stream": raw[:mid] + b"\xff" * 5 + raw[mid + 5:],
               "checksum": raw[:-8] + bytes(4) + raw[-4:]}
    for name, data in damaged.items():
        p = tmp_path / f"{name}-images-idx3-ubyte.gz"
        p.write_bytes(data)
        with pytest.raises(DataError, match="cannot read"):
            read_idx(p)


def test_idx_bombs_are_refused_before_they_are_inflated(tmp_path, monkeypatch):
    from kdcli.data import idx
    from kdcli.errors import ResourceError

    # a header promising 10^15 bytes: refused from the header, nothing decompressed after it
    header = bytes([0, 0, 0x08, 3]) + b"".join(n.to_bytes(4, "big") for n in (10**5,) * 3)
    (tmp_path / "h-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(100)))
    limits = []
    real = idx._gunzip
    monkeypatch.setattr(idx, "_gunzip", lambda raw, limit: (limits.append(limit),
                                                            real(raw, limit))[1])
    with pytest.raises(ResourceError, match=r"shape \(100000, 100000, 100000\)"):
        read_idx(tmp_path / "h-images-idx3-ubyte.gz")
    assert limits == [idx._MAX_HEADER]  # the header only
    # 2x2 pixels promised, 64 MB of zeros inflated from 64 KB: stopped one byte past
    small = bytes([0, 0, 0x08, 2]) + (2).to_bytes(4, "big") * 2
    (tmp_path / "b-images-idx3-ubyte.gz").write_bytes(gzip.compress(small + bytes(64 << 20)))
    limits.clear()
    with pytest.raises(DataError, match=r"holds more data bytes, but its header promises "
                                        r"shape \(2, 2\) \(4 bytes\)"):
        read_idx(tmp_path / "b-images-idx3-ubyte.gz")
    assert limits == [idx._MAX_HEADER, 12 + 4 + 1]
    # a file of several gzip members (and zero padding) reads as their concatenation
    body = small + bytes([1, 2, 3, 4])
    (tmp_path / "m-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(body[:6]) + gzip.compress(body[6:]) + bytes(8))
    assert read_idx(tmp_path / "m-images-idx3-ubyte.gz").tolist() == [[1, 2], [3, 4]]


def test_labels_beyond_the_model_classes_are_rejected(tmp_path):
    from kdcli.evaluate import classification_metrics

    with pytest.raises(DataError, match="classes"):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 5]))
