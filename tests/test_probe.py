"""The fast linear probe against the plain PyTorch loop (same seed, same order), the sweep's heads against
single-lr probes, the sweep's choice, and the graph-safety of one epoch (no host sync, no host-to-device copy)."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from empssl.probe import (
    ProbeError,
    ProbeResult,
    _HeadTrainer,
    _train_heads,
    linear_probe,
    reference_linear_probe,
    stratified_split,
)

C, D = 5, 48


def blobs(n: int, noise: float, seed: int, num_classes: int = C, dim: int = D, spread: float = 1.0):
    """(n, dim) Gaussian blobs around fixed class centres (shared by every seed) and (n,) interleaved labels."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0)) * spread
    labels = torch.arange(num_classes).repeat(n // num_classes + 1)[:n]
    feats = centres[labels] + noise * torch.randn(n, dim, generator=torch.Generator().manual_seed(100 + seed))
    return feats, labels


@pytest.fixture(scope="module")
def noisy():
    """Overlapping classes: validation accuracy moves from epoch to epoch."""
    return (*blobs(230, 3.0, seed=1), *blobs(100, 3.0, seed=2))


def assert_same_probe(fast: ProbeResult, ref: ProbeResult) -> None:
    assert (fast.weight - ref.weight).abs().max() < 1e-5
    assert (fast.bias - ref.bias).abs().max() < 1e-5
    assert (fast.epoch, fast.val_top1, fast.top1, fast.protocol) == (ref.epoch, ref.val_top1, ref.top1, ref.protocol)
    assert [h["epoch"] for h in fast.history] == [h["epoch"] for h in ref.history]
    for a, b in zip(fast.history, ref.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a.get("val_top1") == b.get("val_top1")


# ------------------------------------------------------------------------------- fast == reference


@pytest.mark.parametrize("batch_size", [32, 23, 1000])  # a last partial batch; exact batches; one batch > N
def test_fast_probe_equals_reference_final_epoch(noisy, batch_size):
    x, y, xt, yt = noisy
    kw = {"epochs": 4, "lr": 0.1, "batch_size": batch_size, "seed": 3}
    fast = linear_probe(x, y, xt, yt, C, **kw)
    ref = reference_linear_probe(x, y, xt, yt, C, **kw)
    assert (fast.protocol, fast.backend, ref.backend, fast.epoch, fast.lr) == ("final-epoch", "eager", "reference",
                                                                            4, 0.1)
    assert fast.weight.shape == (C, D) and fast.bias.shape == (C,) and fast.sweep is None
    assert_same_probe(fast, ref)
    assert ref.history[-1]["train_loss"] < ref.history[0]["train_loss"]


def test_fast_probe_equals_reference_val_epoch():
    x, y, xt, yt = *blobs(230, 2.0, seed=1), *blobs(100, 2.0, seed=2)
    kw = {"epochs": 5, "lr": 0.03, "batch_size": 16, "val_fraction": 0.2, "seed": 1}
    fast = linear_probe(x, y, xt, yt, C, **kw)
    ref = reference_linear_probe(x, y, xt, yt, C, **kw)
    vals = [h["val_top1"] for h in ref.history]
    # For this test to bite: the best epoch is neither the first nor the last, and a later epoch ties it.
    assert 1 < ref.epoch < 5 and vals.count(max(vals)) > 1
    assert ref.val_top1 == max(vals) and ref.epoch == vals.index(max(vals)) + 1
    assert fast.protocol == "val-epoch"
    assert_same_probe(fast, ref)


def test_probe_accuracy_is_a_plain_percentage(noisy):
    x, y, xt, yt = noisy
    res = linear_probe(x, y, xt, yt, C, epochs=2, val_fraction=0.2)
    n_val = stratified_split(y, 0.2)[1].numel()
    for v, n in [(h["val_top1"], n_val) for h in res.history] + [(res.top1, len(yt))]:
        assert v * n / 100 == pytest.approx(round(v * n / 100), abs=1e-9)  # hits * 100 / n in double precision
    logits = xt @ res.weight.T + res.bias
    assert res.top1 == pytest.approx(100.0 * (logits.argmax(1) == yt).double().mean().item())


# ----------------------------------------------------------------------------------------------- sweep


def test_sweep_heads_are_independent(noisy):
    x, y, _, _ = noisy
    x_val, y_val = x[:50], y[:50]
    kw = {"epochs": 3, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 32, "seed": 5, "x_val": x_val,
          "y_val": y_val}
    lrs = [0.01, 0.1, 0.3]  # weights of O(1): 1e-5 is then a few hundred float32 roundings
    together = _train_heads(x[50:], y[50:], C, lrs, **kw)
    assert together.weight.shape == (3, C, D) and together.bias.shape == (3, C)
    for i, lr in enumerate(lrs):
        alone = _train_heads(x[50:], y[50:], C, [lr], **kw)
        assert (together.weight[i] - alone.weight[0]).abs().max() < 1e-5
        assert (together.bias[i] - alone.bias[0]).abs().max() < 1e-5
        assert together.epoch[i] == alone.epoch[0]
        assert together.val_top1[i] == alone.val_top1[0]
        assert together.train_loss[i] == pytest.approx(alone.train_loss[0], abs=1e-5)


def test_sweep_reports_every_head_and_the_chosen_one(noisy):
    x, y, xt, yt = noisy
    kw = {"epochs": 4, "batch_size": 20, "val_fraction": 0.2, "seed": 2}
    sweep = linear_probe(x, y, xt, yt, C, lrs=[0.01, 0.1, 1.0], **kw)
    assert sweep.protocol == "lr-sweep" and [s["lr"] for s in sweep.sweep] == [0.01, 0.1, 1.0]
    for s in sweep.sweep:
        single = linear_probe(x, y, xt, yt, C, lr=s["lr"], **kw)
        assert (s["val_top1"], s["epoch"]) == (single.val_top1, single.epoch)
        if s["lr"] == sweep.lr:
            assert (sweep.top1, sweep.epoch, sweep.val_top1) == (single.top1, single.epoch, single.val_top1)
            assert (sweep.weight - single.weight).abs().max() < 1e-5
            assert [h["val_top1"] for h in sweep.history] == [h["val_top1"] for h in single.history]
    assert sweep.val_top1 == max(s["val_top1"] for s in sweep.sweep)


def test_sweep_chooses_the_learning_rate_that_works():
    # Tight blobs: a tiny lr leaves the random head where it started; a huge lr makes the weight-decay term
    # alone blow the weights up (lr * wd far above the 2 * (1 + momentum) stability limit) to inf / NaN within
    # the first epoch; only the middle one fits.
    x, y = blobs(200, 0.3, seed=3)
    xt, yt = blobs(100, 0.3, seed=4)
    res = linear_probe(x, y, xt, yt, C, lrs=[1e-5, 0.1, 1e9], epochs=4, batch_size=10, val_fraction=0.2)
    got = {s["lr"]: s["val_top1"] for s in res.sweep}
    assert set(got) == {1e-5, 0.1, 1e9}
    assert res.lr == 0.1 and res.protocol == "lr-sweep"
    assert got[0.1] == 100.0 and got[1e-5] < 60.0 and got[1e9] <= 20.0 + 1e-9  # 20%: one constant class
    assert res.top1 == 100.0 and res.val_top1 == 100.0
    assert all(torch.isfinite(t).all() for t in (res.weight, res.bias))


def test_sweep_tie_goes_to_the_smallest_learning_rate():
    x, y = blobs(100, 0.1, seed=5, spread=4.0)
    xt, yt = blobs(50, 0.1, seed=6, spread=4.0)
    res = linear_probe(x, y, xt, yt, C, lrs=[0.5, 0.2, 0.3], epochs=3, batch_size=10, val_fraction=0.2)
    assert [s["val_top1"] for s in res.sweep] == [100.0] * 3, "all heads should tie for this test to mean something"
    assert res.lr == 0.2


# ----------------------------------------------------------------------------------- graph safety


class _HostSyncs(TorchDispatchMode):
    """Records the ops that would synchronise with the host or copy from it (and so break a CUDA graph)."""
    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
               "equal", "is_nonzero", "one_hot", "lift_fresh", "repeat_interleave"}

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.seen.add(name)
        kwargs = kwargs or {}
        if name == "copy_":
            moves = args[1].device != args[0].device
        else:
            moves = name == "_to_copy" and kwargs.get("device", args[0].device) != args[0].device
        boolean_index = name == "index" and any(t is not None and t.dtype == torch.bool for t in args[1])
        if name in self.SYNCING or moves or boolean_index:
            self.ops.append(name)
        return func(*args, **kwargs)


def test_one_epoch_has_no_host_sync(noisy):
    x, y, _, _ = noisy
    trainer = _HeadTrainer(x[40:], y[40:], C, [0.1, 0.3], epochs=2, momentum=0.9, weight_decay=5e-5, batch_size=32,
                           seed=0, x_val=x[:40], y_val=y[:40])
    with _HostSyncs() as mode:
        trainer.epoch()
    assert "addmm" in mode.seen and "index_select" in mode.seen  # the mode did see the step
    assert mode.ops == []
    with _HostSyncs() as mode:  # and it does catch a sync
        trainer.epoch_t.item()
    assert mode.ops == ["_local_scalar_dense"]


def test_warm_up_before_capture_leaves_no_trace(noisy):
    x, y, _, _ = noisy
    kw = {"epochs": 3, "momentum": 0.9, "weight_decay": 5e-5, "batch_size": 32, "seed": 1, "x_val": x[:40],
          "y_val": y[:40]}
    plain = _HeadTrainer(x[40:], y[40:], C, [0.1, 1.0], **kw)
    rehearsed = _HeadTrainer(x[40:], y[40:], C, [0.1, 1.0], **kw)
    rehearsed.rehearse(2)
    for t in (plain, rehearsed):
        for _ in range(3):
            t.epoch()
    for a, b in zip(plain.state(), rehearsed.state()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- protocol, errors, RNG


def test_probe_is_deterministic_and_leaves_the_global_rng_alone(noisy):
    x, y, xt, yt = noisy
    kw = {"epochs": 3, "batch_size": 32, "val_fraction": 0.2, "lrs": [0.03, 0.3]}
    state = torch.get_rng_state()
    a = linear_probe(x, y, xt, yt, C, seed=7, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    b = linear_probe(x, y, xt, yt, C, seed=7, progress=True, **kw)
    c = linear_probe(x, y, xt, yt, C, seed=8, **kw)
    for field in ("top1", "epoch", "val_top1", "history", "lr", "sweep", "protocol"):
        assert getattr(a, field) == getattr(b, field)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert a.history != c.history


def test_probe_accepts_other_dtypes(noisy):
    x, y, xt, yt = noisy
    a = linear_probe(x, y, xt, yt, C, epochs=2)
    b = linear_probe(x.double(), y.int(), xt.double(), yt.int(), C, epochs=2)
    assert (b.weight - a.weight).abs().max() < 1e-5 and b.top1 == a.top1


def test_probe_input_errors():
    x, y = torch.randn(10, 4), torch.arange(10) % 2
    cases = [
        ({"test_feats": torch.randn(3, 5)}, "(N, D) and (M, D)"),
        ({"train_labels": y[:5]}, "one label per feature"),
        ({"train_feats": x[:0], "train_labels": y[:0]}, "at least one"),
        ({"epochs": 0}, "epochs >= 1"),
        ({"batch_size": 0}, "batch size >= 1"),
        ({"lr": 0.0}, "lr > 0"),
        ({"lrs": [0.1, -1.0], "val_fraction": 0.2}, "lr > 0"),
        ({"lrs": [0.1, 0.1], "val_fraction": 0.2}, "must differ"),
        ({"lrs": [], "val_fraction": 0.2}, "at least one learning rate"),
        ({"lrs": [0.1, 0.3]}, "val_fraction must be > 0"),
        ({"val_fraction": 1.0}, "[0, 1)"),
        ({"train_labels": y + 1}, "labels must be integers in [0, 2)"),
        ({"backend": "fast"}, "auto, eager, cuda-graph"),
        ({"backend": "cuda-graph"}, "needs a CUDA device"),
    ]
    for kwargs, message in cases:
        args = {"train_feats": x, "train_labels": y, "test_feats": x, "test_labels": y} | kwargs
        with pytest.raises(ProbeError, match=re.escape(message)):
            linear_probe(args.pop("train_feats"), args.pop("train_labels"), args.pop("test_feats"),
                         args.pop("test_labels"), 2, **args)
    with pytest.raises(ProbeError, match="leaves no validation example"):
        linear_probe(torch.randn(3, 4), torch.arange(3), x, y, 3, val_fraction=0.3)
    with pytest.raises(ProbeError):
        reference_linear_probe(x, y, torch.randn(3, 5), y[:3], 2)


# ------------------------------------------------------------------------------ CUDA (where there is one)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_graph_probe_equals_eager_and_reference(noisy):
    x, y, xt, yt = (t.cuda() for t in noisy)  # features already on the GPU, as extraction leaves them
    kw = {"epochs": 4, "lr": 0.03, "batch_size": 32, "val_fraction": 0.2, "seed": 1, "device": "cuda"}
    graph = linear_probe(x, y, xt, yt, C, **kw)
    eager = linear_probe(x, y, xt, yt, C, backend="eager", **kw)
    assert (graph.backend, eager.backend) == ("cuda-graph", "eager")
    assert_same_probe(graph, eager)
    assert_same_probe(graph, reference_linear_probe(x, y, xt, yt, C, **kw))
    sweep = linear_probe(x, y, xt, yt, C, lrs=[0.01, 0.03, 0.3], **kw)
    sweep_eager = linear_probe(x, y, xt, yt, C, lrs=[0.01, 0.03, 0.3], backend="eager", **kw)
    assert (sweep.lr, sweep.sweep) == (sweep_eager.lr, sweep_eager.sweep)
    assert (sweep.weight - sweep_eager.weight).abs().max() < 1e-5


@cuda
def test_cuda_epoch_has_no_host_sync(noisy):
    x, y, _, _ = (t.cuda() for t in noisy)
    trainer = _HeadTrainer(x[40:], y[40:], C, [0.1, 0.3], epochs=2, momentum=0.9, weight_decay=5e-5, batch_size=32,
                           seed=0, x_val=x[:40], y_val=y[:40])
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.epoch()
    finally:
        torch.cuda.set_sync_debug_mode("default")
