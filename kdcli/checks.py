"""Option checks shared by every command: one definition of each range and rule.

Each check returns the value it accepted (normalized where that helps) or raises a
:class:`~kdcli.errors.UsageError` whose hint names a valid value. Nothing here imports torch
at module level, so the CLI can check options before any heavy import or any work.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from kdcli.errors import UsageError

# The temperatures kdcli accepts. Below 1e-3 softmax(z/T) is one-hot for any logit gap a
# float32 can resolve, and above 1e4 it is uniform to float32 precision for logits of the
# usual size (|z| < 100 gives probabilities within 1e-2 of 1/C); outside this range T^2 also
# scales the loss by more than 1e8 or less than 1e-6, so training diverges or stands still.
T_MIN, T_MAX = 1e-3, 1e4
# ONNX opsets the exporter (torch.onnx, dynamo) can write and onnxruntime can run.
OPSET_MIN, OPSET_MAX = 18, 23
# The largest hidden width kdcli builds: 2^20 units (a 784 x 2^20 float32 layer is 3.3 GB).
MAX_WIDTH = 1 << 20
# The largest CNN width multiplier (64: 2048/4096 channels, about 1.4e8 parameters).
MAX_CNN_WIDTH = 64.0
DEVICES = ("auto", "cpu", "cuda")


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def check_temperature(T: float, flag: str = "--T") -> float:
    """Return ``T`` as a float if it lies in ``[T_MIN, T_MAX]``, else raise UsageError."""
    if not (_finite(T) and T_MIN <= T <= T_MAX):
        raise UsageError(f"{flag} must be a finite number from {T_MIN:g} to {T_MAX:g}, got {T}",
                         "Try --T 20 (the paper used 1 to 20)")
    return float(T)


def check_momentum(momentum: float) -> float:
    """SGD momentum must lie in ``[0, 1)``."""
    if not (_finite(momentum) and 0.0 <= momentum < 1.0):
        raise UsageError(f"--momentum must lie in [0, 1), got {momentum}", "Try --momentum 0.9")
    return float(momentum)


def check_weight_decay(weight_decay: float) -> float:
    """L2 weight decay must be finite and at least 0."""
    if not (_finite(weight_decay) and weight_decay >= 0.0):
        raise UsageError(f"--weight-decay must be a finite number of 0 or more, got "
                         f"{weight_decay}", "Try --weight-decay 0.0001")
    return float(weight_decay)


def check_opset(opset: int | None) -> int | None:
    """An ONNX opset the exporter supports (None: the exporter's default)."""
    if opset is None:
        return None
    if isinstance(opset, bool) or not isinstance(opset, int) or \
            not OPSET_MIN <= opset <= OPSET_MAX:
        raise UsageError(f"--opset must be from {OPSET_MIN} to {OPSET_MAX}, got {opset}",
                         "Try --opset 18, or leave it out")
    return opset


def check_width(width: int, flag: str = "--hidden") -> int:
    """A hidden width from 1 to :data:`MAX_WIDTH`."""
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= MAX_WIDTH:
        raise UsageError(f"{flag} widths must be from 1 to {MAX_WIDTH:,}, got {width}",
                         "Try --hidden 300")
    return width


# Seeds: torch takes up to 2^64 - 1; kdcli adds epoch and rank numbers to a seed.
SEED_MAX = 2**63 - 1


def check_seed(seed: int, flag: str = "--seed") -> int:
    """A seed from 0 to :data:`SEED_MAX`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise UsageError(f"{flag} must be from 0 to 2^63 - 1, got {str(seed)[:30]}",
                         "Try --seed 0")
    return seed


def check_jitter(jitter: int, image_shape: list[int] | tuple[int, ...] | None) -> int:
    """A shift of 0 or more pixels, smaller than the image (``[H, W]`` or ``[C, H, W]``)."""
    if jitter < 0:
        raise UsageError(f"--jitter must be 0 or more, got {jitter}", "Try --jitter 2")
    if jitter and image_shape is not None:
        if len(image_shape) not in (2, 3):
            raise UsageError(f"--jitter needs image inputs, but examples have shape "
                             f"{list(image_shape)}", "Drop --jitter")
        h, w = image_shape[-2:]
        if jitter >= min(h, w):
            raise UsageError(f"--jitter {jitter} is not smaller than the {h}x{w} images",
                             f"Use --jitter {max(1, min(h, w) // 14)} or less than {min(h, w)}")
    return jitter


PRECISIONS = ("auto", "fp32", "bf16")
# The CPU flags (Linux /proc/cpuinfo) of bf16 instructions: with them bf16 autocast runs a
# dense layer about 6x faster than fp32 (AVX-512 BF16 on an AMD EPYC); without them it is
# emulated and many times slower.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# Overrides what --precision auto picks (fp32 or bf16), e.g. fp32 for the same numbers on
# every machine. The test suite sets it to fp32.
AUTO_PRECISION_ENV = "KDCLI_AUTO_PRECISION"


def check_precision(precision: str) -> str:
    """``auto``, ``fp32`` or ``bf16``."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown --precision {precision!r}", "Use auto, fp32 or bf16")
    return precision


def cpu_bf16_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """The bf16 instruction flags this CPU reports (:data:`BF16_CPU_FLAGS`; none where
    ``cpuinfo`` cannot be read, as on macOS and Windows)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
            break  # every core reports the same flags
    return [f for f in BF16_CPU_FLAGS if f in flags]


def resolve_precision(precision: str, device: str) -> tuple[str, str]:
    """The precision to run at on ``device`` (``cpu`` or ``cuda``), and why.

    ``auto`` is bf16 autocast on a CUDA GPU that supports bf16 and on a CPU with bf16
    instructions (:data:`BF16_CPU_FLAGS`), fp32 elsewhere; the environment variable
    :data:`AUTO_PRECISION_ENV` overrides that choice. ``fp32`` and ``bf16`` are kept.

    Returns:
        ``(precision, reason)``: ``fp32`` or ``bf16``, and a phrase saying why.
    """
    check_precision(precision)
    if precision != "auto":
        return precision, "as asked"
    forced = os.environ.get(AUTO_PRECISION_ENV, "").strip().lower()
    if forced:
        if forced not in ("fp32", "bf16"):
            raise UsageError(f"{AUTO_PRECISION_ENV}={forced!r} is not fp32 or bf16",
                             f"Set {AUTO_PRECISION_ENV} to fp32 or bf16, or unset it")
        return forced, f"{AUTO_PRECISION_ENV}={forced}"
    if device == "cuda":
        import torch

        if torch.cuda.is_bf16_supported():
            return "bf16", "the GPU supports bf16"
        return "fp32", "the GPU has no bf16 support"
    flags = cpu_bf16_flags()
    if flags:
        return "bf16", f"this CPU has bf16 instructions ({', '.join(flags)})"
    return "fp32", "this CPU has no bf16 instructions (bf16 would be slower)"


def precision_note(precision: str, device: str) -> str | None:
    """What ``--precision auto`` chose on ``device`` and why, e.g. ``bf16 (auto: this CPU
    has bf16 instructions (avx512_bf16))``, for the results table (None when the precision
    was given)."""
    if precision != "auto":
        return None
    chosen, why = resolve_precision(precision, device)
    return f"{chosen} (auto: {why})"


def check_batch_size(batch_size: int, hint: str) -> int:
    """A positive batch size (``hint`` suggests one: each command has its own default)."""
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}", hint)
    return batch_size


def check_device(device: str) -> str:
    """``auto``, ``cpu`` or ``cuda`` (without looking for a GPU)."""
    if device not in DEVICES:
        raise UsageError(f"unknown --device {device!r}", "Use auto, cpu or cuda")
    return device


def resolve_device(device: str) -> str:
    """Map ``auto`` to ``cuda`` when a GPU is present, else ``cpu``."""
    check_device(device)
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA GPU is available", "Use --device cpu")
    return device


def parse_size(text: str | int) -> int:
    """Parse a byte size such as ``500MB``, ``2GB``, ``1.5GiB`` or ``1000000``."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    try:
        value = float(num) * units[s[len(num):]]
    except (ValueError, KeyError):
        raise UsageError(f"cannot read the size {text!r}", "Write e.g. 500MB or 2GB") from None
    if not (math.isfinite(value) and value >= 1):
        raise UsageError(f"the size {text!r} is not a positive finite size",
                         "Write e.g. 500MB or 2GB")
    return int(value)


# The range of a divisor of raw inputs (--scale, a processor's 1/rescale_factor): 16-bit
# pixels need 65535; outside [1e-6, 1e6] the inputs are scaled to noise or to overflow.
SCALE_MIN, SCALE_MAX = 1e-6, 1e6


def preprocessing_problem(scale: object = None, mean: object = None,
                          std: object = None) -> str | None:
    """What is impossible in a preprocessing ``(x / scale - mean) / std``, or None.

    ``scale`` must be a finite number in ``[SCALE_MIN, SCALE_MAX]``; ``mean`` finite
    numbers; ``std`` finite positive numbers (each one value or a list). None is not given.
    """
    if scale is not None and not (_finite(scale) and SCALE_MIN <= scale <= SCALE_MAX):
        return f"scale {scale} is not a finite number from {SCALE_MIN:g} to {SCALE_MAX:g}"
    for name, value in (("mean", mean), ("std", std)):
        values = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
        if isinstance(value, (list, tuple)) and not value:
            return f"{name} is an empty list"
        for v in values:
            if not _finite(v) or (name == "std" and v <= 0):
                return f"{name} {v} is not a finite number" + (" above 0" if name == "std"
                                                               else "")
    return None


def check_preprocessing_options(scale: float | None, mean: object, std: object) -> None:
    """``--scale``, ``--mean`` and ``--std`` as the user gave them (see
    :func:`preprocessing_problem`)."""
    problem = preprocessing_problem(scale, mean, std)
    if problem:
        raise UsageError(f"--{problem}", "Give e.g. --scale 255 --mean 0.5 --std 0.25 "
                         "(std above 0; every value finite)")


def split_list(text: str | None, flag: str) -> list[str] | None:
    """The comma-separated items of a list option (None when it was not given).

    Raises:
        UsageError: the option was given empty, or with an empty item (``1,,2``, ``1,``).
    """
    if text is None:
        return None
    items = [v.strip() for v in str(text).split(",")]
    if not any(items):
        raise UsageError(f"{flag} was given empty", f"Give a value, e.g. {flag} 1,2, or leave "
                         f"{flag} out")
    if not all(items):
        raise UsageError(f"{flag} {text!r} has an empty item", "Separate the values with "
                         "single commas, e.g. 1,2")
    return items


def check_class_filter(classes: list[int] | None, exclude: list[int] | None) -> None:
    """``--classes`` keeps, ``--exclude-classes`` drops: one of them, with labels ≥ 0."""
    if classes is not None and exclude is not None:
        raise UsageError("--classes and --exclude-classes were both given",
                         "Give the classes to keep (--classes) or to drop (--exclude-classes)")
    for flag, values in (("--classes", classes), ("--exclude-classes", exclude)):
        if values and any(v < 0 for v in values):
            raise UsageError(f"{flag} holds a negative label: {values}",
                             "Labels are 0 or more")


def check_arch_spec(arch: str | None, student: bool = True) -> str | None:
    """An ``--arch`` that says something: not empty, and for a student to train not ``mlp:``
    (no widths; ``--layers 0`` says "no hidden layer" on purpose). A teacher's ``mlp:``
    describes a linear state dict."""
    if arch is None:
        return None
    family, sep, rest = arch.strip().partition(":")
    if not family or (student and sep and not rest.strip() and family == "mlp"):
        raise UsageError(f"--arch {arch!r} names no architecture",
                         "Give e.g. --arch mlp:300,300" + (" (or --hidden and --layers; "
                                                           "--layers 0 for no hidden layer)"
                                                           if student else ""))
    return arch


def check_seeds(seeds: list[int]) -> list[int]:
    """Seeds of a sweep: each from 0 to :data:`SEED_MAX` (see :func:`check_seed`)."""
    for s in seeds:
        check_seed(s, "--seeds")
    return seeds


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
