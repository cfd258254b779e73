"""Online learning: one pass over a stream of images, each learned once, in arrival order (``train --online``).

``--data`` is a folder that keeps receiving image files (a camera, a crawler, another process), or a shard folder
(``empssl shard``) that ``empssl shard SRC --out DIR --append`` keeps adding shards to. Either is looked at every
``online_settle / 2`` seconds (at most every 0.5 s).

**A folder of image files** (:class:`FolderStream`), subfolders included:

- **Which files**: regular files with an image suffix (:data:`empssl.data.IMAGE_EXTENSIONS`); names starting
  with ``.`` are ignored, so a writer that writes ``.name.tmp`` and renames it when done is read only then.
- **When a file is ready**: its size and modification time have stayed the same for ``online_settle`` seconds.
- **Arrival order**: by the poll that first saw the file ready, then by modification time, then by name. A
  file already learned is never read again, even if it is rewritten. **Position**: the names learned, in order.

**A shard folder** (:class:`ShardStream`; it holds ``manifest.json``, or ``.plan.json`` while ``empssl shard`` is
still writing it) is read through its manifest (read again only when it changed):

- **Which images**: the train split's items, shard after shard in the manifest's order (arrival order).
- **When a shard is ready**: once listed. ``--append`` lists a shard only once it is complete and hashed, so a
  listed shard that is missing, of another size or sha256 than the manifest says is an error: one line, exit 2,
  after checkpointing the steps learned. Each shard is hashed when the stream reaches it; the others by size.
- **Only appends**: the shards listed before must stay listed as they were; a folder rewritten is an error, also
  at resume (the checkpoint names the shard it stands in, with its sha256).
- **Position**: (shard, item) after the last image learned, so appends made while a run is stopped are read
  after it. ``stream.jsonl`` also gives each step's ``from`` and ``to`` positions.

For both: an image that does not decode, or whose size differs from the stream's (``--image-size`` 0 keeps the
first image's size), is skipped, named in one line (the first 10), counted in results.json and not read again.
A step waits until ``--batch-size`` images are there; at a stop (``--online-stop``, Ctrl-C, ``--online-timeout``)
the images of an unfilled batch are not learned: a resumed run learns them first.

The stream is a batch source (:class:`OnlineBatches`) of the one training loop (:func:`empssl.train.loop`), plus
``stream.jsonl``: one line per step, ``{"step", "images": [names]}`` (a shard item's name is its path relative
to the source it was sharded from). There are no epochs: the learning rate stays at ``--lr`` after
``--online-warmup`` images (:meth:`empssl.train.Run.lr`), the kNN monitor (``--online-eval``) records accuracy
against ``images_seen``, and the time spent waiting for images stays out of the throughput. One process (no
torchrun); a batch's images are decoded by up to 8 threads (PIL releases the GIL). A LitData folder without
empssl's manifest is refused in one line: nothing checks its chunks, and its items need not be images.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import accumulate
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from . import distributed
from .config import Config, ConfigError
from .data import IMAGE_EXTENSIONS, DataError, ImageData, decode_image
from .data.sources import read_file
from .files import cut_jsonl, read_jsonl
from .rundir import RunSession
from .shard import MANIFEST, NO_SPLIT, PLAN, ShardFile, verify_file, verify_shards
from .stream import ShardItems, eval_splits
from .train import NO_IMAGES, TrainError, config_data, train


class FolderStream:
    """The ready, unseen image files of a folder, in arrival order (the rules are in the module docstring).
    A key is a file's relative name; the position (``state``) is the names learned, in order, and those skipped."""

    kind = "folder"

    def __init__(self, root: Path, settle: float, state: dict[str, Any] | None = None) -> None:
        state = state or {}
        self.root, self.settle = root, settle
        self.learned: list[str] = list(state.get("names", []))
        self.skipped: list[str] = list(state.get("skipped", []))
        self.seen = set(self.learned) | set(self.skipped)  # never read again
        self.ready: deque[str] = deque()
        self._pending: dict[str, tuple[int, int, float]] = {}  # name -> (size, mtime_ns, since)

    @property
    def images_learned(self) -> int:
        return len(self.learned)

    def poll(self) -> int:
        """Look at the folder once; return how many files became ready."""
        now = time.monotonic()
        found: list[tuple[int, str]] = []
        listed: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in filenames:
                if fname.startswith(".") or Path(fname).suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                rel = Path(dirpath, fname).relative_to(self.root).as_posix()
                if rel in self.seen:
                    continue
                try:
                    st = os.stat(Path(dirpath, fname))
                except OSError:  # removed since the listing
                    continue
                listed.add(rel)
                sig = (st.st_size, st.st_mtime_ns)
                was = self._pending.get(rel)
                if was is None or was[:2] != sig:
                    self._pending[rel] = (*sig, now)
                elif now - was[2] >= self.settle and st.st_size > 0:
                    found.append((st.st_mtime_ns, rel))
        self._pending = {rel: v for rel, v in self._pending.items() if rel in listed}  # the others are gone
        for _, rel in sorted(found):
            del self._pending[rel]
            self.seen.add(rel)
            self.ready.append(rel)
        return len(found)

    def load(self, rel: str, image_size: int) -> tuple[str, np.ndarray | str]:
        """(name, the (H, W, 3) image of ``rel`` or why it cannot be read, in one line)."""
        what = f"{rel} in {self.root}"
        try:
            return rel, decode_image(read_file(str(self.root / rel), what), image_size, what)
        except DataError as e:
            return rel, str(e)

    def commit(self, keys: list[str]) -> dict[str, Any]:
        """A step learned the files ``keys``; returns what stream.jsonl adds to the step's names (nothing)."""
        self.learned.extend(keys)
        return {}

    def skip(self, rel: str, name: str) -> None:
        self.skipped.append(rel)

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "names": self.learned, "skipped": self.skipped}

    def waiting(self) -> str:
        return f"waiting for images in {self.root} ..."


Key = tuple[int, int]  # (shard, item in that shard) of a shard folder's train split


class ShardStream:
    """The listed, unlearned items of a shard folder's train split, in the order its manifest lists the shards
    (arrival order; the rules are in the module docstring). A key is (shard, item); the position ``pos`` is the
    item after the last one learned. Items are read through LitData (:class:`empssl.stream.ShardItems`).
    """

    kind = "shards"

    def __init__(self, root: Path, state: dict[str, Any] | None = None) -> None:
        state = state or {}
        self.root, self.split = root, root / NO_SPLIT
        self.shards: list[ShardFile] = []
        self.offsets = [0]  # offsets[i]: the split's index of shard i's first item
        self.pos = self.next = (int(state.get("shard", 0)), int(state.get("item", 0)))  # the next to learn, to queue
        # (name, sha256) of shard pos[0], as the checkpoint recorded it
        self.expect = (str(state["shard_name"]), str(state["shard_sha256"])) if state.get("shard_name") else None
        self.images_learned = int(state.get("images", 0))
        self.skipped: list[list[Any]] = list(state.get("skipped", []))  # [shard, item, name] of each item skipped
        self.ready: deque[Key] = deque()
        self._sig: tuple[int, int, int] | None = None
        self._items: ShardItems | None = None
        self._read = threading.Lock()  # LitData's reader is used by one thread at a time

    def poll(self) -> int:
        """Queue the next listed shard's items (reading the manifest again when its size, mtime or inode changed,
        checking the shard's size and sha256); return how many."""
        while True:
            if self.next[0] >= len(self.shards):
                self._read_manifest()
            i, k = self.next
            if i >= len(self.shards):
                return 0
            shard = self.shards[i]
            verify_file(self.split, shard, hashes=True)  # listed means complete: a mismatch is an error
            self.ready.extend((i, j) for j in range(k, shard.images))
            self.next = (i + 1, 0)
            if shard.images > k:
                return shard.images - k

    def _read_manifest(self) -> None:
        try:
            st = os.stat(self.root / MANIFEST)
        except FileNotFoundError:  # an empssl shard run still writing the folder
            return
        sig = (st.st_size, st.st_mtime_ns, st.st_ino)
        if sig == self._sig:
            return
        manifest = verify_shards(self.root, hashes=False)
        if NO_SPLIT not in manifest.splits:
            raise DataError(f"{self.root} has no {NO_SPLIT} split to learn from ({MANIFEST} lists "
                            f"{', '.join(manifest.splits)})")
        shards = manifest.splits[NO_SPLIT].shards
        if shards[:len(self.shards)] != self.shards:
            changed = next(i for i, f in enumerate(self.shards) if i >= len(shards) or shards[i] != f)
            raise DataError(f"{self.root / MANIFEST} no longer lists shard {changed} ({self.shards[changed].name}) "
                            f"as it did: the folder was rewritten, not appended to (empssl shard --append)")
        if self.expect is not None:
            i = self.pos[0]
            have = (shards[i].name, shards[i].sha256) if i < len(shards) else None
            if have != self.expect:
                raise DataError(f"the checkpoint's stream position is shard {i} ({self.expect[0]}) of {self.root}, "
                                f"which {MANIFEST} lists " + ("otherwise" if have else "no more") +
                                ": the folder was rewritten, not appended to; start a new run directory")
            self.expect = None
        self._sig = sig
        if len(shards) > len(self.shards):
            self.shards = list(shards)
            self.offsets = [0, *accumulate(f.images for f in shards)]
            with self._read:
                self._items = None  # reopened with the longer index on the next read

    def load(self, key: Key, image_size: int) -> tuple[str, np.ndarray | str]:
        """(name, the (H, W, 3) image of item ``key`` or why it cannot be read, in one line)."""
        i, k = key
        where = f"item {k} of shard {self.split / self.shards[i].name}"
        try:
            with self._read:
                if self._items is None:
                    self._items = ShardItems(self.split, self.offsets[-1])
                data, _, name = self._items.item(self.offsets[i] + k)
        except Exception as e:  # LitData raises many types for an item it cannot read
            return where, f"cannot read {where}: {type(e).__name__}: {e}"
        try:
            return name, decode_image(data, image_size, f"{name} ({where})")
        except DataError as e:
            return name, str(e)

    def commit(self, keys: list[Key]) -> dict[str, Any]:
        """A step learned the items ``keys`` (in stream order); returns the positions it read from and to (items
        skipped on the way included), for stream.jsonl."""
        start = self.pos
        self.images_learned += len(keys)
        self.pos = (keys[-1][0], keys[-1][1] + 1)
        return {"from": list(start), "to": list(self.pos)}

    def skip(self, key: Key, name: str) -> None:
        self.skipped.append([key[0], key[1], name])

    def state(self) -> dict[str, Any]:
        """The stream position for the checkpoint: the shard (index, name, sha256) and item after the last one
        learned, the images learned, those skipped before it (the rest are read, and skipped, again)."""
        i, k = self.pos
        shard = self.shards[i] if i < len(self.shards) else None
        return {"kind": self.kind, "shard": i, "item": k, "shard_name": shard.name if shard else None,
                "shard_sha256": shard.sha256 if shard else None, "images": self.images_learned,
                "skipped": [s for s in self.skipped if (s[0], s[1]) < self.pos]}

    def waiting(self) -> str:
        if not (self.root / MANIFEST).is_file():
            return f"waiting for shards in {self.root} (no {MANIFEST} yet: empssl shard is still writing) ..."
        return f"waiting for shards in {self.root} (empssl shard SRC --out {self.root} --append adds them) ..."


class OnlineBatches:
    """The stream as the training loop's batch source (:class:`empssl.batches.BatchSource`): full batches of
    decoded images from a :class:`FolderStream` or :class:`ShardStream`, in arrival order, on ``device``, waiting
    for images as they arrive. The iteration ends at a stop: Ctrl-C (the session's ``stop``), or no new image for
    ``cfg.online_timeout`` seconds (DataError when nothing was ever learned). The state is the stream position;
    :meth:`after_step`, once a step commits, moves it and writes the step's stream.jsonl line."""

    steps_per_epoch = 0  # a stream has no epochs

    def __init__(self, cfg: Config, stream: FolderStream | ShardStream, device: torch.device,
                 session: RunSession) -> None:
        self.cfg, self.device, self.out, self.stop, self.log = cfg, device, session.out, session.stop, session.log
        self.stream = stream
        self.shape: tuple[int, ...] | None = None  # (H, W, 3) of the stream's images, fixed by the first one
        self.filling: list[tuple[Any, str, np.ndarray]] = []  # (the stream's key, name, image) of the next batch
        self.taken: list[tuple[Any, str, np.ndarray]] = []  # the batch handed out
        self.n_skipped = 0
        self.waited = self.reported = 0.0  # seconds spent waiting for images this session; as after_step said
        self.stopped = f"learned --online-stop {cfg.online_stop} images"
        self.trail: IO[str] | None = None  # stream.jsonl
        # PIL releases the GIL while decoding: the images of a batch are decoded side by side, kept in order
        self.pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))

    def __enter__(self) -> OnlineBatches:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.pool.shutdown()
        if self.trail is not None:
            self.trail.close()

    def state_dict(self) -> dict[str, Any]:
        return {"source": str(self.stream.root), **self.stream.state(),
                "shape": list(self.shape) if self.shape else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ckpt, root, kind = self.out / "checkpoint.pt", self.stream.root, self.stream.kind
        if "kind" not in state:
            raise TrainError(f"{ckpt} holds no stream position: not an online run's checkpoint")
        if state["kind"] != kind:
            shown = {"folder": "folder of image files", "shards": "shard folder"}
            raise TrainError(f"{ckpt} belongs to an online run over a {shown[state['kind']]}; --data "
                             f"{root} is a {shown[kind]}: give another --out")
        self.stream = ShardStream(root, state) if kind == "shards" else FolderStream(root, self.cfg.online_settle,
                                                                                     state)
        self.shape = tuple(state["shape"]) if state.get("shape") else None

    def __iter__(self) -> Iterator[torch.Tensor]:
        trail = self.out / "stream.jsonl"
        cut_jsonl(trail, self.stream.images_learned // self.cfg.batch_size)
        self.trail = trail.open("a")
        while self._fill():
            self.taken, self.filling = self.filling, []
            batch = torch.from_numpy(np.stack([img for *_, img in self.taken])).permute(0, 3, 1, 2)  # (B, 3, H, W)
            yield batch.contiguous().to(self.device)

    def after_step(self, step: int) -> float:
        """Step ``step`` learned the batch handed out last: the stream moves past it and stream.jsonl says so.
        Returns the seconds spent waiting for images since the last call (left out of the throughput)."""
        assert self.trail is not None
        moved = self.stream.commit([key for key, *_ in self.taken])
        self.trail.write(json.dumps({"step": step, "images": [name for _, name, _ in self.taken], **moved}) + "\n")
        self.trail.flush()
        waited, self.reported = self.waited - self.reported, self.waited
        return waited

    def summary(self) -> dict[str, Any]:
        """results.json's account of the stream (the monitor's curve against the images seen included)."""
        monitor = self.out / "monitor.jsonl"
        return {"mode": "online", "epochs": None, "images": None, "source": str(self.stream.root),
                "stream": self.stream.kind, "images_seen": self.stream.images_learned,
                "images_skipped": len(self.stream.skipped), "stopped": self.stopped,
                "images_pending": self.pending, "wait_seconds": self.waited,
                "data": self.cfg.online_eval or None,
                "accuracy_vs_images": [{"images_seen": r["images_seen"], "knn_top1": r["knn_top1"], "step": r["step"]}
                                       for r in (read_jsonl(monitor) if monitor.is_file() else [])]}

    def _fill(self) -> bool:
        """Fill the next batch; False at a stop. The time it takes, decoding included, is time waited for images."""
        t0 = last_arrival = time.monotonic()
        told, size, timeout = False, self.cfg.batch_size, self.cfg.online_timeout
        try:
            while len(self.filling) < size:
                if not self.stream.ready and not self.stream.poll():
                    if self.stop.requested:
                        return False
                    if timeout and time.monotonic() - last_arrival >= timeout:
                        self.stopped = f"no new image for {timeout:g} s"
                        if not self.stream.images_learned:  # nothing ever learned: the run fails
                            few = f" ({self.pending}, fewer than a batch of {size})" if self.pending else ""
                            raise DataError(f"no images to learn arrived in {self.stream.root}{few} within "
                                            f"{timeout:g} s (--online-timeout); nothing learned")
                        return False
                    if not told:
                        have = f" ({len(self.filling)}/{size} of the next batch there)" if self.filling else ""
                        self.log(self.stream.waiting() + have)
                        told = True
                    time.sleep(min(0.5, self.cfg.online_settle / 2))
                    continue
                last_arrival, told = time.monotonic(), False
                while self.stream.ready and len(self.filling) < size:
                    take = [self.stream.ready.popleft()
                            for _ in range(min(len(self.stream.ready), size - len(self.filling)))]
                    loaded = self.pool.map(lambda key: self.stream.load(key, self.cfg.image_size), take)
                    for key, (name, img) in zip(take, loaded):
                        self._add(key, name, img)
        finally:
            self.waited += time.monotonic() - t0
        return True

    @property
    def pending(self) -> int:
        """Ready images not learned yet: the unfilled batch and the ready queue."""
        return len(self.filling) + len(self.stream.ready)

    def _add(self, key: Any, name: str, img: np.ndarray | str) -> None:
        """Add a loaded image to the batch, or skip it: ``img`` is why it cannot be read, or of another size."""
        if not isinstance(img, str):
            self.shape = self.shape or img.shape
            if img.shape == self.shape:
                self.filling.append((key, name, img))
                return
            img = (f"{name} in {self.stream.root} is {img.shape[1]}x{img.shape[0]}, not {self.shape[1]}x"
                   f"{self.shape[0]} as the stream's first image (give --image-size to resize every image)")
        self.stream.skip(key, name)
        self.n_skipped += 1
        if self.n_skipped <= 10:
            self.log(f"skipped: {img}" + (" (further skips are only counted)" if self.n_skipped == 10 else ""))


def _held_out(cfg: Config, progress: bool) -> tuple[ImageData, ImageData]:
    """``--online-eval``'s (train, test) splits in memory: a dataset, folder or archive, or a shard folder."""
    held = cfg.replace(data=cfg.online_eval, data_mode="memory")
    bank, queries = eval_splits(held, progress, lambda: config_data(held, progress))
    assert isinstance(bank, ImageData) and isinstance(queries, ImageData)  # --data-mode memory
    return bank, queries


def open_online(cfg: Config, device: torch.device, session: RunSession, progress: bool
                ) -> tuple[OnlineBatches, ImageData, ImageData]:
    """The stream of ``cfg.data`` as a batch source, and ``--online-eval``'s (train, test) splits in memory, cut
    to --train-subset / --test-subset (the monitor's bank and queries and the evaluation's data; empty without
    it). A setting that cannot work online is a one-line error, before anything is written."""
    if distributed.env_dist().enabled:
        raise ConfigError("--online runs in one process; start it without torchrun")
    folder = Path(cfg.data)
    if not folder.is_dir():
        raise DataError(f"--online --data {cfg.data}: not a folder (online learning follows a folder that "
                        f"receives image files, or a shard folder that empssl shard --append adds to)")
    shards = (folder / MANIFEST).is_file() or (folder / PLAN).is_file()
    if not shards and (folder / "index.json").is_file():
        raise ConfigError(f"--online --data {cfg.data}: a LitData folder without empssl's {MANIFEST}; online "
                          f"learning follows shard folders written by empssl shard (their sha256 checks each shard, "
                          f"their items are image files), not other LitData datasets")
    if shards and importlib.util.find_spec("litdata") is None:
        raise DataError(f"{folder} holds shards, which are read with LitData: pip install 'empssl[stream]'")
    bank, queries = _held_out(cfg, progress) if cfg.online_eval else (NO_IMAGES, NO_IMAGES)
    stream = ShardStream(folder) if shards else FolderStream(folder, cfg.online_settle)
    return OnlineBatches(cfg, stream, device, session), bank, queries


def train_online(cfg: Config, out_dir: str | Path, *, progress: bool = True, log: Callable[[str], None] = print,
                 evaluate_at_end: bool = True) -> dict[str, Any]:
    """Learn from the folder or shard folder ``cfg.data`` in one pass (the module docstring) into ``out_dir``, or
    resume there; then, with ``cfg.online_eval``, evaluate: :func:`empssl.train.train` with ``cfg.online`` set.
    The results (results.json) add ``stream``, ``images_seen``, ``images_skipped``, ``stopped`` (why) and
    ``accuracy_vs_images`` (the monitor's curve)."""
    return train(cfg.replace(online=True), out_dir, progress=progress, log=log, evaluate_at_end=evaluate_at_end,
                 open_source=open_online)
