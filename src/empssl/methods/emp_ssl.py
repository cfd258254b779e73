"""EMP-SSL (Tong, Chen, Ma, LeCun 2023, arXiv 2304.03977): many fixed-size augmented patches per image, a total
coding rate term against collapse and a cosine term pulling each patch embedding to its image's mean.

The model is :class:`empssl.models.EMPSSLModel` (ResNet -> 4096-d pre-feature -> projector -> unit sphere); all
``n_patches * b`` patches of a step go through it in one batch, so BatchNorm normalises over all of them as in
the official code. Evaluated by the bag of features: the pre-feature averaged over augmented test patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..config import MethodSettings, setting
from ..devices import autocast
from ..distributed import SINGLE, Dist, gather_batch
from ..losses import EMPSSLLoss, emp_ssl_loss, total_coding_rate
from ..models import EMPSSLModel
from ..patches import Augment
from . import register
from .base import Method


@dataclass(frozen=True)
class EMPSSLSettings(MethodSettings):
    eps: float = setting(0.2, "EMP-SSL: coding-rate distortion epsilon", above=0)
    invariance_weight: float = setting(200.0, "EMP-SSL: weight of the cosine invariance term (lambda)", low=0)


def rank_loss(z: torch.Tensor, eps: float, invariance_weight: float, d: Dist, tcr_global: bool) -> EMPSSLLoss:
    """The EMP-SSL loss (paper Eq. 3) of this rank's projections z (n_patches, b, d), unit rows.

    ``tcr_global``: the coding rate R(Z_i) over the all-gathered (n_patches, world*b, d) batch, the same on
    every rank; else over the local b images. The invariance term is always the local mean (DDP's gradient
    average turns it into the global mean, all ranks having b images). One process: :func:`emp_ssl_loss`.
    Why the coding rate is global by default: :mod:`empssl.distributed`.
    """
    if not (d.enabled and tcr_global):
        return emp_ssl_loss(z, eps, invariance_weight)
    z = z.float()
    tcr = total_coding_rate(gather_batch(z, d), eps).mean()
    invariance = F.cosine_similarity(z, z.mean(dim=0, keepdim=True), dim=-1).mean()
    return EMPSSLLoss(-tcr - invariance_weight * invariance, tcr, invariance)


@register("emp-ssl", order=0)
class EMPSSL(Method):
    Settings = EMPSSLSettings
    settings: EMPSSLSettings
    eval_view = "patches"
    eval_feature = "pre"
    terms = ("loss", "tcr", "invariance")

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        return EMPSSLModel(cfg.arch, cfg.width, cfg.hidden_dim, cfg.z_dim)

    def view_augments(self) -> list[Augment]:
        return [Augment.from_config(self.cfg)] * self.cfg.num_patches

    def views(self, images: torch.Tensor, generator: torch.Generator, dist: Dist = SINGLE,
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        # (n_patches, b, 3, s, s), patch-major like the official code's concatenation
        # under torchrun: this rank's images' patches, equal to the single process's (see distributed)
        return distributed.rank_patches(images, self.cfg.num_patches, Augment.from_config(self.cfg), generator, dist,
                                        memory_format=memory_format)

    def loss(self, net: nn.Module, views: torch.Tensor, amp: torch.dtype | None,
             dist: Dist = SINGLE) -> torch.Tensor:
        n, b = views.shape[:2]
        with autocast(views.device, amp):
            z = net(views.flatten(0, 1)).view(n, b, -1)  # (n_patches, b, z_dim), unit rows, float32
        # under torchrun, the coding rate over the all-gathered global batch (--tcr-global)
        out = rank_loss(z, self.settings.eps, self.settings.invariance_weight, dist, self.cfg.tcr_global)
        return torch.stack(list(out))  # (loss, tcr, invariance)
