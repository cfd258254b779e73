"""SGD + LARS as in the official EMP-SSL code, and the per-step cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD (momentum, optional Nesterov) with layer-wise adaptive rate scaling (You et al., 2017).

    Reproduces the official code's ``LARSWrapper(SGD(..., nesterov=True), eta=0.005, clip=True,
    exclude_bias_n_norm=True)``: for every parameter of a group with ``lars=True``

        trust = eta * ||p|| / (||g|| + weight_decay * ||p|| + 1e-8)
        trust = min(trust / lr, 1)                         (clipping)
        g    <- (g + weight_decay * p) * trust               (only where ||p|| > 0 and ||g|| > 0)

    then a plain SGD step. Groups with ``lars=False`` (biases and norm parameters, excluded by the wrapper)
    get neither scaling nor weight decay, as in the wrapper, which zeroes the SGD weight decay of every group.
    Everything stays on the device: no host synchronisation per step.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
                 eta: float = 0.005, nesterov: bool = True, clip: bool = True) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, nesterov=nesterov,
                        clip=clip, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
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
                    # The official wrapper skips parameters whose weight or gradient norm is zero.
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


def lars_param_groups(model: nn.Module) -> list[dict]:
    """Split parameters as ``exclude_bias_n_norm`` does: 1-d tensors (biases, BN weights) skip LARS and decay."""
    scaled = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    plain = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": scaled, "lars": True}, {"params": plain, "lars": False}]


def cosine_lr(step: int, total_steps: int, base_lr: float, final_lr: float = 0.0) -> float:
    """Learning rate for ``step`` (0-based) of a cosine decay over ``total_steps`` steps, stepped per
    optimisation step like the official ``CosineAnnealingLR(T_max=total_steps)``."""
    t = min(step, total_steps) / max(total_steps, 1)
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
