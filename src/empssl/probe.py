"""Linear probe on frozen features: EMP-SSL's evaluation recipe (arXiv 2304.03977), run without launch overhead.

The recipe (the official one): ``nn.Linear(D, C)`` in its default initialisation, cross-entropy, SGD with momentum
and weight decay (on the bias too, as ``torch.optim.SGD`` does), batch 100, the learning rate annealed per step by
a cosine to 0, the training set reshuffled every epoch. It reports the final epoch or the epoch with the best
accuracy on a validation split carved from the *training* features, never an epoch chosen on the test set.

:func:`reference_linear_probe` is that recipe in plain PyTorch; :func:`linear_probe`, tested equal to it on CPU,
writes the step as a few tensor ops on one (K, H, C) weight tensor (the bias is row D, the features carry a ones
column), so that H heads, one per learning rate, train together by one matmul, and on CUDA one whole epoch is
captured as a CUDA graph and replayed. With several learning rates it is a sweep: the head with the best
validation accuracy is reported, nothing is retrained.
"""
from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .fallbacks import fall_back

BACKENDS = ("auto", "eager", "cuda-graph")
# Eager epochs run (and undone) on a side stream before capture: lazy initialisations (cuBLAS handles and
# workspaces) must not happen inside the graph, as the CUDA-graph documentation requires.
GRAPH_WARMUP_EPOCHS = 2
# The augmented feature rows (D features, a one, zero padding) are rounded up to this many floats so that every
# row starts 32-byte aligned for the matmuls; the padded weights get exactly zero gradient and stay zero.
ROW_ALIGN = 8
# Rows per accuracy matmul: (chunk, H * C) logits in memory at a time.
ACCURACY_CHUNK = 8192


class ProbeError(ValueError):
    """A user-facing probe error (bad shapes, bad hyper-parameters, a sweep without a validation split): one line."""


@dataclass
class ProbeResult:
    top1: float  # test accuracy in % of the reported head at the reported epoch
    epoch: int  # the reported epoch (1-based): the final one, or the one selected on validation
    val_top1: float | None  # validation accuracy in % of that epoch (None without a validation split)
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: epoch, train_loss, (val_top1)
    seconds: float = 0.0
    lr: float = 0.0  # the reported head's learning rate
    protocol: str = "final-epoch"  # "final-epoch" | "val-epoch" | "lr-sweep"
    sweep: list[dict[str, float]] | None = None  # per learning rate, in the given order: lr, val_top1, epoch
    backend: str = "eager"  # "eager" | "cuda-graph" | "reference"
    weight: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (C, D) reported head, CPU float32
    bias: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (C,)


@dataclass
class _Heads:
    """H linear heads after training, the reported epoch's weights of each (its best on validation, else final)."""
    weight: torch.Tensor  # (H, C, D) on the training device
    bias: torch.Tensor  # (H, C)
    train_loss: list[list[float]]  # [head][epoch] mean training cross-entropy
    val_top1: list[list[float]] | None  # [head][epoch] validation accuracy in % (None without a validation set)
    epoch: list[int]  # [head] reported epoch, 1-based
    backend: str


# ------------------------------------------------------------------------------------------- the recipe


def stratified_split(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded class-stratified split of indices 0..N-1: (train_idx, val_idx), both sorted int64 CPU.

    Each class c with n_c members gives round(fraction * n_c) of them to validation, but keeps at least
    one for training. Raises ProbeError if that leaves the validation set empty.
    """
    if not 0 < fraction < 1:
        raise ProbeError(f"validation fraction must be in (0, 1), got {fraction}")
    labels = labels.cpu()
    g = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(members.numel(), generator=g)]
        n_val = min(math.floor(fraction * members.numel() + 0.5), members.numel() - 1)
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    val_idx = torch.cat(val_parts).sort().values
    if val_idx.numel() == 0:
        raise ProbeError(f"validation fraction {fraction} leaves no validation example in {labels.numel()} "
                         "training features")
    return torch.cat(train_parts).sort().values, val_idx


def _init_head(dim: int, num_classes: int, seed: int) -> nn.Linear:
    """The head's start: ``nn.Linear(D, C)`` on the CPU in its default initialisation under ``seed``."""
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.manual_seed(seed)
        return nn.Linear(dim, num_classes)


def _shuffles(n: int, epochs: int, seed: int) -> torch.Tensor:
    """(epochs, N) int64 CPU: every epoch's order, from a CPU generator so that it is the same on every device."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(epochs)])


def _cosine(lr: float, total_steps: int) -> list[float]:
    """Learning rate of every step: 0.5 * lr * (1 + cos(pi * t / T)), annealed to 0 at step T."""
    return [0.5 * lr * (1 + math.cos(math.pi * t / total_steps)) for t in range(total_steps)]


@torch.no_grad()
def _correct(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Top-1 hits of H heads, (H,) float32 counts on the device, without a host sync (percentages are taken on
    the host, in double precision, so that 45 of 45 reads 100.0). x: (M, D); y: (M,); weight: (D, H, C); bias: (H, C).
    """
    d, h, c = weight.shape
    w, b = weight.reshape(d, h * c), bias.reshape(1, h * c)
    correct = torch.zeros(h, device=x.device)
    for i in range(0, x.shape[0], ACCURACY_CHUNK):
        logits = torch.addmm(b, x[i:i + ACCURACY_CHUNK], w).view(-1, h, c)  # (m, H, C)
        correct += (logits.argmax(2) == y[i:i + ACCURACY_CHUNK, None]).sum(0)
    return correct


def check_finite(what: str, train_feats: torch.Tensor, test_feats: torch.Tensor) -> None:
    """ProbeError (a ValueError) if a feature is NaN or infinite: it would vote or train silently wrong."""
    for name, feats in (("training", train_feats), ("test", test_feats)):
        if not feats.dtype.is_floating_point:
            raise TypeError(f"{what} needs floating-point {name} features, got {feats.dtype}")
        bad = int((~torch.isfinite(feats)).any(dim=1).sum()) if feats.numel() else 0
        if bad:
            raise ProbeError(f"{what}: {bad} of {feats.shape[0]} {name} features hold NaN or infinite values")


def _check(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
           test_labels: torch.Tensor, num_classes: int, epochs: int, lrs: Sequence[float], batch_size: int,
           val_fraction: float) -> None:
    if train_feats.dim() != 2 or test_feats.dim() != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ProbeError(f"linear probe needs (N, D) and (M, D) features, got {tuple(train_feats.shape)} and "
                         f"{tuple(test_feats.shape)}")
    if train_labels.shape != (train_feats.shape[0],) or test_labels.shape != (test_feats.shape[0],):
        raise ProbeError("linear probe needs one label per feature")
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise ProbeError("linear probe needs at least one training and one test feature")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"linear probe {name} must be a whole number, got {value!r}")
    if epochs < 1 or batch_size < 1 or not all(lr > 0 and math.isfinite(lr) for lr in lrs):
        raise ProbeError(f"linear probe needs epochs >= 1, batch size >= 1 and lr > 0, got {epochs}, "
                         f"{batch_size}, {','.join(f'{lr:g}' for lr in lrs)}")
    if len(set(lrs)) != len(lrs):
        raise ProbeError(f"linear probe learning rates must differ, got {','.join(f'{lr:g}' for lr in lrs)}")
    if not 0 <= val_fraction < 1:
        raise ProbeError(f"probe validation fraction must be in [0, 1), got {val_fraction}")
    if num_classes < 1:
        raise ProbeError(f"linear probe needs num_classes >= 1, got {num_classes}")
    check_finite("linear probe", train_feats, test_feats)
    for name, labels in (("training", train_labels), ("test", test_labels)):
        # Checked here because out-of-range labels would be a device-side assert inside the CUDA graph.
        if labels.dtype.is_floating_point or int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ProbeError(f"linear probe {name} labels must be integers in [0, {num_classes})")


def _prepare(train_feats: torch.Tensor, train_labels: torch.Tensor, val_fraction: float, seed: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Training (and validation) features as float32 and labels as int64 on ``device``; the split is taken
    where the features already are, so features on the GPU never travel to the host."""
    if val_fraction <= 0:
        return train_feats.to(device, torch.float32), train_labels.to(device, torch.long), None, None

    def take(t: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.index_select(0, idx.to(t.device)).to(device, dtype)

    tr_idx, val_idx = stratified_split(train_labels, val_fraction, seed)
    return (take(train_feats, tr_idx, torch.float32), take(train_labels, tr_idx, torch.long),
            take(train_feats, val_idx, torch.float32), take(train_labels, val_idx, torch.long))


def _head_hits(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Top-1 hits of one (C, D) head with (C,) bias: a 0-dim float32 count on the device."""
    return _correct(x, y, weight.T[:, None, :], bias[None])[0]


def _report(heads: _Heads, lrs: Sequence[float], sweeping: bool, test_feats: torch.Tensor,
            test_labels: torch.Tensor, device: torch.device, t0: float) -> ProbeResult:
    """The ProbeResult of the reported head: the one with the best validation accuracy (on a tie the smallest
    learning rate, whatever the order given), else the only one. The test set is used here, once, after training."""
    vals = heads.val_top1
    best = [vals[i][heads.epoch[i] - 1] for i in range(len(lrs))] if vals else None
    chosen = max(range(len(lrs)), key=lambda i: (best[i], -lrs[i])) if best else 0
    weight, bias = heads.weight[chosen], heads.bias[chosen]
    hits = _head_hits(weight, bias, test_feats.to(device, torch.float32), test_labels.to(device, torch.long))
    history = [{"epoch": e + 1, "train_loss": loss} | ({} if vals is None else {"val_top1": vals[chosen][e]})
               for e, loss in enumerate(heads.train_loss[chosen])]
    sweep = [{"lr": v, "val_top1": best[i], "epoch": heads.epoch[i]} for i, v in enumerate(lrs)] \
        if sweeping and best else None
    return ProbeResult(top1=100.0 * float(hits) / test_feats.shape[0], epoch=heads.epoch[chosen],
                       val_top1=best[chosen] if best else None, history=history, seconds=time.perf_counter() - t0,
                       lr=lrs[chosen], protocol="lr-sweep" if sweeping else "val-epoch" if vals else "final-epoch",
                       sweep=sweep, backend=heads.backend, weight=weight.detach().cpu().clone(),
                       bias=bias.detach().cpu().clone())


# ---------------------------------------------------------------------------------------- the reference


def reference_linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                           test_labels: torch.Tensor, num_classes: int, *, epochs: int = 100, lr: float = 0.03,
                           momentum: float = 0.9, weight_decay: float = 5e-5, batch_size: int = 100,
                           val_fraction: float = 0.0, seed: int = 0, device: torch.device | str = "cpu",
                           progress: bool = False) -> ProbeResult:
    """The recipe as a plain PyTorch loop (``nn.Linear``, ``F.cross_entropy``, ``torch.optim.SGD``): the
    reference :func:`linear_probe` is tested against; about 1 ms of launches per step on a GPU.

    Arguments and result as :func:`linear_probe` with a single ``lr``; ``backend`` is "reference".
    """
    _check(train_feats, train_labels, test_feats, test_labels, num_classes, epochs, [lr], batch_size, val_fraction)
    t0 = time.perf_counter()
    device = torch.device(device)
    x_tr, y_tr, x_val, y_val = _prepare(train_feats, train_labels, val_fraction, seed, device)
    n, d = x_tr.shape

    head = _init_head(d, num_classes, seed).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = iter(_cosine(lr, epochs * math.ceil(n / batch_size)))
    orders = _shuffles(n, epochs, seed)
    losses: list[float] = []
    vals: list[float] = []
    best_hits, epoch, weight, bias = -1.0, epochs, head.weight.detach(), head.bias.detach()

    for e in tqdm(range(epochs), desc="linear probe", unit="ep", disable=not progress, leave=False):
        perm = orders[e].to(device)
        total = torch.zeros((), device=device)  # the epoch's summed cross-entropy
        for idx in perm.split(batch_size):
            for group in opt.param_groups:
                group["lr"] = next(schedule)
            loss = F.cross_entropy(head(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * idx.numel()
        losses.append(float(total / n))
        if x_val is not None and y_val is not None:
            hits = float(_head_hits(head.weight.detach(), head.bias.detach(), x_val, y_val))
            vals.append(100.0 * hits / x_val.shape[0])
            if hits > best_hits:  # strict: the earliest epoch wins ties
                best_hits, epoch, weight, bias = hits, e + 1, head.weight.detach().clone(), head.bias.detach().clone()

    heads = _Heads(weight[None], bias[None], [losses], [vals] if vals else None, [epoch], "reference")
    return _report(heads, [lr], False, test_feats, test_labels, device, t0)


# ------------------------------------------------------------------------------------------ the fast probe


class _HeadTrainer:
    """H linear heads trained together with the recipe. ``epoch()`` runs one epoch with no host synchronisation
    and no host-to-device copy (every tensor on the device, read by device counters), so that on CUDA it can be
    captured once as a graph and replayed; ``state()`` lists the tensors it changes."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, lrs: Sequence[float], *, epochs: int,
                 momentum: float, weight_decay: float, batch_size: int, seed: int,
                 x_val: torch.Tensor | None = None, y_val: torch.Tensor | None = None) -> None:
        dev = x.device
        n, d = x.shape
        h, c = len(lrs), num_classes
        k = -(-(d + 1) // ROW_ALIGN) * ROW_ALIGN
        self.n, self.d, self.h, self.c, self.k = n, d, h, c, k
        self.batch_size, self.momentum, self.weight_decay = batch_size, momentum, weight_decay
        self.steps = math.ceil(n / batch_size)
        self.x_val, self.y_val = x_val, y_val

        # Read-only tables, built once.
        self.x1 = torch.zeros(n, k, device=dev)  # (N, K): features, a one (the bias input) at D, zero padding
        self.x1[:, :d] = x
        self.x1[:, d] = 1.0
        self.y = y
        self.classes = torch.arange(c, device=dev)
        # (epochs, N), the reference's orders; int32 halves the table (index_select takes either).
        self.orders = _shuffles(n, epochs, seed).to(dev, torch.int32 if n < 2**31 else torch.int64)
        lr_steps = torch.tensor([_cosine(lr, epochs * self.steps) for lr in lrs], dtype=torch.float32)  # (H, T)
        self.lr_table = lr_steps.T.reshape(epochs, self.steps, h).contiguous().to(dev)  # (epochs, steps, H)

        # Mutable state. All heads start from the same seeded nn.Linear initialisation.
        head = _init_head(d, c, seed)
        self.wb = torch.zeros(k, h, c, device=dev)  # (K, H, C): rows 0..D-1 weights, row D bias, then zeros
        self.wb[:d] = head.weight.detach().T[:, None, :].to(dev)
        self.wb[d] = head.bias.detach().to(dev)
        self.buf = torch.zeros_like(self.wb)  # momentum; from zeros == torch's buf = g on the first step
        self.epoch_t = torch.zeros(1, dtype=torch.long, device=dev)  # epochs done
        self.rows = torch.arange(epochs, device=dev)[:, None]  # (epochs, 1): picks this epoch's row of a table
        self.loss = torch.zeros(epochs, h, device=dev)  # (epochs, H) mean training cross-entropy
        self.nll = torch.zeros(n, h, 1, device=dev)  # (N, H, 1) this epoch's log-likelihoods, overwritten
        self.val = torch.full((epochs, h), float("nan"), device=dev)  # (epochs, H) validation hits
        self.best_val = torch.full((h,), -1.0, device=dev)
        self.best_epoch = torch.full((h,), epochs, dtype=torch.long, device=dev)
        self.best_wb = self.wb.clone()

    def state(self) -> list[torch.Tensor]:
        return [self.wb, self.buf, self.epoch_t, self.loss, self.nll, self.val, self.best_val, self.best_epoch,
                self.best_wb]

    @torch.no_grad()
    def epoch(self) -> None:
        n, d, h, c, k, bs = self.n, self.d, self.h, self.c, self.k, self.batch_size
        w2 = self.wb.view(k, h * c)
        order = self.orders.index_select(0, self.epoch_t).view(n)  # (N,) this epoch's shuffle
        y = self.y.index_select(0, order)  # (N,) labels in that order
        # (N, 1, C): one_hot would check the labels' range on the host; a comparison does not.
        onehot = (y[:, None] == self.classes).to(torch.float32)[:, None, :]
        lrs = self.lr_table.index_select(0, self.epoch_t).view(self.steps, 1, h, 1)  # (steps, 1, H, 1)
        for s in range(self.steps):
            lo, hi = s * bs, min(n, (s + 1) * bs)
            x = self.x1.index_select(0, order[lo:hi])  # (b, K)
            logp = torch.log_softmax((x @ w2).view(-1, h, c), dim=2)  # (b, H, C)
            torch.gather(logp, 2, y[lo:hi, None, None].expand(-1, h, 1), out=self.nll[lo:hi])
            # d(mean cross-entropy)/d(logits) = (softmax - onehot) / b, the 1/b folded into the matmul below.
            p = logp.exp_().sub_(onehot[lo:hi])
            # torch.optim.SGD: g = grad + wd * w; buf = momentum * buf + g; w -= lr * buf.
            g = torch.addmm(w2, x.T, p.view(-1, h * c), beta=self.weight_decay, alpha=1.0 / (hi - lo))  # (K, H*C)
            torch.add(g.view(k, h, c), self.buf, alpha=self.momentum, out=self.buf)
            self.wb.addcmul_(self.buf, lrs[s], value=-1.0)
        # Rows are written by torch.where rather than index_copy_, which has no deterministic CUDA kernel.
        this = self.rows == self.epoch_t  # (epochs, 1)
        self.loss.copy_(torch.where(this, self.nll.sum(0).view(1, h).div_(-n), self.loss))
        if self.x_val is not None and self.y_val is not None:
            acc = _correct(self.x_val, self.y_val, self.wb[:d], self.wb[d])  # (H,) hits
            self.val.copy_(torch.where(this, acc.view(1, h), self.val))
            better = acc > self.best_val  # strict: the earliest epoch wins ties
            self.best_val.copy_(torch.where(better, acc, self.best_val))
            self.best_epoch.copy_(torch.where(better, self.epoch_t + 1, self.best_epoch))
            self.best_wb.copy_(torch.where(better.view(1, h, 1), self.wb, self.best_wb))
        self.epoch_t.add_(1)

    def rehearse(self, epochs: int) -> None:
        """Run ``epochs`` epochs, each from the current state, and put the state back as it was."""
        start = [t.clone() for t in self.state()]
        for _ in range(epochs):
            self.epoch()
            for t, t0 in zip(self.state(), start):
                t.copy_(t0)

    def heads(self, backend: str) -> _Heads:
        """Every head at its reported epoch (best on validation, else final); the one host sync of training."""
        wb = self.wb if self.x_val is None else self.best_wb
        vals = [[100.0 * v / self.x_val.shape[0] for v in row] for row in self.val.T.tolist()] \
            if self.x_val is not None else None
        # best_epoch stays at the final epoch without a validation split
        return _Heads(weight=wb[:self.d].permute(1, 2, 0).contiguous(), bias=wb[self.d].clone(),
                      train_loss=self.loss.T.tolist(), val_top1=vals, epoch=self.best_epoch.tolist(), backend=backend)


def _resolve_backend(backend: str, device: torch.device) -> str:
    """The backend to run: "auto" is cuda-graph on CUDA and eager elsewhere; ProbeError if the device cannot."""
    if backend not in BACKENDS:
        raise ProbeError(f"probe backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "cuda-graph" if device.type == "cuda" else "eager"
    if backend == "cuda-graph" and device.type != "cuda":
        raise ProbeError(f"the cuda-graph probe backend needs a CUDA device, got {device}")
    return backend


def _train_heads(x: torch.Tensor, y: torch.Tensor, num_classes: int, lrs: Sequence[float], *, backend: str = "auto",
                 progress: bool = False, **settings: Any) -> _Heads:
    """Train one head per learning rate on x: (N, D) float32, y: (N,) int64, on x's device, with the
    :class:`_HeadTrainer` ``settings``; with (x_val, y_val) each head keeps the weights of its best validation epoch
    (earliest on ties)."""
    backend = _resolve_backend(backend, x.device)
    new_trainer = functools.partial(_HeadTrainer, x, y, num_classes, lrs, **settings)
    epochs = settings["epochs"]
    trainer = new_trainer()
    if backend == "cuda-graph":
        try:
            _graphed_epochs(trainer, epochs, progress)
        except Exception as e:  # at capture or replay: the eager probe computes the same heads
            fall_back("CUDA-graphed linear probe", "the eager probe", e)
            backend, trainer = "eager", new_trainer()  # from the start: a failed replay may have run part of it
    if backend == "eager":
        for _ in tqdm(range(epochs), desc="linear probe", unit="ep", disable=not progress, leave=False):
            trainer.epoch()
    return trainer.heads(backend)


def _graphed_epochs(trainer: _HeadTrainer, epochs: int, progress: bool) -> None:
    """``epochs`` epochs of ``trainer`` as the replays of one epoch captured as a CUDA graph, after warm-up epochs
    on a side stream that are then undone."""
    with torch.cuda.device(trainer.x1.device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            trainer.rehearse(GRAPH_WARMUP_EPOCHS)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Captured on the warm-up stream: BLAS handles and workspaces are cached per stream, and one created
        # lazily during capture is not capturable on every platform.
        with torch.cuda.graph(graph, stream=side):
            trainer.epoch()  # recorded, not run: the state is still the starting one
        for _ in tqdm(range(epochs), desc="linear probe", unit="ep", disable=not progress, leave=False):
            graph.replay()
            if progress:  # a bar that tells the truth costs one sync per epoch; none without one
                torch.cuda.current_stream().synchronize()


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, *, epochs: int = 100, lr: float = 0.03,
                 lrs: Sequence[float] | None = None, momentum: float = 0.9, weight_decay: float = 5e-5,
                 batch_size: int = 100, val_fraction: float = 0.0, seed: int = 0,
                 device: torch.device | str = "cpu", progress: bool = False, backend: str = "auto") -> ProbeResult:
    """Linear probe on frozen features with the official recipe (see the module docstring), launch-free.

    Args:
        train_feats: (N, D), train_labels: (N,); test_feats: (M, D), test_labels: (M,); on any device, moved to
            ``device`` (features already there are not copied to the host).
        lr: the official single-head probe's learning rate; ignored when ``lrs`` is given.
        lrs: a sweep ("lr-sweep"): one head per learning rate, trained together; the head with the best validation
            accuracy (ties: the smallest learning rate) is reported. Needs ``val_fraction`` > 0.
        val_fraction: 0 -> report the final epoch ("final-epoch"); > 0 -> train on the rest of a seeded
            class-stratified split of the *training* features (:func:`stratified_split`) and report the epoch
            with the best validation accuracy, earliest on ties ("val-epoch"). The test set is used once, after
            training, for the reported head only.
        seed: seeds the head's initialisation, the split and the shuffles, as :func:`reference_linear_probe`'s.
        backend: "cuda-graph" (one epoch captured and replayed), "eager" (the same ops one by one), or "auto"
            (cuda-graph on CUDA). ``ProbeResult.backend`` says which ran.
    """
    sweeping = lrs is not None
    heads_lrs = [float(v) for v in lrs] if lrs is not None else [float(lr)]
    if sweeping and not heads_lrs:
        raise ProbeError("a linear-probe sweep needs at least one learning rate")
    _check(train_feats, train_labels, test_feats, test_labels, num_classes, epochs, heads_lrs, batch_size,
           val_fraction)
    if sweeping and val_fraction <= 0:
        raise ProbeError("a linear-probe learning-rate sweep chooses on a validation split: val_fraction must be > 0")
    t0 = time.perf_counter()
    device = torch.device(device)
    x_tr, y_tr, x_val, y_val = _prepare(train_feats, train_labels, val_fraction, seed, device)

    heads = _train_heads(x_tr, y_tr, num_classes, heads_lrs, epochs=epochs, momentum=momentum,
                         weight_decay=weight_decay, batch_size=batch_size, seed=seed, x_val=x_val, y_val=y_val,
                         backend=backend, progress=progress)
    return _report(heads, heads_lrs, sweeping, test_feats, test_labels, device, t0)
