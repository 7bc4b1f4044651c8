"""Teachers: load a model saved in any common format and run it on raw data.

Formats (detected from the file's content, not its extension):

* ``kdcli``: a kdcli model file (safetensors with ``format: kdcli.model``).
* ``torchscript``: ``torch.jit.save`` archives.
* ``torch.export``: ``torch.export.save`` programs (``.pt2``), dynamic or fixed batch.
* ``onnx``: ONNX models, run with onnxruntime.
* ``state_dict``: a ``torch.save`` state dict (loaded with ``weights_only=True``) or a
  plain safetensors file, plus ``--arch`` (a kdcli spec or ``package.module:factory``).
* ``pickle``: a fully pickled ``nn.Module``, only with ``trust_pickle=True``.

Every teacher returns float32 logits ``[B, C]``; probability or log-probability outputs are
turned into logits (``log p``, exact up to a constant per row).
"""

from __future__ import annotations

import importlib
import math
import re
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.errors import FormatError, ModelError, UnsafePickleError, UsageError
from kdcli.files import require_file, sha256_file
from kdcli.models import (
    MODEL_FORMAT,
    Architecture,
    Preprocessing,
    build_model,
    load_model,
    read_safetensors_metadata,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

OUTPUT_KINDS = ("logits", "log-probs", "probs")
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


@dataclass
class TeacherOptions:
    """How to load and feed one teacher; None means "take it from the file or the data".

    Attributes:
        arch: Architecture for a bare state dict: ``mlp:1200,1200`` or ``pkg.module:factory``.
        input_shape: Per-example shape the model takes, e.g. ``[1, 28, 28]``.
        scale: Raw units are divided by this first.
        mean: Subtracted after scaling: one value, or a list with one per channel of
            ``[C, H, W]`` examples or one per input value (see
            :func:`kdcli.models.stats_shape`).
        std: Divided by after centring (one value or a list, like ``mean``).
        output: What the model outputs: ``logits``, ``log-probs`` or ``probs``.
        output_name: Which ONNX output to use, for models with several.
        trust_pickle: Allow loading a pickled module (this runs code from the file).
    """

    arch: str | None = None
    input_shape: list[int] | None = None
    scale: float | None = None
    mean: float | list[float] | None = None
    std: float | list[float] | None = None
    output: str | None = None
    output_name: str | None = None
    trust_pickle: bool = False


@dataclass
class Teacher:
    """A loaded teacher, ready to map raw inputs to logits.

    Attributes:
        path: The file.
        format: One of the formats in the module docstring.
        sha256: The file's SHA-256.
        preprocessing: Scale/mean/std applied to raw inputs before the model (identity
            for kdcli models, which carry their own).
        input_shape: Per-example shape fed to the model (None until resolved).
        input_dtype: dtype fed to the model.
        fixed_batch: The only batch size the model accepts, or None.
        output: ``logits``, ``log-probs`` or ``probs`` (None until detected).
        num_classes: Output width (None until the first batch).
    """

    path: Path
    format: str
    sha256: str
    preprocessing: dict[str, float] = field(default_factory=dict)
    input_shape: list[int] | None = None
    input_dtype: str = "float32"
    fixed_batch: int | None = None
    output: str | None = None
    num_classes: int | None = None
    shape_from_user: bool = False
    runner: Any = None  # callable: prepared float tensor -> raw output tensor
    module: Any = None  # the torch module, for PyTorch formats
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"
    precision: str = "fp32"

    @property
    def name(self) -> str:
        return self.path.name

    def describe(self) -> dict[str, Any]:
        """What the transfer-set metadata records about this teacher."""
        return {"file": self.path.name, "sha256": self.sha256, "format": self.format,
                "preprocessing": self.preprocessing, "input_shape": self.input_shape,
                "output": self.output, "num_classes": self.num_classes, **self.meta}

    def logits(self, raw: torch.Tensor) -> torch.Tensor:
        """Run the teacher on a batch of raw examples.

        Args:
            raw: ``[B, *sample_shape]`` raw inputs, as the data source stores them.

        Returns:
            ``[B, C]`` float32 logits on the CPU.
        """
        import torch

        if self.input_shape is None:
            self.resolve_input_shape(raw[:2])
        x = self._prepare(raw)
        out = self._run_fixed(x) if self.fixed_batch else self._call(x)
        out = self._check_output(out, raw.shape[0])
        if self.output is None:
            self.output = detect_output_kind(out)
            if self.output != "logits":
                self.notes.append(f"{self.name}: outputs look like {self.output}; "
                                  f"converted to logits (override with --teacher-output)")
        if self.output == "probs":
            out = out.clamp_min(torch.finfo(torch.float32).tiny).log()
        return out

    def resolve_input_shape(self, probe: torch.Tensor) -> None:
        """Find the per-example input shape, trying the likely ones if none is known."""
        sample = list(probe.shape[1:])
        n = math.prod(sample)
        if self.input_shape is not None:
            return
        candidates = [sample, [n], [1, *sample]] if len(sample) > 1 else [sample, [1, *sample]]
        first_err = None
        for cand in candidates:
            self.input_shape = cand
            try:
                x = self._prepare(probe)
                out = self._run_fixed(x) if self.fixed_batch else self._call(x)
                self._check_output(out, probe.shape[0])
                return
            except Exception as e:  # noqa: BLE001 - any failure means "not this shape"
                first_err = first_err or e
        self.input_shape = None
        msg = str(first_err).strip().splitlines()[0][:200] if first_err else "unknown"
        raise ModelError(
            f"teacher {self.name} fails on examples of shape {sample} ({msg})",
            "Pass --input-shape with the per-example shape the model expects, "
            f"e.g. --input-shape {n} or --input-shape 1,{','.join(map(str, sample))}")

    def _prepare(self, raw: torch.Tensor) -> torch.Tensor:
        import torch

        pre = self.preprocessing
        x = raw.float()
        if pre.get("scale", 1.0) != 1.0:
            x = x / pre["scale"]
        mean, std = pre.get("mean", 0.0), pre.get("std", 1.0)
        if isinstance(mean, list) or isinstance(std, list):
            from kdcli.models import stats_tensor

            x = (x - stats_tensor(mean, raw.shape[1:])) / stats_tensor(std, raw.shape[1:])
        elif mean != 0.0 or std != 1.0:
            x = (x - mean) / std
        shape = self.input_shape or list(raw.shape[1:])
        if math.prod(shape) != math.prod(raw.shape[1:]):
            raise ModelError(
                f"teacher {self.name} expects examples of shape {shape} "
                f"({math.prod(shape)} values), but the data has {list(raw.shape[1:])}",
                "Give data that fits the teacher, or the right --input-shape")
        x = x.reshape(raw.shape[0], *shape)
        return x.to(getattr(torch, self.input_dtype))

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner(x)

    def _run_fixed(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        b = self.fixed_batch
        outs = []
        for i in range(0, x.shape[0], b):
            chunk = x[i:i + b]
            n = chunk.shape[0]
            if n < b:
                chunk = torch.cat([chunk, chunk.new_zeros((b - n, *chunk.shape[1:]))])
            outs.append(self._call(chunk)[:n])
        return torch.cat(outs)

    def _check_output(self, out: Any, batch: int) -> torch.Tensor:
        import torch

        if isinstance(out, (tuple, list)):
            if len(out) != 1:
                raise ModelError(f"teacher {self.name} returns {len(out)} outputs",
                                 "Export it with a single logits output")
            out = out[0]
        if isinstance(out, dict):
            out = out.get("logits", next(iter(out.values())))
        if not isinstance(out, torch.Tensor):
            raise ModelError(f"teacher {self.name} returned {type(out).__name__}",
                             "The model must return a tensor of class scores")
        if out.dim() != 2 or out.shape[0] != batch:
            raise ModelError(
                f"teacher {self.name} returned shape {tuple(out.shape)} for a batch of {batch}",
                "The model must output [batch, classes]; check --input-shape")
        if self.num_classes is None:
            self.num_classes = int(out.shape[1])
        return out.detach().float().cpu()


def detect_output_kind(out: torch.Tensor) -> str:
    """Guess whether a teacher's outputs are logits, log-probs or probs (rows must decide)."""
    import torch

    if out.numel() == 0 or not bool(torch.isfinite(out).all()):
        return "logits"
    if bool((out >= 0).all() & (out <= 1).all()) and bool(
            ((out.sum(-1) - 1).abs() < 1e-3).all()):
        return "probs"
    if bool((out <= 0).all()) and bool((torch.logsumexp(out, -1).abs() < 1e-3).all()):
        return "log-probs"
    return "logits"


def detect_format(path: Path) -> str:
    """Name a model file's format from its content (see the module docstring)."""
    with open(path, "rb") as f:
        head = f.read(8)
    meta = read_safetensors_metadata(path)
    if meta is not None:
        fmt = meta.get("format")
        if fmt == MODEL_FORMAT:
            return "kdcli"
        if fmt == "kdcli.transfer-set":
            raise FormatError(f"{path} is a transfer set, not a model",
                              "Give a teacher model; use the transfer set with train-student")
        return "safetensors-state-dict"
    if head.startswith(b"PK\x03\x04"):
        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile as e:
            raise FormatError(f"{path} is a corrupt or truncated zip archive",
                              "Save the model again") from e
        if any(n.endswith("archive_format") or n.endswith("serialized_exported_program.json")
               for n in names):
            return "torch.export"
        if any("/code/" in n for n in names) or any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "torch.save"
        raise FormatError(f"{path} is a zip archive but not a PyTorch file",
                          "Give a kdcli, TorchScript, torch.export, ONNX or torch.save file")
    if head[:1] == b"\x80":  # a pickle protocol header: legacy torch.save
        return "torch.save"
    if is_onnx_file(path):
        return "onnx"
    raise FormatError(f"{path} is not a model format kdcli knows",
                      "Give a kdcli .safetensors, TorchScript, torch.export .pt2, ONNX, "
                      "or torch.save state dict (with --arch)")


def is_onnx_file(path: Path) -> bool:
    """Whether ``path`` parses as an ONNX model with nodes and outputs."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not parseable as ONNX
        return False
    return len(model.graph.node) > 0 and len(model.graph.output) > 0


def load_teacher(path: str | Path, opts: TeacherOptions | None = None, device: str = "cpu",
                 precision: str = "fp32", role: str = "teacher") -> Teacher:
    """Load a teacher from any supported format.

    Args:
        path: The model file.
        opts: Loading and input options (see :class:`TeacherOptions`).
        device: ``cpu`` or ``cuda`` (PyTorch formats; ONNX uses CUDA if its provider exists).
        precision: ``fp32`` or ``bf16`` (autocast, PyTorch formats only).
        role: What to call the file in error messages (``teacher``, ``model``).

    Raises:
        DataError: the file is missing or empty.
        FormatError: the format is unknown, or the file is corrupt.
        UnsafePickleError: the file is a pickled module and ``trust_pickle`` is off.
    """
    opts = opts or TeacherOptions()
    if opts.output is not None and opts.output not in OUTPUT_KINDS:
        raise UsageError(f"unknown --teacher-output {opts.output!r}",
                         f"Use one of {', '.join(OUTPUT_KINDS)}")
    p = require_file(path, role)
    fmt = detect_format(p)
    t = Teacher(path=p, format=fmt, sha256=sha256_file(p), output=opts.output,
                device=device, precision=precision)
    if opts.input_shape:
        t.input_shape, t.shape_from_user = list(opts.input_shape), True
    user_pre = {k: v for k, v in (("scale", opts.scale), ("mean", opts.mean),
                                  ("std", opts.std)) if v is not None}
    if fmt == "kdcli":
        mf = load_model(p)
        t.input_shape = t.input_shape or list(mf.preprocessing.raw_shape)
        t.preprocessing = {"scale": 1.0, "mean": 0.0, "std": 1.0}
        t.meta = {"architecture": mf.arch.spec(), "model_preprocessing": asdict(mf.preprocessing),
                  "training": {k: mf.training.get(k) for k in ("command", "test_errors")
                               if k in mf.training}}
        _torch_runner(t, mf.model)
        return t
    t.preprocessing = {"scale": 1.0, "mean": 0.0, "std": 1.0, **user_pre}
    if fmt == "onnx":
        _onnx_runner(t, p, opts)
    elif fmt == "torchscript":
        _torch_runner(t, _load_torchscript(p))
    elif fmt == "torch.export":
        _torch_runner(t, _load_exported(t, p, opts.trust_pickle))
    elif fmt == "safetensors-state-dict":
        _torch_runner(t, _module_from_state_dict(t, _load_safetensors_sd(p), opts))
        t.format = "state_dict"
    else:  # torch.save
        _torch_runner(t, _load_torch_save(t, p, opts))
    return t


def _torch_runner(t: Teacher, module: Any) -> None:
    import torch

    dev = torch.device(t.device)
    if dev.type != "cpu":
        module = module.to(dev)
    if t.format != "torch.export":  # exported programs are already in inference form
        module.eval()
    t.module = module

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(
                dev.type, dtype=torch.bfloat16, enabled=t.precision == "bf16"):
            return module(x.to(dev))

    t.runner = run


def _load_torchscript(p: Path) -> Any:
    import torch

    try:
        return torch.jit.load(str(p), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - torch raises many kinds here
        raise FormatError(f"{p} is a corrupt TorchScript archive ({_first_line(e)})",
                          "Save it again with torch.jit.save") from e


def _load_exported(t: Teacher, p: Path, trust_pickle: bool = False) -> Any:
    import torch

    from kdcli.safety import check_export_archive

    check_export_archive(p, trust_pickle)
    try:
        ep = torch.export.load(str(p))
    except Exception as e:  # noqa: BLE001
        raise FormatError(f"{p} is a corrupt torch.export program ({_first_line(e)})",
                          "Save it again with torch.export.save") from e
    user_inputs = list(ep.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise ModelError(f"{p} takes {len(user_inputs)} inputs", "kdcli teachers take one input")
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name == user_inputs[0]:
            val = node.meta.get("val")
            if val is not None:
                dims = list(val.shape)
                if isinstance(dims[0], int):
                    t.fixed_batch = int(dims[0])
                rest = dims[1:]
                if all(isinstance(d, int) for d in rest) and not t.shape_from_user:
                    t.input_shape = [int(d) for d in rest]
                t.input_dtype = str(val.dtype).removeprefix("torch.")
    return ep.module()


def _load_torch_save(t: Teacher, p: Path, opts: TeacherOptions) -> Any:
    import pickle

    import torch
    from torch import nn

    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not opts.trust_pickle:
            raise UnsafePickleError(
                f"{p} holds a pickled Python object; loading it runs code from the file",
                "If you trust its source, pass --trust-pickle; or save a state dict and "
                "pass --arch") from e
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=False)
        except Exception as e2:  # noqa: BLE001
            raise FormatError(f"cannot unpickle {p} ({_first_line(e2)})",
                              "Make sure the module's code is importable (PYTHONPATH)") from e2
        t.format = "pickle"
    except Exception as e:  # noqa: BLE001 - truncated zip, bad storage, ...
        raise FormatError(f"{p} is a corrupt torch.save file ({_first_line(e)})",
                          "Save it again") from e
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        t.format = "state_dict"
        return _module_from_state_dict(t, _unwrap_state_dict(obj, p), opts)
    raise FormatError(f"{p} holds a {type(obj).__name__}, not a module or state dict",
                      "Save model.state_dict() and pass --arch")


def _unwrap_state_dict(obj: dict, p: Path) -> dict:
    import torch

    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in _STATE_DICT_KEYS:
        if isinstance(obj.get(key), dict):
            return _unwrap_state_dict(obj[key], p)
    raise FormatError(f"{p} holds a dict without a recognizable state dict",
                      f"Save model.state_dict() (or nest it under one of {_STATE_DICT_KEYS})")


def _load_safetensors_sd(p: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(p))
    except SafetensorError as e:
        raise FormatError(f"{p} is a corrupt safetensors file ({_first_line(e)})",
                          "Save it again") from e


def _module_from_state_dict(t: Teacher, sd: dict, opts: TeacherOptions) -> Any:
    if not opts.arch:
        raise UsageError(f"{t.name} is a bare state dict with no architecture",
                         "Pass --arch mlp:WIDTH,WIDTH (kdcli's family) or "
                         "--arch package.module:factory (your own code)")
    t.meta["architecture"] = opts.arch
    if opts.arch.startswith(("mlp:", "cnn:")):
        arch = Architecture.parse(opts.arch)
        sample = _state_dict_input_size(sd)
        raw = list(opts.input_shape) if opts.input_shape else None
        if raw is None:
            raw = [sample] if arch.family == "mlp" and sample else [1, 28, 28]
        num_classes = _state_dict_num_classes(sd)
        model = build_model(arch, Preprocessing(raw_shape=raw), num_classes)
        net = model[1]
        _load_positional(net, sd, t.name, sorted_keys=t.format == "safetensors-state-dict")
        if not t.shape_from_user and arch.family == "cnn":
            t.input_shape = raw
        return model
    module = _call_factory(opts.arch)
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise FormatError(f"the state dict in {t.name} does not fit {opts.arch}: "
                          f"{_first_line(e)}", "Check --arch") from e
    return module


def _state_dict_input_size(sd: dict) -> int | None:
    first = next((v for k, v in sd.items() if k.endswith("weight") and v.dim() == 2), None)
    return int(first.shape[1]) if first is not None else None


def _state_dict_num_classes(sd: dict) -> int:
    weights = [v for k, v in sd.items() if k.endswith("weight") and v.dim() == 2]
    if not weights:
        raise FormatError("the state dict has no Linear weights", "Check --arch")
    return int(weights[-1].shape[0])


def _load_positional(net: nn.Module, sd: dict, name: str, sorted_keys: bool = False) -> None:
    """Load ``sd`` into ``net`` by key, or else module by module in order.

    Modules are the key prefixes (``fc1`` of ``fc1.weight``). They keep the file's order,
    or natural order (``layer2`` before ``layer10``) for formats that sort keys
    (safetensors). Within a module, parameters match by name; every shape must agree.
    """
    try:
        net.load_state_dict(sd, strict=True)
        return
    except RuntimeError:
        pass

    def groups(d: dict, natural: bool) -> list[tuple[str, dict]]:
        out: dict[str, dict] = {}
        for k, v in d.items():
            if k.endswith("num_batches_tracked"):
                continue
            prefix, _, leaf = k.rpartition(".")
            out.setdefault(prefix, {})[leaf] = v
        items = list(out.items())
        if natural:
            items.sort(key=lambda kv: [int(s) if s.isdigit() else s
                                       for s in re.split(r"(\d+)", kv[0])])
        return items

    own, theirs = groups(net.state_dict(), False), groups(sd, sorted_keys)
    shape = lambda gs: [{k: tuple(v.shape) for k, v in g.items()} for _, g in gs]  # noqa: E731
    if shape(own) != shape(theirs):
        raise FormatError(
            f"the state dict in {name} does not fit the architecture: it has "
            f"{_shapes(theirs)}, the architecture needs {_shapes(own)}",
            "Pass the --arch the teacher was built with")
    mapped = {f"{po}.{leaf}": g2[leaf] for (po, g1), (_, g2) in zip(own, theirs, strict=True)
              for leaf in g1}
    net.load_state_dict(mapped, strict=True)


def _shapes(groups: list[tuple[str, dict]]) -> str:
    text = ", ".join(f"{p or '.'}:{[list(v.shape) for v in g.values()]}" for p, g in groups)
    return text if len(text) < 160 else text[:157] + "..."


def _call_factory(spec: str) -> Any:
    modname, _, attr = spec.partition(":")
    if not modname or not attr:
        raise UsageError(f"bad --arch {spec!r}",
                         "Use mlp:W,W / cnn:MULT, or package.module:factory")
    from kdcli.safety import check_factory

    check_factory(spec, modname, attr)
    if "" not in sys.path:
        sys.path.insert(0, "")  # like `python -m`, user code in the working folder is found
    try:
        factory = getattr(importlib.import_module(modname), attr)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"cannot import {spec} ({e})",
                         "Check the module is on PYTHONPATH and the factory name") from e
    check_factory(spec, modname, attr, factory)
    module = factory()
    from torch import nn

    if not isinstance(module, nn.Module):
        raise ModelError(f"{spec}() returned {type(module).__name__}", "Return an nn.Module")
    return module


def _onnx_runner(t: Teacher, p: Path, opts: TeacherOptions) -> None:
    import numpy as np
    import onnxruntime as ort
    import torch

    so = ort.SessionOptions()
    so.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if t.device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        sess = ort.InferenceSession(str(p), so, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
        raise FormatError(f"{p} is a corrupt or unsupported ONNX model ({_first_line(e)})",
                          "Export it again") from e
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"{p} takes {len(inputs)} inputs", "kdcli teachers take one input")
    outputs = [o.name for o in sess.get_outputs()]
    if opts.output_name:
        if opts.output_name not in outputs:
            raise UsageError(f"{p} has no output {opts.output_name!r}",
                             f"Choose --output from {outputs}")
        out_name = opts.output_name
    elif len(outputs) == 1:
        out_name = outputs[0]
    elif "logits" in outputs and "kdcli_version" in sess.get_modelmeta().custom_metadata_map:
        out_name = "logits"  # a kdcli export: its outputs are known
    else:
        raise UsageError(f"{p} has several outputs {outputs}", "Choose one with --output NAME")
    inp = inputs[0]
    dims = list(inp.shape)
    if dims and isinstance(dims[0], int) and dims[0] > 0:
        t.fixed_batch = dims[0]
    rest = dims[1:]
    if rest and all(isinstance(d, int) and d > 0 for d in rest) and not t.shape_from_user:
        t.input_shape = [int(d) for d in rest]
    onnx_types = {"tensor(float)": "float32", "tensor(double)": "float64",
                  "tensor(uint8)": "uint8", "tensor(float16)": "float16",
                  "tensor(int64)": "int64", "tensor(int32)": "int32"}
    t.input_dtype = onnx_types.get(inp.type, "float32")
    t.meta["onnx_output"] = out_name

    def run(x: torch.Tensor) -> torch.Tensor:
        (y,) = sess.run([out_name], {inp.name: np.ascontiguousarray(x.numpy())})
        return torch.from_numpy(y)

    t.runner = run


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:200]


def parse_shape(text: str) -> list[int]:
    """Parse ``1,28,28`` into ``[1, 28, 28]``."""
    try:
        shape = [int(s) for s in text.replace("x", ",").split(",") if s.strip()]
    except ValueError as e:
        raise UsageError(f"bad --input-shape {text!r}",
                         "Use comma-separated sizes, e.g. 1,28,28") from e
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"bad --input-shape {text!r}", "Use positive sizes, e.g. 1,28,28")
    return shape


