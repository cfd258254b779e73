"""LARS against a copy of the official LARSWrapper logic, and the cosine schedule."""

import math

import pytest
import torch
from torch import nn

from empssl.optim import LARS, cosine_lr, lars_param_groups


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


def test_lars_state_dict_roundtrip():
    net = small_net(0)
    opt = LARS(lars_param_groups(net), lr=0.1)
    net(torch.randn(4, 8)).sum().backward()
    opt.step()
    opt2 = LARS(lars_param_groups(net), lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    assert len(opt2.state) == len(opt.state)


def test_param_groups_exclude_biases_and_norms():
    groups = lars_param_groups(small_net(0))
    assert all(p.ndim > 1 for p in groups[0]["params"]) and groups[0]["lars"]
    assert all(p.ndim == 1 for p in groups[1]["params"]) and not groups[1]["lars"]


def test_cosine_schedule():
    assert cosine_lr(0, 100, 0.3) == pytest.approx(0.3)
    assert cosine_lr(50, 100, 0.3) == pytest.approx(0.15)
    assert cosine_lr(100, 100, 0.3) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(25, 100, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    lrs = [cosine_lr(s, 10, 1.0) for s in range(11)]
    assert lrs == sorted(lrs, reverse=True)
