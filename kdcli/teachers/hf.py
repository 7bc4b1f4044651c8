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
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.checks import preprocessing_problem
from kdcli.errors import FormatError, ModelError, UnsafePickleError, UsageError, quote_name
from kdcli.io.files import inside_folder, sha256_file

if TYPE_CHECKING:
    from kdcli.teachers.base import Teacher, TeacherOptions

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
PROCESSOR = "preprocessor_config.json"
FLOAT_INPUTS = ("pixel_values", "input_values")
INSTALL_HINT = 'Install the Hugging Face extra: pip install "kdcli[hf]"'


def is_hf_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding a ``config.json`` (a checkpoint folder). A
    ``config.json`` that is a link counts without its target being looked at (loading
    then refuses one that leads out)."""
    import stat

    try:
        mode = os.lstat(path / "config.json").st_mode
    except OSError:
        return False
    return path.is_dir() and (stat.S_ISREG(mode) or stat.S_ISLNK(mode))


def check_folder(folder: Path) -> None:
    """Refuse a checkpoint folder holding a link that leads out of it, or a FIFO, device or
    socket: transformers and kdcli read ``config.json``, ``preprocessor_config.json``,
    indexes, shards and other JSON files from it by name. Links are read with ``lstat``
    and ``readlink``; their targets outside are never touched.

    Raises:
        FormatError: naming the entry.
    """
    import stat

    try:
        entries = list(os.scandir(folder))
    except OSError as e:
        raise FormatError(f"cannot list the checkpoint folder {quote_name(folder)} "
                          f"({e.strerror})", "Check the path and its permissions") from e
    for e in entries:
        if e.is_symlink() and inside_folder(folder, e.name) is None:
            raise FormatError(f"{quote_name(folder)}: {quote_name(e.name)} is a link to "
                              f"{quote_name(os.readlink(e.path))}, outside the checkpoint "
                              "folder", "Copy the file into the folder (cp -L), or remove "
                              "the link")
        mode = e.stat(follow_symlinks=True).st_mode if e.is_symlink() and \
            os.path.exists(e.path) else e.stat(follow_symlinks=False).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            raise FormatError(f"{quote_name(folder)}: {quote_name(e.name)} is not a regular "
                              "file (a FIFO, device or socket)", "Remove it from the folder")


def weight_files(folder: Path, trust_pickle: bool = False) -> list[Path]:
    """The weight files the checkpoint loads from, each checked to lie inside ``folder``.

    Raises:
        FormatError: no weights, a bad index, a link leading out of the folder, or a
            shard outside the folder.
        UnsafePickleError: pickled weights (``pytorch_model.bin``, or an index naming a
            shard that is not ``.safetensors``), and ``trust_pickle`` is off.
    """
    check_folder(folder)
    if (folder / SAFETENSORS_INDEX).is_file():
        index = folder / SAFETENSORS_INDEX
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{index} is not a safetensors index (no weight_map)",
                              "Save the checkpoint again with save_pretrained") from e
        files = [index, *(_inside(folder, s) for s in shards)]
        pickled = [s for s in shards if not str(s).endswith(".safetensors")]
        if pickled and not trust_pickle:
            raise UnsafePickleError(
                f"{SAFETENSORS_INDEX} in {quote_name(folder)} names the shard "
                f"{repr(str(pickled[0])[:100])}, not a safetensors file: it may "
                "be a pickle, and loading it can run code from the file",
                "If you trust its source, pass --trust-pickle; or save it again with "
                "save_pretrained(safe_serialization=True)")
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
    """Where the weight file ``name`` leads, read without touching anything outside."""
    p = inside_folder(folder, str(name))
    if p is None or p == Path(os.path.realpath(folder)):
        raise FormatError(f"{folder} names the weight file {repr(str(name))}, "
                          "which is outside the checkpoint folder",
                          "Keep every shard inside the folder")
    return p


def folder_sha256(folder: Path) -> str:
    """SHA-256 over the names and SHA-256s of the config, processor config and weights."""
    check_folder(folder)  # before any file is read (this runs before the loader)
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
    cfg = _json_object(p, "Save the processor again")
    _check_processor(cfg, p)
    return cfg


def _json_object(p: Path, hint: str) -> dict[str, Any]:
    """The JSON object in ``p`` (FormatError with ``hint`` if it is not one)."""
    try:
        cfg = json.loads(p.read_text())
    except ValueError as e:
        raise FormatError(f"{p} is not valid JSON ({e})", hint) from e
    if not isinstance(cfg, dict):
        raise FormatError(f"{p} is not a JSON object", hint)
    return cfg


def read_config(folder: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json``, with the fields kdcli uses checked for their type.

    Raises:
        FormatError: not JSON, not an object, or a field of the wrong type.
    """
    p = folder / "config.json"
    cfg = _json_object(p, "Save the checkpoint again")
    n = cfg.get("num_labels")
    if n is not None and not _positive_int(n):
        _wrong(p, "num_labels", n, "a positive integer")
    id2label = cfg.get("id2label")
    if id2label is not None and not (isinstance(id2label, dict) and all(
            isinstance(k, str) and k.isdecimal() for k in id2label)):
        _wrong(p, "id2label", id2label, 'an object from class numbers to names ({"0": "cat"})')
    size = cfg.get("image_size")
    if size is not None and not (_positive_int(size) or _is_size(size) or (
            isinstance(size, list) and size and all(_positive_int(x) for x in size))):
        _wrong(p, "image_size", size, "a positive integer")
    return cfg


def _check_processor(proc: dict[str, Any], p: Path) -> None:
    """Refuse processor fields kdcli uses that have the wrong type (a string for a number,
    an object for a list, a size of zero)."""
    for key in ("rescale_factor",):
        if proc.get(key) is not None and not _number(proc[key]):
            _wrong(p, key, proc[key], "a number")
    for key in ("image_mean", "image_std"):
        v = proc.get(key)
        if v is not None and not (_number(v) or (isinstance(v, list) and v
                                                 and all(_number(x) for x in v))):
            _wrong(p, key, v, "a number or a list of numbers, one per channel")
    for key in ("size", "crop_size"):
        v = proc.get(key)
        if v is not None and not (_positive_int(v) or _is_size(v)):
            _wrong(p, key, v, 'a positive integer or {"height": H, "width": W}')


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_int(v: Any, zero: bool = False) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= (0 if zero else 1)


def _is_size(v: Any) -> bool:
    """A size object of positive integers (``height`` and ``width``, ``shortest_edge``,
    ``longest_edge``, ...)."""
    return isinstance(v, dict) and bool(v) and all(_positive_int(x) for x in v.values()
                                                    if x is not None)


def _wrong(p: Path, key: str, value: Any, want: str) -> None:
    shown = json.dumps(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise FormatError(f"{p}: {key} must be {want}, not {shown}",
                      "Fix the field, or save the checkpoint again with save_pretrained")


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


def load_hf(t: Teacher, opts: TeacherOptions) -> None:
    """Fill ``t`` from the checkpoint folder ``t.path`` (the ``huggingface`` table entry)."""
    from kdcli.errors import first_line
    from kdcli.teachers.base import _torch_runner
    from kdcli.teachers.inputs import IDENTITY

    folder = t.path
    files = weight_files(folder, opts.trust_pickle)
    read_config(folder)  # fields of the wrong type: one line, before transformers reads them
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
            dtype=torch.float32, output_loading_info=True)
    except Exception as e:  # noqa: BLE001
        raise FormatError(f"{folder} does not load as a {type(config).__name__} checkpoint "
                          f"({first_line(e)})", "Save it again with save_pretrained") from e
    model = _check_loading_info(folder, *model)
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
    t.preprocessing = check_processor(folder, {**IDENTITY, **pre, **opts.preprocessing()})
    t.meta["preprocessing_source"] = PROCESSOR if (folder / PROCESSOR).is_file() else "none"
    _torch_runner(t, _LogitsOnly(model))


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
