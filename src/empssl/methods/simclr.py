"""SimCLR (Chen, Kornblith, Norouzi, Hinton 2020, arXiv 2002.05709) with solo-learn's CIFAR recipe.

Two views per image with solo-learn's ``symmetric.yaml`` augmentation; ResNet -> projector Linear(512, 2048) + ReLU
+ Linear(2048, 256) (no BatchNorm, as solo-learn); the NT-Xent loss (:func:`empssl.losses.simclr_loss`) over the
whole step's batch, all-gathered from every rank as solo-learn does. Settings and sources: docs/RECIPE.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import MethodSettings, setting
from ..distributed import SINGLE, Dist
from ..losses import simclr_loss
from . import register
from .heads import TwoViewMethod


@dataclass(frozen=True)
class SimCLRSettings(MethodSettings):
    temperature: float = setting(0.2, "SimCLR: NT-Xent temperature", above=0)


@register("simclr", order=1)
class SimCLR(TwoViewMethod):
    Settings = SimCLRSettings
    settings: SimCLRSettings
    preset = "simclr-cifar10"
    colour = dict(flip_p=0.5, jitter_p=0.8, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, gray_p=0.2,
                  blur_p=0.5, solarize_p=0.0)  # symmetric.yaml (solo-learn 8676d223)
    projector_bn = False

    def loss(self, net: nn.Module, views: torch.Tensor, amp: torch.dtype | None,
             dist: Dist = SINGLE) -> torch.Tensor:
        # Every rank computes the loss of the whole (2, B, z_dim) batch: each view's negatives span all ranks.
        z = self.projections(net, views, amp, dist)
        return torch.stack([simclr_loss(z[0], z[1], self.settings.temperature)])
