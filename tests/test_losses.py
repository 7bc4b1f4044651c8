"""The paper's maths, checked by autograd."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdcli.training.losses import DistillationLoss, LogitMSELoss


def soft_grad(z: torch.Tensor, v: torch.Tensor, T: float) -> torch.Tensor:
    """d/dz of the T^2-scaled soft term, by autograd."""
    z = z.clone().requires_grad_(True)
    p = torch.softmax(v / T, -1)
    _, _, soft = DistillationLoss(T, alpha=0.0)(z, p)
    (g,) = torch.autograd.grad(soft, z)
    return g


def test_high_T_gradient_approaches_logit_matching():
    """Paper eq. 3-4: T^2 * dC/dz_i -> (z_i - v_i) / C for zero-mean logits as T grows."""
    torch.manual_seed(0)
    n_cls, batch = 10, 64
    z = torch.randn(batch, n_cls, dtype=torch.float64)  # unit-variance logits
    v = torch.randn(batch, n_cls, dtype=torch.float64)
    z, v = z - z.mean(-1, keepdim=True), v - v.mean(-1, keepdim=True)
    # C classes; the loss averages over the batch, so each example's gradient has 1/batch too.
    target = (z - v) / n_cls / batch
    errors = []
    for T in (5.0, 20.0, 100.0, 500.0):
        g = soft_grad(z, v, T)
        errors.append(float((g - target).norm() / target.norm()))
    assert errors[2] < 0.01, errors  # relative error below 1% at T = 100
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors  # falls as T rises


def mse_grad(z: torch.Tensor, v: torch.Tensor, center: bool = True) -> torch.Tensor:
    """d/dz of LogitMSELoss's soft term, by autograd."""
    z = z.clone().requires_grad_(True)
    _, _, soft = LogitMSELoss(alpha=0.0, center=center)(z, v)
    (g,) = torch.autograd.grad(soft, z)
    return g


@pytest.mark.parametrize("n_cls", [2, 3, 10, 100])
def test_mse_is_the_exact_high_T_limit_of_the_T2_scaled_kd_loss(n_cls):
    """--loss mse's gradient equals T^2 * dKL/dz at high T: same scale, not only direction."""
    torch.manual_seed(n_cls)
    batch = 32
    # Offsets per row: centring inside the MSE loss and softmax's shift-invariance remove them.
    z = torch.randn(batch, n_cls, dtype=torch.float64) + torch.randn(batch, 1) * 3
    v = torch.randn(batch, n_cls, dtype=torch.float64) + torch.randn(batch, 1) * 3
    g_mse = mse_grad(z, v)
    zc, vc = z - z.mean(-1, keepdim=True), v - v.mean(-1, keepdim=True)
    torch.testing.assert_close(g_mse, (zc - vc) / (n_cls * batch))  # the stated normalisation
    errors = [float((soft_grad(z, v, T) - g_mse).norm() / g_mse.norm()) for T in (10.0, 100.0)]
    assert errors[1] < 0.01, errors  # under 1% at T = 100
    assert errors[1] < errors[0] / 5, errors  # and shrinking as 1/T


def test_soft_gradient_is_q_minus_p_over_T_times_T2():
    """Paper eq. 2: dC/dz_i = (q_i - p_i) / T, and the loss multiplies it by T^2."""
    torch.manual_seed(1)
    z, v, T = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64), 3.0
    g = soft_grad(z, v, T)
    q, p = torch.softmax(z / T, -1), torch.softmax(v / T, -1)
    torch.testing.assert_close(g, T * (q - p) / 8)


def test_kd_loss_mixes_terms_and_keeps_T2_at_alpha_zero():
    torch.manual_seed(2)
    z, v, y = torch.randn(16, 10), torch.randn(16, 10), torch.randint(0, 10, (16,))
    T, alpha = 4.0, 0.3
    p = torch.softmax(v / T, -1)
    loss, hard, soft = DistillationLoss(T, alpha)(z, p, y)
    expected_soft = T**2 * (p * (p.log() - F.log_softmax(z / T, -1))).sum(-1).mean()
    ce = T**2 * -(p * F.log_softmax(z / T, -1)).sum(-1).mean()  # the formula's CE form
    entropy = T**2 * -(p * p.log()).sum(-1).mean()  # differs by the teacher's entropy only
    torch.testing.assert_close(ce, expected_soft + entropy)
    torch.testing.assert_close(soft, expected_soft)
    torch.testing.assert_close(hard, F.cross_entropy(z, y))
    torch.testing.assert_close(loss, alpha * hard + (1 - alpha) * soft)
    loss0, _, soft0 = DistillationLoss(T, 0.0)(z, p)  # pure distillation: no labels needed
    torch.testing.assert_close(loss0, expected_soft)  # T^2 still applied


def test_kd_loss_needs_labels_when_alpha_positive():
    with pytest.raises(ValueError):
        DistillationLoss(2.0, 0.5)(torch.randn(2, 3), torch.full((2, 3), 1 / 3))


def test_mse_loss_is_half_mean_squared_error_of_centred_logits():
    torch.manual_seed(3)
    z, v = torch.randn(8, 10), torch.randn(8, 10) + 5.0  # v offset: centring removes it
    _, _, soft = LogitMSELoss(alpha=0.0)(z, v)
    zc, vc = z - z.mean(-1, keepdim=True), v - v.mean(-1, keepdim=True)
    # 1/2 * mean over the 10 classes, then mean over the 8 examples
    torch.testing.assert_close(soft, 0.5 * ((zc - vc) ** 2).sum(-1).mean() / 10)
    _, _, raw = LogitMSELoss(alpha=0.0, center=False)(z, v)
    torch.testing.assert_close(raw, 0.5 * ((z - v) ** 2).mean(-1).mean())
    assert float(raw) > float(soft)
    y = torch.randint(0, 10, (8,))
    loss, hard, soft2 = LogitMSELoss(alpha=0.25)(z, v, y)
    torch.testing.assert_close(loss, 0.25 * F.cross_entropy(z, y) + 0.75 * soft)
    torch.testing.assert_close(soft2, soft)


def test_mse_gradient_matches_high_T_kd_gradient_in_direction_and_size():
    """Logit matching and high-T distillation push the logits the same way, equally hard."""
    torch.manual_seed(4)
    z = torch.randn(4, 10, dtype=torch.float64)
    v = torch.randn(4, 10, dtype=torch.float64)
    z, v = z - z.mean(-1, keepdim=True), v - v.mean(-1, keepdim=True)
    g_mse = mse_grad(z, v)
    g_kd = soft_grad(z, v, 1000.0)
    cos = F.cosine_similarity(g_mse.flatten(), g_kd.flatten(), dim=0)
    assert float(cos) > 1 - 1e-4
    assert math.isclose(float(g_mse.norm() / g_kd.norm()), 1.0, rel_tol=1e-2)  # same scale
