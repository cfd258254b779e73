"""Training memory for many patches: exact activation recomputation (what PyTorch calls activation
checkpointing, ``--grad-checkpointing``) of the backbone, and when to use it.

A step pushes n_patches * B patches through the encoder at once (20,000 at 200 x 100), and BatchNorm
normalises over all of them, as in the official code. Splitting the patches into chunks that run forward
and backward one after the other would change BatchNorm's statistics, so it is *not* the same training.
Recomputation is: each residual block keeps only its input during the forward pass and runs
its forward again during the backward pass, on the same patches, so BatchNorm sees the same batch and
the loss and gradients are unchanged. The one side effect, a second update of BatchNorm's running
statistics by the recomputation, is undone (they are restored after each block's recomputation), so the
running statistics are those of the plain step too. Cost: about one extra backbone forward per step
(~1/3 more compute); saving: the backbone's activations shrink to the block inputs (see
:func:`activation_bytes_per_patch` and docs/BENCHMARKS.md).

``--grad-checkpointing auto`` (the default) turns it on only on CUDA, only when the step's estimated memory
exceeds what the GPU has free; ``on`` / ``off`` force it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute_in_backward

from .models import BasicBlock, EMPSSLModel

# Fraction of the free GPU memory a step may plan to use before recomputation is switched on (the caching
# allocator's fragmentation and cuDNN workspaces need the rest).
_FREE_FRACTION = 0.85


@contextlib.contextmanager
def _keep_batchnorm_stats(module: nn.Module) -> Iterator[None]:
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
                                 context_fn=lambda: (contextlib.nullcontext(), _keep_batchnorm_stats(module)))


def recompute_backbone(model: EMPSSLModel) -> int:
    """Turn on activation recomputation for every residual block of ``model.backbone``, in place.

    The blocks' ``forward`` is replaced (an instance attribute), so parameter names and the state_dict are
    unchanged. Only training-mode forwards with gradients are recomputed; evaluation runs as before.
    Returns the number of blocks wrapped (idempotent: already wrapped blocks are skipped).
    """
    n = 0
    for block in model.backbone.modules():
        if isinstance(block, BasicBlock) and "forward" not in block.__dict__:
            block.forward = functools.partial(_recomputed, block, block.forward)  # type: ignore[method-assign]
            n += 1
    return n


def activation_bytes_per_patch(model: nn.Module, patch_size: int, device: torch.device,
                               amp: torch.dtype | None = None, channels_last: bool = False) -> float:
    """Bytes that autograd keeps per patch for the backward pass of ``model`` (train mode, as configured).

    Measured, not modelled: a copy of the model runs forward on 4 and on 8 random patches with a hook
    that records every tensor saved for backward (unique storages), and the difference / 4 is the
    per-patch cost (the weights' autocast copies cancel out). Takes a fraction of a second on a GPU.
    """
    replica = copy.deepcopy(model).train()  # the forward passes update BatchNorm statistics: not the model's
    for m in replica.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            # plain BatchNorm: a SyncBatchNorm replica would start collectives the other ranks may not join
            m.forward = functools.partial(nn.modules.batchnorm._BatchNorm.forward, m)  # type: ignore[method-assign]

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
            replica(x)
        return sum(storages.values())

    return (saved_bytes(8) - saved_bytes(4)) / 4


def step_bytes(model: nn.Module, patches: int, patch_size: int, device: torch.device, amp: torch.dtype | None,
               channels_last: bool) -> int:
    """Estimated peak memory of one training step on ``patches`` patches (beyond what is allocated now).

    Saved activations + the float32 patches and their autocast copy + three more patch-sized buffers for
    the augmentation's temporaries + gradients and momentum for the parameters.
    """
    act = activation_bytes_per_patch(model, patch_size, device, amp, channels_last)
    patch_bytes = 3 * patch_size * patch_size * 4
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(patches * (act + 5 * patch_bytes) + 2 * params)


def free_bytes(device: torch.device) -> int:
    """Memory still available to this process on a CUDA device: free on the card + cached by PyTorch."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def want_recompute(mode: str, model: nn.Module, patches: int, patch_size: int, device: torch.device,
                       amp: torch.dtype | None, channels_last: bool) -> tuple[bool, str]:
    """Decide ``--grad-checkpointing`` (auto | on | off) for a step of ``patches`` patches on this process.

    Returns (use it, a one-line reason for the log). ``auto`` is on only on CUDA, when :func:`step_bytes`
    exceeds 85% of :func:`free_bytes`; on the CPU it is always off (host memory is rarely the limit and
    recomputation costs time).
    """
    if mode in ("on", "off"):
        return mode == "on", f"--grad-checkpointing {mode}"
    if device.type != "cuda":
        return False, "auto: off on CPU"
    need, free = step_bytes(model, patches, patch_size, device, amp, channels_last), free_bytes(device)
    use = need > _FREE_FRACTION * free
    return use, (f"auto: a step needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free -> "
                 f"{'on' if use else 'off'}")
