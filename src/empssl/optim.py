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

    then a plain SGD step. Groups with ``lars=False`` (biases and norm parameters, excluded by the wrapper)
    get neither scaling nor weight decay, as in the wrapper, which zeroes the SGD weight decay of every group.

    A step is a fixed number of multi-tensor ops whatever the number of parameters: all gradient and weight
    norms come from ``torch._foreach_norm``, a group's trust ratios are one stacked tensor, the scaled gradients
    are made with ``torch._foreach_*`` ops, and momentum, Nesterov and the update run in torch's fused SGD
    kernel (``torch.optim.SGD(fused=True)``'s), which can skip the whole update on the device. Nothing is read
    back to the host: ``lr`` must be a Python float. All parameters must be on one device. The momentum
    buffers are ``state[p]["momentum_buffer"]``, as in the per-parameter version, so checkpoints carry over.
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
        ``torch.isfinite(loss)``) is False or a gradient holds a NaN or an infinity.

        Returns a 0-d bool tensor on the parameters' device: True where the update was applied. A skipped step
        leaves the parameters and the momentum buffers bitwise unchanged, and the decision is taken on the
        device (no host synchronisation). A gradient whose norm overflows float32 counts as non-finite.
        """
        if closure is not None:
            raise ValueError("LARS does not support closures")
        groups = [(group, [p for p in group["params"] if p.grad is not None]) for group in self.param_groups]
        params = [p for _, ps in groups for p in ps]
        if not params:
            device = next(p.device for group in self.param_groups for p in group["params"])
            applied = torch.ones((), dtype=torch.bool, device=device)
            return applied if finite is None else applied & finite
        # One norm per gradient; a NaN or inf element makes its norm non-finite, so these decide the skip too.
        grad_norms = torch.stack(torch._foreach_norm([p.grad for p in params]))  # (n_params,)
        applied = grad_norms.isfinite().all()
        if finite is not None:
            applied = applied & finite
        skip = (~applied).float()  # the fused kernel's found_inf: 1.0 leaves everything untouched
        start = 0
        for group, ps in groups:
            g_norms = grad_norms[start:start + len(ps)]
            start += len(ps)
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
        """The momentum buffer of each parameter, created as zeros, laid out as the parameter (the fused kernel
        walks parameter, gradient and buffer memory in the same order; a buffer loaded from a checkpoint
        written with another memory format is re-laid once)."""
        bufs = []
        for p in params:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif buf.stride() != p.stride():
                buf = state["momentum_buffer"] = _like(buf, p)
            bufs.append(buf)
        return bufs


def _like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``t`` with the memory layout of ``p`` (copied only if it differs, e.g. a channels_last parameter)."""
    return t if t.stride() == p.stride() else torch.empty_like(p).copy_(t)


def _lars_gradients(group: dict, params: list[torch.Tensor], grads: list[torch.Tensor] | tuple[torch.Tensor, ...],
                    g_norms: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(g + weight_decay * p) * trust for every parameter of a LARS group, as new tensors laid out like the
    parameters. g_norms: (n,) the gradients' norms."""
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

    The closed form of solo-learn's ``warmup_cosine`` schedule (pl_bolts' LinearWarmupCosineAnnealingLR with
    ``warmup_epochs=warmup_steps, max_epochs=total_steps``, stepped every optimisation step): step 0 runs at
    ``warmup_start_lr``, the warm-up rises by (base_lr - warmup_start_lr) / (warmup_steps - 1) per step, so
    that steps ``warmup_steps - 1`` and ``warmup_steps`` both run at ``base_lr``; then
    min_lr + (base_lr - min_lr) (1 + cos(pi (step - warmup_steps) / (total_steps - warmup_steps))) / 2.
    With one warm-up step, step 0 runs at ``warmup_start_lr`` (the scheduler's stepped form; its closed form
    divides by zero there). With ``warmup_steps=0`` this is the official ``CosineAnnealingLR(T_max=total_steps)``
    stepped per optimisation step (``warmup_start_lr`` unused, as solo-learn passes ``base_lr`` as the start when
    there is no warm-up).
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps and warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be fewer than the schedule's {total_steps} steps")
    if step < warmup_steps:
        if warmup_steps == 1:
            return warmup_start_lr
        return warmup_start_lr + step * (base_lr - warmup_start_lr) / (warmup_steps - 1)
    t = (min(step, total_steps) - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

