"""Which images each optimisation step trains on, delivered to the device without stalling it.

Step t (epoch e = t // S, position p = t % S, S steps per epoch, drop_last as the official loader) takes the
B images ``perm_e[p*B:(p+1)*B]`` of a seeded per-epoch permutation, so a resumed run sees the same batches;
under torchrun, rank r of N takes the slice r*b:(r+1)*b of them (b = B / N).

Two deliveries, the same batches:

* **resident** (the images are on the training device, e.g. CIFAR's 150 MB on the GPU): each epoch's
  permutation is copied to the device once, and a batch is one on-device gather, with no host
  synchronisation in the step;
* **streaming** (the images stay in host memory because they do not fit on the device): a background
  thread gathers upcoming batches into pinned memory while the GPU works, and each is copied to the device
  with ``non_blocking=True``. PyTorch's pinned-memory cache does not hand a buffer out again before its copy
  has finished, so the thread may allocate freely.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch


def epoch_permutation(n_images: int, seed: int, epoch: int) -> torch.Tensor:
    """The (n_images,) int64 CPU permutation of ``epoch``, the same on every rank and every resume."""
    return torch.randperm(n_images, generator=torch.Generator().manual_seed(seed * 10007 + epoch))


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class StepBatches:
    """Iterator over the (b, 3, H, W) uint8 batches of steps ``start_step`` .. ``total_steps - 1`` on ``device``.

    Args:
        images: (N, 3, H, W) uint8, on ``device`` (resident) or in host memory.
        batch_size: the global batch B; this rank yields B / world images per step.
        stream: None picks streaming when ``images`` are not on ``device``; True forces the background
            thread (also on the CPU, where nothing is pinned: used by tests).
        prefetch: batches the thread may prepare ahead.

    Use ``close()`` (or a ``with`` block) to stop the thread when leaving early.
    """

    def __init__(self, images: torch.Tensor, *, batch_size: int, seed: int, start_step: int, total_steps: int,
                 device: torch.device | str, rank: int = 0, world: int = 1, stream: bool | None = None,
                 prefetch: int = 3) -> None:
        self.images, self.device = images, torch.device(device)
        self.n, self.batch_size, self.seed = images.shape[0], batch_size, seed
        self.steps_per_epoch = self.n // batch_size
        if self.steps_per_epoch < 1 or batch_size % world:
            raise ValueError(f"batch size {batch_size} must be <= {self.n} images and divisible by {world} ranks")
        self.start, self.total, self.rank, self.world = start_step, total_steps, rank, world
        self.b = batch_size // world
        self.stream = not _same_device(images.device, self.device) if stream is None else stream
        self.prefetch = prefetch
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StepBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self._streamed() if self.stream else self._resident()

    def _slices(self) -> Iterator[tuple[torch.Tensor, int]]:
        """(that epoch's CPU permutation, start of this rank's slice in it) for every step."""
        perm, perm_epoch = torch.empty(0, dtype=torch.long), -1
        for step in range(self.start, self.total):
            epoch, pos = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = epoch_permutation(self.n, self.seed, epoch), epoch
            yield perm, pos * self.batch_size + self.rank * self.b

    def _resident(self) -> Iterator[torch.Tensor]:
        perm_dev, last = torch.empty(0, dtype=torch.long), None
        for perm, start in self._slices():
            if perm is not last:  # once per epoch: the only host-to-device copy of indices, from pinned memory
                # so that it does not wait for the GPU to drain its queue
                src = perm.pin_memory() if self.images.device.type == "cuda" else perm
                perm_dev, last = src.to(self.images.device, non_blocking=True), perm
            yield self.images.index_select(0, perm_dev[start:start + self.b]).to(self.device, non_blocking=True)

    def _produce(self) -> None:
        assert self._queue is not None
        pin = self.device.type == "cuda"
        try:
            for perm, start in self._slices():
                idx = perm[start:start + self.b]
                out = torch.empty((self.b, *self.images.shape[1:]), dtype=self.images.dtype, pin_memory=pin)
                torch.index_select(self.images, 0, idx, out=out)
                while not self._stop.is_set():
                    try:
                        self._queue.put(out, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(None)
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._queue.put(e)

    def _streamed(self) -> Iterator[torch.Tensor]:
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, name="empssl-batches", daemon=True)
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item.to(self.device, non_blocking=True)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the background thread (if any) and wait for it."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:  # unblock a producer waiting on a full queue
                    assert self._queue is not None
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.05)
            self._thread = None
