"""Resource estimates: refuse work that cannot fit before allocating anything.

A command estimates the memory its shapes need (a fixed batch, a model's parameters from
its configuration, a decoded image folder, a row of dense targets) and calls
:func:`check_memory`, which compares the estimate with the memory the system has available
(``MemAvailable`` of ``/proc/meminfo``; ``KDCLI_MEMORY_LIMIT`` overrides it) and refuses, on
one line naming the number and the option that lowers it, what cannot fit. Estimates are
lower bounds: what passes may still be refused by the system later, but what is refused
could never have run. Nothing here imports torch.
"""

from __future__ import annotations

import math
import os
from typing import Any

from kdcli.errors import ResourceError, UsageError

# The largest counts kdcli takes whatever the memory: epochs and augmented copies (10^6 each;
# a million epochs of one step each is already days of training).
MAX_EPOCHS = 1_000_000
MAX_COPIES = 1_000_000


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation, or None if unknown.

    ``KDCLI_MEMORY_LIMIT`` (a positive, finite number of bytes) overrides the system's
    figure; otherwise ``MemAvailable`` of ``/proc/meminfo``, else the free physical pages.
    """
    try:
        limit = float(os.environ.get("KDCLI_MEMORY_LIMIT", "nan"))
    except ValueError:
        limit = math.nan
    if math.isfinite(limit) and limit > 0:
        return int(limit)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def human_bytes(n: float) -> str:
    """``n`` bytes as a short human figure: ``3.2 GB``, ``1.1e+06 TB``."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB" if n < 1e6 else f"{n:.2g} TB"


def check_memory(nbytes: float, what: str, hint: str) -> None:
    """Refuse ``what`` if it needs more than the available memory.

    Args:
        nbytes: The estimated need in bytes (a lower bound).
        what: What needs it, as a sentence's subject (``"--batch 1000000"``).
        hint: How to lower it (names the option).

    Raises:
        ResourceError: the estimate exceeds the available memory.
    """
    avail = available_memory()
    if avail is None or not (nbytes > avail):
        return
    raise ResourceError(f"{what} needs about {human_bytes(nbytes)} of memory, but only "
                        f"{human_bytes(avail)} is available", f"{hint}; nothing was allocated")


def check_disk(nbytes: float, folder: str | os.PathLike, what: str, hint: str) -> None:
    """Refuse ``what`` if its ``nbytes`` cannot fit in the free space of ``folder``.

    Raises:
        ResourceError: the estimate exceeds the free space.
    """
    import shutil

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if nbytes > free:
        raise ResourceError(f"no space left on the device for {what}: it needs about "
                            f"{human_bytes(nbytes)}, but {folder} has {human_bytes(free)} free",
                            f"{hint}; nothing was written")


def check_count(value: int, flag: str, most: int, hint: str) -> int:
    """Refuse a count option above ``most`` (a run that could never finish)."""
    if value > most:
        raise UsageError(f"{flag} {value} is more than kdcli runs (at most {most:,})", hint)
    return value


def _int(cfg: Any, name: str, default: int = 0) -> int:
    v = getattr(cfg, name, None) if not isinstance(cfg, dict) else cfg.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return default
    return max(0, int(v))


def _ints(cfg: Any, name: str) -> list[int]:
    v = getattr(cfg, name, None) if not isinstance(cfg, dict) else cfg.get(name)
    if not isinstance(v, (list, tuple)):
        return []
    return [max(0, int(x)) for x in v
            if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)]


def _side(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return _int({"v": v[0]}, "v"), _int({"v": v[1]}, "v")
    if isinstance(v, dict):
        h = _int(v, "height") or _int(v, "shortest_edge")
        w = _int(v, "width") or _int(v, "shortest_edge")
        return h, w
    n = _int({"v": v}, "v")
    return n, n


def hf_model_bytes(cfg: Any, processor: dict[str, Any] | None = None) -> int:
    """A lower estimate of the float32 memory a Hugging Face classifier needs to be built
    and run on one example, from its configuration alone (no model is built).

    Counts the transformer layers (``num_hidden_layers`` x (4 H^2 + 2 H I)), the stages of
    convolutional nets (``depths`` x ``hidden_sizes`` squared), the patch grid's position
    embeddings and one example's attention matrices (``image_size`` / ``patch_size``), and
    the input image (``crop_size``/``size`` of the processor config).
    """
    h = _int(cfg, "hidden_size")
    layers = _int(cfg, "num_hidden_layers")
    inner = _int(cfg, "intermediate_size", 4 * h)
    params = layers * (4 * h * h + 2 * h * inner)
    params += sum(d * w * w for d, w in zip(_ints(cfg, "depths"), _ints(cfg, "hidden_sizes"),
                                            strict=False))
    params += _int(cfg, "num_labels", 2) * max([h, *_ints(cfg, "hidden_sizes")])
    ih, iw = _side(getattr(cfg, "image_size", None) if not isinstance(cfg, dict)
                   else cfg.get("image_size"))
    patch = max(1, _int(cfg, "patch_size", 16))
    tokens = (ih // patch) * (iw // patch)
    params += tokens * h
    activations = _int(cfg, "num_attention_heads") * tokens * tokens + tokens * h * 4
    channels = max(1, _int(cfg, "num_channels", 3))
    image = channels * ih * iw
    for key in ("crop_size", "size"):
        ph, pw = _side((processor or {}).get(key))
        image = max(image, channels * ph * pw)
    return 4 * (params + activations + 2 * image)
