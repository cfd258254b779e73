"""Embeddings of every image of a folder, class tree, archive, dataset or shard folder under a checkpoint's
evaluation protocol.

One row per image, in :func:`empssl.data.load_images`'s stable order (a shard folder's: the shards' order, names
and manifest classes), with its relative file name and, where the data has classes, its label. Each split (train/,
val/, test/) is embedded on its own, exactly as evaluation extracts it (the seeded patches follow an image's index
in its split), so a row equals the feature ``empssl eval`` computes for that image over the whole split.
``data_mode`` means what ``--data-mode`` means for training: streamed data (shard folders, local or
``s3://bucket/prefix``, and data too big for memory) is read block by block and gives the same features.

Outputs, written atomically: ``.npz`` holds ``features`` (N, D) float32, ``names`` (N,) str, where known ``labels``
(N,) int64, ``classes`` and ``class_names`` (C,) str, and ``protocol`` (a JSON string: checkpoint, step,
test_patches, feature, view, eval_seed, patch and crop settings, data, splits, empssl version); ``.safetensors``
holds tensors ``features`` and ``labels`` and the rest as JSON strings in its metadata. :func:`load_embedding`
reads either back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .config import Config
from .data import ImageSet, load_images, scan
from .data.images import split_rows
from .devices import resolve_device
from .evaluate import image_features
from .files import OutputError, check_writable_file, write_atomic
from .methods import eval_protocol
from .remote import is_remote
from .rundir import load_checkpoint
from .stream import (
    CatalogItems,
    Items,
    StreamedSplit,
    choose_tier,
    is_shards,
    memory_first,
    read_manifest,
    refuse_arrays,
    require_image_size,
    shard_items,
)
from .version import __version__

SUFFIXES = (".npz", ".safetensors")


class EmbedError(Exception):
    """A user mistake in an embedding run (unsupported output suffix, unwritable output, unreadable file)."""


@dataclass
class Embedding:
    """An embedding file read back by :func:`load_embedding`: (N, D) float32 features, N relative file names,
    (N,) int64 labels and the class list (and human-readable names) where the data has classes, and the protocol
    (how the features were computed: checkpoint, step, test_patches, feature, eval_seed, ...)."""

    features: torch.Tensor
    names: list[str]
    labels: torch.Tensor | None
    classes: list[str] | None
    class_names: list[str] | None
    protocol: dict[str, Any]


def embed(checkpoint: str | Path, data: str, out: str | Path, *, test_patches: int | None = None,
          eval_feature: str | None = None, eval_view: str | None = None, eval_seed: int | None = None,
          eval_batch_size: int | None = None, device: str | None = None, image_size: int = Config.image_size,
          data_dir: str = Config.data_dir, data_mode: str = Config.data_mode, progress: bool = True,
          log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Embed every image of ``data`` with ``checkpoint`` and write the result to ``out`` (.npz or .safetensors).

    Args:
        checkpoint: a run folder or checkpoint file.
        data: anything :func:`empssl.data.load_images` reads, or a shard folder written by ``empssl shard``.
        test_patches, eval_feature, eval_view, eval_seed, eval_batch_size, device: override the checkpoint's
            config (None keeps it), as the same flags of ``empssl eval`` do.
        image_size: 0 keeps the images' own size (they must all agree); S > 0 resizes them to S x S first.
        data_dir: where datasets and the decoded-image cache live.
        data_mode: auto, memory or stream (the module docstring).

    Returns a summary: out, format, n, dim, labelled, num_classes, seconds, and the protocol.

    Raises:
        EmbedError: another suffix than .npz/.safetensors, or an output that cannot be written (checked before
            any work). DataError, CheckpointError, ConfigError: bad data, checkpoint or flag values.
    """
    t0 = time.perf_counter()
    out = Path(out)
    fmt = _output_format(out)
    try:
        check_writable_file(out)  # before any work
    except OutputError as e:
        raise EmbedError(str(e)) from None
    overrides = {"test_patches": test_patches, "eval_feature": eval_feature, "eval_view": eval_view,
                 "eval_seed": eval_seed, "eval_batch_size": eval_batch_size, "device": device}
    Config(data_mode=data_mode).validate()  # --data-mode's one rule, before any work
    model, cfg, ckpt = load_checkpoint(checkpoint, {k: v for k, v in overrides.items() if v is not None})
    dev = resolve_device(cfg.device)
    model.to(dev)
    source = _open_source(data, data_dir, image_size, data_mode, progress, log)
    # each split alone, as evaluation extracts it (the seeds follow the index)
    features = torch.cat([image_features(model, block, cfg, dev, progress=progress, desc=f"embedding {split}".strip())
                          .cpu() for split, block in source.splits]).float().contiguous()  # (N, D)
    names = source.names if source.names is not None else \
        [n for _, block in source.splits if isinstance(block, _Named) for n in block.names]  # read with the blocks

    view, kind = eval_protocol(cfg)
    protocol = {"checkpoint": str(checkpoint), "step": ckpt.get("step"), "method": cfg.method, "arch": cfg.arch,
                "test_patches": cfg.test_patches, "view": view, "feature": kind, "eval_seed": cfg.eval_seed,
                "patch_size": cfg.patch_size, "crop_scale": list(cfg.crop_scale), "crop_ratio": list(cfg.crop_ratio),
                "data": data, "image_size": image_size, "data_mode": source.mode,
                "splits": [[split, len(block)] for split, block in source.splits], "empssl_version": __version__}
    result = Embedding(features, names, source.labels, source.classes, source.class_names, protocol)
    try:
        write_atomic(out, lambda tmp: (_write_npz if fmt == "npz" else _write_safetensors)(tmp, result))
    except OutputError as e:
        raise EmbedError(str(e)) from None
    return {"out": str(out), "format": fmt, "n": len(names), "dim": int(features.shape[1]),
            "labelled": source.labels is not None, "num_classes": len(source.classes or []),
            "seconds": time.perf_counter() - t0, **protocol}


@dataclass
class _Named(StreamedSplit):
    """A streamed split that keeps its rows' names as its blocks are read (the features' consumer sees blocks)."""

    names: list[str] = field(default_factory=list)

    def blocks(self, multiple: int, names: list[str] | None = None) -> Iterator[torch.Tensor]:
        self.names.clear()  # a second pass reads them again
        return super().blocks(multiple, self.names)


@dataclass
class _Source:
    """The images to embed, split by split: in memory, or read block by block (``mode`` says which)."""

    splits: Sequence[tuple[str, torch.Tensor | _Named]]
    labels: torch.Tensor | None
    classes: list[str] | None
    class_names: list[str] | None
    mode: str
    names: list[str] | None = None  # the in-memory tier's (the streamed splits' are read with their blocks)


def _open_source(data: str, data_dir: str, image_size: int, mode: str, progress: bool,
                 log: Callable[[str], Any]) -> _Source:
    """``data`` by ``mode``: a folder, archive or dataset in memory (:func:`empssl.data.load_images`, its cache),
    or read block by block: a folder's catalog, or every split of a shard folder (a path or an object store's URL)
    in the manifest's order, a split a block in "memory" mode (and in "auto" where it fits or has no image size)."""
    if is_shards(data):
        root = data if is_remote(data) else str(Path(data).expanduser().resolve())
        manifest = read_manifest(root, data_dir)
        mode = choose_tier(mode, sum(s.images for s in manifest.splits.values()), image_size, root, log)
        labels = {name: torch.from_numpy(manifest.labels(name).astype(np.int64)) for name in manifest.splits}
        parts = [(name, shard_items(manifest, name, lab.tolist()), lab) for name, lab in labels.items()]
        classes = [str(c) for c in manifest.classes] if manifest.classes else None
        return _streamed(parts, classes, manifest.class_names, image_size, root, mode)
    loaded = memory_first(mode, lambda: _memory_source(load_images(data, data_dir, image_size, progress)), log)
    if loaded is not None:
        return loaded
    refuse_arrays(data)
    require_image_size(image_size)
    catalog = scan(data, data_dir)
    every = torch.tensor([-1 if r.label is None else r.label for r in catalog.records], dtype=torch.int64)
    blocks = [(name, CatalogItems(catalog.records[rows]), every[rows])
              for name, rows in split_rows(catalog.splits).items()]
    classes = list(catalog.classes) if catalog.classes is not None else None
    return _streamed(blocks, classes, catalog.class_names, image_size, catalog.source, "stream")


def _memory_source(images: ImageSet) -> _Source:
    splits = [(name, images.images[rows]) for name, rows in split_rows(images.splits).items()]
    return _Source(splits, images.labels, images.classes, images.class_names, "memory", images.names)


def _streamed(parts: Sequence[tuple[str, Items, torch.Tensor]], classes: list[str] | None,
              class_names: list[str] | None, image_size: int, source: str, mode: str) -> _Source:
    """The splits ``(name, items, labels)`` read block by block; in "memory" mode each split as one block."""
    splits = [(name, _Named(items, torch.arange(len(lab)), lab, classes or [], image_size, source, name,
                            block_images=len(lab) if mode == "memory" else 0)) for name, items, lab in parts]
    labels = torch.cat([lab for _, _, lab in parts]) if classes is not None else None
    return _Source(splits, labels, classes, class_names, mode)


def load_embedding(path: str | Path) -> Embedding:
    """Read an embedding written by :func:`embed` (.npz or .safetensors)."""
    path = Path(path)
    fmt = _output_format(path)
    if not path.is_file():
        raise EmbedError(f"embedding file not found: {path}")
    try:
        return _read_npz(path) if fmt == "npz" else _read_safetensors(path)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise EmbedError(f"cannot read embedding {path}: {type(e).__name__}: {' '.join(str(e).split())}") from None


def _read_npz(path: Path) -> Embedding:
    with np.load(path, allow_pickle=False) as z:
        def strings(key: str) -> list[str] | None:
            return z[key].tolist() if key in z.files else None

        labels = torch.from_numpy(z["labels"]) if "labels" in z.files else None
        return Embedding(torch.from_numpy(z["features"]), z["names"].tolist(), labels, strings("classes"),
                         strings("class_names"), json.loads(str(z["protocol"])))


def _read_safetensors(path: Path) -> Embedding:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    return Embedding(tensors["features"], json.loads(meta["names"]), tensors.get("labels"),
                     json.loads(meta.get("classes", "null")), json.loads(meta.get("class_names", "null")),
                     json.loads(meta["protocol"]))


def _output_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise EmbedError(f"embedding output must end in {' or '.join(SUFFIXES)}, got {path.name!r}")
    return suffix[1:]


def _class_lists(e: Embedding) -> dict[str, list[str]]:
    return {key: v for key, v in (("classes", e.classes), ("class_names", e.class_names)) if v is not None}


def _write_npz(path: Path, e: Embedding) -> None:
    arrays: dict[str, np.ndarray] = {"features": e.features.numpy(), "names": np.asarray(e.names, dtype=str),
                                     "protocol": np.asarray(json.dumps(e.protocol))}
    if e.labels is not None:
        arrays["labels"] = e.labels.numpy().astype(np.int64)
    arrays.update({key: np.asarray(v, dtype=str) for key, v in _class_lists(e).items()})
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, **cast(dict[str, Any], arrays))  # (numpy's stubs type **kwds as allow_pickle)


def _write_safetensors(path: Path, e: Embedding) -> None:
    tensors = {"features": e.features}
    if e.labels is not None:
        tensors["labels"] = e.labels.to(torch.int64).contiguous()
    meta = {"names": json.dumps(e.names), "protocol": json.dumps(e.protocol)}
    meta.update({key: json.dumps(v) for key, v in _class_lists(e).items()})
    save_file(tensors, str(path), metadata=meta)
