"""The in-memory pipeline (:func:`load_images`; :func:`load_data`: its (train, test) splits): a spec -> its source ->
one scan into a :class:`Catalog` -> decode -> cache."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from pathlib import Path

import torch

from . import decode
from .cache import add_stamps, cache_dir, read_cache, remove_stale_temps, write_cache
from .imagenet import ImageNetSpec, parse_spec
from .images import DataError, ImageData, ImageSet, split_rows
from .layouts import TORCHVISION_DATASETS, Catalog, catalog_tree, held_out_split, load_torchvision
from .sources import ARCHIVE_SUFFIXES, Tree, demo_archive, memory_available, read_archive, walk_folder

TINY_IMAGENET = "tiny-imagenet"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _check_args(spec: object, data_dir: object, image_size: object) -> tuple[str, str]:
    """(spec, data_dir) as strings (paths accepted); TypeError for other types, DataError for a negative size."""
    spec, data_dir = (os.fspath(a) if isinstance(a, os.PathLike) else a for a in (spec, data_dir))
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"data must be a dataset name, a folder, an archive or an ImageNet spec (a str or a path), "
                        f"got {spec!r}")
    if not isinstance(data_dir, str):
        raise TypeError(f"data_dir must be a str or a path, got {data_dir!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise TypeError(f"image_size must be a whole number (0 keeps the images' own size), got {image_size!r}")
    if image_size < 0:
        raise DataError(f"image size must be >= 0, got {image_size}")
    return spec, data_dir


def load_data(
    spec: str, data_dir: str = "./data", image_size: int = 0, progress: bool = True
) -> tuple[ImageData, ImageData]:
    """Load a dataset as ``(train, test)``, both :class:`ImageData` with (N, 3, H, W) uint8 images.

    The two splits of :func:`load_images` (same scan, same cache): ``train/`` and ``test/`` (``val/`` when there
    is no ``test/``, as for Tiny ImageNet and ImageNet), views of one tensor.

    Args:
        spec: ``cifar10`` or ``cifar100`` (torchvision, under ``data_dir``); ``demo`` (the bundled archive);
            ``tiny-imagenet`` (``data_dir/tiny-imagenet-200.zip`` or its folder); ``imagenet100:PATH`` /
            ``imagenet:PATH`` (:mod:`.imagenet`); or a path to an ImageFolder root holding ``train/`` and ``test/``
            (or ``val/``), each ``<class>/<images>``, to a Tiny ImageNet folder, or to an archive of one.
        data_dir: where torchvision datasets and the decoded-image cache live.
        image_size: 0 keeps the images' own size (they must all agree); S > 0 resizes the shorter side to S
            (bilinear, antialiased) and centre-crops to S x S.
        progress: a progress bar on stderr while decoding.

    Raises :class:`DataError`, one line, for any missing, malformed or undecodable data.
    """
    spec, data_dir = _check_args(spec, data_dir, image_size)
    if spec in TORCHVISION_DATASETS:
        return load_torchvision(spec, data_dir, image_size)
    path, images = _image_set(spec, Path(data_dir), image_size, progress, train_test=True)
    rows = split_rows(images.splits)
    held = held_out_split(rows, str(path))  # also refuses a cache that load_images wrote for another layout
    labels, classes = images.labels, images.classes
    assert labels is not None and classes is not None  # split roots have classes
    train, test = (ImageData(images.images[rows[s]], labels[rows[s]], list(classes), images.class_names)
                   for s in ("train", held))
    return train, test


def load_images(spec: str, data_dir: str = "./data", image_size: int = 0, progress: bool = True) -> ImageSet:
    """Every image of ``spec`` with its relative name, in a stable sorted order (see :class:`ImageSet`).

    ``spec`` is any source of :func:`load_data`, or one without splits:

    - a folder of images (images directly in it, maybe more in subfolders): no classes; every image at any
      depth, sorted by name;
    - a class tree (all images in subfolders): label = first folder, classes sorted, images grouped by class
      and sorted by name within it;
    - a split root (``train/`` and any of ``val/``, ``test/``, each a class tree): the splits in that order,
      names keep the split prefix ("train/cat/1.jpg"); the splits must share their classes;
    - Tiny ImageNet: ``train/`` then ``val/``; its ``test/`` has no labels and is left out (pass
      ``tiny-imagenet-200/test/images`` itself to embed it);
    - an archive of any of these (a single folder wrapping the contents is dropped from the names, so an
      archive and its unpacked folder give the same names);
    - ``cifar10``/``cifar100``: names "train/00012", "test/00012", the index in torchvision's arrays.

    Raises :class:`DataError` (one line) for missing or bad data, naming the file, and suggesting
    ``--image-size`` when the images differ in size.
    """
    spec, data_dir = _check_args(spec, data_dir, image_size)
    if spec in TORCHVISION_DATASETS:
        train, test = load_torchvision(spec, data_dir, image_size)
        names = [f"train/{i:05d}" for i in range(len(train))] + [f"test/{i:05d}" for i in range(len(test))]
        return ImageSet(torch.cat([train.images, test.images]), names, torch.cat([train.labels, test.labels]),
                        list(train.classes), None, [("train", len(train)), ("test", len(test))])
    return _image_set(spec, Path(data_dir), image_size, progress, train_test=False)[1]


def scan(spec: str, data_dir: str = "./data") -> Catalog:
    """The :class:`Catalog` of a folder, archive, ``demo`` or ``tiny-imagenet``: every image's relative name,
    label and bytes (archives are read, nothing is decoded), in the order :func:`load_images` keeps.
    torchvision's arrays (``cifar10``, ``cifar100``) have no files and no catalog."""
    spec, data_dir = _check_args(spec, data_dir, 0)
    if spec in TORCHVISION_DATASETS:
        raise DataError(f"{spec} is a torchvision array dataset, not a folder or archive: it has no catalog")
    path, imagenet = _source(spec, Path(data_dir))
    return _catalog(path, imagenet, False, _tree(path, imagenet))


def fingerprint(spec: str, data_dir: str = "./data") -> str | None:
    """A digest of what the decoded-image cache is keyed by for a folder or archive (an archive's size and mtime,
    or every file's name, size and mtime: a walk, no file read); None for torchvision's arrays, which do not change."""
    spec, data_dir = _check_args(spec, data_dir, 0)
    if spec in TORCHVISION_DATASETS:
        return None
    path, imagenet = _source(spec, Path(data_dir))
    return add_stamps(hashlib.sha256(), path, _tree(path, imagenet, quiet=True) if path.is_dir() else None
                      ).hexdigest()


def _image_set(spec: str, data_dir: Path, image_size: int, progress: bool, train_test: bool) -> tuple[Path, ImageSet]:
    """The pipeline: walk a folder, look in the cache, else read, catalog and decode, and cache the result; and the
    folder or archive. ``train_test``: refuse, before decoding, a tree without the splits :func:`load_data` needs."""
    path, imagenet = _source(spec, data_dir)
    tree = _tree(path, imagenet) if path.is_dir() else None  # an archive is keyed without reading it
    cache = cache_dir(path, data_dir, image_size, tree)
    remove_stale_temps(cache.parent)
    cached = read_cache(cache)
    if cached is not None:
        return path, cached
    catalog = _catalog(path, imagenet, train_test, tree or _tree(path, imagenet))
    h = w = image_size
    if catalog.records and not image_size:  # the first image's own size, from its header (decoding names a bad one)
        with contextlib.suppress(DataError, OSError):
            w, h = decode.read_header(catalog.records[0].read())[1]
    check_fits(len(catalog.records), h, w, catalog.source)  # refused before decoding
    images = decode.decode_catalog(catalog, image_size, progress)
    labels = None if catalog.classes is None else torch.tensor([r.label for r in catalog.records],
                                                               dtype=torch.int64)
    result = ImageSet(images, [r.name for r in catalog.records], labels, catalog.classes, catalog.class_names,
                      catalog.splits)
    write_cache(cache, result, str(path), image_size)
    return path, result


def _tree(path: Path, imagenet: ImageNetSpec | None = None, quiet: bool = False) -> Tree:
    tree = imagenet.walk() if imagenet else walk_folder(path) if path.is_dir() else read_archive(path)
    if tree.skipped and not quiet:
        n = len(tree.skipped)
        print(f"note: skipped {n} entr{'y' if n == 1 else 'ies'} of {path} that {'is' if n == 1 else 'are'} not "
              f"a regular file (FIFO, socket, device, link, or a symlink that leads nowhere), e.g. "
              f"{tree.skipped[0]}", file=sys.stderr)
    return tree


def _catalog(path: Path, imagenet: ImageNetSpec | None, train_test: bool, tree: Tree) -> Catalog:
    """The catalog of ``path``'s ``tree``; ``train_test`` as in :func:`_image_set`."""
    if imagenet:
        return imagenet.catalog(tree)  # always train/ and val/
    return catalog_tree(tree, str(path), unwrap_any=not path.is_dir(), train_test=train_test)


class TooBigForMemory(DataError):
    """The decoded images would not fit in memory (``--data-mode auto`` streams them instead)."""


def check_fits(n: int, h: int, w: int, source: str) -> None:
    """Raise :class:`TooBigForMemory` when ``n`` decoded ``h`` x ``w`` images cannot fit in the memory available."""
    available, need = memory_available(), n * 3 * h * w
    if available is not None and need > available:
        raise TooBigForMemory(f"{source} decoded at {w}x{h} px is {_mib(need)} ({n:,} images), more than the memory "
                              f"available ({_mib(available)}): too big for the in-memory tier; --data-mode stream "
                              f"reads it as it goes (or pass a smaller --image-size)")


def _mib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def _source(spec: str, data_dir: Path) -> tuple[Path, ImageNetSpec | None]:
    """The folder or archive ``spec`` names, and its ImageNet reading when it is ``imagenet[100][:PATH]``."""
    imagenet = parse_spec(spec, data_dir)
    return (imagenet.path, imagenet) if imagenet else (resolve(spec, data_dir), None)


def resolve(spec: str, data_dir: Path) -> Path:
    """The folder or archive that ``spec`` (demo, tiny-imagenet or a path) names; DataError if there is none."""
    if spec == "demo":
        return demo_archive()
    if spec == TINY_IMAGENET:
        for candidate in (data_dir / "tiny-imagenet-200", data_dir / "tiny-imagenet-200.zip"):
            if candidate.exists():
                return candidate.resolve()
        raise DataError(f"tiny-imagenet was not found under {data_dir} (looked for tiny-imagenet-200/ and "
                        f"tiny-imagenet-200.zip); download {TINY_IMAGENET_URL} there, or pass --data PATH to the "
                        f"zip or its folder")
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"data not found: {spec} (expected cifar10, cifar100, demo, {TINY_IMAGENET}, or a path to "
                        f"an ImageFolder root or archive)")
    path = path.resolve()
    if path.is_dir() or (path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)):
        return path
    raise DataError(f"{path} is neither a folder nor a supported archive ({', '.join(ARCHIVE_SUFFIXES)})")
