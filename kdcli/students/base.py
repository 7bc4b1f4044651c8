"""kdcli's model families (MLP, CNN, ResNet) and the kdcli model file format.

A kdcli model takes inputs in the raw units of its training data (MNIST: pixels 0-255, shape
``[B, 28, 28]``) and does its own preprocessing, so that a model file is all a user, a
teacher loader or the ONNX exporter needs. See ``docs/formats.md`` for the file format.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli import __version__
from kdcli.errors import FormatError, UsageError
from kdcli.io.storage import read_safetensors_metadata  # noqa: F401 - also used by teachers.py

if TYPE_CHECKING:
    import torch
    from torch import nn

MODEL_FORMAT = "kdcli.model"
# Version 2 adds data_sha256 (the checksum of the weights, always written), per-channel and
# per-feature mean/std (lists), class_names and feature_names. Version 1 files still load.
MODEL_FORMAT_VERSION = 2

# How Preprocessing.fit standardizes: auto picks by the shape of one example (see
# normalize_by); scalar: one mean and std; channel: one per channel of [C, H, W] images;
# feature: one per input value (per column of an [N, F] table).
NORMALIZE_BY = ("auto", "scalar", "channel", "feature")
_FIT_ROWS = 20000  # examples the scalar statistics are fitted on (as ever)
_FIT_ROWS_PER = 100000  # examples per-channel and per-feature statistics are fitted on


def normalize_by(rule: str, raw_shape: list[int] | tuple[int, ...]) -> str:
    """Resolve a ``--normalize-by`` rule for examples of ``raw_shape``.

    ``auto``: ``[F]`` (a table row) -> ``feature``; ``[C, H, W]`` (colour images) ->
    ``channel``; anything else (``[H, W]`` grayscale images, ...) -> ``scalar``.

    Raises:
        UsageError: an unknown rule, or ``channel`` for examples that are not ``[C, H, W]``.
    """
    if rule not in NORMALIZE_BY:
        raise UsageError(f"unknown --normalize-by {rule!r}",
                         f"Use one of {', '.join(NORMALIZE_BY)}")
    if rule == "auto":
        return "feature" if len(raw_shape) == 1 else "channel" if len(raw_shape) == 3 else "scalar"
    if rule == "channel" and len(raw_shape) != 3:
        raise UsageError(f"--normalize-by channel needs [C, H, W] images, but examples have "
                         f"shape {list(raw_shape)}", "Use --normalize-by scalar or feature")
    return rule


def stats_shape(n: int, raw_shape: list[int] | tuple[int, ...]) -> list[int]:
    """The shape that ``n`` mean or std values take to broadcast over one raw example.

    One value per input value (``n == prod(raw_shape)``): ``raw_shape``; one per channel of a
    ``[C, H, W]`` example (``n == C``): ``[C, 1, 1]``; a single value: ``[]``.

    Raises:
        UsageError: ``n`` fits neither.
    """
    raw = list(raw_shape)
    if n == 1:
        return []
    if n == math.prod(raw):
        return raw
    if len(raw) == 3 and n == raw[0]:
        return [raw[0], 1, 1]
    raise UsageError(f"{n} mean/std values do not fit examples of shape {raw}",
                     "Give one value, one per channel of [C, H, W] images, or one per feature")


def stats_tensor(values: float | list[float], raw_shape: list[int] | tuple[int, ...]):
    """Mean or std values as a float32 tensor that broadcasts over ``[B, *raw_shape]``."""
    import torch

    v = values if isinstance(values, list) else [values]
    return torch.tensor(v, dtype=torch.float32).reshape(stats_shape(len(v), raw_shape))


@dataclass
class Preprocessing:
    """How raw inputs become the network's inputs: ``((x / scale) - mean) / std``, reshaped.

    Attributes:
        scale: Raw units per unit of model input (255 for 8-bit pixels).
        mean: Mean subtracted after scaling: one number, or a list (one per channel of
            ``[C, H, W]`` images, or one per input value, as :func:`stats_shape` says).
        std: Standard deviation divided by after centring (a number or a list, like mean).
        raw_shape: Shape of one raw example, e.g. ``[28, 28]``.
        units: Human-readable description of the raw units.
    """

    scale: float = 1.0
    mean: float | list[float] = 0.0
    std: float | list[float] = 1.0
    raw_shape: list[int] = field(default_factory=list)
    units: str = "raw"

    @classmethod
    def fit(cls, inputs: torch.Tensor, normalize: bool = True,
            by: str = "auto") -> Preprocessing:
        """Derive preprocessing from training inputs: scale by dtype (8-bit to [0, 1]), then,
        with ``normalize``, zero mean and unit variance from the data, per ``by`` (see
        :func:`normalize_by`). A constant input (std 0) gets std 1, never inf."""
        import torch

        scale = 255.0 if inputs.dtype == torch.uint8 else 1.0
        units = "pixel values 0-255" if inputs.dtype == torch.uint8 else f"{inputs.dtype}"
        raw = list(inputs.shape[1:])
        if not normalize:
            return cls(scale, 0.0, 1.0, raw, units)
        rule = normalize_by(by, raw)
        if rule == "scalar":
            sample = inputs[: min(len(inputs), _FIT_ROWS)].float() / scale
            mean, std = float(sample.mean()), float(sample.std())
            return cls(scale, round(mean, 4), round(std if std > 0 else 1.0, 4), raw, units)
        mean_t, std_t = _moments(inputs[:_FIT_ROWS_PER], scale, rule == "channel")
        return cls(scale, mean_t.tolist(), std_t.tolist(), raw, units)

    @property
    def per_value(self) -> bool:
        """Whether mean or std is a list (per channel or per feature)."""
        return isinstance(self.mean, list) or isinstance(self.std, list)

    def check(self) -> None:
        """Raise UsageError if the statistics do not fit ``raw_shape`` or a std is not > 0."""
        for name in ("mean", "std"):
            v = getattr(self, name)
            values = v if isinstance(v, list) else [v]
            stats_shape(len(values), self.raw_shape)
            if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in values):
                raise UsageError(f"preprocessing {name} holds a non-finite value",
                                 "Give finite numbers")
            if name == "std" and not all(x > 0 for x in values):
                raise UsageError("preprocessing std must be positive", "Give std values > 0")


def _moments(inputs: torch.Tensor, scale: float, per_channel: bool):
    """Float32 mean and population std per channel (``[N, C, ...]``) or per input value,
    accumulated in float64 a chunk at a time; a std of 0 becomes 1."""
    import torch

    total = sq = None
    for a in range(0, len(inputs), 4096):
        x = inputs[a:a + 4096].double() / scale
        x = x.transpose(0, 1).reshape(x.shape[1], -1).T if per_channel else x.reshape(len(x), -1)
        s, q = x.sum(0), (x * x).sum(0)
        total, sq = (s, q) if total is None else (total + s, sq + q)
    n = inputs.shape[0] * (math.prod(inputs.shape[2:]) if per_channel else 1)
    mean = total / n
    std = (sq / n - mean * mean).clamp_min(0).sqrt().float()
    std = torch.where(torch.isfinite(std) & (std > 0), std, torch.ones_like(std))
    return mean.float(), std


@dataclass
class Architecture:
    """A model of kdcli's family (see :data:`FAMILIES`).

    Attributes:
        family: ``"mlp"``, ``"cnn"`` or ``"resnet"``.
        hidden: MLP hidden widths, e.g. ``[1200, 1200]``.
        width: CNN or ResNet width multiplier (CNN 1.0 = 32/64 channels and a 128-unit dense
            layer; ResNet 1.0 = 16/32/64 channels in its three stages).
        dropout: Dropout probability on hidden units (CNN and ResNet: before the output layer).
        input_dropout: Dropout probability on the inputs (MLP only).
        max_norm: Max L2 norm of each unit's incoming weights (None: unconstrained).
        depth: ResNet depth, 6n+2 (8, 14, 20, ...); 0 for the other families.
    """

    family: str = "mlp"
    hidden: list[int] = field(default_factory=list)
    width: float = 1.0
    dropout: float = 0.0
    input_dropout: float = 0.0
    max_norm: float | None = None
    depth: int = 0  # added with the resnet family; older files have none and load as 0

    @classmethod
    def parse(cls, spec: str, **kwargs: Any) -> Architecture:
        """Parse ``mlp:1200,1200``, ``cnn:0.5``, ``resnet:20,0.5`` (extra fields from kwargs)."""
        name, _, rest = spec.strip().partition(":")
        family = FAMILIES.get(name)
        if family is None:
            raise UsageError(f"bad architecture spec {spec!r}: unknown family {name!r}",
                             f"Use {_usages()}")
        try:
            arch = cls(name, **family.parse(rest.strip()), **kwargs)
        except ValueError as e:
            raise UsageError(f"bad architecture spec {spec!r}", f"Use {family.usage}") from e
        arch.check()
        return arch

    def check(self) -> None:
        """Check the fields common to all families, then the family's own."""
        family = FAMILIES.get(self.family)
        if family is None:
            raise UsageError(f"unknown model family {self.family!r}", f"Use {_usages()}")
        if not isinstance(self.hidden, list):
            raise UsageError(f"hidden widths must be a list, got {self.hidden!r}",
                             "Use mlp:WIDTH,WIDTH")
        for name in ("dropout", "input_dropout"):
            p = getattr(self, name)
            if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
                raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1), got {p}",
                                 "Pass a probability such as 0.5")
        if self.max_norm is not None and not (isinstance(self.max_norm, (int, float)) and
                                              0 < self.max_norm < math.inf):
            raise UsageError(f"--max-norm must be positive, got {self.max_norm}",
                             "Pass e.g. --max-norm 3.5")
        family.check(self)

    def spec(self) -> str:
        """The spec string that :meth:`parse` reads back, e.g. ``resnet:20,0.5``."""
        return f"{self.family}:{FAMILIES[self.family].spec(self)}"


@dataclass(frozen=True)
class Family:
    """One kind of model: how its spec reads and prints, what it checks, how it is built.

    Attributes:
        usage: The spec's form, for error hints, e.g. ``resnet:DEPTH[,WIDTH] (e.g. resnet:8)``.
        parse: The spec after ``family:`` -> the :class:`Architecture` fields it sets
            (raises ValueError when unreadable).
        spec: An architecture -> the spec after ``family:``.
        check: Raises UsageError for impossible fields.
        build: ``(arch, raw_shape, num_classes) -> (net, in_shape)``: the network (without
            preprocessing) and the per-example shape it takes.
    """

    usage: str
    parse: Callable[[str], dict[str, Any]]
    spec: Callable[[Architecture], str]
    check: Callable[[Architecture], None]
    build: Callable[[Architecture, list[int], int], tuple[nn.Module, list[int]]]


def _parse_mlp(rest: str) -> dict[str, Any]:
    # "mlp:" has no hidden layer (a linear model); an empty width ("1,,2") does not parse
    return {"hidden": [int(h) for h in rest.split(",")] if rest.strip() else []}


def _check_mlp(arch: Architecture) -> None:
    from kdcli.checks import check_width

    for h in arch.hidden:
        check_width(h)


def _build_mlp(arch: Architecture, raw: list[int], num_classes: int):
    from torch import nn

    n_in = math.prod(raw) if raw else 1
    in_shape = [n_in]
    layers: list[nn.Module] = [_byte_dropout(arch.input_dropout)] if arch.input_dropout else []
    for h in arch.hidden:
        layers += [nn.Linear(n_in, h), nn.ReLU()]
        if arch.dropout:
            layers.append(_byte_dropout(arch.dropout))
        n_in = h
    layers.append(nn.Linear(n_in, num_classes))
    return nn.Sequential(*layers), in_shape


def _check_width(arch: Architecture) -> None:
    from kdcli.checks import MAX_CNN_WIDTH

    w = arch.width
    base = 16 if arch.family == "resnet" else 32  # the narrowest layer's channels at w = 1
    if isinstance(w, bool) or not (isinstance(w, (int, float)) and 1 / base <= w <= MAX_CNN_WIDTH):
        name = {"cnn": "CNN", "resnet": "ResNet"}.get(arch.family, arch.family)
        raise UsageError(f"the {name} width multiplier must be from 1/{base} (one channel) "
                         f"to {MAX_CNN_WIDTH:g}, got {w}",
                         f"Use e.g. {arch.family}:{'8,' if arch.family == 'resnet' else ''}0.5")


def _image_shape(raw: list[int], what: str, smallest: int) -> list[int]:
    """``[C, H, W]`` for examples of shape ``[H, W]`` (grayscale) or ``[C, H, W]``."""
    if len(raw) == 2:
        shape = [1, *raw]
    elif len(raw) == 3:
        shape = list(raw)
    else:
        raise UsageError(f"{what} needs image inputs, but examples have shape {raw}",
                         "Use an MLP (--arch mlp:...) for non-image data")
    if shape[1] < smallest or shape[2] < smallest:
        raise UsageError(f"images of shape {raw} are too small for {what}",
                         f"Use images of at least {smallest}x{smallest} pixels or an MLP")
    return shape


def _build_cnn(arch: Architecture, raw: list[int], num_classes: int):
    from torch import nn

    in_shape = _image_shape(raw, "the CNN", 4)
    c1, c2, fc = (max(1, round(c * arch.width)) for c in (32, 64, 128))
    h, w = in_shape[1] // 4, in_shape[2] // 4
    layers: list[nn.Module] = [
        nn.Conv2d(in_shape[0], c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * h * w, fc), nn.ReLU(),
    ]
    if arch.dropout:
        layers.append(_byte_dropout(arch.dropout))
    layers.append(nn.Linear(fc, num_classes))
    return nn.Sequential(*layers), in_shape


def _parse_resnet(rest: str) -> dict[str, Any]:
    depth, _, width = rest.partition(",")
    return {"depth": int(depth), "width": float(width) if width.strip() else 1.0}


def _check_resnet(arch: Architecture) -> None:
    d = arch.depth
    if isinstance(d, bool) or not isinstance(d, int) or d < 8 or (d - 2) % 6 or d > 1000:
        raise UsageError(f"ResNet depth must be 6n+2 and at least 8, got {arch.depth}",
                         "Use resnet:8, resnet:14 or resnet:20")
    _check_width(arch)
    if arch.hidden or arch.input_dropout or arch.max_norm is not None:
        raise UsageError("a ResNet takes no hidden widths, --input-dropout or --max-norm",
                         "Drop them, or use an MLP")


def _build_resnet(arch: Architecture, raw: list[int], num_classes: int):
    """A CIFAR-style ResNet (He et al. 2016, section 4.2): a 3x3 stem, three stages of
    ``n = (depth - 2) / 6`` basic blocks at 16, 32 and 64 channels (times the width), the
    last two starting with stride 2, then global average pooling and one Linear layer."""
    from torch import nn

    in_shape = _image_shape(raw, "a ResNet", 8)
    widths = [max(1, round(c * arch.width)) for c in (16, 32, 64)]
    blocks = (arch.depth - 2) // 6
    layers: list[nn.Module] = [nn.Conv2d(in_shape[0], widths[0], 3, padding=1, bias=False),
                               nn.BatchNorm2d(widths[0]), nn.ReLU()]
    c_in = widths[0]
    for stage, w in enumerate(widths):
        for b in range(blocks):
            layers.append(_basic_block(c_in, w, 2 if stage and not b else 1))
            c_in = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if arch.dropout:
        layers.append(_byte_dropout(arch.dropout))
    layers.append(nn.Linear(c_in, num_classes))
    return nn.Sequential(*layers), in_shape


def _basic_block(c_in: int, c_out: int, stride: int) -> nn.Module:
    return _basic_block_class()(c_in, c_out, stride)


@functools.cache
def _basic_block_class() -> type:
    from torch import nn

    class BasicBlock(nn.Module):
        """``relu(branch(x) + shortcut(x))``: two 3x3 conv+BN in the branch; the shortcut is
        the identity, or a 1x1 conv+BN where the shape changes. Every conv is followed by its
        BN in an ``nn.Sequential``, which is what :func:`fold_batchnorm` folds."""

        def __init__(self, c_in: int, c_out: int, stride: int) -> None:
            super().__init__()
            self.branch = nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU(), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
            self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

        def forward(self, x):
            return (self.branch(x) + self.shortcut(x)).relu()

    return BasicBlock


# The model families: adding one is an entry here plus its tests.
FAMILIES: dict[str, Family] = {
    "mlp": Family("mlp:WIDTH,WIDTH,... (e.g. mlp:1200,1200)", _parse_mlp,
                  lambda a: ",".join(map(str, a.hidden)), _check_mlp, _build_mlp),
    "cnn": Family("cnn:WIDTH (e.g. cnn:0.5)", lambda rest: {"width": float(rest or 1.0)},
                  lambda a: f"{a.width:g}", _check_width, _build_cnn),
    "resnet": Family("resnet:DEPTH[,WIDTH] (e.g. resnet:8 or resnet:20,0.5)", _parse_resnet,
                     lambda a: f"{a.depth}" + (f",{a.width:g}" if a.width != 1.0 else ""),
                     _check_resnet, _build_resnet),
}


def _usages() -> str:
    return ", ".join(f.usage for f in FAMILIES.values())


def _byte_dropout(p: float) -> nn.Module:
    import torch
    from torch import nn

    class ByteDropout(nn.Dropout):
        """Dropout whose mask is drawn from random bytes: about 2x faster than
        ``nn.Dropout`` on CPUs, where dropout is limited by random-number generation.

        The drop probability is rounded to a multiple of 1/256 (0.5 is exact, 0.2 becomes
        51/256 = 0.199). Identity in eval mode, like ``nn.Dropout``.
        """

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training or self.p == 0:
                return x
            threshold = round(self.p * 256)
            keep = torch.randint(0, 256, x.shape, dtype=torch.uint8, device=x.device)
            return x * (keep >= threshold) * (256.0 / (256 - threshold))

    return ByteDropout(p)


def _preprocess_module(pre: Preprocessing, in_shape: list[int]) -> nn.Module:
    from torch import nn

    class Preprocess(nn.Module):
        """Raw inputs ``[B, *raw_shape]`` -> float32 network inputs ``[B, *in_shape]``.

        Per-channel or per-feature statistics are buffers (``raw_mean``, ``raw_std``) that
        are not saved with the weights: the model file's metadata holds them.
        """

        def __init__(self) -> None:
            super().__init__()
            self.scale, self.mean, self.std = pre.scale, pre.mean, pre.std
            self.in_shape = list(in_shape)
            self.per_value = pre.per_value
            if self.per_value:
                self.register_buffer("raw_mean", stats_tensor(pre.mean, pre.raw_shape),
                                     persistent=False)
                self.register_buffer("raw_std", stats_tensor(pre.std, pre.raw_shape),
                                     persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.float()
            if self.scale != 1.0:
                x = x / self.scale
            if self.per_value:
                x = (x - self.raw_mean) / self.raw_std
            elif self.mean != 0.0 or self.std != 1.0:
                x = (x - self.mean) / self.std
            return x.reshape([x.shape[0], *self.in_shape])

    return Preprocess()


def build_model(arch: Architecture, pre: Preprocessing, num_classes: int) -> nn.Module:
    """Build a model of kdcli's family: ``Sequential(preprocess, net)``.

    Args:
        arch: The architecture.
        pre: The preprocessing (``pre.raw_shape`` sets the input size).
        num_classes: Output size.

    Returns:
        A module mapping raw inputs ``[B, *raw_shape]`` to logits ``[B, num_classes]``.
    """
    from torch import nn

    arch.check()
    net, in_shape = FAMILIES[arch.family].build(arch, list(pre.raw_shape), num_classes)
    return nn.Sequential(_preprocess_module(pre, in_shape), net)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every BatchNorm2d that follows a Conv2d in an
    ``nn.Sequential`` folded into that convolution (the BN becomes an Identity).

    In eval mode BN is the affine map ``gamma * (y - mean) / sqrt(var + eps) + beta`` with
    its running statistics, so the conv's weights and bias absorb it exactly (up to rounding):
    the exported graph has no BatchNormalization node and one op fewer per conv.
    """
    import copy

    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    for seq in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()
    return folded


def apply_max_norm(model: nn.Module, max_norm: float) -> None:
    """Rescale each hidden unit's incoming weight vector to L2 norm at most ``max_norm``.

    The constraint of the dropout papers (Hinton et al. 2012, Srivastava et al. 2014), which
    the distillation paper's teacher used: it bounds the hidden units of every Linear layer
    but the output layer, whose logits it leaves free.
    """
    import torch
    from torch import nn

    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for m in linear[:-1]:
            m.weight.renorm_(2, 0, max_norm)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def final_linear(model: nn.Module) -> nn.Module:
    """The last Linear layer (the logits' weights and biases)."""
    from torch import nn

    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise UsageError("the model has no Linear output layer", "Use a kdcli model")
    return last[-1]


@dataclass
class ModelFile:
    """A loaded kdcli model file: the module and everything its metadata says."""

    model: nn.Module
    arch: Architecture
    preprocessing: Preprocessing
    num_classes: int
    training: dict[str, Any]
    metadata: dict[str, str]
    class_names: list[str] | None = None
    feature_names: list[str] | None = None


def save_model(path: str | Path, model: nn.Module, arch: Architecture, pre: Preprocessing,
               num_classes: int, training: dict[str, Any], *,
               class_names: list[str] | None = None,
               feature_names: list[str] | None = None) -> None:
    """Write a kdcli model file (``format: kdcli.model``, version 2) at ``path``.

    The header records ``data_sha256``, the SHA-256 of the weights' bytes, which
    :func:`load_model` checks; ``class_names`` and ``feature_names`` are kept when given.
    The caller is responsible for atomicity (see :func:`kdcli.io.files.atomic_output`).
    """
    from kdcli.io.storage import SafetensorsWriter

    meta = {
        "format": MODEL_FORMAT,
        "format_version": str(MODEL_FORMAT_VERSION),
        "kdcli_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "architecture": json.dumps(asdict(arch)),
        "preprocessing": json.dumps(asdict(pre)),
        "num_classes": str(num_classes),
        "training": json.dumps(training, default=float),
    }
    if class_names is not None:
        meta["class_names"] = json.dumps(list(class_names))
    if feature_names is not None:
        meta["feature_names"] = json.dumps(list(feature_names))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    with SafetensorsWriter(path, specs, meta) as w:
        for k, v in state.items():
            w.write(k, 0, v)


def check_format(meta: dict[str, str], path: Path, name: str, version: int) -> None:
    """Check a file's format name and version, saying exactly what is wrong."""
    got = meta.get("format")
    if got != name:
        what = f"format {got!r}" if got else "no kdcli format name"
        raise FormatError(f"{path} has {what}, not {name!r}",
                          "Give a file written by kdcli (see docs/formats.md)")
    v = meta.get("format_version", "")
    if not v.isdigit():
        raise FormatError(f"{path} has no valid format_version", "The file is damaged")
    if int(v) > version:
        raise FormatError(f"{path} is {name} version {v}; this kdcli reads up to {version}",
                          "Upgrade kdcli")
    if int(v) < 1:
        raise FormatError(f"{path} has unsupported {name} version {v}", "Regenerate the file")


def load_model(path: str | Path) -> ModelFile:
    """Load a kdcli model file without any user code.

    The metadata is checked for impossible values, the weights' checksum (``data_sha256``,
    version 2) is verified, and the weights must be finite.

    Raises:
        FormatError: not a kdcli model file, a newer version, impossible metadata, a
            checksum mismatch, or tensors that do not fit the architecture.
    """
    import torch

    from kdcli.io.files import require_file
    from kdcli.io.storage import DATA_SHA256, data_sha256, read_safetensors

    p = require_file(path, "model file")
    meta = read_safetensors_metadata(p)
    if meta is None:
        raise FormatError(f"{p} is not a safetensors file", "Give a kdcli model .safetensors")
    check_format(meta, p, MODEL_FORMAT, MODEL_FORMAT_VERSION)
    arch, pre, num_classes, training, class_names, feature_names = _model_metadata(p, meta)
    tensors, _, mapped = read_safetensors(p)
    recorded = meta.get(DATA_SHA256)
    if recorded is None and int(meta["format_version"]) >= 2:
        raise FormatError(f"{p} is kdcli.model version 2 but records no {DATA_SHA256}",
                          "The file is damaged; regenerate it")
    if recorded is not None and data_sha256(mapped) != recorded:
        raise FormatError(f"{p} fails its checksum: its weights are not the bytes that were "
                          "written", "The file is damaged; regenerate or copy it again")
    _check_weight_dtypes(p, tensors)
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FormatError(f"{p} has NaN or Inf in weight {name!r}",
                              "The model is broken; retrain it (a lower --lr may help)")
    try:
        model = build_model(arch, pre, num_classes)
        model.load_state_dict({k: v.clone() for k, v in tensors.items()}, strict=True)
    except (RuntimeError, UsageError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise FormatError(f"{p} has tensors that do not fit its architecture: {first}",
                          "The file is damaged; regenerate it") from e
    model.eval()
    return ModelFile(model, arch, pre, num_classes, training, meta, class_names, feature_names)


def _check_weight_dtypes(p: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Weights are float32 (BatchNorm's ``num_batches_tracked`` int64), as kdcli writes
    them: another dtype would be cast silently on load."""
    for name, t in tensors.items():
        want = "int64" if name.endswith("num_batches_tracked") else "float32"
        got = str(t.dtype).removeprefix("torch.")
        if got != want:
            raise FormatError(f"{p} stores weight {name!r} as {got}, not {want}",
                              "The file is damaged or was not written by kdcli; regenerate it")


def _model_metadata(p: Path, meta: dict[str, str]
                    ) -> tuple[Architecture, Preprocessing, int, dict[str, Any],
                               list[str] | None, list[str] | None]:
    """Decode and range-check a model file's metadata (FormatError saying what is wrong)."""
    try:
        arch = Architecture(**json.loads(meta["architecture"]))
        pre = Preprocessing(**json.loads(meta["preprocessing"]))
        num_classes = int(meta["num_classes"])
        training = json.loads(meta.get("training", "{}"))
        class_names = _names(meta, "class_names", num_classes)
        feature_names = _names(meta, "feature_names", None)
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        what = {KeyError: f"missing key {e}", TypeError: "fields it does not know or lacks",
                RecursionError: "nested too deeply"}.get(type(e), str(e)[:100])
        raise FormatError(f"{p} has bad kdcli.model metadata ({what})",
                          "Regenerate the file") from None
    try:
        arch.check()
    except UsageError as e:
        raise FormatError(f"{p} records an impossible architecture: {e.message}",
                          "The file is damaged; regenerate it") from None
    raw = pre.raw_shape
    if not (isinstance(raw, list) and 1 <= len(raw) <= 4 and all(
            type(d) is int and 1 <= d <= 1 << 20 for d in raw) and math.prod(raw) <= 1 << 28):
        raise FormatError(f"{p} records an impossible raw_shape {str(raw)[:60]}",
                          "The file is damaged; regenerate it")
    scale = pre.scale
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise FormatError(f"{p} records preprocessing scale={scale!r}",
                          "The file is damaged; regenerate it")
    try:
        pre.check()  # mean and std: finite, std > 0, one value or one per channel/feature
    except UsageError as e:
        raise FormatError(f"{p} records impossible preprocessing: {e.message}",
                          "The file is damaged; regenerate it") from None
    if not 1 <= num_classes <= 1 << 24:
        raise FormatError(f"{p} records num_classes={num_classes}",
                          "The file is damaged; regenerate it")
    if not isinstance(training, dict):
        raise FormatError(f"{p} has a training record that is not an object",
                          "The file is damaged; regenerate it")
    return arch, pre, num_classes, training, class_names, feature_names


def _names(meta: dict[str, str], key: str, count: int | None) -> list[str] | None:
    """A JSON list of strings from the metadata (``count`` long if given), or None."""
    if key not in meta:
        return None
    names = json.loads(meta[key])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{key} is not a list of strings")
    if count is not None and len(names) != count:
        raise ValueError(f"{len(names)} {key} for {count} classes")
    return names
