"""Sharded transfer sets: the same tensors as one file, training reads them identically, and
every way an index and its shards can disagree gets a clear error."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from kdcli.checks import parse_size
from kdcli.errors import DataError, FormatError, UsageError
from kdcli.soft_targets import soft_targets
from kdcli.students.base import Architecture
from kdcli.train import TrainConfig, train_student
from kdcli.transfer.reader import load_transfer_set


@pytest.fixture(scope="module")
def sets(tmp_path_factory, teacher_file):
    """The same transfer set (with 1 jittered copy) as one file and as 6 shards."""
    d = tmp_path_factory.mktemp("shards")
    kw = {"T": 4.0, "data": "mnist[:1500]", "jitter": 2, "copies": 1}
    soft_targets([teacher_file], out=d / "one.safetensors", **kw)
    s = soft_targets([teacher_file], out=d / "set.index.json", shard_size="500KB", **kw)
    return d, s


def test_shards_hold_exactly_the_single_file_tensors(sets):
    d, summary = sets
    one, sharded = load_transfer_set(d / "one.safetensors"), load_transfer_set(d / "set.index.json")
    assert summary["shards"] == len(sharded.shards) > 3
    assert all((d / s["file"]).stat().st_size <= 500_000 for s in sharded.shards)
    for name in ("inputs", "labels", "logits", "soft_targets"):
        assert torch.equal(one.columns[name].whole(), sharded.columns[name].whole()), name
    skip = ("created", "format_version", "data_sha256")  # data_sha256 is per file
    a = {k: v for k, v in one.meta.items() if k not in skip}
    b = {k: v for k, v in sharded.meta.items() if k not in skip}
    assert a == b
    idx = torch.tensor([2999, 0, 1700, 512, 513, 2000, 5])  # rows across shard borders
    assert torch.equal(sharded.columns["inputs"][idx], one.inputs[idx])
    assert torch.equal(sharded.targets(idx, 2.0), one.targets(idx, 2.0))


def test_training_on_shards_is_bit_identical(sets, tmp_path):
    d, _ = sets
    kw = {"arch": Architecture.parse("mlp:32"), "config": TrainConfig(epochs=1, lr=0.02),
          "eval_data": None}
    train_student(d / "one.safetensors", out=tmp_path / "a.safetensors", **kw)
    train_student(d / "set.index.json", out=tmp_path / "b.safetensors", **kw)
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shard_size_needs_an_index_name(tmp_path, teacher_file):
    with pytest.raises(UsageError, match=r"Use --out x\.index\.json"):
        soft_targets([teacher_file], data="mnist[:100]", out=tmp_path / "x.safetensors",
                     shard_size="1MB")
    for bad in ("lots", "-1MB", "0"):
        with pytest.raises(UsageError, match="size"):
            parse_size(bad)
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("500MB") == 500_000_000


def test_overwriting_a_sharded_set_needs_force_and_removes_old_shards(tmp_path, teacher_file):
    out = tmp_path / "s.index.json"
    soft_targets([teacher_file], data="mnist[:600]", out=out, shard_size="100KB")
    old = sorted(p.name for p in tmp_path.glob("s-*.safetensors"))
    with pytest.raises(Exception, match="already exists"):
        soft_targets([teacher_file], data="mnist[:600]", out=out, shard_size="100KB")
    soft_targets([teacher_file], data="mnist[:600]", out=out, shard_size="300KB", force=True)
    new = sorted(p.name for p in tmp_path.glob("s-*.safetensors"))
    assert len(new) < len(old) and not set(old) & set(new)
    assert len(load_transfer_set(out)) == 600


def _copy_set(src_dir, dst_dir):
    for p in src_dir.iterdir():
        if p.name.startswith("set"):
            shutil.copy(p, dst_dir / p.name)
    return dst_dir / "set.index.json"


def test_damaged_sharded_sets_are_refused(sets, tmp_path, teacher_file):
    d, _ = sets
    index = _copy_set(d, tmp_path)
    doc = json.loads(index.read_text())
    shard2 = tmp_path / doc["shards"][1]["file"]

    shard2.unlink()  # an index that names a missing shard
    with pytest.raises(DataError, match=r"shard 2 of \d+, .*does not exist"):
        load_transfer_set(index)

    shutil.copy(d / doc["shards"][1]["file"], shard2)  # a truncated shard
    with open(shard2, "r+b") as f:
        f.truncate(shard2.stat().st_size - 100)
    with pytest.raises(FormatError, match="truncated"):
        load_transfer_set(index)

    # a shard from another run (another T) with the right size and rows
    other = tmp_path / "other"
    other.mkdir()
    soft_targets([teacher_file], T=7.0, data="mnist[:1500]", jitter=2, copies=1,
                 out=other / "set.index.json", shard_size="500KB")
    shutil.copy(other / doc["shards"][1]["file"], shard2)
    with pytest.raises(FormatError, match=r"disagrees with set\.index\.json on .*T"):
        load_transfer_set(index)

    shutil.copy(d / doc["shards"][1]["file"], shard2)
    load_transfer_set(index)  # repaired
    bad = dict(doc, format="something.else")
    index.write_text(json.dumps(bad))
    with pytest.raises(FormatError, match="not 'kdcli.transfer-set.index'"):
        load_transfer_set(index)
    index.write_text("{not json")
    with pytest.raises(FormatError, match="not a valid transfer-set index"):
        load_transfer_set(index)


def test_reading_with_pread_equals_the_memory_map(sets, tmp_path, teacher_file):
    """Sets larger than the page budget are read with pread: same rows, any order."""
    d, _ = sets
    ens = tmp_path / "ens.index.json"
    soft_targets([teacher_file, teacher_file], T=4.0, data="mnist[:900]", out=ens,
                 weights=[0.3, 0.7], shard_size="400KB")
    idx = torch.tensor([5, 899, 3, 4, 5, 300, 301, 302, 0, 650])  # runs, repeats, shard borders
    for path in (d / "one.safetensors", d / "set.index.json", ens):
        ts = load_transfer_set(path)
        assert not ts.budget.paged
        ref = {k: col[idx] for k, col in ts.columns.items()}
        ts.budget.budget = 1000  # now every read goes through pread
        assert ts.budget.paged
        for k, col in ts.columns.items():
            assert torch.equal(col[idx], ref[k]), (path.name, k)
            assert torch.equal(col[10:20], col.whole()[:, 10:20] if k == "member_logits"
                               else col.whole()[10:20])
        assert "member_logits" in ts.columns or path != ens
