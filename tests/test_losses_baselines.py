"""SimCLR, VICReg and BYOL losses against loop references written from the papers' formulas, plus properties."""

import math

import pytest
import torch
import torch.nn.functional as F

from empssl.losses import VICRegLoss, byol_loss, simclr_loss, vicreg_loss


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a @ b / (a.norm() * b.norm())).item()


# --- references: float64, one sample / pair / dimension at a time -------------------------------------------------


def reference_simclr(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """SimCLR Eq. 1: l(i, j) = -log exp(sim(i, j)/t) / sum_{k != i} exp(sim(i, k)/t), averaged over all 2N (i, j)."""
    z = torch.cat([z1, z2]).double()
    n2 = z.shape[0]
    b = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + b) % n2
        denominator = sum(math.exp(cos(z[i], z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(math.exp(cos(z[i], z[j]) / t) / denominator)
    return total / n2


def reference_vicreg(z1: torch.Tensor, z2: torch.Tensor, lam: float, mu: float, nu: float) -> tuple[float, ...]:
    """VICReg Eq. 1-6 with s as a mean over dims (the official code's F.mse_loss), gamma 1, epsilon 1e-4."""
    z1, z2 = z1.double(), z2.double()
    n, d = z1.shape

    def v(z):
        total = 0.0
        for j in range(d):
            mean = sum(z[i, j].item() for i in range(n)) / n
            var = sum((z[i, j].item() - mean) ** 2 for i in range(n)) / (n - 1)
            total += max(0.0, 1 - math.sqrt(var + 1e-4))
        return total / d

    def c(z):
        zc = z - z.mean(0)
        total = 0.0
        for i in range(d):
            for j in range(d):
                if i != j:
                    total += ((zc[:, i] * zc[:, j]).sum().item() / (n - 1)) ** 2
        return total / d

    s = sum(((z1[i] - z2[i]) ** 2).sum().item() for i in range(n)) / (n * d)
    var, cov = v(z1) + v(z2), c(z1) + c(z2)
    return lam * s + mu * var + nu * cov, s, var, cov


def reference_byol(p: torch.Tensor, z: torch.Tensor) -> float:
    """BYOL Eq. 2: || p/|p| - z/|z| ||^2, averaged over the batch."""
    p, z = p.double(), z.double()
    return sum(((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum().item() for i in range(len(p))) / len(p)


# --- SimCLR -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,t", [((2, 3), 0.5), ((8, 16), 0.2), ((16, 4), 0.1), ((7, 32), 1.0)])
def test_simclr_matches_reference(shape, t):
    z1, z2 = randn(*shape, seed=1), randn(*shape, seed=2)
    assert simclr_loss(z1, z2, t).item() == pytest.approx(reference_simclr(z1, z2, t), rel=1e-5, abs=1e-6)


def test_simclr_is_symmetric_scale_free_and_lower_when_views_agree():
    z1, z2 = randn(16, 32, seed=1), randn(16, 32, seed=2)
    torch.testing.assert_close(simclr_loss(z1, z2), simclr_loss(z2, z1))
    torch.testing.assert_close(simclr_loss(z1, z2), simclr_loss(3 * z1, 0.5 * z2))
    agree = simclr_loss(z1, z1 + 0.05 * z2).item()
    assert agree < simclr_loss(z1, z2).item() - 1.0
    # unrelated random views: near chance, log(2b - 1)
    assert simclr_loss(z1, z2, 10.0).item() == pytest.approx(math.log(31), rel=0.02)


# --- VICReg -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 3), (16, 8), (6, 20), (40, 12)])  # n < d and n > d
def test_vicreg_matches_reference(shape):
    z1, z2 = randn(*shape, seed=3) * 0.7, randn(*shape, seed=4) * 1.5 + 0.3
    out = vicreg_loss(z1, z2, 25.0, 25.0, 1.0)
    assert isinstance(out, VICRegLoss)
    for got, want in zip(out, reference_vicreg(z1, z2, 25.0, 25.0, 1.0)):
        assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_vicreg_weights_combine_the_terms():
    z1, z2 = randn(10, 6, seed=5), randn(10, 6, seed=6)
    out = vicreg_loss(z1, z2, sim_weight=2.0, var_weight=3.0, cov_weight=0.5)
    want = 2.0 * out.invariance + 3.0 * out.variance + 0.5 * out.covariance
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)


def facebookresearch_vicreg(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """facebookresearch/vicreg ``main_vicreg.py`` VICReg.forward after the projector, on one process, with its
    default coefficients (sim 25, std 25, cov 1)."""
    x, y = x.double(), y.double()
    n, d = x.shape
    repr_loss = F.mse_loss(x, y)
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    std_x, std_y = torch.sqrt(x.var(dim=0) + 0.0001), torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x, cov_y = (x.T @ x) / (n - 1), (y.T @ y) / (n - 1)
    off = ~torch.eye(d, dtype=torch.bool)
    cov_loss = cov_x[off].pow(2).sum() / d + cov_y[off].pow(2).sum() / d
    return 25 * repr_loss + 25 * std_loss + 1 * cov_loss


def test_vicreg_variance_is_twice_facebookresearch_unless_variance_mean():
    """Ours (solo-learn, the paper's sum) at 25/25/1 = facebookresearch's at 25/50/1; variance_mean=True is
    theirs exactly."""
    z1, z2 = randn(32, 8, seed=8) * 0.4, randn(32, 8, seed=9) * 0.6 + 0.1  # std < 1: the variance term acts
    theirs = facebookresearch_vicreg(z1, z2).item()
    assert vicreg_loss(z1, z2, variance_mean=True).loss.item() == pytest.approx(theirs, rel=1e-5)
    ours = vicreg_loss(z1, z2)
    assert ours.variance.item() > 0.5
    assert ours.loss.item() == pytest.approx(theirs + 25 * ours.variance.item() / 2, rel=1e-5)
    assert vicreg_loss(z1, z2, var_weight=12.5).loss.item() == pytest.approx(theirs, rel=1e-5)


def test_vicreg_variance_term_zero_when_std_at_least_one_and_known_when_collapsed():
    z = randn(64, 8, seed=7) * 3  # every std ~3
    assert vicreg_loss(z, z).variance.item() == 0.0
    assert vicreg_loss(z, z).invariance.item() == 0.0
    const = torch.ones(5, 4)  # std sqrt(0 + 1e-4) = 0.01 in every dim, for both views
    assert vicreg_loss(const, const).variance.item() == pytest.approx(2 * 0.99, abs=1e-6)


def test_vicreg_covariance_zero_for_decorrelated_features():
    n, d = 32, 8
    centred = randn(n, d, seed=8)
    centred -= centred.mean(0)
    q = torch.linalg.qr(centred)[0]  # (n, d) orthonormal columns, still centred (the span is)
    z = q * math.sqrt(n - 1)  # C(Z) = I
    out = vicreg_loss(z, z)
    assert out.covariance.item() == pytest.approx(0.0, abs=1e-4)
    assert out.variance.item() == 0.0  # std sqrt(1 + 1e-4) > 1


# --- BYOL -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 4), (8, 16), (33, 7)])
def test_byol_matches_reference(shape):
    p, z = randn(*shape, seed=9), randn(*shape, seed=10)
    assert byol_loss(p, z).item() == pytest.approx(reference_byol(p, z), rel=1e-5, abs=1e-6)


def test_byol_same_direction_zero_opposite_four_orthogonal_two():
    z = randn(12, 5, seed=11)
    assert byol_loss(2.5 * z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(-z, z).item() == pytest.approx(4.0, abs=1e-6)
    e = torch.eye(4)
    assert byol_loss(e, e.roll(1, dims=1)).item() == pytest.approx(2.0, abs=1e-6)


def test_byol_target_gets_no_gradient():
    p, z = randn(6, 4, seed=12).requires_grad_(True), randn(6, 4, seed=13).requires_grad_(True)
    byol_loss(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None


# --- all three ----------------------------------------------------------------------------------------------------


def _toy_losses():
    """(name, loss of two views' embeddings) for each loss; BYOL symmetrised as its method uses it."""
    return [
        ("simclr", lambda a, b: simclr_loss(a, b, 0.5)),
        ("vicreg", lambda a, b: vicreg_loss(a, b).loss),
        ("byol", lambda a, b: byol_loss(a, b) + byol_loss(b, a)),
    ]


@pytest.mark.parametrize("name,fn", _toy_losses())
def test_loss_decreases_under_sgd(name, fn):
    x = randn(16, 12, seed=14)
    x1, x2 = x + 0.3 * randn(16, 12, seed=15), x + 0.3 * randn(16, 12, seed=16)  # two "views" of 16 images
    w = (0.3 * randn(12, 8, seed=17)).requires_grad_(True)
    opt = torch.optim.SGD([w], lr=0.05 if name == "vicreg" else 0.5)
    losses = []
    for _ in range(20):
        loss = fn(x1 @ w, x2 @ w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses[::5]


@pytest.mark.parametrize("name,fn", _toy_losses())
def test_computed_in_float32_under_autocast(name, fn):
    a, b = randn(8, 16, seed=18).bfloat16(), randn(8, 16, seed=19).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(a, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, fn(a.float(), b.float()))


def test_reject_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        simclr_loss(torch.randn(4, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="same shape"):
        vicreg_loss(torch.randn(2, 4, 8), torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="at least 2"):
        vicreg_loss(torch.randn(1, 8), torch.randn(1, 8))
    with pytest.raises(ValueError, match="at least 2"):
        simclr_loss(torch.randn(1, 8), torch.randn(1, 8))
    with pytest.raises(ValueError, match="same shape"):
        byol_loss(torch.randn(4), torch.randn(4))

