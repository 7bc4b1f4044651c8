"""The ensemble maths of a transfer set: one teacher from several, and top-k targets.

:func:`combine_members` turns the members' logits into one teacher's logits and soft targets
(the paper's arithmetic mean of probabilities at T, or a weighted mean of logits), and
:func:`top_k_targets` reduces a teacher's logits to the K largest, their classes and the
probability mass left out (a :class:`TopK`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kdcli.errors import UsageError

COMBINE_RULES = ("mean-probs", "mean-logits")


class TopK(NamedTuple):
    """Top-k soft targets of a batch.

    Attributes:
        logits: ``[B, K]`` float32, the teacher's K largest logits, largest first.
        indices: ``[B, K]`` int64 class indices of those logits.
        tail_logmass: ``[B]`` float32, ``log(1 - sum of the top-K probabilities at T)``;
            ``-inf`` when nothing is left out.
    """

    logits: torch.Tensor
    indices: torch.Tensor
    tail_logmass: torch.Tensor


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
    if member_logits.shape[0] == 1:  # one teacher: its logits (what the weighted sum gives)
        logits = member_logits[0]
        return logits, torch.softmax(logits / T, dim=-1)
    w = torch.tensor(weights, dtype=torch.float64)
    w = (w / w.sum()).to(member_logits.dtype)[:, None, None]
    if rule == "mean-logits":
        logits = (w * member_logits).sum(0)
        return logits, torch.softmax(logits / T, dim=-1)
    if rule != "mean-probs":
        raise UsageError(f"unknown --combine {rule!r}", f"Use one of {', '.join(COMBINE_RULES)}")
    log_p = torch.logsumexp(torch.log_softmax(member_logits / T, dim=-1) + w.log(), dim=0)
    return T * log_p, log_p.exp()


def top_k_targets(logits: torch.Tensor, k: int, T: float) -> TopK:
    """Reduce dense logits ``[B, C]`` to their top ``k`` and the tail mass at ``T``."""
    vals, idx = logits.topk(k, dim=-1)
    scaled = logits / T
    lse_all = torch.logsumexp(scaled, -1)
    tail = torch.logsumexp(scaled.scatter(-1, idx, float("-inf")), -1) - lse_all
    return TopK(vals, idx, tail)
