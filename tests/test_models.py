"""kdcli's model family and model file format."""

import json

import pytest
import torch
from conftest import randomize_batchnorm
from safetensors.torch import load_file, save_file

from kdcli.errors import FormatError, UsageError
from kdcli.preprocessing import Preprocessing
from kdcli.students.base import Architecture, apply_max_norm, build_model
from kdcli.students.layers import BasicBlock, ByteDropout, Preprocess
from kdcli.students.model_file import load_model, save_model

PRE = Preprocessing(255.0, 0.1307, 0.3081, [28, 28], "pixel values 0-255")


@pytest.mark.parametrize("spec", ["mlp:32,16", "mlp:", "cnn:0.25", "cnn:0.5", "resnet:8,0.25",
                                  "resnet:14,0.5"])
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


@pytest.mark.parametrize("bad", ["mlp:0", "mlp:a", "rnn:3", "cnn:0", "cnn:-1", "resnet:",
                                 "resnet:9", "resnet:2", "resnet:8,0", "resnet:8,x", "cnn:nan"])
def test_bad_architecture_specs(bad):
    with pytest.raises(UsageError):
        Architecture.parse(bad)


def test_reader_says_what_is_wrong(tmp_path):
    arch = Architecture.parse("mlp:8")
    model = build_model(arch, PRE, 10)
    good = tmp_path / "good.safetensors"
    save_model(good, model, arch, PRE, 10, {})
    tensors = load_file(str(good))
    from kdcli.io.storage import read_safetensors_metadata

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


def test_families_are_one_table_and_specs_round_trip():
    from kdcli.students import FAMILIES

    assert {"mlp", "cnn", "resnet"} <= set(FAMILIES)
    examples = [family.example for family in FAMILIES.values()]  # shown in --help
    for spec in ("mlp:1200,1200", "cnn:0.5", "resnet:8", "resnet:20,0.5", *examples):
        arch = Architecture.parse(spec)
        assert arch.spec() == spec and Architecture.parse(arch.spec()) == arch
    assert Architecture.parse("resnet:20,0.5").depth == 20
    with pytest.raises(UsageError, match="unknown family 'rnn'") as e:
        Architecture.parse("rnn:3")
    assert "resnet:DEPTH" in e.value.hint
    with pytest.raises(UsageError, match="no hidden widths"):
        Architecture.parse("resnet:8", max_norm=3.0)


def test_old_model_files_without_new_architecture_fields_still_load(tmp_path):
    """Files written before the resnet family have no ``depth`` in their architecture."""
    arch = Architecture.parse("cnn:0.25")
    model = build_model(arch, PRE, 10).eval()
    path = tmp_path / "old.safetensors"
    save_model(path, model, arch, PRE, 10, {})
    from kdcli.io.storage import read_safetensors_metadata

    meta = read_safetensors_metadata(path)
    old = {k: v for k, v in json.loads(meta["architecture"]).items() if k != "depth"}
    # a version 1 file, as written then: no depth, and no data_sha256 (safetensors' own writer)
    meta = {k: v for k, v in meta.items() if k != "data_sha256"}
    save_file(load_file(str(path)), str(path),
              metadata={**meta, "format_version": "1", "architecture": json.dumps(old)})
    mf = load_model(path)
    assert mf.arch == arch and mf.arch.depth == 0
    x = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(mf.model(x), model(x), rtol=0, atol=0)


def resnet(spec: str, raw: list[int], classes: int = 10, seed: int = 0):
    """A ResNet with BatchNorm statistics and affine parameters far from their defaults."""
    torch.manual_seed(seed)
    model = build_model(Architecture.parse(spec), Preprocessing(255.0, 0.5, 0.25, raw), classes)
    randomize_batchnorm(model)
    return model.eval()


def test_resnet_takes_colour_and_grayscale_images_of_any_size_from_8x8():
    from torch import nn

    for raw in ([3, 32, 32], [3, 8, 8], [1, 20, 12], [28, 28], [5, 9, 15]):
        model = resnet("resnet:8,0.25", raw, classes=7)
        x = torch.randint(0, 256, (4, *raw), dtype=torch.uint8)
        assert model(x).shape == (4, 7), raw
    model = resnet("resnet:20,0.5", [3, 16, 16])
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(blocks) == 9 and len(convs) == 19  # 3 stages of 3 blocks; 19 convs + 1 Linear
    assert [m.out_channels for m in convs[::6]] == [8, 8, 16, 32]  # 16/32/64 times 0.5
    for raw in ([3, 7, 32], [784], [2, 3, 4, 5]):
        with pytest.raises(UsageError):
            build_model(Architecture.parse("resnet:8"), Preprocessing(raw_shape=raw), 10)


def test_resnet_batchnorm_trains_on_batch_statistics_and_evaluates_on_running_ones():
    model = resnet("resnet:8,0.25", [3, 8, 8])
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    before = model[1][1].running_mean.clone()
    eval_out = model(x)
    assert torch.equal(model[1][1].running_mean, before)  # eval: statistics untouched
    model.train()
    train_out = model(x)
    assert not torch.equal(model[1][1].running_mean, before)  # train: statistics updated
    assert not torch.allclose(train_out, eval_out)
    assert "1.1.running_var" in model.state_dict()  # saved, checkpointed and loaded


def test_fold_batchnorm_is_exact_and_leaves_the_model_alone():
    from kdcli.students.base import fold_batchnorm

    model = resnet("resnet:14,0.5", [3, 12, 12])
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 15
    x = torch.randint(0, 256, (32, 3, 12, 12), dtype=torch.uint8)
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("depth", [8.0, "8", True, 7, 2000])
def test_resnet_depth_must_be_a_valid_integer(depth):
    with pytest.raises(UsageError, match="ResNet depth"):
        Architecture(family="resnet", depth=depth).check()


@pytest.mark.parametrize("spec", ["mlp:16,8", "cnn:0.25", "resnet:8,0.25"])
def test_torch_save_of_every_familys_student_loads_back(tmp_path, spec):
    """Every layer is a module-level class, so a whole student pickles (no local classes)."""
    torch.manual_seed(0)
    pre = Preprocessing(255.0, [0.5, 0.4, 0.3], [0.25, 0.2, 0.3], [3, 12, 12], "pixels")
    model = build_model(Architecture.parse(spec, dropout=0.5), pre, 5).eval()
    torch.save(model, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    x = torch.randint(0, 256, (3, 3, 12, 12), dtype=torch.uint8)
    torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
    assert isinstance(back[0], Preprocess)
    assert any(isinstance(m, ByteDropout) for m in back.modules())


def test_each_family_has_its_own_configuration():
    from kdcli.students.cnn import CnnConfig
    from kdcli.students.mlp import MlpConfig
    from kdcli.students.resnet import ResNetConfig

    mlp = Architecture.parse("mlp:30,20", dropout=0.5, max_norm=3.0)
    assert mlp.config == MlpConfig([30, 20], 0.5, 0.0, 3.0)
    assert (mlp.width, mlp.depth) == (1.0, 0)  # fields an MLP has not read as unset
    assert Architecture.parse("cnn:0.5").config == CnnConfig(0.5)
    resnet = Architecture.parse("resnet:14,0.5")
    assert resnet.config == ResNetConfig(14, 0.5)
    assert resnet.hidden == [] and resnet.max_norm is None
    # the file's flat record, in its order, with every field
    assert list(resnet.to_dict()) == ["family", "hidden", "width", "dropout", "input_dropout",
                                      "max_norm", "depth"]
    assert Architecture.from_dict(resnet.to_dict()) == resnet
    with pytest.raises(UsageError, match="an MLP takes no width"):
        Architecture("mlp", hidden=[3], width=2.0).check()
    with pytest.raises(UsageError, match="unknown model family"):
        Architecture("rnn")


def test_preprocessing_records_keep_their_form():
    """A student's record has its raw shape and units; a teacher's has only what it sets."""
    student = Preprocessing(255.0, 0.1307, 0.3081, [28, 28], "pixel values 0-255")
    assert list(student.to_dict()) == ["scale", "mean", "std", "raw_shape", "units"]
    assert Preprocessing.from_dict(student.to_dict()) == student
    teacher = {"scale": 255.0, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "size": [8, 8]}
    assert Preprocessing.from_dict(teacher).to_dict() == teacher
    assert Preprocessing.from_dict({"scale": 1.0, "mean": 0.0, "std": 1.0}).to_dict() == \
        {"scale": 1.0, "mean": 0.0, "std": 1.0}


def test_one_statistics_rule_for_students_and_teachers():
    from kdcli.errors import ModelError
    from kdcli.preprocessing import stats_shape
    from kdcli.teachers.inputs import prepare_input

    assert stats_shape(1, [3, 8, 8]) == [] and stats_shape(3, [3, 8, 8]) == [3, 1, 1]
    assert stats_shape(13, [13]) == [13] and stats_shape(192, [3, 8, 8]) == [3, 8, 8]
    pre = Preprocessing(255.0, [0.1, 0.2, 0.3], [0.5, 0.5, 0.25], [3, 8, 8])
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    student = build_model(Architecture.parse("mlp:"), pre, 2)[0](x)
    teacher = prepare_input(x, Preprocessing(255.0, pre.mean, pre.std), None, "float32")
    torch.testing.assert_close(teacher.reshape(4, -1), student, rtol=0, atol=0)
    with pytest.raises(ModelError, match="do not fit"):
        prepare_input(x, Preprocessing(1.0, [0.0] * 4, 1.0), None, "float32")


def test_modalities_follow_from_the_raw_shape():
    from kdcli.modalities import get, modality_for, normalize_by

    assert modality_for([13]).name == "table" and modality_for([28, 28]).name == "image"
    assert modality_for([3, 32, 32]) is get("image")
    table = get("table")
    (spec,) = table.inputs([13])
    assert (spec.name, spec.dtype, spec.shape) == ("input", torch.float32, (13,))
    assert table.dynamic_axes([13]) == {"input": {0: "batch"}}
    batch = table.batch(torch.ones(5, 13, dtype=torch.float64))
    assert list(batch) == ["input"] and batch["input"].dtype == torch.float32
    assert table.example_inputs([13], 2)["input"].shape == (2, 13)
    assert [normalize_by("auto", s) for s in ([13], [3, 8, 8], [28, 28])] == \
        ["feature", "channel", "scalar"]
