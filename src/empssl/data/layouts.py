"""Layouts: how a tree of files (:mod:`.sources`) becomes a :class:`Catalog` of labelled images: ImageFolder split
roots, class trees, plain folders and Tiny ImageNet as distributed; and torchvision's CIFAR arrays. The in-memory
tier decodes a catalog whole (:func:`empssl.data.load_images`); a streamed tier reads its records one at a time.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .images import DataError, ImageData, resize_crop
from .sources import IMAGE_EXTENSIONS, Tree, read_file

TORCHVISION_DATASETS = ("cifar10", "cifar100")
SPLITS = ("train", "val", "test")


class ImageRecord(NamedTuple):
    """One image of a source, not decoded: ``name`` the relative POSIX path the outputs use ("train/cat/0001.png");
    ``label`` an index into the catalog's classes, or None without classes; ``data`` the absolute path of a regular
    file on disk, or the member's bytes when the source is an archive (archives are read in one pass)."""

    name: str
    label: int | None
    data: str | bytes

    def read(self) -> bytes:
        """The image file's bytes, under the same checks as the pipeline's (regular file, size cap)."""
        return read_file(self.data, self.name)


@dataclass
class Catalog:
    """Every image of a source, listed and labelled but not decoded, grouped by split and class, sorted by name
    within. ``root`` is the prefix the records' names dropped ("" or a wrapping folder "wrapped/"); ``classes``,
    ``class_names`` and ``splits`` are as in :class:`ImageSet`; ``skipped``: entries that are not regular files."""

    source: str
    root: str
    records: list[ImageRecord]
    classes: list[str] | None
    class_names: list[str] | None
    splits: list[tuple[str, int]]
    skipped: list[str]

    def where(self, index: int) -> str:
        """Image ``index`` as an error message names it: its path inside the source, and the source."""
        return f"{self.root}{self.records[index].name} in {self.source}"


@dataclass
class _Split:
    labels: dict[str, int | None]  # path in the tree -> label (None: a plain folder, without classes)
    classes: list[str]  # [] without classes
    class_names: list[str] | None = None


def catalog_tree(tree: Tree, shown: str, unwrap_any: bool, train_test: bool = False) -> Catalog:
    """Classify ``tree`` as :func:`empssl.data.load_images` describes (Tiny ImageNet, split root, class tree or
    plain folder); ``shown`` names it in messages. ``unwrap_any``: drop a single top-level folder even when it is
    not a split root (archives wrap their contents in one as a rule; a folder the user points at is taken as it is).
    ``train_test``: refuse first a tree without the splits :func:`empssl.data.load_data` needs."""
    top = sorted(d for d in tree.dirs if "/" not in d)
    # a single top-level folder wrapping a split root or Tiny ImageNet ("cifar10-jpeg75/") is dropped from names
    root = top[0] + "/" if "train" not in top and len(top) == 1 and f"{top[0]}/train" in tree.dirs else ""
    tiny = root + "train" in tree.dirs and (root + "wnids.txt" in tree.meta
                                            or root + "val/val_annotations.txt" in tree.meta)
    found = ["train", "val"] if tiny else [s for s in SPLITS if root + s in tree.dirs]
    if train_test:
        held_out_split(found, shown)
    if tiny:
        return _catalog(tree, shown, root, list(zip(found, _scan_tiny_imagenet(tree, root, shown))))
    if "train" in found:
        return _catalog(tree, shown, root, [(s, _scan_classes(tree, f"{root}{s}/", f"{s}/")) for s in found])
    if unwrap_any and len(top) == 1 and not any("/" not in f for f in tree.files):
        root = top[0] + "/"
    below = sorted(f for f in tree.files if f.startswith(root))
    if not below:
        raise DataError(f"no images in {shown} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if any("/" not in f[len(root):] for f in below):  # images at the top: a plain folder, no classes
        return _catalog(tree, shown, root, [("", _Split(dict.fromkeys(below), []))])
    return _catalog(tree, shown, root, [("", _scan_classes(tree, root, ""))])


def _catalog(tree: Tree, shown: str, root: str, splits: list[tuple[str, _Split]], source: str = "") -> Catalog:
    """The catalog of ``splits`` in that order, each grouped by class and sorted by name within, with the first
    one's classes, which every split must have; names drop ``root``; ``source`` as :attr:`Catalog.source` names
    the data when not ``shown``."""
    first = splits[0][1]
    for other_name, other in splits[1:]:
        if other.classes != first.classes:
            only_train = sorted(set(first.classes) - set(other.classes))
            only_other = sorted(set(other.classes) - set(first.classes))
            raise DataError(f"train/ and {other_name}/ of {shown} have different classes: only in train: "
                            f"{', '.join(only_train) or '-'}; only in {other_name}: {', '.join(only_other) or '-'}")
    records = [ImageRecord(name[len(root):], label, tree.files[name]) for _, s in splits
               for name, label in sorted(s.labels.items(), key=lambda item: (item[1] or 0, item[0]))]
    return Catalog(source or shown, root, records, first.classes or None, first.class_names,
                   [(name, len(s.labels)) for name, s in splits], list(tree.skipped))


def held_out_split(splits: Collection[str], shown: str) -> str:
    """The split :func:`empssl.data.load_data` tests on: ``test``, else ``val``; DataError (one line) when
    ``splits`` lack ``train`` or both of those."""
    if "train" not in splits or ("test" not in splits and "val" not in splits):
        missing = "train/" if "train" not in splits else "test/ or val/"
        raise DataError(f"no {missing} folder in {shown} (expected train/ and test/, each <class>/<images>)")
    return "test" if "test" in splits else "val"


def _scan_classes(tree: Tree, prefix: str, shown_prefix: str) -> _Split:
    """The class tree below ``prefix``: label = first folder, classes sorted, images at any depth below it.
    ``shown_prefix`` is how messages name ``prefix`` ("train/", or "" for the top of a class tree)."""
    classes = sorted(d[len(prefix):] for d in tree.dirs if d.startswith(prefix) and "/" not in d[len(prefix):])
    if not classes:
        raise DataError(f"{shown_prefix} has no class folders (expected {shown_prefix}<class>/<images>)")
    index = {c: i for i, c in enumerate(classes)}
    label_of: dict[str, int | None] = {}
    for name in tree.files:
        rest = name[len(prefix):].split("/", 1)
        if name.startswith(prefix) and len(rest) == 2:  # images directly in split/ belong to no class
            label_of[name] = index[rest[0]]
    empty = sorted(set(range(len(classes))) - set(label_of.values()))
    if empty:
        raise DataError(f"{shown_prefix}{classes[empty[0]]}/ has no images")
    return _Split(label_of, classes)


def _read_text(tree: Tree, name: str, shown: str | Path) -> str:
    return read_file(tree.meta[name], f"{name} in {shown}").decode("utf-8", errors="replace")


def _scan_tiny_imagenet(tree: Tree, root: str, shown: str) -> tuple[_Split, _Split]:
    """Tiny ImageNet as distributed: (train, val) splits, classes = sorted wnids, names from words.txt.

    train/<wnid>/images/*.JPEG are labelled by their folder; val/images/*.JPEG by val/val_annotations.txt
    (``file<TAB>wnid<TAB>bbox...``), or by val/<wnid>/ folders in a copy rearranged so. test/ (unlabelled) is
    left out.
    """
    train = _scan_classes(tree, f"{root}train/", "train/")
    classes = train.classes  # sorted wnids: the order torchvision's ImageFolder gives the train/ folders too
    if root + "wnids.txt" in tree.meta:
        wnids = {line.strip() for line in _read_text(tree, root + "wnids.txt", shown).splitlines() if line.strip()}
        if sorted(wnids) != classes:
            missing, extra = sorted(wnids - set(classes)), sorted(set(classes) - wnids)
            raise DataError(f"train/ of {shown} does not match wnids.txt: no train/ folder for "
                            f"{', '.join(missing[:5]) or '-'}; not in wnids.txt: {', '.join(extra[:5]) or '-'}")
    if root + "words.txt" in tree.meta:
        lines = _read_text(tree, root + "words.txt", shown).splitlines()
        words = dict(line.split("\t", 1) for line in lines if "\t" in line)
        train.class_names = [words.get(c, c).strip() for c in classes]
    if root + "val" not in tree.dirs:
        raise DataError(f"no val/ folder in {shown} (Tiny ImageNet: val/images/ and val/val_annotations.txt)")
    prefix, annotations = root + "val/images/", root + "val/val_annotations.txt"
    loose = sorted(name for name in tree.files if name.startswith(prefix) and "/" not in name[len(prefix):])
    if not loose:  # val/ rearranged into class folders by the user
        return train, _scan_classes(tree, f"{root}val/", "val/")
    if annotations not in tree.meta:
        raise DataError(f"{shown} has val/images/ but no val/val_annotations.txt, which labels those images")
    index = {c: i for i, c in enumerate(classes)}
    label_of: dict[str, int] = {}
    for lineno, line in enumerate(_read_text(tree, annotations, shown).splitlines(), 1):
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
        if prefix + file in label_of:
            raise DataError(f"{where} labels {file!r} a second time")
        label_of[prefix + file] = index[wnid]
    unlabelled = [name for name in loose if name not in label_of]
    if unlabelled:
        raise DataError(f"{len(unlabelled)} image(s) in val/images/ of {shown} have no line in "
                        f"val/val_annotations.txt (e.g. {unlabelled[0][len(root):]})")
    return train, _Split({name: label_of[name] for name in loose}, classes)


def load_torchvision(name: str, data_dir: str, image_size: int) -> tuple[ImageData, ImageData]:
    """torchvision's CIFAR-10/100 arrays under ``data_dir`` (downloaded if absent) as (train, test)."""
    import torchvision
    from PIL import Image

    cls = getattr(torchvision.datasets, name.upper())  # CIFAR10, CIFAR100
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
            images = np.stack([resize_crop(Image.fromarray(im), image_size) for im in images])
        out.append(ImageData(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
                             torch.as_tensor(ds.targets, dtype=torch.int64), list(ds.classes)))
    return out[0], out[1]
