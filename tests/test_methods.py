"""Every registered method as a plug-in (views, model, loss terms, a few LARS steps, state dict; parametrised over
the registry, so a new method is tested without editing a list), the baselines' solo-learn recipes, BYOL's target,
the gathered losses on two ranks, and a toy method registered from this file alone and trained through train()."""

import math
import multiprocessing as mp
import os
import socket
import traceback
from dataclasses import dataclass

import pytest
import torch

from empssl.config import Config, MethodSettings, method_recipe, setting
from empssl.distributed import Dist
from empssl.losses import byol_loss, emp_ssl_loss, simclr_loss, vicreg_loss
from empssl.methods import method_class, method_names, register
from empssl.methods.base import Method
from empssl.methods.byol import byol_tau, ema_update_
from empssl.methods.heads import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, TwoViewMethod, TwoViewModel, mlp
from empssl.methods.simclr import SimCLR
from empssl.optim import LARS, lars_param_groups

METHODS = method_names()
TWO_VIEW = [m for m in METHODS if issubclass(method_class(m), TwoViewMethod)]
B = 8  # images per step


def tiny_cfg(name: str, **kw) -> Config:
    """The method's own recipe (its preset) at toy size: width-4 ResNet, 32-d heads, 8 px views, 4 patches."""
    recipe = Config.from_dict({**method_recipe(name), "method": name})
    if "pred_hidden_dim" in recipe.method_settings:
        kw = {"pred_hidden_dim": 32, **kw}
    return recipe.replace(width=4, hidden_dim=32, z_dim=16, patch_size=8, num_patches=4, device="cpu", **kw)


def tiny(name: str, **kw) -> tuple[Method, torch.nn.Module]:
    torch.manual_seed(0)
    method = method_class(name)(tiny_cfg(name, **kw))
    return method, method.build_model()


def images(b: int = B, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def views_of(method: Method, seed: int = 0, b: int = B) -> torch.Tensor:
    return method.views(images(b), torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", METHODS)
def test_registered_class_states_its_name_preset_protocol_and_terms(name):
    cls = method_class(name)
    assert cls.name == name == tiny_cfg(name).method
    assert cls.eval_view in ("patches", "full") and cls.eval_feature in ("pre", "backbone")
    assert cls.terms[0] == "loss" and len(set(cls.terms)) == len(cls.terms)
    assert issubclass(cls.Settings, MethodSettings)


@pytest.mark.parametrize("name", METHODS)
def test_views_shape_dtype_and_determinism(name):
    method, _ = tiny(name)
    v = views_of(method, seed=1)
    assert v.shape == (method.views_per_image, B, 3, 8, 8) and v.dtype == torch.float32
    torch.testing.assert_close(v, views_of(method, seed=1), rtol=0, atol=0)
    assert not torch.equal(v, views_of(method, seed=2))
    assert not torch.equal(v[0], v[1])  # independent draws of the same images


def test_view_augments_follow_solo_learn():
    simclr, vicreg, byol = (method_class(n)(tiny_cfg(n)) for n in ("simclr", "vicreg", "byol"))
    for method in (simclr, vicreg, byol):
        augs = method.view_augments()
        assert len(augs) == 2
        assert all(a.size == 8 and a.mean == CIFAR10_MEAN and a.std == CIFAR10_STD for a in augs)
        assert all(a.ratio == pytest.approx((0.75, 4 / 3)) and a.flip_p == 0.5 and a.gray_p == 0.2 for a in augs)
    s = simclr.view_augments()
    assert s[0] == s[1] and s[0].scale == (0.08, 1.0) and s[0].blur_p == 0.5 and s[0].brightness == 0.8
    v = vicreg.view_augments()
    assert v[0] == v[1] and v[0].scale == (0.2, 1.0) and v[0].solarize_p == 0.1 and v[0].blur_p == 0.0
    b = byol.view_augments()
    assert (b[0].solarize_p, b[1].solarize_p) == (0.0, 0.2) and b[0].blur_p == b[1].blur_p == 0.0
    assert SimCLR(tiny_cfg("simclr", data="cifar100")).view_augments()[0].mean == CIFAR100_MEAN


def test_views_keep_the_requested_memory_format():
    method, _ = tiny("simclr")
    v = method.views(images(), torch.Generator().manual_seed(0), memory_format=torch.channels_last)
    assert v[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(v, views_of(method), rtol=0, atol=0)


def test_mlp_shapes_and_batch_norm():
    head = mlp([12, 32, 32, 16], batch_norm=True)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [type(m).__name__ for m in mlp([12, 32, 16], batch_norm=False)] == ["Linear", "ReLU", "Linear"]
    assert head(torch.randn(5, 12)).shape == (5, 16)


@pytest.mark.parametrize("name", METHODS)
def test_model_features(name):
    method, model = tiny(name)
    x = views_of(method)[0]  # (B, 3, 8, 8)
    assert model.features(x, "backbone").shape == (B, 32)  # 8 * width
    feature = model.features(x, method.eval_feature)
    assert feature.shape[0] == B and torch.isfinite(feature).all()


@pytest.mark.parametrize("name", TWO_VIEW)
def test_two_view_model_forward_shapes(name):
    method, model = tiny(name)
    v = views_of(method)
    out = model(v)
    if name == "byol":
        p, z, tau = out
        assert p.shape == z.shape == (2, B, 16) and tau.shape == () and tau.item() == pytest.approx(0.99)
        assert not z.requires_grad
    else:
        assert out.shape == (2, B, 16)
    with pytest.raises(ValueError, match="no pre-feature"):
        model.features(v[0], "pre")


def test_model_shapes_follow_solo_learn():
    _, simclr = tiny("simclr")
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in simclr.projector.modules())
    _, vicreg = tiny("vicreg")
    assert sum(isinstance(m, torch.nn.Linear) for m in vicreg.projector) == 3
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in vicreg.projector) == 2
    _, byol = tiny("byol")
    assert [m.out_features for m in byol.projector if isinstance(m, torch.nn.Linear)] == [32, 16]
    assert [m.out_features for m in byol.predictor if isinstance(m, torch.nn.Linear)] == [32, 16]


@pytest.mark.parametrize("name", TWO_VIEW)
def test_each_view_is_forwarded_on_its_own(name):
    # BatchNorm statistics per view (solo-learn forwards each crop separately): view v of a two-view forward
    # equals a forward of view v alone, and differs from normalising both views together.
    method, model = tiny(name)
    v = views_of(method)
    out = model(v)
    first = out[0] if name != "byol" else out[0][0]
    alone = model(v[:1])
    alone = alone[0] if name != "byol" else alone[0][0]
    torch.testing.assert_close(first, alone)
    joint = model(v.reshape(1, 2 * B, *v.shape[2:]))
    joint = joint[0, :B] if name != "byol" else joint[0][0, :B]
    assert not torch.allclose(first, joint, atol=1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_loss_terms_are_finite_float32(name):
    method, model = tiny(name)
    terms = method.loss(model, views_of(method), None)
    assert terms.shape == (len(method.terms),) and terms.dtype == torch.float32
    assert torch.isfinite(terms).all()


# A method's row here: its loss terms from its model's output, written with the loss functions of empssl.losses.
REFERENCE = {
    "emp-ssl": lambda out, s: torch.stack(list(emp_ssl_loss(out.view(4, B, -1), s.eps, s.invariance_weight))),
    "simclr": lambda out, s: torch.stack([simclr_loss(out[0], out[1], s.temperature)]),
    "vicreg": lambda out, s: torch.stack(list(vicreg_loss(out[0], out[1], s.sim_weight, s.var_weight,
                                                          s.cov_weight))),
    "byol": lambda out, s: torch.stack([byol_loss(out[0][0], out[1][1]) + byol_loss(out[0][1], out[1][0]),
                                        out[2]]),
}


@pytest.mark.parametrize("name", REFERENCE)
def test_loss_terms_match_the_loss_functions(name):
    method, model = tiny(name)
    v = views_of(method)
    out = model(v.flatten(0, 1)) if name == "emp-ssl" else model(v)  # EMP-SSL: all patches in one batch
    torch.testing.assert_close(method.loss(model, v, None), REFERENCE[name](out, method.settings))


@pytest.mark.parametrize("name", METHODS)
def test_loss_under_bf16_autocast_is_float32(name):
    method, model = tiny(name)
    terms = method.loss(model, views_of(method), torch.bfloat16)
    assert terms.dtype == torch.float32 and torch.isfinite(terms).all()


@pytest.mark.parametrize("name", METHODS)
def test_a_few_lars_steps_reduce_the_loss(name):
    method, model = tiny(name)
    v = views_of(method, seed=2, b=16)  # the same views every step
    cfg = method.cfg
    opt = LARS(lars_param_groups(model), lr=0.2, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
               eta=cfg.lars_eta, nesterov=cfg.nesterov)
    model.train()
    losses = []
    for step in range(10):
        terms = method.loss(model, v, None)
        opt.zero_grad(set_to_none=True)
        terms[0].backward()
        opt.step()
        method.after_step(model, step + 1, 10, torch.tensor(True))
        losses.append(terms[0].item())
    assert all(math.isfinite(x) for x in losses)
    # a toy network on 16 images is noisy step to step: compare the mean of the last three with the first (the
    # margin in absolute value: EMP-SSL's loss is negative)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05 * abs(losses[0]), losses


# --- BYOL's target network ----------------------------------------------------------------------------------


def test_byol_target_starts_as_the_online_copy_and_is_not_trained():
    _, model = tiny("byol")
    for online, target in ((model.backbone, model.target_backbone), (model.projector, model.target_projector)):
        for po, pt in zip(online.parameters(), target.parameters()):
            assert torch.equal(po, pt) and po is not pt
            assert not pt.requires_grad
    trained = {id(p) for group in lars_param_groups(model) for p in group["params"]}
    assert trained.isdisjoint(id(p) for p in model.target_backbone.parameters())
    assert trained.issuperset(id(p) for p in model.predictor.parameters())


def _pair(seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    return mlp([5, 7, 3]), mlp([5, 7, 3])


@pytest.mark.parametrize("tau", [0.0, 1.0, 0.3, torch.tensor(0.75)])
def test_ema_update_is_a_lerp(tau):
    target, online = _pair(0)
    before = [p.clone() for p in target.parameters()]
    ema_update_(target, online, tau)
    t = float(tau)
    for b, o, new in zip(before, online.parameters(), target.parameters()):
        if t == 1.0:
            assert torch.equal(new, b)
        elif t == 0.0:
            assert torch.equal(new, o)
        else:
            torch.testing.assert_close(new, t * b + (1 - t) * o)


def test_ema_update_rejects_different_networks():
    with pytest.raises(ValueError, match="differ"):
        ema_update_(mlp([5, 7, 3]), mlp([5, 3]), 0.5)


def test_byol_tau_schedule():
    assert byol_tau(0, 100, 0.99, 1.0) == pytest.approx(0.99)
    assert byol_tau(100, 100, 0.99, 1.0) == pytest.approx(1.0)
    assert byol_tau(50, 100, 0.99, 1.0) == pytest.approx(0.995)
    assert byol_tau(25, 100, 0.9, 1.0) == pytest.approx(1.0 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)
    taus = [byol_tau(s, 10, 0.9, 1.0) for s in range(11)]
    assert taus == sorted(taus)
    assert byol_tau(120, 100, 0.99, 1.0) == pytest.approx(1.0)  # clamped past the end


def _perturb_online(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in [*model.backbone.parameters(), *model.projector.parameters()]:
            p.add_(0.1)


def test_byol_after_step_moves_the_target_only_when_applied():
    method, model = tiny("byol", tau_base=0.9)
    _perturb_online(model)
    target_before = [p.clone() for p in model.target_backbone.parameters()]
    online = [p.clone() for p in model.backbone.parameters()]

    method.after_step(model, 1, 10, torch.tensor(False))  # a skipped update
    assert all(torch.equal(p, b) for p, b in zip(model.target_backbone.parameters(), target_before))
    assert model.tau.item() == pytest.approx(byol_tau(1, 10, 0.9, 1.0))

    method.after_step(model, 1, 10, torch.tensor(True))  # the first step's update uses tau_base
    for p, b, o in zip(model.target_backbone.parameters(), target_before, online):
        torch.testing.assert_close(p, 0.9 * b + 0.1 * o)
    assert model.tau.item() == pytest.approx(byol_tau(1, 10, 0.9, 1.0))

    method.after_step(model, 10, 10, torch.tensor(True))  # the last update: tau of step 9
    assert model.tau.item() == pytest.approx(1.0)


def test_byol_loss_logs_the_tau_of_the_coming_update():
    method, model = tiny("byol", tau_base=0.9)
    method.after_step(model, 3, 10, torch.tensor(True))
    terms = method.loss(model, views_of(method), None)
    assert terms[1].item() == pytest.approx(byol_tau(3, 10, 0.9, 1.0))


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip(name):
    method, model = tiny(name)
    opt = LARS(lars_param_groups(model), lr=0.1, momentum=0.9)
    v = views_of(method)
    method.loss(model, v, None)[0].backward()
    opt.step()
    method.after_step(model, 1, 10, torch.tensor(True))
    state = model.state_dict()
    fresh = method_class(name)(method.cfg).build_model()
    fresh.load_state_dict(state, strict=True)
    if name == "byol":
        assert "tau" in state and any(k.startswith("target_backbone.") for k in state)
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.features(v[0], "backbone"), model.features(v[0], "backbone"), rtol=0, atol=0)
        torch.testing.assert_close(method.loss(fresh, v, None), method.loss(model, v, None), rtol=0, atol=0)


def test_two_view_model_rejects_unknown_feature_kind():
    _, model = tiny("simclr")
    assert isinstance(model, TwoViewModel)
    with pytest.raises(ValueError, match="unknown feature kind"):
        model.features(torch.randn(2, 3, 8, 8), "projector")


# --- two ranks: the gathered losses equal the single-process loss of the global batch --------------------------


class PixelNet(torch.nn.Module):
    """A BatchNorm-free per-view embedding, so that per-rank and single-process forwards agree exactly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3 * 8 * 8, 16)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.lin(views.flatten(2))  # (V, b, 16)


def _rank_main(rank: int, port: int, name: str, views: torch.Tensor, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
        method, net = method_class(name)(tiny_cfg(name)), PixelNet()
        b = views.shape[1] // 2
        terms = method.loss(net, views[:, rank * b:(rank + 1) * b], None, Dist(rank, 2, rank))
        terms[0].backward()
        grad = net.lin.weight.grad
        torch.distributed.all_reduce(grad)  # what DDP does: the mean of the ranks' gradients
        # as numpy arrays, pickled by value: a torch tensor would travel as a shared file descriptor, which is gone
        # once this process has exited
        queue.put((rank, terms.detach().numpy(), (grad / 2).numpy()))
        torch.distributed.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        queue.put((rank, None, None))


# the losses over the gathered batch (EMP-SSL's: tests/test_distributed.py)
@pytest.mark.parametrize("name", ["simclr", "vicreg"])
def test_two_ranks_gather_to_the_single_process_loss_and_gradient(name):
    method = method_class(name)(tiny_cfg(name))
    views = views_of(method, b=8)
    net = PixelNet()
    want = method.loss(net, views, None)
    want[0].backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, port, name, views, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = {r: (t, g) for r, t, g in (queue.get(timeout=600) for _ in procs)}  # a ceiling against a hang
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank in range(2):
        terms, grad = results[rank]
        assert terms is not None, f"rank {rank} failed"
        torch.testing.assert_close(torch.from_numpy(terms), want.detach())
        torch.testing.assert_close(torch.from_numpy(grad), net.lin.weight.grad)


# --- a method from outside the package: registered here, trained through train() -------------------------------


@pytest.fixture
def registry(monkeypatch):
    """The method registry, restored after the test (the toy method must not leak into other tests)."""
    from empssl import registry

    monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))
    monkeypatch.setattr(registry, "_ORDER", dict(registry._ORDER))
    return registry


def define_toy_method():
    """A toy method as a user would write one: its settings, views of two sizes, a model, a loss, the gradient
    hook. Defined in a function so that registering it is part of the test."""
    from torch import nn

    from empssl.models import create_backbone
    from empssl.patches import Augment, make_patches

    @dataclass(frozen=True)
    class ToySettings(MethodSettings):
        toy_spread_weight: float = setting(0.5, "toy: weight of the spread term", low=0)

    class ToyModel(nn.Module):
        def __init__(self, arch: str, width: int, z_dim: int) -> None:
            super().__init__()
            self.backbone = create_backbone(arch, width)
            self.head = nn.Linear(self.backbone.out_dim, z_dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

        def features(self, x: torch.Tensor, kind: str = "backbone") -> torch.Tensor:
            return self.backbone(x)

    @register("toy")
    class Toy(Method):
        Settings = ToySettings
        terms = ("loss", "agreement", "spread")
        hook_calls = 0

        def build_model(self) -> nn.Module:
            return ToyModel(self.cfg.arch, self.cfg.width, self.cfg.z_dim)

        def view_augments(self) -> list[Augment]:
            return [Augment.from_config(self.cfg)] * 2

        def views(self, images, generator, dist=None, memory_format=torch.contiguous_format):
            # two sizes: one view of patch_size px, one of half that (multi-crop style)
            big = make_patches(images, 1, self.view_augments()[0], generator, memory_format=memory_format)
            small_aug = Augment.from_config(self.cfg.replace(patch_size=self.cfg.patch_size // 2))
            small = make_patches(images, 1, small_aug, generator, memory_format=memory_format)
            return [big, small]  # (1, b, 3, s, s), (1, b, 3, s/2, s/2)

        def loss(self, net, views, amp, dist=None):
            z1, z2 = (torch.nn.functional.normalize(net(v[0]), dim=-1) for v in views)
            agreement = (z1 * z2).sum(-1).mean()
            spread = (z1 @ z1.T).pow(2).mean()
            return torch.stack([-agreement + self.settings.toy_spread_weight * spread, agreement, spread])

        def before_optimizer_step(self, model: nn.Module) -> None:
            assert any(p.grad is not None for p in model.parameters())  # after backward, before the step
            type(self).hook_calls += 1

    return Toy


def test_a_method_registered_from_a_test_file_trains_through_train(registry, tmp_path, data_dir):
    from empssl.cli import build_parser
    from empssl.train import train

    toy = define_toy_method()
    assert "toy" in method_names() and method_class("toy") is toy and toy.name == "toy"
    # its setting is a flag of `empssl train`, with its help, and a config key
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    assert "--toy-spread-weight" in train_parser.format_help() and "spread term" in train_parser.format_help()
    cfg = Config.from_dict({"method": "toy", "toy_spread_weight": 0.25, "data": "demo", "data_dir": str(data_dir),
                            "device": "cpu", "width": 4, "hidden_dim": 32, "z_dim": 16, "patch_size": 8,
                            "train_subset": 40, "test_subset": 20, "batch_size": 20, "epochs": 1,
                            "test_patches": 2, "probe_epochs": 2}).validate()
    with pytest.raises(Exception, match="--toy-spread-weight must be >= 0"):
        cfg.replace(toy_spread_weight=-1.0).validate()
    results = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert results["method"] == "toy" and results["steps"] == 2 and toy.hook_calls == 2
    assert (results["eval_view"], results["feature"]) == ("full", "backbone")  # the base class's protocol
    assert math.isfinite(results["linear_top1"]) and math.isfinite(results["knn_top1"])
    import json

    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert saved["method"] == "toy" and saved["toy_spread_weight"] == 0.25


def test_a_name_is_registered_once(registry):
    define_toy_method()
    with pytest.raises(ValueError, match="registered twice"):
        register("toy")(type("Other", (Method,), {}))
    with pytest.raises(ValueError, match="registered twice"):
        register("simclr")(type("Other", (Method,), {}))


def test_the_readme_walkthrough_method_registers_and_trains(registry, monkeypatch, tmp_path, data_dir):
    """The method README.md's "Adding a method" writes, run as a module of its own: registered, its flag in
    `empssl train --help`, two steps of train() and the evaluation."""
    import json
    import sys
    import types
    from pathlib import Path

    from empssl.cli import build_parser
    from empssl.train import train

    section = (Path(__file__).parents[1] / "README.md").read_text().split("\n## Adding a method\n", 1)[1]
    code = section.split("\n## ", 1)[0].split("```python\n", 1)[1].split("```", 1)[0]
    module = types.ModuleType("barlow_twins_from_readme")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, "README.md", "exec"), module.__dict__)

    cls = method_class("barlow-twins")
    assert cls is module.BarlowTwins and cls.terms == ("loss", "on_diag", "off_diag")
    assert "--lambda-offdiag" in build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    cfg = Config.from_dict({"method": "barlow-twins", "lambda_offdiag": 0.01, "data": "demo", "device": "cpu",
                            "data_dir": str(data_dir), "width": 4, "hidden_dim": 32, "z_dim": 16, "patch_size": 8,
                            "train_subset": 40, "test_subset": 20, "batch_size": 20, "test_patches": 2,
                            "probe_epochs": 2}).validate()
    results = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert results["method"] == "barlow-twins" and results["steps"] == 2
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("off_diag" in json.dumps(m) for m in metrics)
