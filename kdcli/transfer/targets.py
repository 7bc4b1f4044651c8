"""How a transfer set stores its soft targets: one strategy per storage form.

:data:`FORMS` names the forms by the ``targets`` field of the metadata: ``dense`` (all C
logits and probabilities per example, and an ensemble's per-member logits) and ``top-k``
(the K largest logits, their classes and the log of the probability mass outside them). A
form owns everything that differs between them: its tensors (:meth:`Targets.columns`), how a
batch of teacher logits becomes stored rows (:meth:`Targets.rows`), what the metadata says
(:meth:`Targets.metadata`), the checks of a file's shapes, metadata and stored values, and
how stored rows become a loss's inputs (:meth:`Targets.targets`,
:meth:`Targets.teacher_logits`, :func:`to_device`). No other module branches on the form.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from kdcli.devices import host_to_device
from kdcli.errors import FormatError, UsageError
from kdcli.transfer.ensemble import TopK, combine_members, top_k_targets
from kdcli.transfer.layout import Column, Layout, clip, rows_tensor
from kdcli.transfer.rows import Rows

# How far a stored row of soft targets may be from summing to 1, and from
# softmax(logits / T) (float32 rounding over C classes stays far below this).
SUM_TOLERANCE = 1e-3
TARGETS_DTYPES = ("float32", "float16")


class StoredSet(Protocol):
    """What a form reads of an open transfer set (a :class:`kdcli.transfer.reader.TransferSet`)."""

    columns: dict[str, Rows]
    T: float
    meta: dict[str, Any]

    def __len__(self) -> int: ...


# A check of the stored values of one column: ``(set, first row, chunk of rows)`` -> None,
# or what is wrong and a ``[rows]`` bool tensor that is False on the bad rows.
ValueRule = Callable[[StoredSet, int, torch.Tensor], "tuple[str, torch.Tensor] | None"]


class Targets(ABC):
    """A storage form of soft targets, for a set of ``num_classes`` classes.

    Attributes:
        name: The form's name in the metadata (``targets``).
        required: The tensors every file of this form has.
        dtypes: The dtypes docs/formats.md allows for each of its tensors.
        num_classes: C.
        top_k: K, for a form that stores the top K logits; else None.
        has_tail: Whether targets leave a tail mass out (so ``--tail`` applies).
    """

    name: ClassVar[str]
    required: ClassVar[tuple[str, ...]]
    dtypes: ClassVar[dict[str, tuple[str, ...]]]
    num_classes: int
    top_k: int | None = None
    has_tail: ClassVar[bool] = False

    @abstractmethod
    def columns(self) -> Layout:
        """Its tensors in a file, in file order."""

    @abstractmethod
    def rows(self, member_logits: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor,
             T: float) -> dict[str, torch.Tensor]:
        """The stored rows of a batch: the members' logits ``[M, B, C]`` and the combined
        teacher's logits and probabilities at ``T`` (``[B, C]``) -> tensor name -> rows."""

    def metadata(self) -> dict[str, str]:
        """The metadata fields of this form, besides ``targets``."""
        return {}

    @abstractmethod
    def label(self) -> str:
        """How tables name the form (``dense``, ``top-3``)."""

    def describe(self, meta: dict[str, Any]) -> str:
        """How ``kdcli inspect`` names the form of a set with metadata ``meta``."""
        return self.label()

    @classmethod
    @abstractmethod
    def from_file(cls, p: Path, tensors: dict[str, torch.Tensor],
                  meta: dict[str, Any]) -> Targets:
        """The form of file ``p``, whose :attr:`required` tensors are present, refused
        (FormatError) unless their shapes agree with each other and the inputs."""

    @abstractmethod
    def meta_conflict(self, num_classes: int | None, top_k: int | None) -> str | None:
        """What is wrong with the recorded ``num_classes`` and ``top_k``, or None."""

    def meta_problem(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str | None:
        """What else the metadata says wrongly about the form's tensors, or None."""
        return None

    def check_memory(self, p: Path) -> None:
        """Refuse a set whose targets of one example cannot be served in memory."""
        return None

    @abstractmethod
    def value_checks(self) -> tuple[tuple[str, ValueRule], ...]:
        """The checks of every stored value: ``(column, rule)`` pairs, in order."""

    def rederive_problem(self, ts: StoredSet, T: float) -> str | None:
        """Why soft targets at ``T`` (not the stored T) cannot be derived, or None."""
        return None

    @abstractmethod
    def targets(self, ts: StoredSet, idx: torch.Tensor, T: float) -> torch.Tensor | TopK:
        """The loss's targets of rows ``idx`` at ``T`` (derivable, see
        :meth:`rederive_problem`): ``[B, C]`` probabilities, or a :class:`TopK`."""

    @abstractmethod
    def dense_targets(self, ts: StoredSet, idx: torch.Tensor, T: float) -> torch.Tensor:
        """The targets of rows ``idx`` at ``T`` as ``[B, C]`` probabilities (any tail mass
        left out)."""

    @abstractmethod
    def teacher_logits(self, ts: StoredSet, idx: torch.Tensor) -> torch.Tensor:
        """All C teacher logits ``[B, C]`` of rows ``idx`` (UsageError if not stored)."""

    def tail_mass(self, ts: StoredSet, idx: torch.Tensor) -> float:
        """The summed probability mass that the targets of rows ``idx`` leave out."""
        return 0.0

    @property
    @abstractmethod
    def rederived_from(self) -> str:
        """Whose logits targets at another T are derived from (for a message)."""

    @abstractmethod
    def _prediction(self) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The column that holds the teacher's predictions, and how a chunk gives them."""

    def teacher_argmax(self, ts: StoredSet) -> torch.Tensor:
        """The teacher's predicted class of every example, ``[N]`` int64."""
        name, predicted = self._prediction()
        out = torch.empty(len(ts), dtype=torch.int64)  # filled in place: no small blocks
        for start, chunk in ts.columns[name].chunks():  # left pinning the heap
            out[start:start + len(chunk)] = predicted(chunk)
        return out


class DenseTargets(Targets):
    """All C logits and probabilities per example, and each ensemble member's logits.

    Args:
        num_classes: C.
        members: The ensemble members whose logits are stored (None: not stored).
    """

    name = "dense"
    required = ("logits", "soft_targets")
    dtypes: ClassVar = {"logits": ("float32",), "soft_targets": ("float32",),
                        "member_logits": ("float32",)}

    def __init__(self, num_classes: int, members: int | None = None) -> None:
        self.num_classes, self.members = num_classes, members

    def columns(self) -> Layout:
        c = (self.num_classes,)
        members = {} if self.members is None else {
            "member_logits": Column(torch.float32, c, self.members)}
        return {**members, "logits": Column(torch.float32, c),
                "soft_targets": Column(torch.float32, c)}

    def rows(self, member_logits, logits, probs, T):
        members = {} if self.members is None else {"member_logits": member_logits}
        return {**members, "logits": logits, "soft_targets": probs}

    def label(self) -> str:
        return self.name

    @classmethod
    def from_file(cls, p, tensors, meta):
        inputs, logits, soft = rows_tensor(tensors), tensors["logits"], tensors["soft_targets"]
        n = inputs.shape[0] if inputs.dim() else -1
        if logits.dim() != 2 or logits.shape[0] != n or soft.shape != logits.shape:
            raise FormatError(
                f"{p} has mismatched shapes: inputs {tuple(inputs.shape)}, logits "
                f"{tuple(logits.shape)}, soft_targets {tuple(soft.shape)}",
                "Inputs, logits and soft targets need the same row count N and logits/soft "
                "targets the same [N, C]; regenerate the file")
        members = tensors.get("member_logits")
        if members is not None and (members.dim() != 3 or members.shape[1:] != logits.shape):
            raise FormatError(f"{p} has member_logits of shape {tuple(members.shape)}, "
                              f"expected [M, {n}, {logits.shape[1]}]", "Regenerate the file")
        return cls(int(logits.shape[1]), None if members is None else int(members.shape[0]))

    def meta_conflict(self, num_classes, top_k):
        if num_classes is not None and num_classes != self.num_classes:
            return f"num_classes={num_classes}, logits have {self.num_classes} columns"
        return None

    def meta_problem(self, tensors, meta):
        teachers = meta.get("teachers")
        if isinstance(teachers, list) and len(teachers) > 1 and \
                meta.get("weights") is not None and self.members is None:
            return f"{len(teachers)} teachers but no member_logits"
        return None

    def value_checks(self):
        return (("logits", _logits_ok), ("soft_targets", _soft_ok),
                ("member_logits", _members_ok))

    def targets(self, ts, idx, T):
        if T == ts.T:
            return ts.columns["soft_targets"][idx].float()
        if self.members is not None:
            _, probs = combine_members(ts.columns["member_logits"][idx].float(),
                                       ts.meta["weights"], ts.meta["combine"], T)
            return probs
        return torch.softmax(ts.columns["logits"][idx].float() / T, dim=-1)

    def dense_targets(self, ts, idx, T):
        return self.targets(ts, idx, T)

    def teacher_logits(self, ts, idx):
        return ts.columns["logits"][idx].float()

    @property
    def rederived_from(self) -> str:
        return "the stored" if self.members is None else "each member's"

    def _prediction(self):
        return "logits", lambda chunk: chunk.argmax(-1)


class TopKTargets(Targets):
    """The K largest logits per example, their classes, and the log of the tail mass.

    Args:
        num_classes: C.
        top_k: K, at most C.
        dtype: The dtype of the stored logits (float32 or float16).
    """

    name = "top-k"
    required = ("topk_logits", "topk_indices", "tail_logmass")
    dtypes: ClassVar = {"topk_logits": ("float32", "float16"), "topk_indices": ("int32",),
                        "tail_logmass": ("float32",)}
    has_tail = True

    def __init__(self, num_classes: int, top_k: int, dtype: torch.dtype) -> None:
        self.num_classes, self.top_k, self.dtype = num_classes, top_k, dtype

    def columns(self) -> Layout:
        k = (self.top_k,)
        return {"topk_logits": Column(self.dtype, k), "topk_indices": Column(torch.int32, k),
                "tail_logmass": Column(torch.float32, ())}

    def rows(self, member_logits, logits, probs, T):
        tk = top_k_targets(logits, self.top_k, T)
        return {"topk_logits": tk.logits.to(self.dtype),
                "topk_indices": tk.indices.to(torch.int32), "tail_logmass": tk.tail_logmass}

    def metadata(self) -> dict[str, str]:
        return {"top_k": str(self.top_k),
                "targets_dtype": str(self.dtype).removeprefix("torch.")}

    def label(self) -> str:
        return f"top-{self.top_k}"

    def describe(self, meta: dict[str, Any]) -> str:
        return f"{self.label()} ({meta.get('targets_dtype')})"

    @classmethod
    def from_file(cls, p, tensors, meta):
        inputs = rows_tensor(tensors)
        n = inputs.shape[0] if inputs.dim() else -1
        vals, idx, tail = tensors["topk_logits"], tensors["topk_indices"], tensors["tail_logmass"]
        c = int(meta.get("num_classes", 0))
        if vals.dim() != 2 or vals.shape[0] != n or idx.shape != vals.shape or \
                tail.shape != (n,):
            raise FormatError(
                f"{p} has mismatched shapes: inputs {tuple(inputs.shape)}, topk_logits "
                f"{tuple(vals.shape)}, topk_indices {tuple(idx.shape)}, tail_logmass "
                f"{tuple(tail.shape)}", "Regenerate the file")
        if not 0 < vals.shape[1] <= c:
            raise FormatError(f"{p} stores K={vals.shape[1]} of num_classes={c}",
                              "Regenerate the file")
        return cls(c, int(vals.shape[1]), vals.dtype)

    def meta_conflict(self, num_classes, top_k):
        if top_k is not None and top_k != self.top_k:
            return f"top_k={top_k}, topk_logits have {self.top_k} columns"
        return None

    def meta_problem(self, tensors, meta):
        got = str(tensors["topk_logits"].dtype).removeprefix("torch.")
        if "targets_dtype" in meta and meta["targets_dtype"] != got:
            return (f"targets_dtype {clip(meta['targets_dtype'])!r}, but topk_logits are "
                    f"stored as {got}")
        return None

    def check_memory(self, p: Path) -> None:
        check_class_memory(p, self.num_classes, 1)

    def value_checks(self):
        return (("topk_logits", _topk_logits_ok), ("topk_indices", self._indices_ok),
                ("tail_logmass", _tail_ok), ("tail_logmass", self._tail_agrees))

    def rederive_problem(self, ts, T):
        if self.top_k < self.num_classes:
            return (f"it stores only the top {self.top_k} of {self.num_classes} logits, so the "
                    f"normalization at T={T:g} is unknown")
        if len(ts.meta.get("teachers") or []) > 1 and ts.meta.get("combine") == "mean-probs":
            return ("its ensemble was combined by mean-probs at the stored T, and the members' "
                    "logits are not stored")
        return None

    def _stored(self, ts: StoredSet, idx: torch.Tensor) -> TopK:
        return TopK(ts.columns["topk_logits"][idx].float(),
                    ts.columns["topk_indices"][idx].long(),
                    ts.columns["tail_logmass"][idx].float())

    def _scatter(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        out = torch.full((vals.shape[0], self.num_classes), float("-inf"))
        return out.scatter(-1, idx, vals)

    def targets(self, ts, idx, T):
        tk = self._stored(ts, idx)
        if T == ts.T:
            return tk
        return torch.softmax(self._scatter(tk.logits, tk.indices) / T, dim=-1)

    def dense_targets(self, ts, idx, T):
        if T != ts.T:
            return self.targets(ts, idx, T)
        t = self._stored(ts, idx)
        return torch.softmax(self._scatter(t.logits, t.indices) / T, -1) * \
            (1 - t.tail_logmass.exp())[:, None]

    def teacher_logits(self, ts, idx):
        if self.top_k < self.num_classes:
            raise UsageError(f"--loss mse needs all {self.num_classes} logits, but this set "
                             f"stores only the top {self.top_k}",
                             "Use --loss kd, or regenerate the set without --top-k")
        return self._scatter(ts.columns["topk_logits"][idx].float(),
                             ts.columns["topk_indices"][idx].long())

    def tail_mass(self, ts, idx):
        return float(ts.columns["tail_logmass"][idx].float().exp().sum())

    @property
    def rederived_from(self) -> str:
        return "the stored"

    def _prediction(self):
        return "topk_indices", lambda chunk: chunk[:, 0]

    def _indices_ok(self, ts: StoredSet, start: int, chunk: torch.Tensor):
        idx = chunk.long()
        ok = ((idx >= 0) & (idx < self.num_classes)).all(-1)
        if not bool(ok.all()):
            return f"top-k indices outside [0, {self.num_classes})", ok
        ok = (idx.sort(-1).values.diff(dim=-1) != 0).all(-1)
        return None if bool(ok.all()) else ("duplicate top-k indices in a row", ok)

    def _tail_agrees(self, ts: StoredSet, start: int, chunk: torch.Tensor):
        """The tail mass must be 0 (``-inf``) exactly when K = C, and with K < C no more
        than the C - K left-out classes can hold: each at most the smallest top-k
        probability."""
        if self.top_k == self.num_classes:
            ok = chunk == float("-inf")
            return None if bool(ok.all()) else ("a tail_logmass above 0 mass, but K = C "
                                                "leaves no class out", ok)
        ok = torch.isfinite(chunk)
        if not bool(ok.all()):
            return ("a tail_logmass of -inf (no mass outside the top k), but with K < C the "
                    "left-out classes always hold some", ok)
        rows = ts.columns["topk_logits"][torch.arange(start, start + len(chunk))]
        v = rows.double() / ts.T
        log_qk = v[:, -1] - torch.logsumexp(v, -1)
        tail = chunk.double()
        log_odds = tail - torch.log(-torch.expm1(tail))  # log(t / (1 - t))
        eps = 2.0 ** -10 if rows.dtype == torch.float16 else 2.0 ** -22
        tol = 1e-3 + 2 * eps * v.abs().amax(-1)
        ok = log_odds <= math.log(self.num_classes - self.top_k) + log_qk + tol
        return None if bool(ok.all()) else ("a tail_logmass larger than the classes outside "
                                            "the top k can hold", ok)


# The storage forms, by the name the metadata gives them.
FORMS: dict[str, type[Targets]] = {"dense": DenseTargets, "top-k": TopKTargets}


def form_named(p: Path, name: str) -> type[Targets]:
    """The form that file ``p`` names (FormatError for one this kdcli does not know)."""
    if name not in FORMS:
        raise FormatError(f"{p} has unknown targets form {name!r}", "Upgrade kdcli")
    return FORMS[name]


def check_form_options(top_k: int | None, targets_dtype: str) -> None:
    """Refuse ``--top-k`` and ``--targets-dtype`` values no form takes (UsageError)."""
    if top_k is not None and top_k <= 0:
        raise UsageError(f"--top-k must be at least 1, got {top_k}", "Try --top-k 32")
    if targets_dtype not in TARGETS_DTYPES:
        raise UsageError(f"unknown --targets-dtype {targets_dtype!r}", "Use float32 or float16")
    if targets_dtype != "float32" and top_k is None:
        raise UsageError("--targets-dtype applies to top-k targets only",
                         "Add --top-k K, or drop --targets-dtype")


def chosen_form(top_k: int | None, targets_dtype: str, num_classes: int, members: int,
                note: Callable[[str], None]) -> Targets:
    """The form ``soft-targets`` writes for ``--top-k`` (None: dense) and ``--targets-dtype``
    with ``members`` teachers; a K over the class count is lowered to it (with a ``note``)."""
    if top_k is None:
        return DenseTargets(num_classes, members if members > 1 else None)
    if top_k > num_classes:
        note(f"--top-k {top_k} is more than the {num_classes} classes; storing all "
             f"{num_classes} (the same targets as dense storage)")
        top_k = num_classes
    return TopKTargets(num_classes, top_k, getattr(torch, targets_dtype))


@functools.singledispatch
def to_device(target: torch.Tensor, device: torch.device | str) -> torch.Tensor | TopK:
    """Targets (what :meth:`Targets.targets` returns) on ``device``."""
    return host_to_device(target, device)


@to_device.register
def _(target: TopK, device: torch.device | str) -> TopK:
    return TopK(*(host_to_device(t, device) for t in target))


def check_class_memory(p: Path, classes: int, rows: int) -> None:
    """Refuse a set whose dense targets of ``rows`` examples (``[rows, C]`` float32, made
    twice when top-k targets are scattered) cannot fit in memory."""
    from kdcli.resources import check_memory

    check_memory(2 * 4 * rows * classes, f"{p} claims {classes:,} classes: dense targets of "
                 f"{rows:,} example{'s' if rows > 1 else ''}",
                 "Lower --batch-size, or check the file" if rows > 1 else
                 "The file is damaged or hostile; regenerate it")


def finite_rows(chunk: torch.Tensor) -> torch.Tensor:
    """``[rows]``: whether every value of each row of ``chunk`` is finite."""
    return torch.isfinite(chunk.float()).reshape(len(chunk), -1).all(-1)


def _logits_ok(ts: StoredSet, start: int, chunk: torch.Tensor):
    ok = finite_rows(chunk)
    return None if bool(ok.all()) else ("NaN or Inf in logits", ok)


def _soft_ok(ts: StoredSet, start: int, chunk: torch.Tensor):
    p = chunk.float()
    ok = finite_rows(p)
    if not bool(ok.all()):
        return "NaN or Inf in soft_targets", ok
    ok = (p >= 0).all(-1)
    if not bool(ok.all()):
        return "negative soft targets", ok
    ok = (p.double().sum(-1) - 1).abs() <= SUM_TOLERANCE
    if not bool(ok.all()):
        return f"soft-target rows that do not sum to 1 (tolerance {SUM_TOLERANCE:g})", ok
    z = ts.columns["logits"][torch.arange(start, start + len(chunk))].float()
    ok = (torch.softmax(z.double() / ts.T, -1) - p.double()).abs().amax(-1) <= SUM_TOLERANCE
    if not bool(ok.all()):
        return (f"soft targets that are not softmax(logits / T) at the recorded T={ts.T:g}",
                ok)
    return None


def _members_ok(ts: StoredSet, start: int, chunk: torch.Tensor):
    ok = finite_rows(chunk.transpose(0, 1))
    return None if bool(ok.all()) else ("NaN or Inf in member_logits", ok)


def _topk_logits_ok(ts: StoredSet, start: int, chunk: torch.Tensor):
    v = chunk.float()
    ok = finite_rows(v)
    if not bool(ok.all()):
        return "NaN or Inf in topk_logits", ok
    ok = (v.diff(dim=-1) <= 0).all(-1)
    return None if bool(ok.all()) else ("topk_logits that are not sorted largest first", ok)


def _tail_ok(ts: StoredSet, start: int, chunk: torch.Tensor):
    ok = ~(torch.isnan(chunk) | (chunk > 0))
    return None if bool(ok.all()) else ("a NaN or positive tail_logmass", ok)
