"""Online learning: one pass over a stream of images, each learned once, in arrival order (``train --online``).

``--data`` is either a folder that keeps receiving image files (a camera, a crawler, another process), or a shard
folder (``empssl shard``) that ``empssl shard SRC --out DIR --append`` keeps adding shards to.

**A folder of image files** (:class:`FolderStream`) is looked at every ``online_settle / 2`` seconds (at most every
0.5 s), its subfolders included, and each new file is handled by these rules:

- **Which files**: regular files with an image suffix (:data:`empssl.data.IMAGE_EXTENSIONS`); names starting
  with ``.`` are ignored, so a writer that writes ``.name.tmp`` and renames it when done is read only then.
- **When a file is ready**: its size and modification time have stayed the same for ``online_settle`` seconds
  (a file still being written keeps changing).
- **Arrival order**: by the poll that first saw the file ready, then by modification time, then by name. A
  file already learned is never read again, even if it is rewritten.
- **Position**: the names learned, in order (the checkpoint holds them).

**A shard folder** (:class:`ShardStream`; it holds ``manifest.json``, or ``.plan.json`` while ``empssl shard`` is
still writing it) is read through its manifest, looked at as often (read again only when it changed):

- **Which images**: the train split's items, shard after shard in the manifest's order (the order ``--append``
  added them: arrival order), each shard's items in order. Only shards the manifest lists are read.
- **When a shard is ready**: once listed. ``--append`` writes a shard, complete and hashed, before it lists it,
  so a listed shard that is missing, of another size or another sha256 than the manifest says is an error, not
  one still arriving: one line, exit 2, after checkpointing the steps learned (the run resumes once the shard is
  fixed). Each shard is hashed when the stream reaches it; the manifest's other shards are checked by size.
- **Only appends**: the shards listed before must stay listed as they were; a folder rewritten (another source
  sharded into it) is an error, also at resume (the checkpoint names the shard it stands in, with its sha256).
- **Position**: (shard, item) after the last image learned, so appends made while a run is stopped are simply
  read after it. ``stream.jsonl`` also gives each step's ``from`` and ``to`` positions.

For both: an image that does not decode, or whose size differs from the stream's (``--image-size`` 0 keeps the
first image's size), is skipped, named in one line (the first 10), counted in results.json and not read again.
A step waits until ``--batch-size`` images are there. At a stop (``--online-stop``, Ctrl-C, ``--online-timeout``)
the images of an unfilled batch are not learned and not counted as seen: a resumed run learns them first.

The run directory is a training run's (config.json, metrics.jsonl, checkpoint.pt, results.json, monitor.jsonl
with ``--online-eval``) plus ``stream.jsonl``: one line per step, ``{"step", "images": [names]}``, the images that
step learned (a shard item's name is its path relative to the source it was sharded from). The checkpoint holds
the stream position; a run resumed from it continues with the next unseen image. The learning rate rises linearly
over ``--online-warmup`` images and then stays at ``--lr``: no schedule needs the stream's length. There are no
epochs: the kNN monitor (every ``--online-eval-every`` images, against ``--online-eval``'s train split as the
bank and its test split as the queries) records accuracy against ``images_seen``.

One process (no torchrun), eager mode (no ``--compile``, no activation recomputation); the step itself is
:func:`empssl.train.train_step`, the same as offline training. A batch's images are decoded on the CPU between
steps, by up to 8 threads side by side (PIL releases the GIL; a shard's items are read through LitData one at a
time). A LitData folder without empssl's manifest (``litdata.optimize(..., mode="append")``) is refused in one
line: nothing checks its chunks' contents, and its items need not be image files (docs/DATA.md).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import distributed
from .checkpoint import read_checkpoint
from .config import Config, ConfigError
from .data import IMAGE_EXTENSIONS, DataError, ImageData, decode_image
from .data.sources import read_file
from .devices import autocast_dtype, device_name, synchronize
from .distributed import SINGLE
from .evaluate import evaluate
from .files import cut_jsonl, read_jsonl, write_json
from .monitor import Monitor
from .optim import lr_at
from .rundir import MetricsLog, RunLock, StopFlag, TimingAccount, remove_orphans, time_line, write_config
from .shard import MANIFEST, NO_SPLIT, PLAN, ShardFile, verify_file, verify_shards
from .stream import ShardItems, eval_splits
from .train import Run, TrainError, _check_finite, build_training, config_data, resume, save, train_step

# A stream without --online-stop never reaches its "end of schedule".
ENDLESS = 2**62


@dataclass
class FolderStream:
    """The ready, unseen image files of a folder, in arrival order (the rules are in the module docstring).

    ``seen`` holds the relative names already learned (or skipped); :meth:`poll` adds newly ready files to
    ``ready`` (relative names, in arrival order) without reading them. A key of this stream is the file's
    relative name; ``learned`` lists the names learned, in order (the stream position).
    """

    root: Path
    settle: float
    seen: set[str] = field(default_factory=set)
    ready: deque[str] = field(default_factory=deque)
    learned: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    _pending: dict[str, tuple[int, int, float]] = field(default_factory=dict)  # name -> (size, mtime_ns, since)

    what = "images"

    @classmethod
    def resume(cls, root: Path, settle: float, state: dict[str, Any]) -> FolderStream:
        """The stream after the checkpoint's ``state`` (:meth:`state`): its learned and skipped files are not read
        again."""
        learned, skipped = list(state.get("names", [])), list(state.get("skipped", []))
        return cls(root, settle, seen=set(learned) | set(skipped), learned=learned, skipped=skipped)

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
        for rel in set(self._pending) - listed:  # gone before it was ready
            del self._pending[rel]
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
        """The stream position for the checkpoint: the names learned, in order, and those skipped."""
        return {"kind": "folder", "names": self.learned, "skipped": self.skipped}

    def waiting(self) -> str:
        return f"waiting for images in {self.root} ..."


Key = tuple[int, int]  # (shard, item in that shard) of a shard folder's train split


class ShardStream:
    """The listed, unlearned items of a shard folder's train split (``empssl shard``, appended to with
    ``--append``), in shard order: the order the shards were listed in its manifest, i.e. arrival order.

    :meth:`poll` reads ``manifest.json`` again when it changed (size, mtime, inode) and checks it
    (:func:`empssl.shard.verify_shards`, sizes): the shards it listed before must be listed as they were. Then it
    takes the next listed shard, checks its size and sha256 against the manifest and queues its items, one shard
    at a time. Items are read through LitData (:class:`empssl.stream.ShardItems`), one read at a time; their
    decoding runs in the caller's threads. The stream position is ``pos``: the item after the last one learned.
    """

    what = "shards"

    def __init__(self, root: Path, pos: Key = (0, 0), expect: tuple[str, str] | None = None, learned: int = 0,
                 skipped: list[list[Any]] | None = None) -> None:
        self.root, self.split = root, root / NO_SPLIT
        self.shards: list[ShardFile] = []
        self.offsets = [0]  # offsets[i]: the split's index of shard i's first item
        self.pos, self.next = pos, pos  # the position; the next item to queue
        self.expect = expect  # (name, sha256) of shard pos[0], as the checkpoint recorded it
        self.learned_count = learned
        self.skipped: list[list[Any]] = list(skipped or [])  # [shard, item, name] of each item skipped
        self.ready: deque[Key] = deque()
        self._sig: tuple[int, int, int] | None = None
        self._items: ShardItems | None = None
        self._read = threading.Lock()  # LitData's reader is used by one thread at a time

    @classmethod
    def resume(cls, root: Path, state: dict[str, Any]) -> ShardStream:
        """The stream at the checkpoint's ``state`` (:meth:`state`)."""
        if not state:
            return cls(root)
        expect = (str(state["shard_name"]), str(state["shard_sha256"])) if state.get("shard_name") else None
        return cls(root, (int(state["shard"]), int(state["item"])), expect, int(state["images"]),
                   state.get("skipped", []))

    @property
    def images_learned(self) -> int:
        return self.learned_count

    def poll(self) -> int:
        """Queue the next listed shard's items (reading the manifest again when it changed); return how many."""
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
            self.offsets = [0]
            for f in shards:
                self.offsets.append(self.offsets[-1] + f.images)
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
        self.learned_count += len(keys)
        self.pos = (keys[-1][0], keys[-1][1] + 1)
        return {"from": list(start), "to": list(self.pos)}

    def skip(self, key: Key, name: str) -> None:
        self.skipped.append([key[0], key[1], name])

    def state(self) -> dict[str, Any]:
        """The stream position for the checkpoint: the shard (index, name, sha256) and item after the last one
        learned, the images learned, those skipped before it (the rest are read, and skipped, again)."""
        i, k = self.pos
        shard = self.shards[i] if i < len(self.shards) else None
        return {"kind": "shards", "shard": i, "item": k, "shard_name": shard.name if shard else None,
                "shard_sha256": shard.sha256 if shard else None, "images": self.learned_count,
                "skipped": [s for s in self.skipped if (s[0], s[1]) < self.pos]}

    def waiting(self) -> str:
        if not (self.root / MANIFEST).is_file():
            return f"waiting for shards in {self.root} (no {MANIFEST} yet: empssl shard is still writing) ..."
        return f"waiting for shards in {self.root} (empssl shard SRC --out {self.root} --append adds them) ..."


Stream = FolderStream | ShardStream


class OnlineBatches:
    """Full batches of decoded images from a :class:`FolderStream` or :class:`ShardStream`, waiting for images as
    they arrive."""

    def __init__(self, stream: Stream, batch_size: int, image_size: int, shape: tuple[int, ...] | None,
                 poll_every: float, log: Callable[[str], None]) -> None:
        self.stream, self.batch_size, self.image_size, self.log = stream, batch_size, image_size, log
        self.shape = shape  # (H, W, 3) of the stream's images, fixed by the first one when image_size is 0
        self.keys: list[Any] = []  # the batch being filled: the stream's keys, names and images
        self.names: list[str] = []
        self.arrays: list[np.ndarray] = []
        self.n_skipped = 0
        self.poll_every = poll_every
        self.waited = 0.0  # seconds spent waiting for images, this session
        # PIL releases the GIL while decoding: the images of a batch are decoded side by side, kept in order
        self.pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))

    def close(self) -> None:
        self.pool.shutdown()

    def next(self, stop: StopFlag, timeout: float) -> tuple[list[Any], list[str], torch.Tensor] | None:
        """(keys, names, (B, 3, H, W) uint8) of the next full batch, or None when asked to stop or when no new
        image has arrived for ``timeout`` seconds (0: wait for ever)."""
        t0 = time.monotonic()
        try:
            return self._fill(stop, timeout)
        finally:
            self.waited += time.monotonic() - t0

    def _fill(self, stop: StopFlag, timeout: float) -> tuple[list[Any], list[str], torch.Tensor] | None:
        last_arrival, told = time.monotonic(), False
        while len(self.names) < self.batch_size:
            if not self.stream.ready and not self.stream.poll():
                if stop.requested or (timeout and time.monotonic() - last_arrival >= timeout):
                    return None
                if not told:
                    have = f" ({len(self.names)}/{self.batch_size} of the next batch there)" if self.names else ""
                    self.log(self.stream.waiting() + have)
                    told = True
                time.sleep(self.poll_every)
                continue
            last_arrival, told = time.monotonic(), False
            while self.stream.ready and len(self.names) < self.batch_size:
                take = [self.stream.ready.popleft()
                        for _ in range(min(len(self.stream.ready), self.batch_size - len(self.names)))]
                loaded = self.pool.map(lambda key: self.stream.load(key, self.image_size), take)
                for key, (name, img) in zip(take, loaded):
                    self._add(key, name, img)
        keys, names, arrays = self.keys, self.names, self.arrays
        self.keys, self.names, self.arrays = [], [], []
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
        return keys, names, batch

    def _add(self, key: Any, name: str, img: np.ndarray | str) -> None:
        if isinstance(img, str):
            self._skip(key, name, img)
            return
        if self.shape is None:
            self.shape = img.shape
        if img.shape != self.shape:
            self._skip(key, name, f"{name} in {self.stream.root} is {img.shape[1]}x{img.shape[0]}, not "
                                  f"{self.shape[1]}x{self.shape[0]} as the stream's first image (give --image-size "
                                  f"to resize every image)")
            return
        self.keys.append(key)
        self.names.append(name)
        self.arrays.append(img)

    def _skip(self, key: Any, name: str, why: str) -> None:
        self.stream.skip(key, name)
        self.n_skipped += 1
        if self.n_skipped <= 10:
            self.log(f"skipped: {why}" + (" (further skips are only counted)" if self.n_skipped == 10 else ""))

    @property
    def pending(self) -> int:
        """Ready images not learned yet: the unfilled batch and the ready queue."""
        return len(self.names) + len(self.stream.ready)


def online_lr(cfg: Config, step: int) -> float:
    """Learning rate of step ``step``: empssl's linear warm-up (:func:`empssl.optim.lr_at`) over
    ``cfg.online_warmup`` images, then constant ``cfg.lr``."""
    warmup = round(cfg.online_warmup / cfg.batch_size)
    if step >= warmup:
        return cfg.lr
    return lr_at(step, warmup + 1, cfg.lr, warmup_steps=warmup, warmup_start_lr=cfg.warmup_start_lr)


def _held_out(cfg: Config, progress: bool) -> tuple[ImageData, ImageData]:
    """``--online-eval``'s (train, test) splits in memory: a dataset, folder or archive, or a shard folder."""
    held = cfg.replace(data=cfg.online_eval, data_mode="memory")
    bank, queries = eval_splits(held, progress, lambda: config_data(held, progress))
    assert isinstance(bank, ImageData) and isinstance(queries, ImageData)  # --data-mode memory
    return bank, queries


def _empty() -> ImageData:
    return ImageData(torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), [])


def _check(cfg: Config) -> tuple[Path, bool]:
    """The stream's folder and whether it is a shard folder; a setting that cannot work online is a one-line
    error."""
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
    return folder, shards


def train_online(cfg: Config, out_dir: str | Path, *, progress: bool = True, log: Callable[[str], None] = print,
                 evaluate_at_end: bool = True) -> dict[str, Any]:
    """Learn from the folder or shard folder ``cfg.data`` in one pass (the module docstring) into ``out_dir``, or
    resume there; then, with ``cfg.online_eval`` and ``evaluate_at_end``, evaluate on it (linear probe + kNN).
    Returns the results dict (written to results.json): ``stream`` ("folder" or "shards"), ``images_seen``,
    ``images_skipped``, ``stopped`` (why), ``accuracy_vs_images`` (the monitor's curve), the clock and the
    evaluation. DataError (one line) for a shard that does not match its manifest, after checkpointing."""
    cfg.validate()
    folder, sharded = _check(cfg)
    timing = TimingAccount()
    out = Path(out_dir)
    t0 = time.perf_counter()
    _, device, _ = distributed.setup(cfg.device)
    # the held-out data, in memory (the monitor's bank and queries), cut to --train-subset / --test-subset like a
    # training run's; a shard folder is decoded from its shards
    bank, queries = _held_out(cfg, progress) if cfg.online_eval else (_empty(), _empty())
    timing.add("data", time.perf_counter() - t0)
    created = not out.exists()
    with ExitStack() as held:
        out.mkdir(parents=True, exist_ok=True)
        held.enter_context(RunLock(out, log))
        remove_orphans(out, log)
        if not (out / "config.json").is_file():
            write_config(out, cfg)
        run = _build(cfg, out, device, bank, queries, timing)
        state: dict[str, Any] = {}
        if run.ckpt_path.exists():
            # its "resuming at step S/total" would name the endless total: the loop says where the stream resumes
            resume(run, lambda line: None if line.startswith("resuming ") else log(line))
            state = read_checkpoint(run.ckpt_path).get("stream") or {}
        kind = "shards" if sharded else "folder"
        if run.step and state.get("kind", "folder") != kind:
            shown = {"folder": "folder of image files", "shards": "shard folder"}
            raise TrainError(f"{run.ckpt_path} belongs to an online run over a {shown[state.get('kind', 'folder')]}; "
                             f"--data {cfg.data} is a {shown[kind]}: give another --out")
        stream: Stream = ShardStream.resume(folder, state) if sharded else \
            FolderStream.resume(folder, cfg.online_settle, state)
        if stream.images_learned != run.step * cfg.batch_size:
            raise TrainError(f"{run.ckpt_path} holds {stream.images_learned} stream images for {run.step} steps of "
                             f"{cfg.batch_size}: not an online run's checkpoint")
        before = dict(run.clock_state or {})
        batches = OnlineBatches(stream, cfg.batch_size, cfg.image_size,
                                tuple(state["shape"]) if state.get("shape") else None,
                                min(0.5, cfg.online_settle / 2), log)
        held.callback(batches.close)
        try:
            stopped = _loop(run, batches, progress, log)
        except DataError:  # a shard that does not match its manifest: the steps learned are checkpointed
            if created and not run.ckpt_path.exists():
                held.close()
                shutil.rmtree(out, ignore_errors=True)
            raise
        if run.step == 0:
            held.close()
            if created:  # nothing learned: leave nothing behind
                shutil.rmtree(out, ignore_errors=True)
            few = f" ({batches.pending}, fewer than a batch of {cfg.batch_size})" if batches.pending else ""
            raise DataError(f"no images to learn arrived in {folder}{few} within {cfg.online_timeout:g} s "
                            f"(--online-timeout); nothing learned")
        synchronize(device)
        results: dict[str, Any] = {
            "method": cfg.method, "mode": "online", "source": str(folder), "steps": run.step,
            "stream": kind, "images_seen": stream.images_learned, "images_skipped": len(stream.skipped),
            "stopped": stopped, "images_pending": batches.pending, **(run.clock_state or {}),
            "wait_seconds": batches.waited, "device": device_name(device),
            "accuracy_vs_images": [{"images_seen": r["images_seen"], "knn_top1": r["knn_top1"], "step": r["step"]}
                                   for r in (read_jsonl(out / "monitor.jsonl") if (out / "monitor.jsonl").is_file()
                                             else [])],
        }
        for key in ("train", "monitor"):  # this session's share (waiting for images is left in "other")
            spent = results[f"{key}_seconds"] - before.get(f"{key}_seconds", 0.0)
            timing.add(key, spent - (batches.waited if key == "train" else 0.0))
        if evaluate_at_end and cfg.online_eval:
            ev = evaluate(run.model, bank, queries, cfg, device, progress=progress, log=log)
            for key, name in (("features", "feature_seconds"), ("knn", "knn_seconds"), ("probe", "probe_seconds")):
                timing.add(key, ev[name])
            results.update({**ev, "data": cfg.online_eval})
        results["timing"] = timing.summary()
        write_json(out / "results.json", results)
        log(f"learned {stream.images_learned} images in {run.step} steps ({stopped}); results written to "
            f"{out / 'results.json'}")
        log(time_line(results["timing"]))
        return results


def _build(cfg: Config, out: Path, device: torch.device, bank: ImageData, queries: ImageData,
           timing: TimingAccount) -> Run:
    """Model, LARS and the views' generator, as :func:`empssl.train.setup` builds them; no epochs."""
    method, model, opt, generator = build_training(cfg, device)
    total = math.ceil(cfg.online_stop / cfg.batch_size) if cfg.online_stop else ENDLESS
    return Run(cfg=cfg, out=out, dist=SINGLE, device=device, own_group=False, train_data=bank, test_data=queries,
               method=method, model=model, opt=opt, generator=generator, steps_per_epoch=0, total_steps=total,
               schedule_steps=total, warmup_steps=round(cfg.online_warmup / cfg.batch_size),
               amp=autocast_dtype(cfg.precision, device), memory_format=torch.contiguous_format, timing=timing)


def _loop(run: Run, batches: OnlineBatches, progress: bool, log: Callable[[str], None]) -> str:
    """Learn batch after batch until the stop; the stream's position moves with each step. Returns why it stopped;
    Ctrl-C saves and raises KeyboardInterrupt (exit 130); a DataError from the stream saves, then is raised."""
    cfg, device, model, opt, method = run.cfg, run.device, run.model, run.opt, run.method
    every = max(1, round(cfg.online_eval_every / cfg.batch_size)) if cfg.online_eval_every else 0
    monitor = Monitor(cfg.replace(eval_every=every), run.train_data, run.test_data, device, run.out,
                      steps_per_epoch=0, total_steps=run.total_steps, patches_per_step=run.views_per_step,
                      start_step=run.step, clock_state=run.clock_state)
    stream_log = run.out / "stream.jsonl"
    cut_jsonl(stream_log, run.step)
    step = last_good = run.step
    limit = f", until {cfg.online_stop} images" if cfg.online_stop else ""
    log(f"online: learning {cfg.method} ({cfg.arch}, width {cfg.width}) from {batches.stream.root} in batches of "
        f"{cfg.batch_size}{limit} on {device}" +
        (f", resumed after {batches.stream.images_learned} images" if step else ""))

    def checkpoint() -> None:
        state = {"source": str(batches.stream.root), **batches.stream.state(),
                 "shape": list(batches.shape) if batches.shape else None}
        save(run, step, monitor.clock(), extra={"stream": state})

    model.train()
    monitor.start(model)
    bar = tqdm(total=None if run.total_steps == ENDLESS else run.total_steps, initial=step, disable=not progress,
               file=sys.stderr, dynamic_ncols=True, desc="online", unit="step")
    metrics = MetricsLog(run.out / "metrics.jsonl", method.terms, device, bar=bar, start_step=step,
                         steps_per_epoch=0, views_per_step=run.views_per_step)
    stopped = f"learned --online-stop {cfg.online_stop} images"
    with StopFlag() as stop, metrics, bar, stream_log.open("a") as trail:
        while step < run.total_steps:
            waited = batches.waited
            try:
                got = batches.next(stop, cfg.online_timeout)
            except DataError:
                if step != last_good:
                    checkpoint()
                raise
            metrics.exclude(batches.waited - waited)  # throughput of the steps, not of the stream
            if got is None:
                stopped = "interrupted" if stop.requested else f"no new image for {cfg.online_timeout:g} s"
                break
            keys, batch_names, images = got
            lr = online_lr(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            values, applied = train_step(model, opt, method, images.to(device), run.generator, run.amp,
                                         run.memory_format)
            method.after_step(model, step + 1, run.schedule_steps, applied)
            metrics.add(values, applied, step + 1)
            step += 1
            trail.write(json.dumps({"step": step, "images": batch_names, **batches.stream.commit(keys)}) + "\n")
            trail.flush()
            bar.update(1)
            at_log, at_ckpt = step % cfg.log_every == 0, step % cfg.checkpoint_every == 0
            if at_log or at_ckpt or stop.requested or step == run.total_steps:
                _check_finite(run, metrics, step, last_good)
            if at_log:
                metrics.write(step, lr)
            metrics.exclude(monitor.after_step(model, step))
            if at_ckpt or stop.requested:
                checkpoint()
                last_good = step
            if stop.requested:
                stopped = "interrupted"
                break
        if metrics.n:  # the steps since the last line
            _check_finite(run, metrics, step, last_good)
            metrics.write(step, online_lr(cfg, step - 1))
        if step > run.step and step != last_good:
            if every and step % every and step != run.total_steps:  # the accuracy at the stop (once)
                metrics.exclude(monitor._evaluate(model, step))
            checkpoint()
    run.clock_state = monitor.clock()
    if stopped == "interrupted":
        if not step:
            raise KeyboardInterrupt("interrupted before a batch was learned; nothing saved")
        raise KeyboardInterrupt(f"interrupted after {batches.stream.images_learned} images (step {step}); "
                                f"checkpoint saved, run the "
                                f"same command to resume at the next unseen image")
    run.step = step
    return stopped
