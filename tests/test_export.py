"""empssl.export: the backbone as a torchvision or timm state dict (strict load, same outputs) or as safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from empssl import __version__
from empssl.checkpoint import CheckpointError
from empssl.cli import main
from empssl.export import ExportError, export_backbone, load_backbone, timm_backbone, torchvision_backbone
from empssl.models import create_backbone
from empssl.rundir import load_checkpoint

from .test_embed import make_checkpoint


def _assert_same_features(net: nn.Module, run: Path) -> None:
    """``net`` (plain torchvision or timm, holding the export of ``run``) computes the empssl backbone's features."""
    model, _, _ = load_checkpoint(run)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.backbone.eval()(x)
        got = net.eval()(x)
    assert got.shape == (2, 512)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18-cifar", "resnet18-imagenet"])
def test_torchvision_export_loads_strictly_and_computes_the_same(tmp_path: Path, arch: str) -> None:
    run = make_checkpoint(tmp_path / "run", arch=arch, width=64, hidden_dim=16, z_dim=8)
    out = export_backbone(run, tmp_path / "backbone.pt")
    assert out == tmp_path / "backbone.pt"
    # the README's lines: plain torchvision, nothing from empssl
    net = torchvision.models.resnet18()
    if arch == "resnet18-cifar":
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    net.fc = nn.Identity()
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    _assert_same_features(net, run)


def test_torchvision_backbone_matches_every_arch_keys_and_shapes() -> None:
    for arch in ("resnet18-cifar", "resnet18-imagenet", "resnet34-cifar"):
        ours = create_backbone(arch, 64).state_dict()
        theirs = torchvision_backbone(arch).state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}, arch


@pytest.mark.parametrize("arch", ["resnet18-cifar", "resnet18-imagenet"])
def test_timm_export_loads_strictly_and_computes_the_same(tmp_path: Path, arch: str) -> None:
    timm = pytest.importorskip("timm")
    run = make_checkpoint(tmp_path / "run", arch=arch, width=64, hidden_dim=16, z_dim=8)
    out = tmp_path / "backbone.pt"
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--format", "timm"]) == 0
    # the README's lines: plain timm, nothing from empssl
    net = timm.create_model("resnet18", num_classes=0)
    if arch == "resnet18-cifar":
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    _assert_same_features(net, run)


def test_timm_backbone_matches_every_arch_keys_and_shapes() -> None:
    pytest.importorskip("timm")
    for arch in ("resnet18-cifar", "resnet18-imagenet", "resnet34-cifar"):
        ours = create_backbone(arch, 64).state_dict()
        theirs = timm_backbone(arch).state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}, arch


def test_safetensors_round_trip(tmp_path: Path) -> None:
    from safetensors import safe_open

    run = make_checkpoint(tmp_path / "run", step=42)  # width 4: safetensors takes any width
    out = export_backbone(run, tmp_path / "exports" / "backbone.safetensors", fmt="safetensors")
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["arch"] == "resnet18-cifar" and meta["width"] == "4" and meta["step"] == "42"
    assert meta["empssl_version"] == __version__ and meta["method"] == "emp-ssl"
    model, _, _ = load_checkpoint(run)
    assert keys == set(model.backbone.state_dict())
    backbone, meta2 = load_backbone(out)
    assert meta2 == meta
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(backbone.state_dict()[k], v), k
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(backbone(x), model.backbone.eval()(x))


def test_width_other_than_64_is_refused_for_torchvision(tmp_path: Path) -> None:
    run = make_checkpoint(tmp_path / "run")  # width 4
    with pytest.raises(ExportError) as e:
        export_backbone(run, tmp_path / "b.pt")
    msg = str(e.value)
    assert "width 4" in msg and "--format safetensors" in msg and "\n" not in msg
    assert not (tmp_path / "b.pt").exists()
    with pytest.raises(ExportError, match="timm's resnet18 has width 64, this backbone has width 4"):
        export_backbone(run, tmp_path / "b.pt", fmt="timm")


def test_user_errors(tmp_path: Path) -> None:
    run = make_checkpoint(tmp_path / "run")
    with pytest.raises(ExportError, match="--format"):
        export_backbone(run, tmp_path / "b.onnx", fmt="onnx")
    with pytest.raises(CheckpointError, match="not found"):
        export_backbone(tmp_path / "nowhere", tmp_path / "b.safetensors", fmt="safetensors")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ExportError, match="cannot write"):
        export_backbone(run, tmp_path / "file" / "b.safetensors", fmt="safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ExportError, match="not an empssl backbone"):
        load_backbone(tmp_path / "other.safetensors")
