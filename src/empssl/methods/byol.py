"""BYOL (Grill et al. 2020, arXiv 2006.07733) with solo-learn's CIFAR recipe.

Two views per image with solo-learn's ``asymmetric.yaml`` augmentation (only the second view is solarized; no blur
on CIFAR). Online network: ResNet -> projector Linear(512, 4096) + BN + ReLU + Linear(4096, 256) -> predictor
Linear(256, 4096) + BN + ReLU + Linear(4096, 256). The target network, a copy of the online backbone and
projector, is never trained by gradients: after every step it moves towards the online one by an exponential
moving average whose momentum tau follows solo-learn's cosine schedule from ``tau_base`` to ``tau_final``. Loss:
``byol_loss(p1, z2') + byol_loss(p2, z1')`` (:func:`empssl.losses.byol_loss`). Evaluated on the online backbone
feature of the whole image. Settings and sources: docs/RECIPE.md.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from ..config import ConfigError, MethodSettings, setting
from ..devices import autocast
from ..distributed import SINGLE, Dist
from ..losses import byol_loss
from ..models import ResNet
from ..patches import Augment
from . import register
from .heads import TwoViewMethod, TwoViewModel, mlp, solo_augment


def byol_tau(step: int, total_steps: int, base: float, final: float) -> float:
    """The target momentum after ``step`` of ``total_steps`` steps (BYOL Sec. 3.2, solo-learn's ``update_tau``):

        tau = final - (final - base) * (cos(pi * step / total_steps) + 1) / 2
    """
    t = min(max(step, 0), total_steps) / max(total_steps, 1)
    return final - (final - base) * (math.cos(math.pi * t) + 1) / 2


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, tau: float | torch.Tensor) -> None:
    """target <- tau * target + (1 - tau) * online, parameter by parameter, in place (BYOL Sec. 3.1).

    ``tau``: a float or a 0-d tensor on the parameters' device (no host sync). Only parameters are averaged (the
    target's BatchNorm statistics are its own, as in solo-learn); tau = 1 keeps the target bit for bit.
    """
    targets, onlines = list(target.parameters()), list(online.parameters())
    if len(targets) != len(onlines):
        raise ValueError(f"target and online networks differ: {len(targets)} and {len(onlines)} parameters")
    if not targets:
        return
    # A 0-d tensor weight keeps lerp_ on the device; torch._foreach_lerp_ would take it as a Python scalar
    # (.item(), a host sync per step). lerp_ is exact at both ends: weight 0 keeps t, weight 1 gives o.
    weight = torch.as_tensor(1 - tau).to(targets[0].device, targets[0].dtype)
    for t, o in zip(targets, onlines):
        t.lerp_(o, weight)


class BYOLModel(TwoViewModel):
    """Online backbone -> projector -> predictor, and the target backbone -> projector (no gradients). ``tau`` (a
    buffer, so checkpoints keep it) is the momentum of the next target update; the loss logs it."""

    tau: torch.Tensor

    def __init__(self, backbone: ResNet, projector: nn.Module, predictor: nn.Module, tau: float) -> None:
        super().__init__(backbone, projector)
        self.predictor = predictor
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projector = copy.deepcopy(projector)
        for p in [*self.target_backbone.parameters(), *self.target_projector.parameters()]:
            p.requires_grad_(False)
        self.register_buffer("tau", torch.tensor(float(tau)))

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """(V, b, 3, s, s) views -> (online predictions (V, b, z_dim), target projections (V, b, z_dim), tau ()),
        each view through each network on its own (BatchNorm statistics per view, as in solo-learn)."""
        p = torch.stack([self.predictor(self.projector(self.backbone(x))) for x in views.unbind(0)])
        with torch.no_grad():
            z = torch.stack([self.target_projector(self.target_backbone(x)) for x in views.unbind(0)])
        return p, z, self.tau


@dataclass(frozen=True)
class BYOLSettings(MethodSettings):
    pred_hidden_dim: int = setting(4096, "BYOL: predictor hidden width", low=1)
    tau_base: float = setting(0.99, "BYOL: target momentum at the start (cosine schedule to --tau-final)", low=0,
                              high=1)
    tau_final: float = setting(1.0, "BYOL: target momentum at the end", low=0, high=1)

    def check(self) -> None:
        if not self.tau_base <= self.tau_final:
            raise ConfigError(f"--tau-base and --tau-final must satisfy 0 <= base <= final <= 1, got "
                              f"{self.tau_base:g} {self.tau_final:g}")


@register("byol", order=3)
class BYOL(TwoViewMethod):
    Settings = BYOLSettings
    settings: BYOLSettings
    preset = "byol-cifar10"
    # asymmetric.yaml (solo-learn 24322891): the two views differ only in solarization (0 and 0.2)
    colour = dict(flip_p=0.5, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, gray_p=0.2,
                  blur_p=0.0)
    terms = ("loss", "tau")

    def build_model(self) -> BYOLModel:
        online = super().build_model()  # backbone and projector
        predictor = mlp([self.cfg.z_dim, self.settings.pred_hidden_dim, self.cfg.z_dim], batch_norm=True)
        return BYOLModel(online.backbone, online.projector, predictor, self.settings.tau_base)

    def view_augments(self) -> list[Augment]:
        return [solo_augment(self.cfg, solarize_p=s, **self.colour) for s in (0.0, 0.2)]

    def loss(self, net: nn.Module, views: torch.Tensor, amp: torch.dtype | None,
             dist: Dist = SINGLE) -> torch.Tensor:
        with autocast(views.device, amp):
            p, z, tau = net(views)  # (2, b, z_dim) each, and ()
        # Per-image terms: the mean over this rank's images, which DDP's gradient average makes the global mean.
        loss = byol_loss(p[0], z[1]) + byol_loss(p[1], z[0])
        return torch.stack([loss, tau.float()])

    def after_step(self, model: nn.Module, step: int, total_steps: int, applied: torch.Tensor) -> None:
        """Move the target towards the online network (only where ``applied``), then set the next tau."""
        s, model = self.settings, cast(BYOLModel, model)  # the model build_model made
        # solo-learn updates with the tau it computed after the previous step (tau_base before the first one)
        tau = byol_tau(step - 1, total_steps, s.tau_base, s.tau_final)
        # a skipped update (applied False) is an average with weight 0: the target stays bit for bit
        keep = torch.where(applied, tau, 1.0)
        ema_update_(model.target_backbone, model.backbone, keep)
        ema_update_(model.target_projector, model.projector, keep)
        model.tau.fill_(byol_tau(step, total_steps, s.tau_base, s.tau_final))
