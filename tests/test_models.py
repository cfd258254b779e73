"""Shapes, normalisation and torchvision compatibility of the encoder."""

import pytest
import torch
import torchvision

from empssl.models import ARCHS, EMPSSLModel, create_backbone


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_arch_forward_shapes(arch):
    torch.manual_seed(0)
    model = EMPSSLModel(arch, width=8, hidden_dim=32, z_dim=16)
    size = 64 if "imagenet" in arch else 16
    x = torch.randn(6, 3, size, size)
    z = model(x)
    assert z.shape == (6, 16) and torch.isfinite(z).all()
    torch.testing.assert_close(z.norm(dim=1), torch.ones(6))
    assert model.features(x, "pre").shape == (6, 32)
    assert model.features(x, "backbone").shape == (6, 64)
    with pytest.raises(ValueError):
        model.features(x, "nope")


def test_official_dimensions():
    model = EMPSSLModel()
    assert model.backbone.out_dim == 512 and model.hidden_dim == 4096 and model.z_dim == 1024
    assert model.backbone.conv1.kernel_size == (3, 3) and model.backbone.conv1.stride == (1, 1)
    assert isinstance(model.backbone.maxpool, torch.nn.Identity)


def test_backbone_keys_are_torchvision_resnet18_keys():
    ours = set(create_backbone("resnet18-cifar").state_dict())
    theirs = set(torchvision.models.resnet18(weights=None).state_dict())
    assert ours == {k for k in theirs if not k.startswith("fc.")}


def test_stem_init_is_the_official_one():
    """CIFAR: the official code's fresh nn.Conv2d stem (default init, U(+-1/sqrt(27)), std 0.111); ImageNet:
    torchvision's kaiming-normal fan-out (std sqrt(2 / (64 * 49)) = 0.0252); the other convs kaiming fan-out."""
    torch.manual_seed(0)
    cifar = create_backbone("resnet18-cifar")
    w = cifar.conv1.weight
    assert abs(w.std().item() - 1 / 27**0.5 / 3**0.5) < 0.005  # 0.111, not kaiming fan-out's 0.059
    assert w.abs().max() <= 1 / 27**0.5
    imagenet = create_backbone("resnet18-imagenet").conv1.weight
    assert abs(imagenet.std().item() - (2 / (64 * 49)) ** 0.5) < 0.001
    inner = cifar.layer1[0].conv1.weight  # 64 -> 64, 3x3: std sqrt(2 / (64 * 9)) = 0.0589
    assert abs(inner.std().item() - (2 / (64 * 9)) ** 0.5) < 0.002


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown architecture"):
        create_backbone("vgg")


@pytest.mark.parametrize("arch", ["resnet18-cifar", "resnet18-imagenet"])
def test_inference_copy_folds_batchnorm_and_keeps_the_features(arch):
    from empssl.models import inference_copy

    torch.manual_seed(0)
    model = EMPSSLModel(arch, width=8, hidden_dim=32, z_dim=16)
    model.train()
    for _ in range(3):  # non-trivial running statistics
        model(torch.randn(16, 3, 32, 32) * 2 + 0.5)
    model.eval()
    x = torch.randn(6, 3, 32, 32)
    net = inference_copy(model)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.backbone.modules())
    assert not isinstance(net.pre_feature[1], torch.nn.BatchNorm1d)
    with torch.no_grad():
        for kind in ("pre", "backbone"):
            torch.testing.assert_close(net.features(x, kind), model.features(x, kind), rtol=1e-5, atol=1e-5)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the model itself is untouched
    assert not any(p.requires_grad for p in net.parameters())
