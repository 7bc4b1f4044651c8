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

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kdcli.checks import preprocessing_problem
from kdcli.errors import (
    FormatError,
    ModelError,
    UsageError,
    first_line,
)
from kdcli.output import Reporter
from kdcli.preprocessing import Preprocessing
from kdcli.resources import check_memory, hf_model_bytes
from kdcli.teachers.base import (
    InputSpec,
    LoadRequest,
    Teacher,
    TeacherFormat,
    short,
    torch_runner,
)
from kdcli.teachers.hf_files import (
    PICKLES,
    PROCESSOR,
    check_folder,
    folder_sha256,
    is_hf_folder,
    read_config,
    read_processor,
    weight_files,
)
from kdcli.teachers.inputs import IDENTITY, describe_preprocessing

#: The inputs kdcli feeds a checkpoint, by the model's main input name (one float tensor).
HF_INPUTS = {name: InputSpec(name) for name in ("pixel_values", "input_values")}
FLOAT_INPUTS = tuple(HF_INPUTS)
INSTALL_HINT = 'Install the Hugging Face extra: pip install "kdcli[hf]"'


def processor_preprocessing(proc: dict[str, Any]) -> dict[str, Any]:
    """kdcli's preprocessing dict from a processor config: scale, mean, std, size."""
    pre: dict[str, Any] = {}
    if proc.get("do_rescale", True) and proc.get("rescale_factor") is not None:
        factor = float(proc["rescale_factor"])
        pre["scale"] = 1.0 / factor if factor else factor
    if proc.get("do_normalize", False) and "image_mean" in proc and "image_std" in proc:
        pre["mean"] = [float(v) for v in _as_list(proc["image_mean"])]
        pre["std"] = [float(v) for v in _as_list(proc["image_std"])]
    size = proc.get("crop_size") if proc.get("do_center_crop") else None
    size = size or (proc.get("size") if proc.get("do_resize", True) else None)
    hw = _height_width(size)
    if hw:
        pre["size"] = hw
    return pre


def check_processor(folder: Path, pre: dict[str, Any]) -> dict[str, Any]:
    """``pre`` (the processor's preprocessing, with the user's overrides), if it is possible.

    Raises:
        FormatError: an infinite, zero or negative ``image_std``, a non-finite
            ``image_mean``, or a ``rescale_factor`` that is not a finite number from
            ``1/SCALE_MAX`` to ``1/SCALE_MIN``.
    """
    problem = preprocessing_problem(pre.get("scale"), pre.get("mean"), pre.get("std"))
    if problem:
        raise FormatError(f"{folder / PROCESSOR}: its {problem} (the scale is "
                          "1/rescale_factor)", "Fix image_mean, image_std or rescale_factor, "
                          "or override them with --scale, --mean and --std")
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
    check_folder(folder)
    cfg = read_config(folder)
    id2label = cfg.get("id2label") or {}
    n = int(cfg.get("num_labels") or len(id2label) or 2)
    pre = {"scale": 1.0, "mean": 0.0, "std": 1.0,
           **check_processor(folder, processor_preprocessing(read_processor(folder)))}
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


class HfFormat(TeacherFormat):
    """A Hugging Face checkpoint folder."""

    name = "huggingface"
    folders = True

    def detect(self, path: Path) -> bool:
        return is_hf_folder(path)

    def digest(self, path: Path) -> str:
        return folder_sha256(path)

    def load(self, req: LoadRequest) -> Teacher:
        folder, opts = req.path, req.opts
        model, config = load_model(folder, opts.trust_pickle)
        spec = HF_INPUTS.get(model.main_input_name)
        if spec is None:
            raise ModelError(f"{folder} takes {model.main_input_name!r}, not a float tensor",
                             f"kdcli runs classifiers whose input is one of {FLOAT_INPUTS}")
        num_classes = int(config.num_labels)
        pre = processor_preprocessing(read_processor(folder))
        channels = getattr(config, "num_channels", None)
        shape = req.user_shape
        if shape is None and spec.name == "pixel_values" and channels:
            size = pre.get("size") or _height_width(getattr(config, "image_size", None))
            if size:
                shape = (int(channels), *size)
                pre["size"] = size
        if req.user_shape:
            pre.pop("size", None)
        meta = {"architecture": type(model).__name__,
                "preprocessing_source": PROCESSOR if (folder / PROCESSOR).is_file() else "none"}
        runner, module = torch_runner(_LogitsOnly(model, spec.name), req.device, req.precision)
        return req.teacher(
            self, runner, module=module, inputs=(replace(spec, shape=shape),),
            preprocessing=Preprocessing.from_dict(
                check_processor(folder, {**IDENTITY, **pre, **opts.preprocessing()})),
            num_classes=num_classes, meta=meta,
            class_names=class_names(getattr(config, "id2label", None), num_classes))

    def inspects(self, path: Path) -> bool:
        return is_hf_folder(path)

    def inspect(self, path: Path, rep: Reporter) -> dict[str, Any]:
        """A checkpoint folder, from its JSON files alone (no weights are loaded)."""
        info = {"file": str(path), "kind": "huggingface checkpoint", **describe_folder(path)}
        rows = [["format", info["format"]], ["architecture", short(info["architecture"])],
                ["inputs", "; ".join(f"{i['name']} {i['shape']}" for i in info["input_specs"])],
                ["outputs", "logits [batch, classes]"], ["classes", info["classes"]],
                ["class names", short(info["class_names"])],
                ["preprocessing", f"{describe_preprocessing(info['preprocessing'])} "
                                  f"(from {info['preprocessing_source']})"],
                ["weights", short(info["weights"])]]
        rep.table(f"Hugging Face checkpoint {path.name}", ["", "value"], rows)
        return info


def load_model(folder: Path, trust_pickle: bool,
               pick: Callable[[Any, Any, Path], Any] | None = None) -> tuple[Any, Any]:
    """The model in the checkpoint folder, and its configuration.

    Args:
        folder: The checkpoint folder.
        trust_pickle: Allow ``pytorch_model.bin`` weights.
        pick: ``(transformers, config, folder) -> auto class`` (default: an image or audio
            classifier); it may refuse the configuration with a kdcli error.
    """
    files = weight_files(folder, trust_pickle)
    read_config(folder)  # fields of the wrong type: one line, before transformers reads them
    tf = import_transformers()
    try:
        config = tf.AutoConfig.from_pretrained(folder, local_files_only=True,
                                               trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError, OSError, ...
        raise FormatError(f"{folder}/config.json cannot be read by transformers "
                          f"({first_line(e)})",
                          "kdcli loads the model types transformers ships (no remote code)") \
            from e
    auto = (pick or _auto_class)(tf, config, folder)
    _check_size(folder, config)
    try:
        model = auto.from_pretrained(
            folder, config=config, local_files_only=True, trust_remote_code=False,
            use_safetensors=files[0].name != PICKLES[0] and files[0].name != PICKLES[1],
            dtype=torch.float32, output_loading_info=True)
    except Exception as e:  # noqa: BLE001
        raise FormatError(f"{folder} does not load as a {type(config).__name__} checkpoint "
                          f"({first_line(e)})", "Save it again with save_pretrained") from e
    return _check_loading_info(folder, *model), config


def _check_loading_info(folder: Path, model: Any, info: dict[str, Any]) -> Any:
    """``model``, if its weights came whole from the folder: a key the model has and the
    files lack would stay randomly initialised, and a key the files have and the model lacks
    means the weights belong to another model.

    Raises:
        FormatError: weights are missing, unexpected or of another shape.
    """
    for what, keys in (("missing", info.get("missing_keys")),
                       ("unexpected", info.get("unexpected_keys")),
                       ("of the wrong shape", info.get("mismatched_keys"))):
        keys = sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in keys or ())
        if keys:
            shown = ", ".join(repr(k) for k in keys[:3]) + (", ..." if len(keys) > 3 else "")
            raise FormatError(f"{folder}: {len(keys)} weight(s) of the model are {what} in "
                              f"its weight files ({shown}), so those layers would be random",
                              "Save the whole checkpoint again with save_pretrained")
    return model


def _check_size(folder: Path, config: Any) -> None:
    """Refuse a configuration whose model cannot fit in memory, before building it."""
    check_memory(hf_model_bytes(config, read_processor(folder)),
                 f"the model that {folder}/config.json describes",
                 "Its sizes (num_hidden_layers, hidden_size, image_size, or crop_size in "
                 f"{PROCESSOR}) are too large for this machine; check the files")


class _LogitsOnly:
    """Calls a transformers model on its one named input and returns its logits (no output
    dict)."""

    def __init__(self, model: Any, input_name: str) -> None:
        self.model = model
        self.input_name = input_name

    def __call__(self, x: Any) -> Any:
        return self.model(**{self.input_name: x}).logits

    def eval(self) -> _LogitsOnly:
        self.model.eval()
        return self

    def to(self, device: Any) -> _LogitsOnly:
        self.model.to(device)
        return self

    def parameters(self) -> Any:
        return self.model.parameters()


def import_transformers() -> Any:
    """The transformers package, its log and progress bars off.

    Raises:
        UsageError: transformers is not installed (with the install hint).
    """
    try:
        import transformers
    except ImportError as e:
        raise UsageError("a Hugging Face checkpoint folder needs the transformers package, "
                         "which is not installed", INSTALL_HINT) from e
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _auto_class(tf: Any, config: Any, folder: Path) -> Any:
    for auto in (tf.AutoModelForImageClassification, tf.AutoModelForAudioClassification):
        if type(config) in auto._model_mapping:
            return auto
    raise ModelError(f"{folder} is a {getattr(config, 'model_type', '?')} model, not an image "
                     "or audio classifier",
                     "kdcli takes classification checkpoints whose input is pixel_values or "
                     "input_values")


FORMAT = HfFormat()
