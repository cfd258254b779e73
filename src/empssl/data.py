"""Image datasets as in-memory uint8 tensors: torchvision's CIFAR, ImageFolder trees and their archives.

Everything is decoded once into ``(N, 3, H, W)`` uint8 (60,000 CIFAR images are 184 MB) and kept in memory;
augmentation happens later on whole batches (see ``patches``), never per image in a DataLoader.

ImageFolder roots and archives of them are decoded with a process pool into a cache under ``data_dir``
(``data_dir/cache/<name>-<hash>/``: one ``.npy`` per array and a ``meta.json``) that later calls reuse.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import NoReturn

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp"}
)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ARCHIVE_SUFFIXES = (*TAR_SUFFIXES, ".zip")
TORCHVISION_DATASETS = ("cifar10", "cifar100")
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
        classes: class names; ``classes[i]`` is the name of label ``i``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

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
        return ImageData(self.images[keep].contiguous(), self.labels[keep], list(self.classes))


def demo_archive() -> Path:
    """Path of the bundled demo archive (5,000 train + 1,000 test CIFAR-10 images, JPEG q75)."""
    return Path(str(resources.files("empssl") / "assets" / "cifar10-demo.tar.gz"))


def load_data(
    spec: str, data_dir: str = "./data", image_size: int = 0, progress: bool = True
) -> tuple[ImageData, ImageData]:
    """Load a dataset as ``(train, test)``, both :class:`ImageData` with (N, 3, H, W) uint8 images.

    Args:
        spec: ``cifar10`` or ``cifar100`` (torchvision, under ``data_dir``); ``demo`` (the bundled
            archive); or a path to an ImageFolder root holding ``train/`` and ``test/`` (or ``val/``),
            each ``<class>/<images>``, or to a .tar/.tar.gz/.tgz/.zip archive of one.
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
    path = demo_archive() if spec == "demo" else Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"data not found: {spec} "
            "(expected cifar10, cifar100, demo, or a path to an ImageFolder root or archive)"
        )
    path = path.resolve()
    if path.is_dir():
        return _load_folder(path, Path(data_dir), image_size, progress)
    if path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES):
        return _load_archive(path, Path(data_dir), image_size, progress)
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


@dataclass
class _Split:
    names: list[str]  # relative image paths, grouped by class in sorted order
    labels: np.ndarray  # (N,) int64
    classes: list[str]


def _load_folder(root: Path, data_dir: Path, image_size: int, progress: bool) -> tuple[ImageData, ImageData]:
    tree = _walk_folder(root)
    train, test = _scan_tree(tree, str(root))
    # A folder's contents can change without its own mtime changing, so the key covers every image file.
    h = hashlib.sha256(f"{root}|{image_size}|{CACHE_VERSION}".encode())
    for name in train.names + test.names:
        st = os.stat(tree.files[name])
        h.update(f"|{name}|{st.st_size}|{st.st_mtime_ns}".encode())
    cache = data_dir / "cache" / f"{_safe_name(root.name)}-{h.hexdigest()[:16]}"
    cached = _read_cache(cache)
    if cached is not None:
        return cached
    return _write_cache(cache, _decode_split(train, tree, "train", image_size, progress),
                        _decode_split(test, tree, "test", image_size, progress), str(root), image_size)


def _load_archive(path: Path, data_dir: Path, image_size: int, progress: bool) -> tuple[ImageData, ImageData]:
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{image_size}|{CACHE_VERSION}"
    stem = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    cache = data_dir / "cache" / f"{_safe_name(stem)}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    cached = _read_cache(cache)
    if cached is not None:
        return cached
    tree = _read_archive(path)
    train, test = _scan_tree(tree, str(path))
    return _write_cache(cache, _decode_split(train, tree, "train", image_size, progress),
                        _decode_split(test, tree, "test", image_size, progress), str(path), image_size)


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


def _scan_tree(tree: _Tree, shown: str) -> tuple[_Split, _Split]:
    """Find ``train/`` and ``test/`` (or ``val/``) at the top of ``tree`` or in its single top-level folder.

    ``shown`` is the folder or archive to name in error messages.
    """
    top = sorted(d for d in tree.dirs if "/" not in d)
    root = ""
    if "train" not in top and len(top) == 1 and f"{top[0]}/train" in tree.dirs:
        root = top[0] + "/"  # archives often wrap the tree in one folder, like cifar10-jpeg75/
    if root + "train" not in tree.dirs:
        raise DataError(f"no train/ folder in {shown} (expected train/ and test/, each <class>/<images>)")
    test_name = "test" if root + "test" in tree.dirs else "val" if root + "val" in tree.dirs else None
    if test_name is None:
        raise DataError(
            f"no test/ or val/ folder in {shown} (expected train/ and test/, each <class>/<images>)"
        )
    train, test = _scan_split(tree, root, "train"), _scan_split(tree, root, test_name)
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise DataError(
            f"train/ and {test_name}/ of {shown} have different classes: "
            f"only in train: {', '.join(only_train) or '-'}; "
            f"only in {test_name}: {', '.join(only_test) or '-'}"
        )
    return train, test


def _scan_split(tree: _Tree, root: str, split: str) -> _Split:
    prefix = f"{root}{split}/"
    below = (d[len(prefix):] for d in tree.dirs if d.startswith(prefix))
    classes = sorted(c for c in below if "/" not in c)
    if not classes:
        raise DataError(f"{split}/ has no class folders (expected {split}/<class>/<images>)")
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
            raise DataError(f"{split}/{c}/ has no images")
        names += sorted(by_class[c])
        labels += [label] * len(by_class[c])
    return _Split(names, np.asarray(labels, dtype=np.int64), classes)


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
            return start, None, start + k, f"{type(e).__name__}: {e}"
        if arrays and a.shape != arrays[0].shape:
            return start, None, start + k, ""
        arrays.append(a)
    return start, np.stack(arrays).transpose(0, 3, 1, 2), -1, ""


def _decode_split(split: _Split, tree: _Tree, name: str, image_size: int, progress: bool) -> ImageData:
    """Decode every image of ``split`` into an :class:`ImageData` with (N, 3, H, W) uint8 images."""
    n = len(split.names)
    workers = _n_workers() if n >= _POOL_MIN_IMAGES else 1
    size = max(1, min(256, math.ceil(n / (4 * workers))))  # >= 4 chunks per worker to balance the load
    jobs = [(i, [tree.files[f] for f in split.names[i: i + size]], image_size) for i in range(0, n, size)]
    out: np.ndarray | None = None  # (N, 3, H, W), allocated once the first chunk's image size is known
    pool = None
    if workers > 1:
        # fork: workers need only PIL and numpy, and re-importing torch in each (spawn) costs seconds.
        pool = mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers)
        results: Iterator[tuple[int, np.ndarray | None, int, str]] = pool.imap_unordered(_decode_chunk, jobs)
    else:
        results = map(_decode_chunk, jobs)
    try:
        with tqdm(total=n, desc=f"decoding {name}", unit="img", file=sys.stderr, disable=not progress) as bar:
            for start, arr, bad, why in results:
                if arr is None and why:
                    raise DataError(f"cannot decode image {split.names[bad]}: {why}")
                if arr is None:
                    _raise_size_mismatch(split.names[start], split.names[bad], tree)
                if out is None:
                    out = np.empty((n, 3, *arr.shape[2:]), dtype=np.uint8)
                elif arr.shape[2:] != out.shape[2:]:
                    _raise_size_mismatch(split.names[0], split.names[start], tree)
                out[start: start + len(arr)] = arr
                bar.update(len(arr))
    finally:
        if pool is not None:
            pool.terminate()
    assert out is not None  # _scan_split guarantees at least one image
    return ImageData(torch.from_numpy(out), torch.from_numpy(split.labels), split.classes)


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


_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def _write_cache(cache: Path, train: ImageData, test: ImageData, source: str, image_size: int
                 ) -> tuple[ImageData, ImageData]:
    """Save both splits under ``cache`` atomically (temp dir + rename) and return them."""
    if train.images.shape[2:] != test.images.shape[2:]:
        raise DataError(
            f"train and test images differ in size ({tuple(train.images.shape[2:])} vs "
            f"{tuple(test.images.shape[2:])}); pass --image-size N to resize them all to N x N"
        )
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache.parent))
    except OSError as e:
        raise DataError(f"cannot write the decoded-image cache under {cache.parent} ({e.strerror or e}); "
                        f"pass a writable --data-dir") from e
    try:
        arrays = dict(zip(_ARRAYS, (train.images, train.labels, test.images, test.labels), strict=True))
        for key, tensor in arrays.items():
            np.save(tmp / f"{key}.npy", tensor.numpy())
        meta = {"version": CACHE_VERSION, "source": source, "image_size": image_size,
                "classes": train.classes, "n_train": len(train), "n_test": len(test)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, cache)
        except OSError:  # another process wrote the same cache first; theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return train, test


def _read_cache(cache: Path) -> tuple[ImageData, ImageData] | None:
    """The cached splits, or None when absent or unreadable (then the caller decodes again)."""
    if not cache.exists():
        return None
    try:
        meta = json.loads((cache / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION:
            raise ValueError("cache version mismatch")
        a = {key: torch.from_numpy(np.load(cache / f"{key}.npy")) for key in _ARRAYS}
        return (ImageData(a["train_images"], a["train_labels"], list(meta["classes"])),
                ImageData(a["test_images"], a["test_labels"], list(meta["classes"])))
    except (OSError, ValueError, KeyError, EOFError):
        # Caches are renamed into place complete, so this one was damaged afterwards: rebuild it.
        shutil.rmtree(cache, ignore_errors=True)
        return None
