"""Training on several processes (one per GPU) launched by torchrun, equal to one process on the same batch.

    torchrun --nproc-per-node 8 -m empssl.cli train --batch-size 800 ...

``--batch-size`` stays the *global* batch B; each of N ranks takes its slice of b = B / N images of the step's
shared permutation and cuts their patches from the parameters of all n*B patches, drawn on every rank from the
same seeded generator (:func:`rank_patches`): bit for bit the single process's. ``--tcr-global`` (the default,
as the official ``nn.DataParallel`` does) computes the coding rate over the all-gathered batch
(:func:`gather_batch`): R at batch b is another objective. ``--sync-bn`` normalises over all ranks (on CPU with
:class:`CPUSyncBatchNorm`). With both, loss and update equal the single process's up to float rounding; why
and what each costs: docs/BENCHMARKS.md. Only rank 0 writes files; every rank resumes from ``--out``, which
must be shared storage (:func:`shared_checkpoint`).
"""

from __future__ import annotations

import ctypes
import gc
import os
import secrets
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from .data.decode import usable_cpus
from .devices import resolve_device
from .errors import ConfigError
from .files import OutputError, write_text
from .patches import Augment, PatchParams, apply_params, sample_params

# Generous: the other ranks wait in a collective while rank 0 runs the --eval-every monitor, and while it
# decodes a dataset into the cache before them.
_COLLECTIVE_TIMEOUT = timedelta(minutes=60)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SHARED_TOKEN = ".shared-token"  # in --out for a moment at each start: do all ranks see the same folder?


@dataclass(frozen=True)
class Dist:
    """This process's rank of world_size, its GPU index on the node, and how many ranks share the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:  # the one process that writes files, logs and shows progress
        return self.rank == 0


SINGLE = Dist()


def env_dist() -> Dist:
    """The process's place from torchrun's environment; SINGLE without it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as e:
        raise ConfigError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE): {e}") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return Dist(rank, world, local, max(1, local_world))


def setup(device_name: str) -> tuple[Dist, torch.device, bool]:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU), if any: (dist, device, created), where
    ``created`` says the caller should :func:`teardown` the group."""
    d = env_dist()
    if d.enabled and device_name.startswith("cuda:"):
        raise ConfigError(f"--device {device_name} names one GPU for all {d.world_size} processes; use auto or "
                          "cuda (each process takes cuda:LOCAL_RANK)")
    device = resolve_device(device_name, d.local_rank)
    if "WORLD_SIZE" in os.environ:  # started by torchrun (or another launcher), one rank per process
        die_with_parent()
    if d.enabled and (threads := rank_threads(os.environ, _launcher_env(), usable_cpus(), d.local_world_size)):
        torch.set_num_threads(threads)
    if not d.enabled or tdist.is_initialized():
        return d, device, False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=_COLLECTIVE_TIMEOUT)
    return d, device, True


def rank_threads(env: Mapping[str, str], launcher_env: Mapping[str, str] | None, cpus: int,
                 local_ranks: int) -> int | None:
    """Torch's threads for one of ``local_ranks`` ranks on ``cpus`` cores; None keeps the user's OMP_NUM_THREADS.
    torchrun sets OMP_NUM_THREADS=1 when its own environment (``launcher_env``; None: unreadable) has none, which
    would leave all cores but one per rank idle; unset (another launcher), n ranks would start n threads each."""
    omp = env.get("OMP_NUM_THREADS")
    if omp is not None and not (omp == "1" and launcher_env is not None and "OMP_NUM_THREADS" not in launcher_env):
        return None
    return max(1, cpus // local_ranks)


def _launcher_env() -> dict[str, str] | None:
    """The environment the parent process (torchrun) was started with (Linux); None where it cannot be read."""
    try:
        raw = Path(f"/proc/{os.getppid()}/environ").read_bytes()
    except OSError:
        return None
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def die_with_parent() -> None:
    """Have Linux SIGKILL this process when its parent dies: torchrun starts every rank in a session of its own, so a
    SIGKILLed launcher would leave its ranks training as orphans (the signal comes when the parent *thread* ends:
    torchrun starts its ranks from its main thread)."""
    if sys.platform != "linux":
        return
    parent = os.getppid()
    if ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # refused (a sandbox's seccomp): the rank runs as it would without
    if os.getppid() != parent:  # the parent died before the request: no signal will come
        os.kill(os.getpid(), signal.SIGKILL)


def teardown(created: bool) -> None:
    """Destroy the process group this session created, once the DDP wrapper is gone: a DDP Reducer freed after
    this holds the group's last reference and destroys it with the GIL held, which deadlocks torch 2.11's gloo (a
    worker thread needs the GIL to free a finished collective's tensors; tests/test_distributed.py hung so)."""
    if created and tdist.is_initialized():
        gc.collect()  # a DDP wrapper in a reference cycle goes now, while the group still holds a reference
        tdist.destroy_process_group()  # torch frees the group itself with the GIL released


@contextmanager
def main_process_first(d: Dist) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. downloads or decodes a dataset into the cache), then the others."""
    if d.enabled and not d.is_main:
        tdist.barrier()
    yield
    if d.enabled and d.is_main:
        tdist.barrier()


def shared_checkpoint(out: Path, d: Dist, read: Callable[[Path], dict[str, Any]]) -> dict[str, Any] | None:
    """``read(out / "checkpoint.pt")`` (None: none there), once every rank is seen to share ``out``, where a node
    with a folder of its own would silently start again; else the same one-line OutputError on every rank. Rank 0
    writes a token that every rank reads back, before the checkpoint is read (so that a damaged one fails alike
    everywhere); then all compare its step."""
    path = out / "checkpoint.pt"
    if d.enabled:
        token, token_path = [secrets.token_hex(16)], out / SHARED_TOKEN
        if d.is_main:
            write_text(token_path, token[0])
        tdist.broadcast_object_list(token)  # rank 0's, sent once its file is written
        try:
            seen = token_path.read_text() == token[0]
        except OSError:
            seen = False
        try:
            _agree(seen, out, d, lambda seen: "the token rank 0 has just written" if seen else "no token from rank 0")
        finally:
            if d.is_main:
                token_path.unlink(missing_ok=True)  # every rank has read it: _agree gathered from all
    ckpt = read(path) if path.exists() else None
    if d.enabled:
        _agree(ckpt and ckpt["step"], out, d,
               lambda step: "no checkpoint" if step is None else f"the checkpoint of step {step}")
    return ckpt


def _agree(mine: object, out: Path, d: Dist, said: Callable[[Any], str]) -> None:
    """OutputError, worded the same on every rank, unless every rank sees what rank 0 sees: every rank's
    ``mine``, where it runs and its --out, gathered on every rank."""
    views: list[Any] = [None] * d.world_size
    where = f"node {os.environ.get('GROUP_RANK', '?')}, host {socket.gethostname()}, --out {out}"
    tdist.all_gather_object(views, (mine, where))
    odd = next((r for r, (seen, _) in enumerate(views) if seen != views[0][0]), None)
    if odd is not None:
        raise OutputError(f"--out must be on storage every node shares: rank {odd} ({views[odd][1]}) sees "
                          f"{said(views[odd][0])} there, rank 0 ({views[0][1]}) {said(views[0][0])}; nothing was "
                          f"trained")


def any_rank(flag: bool, d: Dist, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any (one collective; use outside the step)."""
    return agree(torch.zeros(0, device=device), flag, d)


def agree(sums: torch.Tensor, stop: bool, d: Dist) -> bool:
    """Average the running sums of the loss terms (T,) over ranks in place; True on every rank if any asked to
    stop. One all-reduce, at the same (log and checkpoint) steps on every rank, so that they stop together."""
    if not d.enabled:
        return stop
    buf = torch.cat([sums, sums.new_tensor([float(stop)])])
    tdist.all_reduce(buf)
    sums.copy_(buf[:-1] / d.world_size)
    return bool(buf[-1] > 0)  # a host sync, at log/checkpoint steps only


# --- evaluation: a share of the images per rank, the features gathered -----------------------------------


def rank_rows(n: int, unit: int, d: Dist) -> tuple[int, int]:
    """(first, stop) of this rank's share of ``n`` rows: ceil(units / world) whole ``unit``s of rows (computed
    together, as one process would), the last ranks fewer or none."""
    units = -(-n // unit)
    per = -(-units // d.world_size) * unit
    return min(n, d.rank * per), min(n, (d.rank + 1) * per)


def gather_rows(x: torch.Tensor, n: int, unit: int, d: Dist) -> torch.Tensor:
    """(n, D) on every rank: every rank's share ``x`` of :func:`rank_rows` in order (a rank without rows passes
    (0, 1): the others tell it D)."""
    if not d.enabled:
        return x
    per = rank_rows(n, unit, Dist(0, d.world_size))[1]  # rank 0's share is the longest; laid end to end in
    # slots of its length, the shares start with the n rows, in order
    dim = torch.tensor([x.shape[1]], device=x.device)
    tdist.all_reduce(dim, op=tdist.ReduceOp.MAX)
    if x.shape[0] < per:  # the last shares are short: padded to one slot
        x = torch.cat([x.expand(-1, int(dim)), x.new_zeros(per - x.shape[0], int(dim))])
    out = x.new_empty(d.world_size * per, int(dim))
    gather = getattr(tdist, "all_gather_single", None) or tdist.all_gather_into_tensor  # older torch: that name only
    gather(out, x.contiguous())
    return out[:n]


# --- patches ------------------------------------------------------------------------------------------


def rank_patches(images: torch.Tensor, n_patches: int, aug: Augment, generator: torch.Generator, d: Dist,
                 out_dtype: torch.dtype = torch.float32,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """(n_patches, b, 3, s, s): the single-process patches of this rank's images (b, 3, H, W), its slice of the
    step's B = b * world images; ``generator`` is in the same state on every rank."""
    mine = rank_patch_params(images, n_patches, aug, generator, d)
    return apply_params(images, mine, aug, n_patches, out_dtype, memory_format=memory_format)


def rank_patch_params(images: torch.Tensor, n_patches: int, aug: Augment, generator: torch.Generator,
                      d: Dist) -> PatchParams:
    """The parameters of this rank's n_patches * b patches (patch-major), drawn as :func:`rank_patches` draws them:
    all n_patches * B drawn, this rank's images' kept."""
    b, _, H, W = images.shape
    params = sample_params(n_patches, b * d.world_size, aug, generator, images.device, image_hw=(H, W))
    if not d.enabled:
        return params

    def mine(t: torch.Tensor) -> torch.Tensor:  # (n_patches * B, ...) -> (n_patches * b, ...)
        return t.view(n_patches, -1, *t.shape[1:])[:, d.rank * b:(d.rank + 1) * b].flatten(0, 1)

    return PatchParams(**{f.name: mine(getattr(params, f.name)) for f in fields(params)})


# --- the loss: one batch over all ranks -----------------------------------------------------------------


class _GatherBatch(torch.autograd.Function):
    """(n, b, d) on every rank -> (n, world*b, d), rank-major along dim 1. Backward sums the gradient over ranks
    before taking this rank's slice: with DDP's averaging, the gradient of the mean of the ranks' losses."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        z = z.contiguous()
        parts = [torch.empty_like(z) for _ in range(tdist.get_world_size())]
        tdist.all_gather(parts, z)
        ctx.rank, ctx.b = tdist.get_rank(), z.shape[1]
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        tdist.all_reduce(grad)
        return grad.narrow(1, ctx.rank * ctx.b, ctx.b)


def gather_batch(z: torch.Tensor, d: Dist) -> torch.Tensor:
    """Differentiable all-gather of (n_patches, b, dim) along the batch: (n_patches, world*b, dim)."""
    return _GatherBatch.apply(z) if d.enabled else z


# --- the model ------------------------------------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum); the gradient of the sum is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        tdist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        tdist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span all ranks, for CPU tensors (gloo), which ``nn.SyncBatchNorm``
    refuses: its mathematics with two differentiable all-reduces, and BatchNorm's parameters and buffers (so
    checkpoints are interchangeable). Outside training or without a process group: plain BatchNorm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and tdist.is_initialized() and tdist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_tensor([x.numel() // x.shape[1]], dtype=torch.float32)
        sums = _AllReduceSum.apply(torch.cat([x.float().sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        xc = x.float() - mean.view(shape)
        var = _AllReduceSum.apply((xc * xc).sum(dims)) / n  # biased, as BatchNorm normalises
        if self.track_running_stats:
            assert self.num_batches_tracked is not None and self.running_mean is not None
            assert self.running_var is not None  # they exist when track_running_stats
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), m)
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm made cross-rank, keeping its parameters and statistics (as new objects:
    build the optimiser after)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        new = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, device))
    return module


def training_module(model: nn.Module, device: torch.device, d: Dist, *, compile: bool) -> nn.Module:
    """``model`` wrapped in DDP (several ranks) and/or torch.compile for the training step; ``model`` itself is
    left as it is, so that its state_dict (what checkpoints hold) keeps plain keys."""
    net: nn.Module = model
    if d.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:
        net = torch.compile(net)  # type: ignore[assignment]
    return net
