"""The transfer-set file: a teacher's soft targets, in safetensors (see docs/formats.md).

Writing streams rows straight to their place in the file, so memory does not grow with the
output; reading memory-maps the file, so tensors are paged in on demand.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.errors import FormatError, UsageError
from kdcli.models import check_format

if TYPE_CHECKING:
    import torch

TRANSFER_FORMAT = "kdcli.transfer-set"
TRANSFER_FORMAT_VERSION = 1
COMBINE_RULES = ("mean-probs", "mean-logits")

_DTYPES = {  # safetensors dtype name <-> torch dtype name
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32",
    "I64": "int64", "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
}


def _torch_dtype(name: str):
    import torch

    return getattr(torch, _DTYPES[name])


def _st_name(dtype) -> str:
    tname = str(dtype).removeprefix("torch.")
    for k, v in _DTYPES.items():
        if v == tname:
            return k
    raise FormatError(f"dtype {dtype} cannot be stored", "Use a numeric dtype")


class SafetensorsWriter:
    """Write a safetensors file whose tensors arrive in chunks, in any order.

    The header is laid out up front from the declared shapes; ``write`` seeks to each
    chunk's place. ``close`` checks that every byte was written.

    Args:
        path: The file to write (normally a temporary path).
        specs: ``name -> (torch dtype, shape)``, in file order.
        metadata: String-to-string ``__metadata__``.
    """

    def __init__(self, path: str | Path, specs: dict[str, tuple[Any, tuple[int, ...]]],
                 metadata: dict[str, str]) -> None:
        import math

        header: dict[str, Any] = {"__metadata__": metadata}
        self.layout: dict[str, tuple[int, int, int]] = {}  # name -> (start, itemsize, size)
        offset = 0
        for name, (dtype, shape) in specs.items():
            itemsize = _torch_dtype(_st_name(dtype)).itemsize
            size = math.prod(shape) * itemsize
            header[name] = {"dtype": _st_name(dtype), "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            self.layout[name] = (offset, itemsize, size)
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.base = 8 + len(raw)
        self.written = dict.fromkeys(specs, 0)
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.f.write(len(raw).to_bytes(8, "little") + raw)
        self.f.truncate(self.base + offset)

    def write(self, name: str, first: int, chunk: torch.Tensor) -> None:
        """Write ``chunk`` into tensor ``name`` from flat (row-major) element ``first`` on."""
        start, itemsize, _ = self.layout[name]
        buf = _to_bytes(chunk)
        self.f.seek(self.base + start + first * itemsize)
        self.f.write(buf)
        self.written[name] += len(buf)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.f.close()
        if exc_type is None:
            self._check_complete()

    def _check_complete(self) -> None:
        for name, (_, _, size) in self.layout.items():
            if self.written[name] != size:
                raise FormatError(f"internal: tensor {name} got {self.written[name]} of "
                                  f"{size} bytes", "Report this bug")


def _to_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (bf16 is viewed as int16, same bytes)."""
    import torch

    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")




def read_safetensors_mmap(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Memory-map a safetensors file and return its tensors (zero-copy) and metadata.

    Raises:
        FormatError: the header is malformed or the file is truncated.
    """
    import torch

    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 1 or 8 + n > size:
            raise FormatError(f"{p} is not a safetensors file (bad header length)",
                              "The file is truncated or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise FormatError(f"{p} has a corrupt safetensors header", "Regenerate it") from e
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    meta = header.pop("__metadata__", None) or {}
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        try:
            dtype = _torch_dtype(info["dtype"])
            shape = [int(s) for s in info["shape"]]
            lo, hi = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{p}: tensor {name!r} has a bad header entry",
                              "The file is corrupt") from e
        count = 1
        for s in shape:
            count *= s
        if hi - lo != count * dtype.itemsize or 8 + n + hi > size:
            raise FormatError(f"{p} is truncated or corrupt (tensor {name!r} runs past the end)",
                              "Regenerate the file")
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(mm, dtype=dtype, count=count,
                                             offset=8 + n + lo).reshape(shape)
    return tensors, meta


def combine_members(member_logits: torch.Tensor, weights: list[float], rule: str,
                    T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine ensemble members' logits into one teacher.

    Args:
        member_logits: ``[M, B, C]`` float32.
        weights: ``M`` non-negative weights (normalized here).
        rule: ``mean-probs`` (arithmetic mean of softmax(z/T), the paper's rule) or
            ``mean-logits`` (weighted mean of logits: a geometric mean of probabilities).
        T: Temperature.

    Returns:
        ``(logits [B, C], probs [B, C])`` with ``probs == softmax(logits / T)``. For
        ``mean-probs`` the logits are ``T * log(probs)``.
    """
    import torch

    w = torch.tensor(weights, dtype=torch.float64)
    w = (w / w.sum()).to(member_logits.dtype)[:, None, None]
    if member_logits.shape[0] == 1 or rule == "mean-logits":
        logits = (w * member_logits).sum(0)
        return logits, torch.softmax(logits / T, dim=-1)
    if rule != "mean-probs":
        raise UsageError(f"unknown --combine {rule!r}", f"Use one of {', '.join(COMBINE_RULES)}")
    log_p = torch.logsumexp(torch.log_softmax(member_logits / T, dim=-1) + w.log(), dim=0)
    return T * log_p, log_p.exp()


@dataclass
class TransferSet:
    """A memory-mapped transfer set.

    Attributes:
        inputs: ``[N, ...]`` as the data source stores them.
        labels: ``[N]`` int64, or None.
        logits: ``[N, C]`` float32 combined teacher logits.
        soft_targets: ``[N, C]`` float32, ``softmax(logits / T)``.
        member_logits: ``[M, N, C]`` float32 for ensembles, else None.
        T: The temperature the soft targets were made at.
        meta: The decoded ``__metadata__`` (JSON fields parsed).
        path: The file.
    """

    inputs: torch.Tensor
    labels: torch.Tensor | None
    logits: torch.Tensor
    soft_targets: torch.Tensor
    member_logits: torch.Tensor | None
    T: float
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[1])

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __repr__(self) -> str:
        return f"TransferSet({self.path}, N={len(self)}, C={self.num_classes}, T={self.T:g})"

    def targets_at(self, T: float) -> torch.Tensor:
        """Soft targets at temperature ``T``, re-derived exactly from stored logits if needed."""
        import torch

        if T == self.T:
            return self.soft_targets
        if self.member_logits is not None:
            _, probs = combine_members(self.member_logits, self.meta["weights"],
                                       self.meta["combine"], T)
            return probs
        return torch.softmax(self.logits / T, dim=-1)


def load_transfer_set(path: str | Path, check_values: bool = True) -> TransferSet:
    """Open and validate a transfer set.

    Args:
        path: The ``.safetensors`` file.
        check_values: Also scan soft targets and logits for NaN/Inf.

    Raises:
        DataError: the file is missing.
        FormatError: anything about its format, shapes or values is wrong.
    """

    from kdcli.files import require_file

    p = require_file(path, "transfer set")
    tensors, raw_meta = read_safetensors_mmap(p)
    check_format(raw_meta, p, TRANSFER_FORMAT, TRANSFER_FORMAT_VERSION)
    missing = [k for k in ("inputs", "logits", "soft_targets") if k not in tensors]
    if missing:
        raise FormatError(f"{p} lacks the tensor(s) {', '.join(missing)}",
                          "Regenerate it with kdcli soft-targets")
    meta: dict[str, Any] = dict(raw_meta)
    try:
        for k in ("weights", "teachers", "classes"):
            if k in meta:
                meta[k] = json.loads(meta[k])
        T = float(meta["T"])
    except (KeyError, ValueError) as e:
        raise FormatError(f"{p} has bad or missing metadata ({e})", "Regenerate it") from e
    if not (T > 0 and float("inf") > T):
        raise FormatError(f"{p} records T={meta['T']}", "Regenerate it with a positive --T")
    inputs, logits, soft = tensors["inputs"], tensors["logits"], tensors["soft_targets"]
    labels = tensors.get("labels")
    members = tensors.get("member_logits")
    n = inputs.shape[0] if inputs.dim() else -1
    if logits.dim() != 2 or logits.shape[0] != n or soft.shape != logits.shape:
        raise FormatError(
            f"{p} has mismatched shapes: inputs {tuple(inputs.shape)}, logits "
            f"{tuple(logits.shape)}, soft_targets {tuple(soft.shape)}",
            "Inputs, logits and soft targets need the same row count N and logits/soft "
            "targets the same [N, C]; regenerate the file")
    if labels is not None:
        if labels.shape != (n,):
            raise FormatError(f"{p} has labels of shape {tuple(labels.shape)} for {n} inputs",
                              "Regenerate the file")
        labels = labels.long()
    if members is not None and (members.dim() != 3 or members.shape[1:] != logits.shape):
        raise FormatError(f"{p} has member_logits of shape {tuple(members.shape)}, "
                          f"expected [M, {n}, {logits.shape[1]}]", "Regenerate the file")
    if n == 0:
        raise FormatError(f"{p} holds no examples", "Regenerate it from non-empty data")
    if check_values:
        for name, t in (("soft_targets", soft), ("logits", logits)):
            bad = _first_bad_rows(t)
            if bad:
                raise FormatError(f"{p} has NaN or Inf in {name} (rows {bad})",
                                  "Regenerate it; check the teacher's outputs")
    return TransferSet(inputs, labels, logits.float(), soft.float(), members, T, meta, p)


def _first_bad_rows(t: torch.Tensor, chunk: int = 65536) -> list[int]:
    import torch

    for i in range(0, t.shape[0], chunk):
        ok = torch.isfinite(t[i:i + chunk]).all(-1)
        if not bool(ok.all()):
            return (i + (~ok).nonzero()[:5, 0]).tolist()
    return []

