"""Distillation losses as small modules (Hinton, Vinyals & Dean 2015, section 2).

Notation: ``z`` student logits, ``v`` teacher logits, ``p_T = softmax(v/T)`` the stored
soft targets, ``y`` hard labels, ``alpha`` the weight on the hard labels.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from kdcli.config import TAIL_RULES, DistillConfig
from kdcli.transfer.ensemble import TopK


def criterion(distill: DistillConfig) -> nn.Module:
    """The loss module of ``distill.loss`` (one of :data:`kdcli.config.LOSSES`): ``kd``
    matches soft targets at T, ``mse`` the teacher's logits (see :func:`matches_logits`)."""
    if distill.loss == "mse":
        return LogitMSELoss(distill.alpha, distill.center)
    return DistillationLoss(distill.T, distill.alpha, distill.tail)


def matches_logits(distill: DistillConfig) -> bool:
    """Whether ``distill.loss`` takes the teacher's logits rather than soft targets at T."""
    return distill.loss == "mse"


class DistillationLoss(nn.Module):
    """``L = alpha * CE(y, softmax(z)) + (1 - alpha) * T^2 * CE(p_T, softmax(z / T))``.

    The soft term's gradients scale as ``1/T^2``, so it is multiplied by ``T^2``; this holds
    for ``alpha = 0`` too (pure distillation). Terms are means over the batch.

    ``CE(p_T, q) = H(p_T) + KL(p_T || q)`` and the teacher's entropy ``H(p_T)`` does not depend
    on the student, so the soft term is computed as ``T^2 * KL(p_T || softmax(z / T))``: the
    same gradients, and a value that is 0 when the student matches the teacher.

    Top-k targets (:class:`kdcli.transfer.ensemble.TopK`) know the teacher's top-K probabilities
    exactly and the total mass ``m`` outside them, but not how ``m`` is spread. ``tail``
    says what to assume:

    * ``student`` (default): ``m`` is spread over the other classes in proportion to the
      student's own probabilities ``q``. Their KL terms then sum to ``m * log(m / Q)``, with
      ``Q`` the student's mass outside the top K: the KL between the two distributions with
      the tail merged into one bucket. Nothing is assumed about the tail's shape; the
      student is only asked to give it the right total.
    * ``uniform``: ``m`` is spread evenly over the ``C - K`` other classes.
    * ``renormalize``: the tail is dropped and the top-K probabilities are rescaled to sum
      to 1, so the student is pushed to put no mass outside the top K.

    With K = C every rule equals the dense loss.

    Args:
        T: Softmax temperature of the soft targets (> 0).
        alpha: Weight on the hard-label term, in ``[0, 1]``.
        tail: ``student``, ``uniform`` or ``renormalize`` (top-k targets only).

    Shapes:
        student_logits: ``[B, C]`` float.
        soft_targets: ``[B, C]`` float, rows summing to 1 (teacher probabilities at T), or
            a ``TopK`` of ``logits [B, K]``, ``indices [B, K]`` and ``tail_logmass [B]``.
        labels: ``[B]`` int64, or None when ``alpha == 0``.
        returns: ``(loss, hard, soft)``, three scalars; ``hard`` and ``soft`` are unweighted.
    """

    def __init__(self, T: float, alpha: float, tail: str = "student") -> None:
        super().__init__()
        if tail not in TAIL_RULES:
            raise ValueError(f"tail must be one of {TAIL_RULES}, got {tail!r}")
        self.T, self.alpha, self.tail = float(T), float(alpha), tail

    def forward(self, student_logits: torch.Tensor, soft_targets: torch.Tensor | TopK,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        log_q = F.log_softmax(student_logits / self.T, dim=-1)
        soft = soft_kl(soft_targets, log_q, self.T, self.tail).mean() * (self.T * self.T)
        hard = _hard(student_logits, labels, self.alpha)
        return self.alpha * hard + (1.0 - self.alpha) * soft, hard, soft


class LogitMSELoss(nn.Module):
    """``L = alpha * CE(y, softmax(z)) + (1 - alpha) * 1/2 * mean_i (z_i - v_i)^2``.

    Logit matching, the high-temperature limit of distillation (paper, section 2.1), taken
    exactly: for centred logits the T^2-scaled KD gradient ``T^2 * dKL/dz_i = T * (q_i - p_i)``
    tends to ``(z_i - v_i) / C`` as T grows, and that is the gradient of
    ``1/2 * mean_i (z_i - v_i)^2``, the squared error averaged (not summed) over the C classes.
    So the same ``--lr`` and ``--alpha`` mean the same thing in both modes. By default both
    logit vectors are centred per example (zero mean), the paper's assumption; softmax is
    unchanged by it. Like the KD loss, the soft term is then averaged over the B examples of
    the batch: ``soft = 1/(2*B*C) * sum_b sum_i (z_bi - v_bi)^2``, whose gradient is
    ``(z_bi - v_bi) / (B * C)``.

    Args:
        alpha: Weight on the hard-label term, in ``[0, 1]``.
        center: Subtract each row's mean from ``z`` and ``v`` first.

    Shapes:
        student_logits: ``[B, C]`` float.
        teacher_logits: ``[B, C]`` float.
        labels: ``[B]`` int64, or None when ``alpha == 0``.
        returns: ``(loss, hard, soft)``, three scalars.
    """

    def __init__(self, alpha: float, center: bool = True) -> None:
        super().__init__()
        self.alpha, self.center = float(alpha), center

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        z, v = student_logits, teacher_logits
        if self.center:
            z = z - z.mean(-1, keepdim=True)
            v = v - v.mean(-1, keepdim=True)
        soft = 0.5 * (z - v).pow(2).mean()  # mean over classes and examples
        hard = _hard(student_logits, labels, self.alpha)
        return self.alpha * hard + (1.0 - self.alpha) * soft, hard, soft


@functools.singledispatch
def soft_kl(soft_targets: torch.Tensor, log_q: torch.Tensor, T: float,
            tail: str = "student") -> torch.Tensor:
    """Per-example ``KL(p_T || q)`` ``[B]`` of soft targets against the student's
    log-probabilities ``log_q`` ``[B, C]`` at ``T``, by the targets' type: dense ``[B, C]``
    probabilities here, :class:`TopK` in :func:`top_k_kl` (``tail`` applies to those)."""
    return (torch.special.xlogy(soft_targets, soft_targets) - soft_targets * log_q).sum(-1)


@soft_kl.register
def _(soft_targets: TopK, log_q: torch.Tensor, T: float, tail: str = "student") -> torch.Tensor:
    return top_k_kl(log_q, *soft_targets, T=T, tail=tail)


def top_k_kl(log_q: torch.Tensor, logits: torch.Tensor, indices: torch.Tensor,
             tail_logmass: torch.Tensor, T: float, tail: str = "student") -> torch.Tensor:
    """Per-example ``KL(p_T || q)`` from top-k teacher targets (see :class:`DistillationLoss`).

    Shapes:
        log_q: ``[B, C]`` student log-probabilities at T.
        logits: ``[B, K]`` the teacher's top-K logits.
        indices: ``[B, K]`` int64 their classes.
        tail_logmass: ``[B]`` log of the teacher's probability mass outside the top K at T.
        returns: ``[B]``.
    """
    log_top = F.log_softmax(logits / T, dim=-1)  # the top K, renormalized
    log_q_top = log_q.gather(-1, indices)
    if tail == "renormalize" or indices.shape[1] == log_q.shape[1]:
        return (log_top.exp() * (log_top - log_q_top)).sum(-1)
    # log(1 - m): the top K's share of the teacher's mass
    log_keep = torch.log(-torch.expm1(tail_logmass.clamp(max=-1e-12)))
    log_p = log_top + log_keep[:, None]
    top = (log_p.exp() * (log_p - log_q_top)).sum(-1)
    m = tail_logmass.exp()
    if tail == "uniform":  # m / (C - K) on each class outside the top K
        rest = log_q.shape[1] - indices.shape[1]
        sum_log_q_tail = log_q.sum(-1) - log_q_top.sum(-1)
        return top + torch.special.xlogy(m, m / rest) - m / rest * sum_log_q_tail
    log_q_tail = torch.logsumexp(log_q.scatter(-1, indices, float("-inf")), dim=-1)
    return top + torch.special.xlogy(m, m) - m * log_q_tail


def _hard(logits: torch.Tensor, labels: torch.Tensor | None, alpha: float) -> torch.Tensor:
    if labels is None:
        if alpha > 0:
            raise ValueError("alpha > 0 needs labels")
        return logits.new_zeros(())
    return F.cross_entropy(logits, labels)
