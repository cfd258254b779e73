"""The EMP-SSL loss against a reference written from the paper's formula, plus its properties."""

import pytest
import torch
import torch.nn.functional as F

from empssl.losses import EMPSSLLoss, emp_ssl_loss, total_coding_rate


def reference_loss(z: torch.Tensor, eps: float, lam: float) -> tuple[float, float, float]:
    """Official definition, one patch at a time, in float64, with the d x d matrix of Eq. 2."""
    z = z.double()
    n, b, d = z.shape
    z_mean = z.mean(0)
    tcr = inv = 0.0
    for i in range(n):
        zi = z[i]
        tcr += 0.5 * torch.logdet(torch.eye(d, dtype=z.dtype) + d / (b * eps) * zi.T @ zi).item()
        inv += F.cosine_similarity(zi, z_mean, dim=1).mean().item()
    tcr, inv = tcr / n, inv / n
    return -tcr - lam * inv, tcr, inv


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("shape", [(4, 8, 16), (3, 32, 8), (5, 100, 128), (2, 50, 1024), (20, 16, 16)])
def test_matches_reference(shape):
    z = unit(*shape)
    out = emp_ssl_loss(z, eps=0.2, invariance_weight=200.0)
    ref = reference_loss(z, 0.2, 200.0)
    for got, want in zip(out, ref):
        assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_sign_convention_and_terms():
    z = unit(6, 10, 12)
    out = emp_ssl_loss(z, eps=0.5, invariance_weight=3.0)
    assert out.tcr > 0
    assert out.loss.item() == pytest.approx((-out.tcr - 3.0 * out.invariance).item(), rel=1e-6)


def test_total_coding_rate_shapes_and_batching():
    z = unit(3, 7, 9)
    r = total_coding_rate(z)
    assert r.shape == (3,)
    assert total_coding_rate(z[1]).shape == ()
    torch.testing.assert_close(r[1], total_coding_rate(z[1]))


def test_identical_patches_give_invariance_one():
    z = unit(1, 8, 16).expand(5, 8, 16)
    assert emp_ssl_loss(z).invariance.item() == pytest.approx(1.0, abs=1e-6)


def test_coding_rate_rises_with_rank():
    base = unit(64, 32)
    rates = []
    for rank in (1, 2, 8, 32):
        basis = torch.linalg.qr(torch.randn(32, rank))[0]  # (32, rank) orthonormal
        z = F.normalize(base @ basis @ basis.T, dim=-1)  # rows span `rank` dims
        rates.append(total_coding_rate(z).item())
    assert rates == sorted(rates) and rates[0] < rates[-1] / 4


def test_finite_when_collapsed_and_when_b_lt_d():
    z = unit(1, 1, 64).expand(4, 10, 64).clone().requires_grad_(True)  # every embedding identical
    out = emp_ssl_loss(z)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(z.grad).all()
    z2 = unit(4, 3, 256).requires_grad_(True)  # b << d
    out2 = emp_ssl_loss(z2)
    out2.loss.backward()
    assert torch.isfinite(out2.loss) and torch.isfinite(z2.grad).all()


def test_bf16_input_is_computed_in_float32():
    z = unit(3, 20, 32)
    torch.testing.assert_close(emp_ssl_loss(z.bfloat16()).tcr, emp_ssl_loss(z.bfloat16().float()).tcr)


def test_loss_decreases_under_sgd():
    w = torch.randn(4, 16, 8, requires_grad=True)
    opt = torch.optim.SGD([w], lr=1.0)
    losses = []
    for _ in range(30):
        out = emp_ssl_loss(F.normalize(w, dim=-1), invariance_weight=5.0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 1.0, losses[::10]


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="n_patches, b, d"):
        emp_ssl_loss(torch.randn(4, 8))
    with pytest.raises(ValueError):
        total_coding_rate(torch.randn(8))
    z = unit(4, 8, 16)
    for wrong in (unit(3, 16, 16), unit(4, 16, 8), unit(64, 16)):  # other patches, other d, no patch axis
        with pytest.raises(ValueError, match=r"tcr_over must have z's n_patches and d, shape \(4, B, 16\); got"):
            emp_ssl_loss(z, tcr_over=wrong)
    emp_ssl_loss(z, tcr_over=unit(4, 16, 16))  # all ranks' rows: more images, the same patches and d


def test_the_module_is_the_function_and_keeps_the_terms():
    z = unit(5, 12, 16).requires_grad_()
    criterion = EMPSSLLoss(eps=0.5, invariance_weight=3.0)
    loss = criterion(z)
    want = emp_ssl_loss(z, eps=0.5, invariance_weight=3.0)
    assert loss.item() == want.loss.item() and criterion.terms is not None
    assert criterion.terms.tcr.item() == want.tcr.item() and criterion.terms.invariance.item() == want.invariance.item()
    assert not criterion.terms.tcr.requires_grad  # logging them keeps no graph alive
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    # minimised, the coding rate of identical patches rises (lightly's sign would lower it)
    z = unit(1, 12, 16).expand(5, 12, 16).clone().add_(0.01 * unit(5, 12, 16, seed=1)).requires_grad_()
    opt = torch.optim.SGD([z], lr=0.01)
    tcr0 = total_coding_rate(z.detach()).mean()
    for _ in range(5):
        opt.zero_grad()
        EMPSSLLoss(invariance_weight=0.0)(z).backward()
        opt.step()
    assert total_coding_rate(z.detach()).mean() > tcr0
    with pytest.raises(ValueError, match="eps"):
        EMPSSLLoss(eps=0.0)
