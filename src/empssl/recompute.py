"""Training memory for many patches: exact activation recomputation (PyTorch's activation checkpointing,
``--grad-checkpointing``) of the backbone, and when to use it.

A step pushes n_patches * B patches through the encoder at once (20,000 at 200 x 100), and BatchNorm normalises
over all of them, as in the official code, so running them in chunks would *not* be the same training.
Recomputation is: each residual block keeps only its input and runs its forward again during the backward pass,
on the same patches, so the loss and gradients are unchanged; the recomputation's second update of BatchNorm's
running statistics is undone. Cost: about one extra backbone forward per step (~1/3 more compute); saving: the
backbone's activations shrink to the block inputs (docs/BENCHMARKS.md). ``auto`` (the default) turns it on only
on CUDA, when the step's estimated memory exceeds what the GPU has free.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute_in_backward

from .config import Config
from .data.sources import memory_available
from .devices import autocast_dtype
from .errors import ConfigError
from .methods import create_method
from .models import BasicBlock, EMPSSLModel

# Fraction of the free GPU memory a step may plan to use before recomputation is switched on (the caching
# allocator's fragmentation and cuDNN workspaces need the rest).
_FREE_FRACTION = 0.85


@contextlib.contextmanager
def keep_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Restore the running statistics of ``module``'s BatchNorm layers on exit (the recomputation's update)."""
    saved = [(t, t.clone()) for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
             for t in (m.running_mean, m.running_var, m.num_batches_tracked) if t is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for stat, before in saved:
                stat.copy_(before)


def _recomputed(module: nn.Module, forward: Callable[..., Any], *args: Any) -> Any:
    if not (module.training and torch.is_grad_enabled()):
        return forward(*args)
    if torch.compiler.is_compiling():
        # Compiled, the recomputation is part of the backward graph and the statistics update stays in the
        # forward graph; a custom context_fn is not supported there (only selective recomputation's).
        return recompute_in_backward(forward, *args, use_reentrant=False)
    return recompute_in_backward(forward, *args, use_reentrant=False,
                                 preserve_rng_state=False,  # the blocks draw no randomness
                                 context_fn=lambda: (contextlib.nullcontext(), keep_batchnorm_stats(module)))


def recompute_backbone(model: nn.Module) -> int:
    """Turn on activation recomputation for every residual block of ``model.backbone``, in place; return the
    number of blocks wrapped (already wrapped ones are skipped). Each block's ``forward`` becomes an instance
    attribute, so the state_dict is unchanged; only training-mode forwards with gradients are recomputed."""
    n = 0
    backbone = model.backbone  # every method's model has one (EMPSSLModel, the two-view models)
    assert isinstance(backbone, nn.Module)
    for block in backbone.modules():
        if isinstance(block, BasicBlock) and "forward" not in block.__dict__:
            block.forward = functools.partial(_recomputed, block, block.forward)  # type: ignore[method-assign]
            n += 1
    return n


def activation_bytes_per_patch(model: nn.Module, patch_size: int, device: torch.device,
                               amp: torch.dtype | None = None, channels_last: bool = False) -> float:
    """Bytes that autograd keeps per patch for the backward pass of ``model`` (train mode, as configured).

    Measured, not modelled: a copy of the model runs forward on 8 and on 4 random patches with a hook that
    records every tensor saved for backward (unique storages); the difference / 4 is the per-patch cost (the
    weights' autocast copies cancel out).
    """
    replica = copy.deepcopy(model).train()  # the forward passes update BatchNorm statistics: not the model's
    for m in replica.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            # plain BatchNorm: a SyncBatchNorm replica would start collectives the other ranks may not join
            m.forward = functools.partial(nn.modules.batchnorm._BatchNorm.forward, m)  # type: ignore[method-assign]

    # EMP-SSL's model takes (B, 3, s, s) patches, the two-view models (V, b, 3, s, s) views; a method's own model
    # is tried in both layouts
    views_first = not isinstance(model, EMPSSLModel)

    def saved_bytes(k: int) -> int:
        x = torch.randn(k, 3, patch_size, patch_size, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            replica(x[None] if views_first else x)
        return sum(storages.values())

    try:
        big = saved_bytes(8)
    except (RuntimeError, ValueError, TypeError):
        views_first = not views_first
        big = saved_bytes(8)
    return (big - saved_bytes(4)) / 4


def activation_bytes_at(model: nn.Module, patch_size: int, device: torch.device, amp: torch.dtype | None = None,
                        channels_last: bool = False) -> float:
    """:func:`activation_bytes_per_patch` at ``patch_size``, measured up to 64 px; beyond that fitted as
    ``a + b * side**2`` (a convolutional network's activations grow with the patch area) through the measurements
    at 32 and 64 px, so that the estimate never allocates a patch of the large side."""
    lo, hi = 32, 64
    if patch_size <= hi:
        return activation_bytes_per_patch(model, patch_size, device, amp, channels_last)
    a_lo, a_hi = (activation_bytes_per_patch(model, s, device, amp, channels_last) for s in (lo, hi))
    per_pixel = (a_hi - a_lo) / (hi * hi - lo * lo)
    return a_lo + per_pixel * (patch_size * patch_size - lo * lo)


class StepMemory(NamedTuple):
    """Estimated peak memory of one training step, in bytes, by what holds it."""

    activations: int  # what autograd keeps for the backward pass
    patches: int  # the float32 patches, their autocast copy and the augmentation's temporaries
    model: int  # parameters, gradients and momentum (weights included only when ``with_weights``)

    @property
    def total(self) -> int:
        return self.activations + self.patches + self.model

    def describe(self) -> str:
        return (f"~{_gib(self.total)} (activations {_gib(self.activations)}, patches {_gib(self.patches)}, model and "
                f"optimiser {_gib(self.model)})")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**27 else f"{n / 2**20:.0f} MiB"


def step_memory(model: nn.Module, patches: int, patch_size: int, device: torch.device, amp: torch.dtype | None,
                channels_last: bool, with_weights: bool = False) -> StepMemory:
    """Estimated peak memory of one training step on ``patches`` patches of ``model`` as configured: saved
    activations + the float32 patches, their autocast copy and three patch-sized temporaries of the augmentation +
    gradients and momentum (and with ``with_weights`` the parameters, for a model not yet on the device)."""
    act = activation_bytes_at(model, patch_size, device, amp, channels_last)
    patch_bytes = 3 * patch_size * patch_size * 4
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return StepMemory(int(patches * act), int(patches * 5 * patch_bytes), (3 if with_weights else 2) * params)


def want_recompute(mode: str, model: nn.Module, patches: int, patch_size: int, device: torch.device,
                   amp: torch.dtype | None, channels_last: bool) -> tuple[bool, str]:
    """Decide ``--grad-checkpointing`` (auto | on | off) for a step of ``patches`` patches on this process:
    (use it, a one-line reason for the log). ``auto`` is on only on CUDA, when :func:`step_memory`'s total exceeds
    85% of :func:`available_bytes`; on the CPU host memory is rarely the limit and recomputation costs time."""
    if mode in ("on", "off"):
        return mode == "on", f"--grad-checkpointing {mode}"
    if device.type != "cuda":
        return False, "auto: off on CPU"
    need = step_memory(model, patches, patch_size, device, amp, channels_last).total
    free = available_bytes(device) or 0  # never None on CUDA
    use = need > _FREE_FRACTION * free
    return use, (f"auto: a step needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free -> "
                 f"{'on' if use else 'off'}")


def available_bytes(device: torch.device) -> int | None:
    """Memory a training step may use: on a CUDA device what is free on the card + cached by PyTorch, on the CPU
    the host's (:func:`empssl.data.sources.memory_available`); None where it cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return memory_available() if device.type == "cpu" else None


def check_step_fits(cfg: Config, device: torch.device, world_size: int = 1) -> None:
    """Refuse (ConfigError, one line), before anything is allocated or written, a run whose training step cannot
    fit in :func:`available_bytes`: :func:`step_memory` of this process's share of the step's views, with
    recomputation where ``--grad-checkpointing`` would turn it on, measured on a throwaway copy of the model."""
    limit = available_bytes(device)
    if limit is None:
        return
    method = create_method(cfg)
    with torch.random.fork_rng(devices=[]):
        model = method.build_model().to(device)
    patches = method.views_per_image * cfg.batch_size // world_size // cfg.patch_chunks  # one group at a time
    amp = autocast_dtype(cfg.precision, device)
    channels_last = cfg.channels_last and device.type == "cuda"
    recompute = cfg.grad_checkpointing == "on" or (cfg.grad_checkpointing == "auto" and device.type == "cuda")
    try:
        need = step_memory(model, patches, cfg.patch_size, device, amp, channels_last, with_weights=True)
        if need.total > limit and recompute and recompute_backbone(model):
            need = step_memory(model, patches, cfg.patch_size, device, amp, channels_last, with_weights=True)
    except (RuntimeError, ValueError, TypeError, AttributeError):
        return  # a method's own model that takes neither layout of views: no estimate, the run is not refused
    finally:
        del model
    if need.total > limit:
        where = f"{device} has {_gib(limit)} free" if device.type == "cuda" else f"the host has {_gib(limit)} available"
        with_r = " with activation checkpointing" if recompute else ""
        what = (f"one training step of {patches} patches" if cfg.patch_chunks == 1 else
                f"one group of {patches} patches (--patch-chunks {cfg.patch_chunks})")
        raise ConfigError(f"{what} of {cfg.patch_size} px needs {need.describe()}{with_r}, but {where}; lower "
                          f"--patch-size, --num-patches or --batch-size{_chunks_hint(method, cfg, need, limit)}")


def _chunks_hint(method: Any, cfg: Config, need: StepMemory, limit: int) -> str:
    """", or make ... with --patch-chunks K": the fewest groups (a divisor of --num-patches) in which the step
    would fit, for a method that takes them; "" where none would."""
    if not method.chunked:
        return ""
    per_patch_share = (need.activations + need.patches) * cfg.patch_chunks  # the whole step's, for one group
    for k in range(cfg.patch_chunks + 1, cfg.num_patches + 1):
        if cfg.num_patches % k == 0 and per_patch_share / k + need.model <= limit:
            return f", or make and consume the patches in groups: --patch-chunks {k}"
    return ""
