"""SGD + LARS as in the official EMP-SSL code, and the per-step learning-rate schedule (warm-up + cosine)."""

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

    then a plain SGD step. Groups with ``lars=False`` (biases and norm parameters) get neither scaling nor weight
    decay, as in the wrapper, which zeroes the SGD weight decay of every group.

    A step is a fixed number of multi-tensor ops (``torch._foreach_*``, then torch's fused SGD kernel, which can
    skip the update on the device) and reads nothing back to the host: ``lr`` must be a Python float, all
    parameters on one device. Momentum buffers are ``state[p]["momentum_buffer"]``, as in ``torch.optim.SGD``.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
                 eta: float = 0.005, nesterov: bool = True, clip: bool = True) -> None:
        for name, value, high in (("lr", lr, math.inf), ("momentum", momentum, 1.0),
                                  ("weight_decay", weight_decay, math.inf), ("eta", eta, math.inf)):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and 0 <= value < high):
                rule = "in [0, 1)" if high == 1 else ">= 0"
                raise ValueError(f"LARS: {name} must be a finite number {rule}, got {value!r}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, nesterov=nesterov,
                        clip=clip, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: None = None, *, finite: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """Update every parameter that has a gradient, unless ``finite`` (a 0-d bool tensor, e.g.
        ``torch.isfinite(loss)``) is False or a gradient (or its float32 norm) is not finite.

        Returns a 0-d bool device tensor, True where the update was applied. A skipped step leaves parameters and
        momentum buffers bitwise unchanged, decided on the device (no host synchronisation).
        """
        if closure is not None:
            raise ValueError("LARS does not support closures")
        groups = [(group, [p for p in group["params"] if p.grad is not None]) for group in self.param_groups]
        params = [p for _, ps in groups for p in ps]
        # One norm per gradient; a NaN or inf element makes its norm non-finite, so these decide the skip too.
        if params:
            grad_norms = torch.stack(torch._foreach_norm([p.grad for p in params]))  # (n_params,)
        else:  # no gradient at all: nothing to update, and the step counts as applied (all() of none)
            grad_norms = torch.zeros(0, device=next(p.device for group in self.param_groups for p in group["params"]))
        applied = grad_norms.isfinite().all()
        if finite is not None:
            applied = applied & finite
        skip = (~applied).float()  # the fused kernel's found_inf: 1.0 leaves everything untouched
        for (group, ps), g_norms in zip(groups, grad_norms.split([len(ps) for _, ps in groups])):
            if not ps:
                continue
            grads: list[torch.Tensor] | tuple[torch.Tensor, ...] = [_like(p.grad, p) for p in ps]
            if group["lars"]:
                grads = _lars_gradients(group, ps, grads, g_norms)
            bufs = self._momentum_buffers(ps) if group["momentum"] > 0 else []
            # is_first_step=False with zero-initialised buffers: 0 * momentum + g = g is the first step's buffer,
            # and a skipped first step leaves them at zero, so the step after it is a true first step.
            torch._fused_sgd_(ps, grads, bufs, weight_decay=0.0, momentum=group["momentum"], lr=group["lr"],
                              dampening=0.0, nesterov=group["nesterov"], maximize=False, is_first_step=False,
                              found_inf=skip)
        return applied

    def _momentum_buffers(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each parameter's momentum buffer (zeros at first), laid out as the parameter: the fused kernel walks
        parameter, gradient and buffer memory in the same order (a checkpoint's buffer is re-laid once)."""
        for p in params:
            buf = self.state[p].get("momentum_buffer")
            self.state[p]["momentum_buffer"] = torch.zeros_like(p) if buf is None else _like(buf, p)
        return [self.state[p]["momentum_buffer"] for p in params]


def _like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``t`` with the memory layout of ``p`` (copied only if it differs, e.g. a channels_last parameter)."""
    return t if t.stride() == p.stride() else torch.empty_like(p).copy_(t)


def _lars_gradients(group: dict, params: list[torch.Tensor], grads: list[torch.Tensor] | tuple[torch.Tensor, ...],
                    g_norms: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(g + weight_decay * p) * trust of a LARS group's parameters, laid out like them; g_norms: (n,)."""
    lr, wd = group["lr"], group["weight_decay"]
    p_norms = torch.stack(torch._foreach_norm(params))  # (n,)
    trust = group["eta"] * p_norms / (g_norms + p_norms * wd + 1e-8)
    if group["clip"]:
        trust = torch.clamp(trust / lr, max=1.0) if lr > 0 else torch.ones_like(trust)
    # The official wrapper leaves a parameter whose weight or gradient norm is zero unscaled and undecayed.
    scaled = (p_norms > 0) & (g_norms > 0)
    decay = torch.where(scaled, wd, 0.0).unbind()
    out = torch._foreach_mul(params, decay)  # wd * p, laid out like p
    torch._foreach_add_(out, grads)  # g + wd * p
    torch._foreach_mul_(out, torch.where(scaled, trust, 1.0).unbind())
    return out


def lars_param_groups(model: nn.Module) -> list[dict]:
    """Split parameters as ``exclude_bias_n_norm`` does: 1-d tensors (biases, BN weights) skip LARS and decay."""
    scaled = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    plain = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": scaled, "lars": True}, {"params": plain, "lars": False}]


def lr_at(step: int, total_steps: int, base_lr: float, *, warmup_steps: int = 0, warmup_start_lr: float = 0.0,
          min_lr: float = 0.0) -> float:
    """Learning rate of optimisation step ``step`` (0-based): a linear warm-up over ``warmup_steps`` steps,
    then a cosine decay that reaches ``min_lr`` at step ``total_steps`` (and stays there after it).

    The closed form of solo-learn's ``warmup_cosine`` (pl_bolts' LinearWarmupCosineAnnealingLR, stepped per
    optimisation step): step 0 runs at ``warmup_start_lr`` and the warm-up rises by (base_lr - warmup_start_lr) /
    (warmup_steps - 1) per step, so steps ``warmup_steps - 1`` and ``warmup_steps`` both run at ``base_lr`` (with
    one warm-up step, step 0 runs at ``warmup_start_lr``); then
    min_lr + (base_lr - min_lr) (1 + cos(pi (step - warmup_steps) / (total_steps - warmup_steps))) / 2.
    ``warmup_steps=0`` is the official ``CosineAnnealingLR(T_max=total_steps)`` (``warmup_start_lr`` unused).
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps and warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be fewer than the schedule's {total_steps} steps")
    if step < warmup_steps:  # a one-step warm-up: step 0 at warmup_start_lr
        return warmup_start_lr + step * (base_lr - warmup_start_lr) / max(warmup_steps - 1, 1)
    t = (min(step, total_steps) - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

