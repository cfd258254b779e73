"""What the data pipeline gives (:class:`ImageData`, :class:`ImageSet`), its one-line error (:class:`DataError`) and
the one resize rule of every tier (:func:`resize_crop`). Imports nothing above it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image


class DataError(Exception):
    """A user mistake or bad data (missing path, bad layout, corrupt image, ...): reported in one line."""


@dataclass
class ImageData:
    """A labelled image set held in memory: ``images`` (N, 3, H, W) uint8, contiguous, on the CPU; ``labels`` (N,)
    int64 indices into ``classes`` (Tiny ImageNet, ImageNet: the wnids); ``class_names`` human-readable names beside
    them where the data gives them ("goldfish, Carassius auratus"), else None."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        _check(self.images, self.labels)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, n: int) -> ImageData:
        """The first ``n`` images of the classes interleaved (first image of every class, then the second, ...),
        in stored order: each class gets ceil or floor of ``n / C`` (a class that runs out leaves its share to the
        others), and ``subset(n).subset(m) == subset(m)`` for ``m <= n``. ``n >= len(self)`` returns ``self``."""
        keep = balanced_indices(self.labels, len(self.classes), n)  # checks n
        if n >= len(self):
            return self
        return ImageData(self.images[keep].contiguous(), self.labels[keep], list(self.classes), self.class_names)


def balanced_indices(labels: torch.Tensor, num_classes: int, n: int) -> torch.Tensor:
    """The sorted (min(n, N),) int64 rows that :meth:`ImageData.subset` keeps of images with these (N,) labels
    (also what a streamed split, whose images are not in memory, selects by)."""
    if n < 1:
        raise DataError(f"subset size must be >= 1, got {n}")
    if n >= len(labels):
        return torch.arange(len(labels))
    lab = labels.numpy()
    # rank[i] = how many earlier images share image i's label
    order = np.argsort(lab, kind="stable")
    rank = np.empty(len(lab), dtype=np.int64)
    counts = np.bincount(lab, minlength=num_classes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank[order] = np.arange(len(lab)) - np.repeat(starts, counts)
    interleaved = np.lexsort((lab, rank))  # by rank, then label
    return torch.from_numpy(np.sort(interleaved[:n]))


@dataclass
class ImageSet:
    """Every image of a source, each with its relative file name (what ``empssl embed`` embeds).

    As :class:`ImageData`, but ``labels`` and ``classes`` are None for a source without classes (a flat folder);
    ``names`` are N unique relative POSIX paths in the stored order ("train/cat/0001.png", "00012.jpg"; for
    torchvision's arrays "train/00012"); ``splits`` are consecutive blocks of the rows as (split, count):
    [("train", 50000), ("test", 10000)] for a split root or a dataset, [("", N)] for a folder without splits, each
    block what :func:`load_data` gives for that split, in the same order.
    """

    images: torch.Tensor
    names: list[str]
    labels: torch.Tensor | None
    classes: list[str] | None
    class_names: list[str] | None = None
    splits: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = _check(self.images, self.labels)
        if len(self.names) != n:
            raise ValueError(f"need one name per image, got {len(self.names)} names for {n} images")
        if (self.labels is None) != (self.classes is None):
            raise ValueError("labels and classes are given together or not at all")
        if not self.splits:
            self.splits = [("", n)]
        if sum(count for _, count in self.splits) != n:
            raise ValueError(f"splits {self.splits} do not add up to {n} images")

    def __len__(self) -> int:
        return self.images.shape[0]


def _check(images: torch.Tensor, labels: torch.Tensor | None) -> int:
    """The number N of images, after a ValueError unless they are (N, 3, H, W) uint8 and ``labels`` (N,)."""
    if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"images must be (N, 3, H, W) uint8, got {tuple(images.shape)} {images.dtype}")
    if labels is not None and labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
    return images.shape[0]


def split_rows(splits: list[tuple[str, int]]) -> dict[str, slice]:
    """The rows of each split of consecutive blocks ``[(split, count), ...]`` (:attr:`ImageSet.splits`)."""
    ends = itertools.accumulate(count for _, count in splits)
    return {name: slice(end - count, end) for (name, count), end in zip(splits, ends)}


def resize_crop(img: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the shorter side resized to ``size`` (bilinear; PIL antialiases when shrinking), then
    centre-cropped."""
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = round((nw - size) / 2), round((nh - size) / 2)  # as torchvision's center_crop
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)
