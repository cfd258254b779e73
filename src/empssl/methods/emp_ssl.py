"""EMP-SSL (Tong, Chen, Ma, LeCun 2023, arXiv 2304.03977): many fixed-size augmented patches per image, a total
coding rate term against collapse and a cosine term pulling each patch embedding to its image's mean.

Model: :class:`empssl.models.EMPSSLModel`. All ``n_patches * b`` patches of a step go through it in one batch, so
BatchNorm normalises over all of them, as the official code on one GPU. Evaluated by the bag of features: the
pre-feature averaged over augmented test patches.

``--patch-chunks K`` (:meth:`EMPSSL.gradients`) bounds a step's memory (200 x 224 px patches is 20,000 patches a
step) by making and consuming the patches in K groups of n_patches / K per image. The loss couples all patches,
so each group runs forward twice (gradient caching): first without gradients, for every projection z of the
step, then the loss and dL/dz over all of them; then group by group forward again and backward from its rows of
dL/dz, which accumulates exactly the whole step's gradient. The groups' patches are cut from parameters drawn
once for the step, so they are the unchunked step's patches. What differs: BatchNorm normalises each group by its
own statistics, and the running statistics take the first group's, as the official code's ``nn.DataParallel``
does on K GPUs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .. import distributed
from ..config import MethodSettings, setting
from ..devices import autocast
from ..distributed import SINGLE, Dist, gather_batch
from ..losses import EMPSSLTerms, emp_ssl_loss
from ..models import EMPSSLModel
from ..patches import Augment, apply_params, take_patches
from ..recompute import keep_batchnorm_stats
from . import register
from .base import Method


@dataclass(frozen=True)
class EMPSSLSettings(MethodSettings):
    eps: float = setting(0.2, "EMP-SSL: coding-rate distortion epsilon", above=0)
    invariance_weight: float = setting(200.0, "EMP-SSL: weight of the cosine invariance term (lambda)", low=0)


def rank_loss(z: torch.Tensor, eps: float, invariance_weight: float, d: Dist, tcr_global: bool) -> EMPSSLTerms:
    """The EMP-SSL loss (paper Eq. 3) of this rank's projections z (n_patches, b, d), unit rows.

    ``tcr_global``: the coding rate R(Z_i) over the all-gathered (n_patches, world*b, d) batch (why:
    :mod:`empssl.distributed`); else over the local b images. The invariance term is the local mean, which DDP's
    gradient average turns into the global one. One process: :func:`emp_ssl_loss`.
    """
    gathered = gather_batch(z.float(), d) if d.enabled and tcr_global else None
    return emp_ssl_loss(z, eps, invariance_weight, tcr_over=gathered)


@register("emp-ssl", order=0)
class EMPSSL(Method):
    Settings = EMPSSLSettings
    settings: EMPSSLSettings
    eval_view = "patches"
    eval_feature = "pre"
    terms = ("loss", "tcr", "invariance")
    chunked = True

    def build_model(self) -> nn.Module:
        return EMPSSLModel(self.cfg.arch, self.cfg.width, self.cfg.hidden_dim, self.cfg.z_dim)

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
        out = rank_loss(z, self.settings.eps, self.settings.invariance_weight, dist, self.cfg.tcr_global)
        return torch.stack(list(out))  # (loss, tcr, invariance)

    def gradients(self, net: nn.Module, images: torch.Tensor, generator: torch.Generator, amp: torch.dtype | None,
                  memory_format: torch.memory_format, dist: Dist = SINGLE) -> torch.Tensor:
        """The base class's, or with ``--patch-chunks`` in groups (the module docstring says how and what it equals).

        Peak memory: one group's patches and activations, plus the step's (n_patches, b, z_dim) float32 projections
        and their gradient. Under torchrun only the last group's backward all-reduces (the others ``no_sync``).
        """
        if self.cfg.patch_chunks == 1:
            return super().gradients(net, images, generator, amp, memory_format, dist)
        cfg = self.cfg
        k_groups = cfg.patch_chunks
        per_group = cfg.num_patches // k_groups
        b = images.shape[0]
        aug = Augment.from_config(cfg)
        params = distributed.rank_patch_params(images, cfg.num_patches, aug, generator, dist)

        def project(k: int) -> torch.Tensor:  # group k: patches k*c .. (k+1)*c of every image -> (c, b, z_dim)
            group = take_patches(params, k * per_group * b, (k + 1) * per_group * b)
            patches = apply_params(images, group, aug, per_group, memory_format=memory_format)
            with autocast(images.device, amp):
                return net(patches.flatten(0, 1)).view(per_group, b, -1)

        with torch.no_grad():  # every projection of the step; the running statistics take the first group's
            zs = [project(0)]
            with keep_batchnorm_stats(net):
                zs += [project(k) for k in range(1, k_groups)]
        z = torch.cat(zs).float().requires_grad_(True)
        out = rank_loss(z, self.settings.eps, self.settings.invariance_weight, dist, cfg.tcr_global)
        terms = torch.stack(list(out))
        (dz,) = torch.autograd.grad(terms[0], z)
        with keep_batchnorm_stats(net):  # the second forward of each group leaves the running statistics as they are
            for k in range(k_groups):
                # DDP's no_sync (a compiled module forwards it) for every group but the last; nothing without DDP
                last = k == k_groups - 1
                with contextlib.nullcontext() if last else getattr(net, "no_sync", contextlib.nullcontext)():
                    zk = project(k)
                    zk.backward(dz[k * per_group:(k + 1) * per_group].to(zk.dtype))
        return terms.detach()
