"""Step batches: the same images per step whether resident or streamed by the background thread, per rank."""

import threading

import pytest
import torch

from empssl.batches import StepBatches, epoch_permutation

N, B = 50, 8  # 6 steps per epoch, 2 images dropped


@pytest.fixture
def images() -> torch.Tensor:
    # image i is filled with the value i, so a batch says which images it holds
    return torch.arange(N, dtype=torch.uint8).view(N, 1, 1, 1).expand(N, 3, 4, 4).contiguous()


def ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0, 0, 0].tolist()


def step_indices(step: int, n_images: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """The rule of the module docstring, written out: rank r of N takes its slice of perm_e[p*B:(p+1)*B]."""
    epoch, pos = divmod(step, n_images // batch_size)
    b = batch_size // world
    start = pos * batch_size + rank * b
    return epoch_permutation(n_images, seed, epoch)[start:start + b]


def test_indices_are_the_seeded_per_epoch_permutation():
    # the order runs trained before this module existed used: randperm seeded with seed * 10007 + epoch
    ref = torch.randperm(N, generator=torch.Generator().manual_seed(3 * 10007 + 1))
    assert torch.equal(epoch_permutation(N, 3, 1), ref)
    assert step_indices(6 + 2, N, B, seed=3).tolist() == ref[16:24].tolist()  # epoch 1, position 2
    halves = [step_indices(8, N, B, seed=3, rank=r, world=2).tolist() for r in range(2)]
    assert halves[0] + halves[1] == ref[16:24].tolist()


@pytest.mark.parametrize("stream", [False, True])
def test_batches_from_a_resumed_step_across_epochs(images, stream):
    with StepBatches(images, batch_size=B, seed=5, start_step=4, total_steps=15, device="cpu", stream=stream) as sb:
        got = [ids(b) for b in sb]
    assert got == [step_indices(t, N, B, seed=5).tolist() for t in range(4, 15)]


@pytest.mark.parametrize("stream", [False, True])
def test_ranks_split_each_global_batch(images, stream):
    per_rank = []
    for rank in range(4):
        sb = StepBatches(images, batch_size=B, seed=0, start_step=0, total_steps=7, device="cpu", rank=rank,
                         world=4, stream=stream)
        per_rank.append([ids(b) for b in sb])
    for t in range(7):
        assert sum((per_rank[r][t] for r in range(4)), []) == step_indices(t, N, B, seed=0).tolist()


def test_leaving_early_stops_the_thread(images):
    sb = StepBatches(images, batch_size=B, seed=0, start_step=0, total_steps=1000, device="cpu", stream=True,
                     prefetch=2)
    it = iter(sb)
    next(it)
    assert any(t.name == "empssl-batches_0" for t in threading.enumerate())
    sb.close()
    assert not any(t.name == "empssl-batches_0" and t.is_alive() for t in threading.enumerate())


def test_errors_in_the_thread_reach_the_loop(images, monkeypatch):
    def broken(*args, **kw):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(torch, "index_select", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        next(iter(StepBatches(images, batch_size=B, seed=0, start_step=0, total_steps=3, device="cpu", stream=True)))


def test_batch_must_split_evenly():
    with pytest.raises(ValueError, match="divisible"):
        StepBatches(torch.zeros(20, 3, 2, 2, dtype=torch.uint8), batch_size=10, seed=0, start_step=0, total_steps=1,
                    device="cpu", world=3)
