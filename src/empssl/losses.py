"""The EMP-SSL objective (Tong et al., 2023, arXiv 2304.03977, Eq. 2-3), batched over patches."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def total_coding_rate(z: torch.Tensor, eps: float = 0.2) -> torch.Tensor:
    """Total Coding Rate R(Z) = 1/2 logdet(I_d + d / (b * eps) Z^T Z)  (paper Eq. 2).

    Args:
        z: (..., b, d) embeddings; every leading index is one independent batch (one patch index).
        eps: the distortion epsilon (0.2 in the official recipe).

    Returns:
        (...) coding rates, a 0-d tensor for a (b, d) input. Larger = more spread-out embeddings; the
        EMP-SSL loss *subtracts* it. Computed in float32 whatever the input dtype.

    By Sylvester's identity logdet(I_d + c Z^T Z) = logdet(I_b + c Z Z^T), so the smaller of the two
    Gram matrices is factorised (100 x 100 rather than 1024 x 1024 for the official batch). Both are
    symmetric with eigenvalues >= 1, so a Cholesky factorisation exists even for fully collapsed z.
    """
    if z.dim() < 2:
        raise ValueError(f"z must have shape (..., b, d); got {tuple(z.shape)}")
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


class EMPSSLLoss(NamedTuple):
    """``loss`` is what to minimise; ``tcr`` and ``invariance`` are detached-free terms for logging."""

    loss: torch.Tensor  # -tcr - invariance_weight * invariance
    tcr: torch.Tensor  # (1/n) sum_i R(z_i)
    invariance: torch.Tensor  # (1/n) sum_i mean_b cos(z_i, z_mean), in [-1, 1]


def emp_ssl_loss(z: torch.Tensor, eps: float = 0.2, invariance_weight: float = 200.0) -> EMPSSLLoss:
    """EMP-SSL objective (paper Eq. 3), the quantity to *minimise*:

        loss = -(1/n) sum_i R(z_i) - invariance_weight * (1/n) sum_i mean_b cos(z_i, z_mean)

    Args:
        z: (n_patches, b, d) projector outputs with L2-normalised rows; z[i] holds patch i of every image.
        eps: coding-rate epsilon.
        invariance_weight: lambda, 200 in the official recipe.

    Returns:
        EMPSSLLoss(loss, tcr, invariance), each a 0-d float32 tensor. ``z_mean`` (b, d) is the mean
        over patches and is *not* detached, as in the official code.
    """
    if z.dim() != 3:
        raise ValueError(f"z must have shape (n_patches, b, d); got {tuple(z.shape)}")
    z = z.float()
    tcr = total_coding_rate(z, eps).mean()
    z_mean = z.mean(dim=0, keepdim=True)  # (1, b, d)
    invariance = F.cosine_similarity(z, z_mean, dim=-1).mean()  # mean over (n, b)
    return EMPSSLLoss(-tcr - invariance_weight * invariance, tcr, invariance)
