"""Export a trained backbone for use without empssl: a torchvision or timm ResNet state dict, or safetensors.

The backbone (:class:`empssl.models.ResNet`) uses torchvision's (and timm's) parameter names, so its state dict
loads with ``strict=True`` into their resnet18/resnet34 once the network has the same stem and no classifier
(:func:`torchvision_backbone`, :func:`timm_backbone`). Only width 64 matches them; other widths export as safetensors.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .files import OutputError, write_atomic
from .models import ResNet, create_backbone
from .rundir import load_checkpoint
from .version import __version__

FORMATS = ("torchvision", "timm", "safetensors")
# arch -> (torchvision and timm model name, CIFAR stem?)
_TORCHVISION = {"resnet18-cifar": ("resnet18", True), "resnet18-imagenet": ("resnet18", False),
                "resnet34-cifar": ("resnet34", True)}


def _write(out: str | Path, write: Callable[[Path], None]) -> Path:
    try:
        return write_atomic(out, write)
    except OutputError as e:
        raise ExportError(str(e)) from None


class ExportError(Exception):
    """A user mistake in an export (unknown format, a width torchvision has no network for, bad output path)."""


def torchvision_backbone(arch: str) -> nn.Module:
    """The torchvision resnet18/34 (``fc = Identity``, the CIFAR stem where ``arch`` has it) that an exported
    ``arch`` backbone loads into with ``strict=True``; its forward gives the (B, 512) backbone feature."""
    import torchvision

    net = _stock(arch, "torchvision", lambda name: getattr(torchvision.models, name)(weights=None))
    net.fc = nn.Identity()
    return net


def timm_backbone(arch: str) -> nn.Module:
    """As :func:`torchvision_backbone` for a ``--format timm`` export: ``timm.create_model("resnet18" or
    "resnet34", num_classes=0)`` with the CIFAR stem where ``arch`` has it. Needs timm (``pip install timm``)."""
    import timm

    return _stock(arch, "timm", lambda name: timm.create_model(name, pretrained=False, num_classes=0))


def _stock(arch: str, library: str, build: Callable[[str], nn.Module]) -> nn.Module:
    """``build(name)``'s ResNet of ``arch``, with the CIFAR stem (3x3 stride-1 conv1, no max-pool) where it has it."""
    if arch not in _TORCHVISION:
        raise ExportError(f"no {library} network for --arch {arch}; choose from {', '.join(_TORCHVISION)}")
    name, cifar_stem = _TORCHVISION[arch]
    net = build(name)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    return net


def export_backbone(checkpoint: str | Path, out: str | Path, fmt: str = "torchvision") -> Path:
    """Write the backbone of ``checkpoint`` (a run folder or checkpoint file) to ``out``; return ``out``.

    ``fmt``: ``torchvision`` / ``timm``: a ``torch.save``d state dict that loads into :func:`torchvision_backbone` /
    :func:`timm_backbone` with ``strict=True`` (width 64 only); ``safetensors``: the same state dict, with arch,
    width, method, step and the empssl version in its metadata (any width; :func:`load_backbone` rebuilds it).
    Raises ExportError (unknown format, a width torchvision has no network for, an unwritable ``out``) or
    CheckpointError.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    model, cfg, ckpt = load_checkpoint(checkpoint)
    backbone = model.backbone
    assert isinstance(backbone, ResNet), type(backbone)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    if fmt in ("torchvision", "timm"):  # the same parameter names in both libraries
        if cfg.width != 64:
            raise ExportError(f"{fmt}'s {_TORCHVISION.get(cfg.arch, ('resnet',))[0]} has width 64, this "
                              f"backbone has width {cfg.width}; use --format safetensors")
        if cfg.arch not in _TORCHVISION:
            raise ExportError(f"no {fmt} network for --arch {cfg.arch}; use --format safetensors")
        return _write(out, lambda tmp: torch.save(state, tmp))
    meta = {"format": "empssl-backbone", "arch": cfg.arch, "width": str(cfg.width), "method": cfg.method,
            "step": str(ckpt.get("step", "")), "empssl_version": __version__,
            "out_dim": str(backbone.out_dim)}
    return _write(out, lambda tmp: save_file(state, str(tmp), metadata=meta))


def load_backbone(path: str | Path) -> tuple[ResNet, dict[str, Any]]:
    """Rebuild an empssl backbone from a safetensors export (strict load); returns (backbone in eval mode,
    metadata)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        state = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise ExportError(f"cannot read {path}: {' '.join(str(e).split())}") from None
    if meta.get("format") != "empssl-backbone":
        raise ExportError(f"{path} is not an empssl backbone export (no format=empssl-backbone metadata)")
    backbone = create_backbone(meta["arch"], int(meta["width"]))
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{path} does not match {meta['arch']} width {meta['width']}: "
                          f"{str(e).splitlines()[0]}") from None
    return backbone.eval(), meta
