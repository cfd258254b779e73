"""The batch sources the training loop iterates (the streamed tier's: :class:`empssl.stream.StreamBatches`).

In memory, step t (epoch e = t // S, position p = t % S, S steps per epoch, drop_last as the official loader)
takes the B images ``perm_e[p*B:(p+1)*B]`` of a seeded per-epoch permutation, so a resumed run sees the same
batches; under torchrun, rank r of N takes the slice r*b:(r+1)*b of them (b = B / N). Images resident on the
training device (e.g. CIFAR's 150 MB on the GPU) give a batch by one on-device gather, with no host synchronisation
in the step; images in host memory are gathered into pinned memory by a background thread while the GPU works, and
copied with ``non_blocking=True`` (PyTorch's pinned-memory cache does not hand a buffer out again before its copy
has finished). A user's own iterable of batches is :class:`IterableBatches`.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import torch

from .errors import ConfigError


class BatchSource(Protocol):
    """What :func:`empssl.train.loop` iterates: (b, 3, H, W) uint8 batches on the training device, one per step;
    ``steps_per_epoch`` 0 where unknown (a stream being filled). ``state_dict()``, saved with every checkpoint, goes
    back to ``load_state_dict()`` before ``__iter__`` on resume; leaving the ``with`` block stops any background work.
    """

    steps_per_epoch: int

    def __iter__(self) -> Iterator[torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def __enter__(self) -> BatchSource: ...

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None: ...


def epoch_permutation(n_images: int, seed: int, epoch: int) -> torch.Tensor:
    """The (n_images,) int64 CPU permutation of ``epoch``, the same on every rank and every resume."""
    return torch.randperm(n_images, generator=torch.Generator().manual_seed(seed * 10007 + epoch))


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class StepBatches:
    """The (b, 3, H, W) uint8 batches of steps ``start_step`` .. ``total_steps - 1`` on ``device``, from ``images``
    (N, 3, H, W) uint8 on ``device`` or in host memory; b = ``batch_size`` (the global B) / world. ``stream``: None
    streams when ``images`` are not on ``device``; True forces the background thread (tests); ``prefetch``: batches
    it may prepare ahead."""

    def __init__(self, images: torch.Tensor, *, batch_size: int, seed: int, total_steps: int, start_step: int = 0,
                 device: torch.device | str, rank: int = 0, world: int = 1, stream: bool | None = None,
                 prefetch: int = 3) -> None:
        self.images, self.device, self.n = images, torch.device(device), images.shape[0]
        self.batch_size, self.seed, self.steps_per_epoch = batch_size, seed, self.n // batch_size
        if self.steps_per_epoch < 1 or batch_size % world:
            raise ValueError(f"batch size {batch_size} must be <= {self.n} images and divisible by {world} ranks")
        self.step, self.total, self.rank, self.b = start_step, total_steps, rank, batch_size // world
        self.stream = not _same_device(images.device, self.device) if stream is None else stream
        self.prefetch = prefetch
        self._batches: Generator[torch.Tensor, None, None] | None = None

    def __enter__(self) -> StepBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._batches = self._streamed() if self.stream else self._resident()
        for batch in self._batches:
            self.step += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])

    def _rows(self) -> Iterator[torch.Tensor]:
        """This rank's (b,) rows of ``images`` for every step, on their device: the epoch's permutation is copied
        there once, from pinned memory so that the copy does not wait for the GPU to drain its queue."""
        first, device = self.step, self.images.device
        for step in range(first, self.total):
            epoch, pos = divmod(step, self.steps_per_epoch)
            if step == first or pos == 0:
                perm = epoch_permutation(self.n, self.seed, epoch)
                perm = (perm.pin_memory() if device.type == "cuda" else perm).to(device, non_blocking=True)
            start = pos * self.batch_size + self.rank * self.b
            yield perm[start:start + self.b]

    def _resident(self) -> Generator[torch.Tensor, None, None]:
        for rows in self._rows():
            yield self.images.index_select(0, rows).to(self.device, non_blocking=True)

    def _gathered(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.empty((self.b, *self.images.shape[1:]), dtype=self.images.dtype,
                          pin_memory=self.device.type == "cuda")
        return torch.index_select(self.images, 0, rows, out=out)

    def _streamed(self) -> Generator[torch.Tensor, None, None]:
        with ThreadPoolExecutor(1, thread_name_prefix="empssl-batches") as thread:
            gathering = (thread.submit(self._gathered, rows) for rows in self._rows())
            ahead = deque(itertools.islice(gathering, self.prefetch + 1))  # the batch handed out next, and more
            while ahead:
                ahead.extend(itertools.islice(gathering, 1))
                yield ahead.popleft().result().to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the background thread (if any) and wait for it."""
        if self._batches is not None:
            self._batches.close()


class IterableBatches:
    """A user's own batches as a :class:`BatchSource`: any iterable ``data`` of (b, 3, H, W) uint8 tensors or of
    (images, labels, ...) tuples (labels are not used), e.g. a torch DataLoader, moved to ``device``.

    One pass over ``data`` is one epoch of ``len(data)`` steps, which set the run's length and its learning-rate
    schedule; every batch holds ``batch_size`` images of one size (a DataLoader: drop_last). The state is
    ``data.state_dict()`` where ``data`` has one (torchdata's StatefulDataLoader, LitData's StreamingDataLoader, a
    user's class); a run resumes only where ``data`` also has ``load_state_dict()``.
    """

    def __init__(self, data: Iterable[Any], *, batch_size: int, device: torch.device | str,
                 image_size: int = 0) -> None:
        name = type(data).__name__
        try:
            self.steps_per_epoch = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise ConfigError(f"data= ({name}) has no len(): the number of steps of an epoch sets the run's length and "
                              f"its learning-rate schedule; give it __len__ (a DataLoader over a sized dataset has "
                              f"one)") from None
        if self.steps_per_epoch < 1:
            raise ConfigError(f"data= ({name}) holds no batch")
        if isinstance(data, torch.utils.data.DataLoader) and data.batch_size is not None:  # known before its first
            short = not data.drop_last and len(data.dataset) % data.batch_size  # type: ignore[arg-type]
            if data.batch_size != batch_size or short:
                raise ConfigError(f"data= gives batches of {data.batch_size} images"
                                  f"{', the last one short' * bool(short)}; every step trains on "
                                  f"batch_size={batch_size}: make them agree{' and pass drop_last=True' * bool(short)}")
        self.data, self.batch_size, self.device, self.size = data, batch_size, torch.device(device), image_size
        self.shape: tuple[int, ...] | None = None  # the first batch's (3, H, W): every batch's
        self._passes: Generator[torch.Tensor, None, None] | None = None

    def __enter__(self) -> IterableBatches:
        return self

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        if self._passes is not None:  # drops data's iterator now: a DataLoader's workers stop with it
            self._passes.close()

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._passes = self._epochs()
        return self._passes

    def _epochs(self) -> Generator[torch.Tensor, None, None]:
        for epoch in itertools.count():  # the loop stops at its last step
            batch = None
            for batch in self.data:
                yield self._checked(batch).to(self.device, non_blocking=True)
            if batch is None and epoch:  # (the first pass after a resume may be the end of a finished epoch)
                raise ConfigError(f"data= ({type(self.data).__name__}) yielded no batch in a whole pass")

    def _checked(self, batch: Any) -> torch.Tensor:
        """The images of ``batch``, or ConfigError naming what was expected."""
        images = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        want = self.shape or ((3, self.size, self.size) if self.size else None)
        if (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.dim() == 4
                and images.shape[0] == self.batch_size and images.shape[1] == 3
                and (want is None or images.shape[1:] == want)):
            self.shape = tuple(images.shape[1:])
            return images
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        shape = ", ".join(map(str, (self.batch_size, *(want or (3, "H", "W")))))
        raise ConfigError(f"data= gave a batch of {got}; expected uint8 images ({shape}) (0-255, not normalised; one "
                          f"size in every batch), or (images, labels) pairs of them")

    def state_dict(self) -> dict[str, Any]:
        save = getattr(self.data, "state_dict", None)
        return {"data": save()} if callable(save) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load = getattr(self.data, "load_state_dict", None)
        if not callable(load) or "data" not in state:
            why = (f"data= ({type(self.data).__name__}) has no state_dict() / load_state_dict()" if not callable(load)
                   else "the checkpoint holds no state of data=")
            raise ConfigError(f"cannot resume at the batch where the run stopped: {why}; give a source that has "
                              f"them (torchdata's StatefulDataLoader, LitData's StreamingDataLoader), or train into a "
                              f"new out")
        load(state["data"])
