"""VICReg (Bardes, Ponce, LeCun 2022, arXiv 2105.04906) with solo-learn's CIFAR recipe.

Two views per image with the augmentation of solo-learn's ``vicreg.yaml`` (not symmetric.yaml: crops of 20-100 %
of the image, solarization, no blur); ResNet -> projector Linear(512, 2048) + BN + ReLU + Linear(2048, 2048) + BN
+ ReLU + Linear(2048, 2048); :func:`empssl.losses.vicreg_loss` over the whole step's batch, all-gathered from every
rank. Settings and sources: docs/RECIPE.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import MethodSettings, setting
from ..distributed import SINGLE, Dist
from ..losses import vicreg_loss
from . import register
from .heads import TwoViewMethod


@dataclass(frozen=True)
class VICRegSettings(MethodSettings):
    sim_weight: float = setting(25.0, "VICReg: invariance coefficient", low=0)
    var_weight: float = setting(25.0, "VICReg: variance coefficient", low=0)
    cov_weight: float = setting(1.0, "VICReg: covariance coefficient", low=0)


@register("vicreg", order=2)
class VICReg(TwoViewMethod):
    Settings = VICRegSettings
    settings: VICRegSettings
    preset = "vicreg-cifar10"
    colour = dict(flip_p=0.5, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, gray_p=0.2,
                  blur_p=0.0, solarize_p=0.1)  # vicreg.yaml (solo-learn e74719b9)
    terms = ("loss", "invariance", "variance", "covariance")
    projector_layers = 2

    def loss(self, net: nn.Module, views: torch.Tensor, amp: torch.dtype | None,
             dist: Dist = SINGLE) -> torch.Tensor:
        s = self.settings
        # Variance and covariance are statistics of the whole (2, B, z_dim) batch (solo-learn and the official
        # code gather for them). The invariance term is a mean over images, so computing it on the gathered
        # batch too gives the same value and, through DDP's gradient average, the same gradient as solo-learn's
        # per-rank mean.
        z = self.projections(net, views, amp, dist)
        out = vicreg_loss(z[0], z[1], s.sim_weight, s.var_weight, s.cov_weight)
        return torch.stack(list(out))  # (loss, invariance, variance, covariance)
