"""Augmentation (kdcli.data.augment): jitter, random crops, flips; train and soft-targets."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kdcli.data.augment import AugmentConfig, shift
from kdcli.errors import UsageError
from kdcli.soft_targets import soft_targets
from kdcli.transfer.reader import load_transfer_set

sys.path.insert(0, str(Path(__file__).parent))
from conftest import colour_mnist  # noqa: E402


def crops(x: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    """Every crop of the original size of ``x`` padded by ``k``: ``[B, (2k+1)^2, ...]``."""
    h, w = x.shape[-2:]
    padded = F.pad(x.float(), (k, k, k, k), mode="constant" if mode == "zero" else "reflect")
    return torch.stack([padded[..., i:i + h, j:j + w] for i in range(2 * k + 1)
                        for j in range(2 * k + 1)], 1).to(x.dtype)


@pytest.mark.parametrize("mode", ["zero", "reflect"])
def test_crop_is_a_random_crop_of_the_padded_image(mode):
    x = torch.randint(0, 256, (64, 3, 10, 9), dtype=torch.uint8)
    aug = AugmentConfig(crop_pad=3, pad_mode=mode)
    y = aug.apply(x, aug.draw(64, torch.Generator().manual_seed(0)))
    assert y.shape == x.shape and y.dtype == x.dtype
    match = (crops(x, 3, mode) == y[:, None]).flatten(2).all(-1)  # [64, 49]
    assert bool(match.any(1).all())  # each is one of the 49 crops
    assert len(set(match.float().argmax(1).tolist())) > 20  # and they vary


def test_zero_padded_crop_is_the_papers_jitter():
    x = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    a, b = AugmentConfig(jitter=2), AugmentConfig(crop_pad=2)
    ya = a.apply(x, a.draw(50, torch.Generator().manual_seed(5)))
    yb = b.apply(x, b.draw(50, torch.Generator().manual_seed(5)))
    assert torch.equal(ya, yb) and not torch.equal(ya, x)
    # reflect padding fills from the image itself, not with zeros
    zeros = torch.full((4, 6, 6), 200, dtype=torch.uint8)
    dy = torch.tensor([2, -2, 0, 1])
    assert int((shift(zeros, dy, dy, 2, "reflect") == 200).all()) == 1
    assert int((shift(zeros, dy, dy, 2) == 0).sum()) > 0


def test_a_flip_really_flips_about_half_of_the_images():
    x = torch.randint(0, 256, (400, 3, 8, 8), dtype=torch.uint8)
    aug = AugmentConfig(flip=True)
    d = aug.draw(400, torch.Generator().manual_seed(1))
    y = aug.apply(x, d)
    mirrored = torch.equal(y[d.flip], x[d.flip].flip(-1))
    assert mirrored and torch.equal(y[~d.flip], x[~d.flip])
    assert 150 < int(d.flip.sum()) < 250
    assert torch.equal(y[d.flip][:, :, :, 0], x[d.flip][:, :, :, -1])  # left is the old right
    gray = x[:, 0]
    assert torch.equal(aug.apply(gray, d)[d.flip], gray[d.flip].flip(-1))  # [B, H, W] too


def test_draws_of_a_batch_apply_to_its_slices():
    """What lets ranks agree: draw for the global batch, apply to each rank's rows."""
    x = torch.randint(0, 256, (30, 3, 12, 12), dtype=torch.uint8)
    aug = AugmentConfig.from_options("crop-flip", pad_mode="reflect")
    d = aug.draw(30, torch.Generator().manual_seed(2))
    whole = aug.apply(x, d)
    parts = torch.cat([aug.apply(x[a:b], d[a:b]) for a, b in ((0, 7), (7, 19), (19, 30))])
    assert torch.equal(whole, parts)


def test_options_and_presets():
    assert AugmentConfig.from_options("crop-flip") == AugmentConfig(crop_pad=4, flip=True)
    assert AugmentConfig.from_options("crop-flip", crop_pad=2, flip=False) == \
        AugmentConfig(crop_pad=2)
    assert not AugmentConfig.from_options(None).active
    for kw, match in ((dict(preset="rotate"), "unknown --augment"),
                      (dict(jitter=2, crop_pad=2), "both shift"),
                      (dict(crop_pad=-1), "--crop-pad must be 0 or more"),
                      (dict(pad_mode="wrap", crop_pad=2), "unknown --pad-mode")):
        with pytest.raises(UsageError, match=match):
            AugmentConfig.from_options(**kw)
    with pytest.raises(UsageError, match="needs image inputs"):
        AugmentConfig(flip=True).check_shape([784])
    with pytest.raises(UsageError, match="reflect padding needs images larger"):
        AugmentConfig(crop_pad=8, pad_mode="reflect").check_shape([3, 8, 8])


@pytest.fixture(scope="module")
def colour(tmp_path_factory):
    return colour_mnist("mnist[:200]", tmp_path_factory.mktemp("colour") / "colour.npz")


@pytest.fixture(scope="module")
def colour_teacher(tmp_path_factory, colour):
    from kdcli.output import Reporter
    from kdcli.students.base import Architecture
    from kdcli.train import TrainConfig, train

    out = tmp_path_factory.mktemp("teacher") / "resnet.safetensors"
    train(str(colour), arch=Architecture.parse("resnet:8,0.25"), out=out, eval_data="none",
          config=TrainConfig(epochs=1, batch_size=64), augment=AugmentConfig(flip=True),
          reporter=Reporter("quiet"))
    return out


def test_crop_flip_copies_are_reproducible_from_the_seed(tmp_path, colour, colour_teacher):
    aug = AugmentConfig.from_options("crop-flip", pad_mode="reflect")
    kw = dict(T=4.0, data=str(colour), augment=aug, copies=2)
    paths = [tmp_path / f"{name}.safetensors" for name in ("a", "b", "c")]
    for path, seed in zip(paths, (7, 7, 8), strict=True):
        soft_targets([colour_teacher], out=path, seed=seed, **kw)
    a, b, c = (load_file(str(p)) for p in paths)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same seed
    assert not torch.equal(a["inputs"][200:], c["inputs"][200:])  # another seed differs
    assert torch.equal(a["inputs"][:200], c["inputs"][:200])  # the originals come first
    ts = load_transfer_set(paths[0])
    assert len(ts) == 600 and ts.inputs.shape == (600, 3, 28, 28)
    meta = ts.meta
    assert (meta["crop_pad"], meta["pad_mode"], meta["flip"], meta["copies"], meta["jitter"]) \
        == ("4", "reflect", "true", "2", "0")
    # each copy is a reflect-padded crop of its original, mirrored or not, and some are mirrored
    x = ts.inputs[:200]
    for copy in (ts.inputs[200:400], ts.inputs[400:600]):
        plain = (crops(x, 4, "reflect") == copy[:, None]).flatten(2).all(-1).any(1)
        mirrored = (crops(x.flip(-1), 4, "reflect") == copy[:, None]).flatten(2).all(-1).any(1)
        assert bool((plain | mirrored).all())
        assert 50 < int((mirrored & ~plain).sum()) < 150
    # the teacher's logits are its own, on the augmented inputs
    from kdcli.teachers.formats import load_teacher

    torch.testing.assert_close(ts.logits[200:260], load_teacher(colour_teacher).logits(
        ts.inputs[200:260]), rtol=0, atol=1e-5)


def test_cli_augmentation_options(cli, colour, colour_teacher, tmp_path):
    r = cli("train", "--data", colour, "--arch", "resnet:8,0.25", "--augment", "crop-flip",
            "--pad-mode", "reflect", "--epochs", "1", "--eval-data", "none",
            "--out", "m.safetensors", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert (res["crop_pad"], res["pad_mode"], res["flip"], res["jitter"]) == (4, "reflect", True, 0)
    for args, text in ((["--jitter", "2", "--crop-pad", "2"], "both shift the images"),
                       (["--augment", "mixup"], "unknown --augment 'mixup'"),
                       (["--crop-pad", "2", "--pad-mode", "edge"], "unknown --pad-mode")):
        r = cli("train", "--data", colour, "--arch", "resnet:8", "--out", "x.safetensors", *args)
        assert r.exit_code == 1 and r.stderr.startswith("Error: ") and text in r.stderr, r.output
        assert len(r.stderr.strip().splitlines()) == 1
    table = tmp_path / "table.npz"
    np.savez(table, inputs=np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32),
             labels=np.arange(40) % 2)
    r = cli("train", "--data", table, "--hidden", "8", "--flip", "--out", "y.safetensors")
    assert r.exit_code == 1 and "needs image inputs" in r.stderr, r.output
    r = cli("soft-targets", colour_teacher, "--data", colour, "--copies", "1", "--out",
            "t.safetensors")
    assert r.exit_code == 1 and "--copies needs an augmentation" in r.stderr, r.output
    r = cli("soft-targets", colour_teacher, "--data", colour, "--copies", "1", "--flip",
            "--out", "t.safetensors", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["examples"] == 400
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()
