"""The streamed tier: training images decoded batch by batch, for data that does not fit in memory.

The loop gets (b, 3, S, S) uint8 batches on its device, one per step (:class:`StreamBatches`); the monitor and the
evaluation get :class:`StreamedSplit` splits whose features are computed block by block. ``--data-mode`` chooses
(:func:`eval_splits`): memory, stream, or auto (stream what would not fit in memory).

* What is streamed: shards written by ``empssl shard`` (``DIR/manifest.json``), a LitData folder empssl did not
  write (:func:`empssl.shard.foreign_manifest`), or any folder or archive the data package reads (its catalog).
* Order: LitData's for shards (chunks shuffled by seed and epoch, dealt to ranks and workers), torch's
  DistributedSampler's for a folder or archive; each image at most once an epoch (``drop_last`` leaves out a few),
  every rank the same number of steps, and a resumed run continues with the next unseen batch (same world size).
  Not the in-memory tier's order, but its decoder (:func:`empssl.data.decode_image`): the same pixels, bitwise.
* ``--decode cuda``: a batch's JPEGs are decoded at once by nvjpeg (:func:`decode_batch`), whose resizing differs
  from PIL's by rounding.
* ``--image-size`` is required: a batch needs one size, and a stream cannot check ahead that all images agree.

Bad data is refused before training, in one line. An image that does not decode stops training naming it: skipping
it would change the data unnoticed and leave one rank's batch short. A shard that changes after the start checked it
is named when a read fails or a worker dies of it (:meth:`ShardItems.culprit`). A run records what it trains on
(:func:`data_record`) and refuses to resume over other data (:func:`check_data`).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from .config import Config, ConfigError
from .data import TORCHVISION_DATASETS, Catalog, DataError, ImageData, ImageRecord, decode_image, scan
from .data.decode import cpu_share, decode_catalog
from .data.images import balanced_indices, split_rows
from .data.layouts import held_out_split
from .data.load import TooBigForMemory, check_fits, fingerprint
from .remote import Unreachable, check_listed, is_remote, litdata_options, read_remote
from .shard import (
    MANIFEST,
    ItemKeys,
    Manifest,
    ShardFile,
    is_litdata_folder,
    read_item,
    reader_serializers,
    verify_file,
    verify_shards,
)

T = TypeVar("T")

# --- where the images come from -----------------------------------------------------------------------------


class CatalogItems:
    """A split block of a data-package :class:`Catalog` (a folder's files are read when asked)."""

    def __init__(self, records: list[ImageRecord]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def item(self, i: int) -> tuple[bytes, int, str]:
        r = self.records[i]
        return r.read(), int(r.label or 0), r.name

    def labels(self) -> torch.Tensor:
        return torch.tensor([r.label for r in self.records], dtype=torch.int64)


class ShardItems:
    """One LitData split folder (``DIR/train``, or its ``s3://`` URL read through LitData's chunk cache with
    ``options``), read by index; ``shards``, the manifest's list, name the one to blame (:meth:`culprit`)."""

    def __init__(self, folder: Path | str, count: int, labels: list[int] | None = None,
                 shards: list[ShardFile] | None = None, options: dict[str, Any] | None = None,
                 keys: ItemKeys | None = None) -> None:
        self.folder, self.count, self._labels, self.shards = folder, count, labels, shards or []
        self.options, self.keys = options or {}, keys or ItemKeys()
        self.cache_dir: str | None = self.options.get("cache_dir")
        self._ds: Any = None  # LitData's dataset, opened in the process that reads (a forked one opens its own)
        self._pid = 0  # the process that opened it

    def __len__(self) -> int:
        return self.count

    def item(self, i: int) -> tuple[Any, int, str]:
        if self._pid != os.getpid():  # a forked worker must not share its parent's connections
            self._ds, self._pid = self.dataset(), os.getpid()
        return read_item(self._ds[i], self.keys, i)

    def dataset(self, **kw: Any) -> Any:
        """LitData's dataset of the folder, with the serializers that refuse pickle (every one is made here)."""
        from litdata import StreamingDataset

        return StreamingDataset(str(self.folder), serializers=reader_serializers(), **self.options, **kw)

    def labels(self) -> torch.Tensor:
        # the split's labels.npy (empssl shard writes it); without it, one pass over the split reads them
        labels = self._labels if self._labels is not None else [self.item(i)[1] for i in range(self.count)]
        return torch.tensor(labels, dtype=torch.int64)

    def culprit(self, rows: list[int], message: str = "") -> DataError | None:
        """Why a read of ``rows`` failed (``message``: its own words) when a shard changed after the start checked
        them: one missing or not at its manifest size (in an object store: by the bucket's listing), else, on a local
        disk, one holding ``rows`` or named in ``message`` that no longer matches its sha256; None when all match."""
        ends = np.cumsum([f.images for f in self.shards])
        holding = {int(np.searchsorted(ends, r, side="right")) for r in rows} & set(range(len(ends)))
        holding |= {j for j, f in enumerate(self.shards) if f"/{f.name}" in message}  # LitData names the chunk
        try:
            if self.cache_dir is not None:
                check_listed(str(self.folder), self.shards)
                return None
            for f in self.shards:
                verify_file(Path(self.folder), f, hashes=False)
            for j in sorted(holding):
                verify_file(Path(self.folder), self.shards[j])
        except Unreachable as e:  # (the store's state is unknown)
            return e
        except DataError as e:
            return DataError(f"{e}; it changed after this command checked it: restore it and run the command again "
                             f"(a training run resumes from its last checkpoint)")
        return None


# The images of one split, read one at a time by index: ``item(i)`` is (encoded bytes, or a LitData folder's
# decoded image: :func:`empssl.shard.read_item`; label, name), ``labels()`` the (N,) int64 labels of all.
Items = CatalogItems | ShardItems


def read_error(items: Items, rows: list[int], message: str) -> DataError:
    """The one-line error for a read of ``rows`` that failed with ``message``: the shard to blame, else ``message``."""
    found = items.culprit(rows, message) if isinstance(items, ShardItems) else None
    return found or DataError(" ".join(message.split()))  # (a library's message may run over several lines)


def failed_read(items: Items, error: BaseException) -> DataError:
    """:func:`read_error` of an exception raised by a loader over ``items``: a worker's arrives as a traceback,
    whose words follow its last frame (our own DataError's prefixed by its module)."""
    lines = str(error).strip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    rest = lines[frames[-1] + 1:] if frames else lines
    words = "\n".join(rest[next((i for i, line in enumerate(rest) if line[:1].strip()), 0):])
    return read_error(items, [], words.removeprefix(f"{DataError.__module__}.{DataError.__name__}: "))


def is_shards(spec: str) -> bool:
    """True when ``spec`` is a folder written by ``empssl shard`` (it holds manifest.json) or by LitData, or names
    an object store (s3://, gs://: where only shard folders are read)."""
    return is_remote(spec) or (Path(spec).expanduser() / MANIFEST).is_file() or is_litdata_folder(spec)


def read_manifest(root: Path | str, data_dir: str = "./data", hashes: bool = True,
                  keys: tuple[str, str] = ("", "")) -> Manifest:
    """The manifest of a shard folder once :func:`empssl.shard.verify_shards` checked its shards (sizes, and with
    ``hashes`` sha256); DataError (one line) otherwise. ``keys``: --image-key and --label-key."""
    if importlib.util.find_spec("litdata") is None:
        raise DataError(f"{root} holds shards, which are read with LitData: pip install 'empssl[stream]'")
    if is_remote(root):
        return read_remote(str(root), data_dir)
    return verify_shards(Path(root).expanduser(), hashes=hashes, data_dir=data_dir, image_key=keys[0],
                         label_key=keys[1])


def shard_items(manifest: Manifest, split: str, labels: list[int] | None = None) -> ShardItems:
    """The items of ``split`` of a checked shard folder (local, or read through LitData's cache under --data-dir)."""
    options = litdata_options(manifest, split) if manifest.url else None
    return ShardItems(manifest.split_source(split), manifest.splits[split].images, labels,
                      manifest.splits[split].shards, options, manifest.keys)


def open_shards(root: Path | str, data_dir: str = "./data", keys: tuple[str, str] = ("", "")
                ) -> tuple[ShardItems, ShardItems, list[str], str]:
    """(train, held-out split, classes, held-out split's name) of a shard folder checked by :func:`read_manifest`;
    DataError (one line) for shards without classes: the streamed tier evaluates and monitors by label."""
    manifest = read_manifest(root, data_dir, keys=keys)
    if not manifest.classes:
        raise DataError(f"{root} holds shards of {manifest.source}, which has no classes (label -1); training "
                        f"needs labels for its evaluation and monitor: shard a class tree (train/<class>/...)")
    held = held_out_split(manifest.splits, str(root))
    items = [shard_items(manifest, name, manifest.labels(name).tolist()) for name in ("train", held)]
    return items[0], items[1], [str(c) for c in manifest.classes], held


# --- the two tiers ------------------------------------------------------------------------------------------


# Decoded bytes per block when a streamed split is read for its features (:meth:`StreamedSplit.blocks`): 256 MiB
# is 1,700 images at 224 px, 87,000 at 32 px.
BLOCK_BYTES = 256 * 2**20


@dataclass
class StreamedSplit:
    """A split read as it goes: ``rows`` of ``items`` (after ``--train-subset`` / ``--test-subset``), decoded at
    ``image_size``, by training batch by batch (:class:`StreamBatches`), by evaluation block by block."""

    items: Items
    rows: torch.Tensor  # (N,) int64
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    image_size: int
    source: str
    split: str = "train"
    block_images: int = 0  # images per block of :meth:`blocks`; 0: about BLOCK_BYTES of decoded images

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def where(self) -> str:
        """How messages name it: "train of /data/shards"."""
        return f"{self.split} of {self.source}"

    def subset(self, n: int) -> StreamedSplit:
        """The rows :meth:`empssl.data.ImageData.subset` keeps of the same images (class-balanced, in order)."""
        keep = balanced_indices(self.labels, len(self.classes), n)
        return replace(self, rows=self.rows[keep], labels=self.labels[keep])

    def part(self, first: int, stop: int) -> StreamedSplit:
        """Rows ``first .. stop - 1`` (a rank's share of the split when the ranks compute its features together)."""
        return replace(self, rows=self.rows[first:stop], labels=self.labels[first:stop])

    def decoded(self, progress: bool) -> ImageData:
        """Every row decoded into memory (the in-memory tier's decoder and process pool)."""
        return ImageData(self._decode(self.rows, progress), self.labels.clone(), list(self.classes))

    def blocks(self, multiple: int, names: list[str] | None = None) -> Iterator[torch.Tensor]:
        """Consecutive (b, 3, S, S) uint8 blocks of the rows, b a multiple of ``multiple`` (the last: the rest), of
        about :data:`BLOCK_BYTES` (or ``block_images``); ``names`` receives each row's name as its block is read."""
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        if self.block_images or not self.image_size:
            per = max(1, -(-(self.block_images or len(self.rows)) // multiple)) * multiple
        else:
            per = max(1, BLOCK_BYTES // (multiple * 3 * self.image_size**2)) * multiple
        for at in range(0, len(self.rows), per):
            yield self._decode(self.rows[at:at + per], False, names)

    def _item(self, i: int) -> tuple[Any, int, str]:
        """Image ``i`` of ``items``; DataError naming the shard to blame (LitData's own words, a "hung download" for
        a missing shard, would mislead), else the failed read."""
        try:
            return self.items.item(i)
        except Exception as e:  # (a folder's file gone since the scan)
            raise read_error(self.items, [i], f"cannot read image {i} of {self.where}: {type(e).__name__}: {e}"
                             ) from None

    def _decode(self, rows: torch.Tensor, progress: bool, names: list[str] | None = None) -> torch.Tensor:
        """(len(rows), 3, S, S) uint8 by the in-memory tier's decoder; their names added to ``names``."""
        if isinstance(self.items, CatalogItems):  # a folder's files are read by the decoder's workers
            records = [self.items.records[i] for i in rows.tolist()]
        else:
            records = [ImageRecord(name, label, data) for data, label, name in map(self._item, rows.tolist())]
        if names is not None:
            names.extend(r.name for r in records)
        catalog = Catalog(self.where, "", records, self.classes, None, [("", len(records))], [])
        return decode_catalog(catalog, self.image_size, progress)


def load_splits(cfg: Config, progress: bool, in_memory: Callable[[], tuple[ImageData, ImageData]],
                log: Callable[[str], None] = print
                ) -> tuple[ImageData | StreamedSplit, ImageData | StreamedSplit, StreamedSplit | None]:
    """(train, test, the training split when streamed, else None) of ``cfg.data`` for training: :func:`eval_splits`;
    ConfigError, before any data is read, for ``--decode cuda`` on a run without a GPU."""
    if cfg.decode == "cuda" and (cfg.device == "cpu" or not torch.cuda.is_available()):
        raise ConfigError("--decode cuda decodes on the training GPU; this run has none (use --decode cpu or auto)")
    train, test = eval_splits(cfg, progress, in_memory, log)
    return train, test, train if isinstance(train, StreamedSplit) else None


def eval_splits(cfg: Config, progress: bool, in_memory: Callable[[], tuple[ImageData, ImageData]],
                log: Callable[[str], None] = print
                ) -> tuple[ImageData, ImageData] | tuple[StreamedSplit, StreamedSplit]:
    """(train, test) of ``cfg.data`` after ``--train-subset`` / ``--test-subset``, by ``--data-mode``: both in
    memory (what ``in_memory()`` loads, or shards that fit, decoded whole), or both streamed."""
    shards = is_shards(cfg.data)
    if not shards and (loaded := memory_first(cfg.data_mode, in_memory, log)) is not None:
        return loaded
    refuse_arrays(cfg.data)
    train_items: Items
    test_items: Items
    if shards:
        source = cfg.data if is_remote(cfg.data) else str(Path(cfg.data).expanduser().resolve())
        train_items, test_items, classes, held = open_shards(source, cfg.data_dir, (cfg.image_key, cfg.label_key))
    else:
        catalog = scan(cfg.data, cfg.data_dir)
        blocks = {name: catalog.records[rows] for name, rows in split_rows(catalog.splits).items()}
        held = held_out_split(blocks, catalog.source)
        assert catalog.classes is not None  # split roots have classes
        train_items, test_items = CatalogItems(blocks["train"]), CatalogItems(blocks[held])
        classes, source = list(catalog.classes), catalog.source
    # a folder or archive here is streamed (forced, or too big for the in-memory tier)
    mode = choose_tier(cfg.data_mode if shards else "stream", len(train_items) + len(test_items), cfg.image_size,
                       source, log)
    splits = []
    for name, items, n in (("train", train_items, cfg.train_subset), (held, test_items, cfg.test_subset)):
        labels = items.labels()
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(classes):
            raise DataError(f"{source}: {name} labels run outside its {len(classes)} classes")
        rows = balanced_indices(labels, len(classes), n) if n else torch.arange(len(labels))
        splits.append(StreamedSplit(items, rows, labels[rows], classes, cfg.image_size, source, name))
    if mode == "memory":  # shards that fit: the in-memory tier
        return splits[0].decoded(progress), splits[1].decoded(progress)
    return splits[0], splits[1]


def memory_first(mode: str, load: Callable[[], T], log: Callable[[str], None]) -> T | None:
    """``load()`` (the in-memory tier) unless ``--data-mode`` is stream; None (stream instead) where it raises
    TooBigForMemory in auto, which ``log`` says; in memory mode that error is the user's."""
    if mode == "stream":
        return None
    try:
        return load()
    except TooBigForMemory as e:
        if mode == "memory":
            raise
        log(f"{e}; --data-mode auto: streaming it")
        return None


def refuse_arrays(data: str) -> None:
    """ConfigError for streaming torchvision's array datasets (they have no files to stream)."""
    if data in TORCHVISION_DATASETS:
        raise ConfigError(f"--data-mode stream reads shards, a folder or an archive; {data} is an array dataset "
                          f"held in memory (use --data-mode memory)")


def require_image_size(image_size: int) -> None:
    """ConfigError for streaming without ``--image-size``."""
    if not image_size:
        raise ConfigError("--data-mode stream needs --image-size S: a batch needs one size, and a stream cannot "
                          "check ahead that its images agree")


def choose_tier(mode: str, n: int, image_size: int, source: str, log: Callable[[str], None]) -> str:
    """"memory" or "stream" for ``n`` images of a shard folder by ``--data-mode`` (:func:`memory_first`); memory
    also where their decoded size is unknown (no ``--image-size``, which streaming needs)."""

    def fits() -> bool:
        if image_size:
            check_fits(n, image_size, image_size, source)
        return True

    if memory_first(mode, fits, log):
        return "memory"
    require_image_size(image_size)
    return "stream"


# --- what a run trains on ---------------------------------------------------------------------------------


def data_record(n_train: int, spec: str | None = None, data_dir: str = "./data",
                keys: tuple[str, str] = ("", ""), shards: list[ShardFile] | None = None) -> dict[str, Any]:
    """What a run trains on, as its checkpoint records it: ``n_train`` (after ``--train-subset``) and, of ``spec``
    (None for tensors), a shard folder's train shards (``shards``, if the caller read them) or a folder's or
    archive's :func:`empssl.data.load.fingerprint`; no image is read for it."""
    record: dict[str, Any] = {"train": n_train}
    if spec is not None and is_shards(spec):
        if shards is None:
            shards = read_manifest(spec, data_dir, False, keys).splits["train"].shards
        record["shards"] = [[f.name, f.images, f.bytes, f.sha256] for f in shards]
    elif spec is not None and spec not in TORCHVISION_DATASETS:
        record["files"] = fingerprint(spec, data_dir)
    return record


def check_data(saved: dict[str, Any] | None, now: dict[str, Any], spec: str, checkpoint: Path,
               log: Callable[[str], None]) -> None:
    """Refuse (DataError, one line) to resume a run whose data changed since its checkpoint recorded them
    (:func:`data_record`). A checkpoint without the record (an older empssl's) resumes unchecked, with a note."""
    if saved is None:
        log(f"note: {checkpoint} does not record the data it was trained on (an older empssl wrote it); resuming "
            f"without checking that {spec} is unchanged")
        return
    files = saved.get("shards", []) if isinstance(saved, dict) else None  # a damaged checkpoint may hold anything
    if not (isinstance(saved, dict) and type(saved.get("train")) is int
            and isinstance(saved.get("files"), (str, type(None))) and isinstance(files, list)
            and all(isinstance(f, list) and [type(x) for x in f] == [str, int, int, str] for f in files)):
        raise DataError(f"{checkpoint} is damaged: its record of the data the run was trained on is not what empssl "
                        f"writes")
    if all(saved[k] == v for k, v in now.items() if k in saved):
        return
    was, is_, shards = _described(saved), _described(now), "shards" in now
    if was != is_:
        change = f"now {'lists' if shards else 'holds'} {is_}; this run was trained on {was}"
    else:
        what = "their names, sizes or sha256" if shards else "file names, sizes or modification times"
        change = f"has changed ({what}) since this run was trained on its {was}"
    where = (f"{spec.rstrip('/')}/train" if is_remote(spec) else Path(spec).expanduser() / "train") if shards else spec
    raise DataError(f"{where} {change}: train into a new --out, or restore the data to resume (the run's record: "
                    f"{checkpoint})")


def _described(record: dict[str, Any]) -> str:
    shards = record.get("shards")
    if shards is None:
        return f"{record['train']:,} training images"
    return f"{len(shards)} shard{'s' * (len(shards) != 1)} / {sum(f[1] for f in shards):,} images"


# --- decoding a batch ---------------------------------------------------------------------------------------


def resolve_decode(decode: str, device: torch.device) -> str:
    """``--decode`` for this device: cpu or cuda (:func:`load_splits` refused cuda without a GPU)."""
    return decode if decode != "auto" else ("cuda" if device.type == "cuda" else "cpu")


def _prepared(data: Any, name: str, image_size: int, decode: bool) -> tuple[torch.Tensor, str]:
    """What a worker hands over for one image (``data``: encoded bytes, or a foreign folder's PIL image or array):
    (its (3, S, S) uint8 decoded, or without ``decode`` the (n,) uint8 file itself, name)."""
    if not decode and isinstance(data, bytes):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), name
    # (3, S, S), copied: PIL's arrays are read-only
    return torch.tensor(decode_image(data, image_size, f"image {name}")).permute(2, 0, 1), name


def _prepared_item(item: dict[str, Any], keys: ItemKeys, image_size: int, decode: bool) -> tuple[torch.Tensor, str]:
    """:func:`_prepared` of a shard's item (LitData's ``transform=``, in its workers)."""
    image, _, name = read_item(item, keys, -1)
    return _prepared(image, name, image_size, decode)


class _Reader(torch.utils.data.Dataset):
    """Image ``i`` of a folder's or archive's split (``split.rows[i]``), :func:`_prepared`."""

    def __init__(self, split: StreamedSplit, decode: bool) -> None:
        self.split, self.decode = split, decode

    def __len__(self) -> int:
        return len(self.split.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        data, _, name = self.split._item(int(self.split.rows[i]))
        return _prepared(data, name, self.split.image_size, self.decode)


class _Order(torch.utils.data.DistributedSampler):
    """This rank's share of an epoch of a folder's or archive's images, from the ``skip``-th on (a resumed epoch)."""

    skip = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)


def _collated(batch: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor | list[torch.Tensor], list[str]]:
    """A batch as a worker hands it over: (b, 3, S, S) uint8, stacked in the worker so that it crosses to the main
    process as one shared-memory tensor, not one per image (raw files: their list), and the images' names."""
    images, names = [b[0] for b in batch], [b[1] for b in batch]
    return (images if images[0].dim() == 1 else torch.stack(images)), names


def _quiet_bus_error(worker: int) -> None:
    """A worker killed by SIGBUS (a shard cut short under its memory map) dies without torch's note blaming shared
    memory: the main process names the shard (:meth:`StreamBatches.__exit__`)."""
    if hasattr(signal, "SIGBUS"):
        signal.signal(signal.SIGBUS, signal.SIG_DFL)


_noted_fallback = False


def decode_batch(raw: list[torch.Tensor], names: list[str], image_size: int, device: torch.device,
                 gpu_decode: Callable[..., list[torch.Tensor]] | None = None) -> torch.Tensor:
    """(b, 3, S, S) uint8 on ``device`` from b raw image files ((n,) uint8 each): the JPEGs decoded, resized and
    cropped in one batched call there (nvjpeg on CUDA); the rest, or all where that call fails, on the CPU."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2.functional import center_crop, resize

    global _noted_fallback
    out: list[torch.Tensor | None] = [None] * len(raw)
    jpeg = [i for i, r in enumerate(raw) if bytes(r[:3].tolist()) == b"\xff\xd8\xff"]  # a JPEG's magic number
    if jpeg:
        try:
            with warnings.catch_warnings():  # torchvision 0.29 marks its decoders deprecated (for TorchCodec)
                warnings.simplefilter("ignore", DeprecationWarning)
                decoded = (gpu_decode or decode_jpeg)([raw[i] for i in jpeg], device=device, mode=ImageReadMode.RGB)
            for i, img in zip(jpeg, decoded, strict=True):
                out[i] = center_crop(resize(img, [image_size], antialias=True), [image_size, image_size])
        except RuntimeError as e:
            if not _noted_fallback:
                print(f"note: decoding a batch's JPEGs on {device} failed ({' '.join(str(e).split())[:120]}); "
                      f"such batches are decoded on the CPU", file=sys.stderr)
                _noted_fallback = True
    return torch.stack([_prepared(bytes(r.numpy()), name, image_size, True)[0].to(device) if o is None else o
                        for r, name, o in zip(raw, names, out, strict=True)])


# --- the batch source ---------------------------------------------------------------------------------------


def _n_workers() -> int:
    """The CPUs but one of this process's share (torchrun: the node's CPUs over its ranks), at most 8."""
    return max(1, min(8, cpu_share() - 1))


def warn_grouped(labels: np.ndarray, where: str) -> None:
    """One warning line when ``labels`` (in item order) are grouped by class, which LitData's shuffle keeps: said
    where training streams a split (:class:`empssl.stream.StreamBatches`), not where a folder is only read."""
    if len(labels) < 2:
        return
    same = float(np.mean(labels[1:] == labels[:-1]))
    shares = np.bincount(labels) / len(labels)
    chance = float((shares**2).sum())  # neighbours of one class in a random order
    if same > 0.5 and same > 2 * chance:
        print(f"warning: {where} holds its items grouped by class ({same:.0%} of neighbouring items are of one "
              f"class; {chance:.0%} in a random order), so LitData's shuffle (chunks, then items within a window of "
              f"one chunk) gives batches of few classes; write the images with empssl shard, which mixes them",
              file=sys.stderr)


class StreamBatches:
    """The (b, 3, S, S) uint8 batches of a streamed training split on ``device``, one per step, decoded by DataLoader
    workers: a shard folder's by LitData's StreamingDataLoader, which owns the order, a folder's or archive's by
    torch's over :class:`_Order`. ``batch_size`` is the global one; ``workers`` comes from the checkpoint on resume,
    as another count deals the images otherwise. Leaving the ``with`` block stops the workers."""

    def __init__(self, split: StreamedSplit, *, batch_size: int, seed: int, device: torch.device | str,
                 rank: int = 0, world: int = 1, decode: str = "cpu", workers: int | None = None) -> None:
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} must be divisible by {world} ranks")
        self.split, self.seed, self.device, self.decode = split, seed, torch.device(device), decode
        self.b, self.rank, self.world, self.step = batch_size // world, rank, world, 0
        self.litdata = isinstance(split.items, ShardItems)
        if self.litdata and rank == 0:  # LitData shuffles chunks, and items within a window: the write order shows
            warn_grouped(split.labels.numpy(), f"the {split.split} split of {split.source}")
        self.cache_dir = split.items.cache_dir if isinstance(split.items, ShardItems) else None
        self._it: Any = None
        self.loader = self._loader(_n_workers() if workers is None else workers)
        self.steps_per_epoch = len(self.loader)
        if torch.distributed.is_initialized():  # the fewest of every rank's, so that the ranks step together
            steps = torch.tensor([self.steps_per_epoch], device=self.device)
            torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MIN)
            self.steps_per_epoch = int(steps.item())
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch size {batch_size} exceeds the {len(split)} images of {split.where}")

    def _loader(self, workers: int) -> Any:
        kw: dict[str, Any] = dict(batch_size=self.b, num_workers=workers, collate_fn=_collated,
                                  worker_init_fn=_quiet_bus_error, prefetch_factor=4 if workers else None,
                                  multiprocessing_context=("fork" if sys.platform == "linux" else "spawn")
                                  if workers else None)
        split, decode = self.split, self.decode == "cpu"
        if not isinstance(split.items, ShardItems):
            order = _Order(_Reader(split, decode), self.world, self.rank, seed=self.seed, drop_last=True)
            return torch.utils.data.DataLoader(order.dataset, sampler=order, drop_last=True, **kw)
        from litdata import StreamingDataLoader

        ds = split.items.dataset(shuffle=True, seed=self.seed, drop_last=True,
                                 transform=functools.partial(_prepared_item, keys=split.items.keys,
                                                             image_size=split.image_size, decode=decode))
        return StreamingDataLoader(ds.subset(split.rows.tolist()) if len(split) < len(split.items) else ds, **kw)

    def __enter__(self) -> StreamBatches:
        return self

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        self.close()
        # A worker that dies (SIGBUS: a shard truncated under its memory map) is a RuntimeError in this process,
        # raised by the DataLoader or its SIGCHLD handler wherever the loop is: a changed shard is named instead.
        items = self.split.items
        if isinstance(error, RuntimeError) and "DataLoader worker" in str(error) and isinstance(items, ShardItems):
            found = items.culprit([])
            if found is not None:
                raise found from None

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (images for images, _ in self.named())

    def named(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """(batch, its images' names) of every step from ``self.step`` on; DataError (one line) naming an image that
        does not decode, or the shard to blame for a failed read."""
        while True:
            epoch, at = divmod(self.step, self.steps_per_epoch)
            if not self.litdata:  # (LitData keeps its own epoch and position)
                self.loader.sampler.set_epoch(epoch)
                self.loader.sampler.skip = at * self.b
            self._it = iter(self.loader)
            for _ in range(at, self.steps_per_epoch):
                try:
                    images, names = next(self._it)
                except Exception as e:
                    raise failed_read(self.split.items, e) from None
                self.step += 1
                if isinstance(images, list):  # --decode cuda's raw files (a folder of decoded pixels comes decoded)
                    images = decode_batch(images, names, self.split.image_size, self.device)
                elif self.device.type == "cuda":
                    images = images.pin_memory()
                yield images.to(self.device, non_blocking=True), names
            for _ in self._it:  # to the epoch's end, where LitData starts the next (nothing left: the ranks agree)
                pass

    def state_dict(self) -> dict[str, Any]:
        """The next step, the worker count, the cache folder and, for shards, LitData's loader state."""
        state = {"step": self.step, "workers": self.loader.num_workers, "cache_dir": self.cache_dir}
        return {**state, "loader": self.loader.state_dict()} if self.litdata else state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on where ``state`` stopped, with its worker count; DataError (one line) for a checkpoint without
        LitData's state, or with another cache folder (another ``--data-dir``): LitData could not resume."""
        self.step = int(state["step"])
        if not self.litdata:
            return
        if "loader" not in state:
            raise DataError(f"cannot resume the streamed run at step {self.step}: its checkpoint holds no position in "
                            f"LitData's order (an older empssl wrote it); train into a new --out")
        if state["cache_dir"] != self.cache_dir:
            raise DataError(f"this run was streamed through LitData's cache {state['cache_dir']}; this command's is "
                            f"{self.cache_dir}: resume it with the --data-dir it was started with")
        if state["workers"] != self.loader.num_workers:
            self.loader = self._loader(state["workers"])
        self.loader.load_state_dict(state["loader"])

    def close(self) -> None:
        """Stop the DataLoader's workers (if any)."""
        it, self._it = self._it, None
        stop = getattr(it, "close", None) or getattr(it, "_shutdown_workers", None)
        if stop is not None:
            stop()
