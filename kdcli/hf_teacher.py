"""Hugging Face ``transformers`` checkpoint folders as teachers (the ``huggingface`` format).

A folder saved with ``save_pretrained``: ``config.json`` plus ``model.safetensors`` (or shards
named by ``model.safetensors.index.json``), and optionally ``preprocessor_config.json``.

* The model class is ``AutoModelForImageClassification``, or ``AutoModelForAudioClassification``
  for a model whose single input is a float tensor (``pixel_values``, ``input_values``).
* The classes and their names come from ``config.json`` (``id2label``).
* The preprocessing comes from ``preprocessor_config.json``: ``rescale_factor`` (as the
  ``scale`` it divides by), ``image_mean``/``image_std`` per channel, the resize (to
  ``crop_size`` when it center-crops, else ``size``; kdcli resizes straight to it) and the
  channels from ``config.json`` (grey images become RGB). ``--scale/--mean/--std`` override
  it; ``--input-shape`` replaces the resize by a reshape.
* Weights load from safetensors only: a folder with only ``pytorch_model.bin`` is a pickle
  and is refused without ``--trust-pickle``. Shards must lie inside the folder. Remote code is
  never run (``trust_remote_code=False``) and nothing is downloaded (``local_files_only``).

``transformers`` is an optional extra (``pip install "kdcli[hf]"``), imported only here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.errors import FormatError, ModelError, UnsafePickleError, UsageError
from kdcli.files import sha256_file

if TYPE_CHECKING:
    from kdcli.teachers import Teacher, TeacherOptions

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
PROCESSOR = "preprocessor_config.json"
FLOAT_INPUTS = ("pixel_values", "input_values")
INSTALL_HINT = 'Install the Hugging Face extra: pip install "kdcli[hf]"'


def is_hf_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding a ``config.json`` (a checkpoint folder)."""
    return path.is_dir() and (path / "config.json").is_file()


def weight_files(folder: Path, trust_pickle: bool = False) -> list[Path]:
    """The weight files the checkpoint loads from, each checked to lie inside ``folder``.

    Raises:
        FormatError: no weights, a bad index, or a shard outside the folder.
        UnsafePickleError: only pickled weights, and ``trust_pickle`` is off.
    """
    if (folder / SAFETENSORS_INDEX).is_file():
        index = folder / SAFETENSORS_INDEX
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{index} is not a safetensors index (no weight_map)",
                              "Save the checkpoint again with save_pretrained") from e
        files = [index, *(_inside(folder, s) for s in shards)]
    elif (folder / SAFETENSORS).is_file():
        files = [_inside(folder, SAFETENSORS)]
    elif any((folder / p).is_file() for p in PICKLES):
        if not trust_pickle:
            raise UnsafePickleError(
                f"{folder} has only pytorch_model.bin weights, a pickle: loading it can run "
                "code from the file",
                "If you trust its source, pass --trust-pickle; or save it again with "
                "save_pretrained(safe_serialization=True)")
        files = [_inside(folder, p) for p in PICKLES if (folder / p).is_file()]
    else:
        raise FormatError(f"{folder} has a config.json but no {SAFETENSORS} or "
                          f"{SAFETENSORS_INDEX}", "Save the model with save_pretrained")
    for f in files:
        if not f.is_file():
            raise FormatError(f"{folder}: the weight file {f.name} is missing",
                              "Copy the whole checkpoint folder")
    return files


def _inside(folder: Path, name: str) -> Path:
    root = folder.resolve()
    p = (folder / str(name)).resolve()
    if not p.is_relative_to(root) or p == root:
        raise FormatError(f"{folder} names the weight file {name!r}, which is outside the "
                          "checkpoint folder", "Keep every shard inside the folder")
    return p


def folder_sha256(folder: Path) -> str:
    """SHA-256 over the names and SHA-256s of the config, processor config and weights."""
    h = hashlib.sha256()
    names = ["config.json", PROCESSOR]
    files = [folder / n for n in names if (folder / n).is_file()]
    with contextlib.suppress(FormatError):  # the loader reports it
        files += weight_files(folder, trust_pickle=True)
    for f in files:
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def read_processor(folder: Path) -> dict[str, Any]:
    """The checkpoint's ``preprocessor_config.json`` ({} without one)."""
    p = folder / PROCESSOR
    if not p.is_file():
        return {}
    try:
        cfg = json.loads(p.read_text())
    except ValueError as e:
        raise FormatError(f"{p} is not valid JSON ({e})", "Save the processor again") from e
    if not isinstance(cfg, dict):
        raise FormatError(f"{p} is not a JSON object", "Save the processor again")
    return cfg


def processor_preprocessing(proc: dict[str, Any]) -> dict[str, Any]:
    """kdcli's preprocessing dict from a processor config: scale, mean, std, size."""
    pre: dict[str, Any] = {}
    if proc.get("do_rescale", True) and proc.get("rescale_factor"):
        pre["scale"] = 1.0 / float(proc["rescale_factor"])
    if proc.get("do_normalize", False) and "image_mean" in proc and "image_std" in proc:
        pre["mean"] = [float(v) for v in _as_list(proc["image_mean"])]
        pre["std"] = [float(v) for v in _as_list(proc["image_std"])]
    size = proc.get("crop_size") if proc.get("do_center_crop") else None
    size = size or (proc.get("size") if proc.get("do_resize", True) else None)
    hw = _height_width(size)
    if hw:
        pre["size"] = hw
    return pre


def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _height_width(size: Any) -> list[int] | None:
    if isinstance(size, int):
        return [size, size]
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return [int(size["height"]), int(size["width"])]
        if "shortest_edge" in size:
            return [int(size["shortest_edge"])] * 2
    return None


def class_names(id2label: dict | None, n: int) -> list[str] | None:
    """Names from ``id2label`` (int or string keys), unless they are the default
    ``LABEL_0``, ``LABEL_1``, ... that transformers makes up."""
    labels = {int(k): str(v) for k, v in (id2label or {}).items()}
    try:
        names = [labels[i] for i in range(n)]
    except KeyError:
        return None
    return None if names == [f"LABEL_{i}" for i in range(n)] else names


def describe_folder(folder: Path) -> dict[str, Any]:
    """What ``kdcli inspect`` shows of a checkpoint folder, from its JSON files only."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise FormatError(f"{folder}/config.json is not valid JSON ({e})",
                          "Save the checkpoint again") from e
    id2label = cfg.get("id2label") or {}
    n = int(cfg.get("num_labels") or len(id2label) or 2)
    pre = {"scale": 1.0, "mean": 0.0, "std": 1.0, **processor_preprocessing(read_processor(folder))}
    channels = cfg.get("num_channels")
    size = pre.get("size") or _height_width(cfg.get("image_size"))
    if channels and size:
        pre["size"] = size
    inputs = ([{"name": "pixel_values", "shape": ["batch", channels, *size]}] if channels and size
              else [{"name": "pixel_values" if channels else "input_values",
                     "shape": ["batch", "..."]}])
    return {"format": "huggingface", "model_type": cfg.get("model_type"),
            "architecture": cfg.get("architectures"), "inputs": [i["name"] for i in inputs],
            "input_specs": inputs, "outputs": ["logits"], "classes": n,
            "class_names": class_names(id2label, n), "preprocessing": pre,
            "preprocessing_source": PROCESSOR if (folder / PROCESSOR).is_file() else "none",
            "weights": [f.name for f in weight_files(folder, trust_pickle=True)]}


def load_hf(t: Teacher, opts: TeacherOptions) -> None:
    """Fill ``t`` from the checkpoint folder ``t.path`` (the ``huggingface`` table entry)."""
    from kdcli.errors import first_line
    from kdcli.teachers import IDENTITY, _torch_runner

    folder = t.path
    files = weight_files(folder, opts.trust_pickle)
    tf = _import_transformers()
    import torch

    tf.utils.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    try:
        config = tf.AutoConfig.from_pretrained(folder, local_files_only=True,
                                               trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError, OSError, ...
        raise FormatError(f"{folder}/config.json cannot be read by transformers "
                          f"({first_line(e)})",
                          "kdcli loads the model types transformers ships (no remote code)") \
            from e
    auto = _auto_class(tf, config, folder)
    _check_size(folder, config)
    try:
        model = auto.from_pretrained(
            folder, config=config, local_files_only=True, trust_remote_code=False,
            use_safetensors=files[0].name != PICKLES[0] and files[0].name != PICKLES[1],
            dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        raise FormatError(f"{folder} does not load as a {type(config).__name__} checkpoint "
                          f"({first_line(e)})", "Save it again with save_pretrained") from e
    if model.main_input_name not in FLOAT_INPUTS:
        raise ModelError(f"{folder} takes {model.main_input_name!r}, not a float tensor",
                         f"kdcli runs classifiers whose input is one of {FLOAT_INPUTS}")
    t.num_classes = int(config.num_labels)
    t.class_names = class_names(getattr(config, "id2label", None), t.num_classes)
    t.meta["architecture"] = type(model).__name__
    pre = processor_preprocessing(read_processor(folder))
    channels = getattr(config, "num_channels", None)
    if not t.shape_from_user and model.main_input_name == "pixel_values" and channels:
        size = pre.get("size") or _height_width(getattr(config, "image_size", None))
        if size:
            t.input_shape = [int(channels), *size]
            pre["size"] = size
    if t.shape_from_user:
        pre.pop("size", None)
    t.preprocessing = {**IDENTITY, **pre, **opts.preprocessing()}
    t.meta["preprocessing_source"] = PROCESSOR if (folder / PROCESSOR).is_file() else "none"
    _torch_runner(t, _LogitsOnly(model))


def _check_size(folder: Path, config: Any) -> None:
    """Refuse a configuration whose model cannot fit in memory, before building it."""
    from kdcli.resources import check_memory, hf_model_bytes

    check_memory(hf_model_bytes(config, read_processor(folder)),
                 f"the model that {folder}/config.json describes",
                 "Its sizes (num_hidden_layers, hidden_size, image_size, or crop_size in "
                 f"{PROCESSOR}) are too large for this machine; check the files")


class _LogitsOnly:
    """Calls a transformers model on one tensor and returns its logits (no output dict)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, x: Any) -> Any:
        return self.model(x).logits

    def eval(self) -> _LogitsOnly:
        self.model.eval()
        return self

    def to(self, device: Any) -> _LogitsOnly:
        self.model.to(device)
        return self

    def parameters(self) -> Any:
        return self.model.parameters()


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise UsageError("a Hugging Face checkpoint folder needs the transformers package, "
                         "which is not installed", INSTALL_HINT) from e
    return transformers


def _auto_class(tf: Any, config: Any, folder: Path) -> Any:
    for auto in (tf.AutoModelForImageClassification, tf.AutoModelForAudioClassification):
        if type(config) in auto._model_mapping:
            return auto
    raise ModelError(f"{folder} is a {getattr(config, 'model_type', '?')} model, not an image "
                     "or audio classifier",
                     "kdcli takes classification checkpoints whose input is pixel_values or "
                     "input_values")
