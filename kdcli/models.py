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

if TYPE_CHECKING:
    import torch
    from torch import nn

MODEL_FORMAT = "kdcli.model"
MODEL_FORMAT_VERSION = 1


@dataclass
class Preprocessing:
    """How raw inputs become the network's inputs: ``((x / scale) - mean) / std``, reshaped.

    Attributes:
        scale: Raw units per unit of model input (255 for 8-bit pixels).
        mean: Mean subtracted after scaling.
        std: Standard deviation divided by after centring.
        raw_shape: Shape of one raw example, e.g. ``[28, 28]``.
        units: Human-readable description of the raw units.
    """

    scale: float = 1.0
    mean: float = 0.0
    std: float = 1.0
    raw_shape: list[int] = field(default_factory=list)
    units: str = "raw"

    @classmethod
    def fit(cls, inputs: torch.Tensor, normalize: bool = True) -> Preprocessing:
        """Derive preprocessing from training inputs: scale by dtype (8-bit to [0, 1]), then,
        with ``normalize``, zero mean and unit variance from the data."""
        import torch

        scale = 255.0 if inputs.dtype == torch.uint8 else 1.0
        units = "pixel values 0-255" if inputs.dtype == torch.uint8 else f"{inputs.dtype}"
        if not normalize:
            return cls(scale, 0.0, 1.0, list(inputs.shape[1:]), units)
        sample = inputs[: min(len(inputs), 20000)].float() / scale
        mean, std = float(sample.mean()), float(sample.std())
        return cls(scale, round(mean, 4), round(std if std > 0 else 1.0, 4),
                   list(inputs.shape[1:]), units)


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
        for name in ("dropout", "input_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1), got {p}",
                                 "Pass a probability such as 0.5")
        if self.max_norm is not None and not self.max_norm > 0:
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
    return {"hidden": [int(h) for h in rest.split(",") if h.strip()]}


def _check_mlp(arch: Architecture) -> None:
    if any(h <= 0 for h in arch.hidden):
        raise UsageError(f"hidden widths must be positive, got {arch.hidden}",
                         "Pass --hidden 1 or more")


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
    if not (math.isfinite(arch.width) and arch.width > 0):
        raise UsageError(f"{arch.family} width must be positive, got {arch.width}",
                         f"Use {arch.family}:{'8,' if arch.family == 'resnet' else ''}0.25 "
                         "or larger")


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
    if arch.depth < 8 or (arch.depth - 2) % 6:
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
        """Raw inputs ``[B, *raw_shape]`` -> float32 network inputs ``[B, *in_shape]``."""

        def __init__(self) -> None:
            super().__init__()
            self.scale, self.mean, self.std = pre.scale, pre.mean, pre.std
            self.in_shape = list(in_shape)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.float()
            if self.scale != 1.0:
                x = x / self.scale
            if self.mean != 0.0 or self.std != 1.0:
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


def save_model(path: str | Path, model: nn.Module, arch: Architecture, pre: Preprocessing,
               num_classes: int, training: dict[str, Any]) -> None:
    """Write a kdcli model file (``format: kdcli.model``, version 1) at ``path``.

    The caller is responsible for atomicity (see :func:`kdcli.files.atomic_output`).
    """
    from safetensors.torch import save_file

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
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=meta)


def read_safetensors_metadata(path: str | Path) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file, or None if it is not one."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 1 or n > 100_000_000 or n + 8 > p.stat().st_size:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    return header.get("__metadata__") or {}


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

    Raises:
        FormatError: not a kdcli model file, a newer version, or inconsistent tensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from kdcli.files import require_file

    p = require_file(path, "model file")
    meta = read_safetensors_metadata(p)
    if meta is None:
        raise FormatError(f"{p} is not a safetensors file", "Give a kdcli model .safetensors")
    check_format(meta, p, MODEL_FORMAT, MODEL_FORMAT_VERSION)
    try:
        arch = Architecture(**json.loads(meta["architecture"]))
        pre = Preprocessing(**json.loads(meta["preprocessing"]))
        num_classes = int(meta["num_classes"])
        training = json.loads(meta.get("training", "{}"))
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{p} has bad kdcli.model metadata ({e})", "Regenerate the file") from e
    model = build_model(arch, pre, num_classes)
    try:
        state = load_file(str(p))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0]
        raise FormatError(f"{p} has tensors that do not fit its architecture: {first}",
                          "The file is damaged; regenerate it") from e
    model.eval()
    return ModelFile(model, arch, pre, num_classes, training, meta)
