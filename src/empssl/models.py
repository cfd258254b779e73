"""ResNet backbones and the EMP-SSL encoder (backbone -> 4096-d pre-feature -> projector -> unit sphere).

The backbone uses torchvision's parameter names, so a width-64 backbone's state_dict loads into
``torchvision.models.resnet18`` (``strict=True``) once the stem (3x3 ``conv1`` in the CIFAR variant) and ``fc``
are set aside.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def check_size(name: str, value: object) -> None:
    """TypeError unless ``value`` is a whole number, ValueError unless it is >= 1: a layer width (``nn.Linear(d, 0)``
    and ``nn.Conv2d(3, 0, 3)`` build without complaint and fail, or train nothing, later)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be a whole number, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            # named like torchvision's: downsample.0 = conv, downsample.1 = BN
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with BasicBlocks. ``stem="cifar"``: 3x3 stride-1 conv, no max-pool (for 32 px inputs);
    ``stem="imagenet"``: 7x7 stride-2 conv + 3x3 max-pool. ``width`` is the first stage's channels
    (64 for the standard network; smaller for the CPU demo). Output: (B, 8*width) after global pooling."""

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), width: int = 64, stem: str = "cifar") -> None:
        super().__init__()
        check_size("width", width)
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"unknown stem {stem!r}")
        cifar = stem == "cifar"
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False) if cifar else nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        inplanes = width
        for i, n in enumerate(layers):
            planes = width * 2**i
            blocks = [BasicBlock(inplanes, planes, 1 if i == 0 else 2)]
            blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_dim = inplanes
        # torchvision's init (kaiming-normal, fan-out) everywhere but the CIFAR stem: the official code swaps
        # torchvision's 7x7 conv1 for a fresh nn.Conv2d, which keeps PyTorch's default init
        # (U(+-1/sqrt(fan_in)), std 1/sqrt(3 * 27) = 0.111 for the 3x3 RGB stem).
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not (cifar and m is self.conv1):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 3, H, W) -> (B, out_dim)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


# arch -> a ResNet of that layout, called with the width
ARCHS: dict[str, Callable[..., ResNet]] = {
    "resnet18-cifar": functools.partial(ResNet, (2, 2, 2, 2), stem="cifar"),
    "resnet18-imagenet": functools.partial(ResNet, (2, 2, 2, 2), stem="imagenet"),
    "resnet34-cifar": functools.partial(ResNet, (3, 4, 6, 3), stem="cifar"),
}


def create_backbone(arch: str, width: int = 64) -> ResNet:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(sorted(ARCHS))}")
    return ARCHS[arch](width=width)


class EMPSSLModel(nn.Module):
    """The official EMP-SSL encoder.

    backbone (B, 512) -> pre_feature: Linear(512, 4096) + BN + ReLU  (the representation evaluated)
                      -> projection: Linear(4096, 4096) + BN + ReLU + Linear(4096, 1024)
                      -> L2 normalisation (z on the unit sphere).
    BatchNorm sees every patch of the step at once, as in the official code.
    """

    def __init__(self, arch: str = "resnet18-cifar", width: int = 64, hidden_dim: int = 4096, z_dim: int = 1024):
        super().__init__()
        check_size("hidden_dim", hidden_dim)
        check_size("z_dim", z_dim)
        self.backbone = create_backbone(arch, width)
        d = self.backbone.out_dim
        self.pre_feature = nn.Sequential(nn.Linear(d, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True))
        self.projection = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                        nn.ReLU(inplace=True), nn.Linear(hidden_dim, z_dim))
        self.hidden_dim, self.z_dim = hidden_dim, z_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) normalised patches -> z: (B, z_dim), unit L2 norm (float32)."""
        z = self.projection(self.pre_feature(self.backbone(x)))
        return F.normalize(z.float(), dim=-1)

    def features(self, x: torch.Tensor, kind: str = "pre") -> torch.Tensor:
        """Representation used for evaluation: ``"pre"`` -> (B, hidden_dim), ``"backbone"`` -> (B, 8*width)."""
        h = self.backbone(x)
        if kind == "backbone":
            return h
        if kind == "pre":
            return self.pre_feature(h)
        raise ValueError(f"unknown feature kind {kind!r}; use 'pre' or 'backbone'")


def inference_copy(model: nn.Module) -> nn.Module:
    """An eval-mode, gradient-free copy of ``model`` for feature extraction, each BatchNorm after a convolution of
    its ResNet ``backbone`` (and an EMP-SSL ``pre_feature``'s BatchNorm1d) folded into that layer: an affine map in
    eval mode, so the features are the same up to rounding, without 20 BatchNorm passes per forward. Modules
    without this structure are copied unchanged."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    net = copy.deepcopy(model).eval().requires_grad_(False)
    backbone = getattr(net, "backbone", None)
    if isinstance(backbone, ResNet):
        channels_last = backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        # the stem's and each block's (conv1, bn1), (conv2, bn2); a downsample Sequential's ("0", "1")
        for owner in list(backbone.modules()):
            for conv, bn in (("conv1", "bn1"), ("conv2", "bn2"), ("0", "1")):
                c, b = getattr(owner, conv, None), getattr(owner, bn, None)
                if isinstance(c, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                    fused = fuse_conv_bn_eval(c, b)
                    if channels_last:
                        fused = fused.to(memory_format=torch.channels_last)
                    setattr(owner, conv, fused)
                    setattr(owner, bn, nn.Identity())
    pre = getattr(net, "pre_feature", None)
    if isinstance(pre, nn.Sequential) and isinstance(pre[0], nn.Linear) and isinstance(pre[1], nn.BatchNorm1d):
        pre[0] = fuse_linear_bn_eval(pre[0], pre[1])
        pre[1] = nn.Identity()
    return net
