"""Distillation losses as small modules (Hinton, Vinyals & Dean 2015, section 2).

Notation: ``z`` student logits, ``v`` teacher logits, ``p_T = softmax(v/T)`` the stored
soft targets, ``y`` hard labels, ``alpha`` the weight on the hard labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DistillationLoss(nn.Module):
    """``L = alpha * CE(y, softmax(z)) + (1 - alpha) * T^2 * CE(p_T, softmax(z / T))``.

    The soft term's gradients scale as ``1/T^2``, so it is multiplied by ``T^2``; this holds
    for ``alpha = 0`` too (pure distillation). Terms are means over the batch.

    ``CE(p_T, q) = H(p_T) + KL(p_T || q)`` and the teacher's entropy ``H(p_T)`` does not depend
    on the student, so the soft term is computed as ``T^2 * KL(p_T || softmax(z / T))``: the
    same gradients, and a value that is 0 when the student matches the teacher.

    Args:
        T: Softmax temperature of the soft targets (> 0).
        alpha: Weight on the hard-label term, in ``[0, 1]``.

    Shapes:
        student_logits: ``[B, C]`` float.
        soft_targets: ``[B, C]`` float, rows summing to 1 (teacher probabilities at T).
        labels: ``[B]`` int64, or None when ``alpha == 0``.
        returns: ``(loss, hard, soft)``, three scalars; ``hard`` and ``soft`` are unweighted.
    """

    def __init__(self, T: float, alpha: float) -> None:
        super().__init__()
        self.T, self.alpha = float(T), float(alpha)

    def forward(self, student_logits: torch.Tensor, soft_targets: torch.Tensor,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        log_q = F.log_softmax(student_logits / self.T, dim=-1)
        kl = torch.special.xlogy(soft_targets, soft_targets) - soft_targets * log_q
        soft = kl.sum(-1).mean() * (self.T * self.T)
        hard = _hard(student_logits, labels, self.alpha)
        return self.alpha * hard + (1.0 - self.alpha) * soft, hard, soft


class LogitMSELoss(nn.Module):
    """``L = alpha * CE(y, softmax(z)) + (1 - alpha) * 1/2 * sum_i (z_i - v_i)^2``.

    Logit matching, the high-temperature limit of distillation (paper, section 2.1). By
    default both logit vectors are centred per example (zero mean), the paper's assumption;
    softmax is unchanged by it. The squared error is summed over classes, averaged over the
    batch.

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
        soft = 0.5 * (z - v).pow(2).sum(-1).mean()
        hard = _hard(student_logits, labels, self.alpha)
        return self.alpha * hard + (1.0 - self.alpha) * soft, hard, soft


def _hard(logits: torch.Tensor, labels: torch.Tensor | None, alpha: float) -> torch.Tensor:
    if labels is None:
        if alpha > 0:
            raise ValueError("alpha > 0 needs labels")
        return logits.new_zeros(())
    return F.cross_entropy(logits, labels)
