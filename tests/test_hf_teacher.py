"""Hugging Face checkpoint folders, built and saved by the tests, as teachers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcli.errors import FormatError, UnsafePickleError, UsageError
from kdcli.soft_targets import soft_targets
from kdcli.teachers.base import TeacherOptions
from kdcli.teachers.formats import detect_format, load_teacher
from kdcli.transfer.reader import load_transfer_set

transformers = pytest.importorskip("transformers")

NAMES = ["cat", "dog", "eel"]


def tiny_vit(classes: int = 3, channels: int = 1, size: int = 8, patch: int = 4,
             names: list[str] | None = NAMES):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    id2label = {i: n for i, n in enumerate(names)} if names else None
    cfg = ViTConfig(image_size=size, patch_size=patch, num_channels=channels, hidden_size=16,
                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    num_labels=classes, **({"id2label": id2label,
                                            "label2id": {n: i for i, n in id2label.items()}}
                                           if names else {}))
    return ViTForImageClassification(cfg).eval()


def hf_logits(model, pixel_values) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits


def save_processor(folder: Path, size: int, mean, std) -> None:
    from transformers import ViTImageProcessor

    ViTImageProcessor(size={"height": size, "width": size}, image_mean=mean,
                      image_std=std).save_pretrained(folder)


def transfer_logits(folder, data, tmp_path, T=1.0, **kw) -> tuple[torch.Tensor, dict]:
    out = tmp_path / f"t{len(list(tmp_path.iterdir()))}.safetensors"
    summary = soft_targets([folder], T=T, data=str(data), out=out, device="cpu", **kw)
    ts = load_transfer_set(out)
    return ts.columns["logits"][:], {**ts.meta, "summary": summary}


def test_vit_without_processor_config_equals_the_model(tmp_path):
    model = tiny_vit()
    model.save_pretrained(tmp_path / "vit")
    assert detect_format(tmp_path / "vit") == "huggingface"
    x = torch.randn(40, 1, 8, 8)
    np.save(tmp_path / "x.npy", x.numpy())
    z, meta = transfer_logits(tmp_path / "vit", tmp_path / "x.npy", tmp_path, T=3.0)
    torch.testing.assert_close(z, hf_logits(model, x), atol=1e-5, rtol=1e-5)
    assert meta["class_names"] == NAMES
    (teacher,) = meta["teachers"]
    assert teacher["format"] == "huggingface" and teacher["class_names"] == NAMES
    assert teacher["input_shape"] == [1, 8, 8] and teacher["num_classes"] == 3


def test_vit_with_processor_config_equals_model_on_processor_output(tmp_path):
    from transformers import AutoImageProcessor

    model = tiny_vit(channels=3)
    folder = tmp_path / "vit"
    model.save_pretrained(folder)
    save_processor(folder, 8, [0.5, 0.4, 0.3], [0.25, 0.2, 0.3])
    images = torch.randint(0, 256, (30, 8, 8, 3), dtype=torch.uint8)  # channels last
    np.savez(tmp_path / "imgs.npz", inputs=images.numpy())
    proc = AutoImageProcessor.from_pretrained(folder)
    pv = proc(images=list(images.numpy()), return_tensors="pt")["pixel_values"]
    z, meta = transfer_logits(folder, tmp_path / "imgs.npz", tmp_path)
    torch.testing.assert_close(z, hf_logits(model, pv), atol=1e-5, rtol=1e-5)
    pre = meta["teachers"][0]["preprocessing"]
    assert pre["mean"] == [0.5, 0.4, 0.3] and pre["size"] == [8, 8]
    assert abs(pre["scale"] - 255) < 1e-9
    # --scale/--mean/--std override the processor config
    t = load_teacher(folder, TeacherOptions(scale=1.0, mean=0.0, std=1.0), probe=images[:2])
    assert t.preprocessing.scale == 1.0 and t.preprocessing.mean == 0.0


def test_grey_digits_are_resized_and_made_rgb_like_the_processor(tmp_path):
    from transformers import AutoImageProcessor

    from kdcli.data.sources import load_data
    from kdcli.teachers.inputs import prepare_input

    model = tiny_vit(classes=10, channels=3, size=16, names=None)
    folder = tmp_path / "vit"
    model.save_pretrained(folder)
    save_processor(folder, 16, [0.5] * 3, [0.5] * 3)
    ds = load_data("mnist:test[:20]")
    t = load_teacher(folder, probe=ds.inputs[:4])
    assert t.input_shape == [3, 16, 16] and t.class_names is None
    mine = prepare_input(ds.inputs, t.preprocessing, t.input_shape,
                         "float32")
    rgb = np.repeat(ds.inputs.numpy()[..., None], 3, -1)
    ref = AutoImageProcessor.from_pretrained(folder)(images=list(rgb),
                                                     return_tensors="pt")["pixel_values"]
    assert mine.shape == ref.shape
    assert float((mine - ref).abs().mean()) < 0.05  # PIL's and torch's bilinear differ a little
    torch.testing.assert_close(t.logits(ds.inputs), hf_logits(model, mine))


def test_sharded_checkpoint(tmp_path):
    model = tiny_vit()
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="8KB")
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    x = torch.randn(12, 1, 8, 8)
    t = load_teacher(folder, probe=x)
    torch.testing.assert_close(t.logits(x), hf_logits(model, x), atol=1e-5, rtol=1e-5)


def test_shard_outside_the_folder_is_refused(tmp_path):
    model = tiny_vit()
    folder = tmp_path / "evil"
    model.save_pretrained(folder, max_shard_size="8KB")
    index = folder / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    first = next(iter(doc["weight_map"]))
    shard = folder / doc["weight_map"][first]
    (tmp_path / "outside.safetensors").write_bytes(shard.read_bytes())
    doc["weight_map"][first] = "../outside.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="outside the checkpoint folder"):
        load_teacher(folder, probe=torch.zeros(2, 1, 8, 8))


def test_pickle_weights_need_trust_pickle(tmp_path):
    model = tiny_vit()
    folder = tmp_path / "bin"
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    x = torch.randn(5, 1, 8, 8)
    with pytest.raises(UnsafePickleError, match="--trust-pickle"):
        load_teacher(folder, probe=x)
    t = load_teacher(folder, TeacherOptions(trust_pickle=True), probe=x)
    torch.testing.assert_close(t.logits(x), hf_logits(model, x), atol=1e-5, rtol=1e-5)


def test_remote_code_is_never_run(tmp_path):
    folder = tmp_path / "remote"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                    "class EvilConfig: pass\nclass Evil: pass\n")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                           "AutoModelForImageClassification": "evil.Evil"}}))
    (folder / "model.safetensors").write_bytes(b"x" * 16)
    with pytest.raises(FormatError):
        load_teacher(folder, probe=torch.zeros(2, 1, 8, 8))
    assert not marker.exists()


def test_missing_transformers_names_the_extra(tmp_path, monkeypatch):
    tiny_vit().save_pretrained(tmp_path / "vit")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    with pytest.raises(UsageError, match=r'pip install "kdcli\[hf\]"'):
        load_teacher(tmp_path / "vit", probe=torch.zeros(2, 1, 8, 8))


def test_folder_without_config_is_refused(tmp_path):
    from kdcli.errors import DataError

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="config.json"):
        load_teacher(tmp_path / "empty")


def test_ensemble_of_hf_and_kdcli_teachers_mean_probs(tmp_path, teacher_file):
    model = tiny_vit(classes=10, size=28, patch=7, names=None)
    folder = tmp_path / "vit"
    model.save_pretrained(folder)
    save_processor(folder, 28, [0.0], [1.0])  # rescale 1/255 only
    out = tmp_path / "ens.safetensors"
    T = 4.0
    soft_targets([folder, teacher_file], T=T, data="mnist[:64]", out=out, device="cpu")
    ts = load_transfer_set(out)
    from kdcli.data.sources import load_data

    x = load_data("mnist[:64]").inputs
    z_hf = hf_logits(model, x.float()[:, None] / 255)
    z_kd = load_teacher(teacher_file).logits(x)
    ref = (torch.softmax(z_hf / T, -1) + torch.softmax(z_kd / T, -1)) / 2
    torch.testing.assert_close(ts.columns["soft_targets"][:], ref, atol=1e-5, rtol=1e-4)
    members = ts.columns["member_logits"][:]
    torch.testing.assert_close(members[0], z_hf, atol=1e-5, rtol=1e-5)


def test_bf16_autocast(tmp_path):
    model = tiny_vit()
    model.save_pretrained(tmp_path / "vit")
    x = torch.randn(16, 1, 8, 8)
    np.save(tmp_path / "x.npy", x.numpy())
    z, meta = transfer_logits(tmp_path / "vit", tmp_path / "x.npy", tmp_path,
                              precision="bf16")
    assert meta["precision"] == "bf16"
    ref = hf_logits(model, x)
    assert not torch.equal(z, ref)  # it did run in bf16
    torch.testing.assert_close(z.softmax(-1), ref.softmax(-1), atol=0.03, rtol=0)


def test_inspect_shows_a_checkpoint_folder(tmp_path):
    from kdcli.inspection import inspect_file

    folder = tmp_path / "vit"
    tiny_vit(channels=3).save_pretrained(folder)
    save_processor(folder, 8, [0.5] * 3, [0.5] * 3)
    info = inspect_file(folder)
    assert info["format"] == "huggingface" and info["classes"] == 3
    assert info["class_names"] == NAMES
    assert info["input_specs"] == [{"name": "pixel_values", "shape": ["batch", 3, 8, 8]}]
    assert info["preprocessing"]["size"] == [8, 8]
    assert info["preprocessing"]["mean"] == [0.5] * 3


def test_audio_classifier_taking_input_values(tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, conv_dim=(8, 8), conv_stride=(5, 2),
                         conv_kernel=(10, 3), num_feat_extract_layers=2,
                         num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
                         classifier_proj_size=8, num_labels=4)
    model = Wav2Vec2ForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path / "w2v")
    x = torch.randn(6, 400)
    t = load_teacher(tmp_path / "w2v", probe=x)
    assert t.input_shape == [400] and t.num_classes == 4
    with torch.no_grad():
        ref = model(input_values=x).logits
    torch.testing.assert_close(t.logits(x), ref, atol=1e-5, rtol=1e-5)
    # Saved with its processor's character vocabulary, it is still an audio classifier,
    # not a text one (the vocabulary files look like a tokenizer's).
    (tmp_path / "w2v" / "vocab.json").write_text('{"<pad>": 0, "a": 1}')
    (tmp_path / "w2v" / "tokenizer_config.json").write_text("{}")
    assert detect_format(tmp_path / "w2v") == "huggingface"
