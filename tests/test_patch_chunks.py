"""--patch-chunks: a step's patches made and consumed in groups (empssl.methods.emp_ssl.EMPSSL.gradients).

What it must equal: the loss over all of the step's patches, with BatchNorm per group as the official code's
nn.DataParallel has it on K GPUs (each GPU normalises its contiguous piece of the patch-major batch; the
module keeps the first replica's running statistics). The reference below builds that by hand: every group
through the model in one autograd graph, one backward from the loss of their concatenation.
"""

from __future__ import annotations

import copy

import pytest
import torch

from empssl import distributed
from empssl.checkpoint import read_checkpoint
from empssl.cli import main
from empssl.config import Config, ConfigError
from empssl.distributed import SINGLE
from empssl.methods import create_method
from empssl.methods.emp_ssl import rank_loss
from empssl.optim import LARS
from empssl.patches import Augment, apply_params, make_patches, take_patches
from empssl.recompute import check_step_fits, recompute_backbone
from empssl.train import train, train_step

from .test_distributed import assert_same_update, initial_state, interrupt_after, run_ranks, train_module
from .test_distributed import tiny_cfg as dist_cfg


def small_cfg(**kw) -> Config:
    base = dict(num_patches=8, patch_chunks=4, batch_size=6, width=8, hidden_dim=64, z_dim=16, device="cpu")
    return Config(**{**base, **kw}).validate()


def images(b: int = 6, side: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def dataparallel_reference(model, cfg: Config, x: torch.Tensor, seed: int) -> torch.Tensor:
    """The step's loss terms and gradients (into ``model``) as DataParallel on ``cfg.patch_chunks`` devices gives
    them: each group normalised by its own statistics, one graph, the running statistics of group 0."""
    patches = make_patches(x, cfg.num_patches, Augment.from_config(cfg), torch.Generator().manual_seed(seed))
    c, b = cfg.num_patches // cfg.patch_chunks, x.shape[0]
    z = [model(patches[:c].flatten(0, 1)).view(c, b, -1)]
    after_first = [t.clone() for t in model.buffers()]
    z += [model(patches[k * c:(k + 1) * c].flatten(0, 1)).view(c, b, -1) for k in range(1, cfg.patch_chunks)]
    terms = torch.stack(list(rank_loss(torch.cat(z), 0.2, 200.0, SINGLE, True)))  # EMP-SSL's eps and lambda
    terms[0].backward()
    with torch.no_grad():
        for t, v in zip(model.buffers(), after_first):
            t.copy_(v)
    return terms.detach()


def assert_same_gradients(model, ref) -> None:
    """Every parameter's gradient within 1e-5 of the reference's (by norm), up to rounding noise: the sums over
    the patches are taken in another order (per group, and by BLAS blocks that depend on the batch and threads),
    which moves each weight's gradient by ~1e-6 of the largest; the biases before a BatchNorm, whose gradient is
    exactly zero, hold only that noise."""
    scale = max(float(q.grad.abs().max()) for q in ref.parameters())
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert float((p.grad - q.grad).norm()) <= 1e-5 * float(q.grad.norm()) + 1e-6 * scale, name


def chunked(model, cfg: Config, x: torch.Tensor, seed: int) -> torch.Tensor:
    method = create_method(cfg)
    return method.gradients(model, x, torch.Generator().manual_seed(seed), None, torch.contiguous_format)


@pytest.mark.parametrize("scale, side", [((0.25, 0.25), 32), ((0.08, 1.0), 64)])
def test_groups_cut_exactly_the_patches_of_the_whole_step(scale, side):
    """Both crop paths (a crop never larger than the patch: grid_sample; larger: the resize matrices)."""
    cfg = small_cfg(crop_scale=scale, patch_size=16, crop_ratio=(0.75, 4 / 3))
    aug, x = Augment.from_config(cfg), images(side=side)
    whole = make_patches(x, 8, aug, torch.Generator().manual_seed(3))
    params = distributed.rank_patch_params(x, 8, aug, torch.Generator().manual_seed(3), SINGLE)
    groups = [apply_params(x, take_patches(params, k * 2 * 6, (k + 1) * 2 * 6), aug, 2) for k in range(4)]
    assert torch.equal(torch.cat(groups), whole)


@pytest.mark.parametrize("k_groups", [2, 4])
def test_chunked_gradients_are_dataparallels_on_that_many_devices(k_groups):
    cfg = small_cfg(patch_chunks=k_groups)
    torch.manual_seed(0)
    model = create_method(cfg).build_model()
    ref = copy.deepcopy(model)
    x = images()
    terms = chunked(model, cfg, x, seed=1)
    ref_terms = dataparallel_reference(ref, cfg, x, seed=1)
    torch.testing.assert_close(terms, ref_terms, rtol=1e-6, atol=1e-5)
    assert_same_gradients(model, ref)
    for (name, t), u in zip(model.named_buffers(), ref.buffers()):  # the running statistics: group 0's update
        assert torch.equal(t, u), name


def test_groups_differ_from_one_batch_only_through_batchnorm():
    """The grouped gradient is the whole step's gradient where BatchNorm does not look at the batch (running
    statistics, eval mode); in train mode the groups' statistics move it (which is why the reference is
    DataParallel's)."""
    x = images()
    for train_mode in (False, True):
        torch.manual_seed(0)
        plain = create_method(small_cfg(patch_chunks=1)).build_model().train(train_mode)
        grouped = copy.deepcopy(plain)
        plain_terms = chunked(plain, small_cfg(patch_chunks=1), x, seed=1)
        grouped_terms = chunked(grouped, small_cfg(patch_chunks=4), x, seed=1)
        if train_mode:
            assert not torch.allclose(plain_terms, grouped_terms, rtol=1e-3)
            continue
        torch.testing.assert_close(grouped_terms, plain_terms, rtol=1e-6, atol=1e-5)
        assert_same_gradients(grouped, plain)


def test_chunked_gradients_with_activation_recomputation():
    cfg = small_cfg(patch_chunks=2)
    torch.manual_seed(0)
    model = create_method(cfg).build_model()
    ref = copy.deepcopy(model)
    assert recompute_backbone(model) > 0
    x = images()
    torch.testing.assert_close(chunked(model, cfg, x, seed=2), dataparallel_reference(ref, cfg, x, seed=2),
                               rtol=1e-6, atol=1e-5)
    assert_same_gradients(model, ref)
    for t, u in zip(model.buffers(), ref.buffers()):
        assert torch.equal(t, u)


def test_train_step_draws_the_generator_as_the_plain_step():
    """A chunked step consumes the views' generator as the plain one does: a run's later steps (and a resumed
    run) see the same patches whatever --patch-chunks is."""
    x = images()
    states = []
    for k in (1, 4):
        cfg = small_cfg(patch_chunks=k)
        method = create_method(cfg)
        torch.manual_seed(0)
        model = method.build_model()
        opt = LARS(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(5)
        terms, applied = train_step(model, opt, method, x, g, None, torch.contiguous_format)
        assert bool(applied) and torch.isfinite(terms).all()
        states.append(g.get_state())
    assert torch.equal(*states)


def test_a_chunked_run_interrupted_and_resumed_ends_bitwise_equal(tmp_path, data_dir, demo_data):
    cfg = dist_cfg(data_dir, patch_chunks=2, epochs=1)
    ref, split = tmp_path / "ref", tmp_path / "split"
    train(cfg, ref, progress=False, log=lambda s: None, data=demo_data, evaluate_at_end=False)
    real_step = train_module.train_step
    interrupt_after(2)
    try:
        with pytest.raises(KeyboardInterrupt, match="interrupted at step 2"):
            train(cfg, split, progress=False, log=lambda s: None, data=demo_data, evaluate_at_end=False)
    finally:
        train_module.train_step = real_step
    assert read_checkpoint(split)["step"] == 2
    train(cfg, split, progress=False, log=lambda s: None, data=demo_data, evaluate_at_end=False)
    a, b = read_checkpoint(ref), read_checkpoint(split)
    assert a["step"] == b["step"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_two_ranks_with_sync_bn_make_the_single_process_chunked_update(tmp_path, data_dir, demo_data):
    """Two ranks, each its 10 images' patches in 2 groups (synchronised BatchNorm: group k over both ranks), one
    step: the update of one process on the 20 images in 2 groups."""
    cfg = dist_cfg(data_dir, tcr_global=True, sync_bn=True, patch_chunks=2, epochs=0.25)
    single = tmp_path / "single"
    train(cfg, single, progress=False, log=lambda s: None, data=demo_data, evaluate_at_end=False)
    two = tmp_path / "two"
    run_ranks(cfg, two, demo_data)
    a, b = read_checkpoint(single), read_checkpoint(two)
    assert a["step"] == b["step"] == 1 and b["world_size"] == 2
    assert_same_update(initial_state(cfg), a["model"], b["model"], rel=1e-4)


def test_bad_values_are_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="must divide --num-patches"):
        small_cfg(num_patches=20, patch_chunks=3)
    with pytest.raises(ConfigError, match="simclr does not take it"):
        create_method(Config(method="simclr", patch_chunks=2).validate())
    for flags in (["--patch-chunks", "3"], ["--patch-chunks", "0"], ["--method", "vicreg", "--patch-chunks", "2"]):
        assert main(["train", "--data", "demo", "--out", str(tmp_path / "run"), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("empssl: error:") and "--patch-chunks" in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_step_too_big_for_memory_is_told_how_many_groups_fit(monkeypatch):
    from empssl import recompute
    cfg = Config(data="demo", width=8, patch_size=32, num_patches=20, batch_size=100, device="cpu").validate()
    whole = recompute.step_memory(create_method(cfg).build_model(), 2000, 32, torch.device("cpu"), None, False,
                                  with_weights=True)
    # room for a bit more than a quarter of the step's patches and activations
    room = int(whole.model + 0.3 * (whole.total - whole.model))
    monkeypatch.setattr(recompute, "available_bytes", lambda device: room)
    with pytest.raises(ConfigError, match=r"--patch-chunks 4$"):
        check_step_fits(cfg, torch.device("cpu"))
    check_step_fits(cfg.replace(patch_chunks=4), torch.device("cpu"))  # fits: not refused
    with pytest.raises(ConfigError, match=r"one group of 1000 patches \(--patch-chunks 2\)"):
        check_step_fits(cfg.replace(patch_chunks=2), torch.device("cpu"))


def test_the_200_patch_imagenet_preset_fits_one_gpu_in_its_groups():
    """imagenet100-200patches: 20,000 patches of 224 px. In one group the estimate is beyond any GPU; in the
    preset's 10 groups it is a fraction of an 80 GB H100 (activations measured on the CPU at 32 and 64 px with
    bf16 autocast and extrapolated, as the run's own start-up check does)."""
    from empssl.config import load_preset
    from empssl.recompute import step_memory
    cfg = Config.from_dict(load_preset("imagenet100-200patches")).validate()
    assert cfg.num_patches == 200 and cfg.patch_chunks == 10
    model = create_method(cfg).build_model()
    whole, group = (step_memory(model, cfg.num_patches * cfg.batch_size // k, cfg.patch_size, torch.device("cpu"),
                                torch.bfloat16, False, with_weights=True).total for k in (1, cfg.patch_chunks))
    assert whole > 141 * 2**30 and group < 40 * 2**30
