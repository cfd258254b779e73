"""What the two-view baselines (SimCLR, VICReg, BYOL) share: MLP heads, a two-view model, solo-learn's views.

Each view is forwarded on its own, as solo-learn does, so BatchNorm normalises over the b images of one view.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from .. import distributed
from ..config import Config
from ..devices import autocast
from ..distributed import SINGLE, Dist
from ..models import ResNet, check_size, create_backbone
from ..patches import Augment
from .base import Method

# solo-learn's normalisation of the views (solo/data/pretrain_dataloader.py, MEANS_N_STD). Other data (the
# bundled CIFAR-10 subset "demo", image folders) are normalised as CIFAR-10.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def mlp(dims: Sequence[int], batch_norm: bool = True) -> nn.Sequential:
    """Linear layers dims[0] -> ... -> dims[-1], with BatchNorm1d (when ``batch_norm``) and ReLU after all but the
    last: solo-learn's projectors and BYOL's predictor."""
    if len(dims) < 2:
        raise ValueError(f"an MLP needs an input and an output width, got {list(dims)}")
    for d in dims:
        check_size("an MLP width", d)
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(d_in, d_out), *([nn.BatchNorm1d(d_out)] if batch_norm else []), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Linear(dims[-2], dims[-1]))


class TwoViewModel(nn.Module):
    """backbone (B, 8*width) -> projector (B, z_dim), applied to each view separately; evaluated on the backbone
    feature (solo-learn's protocols), so it has no pre-feature."""

    def __init__(self, backbone: ResNet, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """(V, b, 3, s, s) normalised views -> (V, b, z_dim) projections, one forward pass per view."""
        return torch.stack([self.projector(self.backbone(x)) for x in views.unbind(0)])

    def features(self, x: torch.Tensor, kind: str = "backbone") -> torch.Tensor:
        """Representation used for evaluation: ``"backbone"`` -> (B, 8*width)."""
        if kind == "backbone":
            return self.backbone(x)
        if kind == "pre":
            raise ValueError("this method has no pre-feature (EMP-SSL's 4096-d layer); use --eval-feature backbone")
        raise ValueError(f"unknown feature kind {kind!r}; use 'backbone'")


def solo_augment(cfg: Config, **colour: float) -> Augment:
    """One view's augmentation: the crop from ``cfg`` (size, scale, ratio), the colour settings given, solo-learn's
    normalisation of ``cfg.data``. Every probability not given is 0 (solo-learn's YAMLs name every one)."""
    settings: dict[str, Any] = {**dict(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0), **colour}
    mean, std = (CIFAR100_MEAN, CIFAR100_STD) if cfg.data == "cifar100" else (CIFAR10_MEAN, CIFAR10_STD)
    return Augment(size=cfg.patch_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, mean=mean, std=std, **settings)


class TwoViewMethod(Method):
    """A method with two views per image (the baselines), view v made with ``view_augments()[v]``, evaluated as
    solo-learn evaluates it (the base class's default): the whole image, the backbone feature."""

    colour: ClassVar[dict[str, float]] = {}  # both views' colour settings (the method's solo-learn YAML)
    projector_layers: ClassVar[int] = 1  # hidden layers of the projector, --hidden-dim wide
    projector_bn: ClassVar[bool] = True  # BatchNorm1d after each of them

    def build_model(self) -> TwoViewModel:
        """A :class:`TwoViewModel`: the ``cfg.arch`` backbone and the projector the class attributes describe."""
        cfg = self.cfg
        backbone = create_backbone(cfg.arch, cfg.width)
        dims = [backbone.out_dim, *[cfg.hidden_dim] * self.projector_layers, cfg.z_dim]
        return TwoViewModel(backbone, mlp(dims, batch_norm=self.projector_bn))

    def view_augments(self) -> list[Augment]:
        return [solo_augment(self.cfg, **self.colour)] * 2

    def views(self, images: torch.Tensor, generator: torch.Generator, dist: Dist = SINGLE,
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """(b, 3, H, W) uint8 images -> (V, b, 3, s, s) normalised views; a rank's views are the single process's
        (:func:`empssl.distributed.rank_patches` draws each view's parameters for the whole step's batch)."""
        parts = [distributed.rank_patches(images, 1, aug, generator, dist, memory_format=memory_format)[0]
                 for aug in self.view_augments()]  # V x (b, 3, s, s)
        # cat keeps the parts' memory format, and (V*b, ...) -> (V, b, ...) is a view in either format
        return torch.cat(parts).view(len(parts), *parts[0].shape)

    def projections(self, net: nn.Module, views: torch.Tensor, amp: torch.dtype | None, dist: Dist) -> torch.Tensor:
        """(2, B, z_dim) float32 projections of the whole step's batch, all-gathered from every rank: the
        statistics that SimCLR's negatives and VICReg's variance and covariance span (as solo-learn gathers)."""
        with autocast(views.device, amp):
            z = net(views)  # (2, b, z_dim)
        return distributed.gather_batch(z.float(), dist)
