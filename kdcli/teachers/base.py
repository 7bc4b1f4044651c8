"""Teachers: load a model saved in any common format and run it on raw data.

The formats are a table, :data:`FORMATS`: each entry names a format, says whether a path
holds it (from the content, not the extension) and loads it. Loading turns the path into a
:class:`Teacher` whose description (format, input shape and dtype, output kind, classes,
class names, preprocessing) is settled by a probe batch inside :func:`load_teacher` and then
frozen; :meth:`Teacher.logits` only runs the model. A new format is one entry plus its tests.

* ``huggingface``: a ``transformers`` checkpoint folder (:mod:`kdcli.teachers.hf`).
* ``kdcli``: a kdcli model file (safetensors with ``format: kdcli.model``).
* ``torchscript``: ``torch.jit.save`` archives.
* ``torch.export``: ``torch.export.save`` programs (``.pt2``), dynamic or fixed batch.
* ``onnx``: ONNX models, including ONNX-ML classifiers (:mod:`kdcli.teachers.onnx`).
* ``state_dict``: a ``torch.save`` state dict (loaded with ``weights_only=True``) or a
  plain safetensors file, plus ``--arch`` (a kdcli spec or ``package.module:factory``).
* ``pickle``: a fully pickled ``nn.Module``, only with ``trust_pickle=True``.

Every teacher returns float32 logits ``[B, C]``; probability or log-probability outputs are
turned into logits (``log p``, exact up to a constant per row, floored at
:data:`LOG_PROB_FLOOR`), and a single output column becomes two classes.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.errors import (
    DataError,
    FormatError,
    KdcliError,
    ModelError,
    UnsafePickleError,
    UsageError,
    first_line,
)
from kdcli.io.files import require_file, sha256_file
from kdcli.io.storage import read_safetensors_metadata
from kdcli.preprocessing import Preprocessing
from kdcli.students.base import Architecture, build_model
from kdcli.students.model_file import MODEL_FORMAT, load_model
from kdcli.teachers.inputs import IDENTITY, prepare_input

if TYPE_CHECKING:
    import torch
    from torch import nn

OUTPUT_KINDS = ("logits", "log-probs", "probs")
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
#: The smallest logit a probability (or log-probability) output becomes: a probability of
#: exactly 0, common for trees, gives this finite logit instead of -inf. At T <= 30 its
#: soft target is below exp(-33) of the top class's, so tempered probabilities stay exact
#: in float32.
LOG_PROB_FLOOR = -1000.0


@dataclass
class TeacherOptions:
    """How to load and feed one teacher; None means "take it from the file or the data".

    Attributes:
        arch: Architecture for a bare state dict: ``mlp:1200,1200`` or ``pkg.module:factory``.
        input_shape: Per-example shape the model takes, e.g. ``[1, 28, 28]``.
        scale: Raw units are divided by this first.
        mean: Subtracted after scaling: one value, or a list with one per channel of
            ``[C, H, W]`` examples or one per input value (see
            :func:`kdcli.students.base.stats_shape`).
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

    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing settings the user gave (they override the file's)."""
        return {k: v for k, v in (("scale", self.scale), ("mean", self.mean),
                                  ("std", self.std)) if v is not None}


class NotScoresError(ModelError):
    """A model's output is not class scores (labels, flags, a regressor's value)."""


@dataclass
class Teacher:
    """A loaded teacher, ready to map raw inputs to logits.

    A format's loader fills the fields; :func:`load_teacher` then probes the model and
    freezes them, so every field is known, and fixed, before the first call.

    Attributes:
        path: The file (or checkpoint folder).
        format: One of the format names of :data:`FORMATS`.
        sha256: The file's SHA-256 (a folder's: see :func:`kdcli.teachers.hf.folder_sha256`).
        preprocessing: How raw inputs become model inputs (see :func:`prepare_input`):
            ``scale``, ``mean``, ``std`` (numbers, or one per channel), and for image
            checkpoints ``size`` (``[H, W]`` to resize to). Identity for kdcli models,
            which carry their own.
        input_shape: Per-example shape fed to the model.
        input_dtype: dtype fed to the model.
        fixed_batch: The only batch size the model accepts, or None.
        output: ``logits``, ``log-probs`` or ``probs``.
        num_classes: Number of classes (2 for a single-column binary output).
        class_names: The classes' names, where the file has them.
        binary: The model has one output column (a logit or a probability of class 1).
    """

    path: Path
    format: str
    sha256: str
    preprocessing: dict[str, Any] = field(default_factory=dict)
    input_shape: list[int] | None = None
    input_dtype: str = "float32"
    fixed_batch: int | None = None
    output: str | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    binary: bool = False
    shape_from_user: bool = False
    runner: Any = None  # callable: prepared tensor -> raw output
    module: Any = None  # the torch module, for PyTorch formats
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"
    precision: str = "fp32"
    frozen: bool = field(default=False, repr=False)

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("frozen"):
            raise AttributeError(f"teacher {self.path.name} is loaded and frozen; "
                                 f"cannot set {name}")
        object.__setattr__(self, name, value)

    @property
    def name(self) -> str:
        return self.path.name

    def describe(self) -> dict[str, Any]:
        """What the transfer-set metadata records about this teacher."""
        out = {"file": self.path.name, "sha256": self.sha256, "format": self.format,
               "preprocessing": self.preprocessing, "input_shape": self.input_shape,
               "output": self.output, "num_classes": self.num_classes, **self.meta}
        if self.class_names is not None:
            out["class_names"] = self.class_names
        return out

    def logits(self, raw: torch.Tensor) -> torch.Tensor:
        """Run the teacher on a batch of raw examples.

        Args:
            raw: ``[B, *sample_shape]`` raw inputs, as the data source stores them.

        Returns:
            ``[B, C]`` float32 logits on the CPU.
        """
        x = prepare_input(raw, Preprocessing.from_dict(self.preprocessing), self.input_shape,
                          self.input_dtype, self.name)
        out = self._check_output(self._forward(x), raw.shape[0])
        return to_logits(out, self.output or "logits")

    def _forward(self, x: torch.Tensor) -> Any:
        return self._run_fixed(x) if self.fixed_batch else self.runner(x)

    def _run_fixed(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        b = self.fixed_batch
        outs = []
        for i in range(0, x.shape[0], b):
            chunk = x[i:i + b]
            n = chunk.shape[0]
            if n < b:
                chunk = torch.cat([chunk, chunk.new_zeros((b - n, *chunk.shape[1:]))])
            outs.append(self._check_output(self.runner(chunk), b)[:n])
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
        if not out.is_floating_point():
            raise NotScoresError(
                f"teacher {self.name} outputs {str(out.dtype).removeprefix('torch.')} values "
                "(labels, counts or flags), not class scores",
                "Give a model that outputs logits or probabilities (for an ONNX classifier, "
                "its probabilities: --output)")
        if out.dim() == 1 and out.shape[0] == batch:
            out = out[:, None]  # one score per example: a binary classifier
        if out.dim() != 2 or out.shape[0] != batch:
            raise ModelError(
                f"teacher {self.name} returned shape {tuple(out.shape)} for a batch of {batch}",
                "The model must output [batch, classes]; check --input-shape")
        return out.detach().float().cpu()


def to_logits(out: torch.Tensor, kind: str) -> torch.Tensor:
    """Turn a model's outputs of ``kind`` into logits ``[B, C]``.

    Probabilities become ``log p`` and log-probabilities stay, both floored at
    :data:`LOG_PROB_FLOOR`. A single column (``[B, 1]``) is a binary classifier: a
    probability ``p`` of class 1 becomes ``log [1 - p, p]``, a logit ``z`` becomes ``[0, z]``.
    """
    import torch

    if out.shape[1] == 1:
        if kind == "probs":
            out = torch.cat([1 - out, out], 1)
        elif kind == "log-probs":
            out = torch.cat([torch.log1p(-out.exp()), out], 1)
        else:
            return torch.cat([torch.zeros_like(out), out], 1)
    if kind == "probs":
        return out.clamp_min(0).log().clamp_min(LOG_PROB_FLOOR)
    if kind == "log-probs":
        return out.clamp_min(LOG_PROB_FLOOR)
    return out


def detect_output_kind(out: torch.Tensor) -> str:
    """Guess whether a teacher's outputs are logits, log-probs or probs (rows must decide).

    A single column is a probability if every value lies in [0, 1], else a logit.
    """
    import torch

    if out.numel() == 0 or not bool(torch.isfinite(out).all()):
        return "logits"
    in_unit = bool((out >= 0).all() & (out <= 1).all())
    if out.shape[-1] == 1:
        return "probs" if in_unit else "logits"
    if in_unit and bool(((out.sum(-1) - 1).abs() < 1e-3).all()):
        return "probs"
    if bool((out <= 0).all()) and bool((torch.logsumexp(out, -1).abs() < 1e-3).all()):
        return "log-probs"
    return "logits"


# --- the formats table -----------------------------------------------------------------


@dataclass(frozen=True)
class TeacherFormat:
    """One entry of the formats table.

    Attributes:
        name: The format's name, as recorded in transfer sets.
        detect: Whether a path holds this format (by content); may raise a FormatError
            that says what the path is instead.
        load: Fills a :class:`Teacher`'s runner and whatever the file tells (shape, dtype,
            output kind, classes, preprocessing).
        digest: The SHA-256 that identifies the teacher.
    """

    name: str
    detect: Callable[[Path], bool]
    load: Callable[[Teacher, TeacherOptions], None]
    digest: Callable[[Path], str] = sha256_file


def _st_meta(p: Path) -> dict | None:
    return None if p.is_dir() else read_safetensors_metadata(p)


def _is_kdcli(p: Path) -> bool:
    meta = _st_meta(p)
    return meta is not None and meta.get("format") == MODEL_FORMAT


def _is_safetensors_state_dict(p: Path) -> bool:
    meta = _st_meta(p)
    if meta is not None and meta.get("format") == "kdcli.transfer-set":
        raise FormatError(f"{p} is a transfer set, not a model",
                          "Give a teacher model; use the transfer set with train-student")
    return meta is not None


def _zip_names(p: Path) -> list[str]:
    if p.is_dir():
        return []
    with open(p, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return []
    try:
        return zipfile.ZipFile(p).namelist()
    except zipfile.BadZipFile as e:
        raise FormatError(f"{p} is a corrupt or truncated zip archive",
                          "Save the model again") from e


def _is_exported(p: Path) -> bool:
    return any(n.endswith("archive_format") or n.endswith("serialized_exported_program.json")
               for n in _zip_names(p))


def _is_torchscript(p: Path) -> bool:
    names = _zip_names(p)
    return any("/code/" in n for n in names) or any(n.endswith("constants.pkl") for n in names)


def _is_torch_save(p: Path) -> bool:
    if any(n.endswith("data.pkl") for n in _zip_names(p)):
        return True
    with open(p, "rb") as f:
        return f.read(1) == b"\x80"  # a pickle protocol header: legacy torch.save


def _is_hf(p: Path) -> bool:
    from kdcli.teachers.hf import is_hf_folder

    return is_hf_folder(p)


def _is_onnx(p: Path) -> bool:
    return not p.is_dir() and is_onnx_file(p)


def _load_hf(t: Teacher, opts: TeacherOptions) -> None:
    from kdcli.teachers.hf import load_hf

    load_hf(t, opts)


def _hf_digest(p: Path) -> str:
    from kdcli.teachers.hf import folder_sha256

    return folder_sha256(p)


def _load_onnx(t: Teacher, opts: TeacherOptions) -> None:
    from kdcli.teachers.onnx import load_onnx

    load_onnx(t, opts)


def _load_kdcli(t: Teacher, opts: TeacherOptions) -> None:
    mf = load_model(t.path)
    t.input_shape = t.input_shape or list(mf.preprocessing.raw_shape)
    t.preprocessing = dict(IDENTITY)  # the model does its own
    t.meta = {"architecture": mf.arch.spec(), "model_preprocessing": mf.preprocessing.to_dict(),
              "training": {k: mf.training.get(k) for k in ("command", "test_errors")
                           if k in mf.training}}
    names = mf.training.get("class_names")
    if isinstance(names, list) and len(names) == mf.num_classes:
        t.class_names = [str(n) for n in names]
    t.num_classes = mf.num_classes
    _torch_runner(t, mf.model)


def _load_ts(t: Teacher, opts: TeacherOptions) -> None:
    _torch_runner(t, _load_torchscript(t.path))


def _load_export(t: Teacher, opts: TeacherOptions) -> None:
    _torch_runner(t, _load_exported(t, t.path, opts.trust_pickle))


def _load_st_state_dict(t: Teacher, opts: TeacherOptions) -> None:
    _torch_runner(t, _module_from_state_dict(t, _load_safetensors_sd(t.path), opts))
    t.format = "state_dict"


def _load_pickled(t: Teacher, opts: TeacherOptions) -> None:
    _torch_runner(t, _load_torch_save(t, t.path, opts))


#: The formats, tried in this order on a path's content.
FORMATS: tuple[TeacherFormat, ...] = (
    TeacherFormat("huggingface", _is_hf, _load_hf, _hf_digest),
    TeacherFormat("kdcli", _is_kdcli, _load_kdcli),
    TeacherFormat("safetensors-state-dict", _is_safetensors_state_dict, _load_st_state_dict),
    TeacherFormat("torch.export", _is_exported, _load_export),
    TeacherFormat("torchscript", _is_torchscript, _load_ts),
    TeacherFormat("torch.save", _is_torch_save, _load_pickled),
    TeacherFormat("onnx", _is_onnx, _load_onnx),
)


def find_format(path: Path, role: str = "teacher") -> TeacherFormat:
    """The table entry for ``path``, found by content.

    Raises:
        DataError: the path is missing, empty, or a folder that is no checkpoint.
        FormatError: no format matches, or the file is corrupt.
    """
    p = Path(path)
    if p.is_dir():
        if _is_hf(p):
            return FORMATS[0]
        raise DataError(f"{role} {p} is a directory without a config.json",
                        "Give a model file, or a Hugging Face checkpoint folder "
                        "(config.json and model.safetensors)")
    require_file(p, role)
    for fmt in FORMATS:
        if fmt.detect(p):
            return fmt
    if _zip_names(p):
        raise FormatError(f"{p} is a zip archive but not a PyTorch file",
                          "Give a kdcli, TorchScript, torch.export, ONNX or torch.save file")
    raise FormatError(f"{p} is not a model format kdcli knows",
                      "Give a kdcli .safetensors, TorchScript, torch.export .pt2, ONNX, "
                      "a Hugging Face checkpoint folder, or a torch.save state dict (with --arch)")


def detect_format(path: Path) -> str:
    """Name a model file's format from its content (see :data:`FORMATS`)."""
    return find_format(Path(path)).name


def is_onnx_file(path: Path) -> bool:
    """Whether ``path`` parses as an ONNX model with nodes and outputs."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not parseable as ONNX
        return False
    return len(model.graph.node) > 0 and len(model.graph.output) > 0


def load_teacher(path: str | Path, opts: TeacherOptions | None = None, device: str = "cpu",
                 precision: str = "fp32", role: str = "teacher",
                 probe: torch.Tensor | None = None) -> Teacher:
    """Load a teacher from any supported format, probe it, and freeze its description.

    Args:
        path: The model file, or a Hugging Face checkpoint folder.
        opts: Loading and input options (see :class:`TeacherOptions`).
        device: ``cpu`` or ``cuda`` (PyTorch formats; ONNX uses CUDA if its provider exists).
        precision: ``fp32`` or ``bf16`` (autocast, PyTorch formats only).
        role: What to call the file in error messages (``teacher``, ``model``).
        probe: A few raw examples of the data the teacher will see. They settle the input
            shape (when the file does not say), the output kind and the classes. Without
            them, random inputs of the file's own input shape are used.

    Raises:
        DataError: the file is missing or empty.
        FormatError: the format is unknown, or the file is corrupt.
        UnsafePickleError: the file is a pickle and ``trust_pickle`` is off.
        ModelError: the model cannot run on the probe.
    """
    opts = opts or TeacherOptions()
    if opts.output is not None and opts.output not in OUTPUT_KINDS:
        raise UsageError(f"unknown --teacher-output {opts.output!r}",
                         f"Use one of {', '.join(OUTPUT_KINDS)}")
    p = Path(path)
    fmt = find_format(p, role)
    t = Teacher(path=p, format=fmt.name, sha256=fmt.digest(p), output=opts.output,
                device=device, precision=precision)
    if opts.input_shape:
        t.input_shape, t.shape_from_user = list(opts.input_shape), True
    t.preprocessing = {**IDENTITY, **opts.preprocessing()}
    check_teacher_options(p, opts, fmt.name)
    fmt.load(t, opts)
    if opts.output is not None:
        t.output = opts.output  # an explicit flag wins over the file
    _probe(t, probe)
    t.frozen = True
    return t


def check_teacher_options(path: str | Path, opts: TeacherOptions,
                          fmt: str | None = None) -> None:
    """Refuse options that are impossible, or that the model's format would ignore:
    ``--output`` picks among an ONNX model's outputs, and a kdcli model does its own
    preprocessing. Cheap unless such an option is given (the format is found by content).

    Raises:
        UsageError: naming the option.
    """
    from kdcli.checks import check_preprocessing_options

    check_preprocessing_options(opts.scale, opts.mean, opts.std)
    pre = {**IDENTITY, **opts.preprocessing()}
    if opts.output_name is None and pre == IDENTITY:
        return
    name = Path(path).name
    fmt = fmt or find_format(Path(path)).name
    if opts.output_name is not None and fmt != "onnx":
        raise UsageError(f"--output {opts.output_name!r}: teacher {name} is a {fmt} "
                         "model with one output; --output picks among an ONNX model's outputs",
                         "Drop --output for this model")
    if fmt == "kdcli" and pre != IDENTITY:
        raise UsageError(f"--scale/--mean/--std were given for {name}, a kdcli model that "
                         "does its own preprocessing (from its file)",
                         "Drop them, or give them once per model with 1/0/1 for this one")


def _probe(t: Teacher, probe: torch.Tensor | None) -> None:
    """Settle the input shape, output kind and class count on a probe batch."""
    import torch

    _check_batch_memory(t, 2 if probe is None else int(probe.shape[0]))
    if probe is None:
        if t.input_shape is None:
            raise ModelError(f"the input shape of teacher {t.name} is not known",
                             "Pass --input-shape (or give example inputs to probe it)")
        gen = torch.Generator().manual_seed(0)
        scale = t.preprocessing.get("scale", 1.0)
        probe = torch.rand((2, *t.input_shape), generator=gen) * scale
    if t.input_shape is None:
        _resolve_input_shape(t, probe[:2])
    x = prepare_input(probe, Preprocessing.from_dict(t.preprocessing), t.input_shape,
                      t.input_dtype, t.name)
    try:
        out = t._check_output(t._forward(x), probe.shape[0])
    except KdcliError:
        raise
    except Exception as e:  # noqa: BLE001 - the model's own error, on its own inputs
        raise ModelError(f"teacher {t.name} fails on examples of shape {t.input_shape} "
                         f"({first_line(e)})", "Check --input-shape and the data") from e
    if t.output is None:
        t.output = detect_output_kind(out)
        if t.output != "logits":
            t.notes.append(f"{t.name}: outputs look like {t.output}; "
                           f"converted to logits (override with --teacher-output)")
    width = int(out.shape[1])
    if width == 0:
        raise ModelError(f"teacher {t.name} returns no class scores (shape "
                         f"{tuple(out.shape)})", "The model must output at least one score "
                         "per example")
    t.binary = width == 1
    if t.binary:
        t.notes.append(f"{t.name}: one output column ({t.output}); read as a binary "
                       "classifier with two classes")
    c = 2 if t.binary else width
    if t.num_classes is not None and t.num_classes != c:
        raise ModelError(f"teacher {t.name} says it has {t.num_classes} classes but "
                         f"outputs {width} columns", "Check the model's configuration")
    t.num_classes = c
    if t.class_names is not None and len(t.class_names) != c:
        t.class_names = None


def _check_batch_memory(t: Teacher, rows: int) -> None:
    """Refuse a teacher whose batch of model inputs cannot fit in memory, before the probe
    allocates it (a fixed batch of millions, an image size of 100,000 pixels a side)."""
    from kdcli.resources import check_memory

    shape, size = t.input_shape, t.preprocessing.get("size")
    if not shape:
        return
    elems = math.prod(shape[:1]) * math.prod(size) if size else math.prod(shape)
    rows = max(rows, t.fixed_batch or 0)
    hint = (f"The model takes only batches of {t.fixed_batch:,}: export it with a dynamic or "
            "smaller batch" if t.fixed_batch and t.fixed_batch == rows else
            "Its input size (the image or crop size of its configuration, or --input-shape) is "
            "too large; check the file")
    where = [*shape[:1], *size] if size else shape
    check_memory(2 * 4 * rows * elems, f"teacher {t.name}'s batch of {rows:,} inputs of shape "
                 f"{where}", hint)


def _resolve_input_shape(t: Teacher, probe: torch.Tensor) -> None:
    """Find the per-example input shape, trying the likely ones."""
    sample = list(probe.shape[1:])
    n = math.prod(sample)
    candidates = [sample, [n], [1, *sample]] if len(sample) > 1 else [sample, [1, *sample]]
    first_err = None
    for cand in candidates:
        t.input_shape = cand
        try:
            x = prepare_input(probe, Preprocessing.from_dict(t.preprocessing), t.input_shape,
                              t.input_dtype, t.name)
            t._check_output(t._forward(x), probe.shape[0])
            return
        except NotScoresError:
            raise  # the model ran: its shape is right, its output is not scores
        except Exception as e:  # noqa: BLE001 - any failure means "not this shape"
            first_err = first_err or e
    t.input_shape = None
    msg = first_line(first_err) if first_err else "unknown"
    raise ModelError(
        f"teacher {t.name} fails on examples of shape {sample} ({msg})",
        "Pass --input-shape with the per-example shape the model expects, "
        f"e.g. --input-shape {n} or --input-shape 1,{','.join(map(str, sample))}")


def _torch_runner(t: Teacher, module: Any) -> None:
    import torch

    from kdcli.devices import host_to_device, use_tf32

    dev = torch.device(t.device)
    if dev.type != "cpu":
        module = module.to(dev)
    if dev.type == "cuda":
        use_tf32()
    if t.format != "torch.export":  # exported programs are already in inference form
        module.eval()
    t.module = module

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(
                dev.type, dtype=torch.bfloat16, enabled=t.precision == "bf16"):
            return module(host_to_device(x, dev))

    t.runner = run


def _load_torchscript(p: Path) -> Any:
    import torch

    try:
        return torch.jit.load(str(p), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - torch raises many kinds here
        raise FormatError(f"{p} is a corrupt TorchScript archive ({first_line(e)})",
                          "Save it again with torch.jit.save") from e


def _load_exported(t: Teacher, p: Path, trust_pickle: bool = False) -> Any:
    import torch

    from kdcli.teachers.safety import check_export_archive

    check_export_archive(p, trust_pickle)
    try:
        ep = torch.export.load(str(p))
    except Exception as e:  # noqa: BLE001
        raise FormatError(f"{p} is a corrupt torch.export program ({first_line(e)})",
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
            raise FormatError(f"cannot unpickle {p} ({first_line(e2)})",
                              "Make sure the module's code is importable (PYTHONPATH)") from e2
        t.format = "pickle"
    except Exception as e:  # noqa: BLE001 - truncated zip, bad storage, ...
        raise FormatError(f"{p} is a corrupt torch.save file ({first_line(e)})",
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
        raise FormatError(f"{p} is a corrupt safetensors file ({first_line(e)})",
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
                          f"{first_line(e)}", "Check --arch") from e
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
    from kdcli.teachers.safety import check_factory

    if "" not in sys.path:
        sys.path.insert(0, "")  # like `python -m`, user code in the working folder is found
    check_factory(spec, modname, attr)
    try:
        factory = getattr(importlib.import_module(modname), attr)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"cannot import {spec} ({e})",
                         "Check the module is on PYTHONPATH and the factory name") from e
    check_factory(spec, modname, attr, factory)
    module = _run_factory(spec, factory)
    from torch import nn

    if not isinstance(module, nn.Module):
        raise ModelError(f"{spec}() returned {type(module).__name__}", "Return an nn.Module")
    return module



def _run_factory(spec: str, factory: Any) -> Any:
    """Call ``factory()``; one line if it needs arguments or raises."""
    import inspect

    from kdcli.errors import first_line

    try:
        inspect.signature(factory).bind()
    except TypeError as e:
        raise UsageError(f"--arch {spec} cannot be called without arguments ({e})",
                         "Give a factory whose arguments all have defaults") from None
    except ValueError:  # no signature to inspect (a builtin): let the call decide
        pass
    try:
        return factory()
    except Exception as e:  # noqa: BLE001 - the user's code raises anything
        raise ModelError(f"--arch {spec}: calling it raised {type(e).__name__}: "
                         f"{first_line(e, 150)!r}",
                         "Fix the factory; it must build the model with no arguments") from e


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


