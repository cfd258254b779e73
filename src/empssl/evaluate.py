"""Evaluation of a trained encoder: features of every image, a weighted kNN and a linear probe on them.

Two views of an image (``--eval-view``): EMP-SSL's bag of features (Tong et al. 2023, arXiv 2304.03977), where
every image is cut into ``n_patches`` augmented patches and its feature is the mean of the patch features; or
the whole image, un-augmented, as solo-learn evaluates SimCLR, VICReg and BYOL. The kNN and the probe are the
same for every method.

Honest protocol: the test patches are seeded (same arguments -> same features), the linear probe reports
its final epoch or the epoch chosen on a validation split carved from the *training* features (never the
best epoch on the test set, as the official code printed), and the number of test patches is always
reported with the accuracy.

Speed: the patches of a group of images are cut in one pass, straight into the network's layout and dtype
(channels_last, bf16 under autocast on CUDA), on a second CUDA stream while the previous group runs through
the network, which is an eval-mode copy with its BatchNorm layers folded into the convolutions; features stay
on the device for the kNN and the probe.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .config import Config
from .data import ImageData
from .devices import autocast, autocast_dtype, synchronize
from .distributed import SINGLE, Dist
from .fallbacks import collecting, fall_back
from .methods import create_method, eval_protocol
from .models import inference_copy
from .patches import Augment, PatchParams, apply_params, sample_params
from .probe import ProbeError, ProbeResult, check_finite, linear_probe, stratified_split

__all__ = ["EvalError", "ImageBlocks", "LabelledBlocks", "ProbeError", "ProbeResult", "describe_split", "evaluate",
           "extract_features", "extract_full_features", "extract_prefix_features", "image_features", "knn_predict",
           "linear_probe", "score_features", "split_images", "stratified_split"]

# Images per seeded generator draw. Fixed (not tied to the forward batch) so that the patches, and hence
# the features, do not depend on ``batch_images``: chunk c of the images is always augmented by a generator
# seeded from (seed, c).
RNG_CHUNK = 32
# Patches per forward pass when the caller does not say: about 50 MB of float32 32x32 patches on the CPU; on
# CUDA four times more (the forward of ResNet-18 on 32 px patches is compute-bound there from a few thousand
# patches on, and fewer, larger passes launch fewer kernels).
DEFAULT_PATCHES_PER_FORWARD = 4096
DEFAULT_PATCHES_PER_FORWARD_CUDA = 16384


def default_patches_per_forward(device: torch.device, patch_size: int) -> int:
    """Patches per forward pass when the caller does not say: the defaults above for patches of up to 32 px, fewer
    for larger ones, in proportion to their pixels (at 224 px, 334 on CUDA: the bytes of 16,384 patches of 32 px;
    a pass still holds at least one seeded chunk of images)."""
    base = DEFAULT_PATCHES_PER_FORWARD_CUDA if device.type == "cuda" else DEFAULT_PATCHES_PER_FORWARD
    return max(1, base * 32 * 32 // max(32 * 32, patch_size * patch_size))


class EvalError(ValueError):
    """A user-facing evaluation error (bad shapes, empty data, mismatched classes ...): one line."""


class ImageBlocks(Protocol):
    """Images too many to hold at once, read block by block (:class:`empssl.stream.StreamedSplit`)."""

    def __len__(self) -> int: ...

    def blocks(self, multiple: int) -> Iterator[torch.Tensor]:
        """Consecutive (b, 3, S, S) uint8 blocks of all the images, in order; each b a multiple of ``multiple``
        but the last."""
        ...

    def part(self, first: int, stop: int) -> ImageBlocks:
        """Images ``first .. stop - 1`` (a rank's share of them, :func:`empssl.distributed.rank_rows`)."""
        ...


class LabelledBlocks(ImageBlocks, Protocol):
    """A labelled split read block by block: what :func:`evaluate` takes besides an in-memory ImageData."""

    labels: torch.Tensor  # (N,) int64
    classes: list[str]

    def subset(self, n: int) -> LabelledBlocks:
        """The rows :meth:`empssl.data.ImageData.subset` keeps (class-balanced, in order)."""
        ...


# Images for the feature extractors: one (N, 3, H, W) uint8 tensor in memory, or blocks of it.
Images = torch.Tensor | ImageBlocks
Split = ImageData | LabelledBlocks


def _check_images(images: Images) -> None:
    if isinstance(images, torch.Tensor) and (images.dim() != 4 or images.shape[1] != 3
                                             or images.dtype != torch.uint8):
        raise EvalError(f"images must be (N, 3, H, W) uint8, got {tuple(images.shape)} {images.dtype}")
    if len(images) == 0:
        raise EvalError("no images to extract features from")


def split_images(split: Split) -> Images:
    """The images of a split: the in-memory tensor, or the streamed split itself (read block by block)."""
    return split.images if isinstance(split, ImageData) else split


def _chunk_generator(seed: int, chunk: int, device: torch.device) -> torch.Generator:
    # SeedSequence mixes (seed, chunk) so that neighbouring seeds do not give overlapping streams.
    state = np.random.SeedSequence([seed % 2**64, chunk]).generate_state(2, dtype=np.uint32)
    g = torch.Generator(device=device)
    g.manual_seed((int(state[0]) << 31) ^ int(state[1]))
    return g


def _features_of(model: nn.Module) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """``model.features(x, kind)``: every method's model has it (:meth:`empssl.methods.Method.build_model`)."""
    return model.features  # type: ignore[return-value]


def extract_features(model: nn.Module, images: Images, aug: Augment, n_patches: int, *, kind: str = "pre",
                     seed: int = 0, batch_images: int = 0, device: torch.device | str = "cpu",
                     amp_dtype: torch.dtype | None = None, progress: bool = False,
                     desc: str = "features", dist: Dist = SINGLE) -> torch.Tensor:
    """Bag-of-features: (N, 3, H, W) uint8 images (a tensor, or :class:`ImageBlocks` read block by block) ->
    (N, D) float32 features on ``device``, the mean over
    ``n_patches`` augmented patches of ``model.features(patch, kind)`` (D = hidden_dim for "pre", 8*width for
    "backbone").

    The model must already be on ``device``; an eval-mode copy of it runs (BatchNorm on running statistics, so a
    patch's feature does not depend on its batch, and folded into the preceding layers:
    :func:`empssl.models.inference_copy`); the model itself, and its train/eval mode, are left as they are.
    Determinism: images are augmented in fixed chunks of ``RNG_CHUNK`` images, chunk c with a generator
    seeded from (seed, c), so the features depend on (seed, n_patches, image order) but not on
    ``batch_images`` (up to floating-point differences between convolution algorithms).

    Args:
        batch_images: images per forward pass (each contributes ``n_patches`` patches); 0 -> about
            :func:`default_patches_per_forward` patches (4,096 of 32 px, 16,384 on CUDA). At least one
            chunk (``RNG_CHUNK`` images) is augmented at a time, so memory is bounded by
            max(batch_images, RNG_CHUNK) * n_patches patches.
        amp_dtype: autocast dtype of the forward pass (e.g. torch.bfloat16; see :mod:`empssl.devices`); None
            computes in float32. Features are accumulated in float32 either way.
    """
    return extract_prefix_features(model, images, aug, [n_patches], kind=kind, seed=seed,
                                   batch_images=batch_images, device=device, amp_dtype=amp_dtype,
                                   progress=progress, desc=desc, dist=dist)[n_patches]


def _cat_params(parts: Sequence[PatchParams], n_patches: int) -> PatchParams:
    """The parameters of several image chunks as those of one batch: each field is patch-major
    (n_patches * b_c, ...), so chunks are joined along the image axis of its (n_patches, b_c, ...) view."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for name in PatchParams.__dataclass_fields__:
        ts = [getattr(p, name) for p in parts]
        joined = torch.cat([t.view(n_patches, -1, *t.shape[1:]) for t in ts], dim=1)
        out[name] = joined.reshape(-1, *ts[0].shape[1:])
    return PatchParams(**out)


def _group_patches(images: torch.Tensor, start: int, n_patches: int, aug: Augment, seed: int,
                   device: torch.device, dtype: torch.dtype, memory_format: torch.memory_format) -> torch.Tensor:
    """The seeded patches of images ``start .. start + len(images)`` (a whole number of RNG chunks, but for the
    last group): (n_patches * b, 3, s, s), patch-major. The parameters are drawn chunk by chunk from each chunk's
    own generator and applied in one pass, which gives exactly the patches each chunk would get on its own."""
    x = images.to(device, non_blocking=True)  # (b, 3, H, W) uint8
    b, _, H, W = x.shape
    params = _cat_params([sample_params(n_patches, min(RNG_CHUNK, b - c), aug,
                                        _chunk_generator(seed, (start + c) // RNG_CHUNK, device), device,
                                        image_hw=(H, W)) for c in range(0, b, RNG_CHUNK)], n_patches)
    return apply_params(x, params, aug, n_patches, dtype, memory_format=memory_format).flatten(0, 1)


def _prefetched(starts: Sequence[int], make: Callable[[int], torch.Tensor], device: torch.device
                ) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, make(start))`` for every start. On CUDA the next group is made on a second stream while the
    caller's forward pass of the current one runs on the main stream: the augmentation (memory-bound) overlaps
    the network (compute-bound). Elsewhere, or once the second stream has failed (a note in the results'
    ``fallbacks``): one after the other, the same groups."""
    done = 0
    if _overlap(device):
        try:
            for start, patches in _overlapped(starts, make, device):
                yield start, patches
                done += 1
            return
        except Exception as e:  # a stream, event or launch that fails: the same groups, made one after the other
            fall_back("overlapped feature extraction (a second CUDA stream)", "one stream", e)
            synchronize(device)
    for start in starts[done:]:
        yield start, make(start)


def _overlap(device: torch.device) -> bool:
    """Whether :func:`_prefetched` makes the next group on a second stream: on CUDA."""
    return device.type == "cuda"


def _overlapped(starts: Sequence[int], make: Callable[[int], torch.Tensor], device: torch.device
                ) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`_prefetched` on CUDA: group i + 1 is launched on a side stream before group i is handed over."""
    main, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    side.wait_stream(main)  # whatever put the images on the device is done before the first group is cut

    def launch(start: int) -> tuple[torch.Tensor, torch.cuda.Event]:
        with torch.cuda.stream(side):
            patches = make(start)
            ready = torch.cuda.Event()
            ready.record(side)
        return patches, ready

    pending = launch(starts[0]) if starts else None
    for i, start in enumerate(starts):
        assert pending is not None
        patches, ready = pending
        main.wait_event(ready)
        patches.record_stream(main)  # the allocator must not reuse them before the main stream is done
        pending = launch(starts[i + 1]) if i + 1 < len(starts) else None
        yield start, patches


@torch.no_grad()
def extract_prefix_features(model: nn.Module, images: Images, aug: Augment, counts: Sequence[int], *,
                            kind: str = "pre", seed: int = 0, batch_images: int = 0,
                            device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
                            progress: bool = False, desc: str = "features", dist: Dist = SINGLE
                            ) -> dict[int, torch.Tensor]:
    """Bag-of-features at several patch counts from one pass: ``P = max(counts)`` patches are cut and encoded
    per image, once, and for every m in ``counts`` the feature is the mean of the first m of them.

    Returns ``{m: (N, D) float32 features on device}``. ``extract_features(..., n_patches=P)`` equals
    ``extract_prefix_features(..., [P])[P]``; for m < P the m patches are a prefix of the P drawn ones, so
    they differ from what ``extract_features(..., n_patches=m)`` draws (another sample of the same
    augmentation), which is why the test-patch ablation uses this function throughout. Memory: one (N, D)
    result per count (a per-patch (N, P, D) tensor would need 105 GB for CIFAR-10 at P=128, D=4096);
    other arguments and the determinism guarantees as :func:`extract_features`. Blocks of an
    :class:`ImageBlocks` are read as they are needed, a multiple of the images augmented together at a time, so
    the features equal those of the same images in one tensor (bitwise on the CPU). ``dist`` (torchrun): each rank
    computes the features of its share of the images, whole groups of them (patches are seeded per
    ``RNG_CHUNK`` images from their index), and every rank gets all of them, the same as one process's.
    """
    counts = sorted(set(int(m) for m in counts))
    if not counts or counts[0] < 1:
        raise EvalError(f"patch counts must be >= 1, got {counts}")
    n_patches = counts[-1]
    _check_images(images)
    if kind not in ("pre", "backbone"):
        raise EvalError(f"unknown feature kind {kind!r}; use 'pre' or 'backbone'")
    if not isinstance(aug, Augment):
        raise TypeError(f"aug must be an empssl.Augment, got {type(aug).__name__}")
    if batch_images < 0:
        raise EvalError(f"batch_images must be >= 0 (0: automatic), got {batch_images}")
    device = torch.device(device)
    param = next(model.parameters(), None)
    if param is not None and param.device.type != device.type:
        raise EvalError(f"model is on {param.device} but features were asked for on {device}")

    per_forward = batch_images * n_patches if batch_images > 0 else default_patches_per_forward(device, aug.size)
    group = max(1, per_forward // (n_patches * RNG_CHUNK)) * RNG_CHUNK  # images augmented together
    # Patches in the layout and dtype the network reads (autocast would cast float32 patches to bf16 in the
    # first convolution anyway, so the features are the same).
    patch_dtype = amp_dtype if amp_dtype is not None else torch.float32
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    features = _features_of(inference_copy(model))  # eval mode, BatchNorm folded; the model itself is not touched

    def groups(block: torch.Tensor, first: int) -> Iterator[tuple[int, dict[int, torch.Tensor]]]:
        def make(start: int) -> torch.Tensor:
            return _group_patches(block[start:start + group], first + start, n_patches, aug, seed, device,
                                  patch_dtype, memory_format)

        for start, patches in _prefetched(range(0, block.shape[0], group), make, device):
            b = patches.shape[0] // n_patches
            feats = []
            for i in range(0, patches.shape[0], per_forward):
                with autocast(device, amp_dtype):
                    feats.append(features(patches[i:i + per_forward], kind).float())
            f = torch.cat(feats).view(n_patches, b, -1)  # (n_patches, b, D)
            yield start, {m: f[:m].mean(0) for m in counts}  # (b, D) each

    return _by_groups(images, group, counts, groups, device, dist, progress, desc)


@torch.no_grad()
def extract_full_features(model: nn.Module, images: Images, aug: Augment, *, kind: str = "backbone",
                          batch_images: int = 0, device: torch.device | str = "cpu",
                          amp_dtype: torch.dtype | None = None, progress: bool = False,
                          desc: str = "features", dist: Dist = SINGLE) -> torch.Tensor:
    """Whole-image features, as solo-learn evaluates its methods: every (N, 3, H, W) uint8 image, un-augmented
    and at its own size, normalised with ``aug.mean`` / ``aug.std``, through ``model.features(x, kind)`` in eval
    mode (:class:`ImageBlocks` read block by block, a multiple of ``batch_images`` at a time; ``dist``: each rank
    its share, as :func:`extract_prefix_features`). Returns (N, D) float32 on ``device``."""
    _check_images(images)
    device = torch.device(device)
    batch = batch_images or (DEFAULT_PATCHES_PER_FORWARD_CUDA if device.type == "cuda" else
                             DEFAULT_PATCHES_PER_FORWARD)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    features = _features_of(inference_copy(model))  # eval mode, BatchNorm folded; the model itself is not touched

    def groups(block: torch.Tensor, first: int) -> Iterator[tuple[int, dict[int, torch.Tensor]]]:
        for start in range(0, block.shape[0], batch):
            x = block[start:start + batch].to(device, non_blocking=True).float().div_(255)
            for c in range(3):  # Python-float constants, as the patches are normalised
                x[:, c].sub_(aug.mean[c]).div_(aug.std[c])
            with autocast(device, amp_dtype):
                f = features(x.contiguous(memory_format=memory_format), kind).float()
            yield start, {0: f}

    return _by_groups(images, batch, [0], groups, device, dist, progress, desc)[0]


def _by_groups(images: Images, unit: int, keys: Sequence[int],
               groups: Callable[[torch.Tensor, int], Iterator[tuple[int, dict[int, torch.Tensor]]]],
               device: torch.device, dist: Dist, progress: bool, desc: str) -> dict[int, torch.Tensor]:
    """``{key: (N, D) float32 features on device}`` of all the images, computed ``unit`` images at a time:
    ``groups(block, first)`` yields (start, {key: (b, D) features of images start .. start + b - 1 of the block})
    for a (b, 3, H, W) uint8 block whose first image is image ``first``. A tensor is one block; the blocks of an
    :class:`ImageBlocks` are multiples of ``unit`` images, so every group holds the images the tensor's would, and
    the features are the same. Under torchrun (``dist``) each rank computes its share of whole units
    (:func:`empssl.distributed.rank_rows`) and the features, not the images, are gathered on every rank in order."""
    from tqdm import tqdm

    first, stop = distributed.rank_rows(len(images), unit, dist)
    blocks: Iterable[torch.Tensor]  # this rank's images
    if stop == first:
        blocks = []
    elif isinstance(images, torch.Tensor):
        blocks = [images[first:stop]]
    else:
        blocks = (images.part(first, stop) if dist.enabled else images).blocks(unit)
    out: dict[int, torch.Tensor] = {}  # key -> (stop - first, D) on device
    at = 0  # images of the share done
    with tqdm(total=stop - first, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for block in blocks:
            _check_images(block)
            for start, feats in groups(block, first + at):
                for key, f in feats.items():
                    if key not in out:
                        out[key] = torch.empty(stop - first, f.shape[1], dtype=torch.float32, device=device)
                    out[key][at + start:at + start + f.shape[0]] = f
                bar.update(f.shape[0])
            at += block.shape[0]
    if at != stop - first:
        raise EvalError(f"the image blocks held {at} images, not the {stop - first} announced")
    none = torch.empty(0, 1, dtype=torch.float32, device=device)  # a rank without images
    return {key: distributed.gather_rows(out.get(key, none), len(images), unit, dist) for key in keys}


def view_label(view: str, test_patches: int) -> str:
    """How an accuracy was measured, as the logs and plots say it: "16 test patches" or "whole image"."""
    return f"{test_patches} test patches" if view == "patches" else "whole image"


def image_features(model: nn.Module, images: Images, cfg: Config, device: torch.device | str, *,
                   n_patches: int | None = None, progress: bool = False, desc: str = "features",
                   dist: Dist = SINGLE) -> torch.Tensor:
    """(N, D) float32 features on ``device`` of (N, 3, H, W) uint8 images under ``cfg``'s evaluation protocol:
    the view (``cfg.eval_view``: a bag of ``n_patches`` (default ``cfg.test_patches``) seeded augmented patches,
    or the whole image) and the feature (``cfg.eval_feature``), "auto" meaning the method's own
    (:func:`empssl.methods.eval_protocol`); under torchrun (``dist``) each rank computes its share and every rank
    gets them all. Call ``.cpu()`` on the result for host memory."""
    view, kind = eval_protocol(cfg)
    aug = create_method(cfg).eval_augment()
    device = torch.device(device)
    if view == "patches":
        n_patches = n_patches or cfg.test_patches
        return extract_features(model, images, aug, n_patches, desc=desc, dist=dist,
                                **feature_options(cfg, device, n_patches, progress))
    return extract_full_features(model, images, aug, kind=kind, batch_images=cfg.eval_batch_size, device=device,
                                 amp_dtype=autocast_dtype(cfg.precision, device), progress=progress, desc=desc,
                                 dist=dist)


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN classifier (Wu et al. 2018, as in DINO and the official EMP-SSL code).

    Features are L2-normalised; each test point takes its k most cosine-similar training points, each
    votes for its label with weight exp(sim / temperature), and the label with the largest summed weight
    wins (ties: the smallest label). ``k`` larger than the training set is clamped to its size (as the
    official code does), so tiny demo subsets still evaluate.

    Args:
        train_feats: (N, D); train_labels: (N,) int64 in [0, num_classes); test_feats: (M, D).
        chunk: test points per similarity matrix ((chunk, N) floats in memory).

    Returns:
        (M,) int64 predicted labels, on the tensors' device.
    """
    if train_feats.dim() != 2 or test_feats.dim() != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise EvalError(f"kNN needs (N, D) and (M, D) features, got {tuple(train_feats.shape)} and "
                        f"{tuple(test_feats.shape)}")
    if train_labels.shape != (train_feats.shape[0],):
        raise EvalError(f"kNN needs one label per training feature, got {tuple(train_labels.shape)} labels "
                        f"for {train_feats.shape[0]} features")
    if train_feats.shape[0] == 0:
        raise EvalError("kNN needs at least one training feature")
    if k < 1 or not 0 < temperature < math.inf or chunk < 1 or num_classes < 1:
        raise EvalError(f"kNN needs k >= 1, a finite temperature > 0, chunk >= 1 and num_classes >= 1, got {k}, "
                        f"{temperature}, {chunk}, {num_classes}")
    if train_labels.dtype.is_floating_point or train_labels.dtype == torch.bool:
        raise TypeError(f"kNN labels must be integers, got {train_labels.dtype}")
    if int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes:
        raise EvalError(f"kNN labels must lie in [0, {num_classes})")
    check_finite("kNN", train_feats, test_feats)
    k = min(k, train_feats.shape[0])
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    labels = train_labels.long()
    preds = []
    for i in range(0, test.shape[0], chunk):
        sim = test[i:i + chunk] @ train.T  # (c, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (c, k), most similar first
        # exp((sim - max) / T): the per-row factor exp(-max / T) changes no argmax but keeps small
        # temperatures from overflowing.
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()
        votes = torch.zeros(top_sim.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, labels[top_idx], weights)  # (c, C)
        preds.append(votes.argmax(1))
    if not preds:
        return torch.empty(0, dtype=torch.long, device=test_feats.device)
    return torch.cat(preds)


def check_splits(train: Split, test: Split) -> int:
    """Raise EvalError unless ``train`` and ``test`` share their classes and hold valid labels; return C."""
    if list(train.classes) != list(test.classes):
        raise EvalError(f"train and test splits have different classes ({len(train.classes)} vs "
                        f"{len(test.classes)})")
    num_classes = len(train.classes)
    for name, split in (("train", train), ("test", test)):
        if split.labels.numel() == 0:
            raise EvalError(f"the {name} split is empty")
        if int(split.labels.min()) < 0 or int(split.labels.max()) >= num_classes:
            raise EvalError(f"{name} labels must lie in [0, {num_classes})")
    return num_classes


def feature_options(cfg: Config, device: torch.device, n_patches: int, progress: bool) -> dict[str, Any]:
    """The keyword arguments of :func:`extract_features` / :func:`extract_prefix_features` that ``cfg`` sets for
    ``n_patches`` patches per image: the feature kind, seed, batch and autocast dtype."""
    batch_images = max(1, cfg.eval_batch_size // n_patches) if cfg.eval_batch_size > 0 else 0
    return {"kind": eval_protocol(cfg)[1], "seed": cfg.eval_seed, "batch_images": batch_images, "device": device,
            "amp_dtype": autocast_dtype(cfg.precision, device), "progress": progress}


def score_features(train_f: torch.Tensor, train_labels: torch.Tensor, test_f: torch.Tensor,
                   test_labels: torch.Tensor, num_classes: int, cfg: Config, device: torch.device | str, *,
                   progress: bool = False) -> dict[str, Any]:
    """Weighted kNN (``cfg.knn_k``, ``cfg.knn_temperature``) and the linear probe (``cfg.probe_*``) on
    (N, D) train and (M, D) test features (on any device; they are moved to ``device`` once). Returns linear_top1,
    knn_top1 (in %), probe_epoch, probe_val_top1, knn_k (after clamping to the training set), knn_seconds,
    probe_seconds, and the probe's protocol ("final-epoch" | "val-epoch" | "lr-sweep"), lr, sweep and backend."""
    device = torch.device(device)
    t0 = time.perf_counter()
    train_f, test_f = train_f.to(device), test_f.to(device)
    train_labels, test_labels = train_labels.to(device), test_labels.to(device)
    k = min(cfg.knn_k, train_f.shape[0])
    pred = knn_predict(train_f, train_labels, test_f, num_classes, k=k, temperature=cfg.knn_temperature)
    knn_top1 = (pred == test_labels).double().mean().item() * 100
    knn_seconds = time.perf_counter() - t0

    probe = linear_probe(train_f, train_labels, test_f, test_labels, num_classes, epochs=cfg.probe_epochs,
                         lr=cfg.probe_lr, lrs=cfg.probe_lrs or None, momentum=cfg.probe_momentum,
                         weight_decay=cfg.probe_weight_decay, batch_size=cfg.probe_batch_size,
                         val_fraction=cfg.probe_val(), seed=cfg.eval_seed, device=device, progress=progress)
    return {"linear_top1": probe.top1, "knn_top1": knn_top1, "probe_protocol": probe.protocol,
            "probe_lr": probe.lr, "probe_epoch": probe.epoch, "probe_val_top1": probe.val_top1,
            "probe_sweep": probe.sweep, "probe_backend": probe.backend, "knn_k": k, "knn_seconds": knn_seconds,
            "probe_seconds": probe.seconds}


def evaluate(model: nn.Module, train: Split, test: Split, cfg: Config, device: torch.device | str,
             *, progress: bool = True, log: Callable[[str], Any] = print, dist: Dist = SINGLE) -> dict[str, Any]:
    """The full protocol of ``cfg``: features of the train and test images (:func:`image_features`: the
    method's own view and feature unless ``cfg.eval_view`` / ``cfg.eval_feature`` say otherwise; bags of
    ``cfg.test_patches`` patches seeded by ``cfg.eval_seed``), weighted kNN (``cfg.knn_k``,
    ``cfg.knn_temperature``) and the linear probe (``cfg.probe_*``). Either split may be in memory
    (:class:`ImageData`) or read block by block (:class:`LabelledBlocks`, e.g. a streamed split): only the
    features are kept, and they are the same either way. Under torchrun (``dist``) every rank computes the
    features of its share of each split, and gets them all; the kNN and the probe then run on every rank alike.

    Returns a JSON-serialisable dict: linear_top1, knn_top1 (in %), eval_view, feature, test_patches (None for
    the whole-image view), probe_epoch, probe_val_top1, feature_seconds, knn_seconds, probe_seconds, n_train,
    n_test, num_classes, feature_dim, knn_k (after clamping to the training set), knn_temperature, eval_seed,
    probe_epochs, eval_sets (what the kNN and the probe were trained and tested on: :func:`describe_split`), and
    fallbacks (the fast paths that failed and fell back, :mod:`empssl.fallbacks`). Logs one
    line, and one more per fallback.
    """
    device = torch.device(device)
    num_classes = check_splits(train, test)
    view, kind = eval_protocol(cfg)
    with collecting(log) as fallbacks:  # fast paths that failed and ran their plain twins instead
        t0 = time.perf_counter()
        train_f = image_features(model, split_images(train), cfg, device, progress=progress, desc="train features",
                                 dist=dist)
        test_f = image_features(model, split_images(test), cfg, device, progress=progress, desc="test features",
                                dist=dist)
        synchronize(device)
        feature_seconds = time.perf_counter() - t0

        scores = score_features(train_f, train.labels, test_f, test.labels, num_classes, cfg, device,
                                progress=progress)
    feature_name = "pre-feature" if kind == "pre" else "backbone feature"
    how = view_label(view, cfg.test_patches)
    chosen = f"lr {scores['probe_lr']:g}, " if scores["probe_protocol"] == "lr-sweep" else ""
    selected = "" if scores["probe_val_top1"] is None else \
        f" ({chosen}epoch {scores['probe_epoch']}, val {scores['probe_val_top1']:.1f}%)"
    log(f"linear {scores['linear_top1']:.1f}%{selected} | kNN {scores['knn_top1']:.1f}% ({how}, {feature_name})")
    return {
        **scores,  # linear_top1, knn_top1, probe_epoch, probe_val_top1, knn_k, knn_seconds, probe_seconds
        "eval_view": view,
        "test_patches": cfg.test_patches if view == "patches" else None,
        "feature": kind,
        "feature_dim": int(train_f.shape[1]),
        "probe_epochs": cfg.probe_epochs,
        "probe_val_fraction": cfg.probe_val(),
        "knn_temperature": cfg.knn_temperature,
        "eval_seed": cfg.eval_seed,
        "feature_seconds": feature_seconds,
        "n_train": int(train_f.shape[0]),
        "n_test": int(test_f.shape[0]),
        "num_classes": num_classes,
        "eval_sets": {"train": describe_split(train, cfg.train_subset), "test": describe_split(test, cfg.test_subset)},
        "fallbacks": fallbacks,
    }


def describe_split(split: Split, subset: int = 0) -> dict[str, Any]:
    """What results.json says of an evaluation split: images, how they were read ("memory": decoded into one
    tensor; "stream": decoded block by block, only features kept), the split and source where known (a streamed
    split names them), and ``selection``: every image, or the class-balanced ``--train-subset`` /
    ``--test-subset`` N that ``subset`` gives."""
    out: dict[str, Any] = {"images": len(split), "read": "memory" if isinstance(split, ImageData) else "stream"}
    for key in ("split", "source"):
        value = getattr(split, key, None)
        if isinstance(value, str):
            out[key] = value
    out["selection"] = f"class-balanced subset of {subset}" if 0 < subset <= len(split) else "every image"
    return out
