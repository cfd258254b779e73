"""EMP-SSL (Tong, Chen, Ma, LeCun 2023, arXiv 2304.03977): many fixed-size augmented patches per image, a total
coding rate term against collapse and a cosine term pulling each patch embedding to its image's mean.

The model is :class:`empssl.models.EMPSSLModel` (ResNet -> 4096-d pre-feature -> projector -> unit sphere); all
``n_patches * b`` patches of a step go through it in one batch, so BatchNorm normalises over all of them as in
the official code. Evaluated by the bag of features: the pre-feature averaged over augmented test patches.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import distributed
from ..devices import autocast
from ..distributed import SINGLE, Dist
from ..losses import emp_ssl_loss
from ..models import EMPSSLModel
from ..patches import Augment, make_patches
from .base import Method


class EMPSSL(Method):
    name = "emp-ssl"
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
        aug = Augment.from_config(self.cfg)
        if dist.enabled:  # this rank's images' patches, equal to the single process's (see distributed)
            return distributed.rank_patches(images, self.cfg.num_patches, aug, generator, dist,
                                            memory_format=memory_format)
        return make_patches(images, self.cfg.num_patches, aug, generator, memory_format=memory_format)

    def loss(self, net: nn.Module, views: torch.Tensor, amp: torch.dtype | None,
             dist: Dist = SINGLE) -> torch.Tensor:
        n, b = views.shape[:2]
        with autocast(views.device, amp):
            z = net(views.flatten(0, 1)).view(n, b, -1)  # (n_patches, b, z_dim), unit rows, float32
        if dist.enabled:  # the coding rate over the all-gathered global batch (--tcr-global)
            out = distributed.rank_loss(z, self.cfg.eps, self.cfg.invariance_weight, dist, self.cfg.tcr_global)
        else:
            out = emp_ssl_loss(z, self.cfg.eps, self.cfg.invariance_weight)
        return torch.stack(list(out))  # (loss, tcr, invariance)
