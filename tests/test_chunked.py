"""Activation checkpointing of the backbone: the memory-saving path must train exactly like the plain one."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from empssl.checkpoint import read_checkpoint
from empssl.config import Config, ConfigError
from empssl.losses import emp_ssl_loss
from empssl.models import BasicBlock, EMPSSLModel
from empssl.recompute import activation_bytes_per_patch, recompute_backbone, want_recompute
from empssl.train import train


def twin_models() -> tuple[EMPSSLModel, EMPSSLModel]:
    torch.manual_seed(0)
    plain = EMPSSLModel(width=8, hidden_dim=64, z_dim=32)
    other = EMPSSLModel(width=8, hidden_dim=64, z_dim=32)
    other.load_state_dict(plain.state_dict())
    return plain, other


def step_loss(model: EMPSSLModel, patches: torch.Tensor, n: int) -> torch.Tensor:
    loss = emp_ssl_loss(model(patches).view(n, patches.shape[0] // n, -1)).loss
    loss.backward()
    return loss.detach()


def test_checkpointed_step_equals_plain_step():
    plain, ckpt = twin_models()
    assert recompute_backbone(ckpt) == 8  # the 8 residual blocks of a ResNet-18
    assert recompute_backbone(ckpt) == 0  # idempotent
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    patches = torch.randn(4 * 6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(step_loss(plain, patches, 4), step_loss(ckpt, patches, 4))
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-7, msg=name)
    # BatchNorm running statistics updated once, as by the plain step (not again by the recomputation)
    a, b = plain.state_dict(), ckpt.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert int(b["backbone.layer1.0.bn1.num_batches_tracked"]) == 1


def test_plain_torch_checkpoint_would_update_batchnorm_twice():
    """The control for the test above: without restoring them, the recomputation moves the statistics again."""
    plain, naive = twin_models()
    for block in naive.backbone.modules():
        if isinstance(block, BasicBlock):
            forward = block.forward
            block.forward = lambda x, f=forward: checkpoint(f, x, use_reentrant=False)
    patches = torch.randn(4 * 6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    step_loss(plain, patches, 4)
    step_loss(naive, patches, 4)
    assert int(naive.state_dict()["backbone.layer1.0.bn1.num_batches_tracked"]) == 2
    assert not torch.equal(plain.state_dict()["backbone.layer1.0.bn1.running_mean"],
                           naive.state_dict()["backbone.layer1.0.bn1.running_mean"])


def test_checkpointing_saves_activation_memory_and_leaves_eval_alone():
    plain, ckpt = twin_models()
    recompute_backbone(ckpt)
    cpu = torch.device("cpu")
    full, kept = (activation_bytes_per_patch(m, 16, cpu) for m in (plain, ckpt))
    assert 0 < kept < 0.5 * full, (kept, full)
    x = torch.randn(8, 3, 16, 16)
    plain.eval()
    ckpt.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), ckpt(x))


def test_choice_of_checkpointing():
    model = EMPSSLModel(width=4, hidden_dim=32, z_dim=16)
    cpu = torch.device("cpu")
    assert want_recompute("on", model, 100, 8, cpu, None, False)[0]
    assert not want_recompute("off", model, 100, 8, cpu, None, False)[0]
    use, why = want_recompute("auto", model, 10**9, 8, cpu, None, False)
    assert not use and "CPU" in why
    with pytest.raises(ConfigError, match="grad-checkpointing"):
        Config(grad_checkpointing="yes").validate()


def test_training_with_checkpointing_gives_the_same_run(tmp_path, data_dir, demo_data):
    def run(mode: str) -> dict:
        cfg = Config(data="demo", data_dir=str(data_dir), width=4, hidden_dim=32, z_dim=16, patch_size=8,
                     num_patches=4, batch_size=20, train_subset=60, device="cpu", grad_checkpointing=mode)
        logs: list[str] = []
        train(cfg, tmp_path / mode, progress=False, log=logs.append, data=demo_data, evaluate_at_end=False)
        assert any("activation checkpointing" in line for line in logs) == (mode == "on")
        return read_checkpoint(tmp_path / mode)

    off, on = run("off"), run("on")
    for k, v in off["model"].items():
        torch.testing.assert_close(v, on["model"][k], rtol=0, atol=1e-6, msg=k)
