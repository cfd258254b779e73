"""Training on several processes (one per GPU) launched by torchrun, comparable to one process on the same batch.

    torchrun --nproc-per-node 8 -m empssl.cli train --batch-size 800 ...

``--batch-size`` stays the *global* batch B: with N processes each takes b = B / N images of every step.
What makes the N-process run the single-process run on the same global batch:

* **images**: every rank draws the same per-epoch permutation and takes its slice r*b:(r+1)*b of the step's
  B images (:mod:`empssl.batches`);
* **patches**: every rank draws the random parameters of all n*B patches of the step from the same seeded
  generator (a few kB of numbers per step) and cuts only its own images' patches (:func:`rank_patches`), so
  rank r's patches are bit for bit the single process's patches of those images;
* **coding rate** (``--tcr-global``, the default): R(Z_i) is computed over the all-gathered (n, B, d) batch
  (:func:`gather_batch`, differentiable; EMP-SSL's loss in :func:`empssl.methods.emp_ssl.rank_loss`), the
  invariance term over the local images, and DDP averages the gradients. With ``--tcr-global false`` each rank
  computes R over its own b images only;
* **BatchNorm** (``--sync-bn``): statistics over all ranks' patches (torch's SyncBatchNorm on CUDA; on CPU,
  where that one refuses to run, :class:`CPUSyncBatchNorm`). Without it each rank normalises over its own
  b images' patches.

With ``--tcr-global true --sync-bn true`` the loss and the update equal the single-process ones up to float
rounding (tests/test_distributed.py checks this with two CPU processes over gloo).

Why the coding rate is global by default: the official code trains with ``nn.DataParallel``, which gathers
every GPU's output before the loss, so its R(Z_i) spans the whole batch; and R at batch b is a different
objective (its scale d / (b eps) and its b x b log-determinant depend on b), so a local coding rate would
change the method with the number of GPUs. The price is one all-gather of the (n, b, z_dim) projections per
step (the gathered tensor is 8 MB at 20 patches x 100 images) and the same n small Cholesky factorisations on
every rank.
BatchNorm is *not* synchronised by default: DataParallel's BatchNorm is per GPU too, and SyncBatchNorm costs
two collectives per layer. The local coding rate remains as ``--tcr-global false`` (cheaper, the usual
per-GPU loss of DDP code); it matches a single process that averages the per-rank losses of the b-image
slices, not the B-image loss.

Only rank 0 writes files and logs; every rank reads the checkpoint to resume, so ``--out`` must be one folder
that every node sees (shared storage): :func:`shared_checkpoint` checks it at every start.
"""

from __future__ import annotations

import ctypes
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
from .patches import Augment, PatchParams, apply_params, make_patches, sample_params

# Generous: the other ranks wait in a collective while rank 0 runs the --eval-every monitor, and while it
# decodes a dataset into the cache before them.
_COLLECTIVE_TIMEOUT = timedelta(minutes=60)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SHARED_TOKEN = ".shared-token"  # in --out for a moment at each start: do all ranks see the same folder?


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank of world_size processes, its GPU index on the node, and how many ranks
    share the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, logs and shows progress."""
        return self.rank == 0


SINGLE = Dist()


def env_dist() -> Dist:
    """The process's rank from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); SINGLE
    without it."""
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
    """Join the torchrun process group (env:// rendezvous; NCCL on CUDA, gloo on the CPU) if there is one.

    Returns (dist, device, created): ``created`` says this call initialised the group, so the caller
    should :func:`teardown` it. A single process (no WORLD_SIZE > 1) gets SINGLE and no group.
    """
    d = env_dist()
    if d.enabled and device_name.startswith("cuda:"):
        raise ConfigError(f"--device {device_name} names one GPU for all {d.world_size} processes; use auto or "
                          "cuda (each process takes cuda:LOCAL_RANK)")
    device = resolve_device(device_name, d.local_rank)
    if "WORLD_SIZE" in os.environ:  # started by torchrun (or another launcher), one rank per process
        die_with_parent()
    threads = rank_threads(os.environ, _launcher_env(), usable_cpus(), d.local_world_size) if d.enabled else None
    if threads is not None:
        torch.set_num_threads(threads)
    if not d.enabled or tdist.is_initialized():
        return d, device, False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                             rank=d.rank, world_size=d.world_size, timeout=_COLLECTIVE_TIMEOUT)
    return d, device, True


def rank_threads(env: Mapping[str, str], launcher_env: Mapping[str, str] | None, cpus: int,
                 local_ranks: int) -> int | None:
    """Torch's intra-op threads for one of ``local_ranks`` ranks sharing ``cpus`` cores: its share, at least 1; None
    keeps the OMP_NUM_THREADS the user set.

    torchrun (torch 2.14) gives its ranks OMP_NUM_THREADS=1 when its own environment has none, and passes a user's
    value on: a 1 missing from the launcher's environment (``launcher_env``; None where it cannot be read) is
    torchrun's default, which leaves all cores but one per rank idle. Unset (another launcher), every rank would
    start a thread per core: n ranks x n threads on n cores.
    """
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
    """Have Linux SIGKILL this process when its parent dies (elsewhere: nothing).

    torchrun starts every rank in a session of its own, so a launcher killed with SIGKILL (which it cannot pass on)
    would leave its ranks training on as orphans. Linux sends the signal when the parent *thread* ends: torchrun
    (2.14) starts its ranks from its main thread. A rank's DataLoader workers need nothing: they watch their
    parent's pid and exit when it changes.
    """
    if sys.platform != "linux":
        return
    parent = os.getppid()
    if ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # refused (a sandbox's seccomp): the rank runs as it would without
    if os.getppid() != parent:  # the parent died before the request: no signal will come
        os.kill(os.getpid(), signal.SIGKILL)


def teardown(created: bool) -> None:
    if created and tdist.is_initialized():
        tdist.destroy_process_group()


@contextmanager
def main_process_first(d: Dist) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. downloads or decodes a dataset into the cache), then the others."""
    if d.enabled and not d.is_main:
        tdist.barrier()
    yield
    if d.enabled and d.is_main:
        tdist.barrier()


def shared_checkpoint(out: Path, d: Dist, read: Callable[[Path], dict[str, Any]]) -> dict[str, Any] | None:
    """The checkpoint that every rank resumes from, ``read(out / "checkpoint.pt")`` (None: none there), once every
    rank is seen to share the run directory ``out``; else OutputError, the same one line on every rank.

    Only rank 0 writes ``out`` and every rank resumes from what it finds there, so a node whose ``out`` is a folder
    of its own would start again from step 0 (or from another run's checkpoint) beside the others, silently. Rank 0
    writes a fresh token there and every rank reads it back; then all compare the step of the checkpoint they see
    (an all-gather each). The checkpoint is read only once every rank has seen the token, so that a damaged one is
    the same error everywhere, not one rank's while the others wait.
    """
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
        views = _gather(seen, out, d)
        if d.is_main:
            token_path.unlink(missing_ok=True)  # every rank has read it
        _agree(views, lambda seen: "the token rank 0 has just written" if seen else "no token from rank 0")
    ckpt = read(path) if path.exists() else None
    if d.enabled:
        _agree(_gather(ckpt and ckpt["step"], out, d),
               lambda step: "no checkpoint" if step is None else f"the checkpoint of step {step}")
    return ckpt


def _gather(mine: object, out: Path, d: Dist) -> list[tuple[Any, str]]:
    """(every rank's ``mine``, where it runs and its --out) in rank order, on every rank."""
    views: list[Any] = [None] * d.world_size
    where = f"node {os.environ.get('GROUP_RANK', '?')}, host {socket.gethostname()}, --out {out}"
    tdist.all_gather_object(views, (mine, where))
    return views


def _agree(views: list[tuple[Any, str]], said: Callable[[Any], str]) -> None:
    """OutputError unless every rank saw what rank 0 saw; every rank words it the same, from the same ``views``."""
    odd = next((r for r, (seen, _) in enumerate(views) if seen != views[0][0]), None)
    if odd is not None:
        raise OutputError(f"--out must be on storage every node shares: rank {odd} ({views[odd][1]}) sees "
                          f"{said(views[odd][0])} there, rank 0 ({views[0][1]}) {said(views[0][0])}; nothing was "
                          f"trained")


def any_rank(flag: bool, d: Dist, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any (one collective; use outside the step)."""
    if not d.enabled:
        return flag
    t = torch.tensor([float(flag)], device=device)
    tdist.all_reduce(t)
    return bool(t.item() > 0)


def agree(sums: torch.Tensor, stop: bool, d: Dist) -> bool:
    """Average the running sums of the loss terms (T,) over ranks in place; True on every rank if any rank asked
    to stop.

    One (T + 1)-float all-reduce. Called at the same steps on every rank (log and checkpoint steps), so that all
    ranks see the same losses (and stop together on a non-finite one) and an interrupt stops them together.
    """
    if not d.enabled:
        return stop
    buf = torch.cat([sums, sums.new_tensor([float(stop)])])
    tdist.all_reduce(buf)
    sums.copy_(buf[:-1] / d.world_size)
    return bool(buf[-1] > 0)  # a host sync, at log/checkpoint steps only


# --- evaluation: a share of the images per rank, the features gathered -----------------------------------


def rank_rows(n: int, unit: int, d: Dist) -> tuple[int, int]:
    """(first, stop) of this rank's share of ``n`` rows: consecutive whole ``unit``s of rows (the images whose
    features are computed together, so that a rank computes them exactly as one process would), ceil(units /
    world) units each, the last ranks fewer or none."""
    units = -(-n // unit)
    per = -(-units // d.world_size) * unit
    return min(n, d.rank * per), min(n, (d.rank + 1) * per)


def gather_rows(x: torch.Tensor, n: int, unit: int, d: Dist) -> torch.Tensor:
    """(n, D): every rank's (rows, D) share ``x`` of :func:`rank_rows` put back in order, on every rank (a rank
    without rows passes (0, 1): the others tell it D). One all-reduce (D) and one all-gather (the rows)."""
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


def slice_params(params: PatchParams, n_patches: int, batch: int, start: int, stop: int) -> PatchParams:
    """The parameters of images start:stop from those of a (n_patches x batch)-patch step (patch-major)."""
    out = {}
    for f in fields(params):
        t = getattr(params, f.name)  # (n_patches * batch, ...)
        out[f.name] = t.view(n_patches, batch, *t.shape[1:])[:, start:stop].reshape(-1, *t.shape[1:])
    return PatchParams(**out)


def rank_patches(images: torch.Tensor, n_patches: int, aug: Augment, generator: torch.Generator, d: Dist,
                 out_dtype: torch.dtype = torch.float32,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Patches of this rank's images, equal to the single-process patches of the same images.

    Args:
        images: (b, 3, H, W) this rank's slice r*b:(r+1)*b of the step's global batch of B = b * world images.
        generator: in the same state on every rank (same seed, same draws).

    Returns:
        (n_patches, b, 3, s, s). The parameters of all n_patches * B patches are drawn on every rank (as
        the single process draws them) and only this rank's are applied; with one process this is
        :func:`empssl.patches.make_patches`.
    """
    if not d.enabled:
        return make_patches(images, n_patches, aug, generator, out_dtype, memory_format=memory_format)
    mine = rank_patch_params(images, n_patches, aug, generator, d)
    return apply_params(images, mine, aug, n_patches, out_dtype, memory_format=memory_format)


def rank_patch_params(images: torch.Tensor, n_patches: int, aug: Augment, generator: torch.Generator,
                      d: Dist) -> PatchParams:
    """The random parameters of :func:`rank_patches` (this rank's n_patches * b patches, patch-major), drawn as
    it draws them: applied in groups of patches (:func:`empssl.patches.take_patches`), they give its patches."""
    b, _, H, W = images.shape
    if not d.enabled:
        return sample_params(n_patches, b, aug, generator, images.device, image_hw=(H, W))
    params = sample_params(n_patches, b * d.world_size, aug, generator, images.device, image_hw=(H, W))
    return slice_params(params, n_patches, b * d.world_size, d.rank * b, (d.rank + 1) * b)


# --- the loss: one batch over all ranks -----------------------------------------------------------------


class _GatherBatch(torch.autograd.Function):
    """(n, b, d) on every rank -> (n, world*b, d), rank-major along dim 1; gradients flow back to each rank.

    Backward sums the gradient over ranks before taking this rank's slice: every rank's loss depends on
    every rank's projections, and DDP then averages the parameter gradients, which together give the
    gradient of the mean of the ranks' losses.
    """

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
    """BatchNorm whose training statistics span all ranks, for CPU tensors (gloo).

    torch's ``nn.SyncBatchNorm`` refuses CPU input, so CPU runs and tests use this instead: the same
    mathematics (global mean and biased variance for the output, unbiased variance for the running
    estimate) written with two differentiable all-reduces. Same parameters and buffers as BatchNorm, so
    checkpoints are interchangeable. Outside training or without a process group: plain BatchNorm.
    """

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
    """Replace every BatchNorm of ``module`` by a cross-rank one (nn.SyncBatchNorm on CUDA, CPUSyncBatchNorm on
    the CPU), keeping its parameters and statistics. Parameters are new objects: build the optimiser after."""
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
    """The module the training step calls: ``model`` wrapped in DDP (several ranks) and/or torch.compile.

    ``model`` itself is left as it is, so ``model.state_dict()`` (what checkpoints hold) keeps plain keys
    (no ``module.`` or ``_orig_mod.`` prefixes) and evaluation uses the plain model.
    """
    net: nn.Module = model
    if d.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:
        net = torch.compile(net)  # type: ignore[assignment]
    return net
