"""What a teacher is: an immutable spec plus a runner, and the helpers its formats share.

A format's loader (one module per format; the table is :data:`kdcli.teachers.formats.FORMATS`)
returns a :class:`Teacher`: a frozen description of the model (format, named inputs, output
kind, classes, class names, preprocessing, digest) and its runner, a callable from a batch of
model inputs to raw outputs. :func:`kdcli.teachers.formats.load_teacher` settles what the file
does not say on a probe batch and makes the final spec once, with :func:`dataclasses.replace`.

Every teacher returns float32 logits ``[B, C]``; probability or log-probability outputs are
turned into logits (``log p``, exact up to a constant per row, floored at
:data:`LOG_PROB_FLOOR`), and a single output column becomes two classes.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from kdcli.data.text import Texts
from kdcli.devices import host_to_device, use_tf32
from kdcli.errors import ModelError
from kdcli.io.files import sha256_file
from kdcli.output import Reporter
from kdcli.preprocessing import Preprocessing
from kdcli.teachers.inputs import IDENTITY, check_gaps, prepare_input, raw_layout, refuse_categories

OUTPUT_KINDS = ("logits", "log-probs", "probs")
#: The smallest logit a probability (or log-probability) output becomes: a probability of
#: exactly 0, common for trees, gives this finite logit instead of -inf. At T <= 30 its
#: soft target is below exp(-33) of the top class's, so tempered probabilities stay exact
#: in float32.
LOG_PROB_FLOOR = -1000.0
#: The name of the one input of formats whose files do not name it.
DEFAULT_INPUT = "input"
#: The dtype of an input that is raw text (one string, or a pair, per example).
TEXT = "string"
#: The dtype of an input the model takes as the data stores it (any dtype): a model that
#: converts and standardizes the values itself, so preparing a batch only lays it out.
RAW = "raw"
#: A batch of raw examples: ``[B, *shape]`` values, or ``B`` texts or ``(text, text)`` pairs.
RawBatch = torch.Tensor | Texts | Sequence[str] | Sequence[tuple[str, str]]


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


@dataclass(frozen=True)
class InputSpec:
    """One named input of a teacher model.

    Attributes:
        name: The model's name for it (``input`` where the file names none).
        dtype: The dtype fed to the model, e.g. ``float32``.
        shape: The per-example shape, or None while it is not known.
    """

    name: str = DEFAULT_INPUT
    dtype: str = "float32"
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Teacher:
    """A loaded teacher: an immutable description of the model plus its runner.

    Attributes:
        path: The file (or checkpoint folder).
        format: The format's name, as transfer sets record it (``kdcli``, ``onnx``,
            ``state_dict``, ``pickle``, ...).
        fmt: The formats-table entry that loaded it (what the format answers: parameter
            count, whether it does its own preprocessing, ...).
        sha256: The file's SHA-256 (a folder's: see :func:`kdcli.teachers.hf.folder_sha256`).
        runner: A callable from a batch of prepared model inputs to the model's raw output.
        inputs: The model's inputs; today's formats have exactly one.
        preprocessing: How raw inputs become model inputs (see :func:`prepare_input`):
            ``scale``, ``mean``, ``std`` (numbers, or one per channel), and for image
            checkpoints ``size`` (``[H, W]`` to resize to); the one
            :class:`~kdcli.preprocessing.Preprocessing` type. Identity for kdcli models,
            which carry their own.
        fixed_batch: The only batch size the model accepts, or None.
        output: ``logits``, ``log-probs`` or ``probs`` (None until the probe detects it).
        num_classes: Number of classes (2 for a single-column binary output).
        class_names: The classes' names, where the file has them.
        binary: The model has one output column (a logit or a probability of class 1).
        module: The torch module, for PyTorch formats.
        meta: What the format adds to :meth:`describe` (architecture, ONNX output, ...).
        notes: What the user is told about how the teacher was read.
        device: Where the model runs.
        precision: ``fp32`` or ``bf16``.
        columns: The table columns the model takes, as indices into a raw example
            (None: all, in order): the data's columns matched by name to the feature names
            its file records (see :func:`~kdcli.teachers.inputs.match_columns`).
        class_order: Its output columns in the ensemble's class order (None: as they
            are): ``logits()[:, j]`` is the model's column ``class_order[j]`` (see
            :meth:`in_class_order`).
    """

    path: Path
    format: str
    fmt: TeacherFormat
    sha256: str
    runner: Callable[[torch.Tensor], Any]
    inputs: tuple[InputSpec, ...] = (InputSpec(),)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    fixed_batch: int | None = None
    output: str | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    binary: bool = False
    module: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    device: str = "cpu"
    precision: str = "fp32"
    columns: tuple[int, ...] | None = None
    class_order: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def input_shape(self) -> list[int] | None:
        """The per-example shape of the (one) input, or None while it is not known."""
        shape = self.inputs[0].shape
        return None if shape is None else list(shape)

    @property
    def input_dtype(self) -> str:
        """The dtype of the (one) input."""
        return self.inputs[0].dtype

    def with_input_shape(self, shape: list[int] | None) -> tuple[InputSpec, ...]:
        """The inputs, with the (one) input's per-example shape replaced by ``shape``."""
        first = InputSpec(self.inputs[0].name, self.inputs[0].dtype,
                          None if shape is None else tuple(shape))
        return (first, *self.inputs[1:])

    def describe(self) -> dict[str, Any]:
        """What the transfer-set metadata records about this teacher."""
        out = {"file": self.path.name, "sha256": self.sha256, "format": self.format,
               "preprocessing": self.preprocessing.to_dict(), "input_shape": self.input_shape,
               "output": self.output, "num_classes": self.num_classes, **self.meta}
        if self.class_names is not None:
            out["class_names"] = self.class_names
        if self.class_order is not None:
            out["class_order"] = list(self.class_order)
        return out

    def param_count(self) -> int | None:
        """The model's number of parameters, as its format counts them (None: unknown)."""
        return self.fmt.param_count(self)

    @property
    def takes_text(self) -> bool:
        """Whether the model reads raw text (an input of dtype ``string``): its runner takes
        the batch's texts as they are and tokenizes them itself."""
        return any(spec.dtype == TEXT for spec in self.inputs)

    def prepare(self, raw: RawBatch, shape: list[int] | None = None) -> Any:
        """A batch of raw examples as the model takes them: the texts as they are for a text
        model, else :func:`prepare_input` (layout ``shape``, default the input's; scale,
        mean, std; dtype)."""
        if isinstance(raw, Texts):
            if not self.takes_text:
                raise ModelError(f"teacher {self.name} does not take text, but was given "
                                 "texts", "Give a text teacher, or numeric data")
            return raw.strings()
        if self.takes_text:
            if isinstance(raw, (str, bytes)):  # one string is not a batch of its characters
                raise ModelError(f"teacher {self.name} takes a batch of texts, not one string",
                                 "Give a list of texts, e.g. [text]")
            return raw
        if self.columns is not None:  # by name: the flat row's columns, then its layout
            raw = raw.reshape(len(raw), -1)[:, list(self.columns)]
        if self.input_dtype == RAW:  # no float copy: the model makes its own
            return raw_layout(raw, self.preprocessing, shape or self.input_shape, self.name)
        return prepare_input(raw, self.preprocessing, shape or self.input_shape,
                             self.input_dtype, self.name)

    def logits(self, raw: RawBatch) -> torch.Tensor:
        """Run the teacher on a batch of raw examples.

        Args:
            raw: ``[B, *sample_shape]`` raw inputs, as the data source stores them; for a
                text model, ``B`` texts (or ``(text, text)`` pairs).

        Returns:
            ``[B, C]`` float32 logits on the CPU.
        """
        x = self.prepare(raw)
        out = self.forward(x)
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 2:
            check_gaps(self.name, x, out)
        out = self.check_output(out, len(raw))
        z = to_logits(out, self.output or "logits")
        return z if self.class_order is None else z[:, list(self.class_order)]

    def in_class_order(self, names: list[str]) -> Teacher:
        """This teacher with its outputs in the order of ``names``, the same classes as its
        own names in another order (a scikit-learn model sorts its class names; a Hugging
        Face one keeps ``id2label``'s order)."""
        own = self.class_names if self.class_names is not None else \
            self.fmt.class_names(self.path)
        if own is None or list(own) == list(names) or sorted(own) != sorted(names):
            return self
        return replace(self, class_order=tuple(own.index(n) for n in names),
                       class_names=list(names),
                       notes=(*self.notes, f"{self.name}: its classes {short(own)} are taken "
                              f"in the order {short(names)}"))

    def forward(self, x: Any) -> Any:
        """The raw output on prepared inputs ``x``, in chunks of a fixed batch if need be."""
        return self._run_fixed(x) if self.fixed_batch and not self.takes_text else self.runner(x)

    def _run_fixed(self, x: torch.Tensor) -> torch.Tensor:
        b = self.fixed_batch
        outs = []
        for i in range(0, x.shape[0], b):
            chunk = x[i:i + b]
            n = chunk.shape[0]
            if n < b:
                chunk = torch.cat([chunk, chunk.new_zeros((b - n, *chunk.shape[1:]))])
            outs.append(self.check_output(self.runner(chunk), b)[:n])
        return torch.cat(outs)

    def check_output(self, out: Any, batch: int) -> torch.Tensor:
        """The class scores ``[batch, C]`` (float32, CPU) in a model's raw output.

        Raises:
            NotScoresError: the output is labels or flags, not scores.
            ModelError: several outputs, not a tensor, or the wrong shape.
        """
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


@dataclass(frozen=True)
class LoadRequest:
    """What a format's loader is given: the path, the user's options and where to run.

    Attributes:
        path: The model file or checkpoint folder.
        opts: The user's options for this teacher.
        sha256: The digest of the path (computed before loading, by the format's entry).
        device: ``cpu`` or ``cuda``.
        precision: ``fp32`` or ``bf16``.
    """

    path: Path
    opts: TeacherOptions
    sha256: str = ""
    device: str = "cpu"
    precision: str = "fp32"

    @property
    def user_shape(self) -> tuple[int, ...] | None:
        """The per-example shape the user gave (``--input-shape``), which wins over the file's."""
        return tuple(self.opts.input_shape) if self.opts.input_shape else None

    def teacher(self, fmt: TeacherFormat, runner: Callable[[torch.Tensor], Any],
                **fields: Any) -> Teacher:
        """The provisional spec: the request's fields, the user's options and ``fields``.

        Unless ``fields`` say otherwise the format is ``fmt.name``, the one input is
        ``float32`` of the user's shape, the preprocessing is the user's, and the output kind
        is the user's ``--teacher-output``.
        """
        base = {"format": fmt.name, "inputs": (InputSpec(shape=self.user_shape),),
                "preprocessing": Preprocessing.from_dict({**IDENTITY, **self.opts.preprocessing()}),
                "output": self.opts.output}
        return Teacher(path=self.path, fmt=fmt, sha256=self.sha256, runner=runner,
                       device=self.device, precision=self.precision, **{**base, **fields})


class TeacherFormat(ABC):
    """One entry of the formats table: everything kdcli asks of a format.

    A format module defines a subclass and exposes one instance as ``FORMAT``; the table
    names the module. Subclasses implement :meth:`detect` and :meth:`load`, and override
    the rest where the format knows more.

    Attributes:
        name: The format's name in the table (a loader may record a more precise one).
        folders: Its models are folders, not files.
        own_preprocessing: The model file carries its own preprocessing, so
            ``--scale/--mean/--std`` would be ignored (they are refused).
        picks_output: ``--output NAME`` chooses among the model's outputs.
    """

    name: str = ""
    folders: bool = False
    own_preprocessing: bool = False
    picks_output: bool = False

    @abstractmethod
    def detect(self, path: Path) -> bool:
        """Whether ``path`` holds this format (by content); may raise a FormatError that
        says what the path is instead."""

    @abstractmethod
    def load(self, req: LoadRequest) -> Teacher:
        """The provisional spec of the model at ``req.path`` (see :meth:`LoadRequest.teacher`)."""

    def digest(self, path: Path) -> str:
        """The SHA-256 that identifies the teacher."""
        return sha256_file(path)

    def inspects(self, path: Path) -> bool:
        """Whether ``kdcli inspect`` shows ``path`` with :meth:`inspect` (False: it does not
        describe this format)."""
        return False

    def inspect(self, path: Path, rep: Reporter) -> dict[str, Any]:
        """What ``kdcli inspect`` shows of ``path``: shows its table, returns its info."""
        raise NotImplementedError

    def param_count(self, t: Teacher) -> int | None:
        """The number of parameters of the loaded model (None: unknown)."""
        module = t.module
        if module is not None and hasattr(module, "parameters"):
            return sum(p.numel() for p in module.parameters())
        return None

    def class_names(self, path: Path) -> list[str] | None:
        """The class names the file records, read without loading the model (None: none)."""
        return None

    def feature_names(self, path: Path) -> list[str] | None:
        """The table columns the model takes, in order, as the file records them (None:
        none; the columns are then taken by position)."""
        return None

    def with_categories(self, t: Teacher, categories: list[list[str] | None],
                        names: list[str]) -> Teacher:
        """The teacher fed table rows whose category columns hold codes of the data's
        categories (``categories[j]`` for its column ``names[j]``; None: numbers). A model
        of numbers refuses a category column (ModelError, naming it)."""
        return refuse_categories(t.name, categories, names, t)


def to_logits(out: torch.Tensor, kind: str) -> torch.Tensor:
    """Turn a model's outputs of ``kind`` into logits ``[B, C]``.

    Probabilities become ``log p`` and log-probabilities stay, both floored at
    :data:`LOG_PROB_FLOOR`. A single column (``[B, 1]``) is a binary classifier: a
    probability ``p`` of class 1 becomes ``log [1 - p, p]``, a logit ``z`` becomes ``[0, z]``.
    """
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


def torch_runner(module: Any, device: str, precision: str,
                 eval_mode: bool = True) -> tuple[Callable[[torch.Tensor], Any], Any]:
    """A runner for a torch module on ``device`` (autocast to bf16 for ``precision`` bf16).

    Args:
        module: The model (an ``nn.Module``, or anything with ``to``, ``eval`` and a call).
        device: ``cpu`` or ``cuda``.
        precision: ``fp32`` or ``bf16``.
        eval_mode: Put the module in eval mode (exported programs already are).

    Returns:
        The runner and the module, moved to the device.
    """
    dev = torch.device(device)
    if dev.type != "cpu":
        module = module.to(dev)
    if dev.type == "cuda":
        use_tf32()
    if eval_mode:
        module.eval()

    def run(x: torch.Tensor) -> Any:
        with torch.inference_mode(), torch.autocast(
                dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return module(host_to_device(x, dev))

    return run, module


def names_from_json(text: str | None) -> list[str] | None:
    """The names in ``text``, a JSON list of strings (None if it is missing or not one)."""
    try:
        names = json.loads(text) if text is not None else None
    except ValueError:
        return None
    ok = isinstance(names, list) and all(isinstance(n, str) for n in names)
    return names if ok else None


def short(v: Any, n: int = 90) -> str:
    """``v`` as text of at most ``n`` characters (JSON unless a string), for inspect tables."""
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= n else s[: n - 1] + "…"
