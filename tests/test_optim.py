"""LARS against the per-parameter reference and the official LARSWrapper logic; skipping non-finite steps on the
device; the warm-up + cosine schedule against its formula."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from empssl.optim import LARS, lars_param_groups, lr_at


class ReferenceLARS(torch.optim.Optimizer):
    """The per-parameter LARS that empssl.optim.LARS replaced, kept as the reference (same state layout)."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=1e-4, eta=0.005, nesterov=True, clip=True):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, nesterov=nesterov,
                        clip=clip, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "LARS does not support closures"
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["lars"]:
                    p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = group["eta"] * p_norm / (g_norm + p_norm * wd + 1e-8)
                    if group["clip"]:
                        trust = torch.clamp(trust / lr, max=1.0) if lr > 0 else torch.ones_like(trust)
                    g = torch.where((p_norm > 0) & (g_norm > 0), (g + wd * p) * trust, g)
                if mom > 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        buf = state["momentum_buffer"] = g.clone()
                    else:
                        buf = state["momentum_buffer"].mul_(mom).add_(g)
                    g = g.add(buf, alpha=mom) if group["nesterov"] else buf
                p.add_(g, alpha=-lr)
        return None


class OfficialLARSWrapper:
    """The official code's wrapper (solo-learn style), reproduced from its source for the comparison."""

    def __init__(self, optimizer, eta=0.005, clip=True, eps=1e-8, exclude_bias_n_norm=True):
        self.optim, self.eta, self.clip, self.eps, self.exclude = optimizer, eta, clip, eps, exclude_bias_n_norm

    @torch.no_grad()
    def step(self):
        decays = []
        for group in self.optim.param_groups:
            wd = group.get("weight_decay", 0)
            decays.append(wd)
            group["weight_decay"] = 0
            for p in group["params"]:
                if p.grad is not None and (p.ndim != 1 or not self.exclude):
                    p_norm, g_norm = torch.norm(p.data), torch.norm(p.grad.data)
                    if p_norm != 0 and g_norm != 0:
                        lars_lr = p_norm / (g_norm + p_norm * wd + self.eps) * self.eta
                        if self.clip:
                            lars_lr = min(lars_lr / group["lr"], 1)
                        p.grad.data += wd * p.data
                        p.grad.data *= lars_lr
        self.optim.step()
        for group, wd in zip(self.optim.param_groups, decays):
            group["weight_decay"] = wd


def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("lr", [0.3, 1e-4])  # large lr: trust ratio unclipped; tiny lr: clipped to 1
def test_lars_matches_official_wrapper(lr):
    a, b = small_net(0), small_net(0)
    ours = LARS(lars_param_groups(a), lr=lr, momentum=0.9, weight_decay=1e-4, eta=0.005)
    sgd = torch.optim.SGD(b.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4, nesterov=True)
    ref = OfficialLARSWrapper(sgd, eta=0.005, clip=True, exclude_bias_n_norm=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(32, 8, generator=gen)
        for net, opt in ((a, ours), (b, sgd)):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
        ours.step()
        ref.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)


# --- the multi-tensor LARS against the per-parameter reference -------------------------------------------


class Problem(nn.Module):
    """Parameters covering LARS's special cases: a weight that starts at zero, a weight whose gradient is always
    zero (it enters the loss times 0), a weight that never gets a gradient, a channels_last conv weight, and
    1-d parameters in the plain group."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(16, 8, generator=g) * 0.3)
        self.b1 = nn.Parameter(torch.randn(16, generator=g) * 0.1)
        self.w_zero = nn.Parameter(torch.zeros(4, 16))
        self.w_dead = nn.Parameter(torch.randn(3, 3, generator=g))
        self.w_none = nn.Parameter(torch.randn(2, 2, generator=g))
        conv = torch.randn(4, 2, 3, 3, generator=g) * 0.2
        self.conv = nn.Parameter(conv.contiguous(memory_format=torch.channels_last))
        self.scale = nn.Parameter(torch.ones(4))

    def groups(self) -> list[dict]:
        return [{"params": [self.w1, self.w_zero, self.w_dead, self.w_none, self.conv], "lars": True},
                {"params": [self.b1, self.scale], "lars": False}]

    def loss(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 8)
        h = torch.tanh(x @ self.w1.t() + self.b1)  # (N, 16)
        y = h @ self.w_zero.t()  # (N, 4)
        img = h.view(-1, 2, 2, 4)[:, :, :, :3].repeat(1, 1, 2, 2)  # (N, 2, 4, 6)
        c = torch.nn.functional.conv2d(img, self.conv).mean((2, 3)) * self.scale  # (N, 4)
        return (y - 0.5).pow(2).mean() + c.pow(2).mean() + 0 * self.w_dead.sum()


def run(opt_cls, seed: int, steps: int, lr: float, start: Problem | None = None, opt_state: dict | None = None,
        data_seed: int = 1, **kw) -> tuple[Problem, torch.optim.Optimizer]:
    net = copy.deepcopy(start) if start is not None else Problem(seed)
    opt = opt_cls(net.groups(), lr=lr, **kw)
    if opt_state is not None:
        opt.load_state_dict(copy.deepcopy(opt_state))  # load_state_dict may share the tensors it is given
    gen = torch.Generator().manual_seed(data_seed)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=gen)
        opt.zero_grad(set_to_none=True)
        net.loss(x).backward()
        opt.step()
    return net, opt


def assert_same(net_a: Problem, opt_a: torch.optim.Optimizer, net_b: Problem, opt_b: torch.optim.Optimizer,
                tol: float = 1e-6) -> None:
    for (name, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=tol, atol=tol, msg=name)
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert sa.keys() == sb.keys(), name
        if "momentum_buffer" in sa:
            torch.testing.assert_close(sa["momentum_buffer"], sb["momentum_buffer"], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("lr", [0.5, 1e-4])  # trust ratios mostly unclipped / all clipped to 1
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_lars_matches_reference(nesterov: bool, lr: float, clip: bool, momentum: float) -> None:
    kw = dict(momentum=momentum, weight_decay=1e-3, eta=0.02, nesterov=nesterov, clip=clip)
    a, opt_a = run(LARS, 0, 6, lr, **kw)
    b, opt_b = run(ReferenceLARS, 0, 6, lr, **kw)
    assert_same(a, opt_a, b, opt_b)
    assert not torch.equal(a.w1, Problem(0).w1)  # the steps did move the weights
    assert torch.equal(a.w_none, Problem(0).w_none) and a.w_none not in opt_a.state  # no gradient: skipped
    assert torch.equal(a.w_dead, Problem(0).w_dead)  # zero gradient: neither scaled nor decayed
    assert a.conv.is_contiguous(memory_format=torch.channels_last)


def test_lars_trust_ratio_cases_are_exercised() -> None:
    """The reference test above covers clipped and unclipped ratios and the zero-weight case."""
    net = Problem(0)
    net.loss(torch.randn(32, 8, generator=torch.Generator().manual_seed(1))).backward()
    eta, wd = 0.02, 1e-3
    for lr, clipped in ((0.5, False), (1e-4, True)):
        p, g = net.w1, net.w1.grad
        trust = eta * p.norm() / (g.norm() + wd * p.norm() + 1e-8) / lr
        assert (trust > 1) == clipped
    assert net.w_zero.norm() == 0 and net.w_zero.grad.norm() > 0
    assert net.w_dead.grad.norm() == 0 and net.w_none.grad is None


def test_grads_with_another_layout_than_their_parameter() -> None:
    """A contiguous gradient of a channels_last weight is read by element, not by memory order."""
    results = []
    for opt_cls in (LARS, ReferenceLARS):
        net = Problem(0)
        opt = opt_cls(net.groups(), lr=0.5)
        for step in range(3):
            opt.zero_grad(set_to_none=True)
            net.loss(torch.randn(32, 8, generator=torch.Generator().manual_seed(step))).backward()
            net.conv.grad = net.conv.grad.contiguous()
            assert not net.conv.grad.is_contiguous(memory_format=torch.channels_last)
            opt.step()
        results.append((net, opt))
    assert_same(*results[0], *results[1])


class OpLog(TorchDispatchMode):
    """Records the aten ops run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def ops_of_second_step(n_layers: int) -> list[str]:
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(8, 8) for _ in range(n_layers)])
    opt = LARS(lars_param_groups(net), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(4, 8)).pow(2).mean().backward()
        with OpLog() as log:
            opt.step(finite=torch.tensor(True))
    return log.ops


def test_step_is_a_fixed_set_of_multi_tensor_ops_without_host_reads() -> None:
    few, many = ops_of_second_step(2), ops_of_second_step(12)
    assert few == many  # the op count does not grow with the number of parameters
    assert "_fused_sgd_.default" in many and "_foreach_norm.Scalar" in many
    # .item(), bool(tensor) and .tolist() go through these: each one would wait for the GPU
    assert not {"_local_scalar_dense.default", "is_nonzero.default", "equal.default"} & set(many)


# --- skipping a non-finite step on the device -----------------------------------------------------------


def snapshot(net: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {name: p.detach().clone() for name, p in net.named_parameters()}
    out.update({f"buf.{name}": opt.state[p]["momentum_buffer"].clone() for name, p in net.named_parameters()
                if "momentum_buffer" in opt.state.get(p, {})})
    return out


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def backward(net: Problem, seed: int, poison: str | None = None) -> None:
    net.zero_grad(set_to_none=True)
    net.loss(torch.randn(32, 8, generator=torch.Generator().manual_seed(seed))).backward()
    if poison is not None:
        net.w1.grad[3, 2] = float(poison)  # one bad element in one gradient


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "finite=False"])
@pytest.mark.parametrize("bad_at", [0, 2])  # the first step (buffers not yet created) or a later one
def test_nonfinite_step_is_skipped_and_leaves_no_trace(bad: str, bad_at: int) -> None:
    net, ref = Problem(0), Problem(0)
    opt, opt_ref = LARS(net.groups(), lr=0.5), LARS(ref.groups(), lr=0.5)
    for step in range(5):
        if step == bad_at:
            backward(net, 100, None if bad == "finite=False" else bad)
            finite = torch.tensor(bad != "finite=False")
            before = snapshot(net, opt)
            applied = opt.step(finite=finite)
            assert applied.dtype == torch.bool and applied.shape == () and not applied
            after = snapshot(net, opt)
            # Unchanged; at the first step the buffers are created as zeros (a first step's 0 * m + g = g).
            zero_bufs = {k: v for k, v in after.items() if k.startswith("buf.") and k not in before}
            assert all(not v.any() for v in zero_bufs.values())
            assert_bitwise_equal(before, {k: v for k, v in after.items() if k not in zero_bufs})
        # The reference run never sees the bad step.
        for n, o in ((net, opt), (ref, opt_ref)):
            backward(n, step)
            assert o.step(finite=torch.tensor(True))
    after_net, after_ref = snapshot(net, opt), snapshot(ref, opt_ref)
    assert_bitwise_equal(after_net, after_ref)


def test_returned_flag_follows_the_loss_and_the_gradients() -> None:
    net = Problem(0)
    opt = LARS(net.groups(), lr=0.5)
    backward(net, 0)
    assert opt.step().item() is True
    assert opt.step(finite=torch.tensor(True)).item() is True
    backward(net, 0, poison="nan")
    assert opt.step().item() is False
    net.b1.grad[0] = float("inf")  # the plain (non-LARS) group counts too
    net.w1.grad[3, 2] = 0.0
    assert opt.step().item() is False


# --- checkpoints ----------------------------------------------------------------------------------------


def test_lars_state_dict_roundtrip():
    net = small_net(0)
    opt = LARS(lars_param_groups(net), lr=0.1)
    net(torch.randn(4, 8)).sum().backward()
    opt.step()
    opt2 = LARS(lars_param_groups(net), lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    assert len(opt2.state) == len(opt.state)


def test_checkpoint_of_the_per_parameter_lars_resumes_identically() -> None:
    """A checkpoint written by the previous (per-parameter) LARS loads into this one and continues as it
    would have, and the other way round."""
    kw = dict(momentum=0.9, weight_decay=1e-3, eta=0.02)
    mid, opt_mid = run(ReferenceLARS, 0, 3, 0.5, **kw)
    state = copy.deepcopy(opt_mid.state_dict())
    ours, opt_ours = run(LARS, 0, 3, 0.5, start=mid, opt_state=state, data_seed=7, **kw)
    ref, opt_ref = run(ReferenceLARS, 0, 3, 0.5, start=mid, opt_state=state, data_seed=7, **kw)
    assert_same(ours, opt_ours, ref, opt_ref)
    back, opt_back = run(ReferenceLARS, 0, 2, 0.5, start=ours, opt_state=opt_ours.state_dict(), data_seed=8, **kw)
    fwd, opt_fwd = run(LARS, 0, 2, 0.5, start=ours, opt_state=opt_ours.state_dict(), data_seed=8, **kw)
    assert_same(back, opt_back, fwd, opt_fwd)


def test_param_groups_exclude_biases_and_norms():
    groups = lars_param_groups(small_net(0))
    assert all(p.ndim > 1 for p in groups[0]["params"]) and groups[0]["lars"]
    assert all(p.ndim == 1 for p in groups[1]["params"]) and not groups[1]["lars"]


# --- schedule -------------------------------------------------------------------------------------------


def cosine_lr(step: int, total: int, base: float, final: float = 0.0) -> float:
    """The official CosineAnnealingLR(T_max=total) stepped per optimisation step, written out."""
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * (min(step, total) / max(total, 1))))


def test_cosine_schedule():
    assert lr_at(0, 100, 0.3) == pytest.approx(0.3)
    assert lr_at(50, 100, 0.3) == pytest.approx(0.15)
    assert lr_at(100, 100, 0.3) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(25, 100, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    lrs = [lr_at(s, 10, 1.0) for s in range(11)]
    assert lrs == sorted(lrs, reverse=True)


def warmup_cosine_formula(step: int, total: int, base: float, warmup: int, start: float, end: float) -> float:
    """pl_bolts' LinearWarmupCosineAnnealingLR._get_closed_form_lr, written out (warmup >= 2)."""
    if step < warmup:
        return start + step * (base - start) / (warmup - 1)
    return end + 0.5 * (base - end) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def warmup_cosine_stepped(total: int, base: float, warmup: int, start: float, end: float) -> list[float]:
    """The same schedule as the scheduler's step() produces it, one multiplicative/additive update per step."""
    lrs = [start if warmup > 0 else base]
    for k in range(1, total + 1):
        lr = lrs[-1]
        if k < warmup:
            lr = lr + (base - start) / (warmup - 1)
        elif k == warmup:
            lr = base
        else:
            span = total - warmup
            lr = (1 + math.cos(math.pi * (k - warmup) / span)) / (1 + math.cos(math.pi * (k - warmup - 1) / span)) \
                * (lr - end) + end
        lrs.append(lr)
    return lrs


@pytest.mark.parametrize("warmup", [2, 5, 10])
def test_warmup_cosine_matches_the_formula(warmup: int) -> None:
    total, base, start, end = 40, 0.3, 0.01, 0.002
    ours = [lr_at(s, total, base, warmup_steps=warmup, warmup_start_lr=start, min_lr=end) for s in range(total + 1)]
    formula = [warmup_cosine_formula(s, total, base, warmup, start, end) for s in range(total + 1)]
    assert ours == pytest.approx(formula, rel=1e-12, abs=1e-15)
    assert ours == pytest.approx(warmup_cosine_stepped(total, base, warmup, start, end), rel=1e-9, abs=1e-12)
    assert ours[0] == start  # the first step runs at the start rate
    assert ours[warmup - 1] == pytest.approx(base) and ours[warmup] == base  # the top is held for two steps
    assert ours[total] == pytest.approx(end) and lr_at(total + 5, total, base, warmup_steps=warmup,
                                                       min_lr=end) == pytest.approx(end)
    rising, falling = ours[:warmup], ours[warmup:]
    assert rising == sorted(rising) and falling == sorted(falling, reverse=True)


def test_one_warmup_step_and_no_warmup() -> None:
    assert lr_at(0, 10, 1.0, warmup_steps=1, warmup_start_lr=0.1) == 0.1
    assert lr_at(1, 10, 1.0, warmup_steps=1, warmup_start_lr=0.1) == 1.0
    for total in (1, 7, 100, 0):
        for s in range(total + 3):
            assert lr_at(s, total, 0.3, warmup_start_lr=0.05) == cosine_lr(s, total, 0.3)  # exactly
            assert lr_at(s, total, 0.3, min_lr=0.01) == cosine_lr(s, total, 0.3, 0.01)
    assert lr_at(3, 10, 0.3, min_lr=0.01) == 0.01 + (0.3 - 0.01) * 0.5 * (1.0 + math.cos(math.pi * (3 / 10)))


@pytest.mark.parametrize("warmup,total", [(-1, 10), (10, 10), (11, 10)])
def test_bad_warmup_raises(warmup: int, total: int) -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_at(0, total, 0.3, warmup_steps=warmup)
