"""The self-supervised objectives: EMP-SSL (Tong et al., 2023, arXiv 2304.03977, Eq. 2-3), batched over patches,
and the two-view baselines SimCLR, VICReg and BYOL (:mod:`empssl.methods`)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def total_coding_rate(z: torch.Tensor, eps: float = 0.2) -> torch.Tensor:
    """Total Coding Rate R(Z) = 1/2 logdet(I_d + d / (b * eps) Z^T Z)  (paper Eq. 2).

    z: (..., b, d) embeddings, every leading index one independent batch (one patch index); eps: the distortion
    epsilon (0.2 in the official recipe). Returns (...) coding rates in float32 (0-d for a (b, d) input). Larger =
    more spread-out embeddings; the EMP-SSL loss *subtracts* it.

    By Sylvester's identity logdet(I_d + c Z^T Z) = logdet(I_b + c Z Z^T), so the smaller of the two
    Gram matrices is factorised (100 x 100 rather than 1024 x 1024 for the official batch). Both are
    symmetric with eigenvalues >= 1, so a Cholesky factorisation exists even for fully collapsed z.
    """
    if z.dim() < 2:
        raise ValueError(f"z must have shape (..., b, d); got {tuple(z.shape)}")
    _check_weight("eps", eps, positive=True)
    b, d = z.shape[-2], z.shape[-1]
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.float()
        scale = d / (b * eps)
        gram = z @ z.transpose(-1, -2) if b <= d else z.transpose(-1, -2) @ z  # (..., m, m), m = min(b, d)
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        # cholesky_ex: no host sync and no exception; a non-finite z gives a non-finite R, which the
        # training loop detects and reports.
        chol = torch.linalg.cholesky_ex(eye + scale * gram).L
        # logdet(A) = 2 sum log diag(L);  R = logdet / 2
        return chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)


class EMPSSLTerms(NamedTuple):
    """``loss`` is what to minimise; ``tcr`` and ``invariance`` are its two terms, unweighted, for logging (not
    detached: they share ``loss``'s graph)."""

    loss: torch.Tensor  # -tcr - invariance_weight * invariance
    tcr: torch.Tensor  # (1/n) sum_i R(z_i)
    invariance: torch.Tensor  # (1/n) sum_i mean_b cos(z_i, z_mean), in [-1, 1]


def emp_ssl_loss(z: torch.Tensor, eps: float = 0.2, invariance_weight: float = 200.0, *,
                 tcr_over: torch.Tensor | None = None) -> EMPSSLTerms:
    """EMP-SSL objective (paper Eq. 3), the quantity to *minimise*:

        loss = -(1/n) sum_i R(z_i) - invariance_weight * (1/n) sum_i mean_b cos(z_i, z_mean)

    z: (n_patches, b, d) projector outputs with L2-normalised rows; z[i] holds patch i of every image.
    invariance_weight: lambda, 200 in the official recipe. ``tcr_over``: the (n_patches, B, d) batch the coding rates
    span instead of z (all ranks' z, z being one rank's rows). Returns EMPSSLTerms(loss, tcr, invariance), 0-d float32
    tensors. ``z_mean`` (b, d), the mean over patches, is *not* detached, as in the official code.
    """
    if z.dim() != 3:
        raise ValueError(f"z must have shape (n_patches, b, d); got {tuple(z.shape)}")
    if z.shape[0] < 2:
        raise ValueError(f"emp_ssl_loss needs at least 2 patches per image (the invariance term compares them); "
                         f"got z of shape {tuple(z.shape)}")
    if tcr_over is not None and (tcr_over.dim() != 3 or tcr_over.shape[::2] != z.shape[::2]):
        raise ValueError(f"tcr_over must have z's n_patches and d, shape ({z.shape[0]}, B, {z.shape[2]}); got "
                         f"{tuple(tcr_over.shape)}")
    _check_weight("invariance_weight", invariance_weight)
    z = z.float()
    tcr = total_coding_rate(z if tcr_over is None else tcr_over, eps).mean()
    z_mean = z.mean(dim=0, keepdim=True)  # (1, b, d)
    invariance = F.cosine_similarity(z, z_mean, dim=-1).mean()  # mean over (n, b)
    return EMPSSLTerms(-tcr - invariance_weight * invariance, tcr, invariance)


class EMPSSLLoss(nn.Module):
    """:func:`emp_ssl_loss` as a module, for a training loop of one's own::

        criterion = EMPSSLLoss(eps=0.2, invariance_weight=200)
        loss = criterion(z)            # z: (n_patches, b, d), L2-normalised rows
        criterion.terms.tcr            # the last call's terms (detached), for logging

    Sign convention (paper Eq. 3): loss = -TCR - invariance_weight x invariance, so minimising it *maximises* the
    coding rate R (spread-out embeddings) and the patches' agreement. lightly's ``EMPSSLLoss`` returns
    +TCR - invariance_weight x invariance: the coding-rate term's sign flipped, so minimising it shrinks R.
    """

    terms: EMPSSLTerms | None

    def __init__(self, eps: float = 0.2, invariance_weight: float = 200.0) -> None:
        super().__init__()
        _check_weight("eps", eps, positive=True)
        _check_weight("invariance_weight", invariance_weight)
        self.eps, self.invariance_weight = eps, invariance_weight
        self.terms = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The 0-d loss of z (n_patches, b, d); ``self.terms`` holds its (loss, tcr, invariance), detached."""
        terms = emp_ssl_loss(z, self.eps, self.invariance_weight)
        self.terms = EMPSSLTerms(*(t.detach() for t in terms))
        return terms.loss

    def extra_repr(self) -> str:
        return f"eps={self.eps}, invariance_weight={self.invariance_weight}"


def _check_weight(name: str, value: float, positive: bool = False) -> None:
    """A loss's scalar setting: a finite number (> 0 when ``positive``). Checked on the host, no device sync."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value!r}")


# --- the two-view baselines (SimCLR, VICReg, BYOL), as solo-learn computes them ---------------------------------


def _check_pair(name: str, a: torch.Tensor, b: torch.Tensor, min_batch: int = 1) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"{name} needs two (b, d) tensors of the same shape; got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.shape[0] < min_batch:
        raise ValueError(f"{name} needs a batch of at least {min_batch}; got {a.shape[0]}")


def simclr_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """NT-Xent (SimCLR, Chen et al. 2020, Eq. 1) over the 2b views, both directions, to *minimise*:

        l(i, j) = -log exp(cos(z_i, z_j) / T) / sum_{k != i} exp(cos(z_i, z_k) / T)
        loss = 1/(2b) sum_n [l(n, n + b) + l(n + b, n)]

    z1, z2: (b, d) projections (not normalised) of view 1 and view 2, row n of both from image n; temperature: T
    (0.2 in solo-learn's CIFAR recipe). Returns a 0-d float32 loss, a cross-entropy over 2b - 1 candidates
    (log(2b - 1) at chance), computed with autocast off.
    """
    _check_pair("simclr_loss", z1, z2, min_batch=2)  # negatives
    with torch.autocast(device_type=z1.device.type, enabled=False):
        b = z1.shape[0]
        z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)  # (2b, d)
        logits = z @ z.T / temperature  # (2b, 2b) cosine similarities / T
        # k != i: a view is never its own candidate
        logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
        positive = torch.arange(2 * b, device=z.device).roll(b)  # view n pairs with n + b, and n + b with n
        return F.cross_entropy(logits, positive)


class VICRegLoss(NamedTuple):
    """``loss`` is what to minimise; the three terms are unweighted, for logging."""

    loss: torch.Tensor  # sim_weight * invariance + var_weight * variance + cov_weight * covariance
    invariance: torch.Tensor  # mean squared difference of the two views' projections
    variance: torch.Tensor  # v(Z1) + v(Z2) (or their mean, with variance_mean=True)
    covariance: torch.Tensor  # c(Z1) + c(Z2)


def _variance_covariance(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VICReg's v(Z) (Eq. 1-2, gamma 1, epsilon 1e-4) and c(Z) (Eq. 3-4) of (n, d) float32 embeddings."""
    n, d = z.shape
    z = z - z.mean(dim=0)
    var = z.pow(2).sum(dim=0) / (n - 1)  # (d,) the diagonal of C(Z), unbiased as in the official code
    v = F.relu(1 - torch.sqrt(var + 1e-4)).mean()
    cov = z.T @ z / (n - 1)  # (d, d); 2 x 2048 x 2048 x 256 flops, small beside the backbone
    # the diagonal masked out rather than subtracted: no cancellation when the off-diagonal part is small
    off_diagonal = cov.masked_fill(torch.eye(d, dtype=torch.bool, device=z.device), 0.0)
    return v, off_diagonal.pow(2).sum() / d


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_weight: float = 25.0, var_weight: float = 25.0,
                cov_weight: float = 1.0, variance_mean: bool = False) -> VICRegLoss:
    """VICReg (Bardes, Ponce, LeCun 2022, Eq. 1-6), the quantity to *minimise*:

        loss = sim_weight * s(Z1, Z2) + var_weight * [v(Z1) + v(Z2)] + cov_weight * [c(Z1) + c(Z2)]
        s = mean_{n, k} (z1_nk - z2_nk)^2                       (Eq. 5, as a mean over dims too: see below)
        v(Z) = 1/d sum_j max(0, 1 - sqrt(Var(z^j) + 1e-4))      (Eq. 1-2)
        c(Z) = 1/d sum_{i != j} C(Z)_ij^2,  C(Z) = 1/(n-1) sum_n (z_n - mean)(z_n - mean)^T   (Eq. 3-4)

    Eq. 5 sums the squared distance over the d dimensions; the official code and solo-learn use
    ``F.mse_loss`` (a mean over them), with the coefficients 25 / 25 / 1.

    The variance term is the *sum* v(Z1) + v(Z2), as the paper's Eq. 6 and solo-learn write it.
    facebookresearch/vicreg (``std_loss = mean(relu(1 - std_x)) / 2 + mean(relu(1 - std_y)) / 2``) and lightly
    take the *mean*, i.e. ours with var_weight 12.5: ``variance_mean=True`` computes their form. The covariance
    term is the sum c(Z1) + c(Z2) in all three.

    z1, z2: (n, d) projections of view 1 and view 2, row n of both from image n. Returns VICRegLoss(loss,
    invariance, variance, covariance), 0-d float32 tensors computed with autocast off.
    """
    _check_pair("vicreg_loss", z1, z2, min_batch=2)  # a variance
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z1, z2 = z1.float(), z2.float()
        invariance = F.mse_loss(z1, z2)
        v1, c1 = _variance_covariance(z1)
        v2, c2 = _variance_covariance(z2)
        variance, covariance = (v1 + v2) / 2 if variance_mean else v1 + v2, c1 + c2
        loss = sim_weight * invariance + var_weight * variance + cov_weight * covariance
    return VICRegLoss(loss, invariance, variance, covariance)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss (Grill et al. 2020, Eq. 2), to *minimise*:

        loss = mean_n || p_n / ||p_n|| - z_n / ||z_n|| ||^2 = mean_n (2 - 2 cos(p_n, z_n))

    p: (b, d) online predictions q(z) of one view; z: (b, d) target projections of the other view, a constant
    (stop-gradient, as in the paper). Returns a 0-d float32 loss in [0, 4]: 0 when every p_n points along z_n, 4
    when opposite. BYOL's symmetrised loss is the sum over the two directions (Eq. 2 plus its swapped twin).
    """
    _check_pair("byol_loss", p, z)
    with torch.autocast(device_type=p.device.type, enabled=False):
        return 2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()
