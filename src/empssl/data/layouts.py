"""Layouts: how a tree of files becomes labelled images. ImageFolder split roots, class trees, plain folders, Tiny
ImageNet as distributed, and torchvision's CIFAR arrays.

A tree (see :mod:`.sources`) is classified once into a :class:`Catalog`: the list of :class:`ImageRecord`
(relative name, label, where the bytes are) with the classes and the split blocks. The in-memory tier decodes
a catalog whole (:func:`empssl.data.load_images`); a streamed tier can read the same records one at a time.
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


class ImageRecord(NamedTuple):
    """One image of a source: what a reader needs to fetch and label it, without decoding it.

    ``name`` is the relative POSIX path the outputs use ("train/cat/0001.png"); ``label`` an index into the
    catalog's classes, or None for a source without classes; ``data`` the absolute path of a regular file
    on disk, or the member's bytes when the source is an archive (archives are read in one pass).
    """

    name: str
    label: int | None
    data: str | bytes

    def read(self) -> bytes:
        """The image file's bytes, under the same checks as the pipeline's (regular file, size cap)."""
        return self.data if isinstance(self.data, bytes) else read_file(self.data, self.name)


@dataclass
class Catalog:
    """Every image of a source, listed and labelled but not decoded, in the order the outputs keep.

    Attributes:
        source: the folder or archive, as messages name it.
        root: the prefix that the records' names dropped ("" or a single wrapping folder "wrapped/"); the
            path inside the source is ``root + record.name``.
        records: one :class:`ImageRecord` per image, grouped by split and class, sorted by name within.
        classes: class names (label i is ``classes[i]``), or None without classes.
        class_names: human-readable names beside ``classes`` (Tiny ImageNet's words.txt), else None.
        splits: consecutive blocks of ``records`` as (split, count), as in :class:`ImageSet`.
        skipped: image-named entries that are not regular files, left out (see :mod:`.sources`).
    """

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
    names: list[str]  # paths in the tree, grouped by class in sorted order
    labels: np.ndarray  # (N,) int64
    classes: list[str]
    class_names: list[str] | None = None


def catalog_tree(tree: Tree, shown: str, unwrap_any: bool) -> Catalog:
    """Classify ``tree``: Tiny ImageNet, split root (train/ and any of val/, test/), class tree or plain folder.

    ``unwrap_any``: drop a single top-level folder even when it is not a split root (archives wrap their
    contents in one folder as a rule; a folder the user points at is taken as it is). ``shown`` names the
    source in messages.
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
        names = [n for _, s in splits for n in s.names]
        labels: list[int] | None = np.concatenate([s.labels for _, s in splits]).tolist()
        return _catalog(tree, shown, root, names, labels, first.classes, first.class_names,
                        [(name, len(s.names)) for name, s in splits])
    top_dirs = [d for d in tree.dirs if "/" not in d]
    if unwrap_any and len(top_dirs) == 1 and not any("/" not in f for f in tree.files):
        root = top_dirs[0] + "/"
    below = sorted(f for f in tree.files if f.startswith(root))
    if not below:
        raise DataError(f"no images in {shown} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if any("/" not in f[len(root):] for f in below):  # images at the top: a plain folder, no classes
        return _catalog(tree, shown, root, below, None, None, None, [("", len(below))])
    split = _scan_classes(tree, root, "")
    return _catalog(tree, shown, root, split.names, split.labels.tolist(), split.classes, None,
                    [("", len(split.names))])


def _catalog(tree: Tree, shown: str, root: str, names: list[str], labels: list[int] | None,
             classes: list[str] | None, class_names: list[str] | None, splits: list[tuple[str, int]]) -> Catalog:
    cut = len(root)
    files = tree.files
    records = [ImageRecord(n[cut:], None if labels is None else labels[i], files[n]) for i, n in enumerate(names)]
    return Catalog(shown, root, records, classes, class_names, splits, list(tree.skipped))


def split_names(tree: Tree) -> set[str]:
    """The splits :func:`catalog_tree` will find in ``tree`` (at the top or in a single wrapping folder)."""
    root = _layout_root(tree)
    if _is_tiny_imagenet(tree, root):
        return {"train", "val"}
    return {s for s in ("train", "val", "test") if root + s in tree.dirs}


def held_out_split(splits: Collection[str], shown: str) -> str:
    """The split :func:`empssl.data.load_data` tests on: ``test``, else ``val``; DataError (one line) when
    ``splits`` lack ``train`` or both of those."""
    if "train" not in splits or ("test" not in splits and "val" not in splits):
        missing = "train/" if "train" not in splits else "test/ or val/"
        raise DataError(f"no {missing} folder in {shown} (expected train/ and test/, each <class>/<images>)")
    return "test" if "test" in splits else "val"


# --- the layouts ----------------------------------------------------------------------------------


def _layout_root(tree: Tree) -> str:
    """"" or the single top-level folder that wraps a split root or Tiny ImageNet (``cifar10-jpeg75/``)."""
    top = sorted(d for d in tree.dirs if "/" not in d)
    if "train" not in top and len(top) == 1 and f"{top[0]}/train" in tree.dirs:
        return top[0] + "/"
    return ""


def _is_tiny_imagenet(tree: Tree, root: str) -> bool:
    return root + "train" in tree.dirs and (
        root + "wnids.txt" in tree.meta or root + "val/val_annotations.txt" in tree.meta)


def _check_same_classes(train: _Split, other: _Split, other_name: str, shown: str) -> None:
    if train.classes != other.classes:
        only_train = sorted(set(train.classes) - set(other.classes))
        only_other = sorted(set(other.classes) - set(train.classes))
        raise DataError(f"train/ and {other_name}/ of {shown} have different classes: only in train: "
                        f"{', '.join(only_train) or '-'}; only in {other_name}: {', '.join(only_other) or '-'}")


def _scan_split(tree: Tree, root: str, split: str) -> _Split:
    return _scan_classes(tree, f"{root}{split}/", f"{split}/")


def _scan_classes(tree: Tree, prefix: str, shown_prefix: str) -> _Split:
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


def _read_bytes(tree: Tree, name: str, shown: str | Path) -> bytes:
    src = tree.meta[name]
    return src if isinstance(src, bytes) else read_file(src, f"{name} in {shown}")


def _read_text(tree: Tree, name: str, shown: str | Path) -> str:
    return _read_bytes(tree, name, shown).decode("utf-8", errors="replace")


def _scan_tiny_imagenet(tree: Tree, root: str, shown: str) -> tuple[_Split, _Split]:
    """Tiny ImageNet as distributed: (train, val) splits, classes = sorted wnids, names from words.txt.

    train/<wnid>/images/*.JPEG are labelled by their folder (train/<wnid>/<wnid>_boxes.txt is not read);
    val/images/*.JPEG by val/val_annotations.txt (``file<TAB>wnid<TAB>bbox...``), or, in a copy whose val/
    was rearranged into val/<wnid>/ folders, by those folders. test/ (unlabelled) is left out.
    """
    train = _scan_split(tree, root, "train")
    if root + "wnids.txt" in tree.meta:
        wnids = [line.strip() for line in _read_text(tree, root + "wnids.txt", shown).splitlines() if line.strip()]
        if sorted(set(wnids)) != train.classes:
            missing = sorted(set(wnids) - set(train.classes))
            extra = sorted(set(train.classes) - set(wnids))
            raise DataError(f"train/ of {shown} does not match wnids.txt: no train/ folder for "
                            f"{', '.join(missing[:5]) or '-'}; not in wnids.txt: {', '.join(extra[:5]) or '-'}")
    classes = train.classes  # sorted wnids: the order torchvision's ImageFolder gives the train/ folders too
    if root + "words.txt" in tree.meta:
        lines = _read_text(tree, root + "words.txt", shown).splitlines()
        words = dict(line.split("\t", 1) for line in lines if "\t" in line)
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


# --- torchvision ------------------------------------------------------------------------------------


def load_torchvision(name: str, data_dir: str, image_size: int) -> tuple[ImageData, ImageData]:
    """torchvision's CIFAR-10/100 arrays under ``data_dir`` (downloaded if absent) as (train, test)."""
    import torchvision
    from PIL import Image

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
            images = np.stack([resize_crop(Image.fromarray(im), image_size) for im in images])
        out.append(ImageData(
            torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
            torch.as_tensor(ds.targets, dtype=torch.int64),
            list(ds.classes),
        ))
    return out[0], out[1]
