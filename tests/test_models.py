"""kdcli's model family and model file format."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kdcli.errors import FormatError, UsageError
from kdcli.models import (
    Architecture,
    Preprocessing,
    apply_max_norm,
    build_model,
    load_model,
    save_model,
)

PRE = Preprocessing(255.0, 0.1307, 0.3081, [28, 28], "pixel values 0-255")


@pytest.mark.parametrize("spec", ["mlp:32,16", "mlp:", "cnn:0.25", "cnn:0.5"])
def test_family_round_trips_through_a_model_file(tmp_path, spec):
    torch.manual_seed(0)
    arch = Architecture.parse(spec)
    model = build_model(arch, PRE, 10).eval()
    path = tmp_path / "m.safetensors"
    save_model(path, model, arch, PRE, 10, {"command": "test", "test_errors": 5})
    mf = load_model(path)
    x = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(mf.model(x), model(x), rtol=0, atol=0)
    assert mf.arch == arch and mf.preprocessing == PRE and mf.num_classes == 10
    assert mf.training["test_errors"] == 5
    assert mf.metadata["format"] == "kdcli.model" and mf.metadata["format_version"] == "2"


def test_preprocessing_is_inside_the_model():
    arch = Architecture.parse("mlp:")
    model = build_model(arch, PRE, 10)
    x = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8)
    lin = model[1][0]
    expected = ((x.float() / 255 - 0.1307) / 0.3081).reshape(2, 784) @ lin.weight.T + lin.bias
    torch.testing.assert_close(model(x), expected)


def test_widths_depth_and_dropout_layers():
    arch = Architecture.parse("mlp:30,20,10", dropout=0.5, input_dropout=0.2)
    net = build_model(arch, PRE, 10)[1]
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [30, 20, 10, 10]
    drops = [m.p for m in net if isinstance(m, torch.nn.Dropout)]
    assert drops == [0.2, 0.5, 0.5, 0.5]


def test_max_norm_caps_each_units_incoming_weights():
    model = build_model(Architecture.parse("mlp:50"), PRE, 10)
    with torch.no_grad():
        model[1][0].weight.mul_(100)
    apply_max_norm(model, 2.0)
    norms = model[1][0].weight.detach().norm(dim=1)
    assert float(norms.max()) <= 2.0 + 1e-5


@pytest.mark.parametrize("bad", ["mlp:0", "mlp:a", "rnn:3", "cnn:0", "cnn:-1"])
def test_bad_architecture_specs(bad):
    with pytest.raises(UsageError):
        Architecture.parse(bad)


def test_reader_says_what_is_wrong(tmp_path):
    arch = Architecture.parse("mlp:8")
    model = build_model(arch, PRE, 10)
    good = tmp_path / "good.safetensors"
    save_model(good, model, arch, PRE, 10, {})
    tensors = load_file(str(good))
    from kdcli.models import read_safetensors_metadata

    meta = read_safetensors_metadata(good)
    # rewritten by another writer: no checksum of kdcli's layout, so an older version 1 file
    meta = {**{k: v for k, v in meta.items() if k != "data_sha256"}, "format_version": "1"}
    for change, match in (({"format": "other"}, "not 'kdcli.model'"),
                          ({"format_version": "99"}, "version 99"),
                          ({"architecture": json.dumps({"family": "mlp", "hidden": [9]})},
                           "do not fit")):
        p = tmp_path / "bad.safetensors"
        save_file(tensors, str(p), metadata={**meta, **change})
        with pytest.raises(FormatError, match=match):
            load_model(p)
    (tmp_path / "junk.safetensors").write_bytes(b"\x05" * 64)
    with pytest.raises(FormatError):
        load_model(tmp_path / "junk.safetensors")


def test_byte_dropout_drops_at_the_rate_and_keeps_the_mean():
    net = build_model(Architecture.parse("mlp:8", dropout=0.5), PRE, 10)[1]
    drop = next(m for m in net if isinstance(m, torch.nn.Dropout))
    torch.manual_seed(0)
    x = torch.ones(400, 1000)
    y = drop.train()(x)
    assert abs(float((y == 0).float().mean()) - 0.5) < 0.005
    assert abs(float(y.mean()) - 1.0) < 0.01  # inverted dropout keeps the expectation
    assert torch.equal(drop.eval()(x), x)


def test_max_norm_bounds_hidden_units_and_leaves_the_output_layer_free():
    from torch import nn

    model = build_model(Architecture("mlp", hidden=[32, 16]), Preprocessing(raw_shape=[8]), 4)
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for m in linear:
            m.weight.mul_(100.0)
    before = linear[-1].weight.clone()
    apply_max_norm(model, 2.0)
    for m in linear[:-1]:
        assert float(m.weight.norm(dim=1).max()) <= 2.0 + 1e-5
    assert torch.equal(linear[-1].weight, before)
    assert float(before.norm(dim=1).min()) > 2.0
