"""Top-k sparse soft targets: the loss against the dense loss (by autograd), the file form,
training on it, and its bad input."""

import pytest
import torch
from safetensors.torch import load_file

from kdcli.errors import UsageError
from kdcli.inspection import inspect_file
from kdcli.soft_targets import soft_targets
from kdcli.students.base import Architecture
from kdcli.train import TrainConfig, train_student
from kdcli.training.losses import DistillationLoss, top_k_kl
from kdcli.transfer.ensemble import TopK, top_k_targets
from kdcli.transfer.reader import load_transfer_set


def _loss_and_grad(z: torch.Tensor, targets, T: float, tail: str = "student"):
    z = z.clone().requires_grad_(True)
    _, _, soft = DistillationLoss(T, 0.0, tail)(z, targets)
    soft.backward()
    return soft.detach(), z.grad


def _peaked_teacher(b: int = 16, c: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * 6.0


@pytest.mark.parametrize("tail", ["student", "uniform", "renormalize"])
def test_top_k_with_all_classes_equals_the_dense_loss(tail):
    T = 3.0
    v = _peaked_teacher()
    z = torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
    dense_loss, dense_grad = _loss_and_grad(z, torch.softmax(v / T, -1), T)
    tk = top_k_targets(v, v.shape[1], T)
    assert bool(torch.isneginf(tk.tail_logmass).all())  # nothing left out
    loss, grad = _loss_and_grad(z, tk, T, tail)
    torch.testing.assert_close(loss, dense_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, dense_grad, rtol=1e-5, atol=1e-8)


def test_top_k_error_falls_as_k_grows_for_every_rule():
    T = 2.0
    v = _peaked_teacher(c=64)
    z = torch.randn(v.shape, generator=torch.Generator().manual_seed(2)) * 3
    dense_loss, dense_grad = _loss_and_grad(z, torch.softmax(v / T, -1), T)
    for tail in ("student", "uniform", "renormalize"):
        errs = []
        for k in (1, 2, 4, 8, 16, 32, 64):
            loss, grad = _loss_and_grad(z, top_k_targets(v, k, T), T, tail)
            errs.append((float((loss - dense_loss).abs()),
                         float((grad - dense_grad).norm() / dense_grad.norm())))
        loss_err, grad_err = zip(*errs, strict=True)
        assert all(a >= b for a, b in zip(grad_err, grad_err[1:], strict=False)), (tail, grad_err)
        assert grad_err[-1] < 1e-5 and loss_err[-1] < 1e-4
        assert grad_err[0] > 10 * grad_err[-2] or grad_err[-2] < 1e-6
    # the student rule never over-counts: merging the tail can only lower the KL
    for k in (1, 4, 16):
        loss, _ = _loss_and_grad(z, top_k_targets(v, k, T), T, "student")
        assert float(loss) <= float(dense_loss) + 1e-5


def test_student_rule_is_the_kl_of_the_merged_tail_and_its_gradient():
    """Tail mass m, student tail mass Q: the tail contributes m*log(m/Q) and, by autograd,
    the same gradient as spreading m over the tail in proportion to the student's q."""
    T = 1.5
    v = _peaked_teacher(b=4, c=10)
    z = torch.randn(4, 10, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    tk = top_k_targets(v, 3, T)
    log_q = torch.log_softmax(z / T, -1)
    kl = top_k_kl(log_q, *tk, T=T)
    g1, = torch.autograd.grad(kl.sum(), z, retain_graph=True)
    # explicit construction: a full target distribution with the tail shaped like q (detached)
    p = torch.softmax(v / T, -1)
    q = log_q.exp().detach()
    top = torch.zeros_like(p, dtype=torch.bool).scatter(-1, tk.indices, True)
    m = p.masked_fill(top, 0).sum(-1, keepdim=True)
    q_tail = q.masked_fill(top, 0)
    target = torch.where(top, p, m * q_tail / q_tail.sum(-1, keepdim=True))
    ce = -(target * log_q).sum(-1) + (torch.special.xlogy(target, target)).sum(-1)
    g2, = torch.autograd.grad(ce.sum(), z)
    torch.testing.assert_close(kl, ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)


def test_top_k_file_holds_the_teachers_top_logits_and_tail_mass(tmp_path, transfer_file,
                                                                 teacher_file):
    out = tmp_path / "tk.safetensors"
    summary = soft_targets([teacher_file], T=4.0, data="mnist[:2000]", out=out, top_k=3)
    assert summary["storage"] == "top-k" and summary["top_k"] == 3
    raw = load_file(str(out))
    assert set(raw) == {"inputs", "labels", "topk_logits", "topk_indices", "tail_logmass"}
    assert raw["topk_indices"].dtype == torch.int32 and raw["topk_logits"].shape == (2000, 3)
    dense = load_transfer_set(transfer_file)  # same teacher, data and T
    vals, idx = dense.logits.topk(3, -1)
    torch.testing.assert_close(raw["topk_logits"], vals, rtol=0, atol=0)
    assert torch.equal(raw["topk_indices"].long(), idx)
    top_mass = dense.soft_targets.gather(-1, idx).double().sum(-1)
    torch.testing.assert_close(raw["tail_logmass"].double().exp(), 1 - top_mass,
                               rtol=1e-4, atol=1e-6)
    ts = load_transfer_set(out)
    assert ts.storage == "top-k" and ts.top_k == 3 and ts.num_classes == 10
    assert ts.meta["format_version"] == "3"
    info = inspect_file(out)
    assert info["storage"] == "top-k" and info["top_k"] == 3
    assert info["mean_tail_mass"] == pytest.approx(float((1 - top_mass).mean()), rel=1e-3)
    assert info["bytes_per_example"] == pytest.approx(out.stat().st_size / 2000, rel=1e-3)


def test_float16_top_k_and_k_above_c_is_clamped(tmp_path, teacher_file):
    out = tmp_path / "tk16.safetensors"
    soft_targets([teacher_file], T=4.0, data="mnist[:300]", out=out, top_k=3,
                 targets_dtype="float16")
    assert load_file(str(out))["topk_logits"].dtype == torch.float16
    out2 = tmp_path / "all.safetensors"
    assert soft_targets([teacher_file], T=4.0, data="mnist[:300]", out=out2,
                        top_k=50)["top_k"] == 10
    ts = load_transfer_set(out2)
    dense = ts.targets_at(4.0)
    ref = torch.softmax(ts.teacher_logits(torch.arange(300)) / 4.0, -1)
    torch.testing.assert_close(dense, ref)


def test_training_on_top_k_targets(tmp_path, teacher_file):
    tk = tmp_path / "tk.safetensors"
    soft_targets([teacher_file], T=4.0, data="mnist[:2000]", out=tk, top_k=3)
    cfg = TrainConfig(epochs=2, lr=0.02)
    for tail in ("student", "renormalize"):
        s = train_student(tk, arch=Architecture.parse("mlp:64"), alpha=0.0, tail=tail,
                          out=tmp_path / f"{tail}.safetensors", config=cfg,
                          eval_data="mnist:test[:500]")
        assert s["targets"] == "top-3" and s["tail"] == tail
        assert s["agreement"] > 0.7 and s["test_errors"] < 200


def test_top_k_refuses_what_its_logits_cannot_give(tmp_path, teacher_file, cli):
    tk = tmp_path / "tk.safetensors"
    soft_targets([teacher_file], T=4.0, data="mnist[:300]", out=tk, top_k=3)
    kw = {"arch": Architecture.parse("mlp:16"), "config": TrainConfig(epochs=1),
          "eval_data": None, "out": tmp_path / "s.safetensors"}
    with pytest.raises(UsageError, match=r"top 3 of 10 logits, so the normalization at T=8"):
        train_student(tk, T=8.0, **kw)
    with pytest.raises(UsageError, match="--loss mse needs all 10 logits"):
        train_student(tk, loss="mse", **kw)
    with pytest.raises(UsageError, match="unknown --tail"):
        train_student(tk, tail="guess", **kw)
    # with all classes stored, another T is exact
    full = tmp_path / "full.safetensors"
    soft_targets([teacher_file], T=4.0, data="mnist[:300]", out=full, top_k=10)
    ts = load_transfer_set(full)
    got = ts.targets(torch.arange(5), 2.0)
    assert isinstance(got, torch.Tensor) and got.shape == (5, 10)
    assert isinstance(ts.targets(torch.arange(5), 4.0), TopK)


@pytest.mark.parametrize(("args", "match"), [
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--top-k", "-3"], "--top-k must be at least 1"),
    (["--targets-dtype", "float16"], "--targets-dtype applies to top-k"),
    (["--top-k", "2", "--targets-dtype", "int8"], "unknown --targets-dtype"),
])
def test_bad_top_k_options(cli, teacher_file, args, match):
    r = cli("soft-targets", teacher_file, "--data", "mnist[:100]", *args)
    assert r.exit_code == 1 and match in r.output
    assert r.output.count("\n") == 1
