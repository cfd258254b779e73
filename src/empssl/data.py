"""Image datasets as in-memory uint8 tensors: torchvision's CIFAR, ImageFolder trees, Tiny ImageNet, archives.

Everything is decoded once into ``(N, 3, H, W)`` uint8 (60,000 CIFAR images are 184 MB) and kept in memory;
augmentation happens later on whole batches (see ``patches``), never per image in a DataLoader.

Two entry points: :func:`load_data` gives the (train, test) splits that training and evaluation use;
:func:`load_images` gives every image of a folder, tree, archive or dataset with its relative file name (what
``empssl embed`` embeds). Folders and archives are decoded with a process pool into a cache under ``data_dir``
(``data_dir/cache/<name>-<hash>/``: one ``.npy`` per array and a ``meta.json``) that later calls reuse.

Tiny ImageNet is read as distributed (``tiny-imagenet-200.zip`` or its unpacked folder): ``train/<wnid>/images/``,
``val/images/`` labelled by ``val/val_annotations.txt``, classes from ``wnids.txt`` (sorted), human-readable names
from ``words.txt``; the unlabelled ``test/`` is left out.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp"}
)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ARCHIVE_SUFFIXES = (*TAR_SUFFIXES, ".zip")
TORCHVISION_DATASETS = ("cifar10", "cifar100")
TINY_IMAGENET = "tiny-imagenet"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
# Text files of the Tiny ImageNet layout that are read (every other non-image file is skipped).
_META_FILES = frozenset({"wnids.txt", "words.txt", "val_annotations.txt"})
# Bump when the cache layout or the decoding changes, so stale caches are not reused.
CACHE_VERSION = 1
# Below this many images a process pool costs more to start than it saves.
_POOL_MIN_IMAGES = 512


class DataError(Exception):
    """A user mistake or bad data (missing path, bad layout, corrupt image, ...): reported in one line."""


@dataclass
class ImageData:
    """A labelled image set held in memory.

    Attributes:
        images: (N, 3, H, W) uint8, contiguous, on the CPU.
        labels: (N,) int64 class indices into ``classes``.
        classes: class names; ``classes[i]`` is the name of label ``i`` (for Tiny ImageNet: the wnids).
        class_names: human-readable names beside ``classes`` where the data gives them (Tiny ImageNet's
            words.txt, e.g. "goldfish, Carassius auratus"), else None.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.shape[1] != 3 or self.images.dtype != torch.uint8:
            got = f"{tuple(self.images.shape)} {self.images.dtype}"
            raise ValueError(f"images must be (N, 3, H, W) uint8, got {got}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, n: int) -> ImageData:
        """The first ``n`` images, class-balanced, in stored order.

        Classes are interleaved in stored order (first image of every class, then the second of every
        class, ...) and the first ``n`` of that sequence are kept, so each class gets ceil or floor of
        ``n / C`` images (a class that runs out leaves its share to the others). Deterministic, and
        ``subset(n).subset(m) == subset(m)`` for ``m <= n``. ``n >= len(self)`` returns ``self``.
        """
        if n < 1:
            raise DataError(f"subset size must be >= 1, got {n}")
        if n >= len(self):
            return self
        labels = self.labels.numpy()
        # rank[i] = how many earlier images share image i's label
        order = np.argsort(labels, kind="stable")
        rank = np.empty(len(labels), dtype=np.int64)
        counts = np.bincount(labels, minlength=len(self.classes))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank[order] = np.arange(len(labels)) - np.repeat(starts, counts)
        interleaved = np.lexsort((labels, rank))  # by rank, then label
        keep = torch.from_numpy(np.sort(interleaved[:n]))
        return ImageData(self.images[keep].contiguous(), self.labels[keep], list(self.classes), self.class_names)


@dataclass
class ImageSet:
    """Every image of a source, each with its relative file name (what ``empssl embed`` embeds).

    Attributes:
        images: (N, 3, H, W) uint8, contiguous, on the CPU.
        names: N relative POSIX paths ("train/cat/0001.png", "val/images/val_0.JPEG", "00012.jpg"; for
            torchvision arrays "train/00012"), unique, in the stored order.
        labels: (N,) int64 indices into ``classes``, or None when the source has no classes (a flat folder).
        classes: class names (Tiny ImageNet: wnids), or None.
        class_names: human-readable class names where the data gives them (Tiny ImageNet), else None.
        splits: consecutive blocks of the rows as (split, count): [("train", 50000), ("test", 10000)] for a
            split root or a dataset, [("", N)] for a folder without splits. Each block holds the images that
            :func:`load_data` gives for that split, in the same order.
    """

    images: torch.Tensor
    names: list[str]
    labels: torch.Tensor | None
    classes: list[str] | None
    class_names: list[str] | None = None
    splits: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.dim() != 4 or self.images.shape[1] != 3 or self.images.dtype != torch.uint8:
            raise ValueError(f"images must be (N, 3, H, W) uint8, got {tuple(self.images.shape)} {self.images.dtype}")
        if len(self.names) != n:
            raise ValueError(f"need one name per image, got {len(self.names)} names for {n} images")
        if self.labels is not None and self.labels.shape != (n,):
            raise ValueError(f"labels must be ({n},), got {tuple(self.labels.shape)}")
        if (self.labels is None) != (self.classes is None):
            raise ValueError("labels and classes are given together or not at all")
        if not self.splits:
            self.splits = [("", n)]
        if sum(count for _, count in self.splits) != n:
            raise ValueError(f"splits {self.splits} do not add up to {n} images")

    def __len__(self) -> int:
        return self.images.shape[0]


def demo_archive() -> Path:
    """Path of the bundled demo archive (5,000 train + 1,000 test CIFAR-10 images, JPEG q75)."""
    return Path(str(resources.files("empssl") / "assets" / "cifar10-demo.tar.gz"))


def load_data(
    spec: str, data_dir: str = "./data", image_size: int = 0, progress: bool = True
) -> tuple[ImageData, ImageData]:
    """Load a dataset as ``(train, test)``, both :class:`ImageData` with (N, 3, H, W) uint8 images.

    Args:
        spec: ``cifar10`` or ``cifar100`` (torchvision, under ``data_dir``); ``demo`` (the bundled
            archive); ``tiny-imagenet`` (``data_dir/tiny-imagenet-200.zip`` or its unpacked folder); or a path
            to an ImageFolder root holding ``train/`` and ``test/`` (or ``val/``), each ``<class>/<images>``,
            to a Tiny ImageNet folder (test split: ``val/``), or to a .tar/.tar.gz/.tgz/.zip archive of one.
        data_dir: where torchvision datasets and the decoded-image cache live.
        image_size: 0 keeps the images' own size (they must all agree); S > 0 resizes the shorter side
            to S (bilinear, antialiased) and centre-crops to S x S.
        progress: show a progress bar on stderr while decoding.

    Raises:
        DataError: with a one-line message for any missing, malformed or undecodable data.
    """
    if image_size < 0:
        raise DataError(f"image size must be >= 0, got {image_size}")
    if spec in TORCHVISION_DATASETS:
        return _load_torchvision(spec, data_dir, image_size)
    path = _resolve(spec, Path(data_dir))
    if path.is_dir():
        return _load_folder(path, Path(data_dir), image_size, progress)
    return _load_archive(path, Path(data_dir), image_size, progress)


def load_images(spec: str, data_dir: str = "./data", image_size: int = 0, progress: bool = True) -> ImageSet:
    """Every image of ``spec`` with its relative name, in a stable sorted order (see :class:`ImageSet`).

    ``spec`` is one of:

    - a folder of images (images directly in it, maybe more in subfolders): no classes; every image at any
      depth, sorted by name;
    - a class tree (all images in subfolders): label = first folder, classes sorted, images grouped by class
      and sorted by name within it;
    - a split root (``train/`` and any of ``val/``, ``test/``, each a class tree): the splits in that order,
      names keep the split prefix ("train/cat/1.jpg"); the splits must share their classes;
    - Tiny ImageNet as distributed: ``train/`` then ``val/`` (labelled by val_annotations.txt); ``test/`` has
      no labels and is left out (pass ``tiny-imagenet-200/test/images`` itself to embed it);
    - a .tar/.tar.gz/.tgz/.zip archive of any of these (a single folder wrapping the contents is dropped
      from the names, so an archive and its unpacked folder give the same names);
    - a dataset: ``demo``, ``tiny-imagenet`` (as in :func:`load_data`), ``cifar10``/``cifar100`` (names
      "train/00012", "test/00012": the index in torchvision's arrays).

    ``image_size`` and ``progress`` as in :func:`load_data`; folders and archives are decoded once into the
    cache under ``data_dir``. Raises :class:`DataError` (one line) for missing or bad data, naming the file,
    and suggesting ``--image-size`` when the images differ in size.
    """
    if image_size < 0:
        raise DataError(f"image size must be >= 0, got {image_size}")
    if spec in TORCHVISION_DATASETS:
        train, test = _load_torchvision(spec, data_dir, image_size)
        return ImageSet(
            torch.cat([train.images, test.images]),
            [f"train/{i:05d}" for i in range(len(train))] + [f"test/{i:05d}" for i in range(len(test))],
            torch.cat([train.labels, test.labels]), list(train.classes), None,
            [("train", len(train)), ("test", len(test))])
    path = _resolve(spec, Path(data_dir))
    archive = not path.is_dir()
    tree = None if archive else _walk_folder(path)
    cache = _cache_dir(path, Path(data_dir), image_size, "images", tree)
    cached = _read_image_set(cache)
    if cached is not None:
        return cached
    if tree is None:
        tree = _read_archive(path)
    listing = _list_images(tree, str(path), unwrap_any=archive)
    images = _decode(listing.names, tree, "decoding", image_size, progress, str(path))
    names = [name[len(listing.root):] for name in listing.names]
    arrays = {"images": images.numpy()}
    if listing.labels is not None:
        arrays["labels"] = listing.labels
    _write_arrays(cache, arrays, {"source": str(path), "image_size": image_size, "names": names,
                                  "classes": listing.classes, "class_names": listing.class_names,
                                  "splits": listing.splits})
    labels = None if listing.labels is None else torch.from_numpy(listing.labels)
    return ImageSet(images, names, labels, listing.classes, listing.class_names, listing.splits)


def _resolve(spec: str, data_dir: Path) -> Path:
    """The folder or archive that ``spec`` (demo, tiny-imagenet or a path) names; DataError if there is none."""
    if spec == "demo":
        return demo_archive()
    if spec == TINY_IMAGENET:
        for candidate in (data_dir / "tiny-imagenet-200", data_dir / "tiny-imagenet-200.zip"):
            if candidate.exists():
                return candidate.resolve()
        raise DataError(
            f"tiny-imagenet was not found under {data_dir} (looked for tiny-imagenet-200/ and "
            f"tiny-imagenet-200.zip); download {TINY_IMAGENET_URL} there, or pass --data PATH to the zip or its folder"
        )
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"data not found: {spec} (expected cifar10, cifar100, demo, {TINY_IMAGENET}, "
            "or a path to an ImageFolder root or archive)"
        )
    path = path.resolve()
    if path.is_dir() or (path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)):
        return path
    raise DataError(
        f"{path} is neither a folder nor a supported archive ({', '.join(ARCHIVE_SUFFIXES)})"
    )


# --- torchvision ------------------------------------------------------------------------------------


def _load_torchvision(name: str, data_dir: str, image_size: int) -> tuple[ImageData, ImageData]:
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    out = []
    for train in (True, False):
        try:
            ds = cls(root=data_dir, train=train, download=False)
        except RuntimeError:  # "Dataset not found or corrupted"
            try:
                ds = cls(root=data_dir, train=train, download=True)
            except Exception as e:
                raise DataError(
                    f"{name} was not found under {data_dir} and could not be downloaded "
                    f"({type(e).__name__}); pass a path to an ImageFolder folder or archive instead"
                ) from e
        images = np.asarray(ds.data)  # (N, 32, 32, 3) uint8
        if image_size and image_size != images.shape[1]:
            images = np.stack([_resize_crop(Image.fromarray(im), image_size) for im in images])
        out.append(ImageData(
            torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
            torch.as_tensor(ds.targets, dtype=torch.int64),
            list(ds.classes),
        ))
    return out[0], out[1]


# --- ImageFolder trees and archives ------------------------------------------------------------------


@dataclass
class _Tree:
    """An ImageFolder tree on disk or inside an archive, as relative POSIX paths (hidden entries left out)."""

    dirs: set[str]  # every folder, e.g. "cifar10-jpeg75/train/cat"
    files: dict[str, str | bytes]  # image path -> its absolute path on disk, or its bytes (archives)
    meta: dict[str, str | bytes] = field(default_factory=dict)  # Tiny ImageNet's text files (_META_FILES), same


@dataclass
class _Split:
    names: list[str]  # relative image paths, grouped by class in sorted order
    labels: np.ndarray  # (N,) int64
    classes: list[str]
    class_names: list[str] | None = None


@dataclass
class _Listing:
    """What :func:`load_images` decodes: tree paths, their labels (or None) and the split blocks."""

    root: str  # prefix of every name that the output names drop ("" or "wrapper/")
    names: list[str]
    labels: np.ndarray | None
    classes: list[str] | None
    class_names: list[str] | None
    splits: list[tuple[str, int]]


def _load_folder(root: Path, data_dir: Path, image_size: int, progress: bool) -> tuple[ImageData, ImageData]:
    tree = _walk_folder(root)
    train, test = _scan_tree(tree, str(root))
    cache = _cache_dir(root, data_dir, image_size, "splits", tree)
    cached = _read_cache(cache)
    if cached is not None:
        return cached
    return _write_cache(cache, _decode_split(train, tree, "train", image_size, progress, str(root)),
                        _decode_split(test, tree, "test", image_size, progress, str(root)), str(root), image_size)


def _load_archive(path: Path, data_dir: Path, image_size: int, progress: bool) -> tuple[ImageData, ImageData]:
    cache = _cache_dir(path, data_dir, image_size, "splits", None)
    cached = _read_cache(cache)
    if cached is not None:
        return cached
    tree = _read_archive(path)
    train, test = _scan_tree(tree, str(path))
    return _write_cache(cache, _decode_split(train, tree, "train", image_size, progress, str(path)),
                        _decode_split(test, tree, "test", image_size, progress, str(path)), str(path), image_size)


def _cache_dir(source: Path, data_dir: Path, image_size: int, kind: str, tree: _Tree | None) -> Path:
    """``data_dir/cache/<name>-<hash>`` for ``source`` decoded at ``image_size`` as ``kind`` ("splits" for
    load_data, "images" for load_images). An archive is keyed by its size and mtime; a folder (``tree`` given)
    by every file it reads, since a folder's contents can change without its own mtime changing."""
    h = hashlib.sha256(f"{source}|{image_size}|{CACHE_VERSION}|{kind}".encode())
    if tree is None:
        st = source.stat()
        h.update(f"|{st.st_size}|{st.st_mtime_ns}".encode())
        stem = source.name
        for suffix in ARCHIVE_SUFFIXES:
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
    else:
        stem = source.name
        for files in (tree.files, tree.meta):
            for name in sorted(files):
                st = os.stat(files[name])  # type: ignore[arg-type]  # folders hold paths
                h.update(f"|{name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return data_dir / "cache" / f"{_safe_name(stem)}-{h.hexdigest()[:16]}"


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "data"


def _is_hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"  # macOS zips add __MACOSX/ with ._ resource forks


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_folder(root: Path) -> _Tree:
    tree = _Tree(set(), {})
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        rel = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        tree.dirs.update(prefix + d for d in dirnames)
        for name in filenames:
            if not _is_hidden(name) and _is_image(name):
                tree.files[prefix + name] = os.path.join(dirpath, name)
            elif name in _META_FILES:
                tree.meta[prefix + name] = os.path.join(dirpath, name)
    return tree


def _read_archive(archive: Path) -> _Tree:
    """The image files (as bytes) and folders of ``archive``; DataError for members outside its root.

    Members are read into memory rather than extracted: writing tens of thousands of small files costs
    more than decoding them (0.7 ms vs 0.16 ms per CIFAR image on our machines). Links, devices and
    non-image files are skipped. Memory: the archive's image bytes (55 MB for CIFAR-10 as JPEG); for a
    much larger archive, extract it yourself and pass the folder, whose files are read by the workers.
    """
    tree = _Tree(set(), {})

    def add(name: str, kind: str, read: Callable[[], bytes]) -> None:
        """Record member ``name`` of ``kind`` "dir", "file" or "other" (links, devices: name checked only)."""
        name = name.replace("\\", "/")
        parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
        if name.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
            raise DataError(f"archive {archive} has a member outside its root: {name!r}")
        if kind == "other" or not parts or any(_is_hidden(p) for p in parts):
            return
        # folders are often implied by their files only
        n_dirs = len(parts) if kind == "dir" else len(parts) - 1
        tree.dirs.update("/".join(parts[:i]) for i in range(1, n_dirs + 1))
        if kind == "file" and _is_image(parts[-1]):
            tree.files["/".join(parts)] = read()
        elif kind == "file" and parts[-1] in _META_FILES:
            tree.meta["/".join(parts)] = read()

    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    add(info.filename, "dir" if info.is_dir() else "file", lambda info=info: zf.read(info))
        else:
            with tarfile.open(archive, "r:*") as tf:
                for member in tf:  # streaming: one forward pass over a compressed tar
                    kind = "dir" if member.isdir() else "file" if member.isfile() else "other"
                    add(member.name, kind, lambda m=member: tf.extractfile(m).read())  # type: ignore[union-attr]
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        # tarfile's messages can span lines
        detail = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise DataError(f"corrupt or unreadable archive {archive}: {type(e).__name__}: {detail}") from e
    return tree


def _layout_root(tree: _Tree) -> str:
    """"" or the single top-level folder that wraps a split root or Tiny ImageNet (``cifar10-jpeg75/``)."""
    top = sorted(d for d in tree.dirs if "/" not in d)
    if "train" not in top and len(top) == 1 and f"{top[0]}/train" in tree.dirs:
        return top[0] + "/"
    return ""


def _is_tiny_imagenet(tree: _Tree, root: str) -> bool:
    return root + "train" in tree.dirs and (
        root + "wnids.txt" in tree.meta or root + "val/val_annotations.txt" in tree.meta)


def _scan_tree(tree: _Tree, shown: str) -> tuple[_Split, _Split]:
    """Find ``train/`` and ``test/`` (or ``val/``) at the top of ``tree`` or in its single top-level folder,
    or the Tiny ImageNet layout (train/ and val/).

    ``shown`` is the folder or archive to name in error messages.
    """
    root = _layout_root(tree)
    if _is_tiny_imagenet(tree, root):
        return _scan_tiny_imagenet(tree, root, shown)
    if root + "train" not in tree.dirs:
        raise DataError(f"no train/ folder in {shown} (expected train/ and test/, each <class>/<images>)")
    test_name = "test" if root + "test" in tree.dirs else "val" if root + "val" in tree.dirs else None
    if test_name is None:
        raise DataError(
            f"no test/ or val/ folder in {shown} (expected train/ and test/, each <class>/<images>)"
        )
    train, test = _scan_split(tree, root, "train"), _scan_split(tree, root, test_name)
    _check_same_classes(train, test, test_name, shown)
    return train, test


def _check_same_classes(train: _Split, other: _Split, other_name: str, shown: str) -> None:
    if train.classes != other.classes:
        only_train = sorted(set(train.classes) - set(other.classes))
        only_other = sorted(set(other.classes) - set(train.classes))
        raise DataError(
            f"train/ and {other_name}/ of {shown} have different classes: "
            f"only in train: {', '.join(only_train) or '-'}; "
            f"only in {other_name}: {', '.join(only_other) or '-'}"
        )


def _scan_split(tree: _Tree, root: str, split: str) -> _Split:
    return _scan_classes(tree, f"{root}{split}/", f"{split}/")


def _scan_classes(tree: _Tree, prefix: str, shown_prefix: str) -> _Split:
    """The class tree below ``prefix``: label = first folder, classes sorted, images at any depth below it.
    ``shown_prefix`` is how messages name ``prefix`` ("train/", or "" for the top of a class tree)."""
    below = (d[len(prefix):] for d in tree.dirs if d.startswith(prefix))
    classes = sorted(c for c in below if "/" not in c)
    if not classes:
        raise DataError(f"{shown_prefix} has no class folders (expected {shown_prefix}<class>/<images>)")
    by_class: dict[str, list[str]] = {c: [] for c in classes}
    for name in tree.files:
        if name.startswith(prefix):
            rest = name[len(prefix):].split("/", 1)
            if len(rest) == 2:  # images directly in split/ belong to no class
                by_class[rest[0]].append(name)
    names: list[str] = []
    labels: list[int] = []
    for label, c in enumerate(classes):
        if not by_class[c]:
            raise DataError(f"{shown_prefix}{c}/ has no images")
        names += sorted(by_class[c])
        labels += [label] * len(by_class[c])
    return _Split(names, np.asarray(labels, dtype=np.int64), classes)


def _read_text(tree: _Tree, name: str) -> str:
    src = tree.meta[name]
    raw = src if isinstance(src, bytes) else Path(src).read_bytes()
    return raw.decode("utf-8", errors="replace")


def _scan_tiny_imagenet(tree: _Tree, root: str, shown: str) -> tuple[_Split, _Split]:
    """Tiny ImageNet as distributed: (train, val) splits, classes = sorted wnids, names from words.txt.

    train/<wnid>/images/*.JPEG are labelled by their folder (train/<wnid>/<wnid>_boxes.txt is not read);
    val/images/*.JPEG by val/val_annotations.txt (``file<TAB>wnid<TAB>bbox...``), or, in a copy whose val/
    was rearranged into val/<wnid>/ folders, by those folders. test/ (unlabelled) is left out.
    """
    train = _scan_split(tree, root, "train")
    if root + "wnids.txt" in tree.meta:
        wnids = [line.strip() for line in _read_text(tree, root + "wnids.txt").splitlines() if line.strip()]
        if sorted(set(wnids)) != train.classes:
            missing = sorted(set(wnids) - set(train.classes))
            extra = sorted(set(train.classes) - set(wnids))
            raise DataError(f"train/ of {shown} does not match wnids.txt: no train/ folder for "
                            f"{', '.join(missing[:5]) or '-'}; not in wnids.txt: {', '.join(extra[:5]) or '-'}")
    classes = train.classes  # sorted wnids: the order torchvision's ImageFolder gives the train/ folders too
    if root + "words.txt" in tree.meta:
        words = dict(line.split("\t", 1) for line in _read_text(tree, root + "words.txt").splitlines() if "\t" in line)
        train.class_names = [words.get(c, c).strip() for c in classes]
    if root + "val" not in tree.dirs:
        raise DataError(f"no val/ folder in {shown} (Tiny ImageNet: val/images/ and val/val_annotations.txt)")
    prefix = root + "val/images/"
    loose = sorted(name for name in tree.files if name.startswith(prefix) and "/" not in name[len(prefix):])
    if not loose:  # val/ rearranged into class folders by the user
        val = _scan_split(tree, root, "val")
        _check_same_classes(train, val, "val", shown)
        val.class_names = train.class_names
        return train, val
    annotations = root + "val/val_annotations.txt"
    if annotations not in tree.meta:
        raise DataError(f"{shown} has val/images/ but no val/val_annotations.txt, which labels those images")
    index = {c: i for i, c in enumerate(classes)}
    label_of: dict[str, int] = {}
    for lineno, line in enumerate(_read_text(tree, annotations).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        where = f"val/val_annotations.txt line {lineno} in {shown}"
        if len(parts) < 2:
            raise DataError(f"{where}: expected <file><TAB><wnid>..., got {line[:80]!r}")
        file, wnid = parts[0].strip(), parts[1].strip()
        if wnid not in index:
            raise DataError(f"{where} names class {wnid!r}, which has no train/ folder (or is not in wnids.txt)")
        if prefix + file not in tree.files:
            raise DataError(f"{where} names {file!r}, which is not in val/images/")
        if file in label_of:
            raise DataError(f"{where} labels {file!r} a second time")
        label_of[file] = index[wnid]
    unlabelled = [name for name in loose if name[len(prefix):] not in label_of]
    if unlabelled:
        raise DataError(f"{len(unlabelled)} image(s) in val/images/ of {shown} have no line in "
                        f"val/val_annotations.txt (e.g. {unlabelled[0][len(root):]})")
    # grouped by class like the other layouts, sorted by name within a class
    names = sorted(loose, key=lambda name: (label_of[name[len(prefix):]], name))
    labels = np.asarray([label_of[name[len(prefix):]] for name in names], dtype=np.int64)
    return train, _Split(names, labels, classes, train.class_names)


def _list_images(tree: _Tree, shown: str, unwrap_any: bool) -> _Listing:
    """Classify ``tree`` for :func:`load_images`: Tiny ImageNet, split root, class tree or folder of images.

    ``unwrap_any``: drop a single top-level folder even when it is not a split root (archives wrap their
    contents in one folder as a rule; a folder the user points at is taken as it is).
    """
    root = _layout_root(tree)
    splits: list[tuple[str, _Split]] = []
    if _is_tiny_imagenet(tree, root):
        train, val = _scan_tiny_imagenet(tree, root, shown)
        splits = [("train", train), ("val", val)]
    elif root + "train" in tree.dirs:
        splits = [(s, _scan_split(tree, root, s)) for s in ("train", "val", "test") if root + s in tree.dirs]
        for name, split in splits[1:]:
            _check_same_classes(splits[0][1], split, name, shown)
    if splits:
        first = splits[0][1]
        return _Listing(root, [n for _, s in splits for n in s.names], np.concatenate([s.labels for _, s in splits]),
                        first.classes, first.class_names, [(name, len(s.names)) for name, s in splits])
    top_dirs = [d for d in tree.dirs if "/" not in d]
    if unwrap_any and len(top_dirs) == 1 and not any("/" not in f for f in tree.files):
        root = top_dirs[0] + "/"
    below = sorted(f for f in tree.files if f.startswith(root))
    if not below:
        raise DataError(f"no images in {shown} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if any("/" not in f[len(root):] for f in below):  # images at the top: a plain folder, no classes
        return _Listing(root, below, None, None, None, [("", len(below))])
    split = _scan_classes(tree, root, "")
    return _Listing(root, split.names, split.labels, split.classes, None, [("", len(split.names))])


# --- decoding ---------------------------------------------------------------------------------------


def _resize_crop(img: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` (bilinear; PIL antialiases when shrinking) and centre-crop.

    Returns (size, size, 3) uint8.
    """
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = round((nw - size) / 2), round((nh - size) / 2)  # as torchvision's center_crop
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


# PIL puts the repr of the file object it was given into some messages ("<_io.BytesIO object at 0x7f...>"
# for archive members): meaningless to the user, who is told the member's name instead.
_FILE_REPR = re.compile(r"\s*<_io\.\w+ (?:object at 0x[0-9a-fA-F]+|name=[^>]*)>")


def _why(e: Exception) -> str:
    """One line saying why an image could not be decoded, without PIL's file-object repr."""
    if isinstance(e, UnidentifiedImageError):
        return "UnidentifiedImageError: not an image format PIL recognises (or a damaged header)"
    detail = _FILE_REPR.sub("", " ".join(str(e).split()))
    return f"{type(e).__name__}: {detail}" if detail else type(e).__name__


def _decode_chunk(job: tuple[int, list[str | bytes], int]) -> tuple[int, np.ndarray | None, int, str]:
    """Pool worker: decode images ``start, start + 1, ...`` given as paths or bytes.

    Returns ``(start, (k, 3, H, W) uint8, -1, "")``, or ``(start, None, bad_index, why)`` for the first image
    that cannot be decoded (``why`` an error) or differs in size from the chunk's first (``why`` empty).
    One stacked array per chunk keeps the pickling between processes cheap.
    """
    start, sources, image_size = job
    arrays: list[np.ndarray] = []
    for k, src in enumerate(sources):
        try:
            with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
                rgb = img.convert("RGB")  # also replicates one-channel images to three
            a = _resize_crop(rgb, image_size) if image_size else np.asarray(rgb, dtype=np.uint8)
        except Exception as e:  # noqa: BLE001  PIL raises many types (UnidentifiedImageError, OSError, ...)
            return start, None, start + k, _why(e)
        if arrays and a.shape != arrays[0].shape:
            return start, None, start + k, ""
        arrays.append(a)
    return start, np.stack(arrays).transpose(0, 3, 1, 2), -1, ""


def _decode_split(split: _Split, tree: _Tree, name: str, image_size: int, progress: bool, shown: str
                  ) -> ImageData:
    """Decode every image of ``split`` into an :class:`ImageData` with (N, 3, H, W) uint8 images."""
    images = _decode(split.names, tree, f"decoding {name}", image_size, progress, shown)
    return ImageData(images, torch.from_numpy(split.labels), split.classes, split.class_names)


def _decode(names: list[str], tree: _Tree, desc: str, image_size: int, progress: bool, shown: str) -> torch.Tensor:
    """Decode the images ``names`` of ``tree`` into one (N, 3, H, W) uint8 tensor, with a process pool when
    there are many. DataError names the first undecodable image (in ``shown``) or two images of different size."""
    n = len(names)
    if n == 0:
        raise DataError(f"no images to decode in {shown}")
    workers = _n_workers() if n >= _POOL_MIN_IMAGES else 1
    size = max(1, min(256, math.ceil(n / (4 * workers))))  # >= 4 chunks per worker to balance the load
    jobs = [(i, [tree.files[f] for f in names[i: i + size]], image_size) for i in range(0, n, size)]
    out: np.ndarray | None = None  # (N, 3, H, W), allocated once the first chunk's image size is known
    pool = None
    if workers > 1:
        # fork: workers need only PIL and numpy, and re-importing torch in each (spawn) costs seconds.
        pool = mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers)
        results: Iterator[tuple[int, np.ndarray | None, int, str]] = pool.imap_unordered(_decode_chunk, jobs)
    else:
        results = map(_decode_chunk, jobs)
    try:
        with tqdm(total=n, desc=desc, unit="img", file=sys.stderr, disable=not progress) as bar:
            for start, arr, bad, why in results:
                if arr is None and why:
                    raise DataError(f"cannot decode image {names[bad]} in {shown}: {why}")
                if arr is None:
                    _raise_size_mismatch(names[start], names[bad], tree)
                if out is None:
                    out = np.empty((n, 3, *arr.shape[2:]), dtype=np.uint8)
                elif arr.shape[2:] != out.shape[2:]:
                    _raise_size_mismatch(names[0], names[start], tree)
                out[start: start + len(arr)] = arr
                bar.update(len(arr))
    finally:
        if pool is not None:
            pool.terminate()
    assert out is not None  # n >= 1 and every chunk either filled its rows or raised
    return torch.from_numpy(out)


def _raise_size_mismatch(a: str, b: str, tree: _Tree) -> NoReturn:
    sizes = []
    for name in (a, b):
        src = tree.files[name]
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
            sizes.append(f"{name} is {img.size[0]}x{img.size[1]}")
    raise DataError(
        f"images differ in size ({', '.join(sizes)}); pass --image-size N to resize them all to N x N"
    )


def _n_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 16))


# --- the cache --------------------------------------------------------------------------------------


def _write_arrays(cache: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Save ``arrays`` (one .npy each) and ``meta`` (meta.json, with the cache version) under ``cache``
    atomically: written into a temp folder that is renamed into place complete."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache.parent))
    except OSError as e:
        raise DataError(f"cannot write the decoded-image cache under {cache.parent} ({e.strerror or e}); "
                        f"pass a writable --data-dir") from e
    try:
        for key, array in arrays.items():
            np.save(tmp / f"{key}.npy", array)
        (tmp / "meta.json").write_text(json.dumps({"version": CACHE_VERSION, "arrays": sorted(arrays), **meta}))
        try:
            os.rename(tmp, cache)
        except OSError:  # another process wrote the same cache first; theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_arrays(cache: Path, required: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The cached arrays and meta.json, or None when absent or unreadable (then the caller decodes again)."""
    if not cache.exists():
        return None
    try:
        meta = json.loads((cache / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION or not set(required) <= set(meta["arrays"]):
            raise ValueError("cache version or contents mismatch")
        return {key: np.load(cache / f"{key}.npy") for key in meta["arrays"]}, meta
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        # Caches are renamed into place complete, so this one was damaged afterwards: rebuild it.
        shutil.rmtree(cache, ignore_errors=True)
        return None


def _read_image_set(cache: Path) -> ImageSet | None:
    """The cached result of :func:`load_images`, or None."""
    cached = _read_arrays(cache, ("images",))
    if cached is None:
        return None
    arrays, meta = cached
    try:
        labels = torch.from_numpy(arrays["labels"]) if "labels" in arrays else None
        return ImageSet(torch.from_numpy(arrays["images"]), list(meta["names"]), labels, meta["classes"],
                        meta["class_names"], [(s, c) for s, c in meta["splits"]])
    except (KeyError, TypeError, ValueError):  # written by another version of this function: decode again
        shutil.rmtree(cache, ignore_errors=True)
        return None


_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def _write_cache(cache: Path, train: ImageData, test: ImageData, source: str, image_size: int
                 ) -> tuple[ImageData, ImageData]:
    """Save both splits under ``cache`` atomically and return them."""
    if train.images.shape[2:] != test.images.shape[2:]:
        raise DataError(
            f"train and test images differ in size ({tuple(train.images.shape[2:])} vs "
            f"{tuple(test.images.shape[2:])}); pass --image-size N to resize them all to N x N"
        )
    arrays = dict(zip(_ARRAYS, (train.images, train.labels, test.images, test.labels), strict=True))
    _write_arrays(cache, {key: t.numpy() for key, t in arrays.items()},
                  {"source": source, "image_size": image_size, "classes": train.classes,
                   "class_names": train.class_names, "n_train": len(train), "n_test": len(test)})
    return train, test


def _read_cache(cache: Path) -> tuple[ImageData, ImageData] | None:
    """The cached splits, or None when absent or unreadable."""
    cached = _read_arrays(cache, _ARRAYS)
    if cached is None:
        return None
    a, meta = cached
    t = {key: torch.from_numpy(a[key]) for key in _ARRAYS}
    classes, names = list(meta["classes"]), meta.get("class_names")
    return (ImageData(t["train_images"], t["train_labels"], classes, names),
            ImageData(t["test_images"], t["test_labels"], list(classes), names))
