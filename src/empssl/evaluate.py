"""Evaluation of a trained encoder: features of every image, a weighted kNN and a linear probe on them.

Two views of an image (``--eval-view``): EMP-SSL's bag of features (arXiv 2304.03977), the mean feature of
``n_patches`` augmented patches; or the whole image, un-augmented, as solo-learn evaluates SimCLR, VICReg and BYOL.

Honest protocol: the test patches are seeded (same arguments -> same features), the linear probe reports its final
epoch or the epoch chosen on a validation split carved from the *training* features (never the best epoch on the
test set, as the official code printed), and the number of test patches is always reported with the accuracy.

Speed: a group's patches are cut in one pass, in the network's layout and dtype, on a second CUDA stream while the
previous group runs through an eval-mode copy of the network with BatchNorm folded into the convolutions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

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
from .stream import StreamedSplit

__all__ = ["EvalError", "ProbeError", "ProbeResult", "describe_split", "evaluate", "extract_features",
           "extract_full_features", "extract_prefix_features", "image_features", "knn_predict", "linear_probe",
           "score_features", "split_images", "stratified_split"]

# Images per seeded generator draw. Fixed (not tied to the forward batch) so that the features do not depend on
# ``batch_images``: chunk c of the images is always augmented by a generator seeded from (seed, c).
RNG_CHUNK = 32


def default_patches_per_forward(device: torch.device, patch_size: int) -> int:
    """Patches per forward pass when the caller does not say. For patches of up to 32 px: 4096 on the CPU (about
    50 MB of float32 patches), four times more on CUDA (ResNet-18 on 32 px patches is compute-bound there from a
    few thousand patches on); for larger ones, fewer in proportion to their pixels."""
    base = 16384 if device.type == "cuda" else 4096
    return max(1, base * 32 * 32 // max(32 * 32, patch_size * patch_size))


class EvalError(ValueError):
    """A user-facing evaluation error (bad shapes, empty data, mismatched classes ...): one line."""


# Images for the feature extractors: one (N, 3, H, W) uint8 tensor in memory, or a streamed split read in blocks.
Images = torch.Tensor | StreamedSplit
Split = ImageData | StreamedSplit


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


def _encoder(model: nn.Module, device: torch.device
             ) -> tuple[Callable[[torch.Tensor, str], torch.Tensor], torch.memory_format]:
    """``features(x, kind)`` of an eval-mode copy of ``model`` with BatchNorm folded (a patch's feature does not
    depend on its batch; the model itself is untouched), and the memory format the copy reads best."""
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return inference_copy(model).features, memory_format  # type: ignore[return-value]


def extract_features(model: nn.Module, images: Images, aug: Augment, n_patches: int, *, kind: str = "pre",
                     seed: int = 0, batch_images: int = 0, device: torch.device | str = "cpu",
                     amp_dtype: torch.dtype | None = None, progress: bool = False,
                     desc: str = "features", dist: Dist = SINGLE) -> torch.Tensor:
    """Bag-of-features: (N, 3, H, W) uint8 images (a tensor, or a streamed split) -> (N, D) float32 features on
    ``device``, the mean of ``model.features(patch, kind)`` over ``n_patches`` augmented patches (D = hidden_dim
    for "pre", 8*width for "backbone"). The model must already be on ``device``; its train/eval mode is untouched.

    Determinism: chunk c of ``RNG_CHUNK`` images is augmented by a generator seeded from (seed, c), so the features
    depend on (seed, n_patches, image order) but not on ``batch_images`` (up to convolution algorithms).

    Args:
        batch_images: images per forward pass; 0 -> about :func:`default_patches_per_forward` patches. Memory is
            bounded by max(batch_images, RNG_CHUNK) * n_patches patches.
        amp_dtype: autocast dtype of the forward pass (None: float32); features are accumulated in float32.
    """
    return extract_prefix_features(model, images, aug, [n_patches], kind=kind, seed=seed,
                                   batch_images=batch_images, device=device, amp_dtype=amp_dtype,
                                   progress=progress, desc=desc, dist=dist)[n_patches]


def _group_patches(images: torch.Tensor, start: int, n_patches: int, aug: Augment, seed: int,
                   device: torch.device, dtype: torch.dtype, memory_format: torch.memory_format) -> torch.Tensor:
    """The seeded patches of images ``start .. start + len(images)`` (whole RNG chunks but for the last group):
    (n_patches * b, 3, s, s), patch-major. Each chunk's parameters come from its own generator and are applied in
    one pass: exactly the patches each chunk would get on its own."""
    x = images.to(device, non_blocking=True)  # (b, 3, H, W) uint8
    b, _, H, W = x.shape
    chunks = [sample_params(n_patches, min(RNG_CHUNK, b - c), aug,
                            _chunk_generator(seed, (start + c) // RNG_CHUNK, device), device, image_hw=(H, W))
              for c in range(0, b, RNG_CHUNK)]

    def joined(name: str) -> torch.Tensor:  # a field is patch-major (n_patches * b_c, ...): join the image axes
        return torch.cat([getattr(p, name).unflatten(0, (n_patches, -1)) for p in chunks], dim=1).flatten(0, 1)

    params = PatchParams(**{name: joined(name) for name in PatchParams.__dataclass_fields__})
    return apply_params(x, params, aug, n_patches, dtype, memory_format=memory_format).flatten(0, 1)


def _prefetched(starts: Sequence[int], make: Callable[[int], torch.Tensor], device: torch.device
                ) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, make(start))`` for every start. On CUDA the next group is made on a second stream while the
    current one runs through the network (the augmentation is memory-bound, the network compute-bound); elsewhere,
    or once the second stream has failed (a note in the results' ``fallbacks``), one after the other."""
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
    """Bag-of-features at several patch counts from one pass: ``P = max(counts)`` patches are encoded per image,
    once, and for every m in ``counts`` the feature is the mean of the first m. Returns ``{m: (N, D) float32}``.

    ``extract_features(..., n_patches=P)`` equals ``extract_prefix_features(..., [P])[P]``; for m < P the m patches
    are a prefix of the P drawn, another sample than ``extract_features(..., n_patches=m)`` draws, which is why the
    test-patch ablation uses this function throughout. Memory: one (N, D) result per count (a per-patch (N, P, D)
    tensor would need 105 GB for CIFAR-10 at P=128, D=4096). Other arguments and the determinism as
    :func:`extract_features`; a streamed split gives the same features as one tensor (bitwise on the CPU), and
    under torchrun (``dist``) each rank computes its share of whole groups and every rank gets all the features.
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
    # Patches in the dtype the network reads (autocast would cast float32 patches to it in the first convolution
    # anyway, so the features are the same).
    patch_dtype = amp_dtype if amp_dtype is not None else torch.float32
    features, memory_format = _encoder(model, device)

    def groups(block: torch.Tensor, first: int) -> Iterator[tuple[int, dict[int, torch.Tensor]]]:
        def make(start: int) -> torch.Tensor:
            return _group_patches(block[start:start + group], first + start, n_patches, aug, seed, device,
                                  patch_dtype, memory_format)

        for start, patches in _prefetched(range(0, block.shape[0], group), make, device):
            with autocast(device, amp_dtype):
                feats = [features(chunk, kind).float() for chunk in patches.split(per_forward)]
            f = torch.cat(feats).unflatten(0, (n_patches, -1))  # (n_patches, b, D)
            yield start, {m: f[:m].mean(0) for m in counts}  # (b, D) each

    return _by_groups(images, group, counts, groups, device, dist, progress, desc)


@torch.no_grad()
def extract_full_features(model: nn.Module, images: Images, aug: Augment, *, kind: str = "backbone",
                          batch_images: int = 0, device: torch.device | str = "cpu",
                          amp_dtype: torch.dtype | None = None, progress: bool = False,
                          desc: str = "features", dist: Dist = SINGLE) -> torch.Tensor:
    """Whole-image features, as solo-learn evaluates: every (N, 3, H, W) uint8 image, un-augmented and at its own
    size, normalised with ``aug.mean`` / ``aug.std``, through ``model.features(x, kind)`` in eval mode,
    ``batch_images`` at a time (``dist``: as :func:`extract_prefix_features`). Returns (N, D) float32 on ``device``."""
    _check_images(images)
    device = torch.device(device)
    batch = batch_images or default_patches_per_forward(device, 0)
    features, memory_format = _encoder(model, device)

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
    """``{key: (N, D) float32 features on device}`` of all the images, ``unit`` images at a time:
    ``groups(block, first)`` yields (start, {key: (b, D) features of the block's images start .. start + b - 1})
    for a (b, 3, H, W) uint8 block that starts at image ``first``. A streamed split's blocks are multiples of
    ``unit``, so the groups, and the features, are those of one tensor. Under torchrun each rank computes its share
    of whole units (:func:`empssl.distributed.rank_rows`) and the features are gathered on every rank in order."""
    from tqdm import tqdm

    first, stop = distributed.rank_rows(len(images), unit, dist)
    blocks: Iterable[torch.Tensor]  # this rank's images
    if isinstance(images, torch.Tensor):
        blocks = [images[first:stop]] if stop > first else []
    else:  # (an empty part has no blocks)
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
    """(N, D) float32 features on ``device`` of (N, 3, H, W) uint8 images under ``cfg``'s evaluation protocol
    (:func:`empssl.methods.eval_protocol`): a bag of ``n_patches`` (default ``cfg.test_patches``) seeded patches, or
    the whole image; under torchrun (``dist``) every rank gets them all."""
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
    """Weighted kNN classifier (Wu et al. 2018, as in DINO and the official EMP-SSL code): (M,) int64 labels.

    Each L2-normalised test point takes its k most cosine-similar training points, each voting for its label with
    weight exp(sim / temperature); the largest summed weight wins (ties: the smallest label). ``k`` is clamped to
    the training set's size (as the official code does), so tiny demo subsets still evaluate.

    Args:
        train_feats: (N, D); train_labels: (N,) int64 in [0, num_classes); test_feats: (M, D).
        chunk: test points per similarity matrix ((chunk, N) floats in memory).
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
    preds = [torch.empty(0, dtype=torch.long, device=test.device)]  # for M = 0
    for i in range(0, test.shape[0], chunk):
        top_sim, top_idx = (test[i:i + chunk] @ train.T).topk(k, dim=1)  # (c, k), most similar first
        # exp((sim - max) / T): the per-row factor exp(-max / T) changes no argmax but keeps small
        # temperatures from overflowing.
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()
        votes = torch.zeros(top_sim.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, labels[top_idx], weights)  # (c, C)
        preds.append(votes.argmax(1))
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
    """Weighted kNN and the linear probe of ``cfg`` on (N, D) train and (M, D) test features (moved to ``device``
    once). Returns linear_top1, knn_top1 (in %), knn_k (after clamping), knn_seconds, probe_seconds, and the probe's
    protocol ("final-epoch" | "val-epoch" | "lr-sweep"), lr, epoch, val_top1, sweep and backend."""
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
    """The full protocol of ``cfg``: :func:`image_features` of the train and test splits (in memory or
    streamed: the same features either way; under torchrun every rank gets them all), then
    :func:`score_features` (weighted kNN and linear probe). Logs one line, and one more per fallback.

    Returns a JSON-serialisable dict: :func:`score_features`'s keys, eval_view, feature, test_patches (None for the
    whole image), feature_dim, probe_epochs, probe_val_fraction, knn_temperature, eval_seed, feature_seconds,
    n_train, n_test, num_classes, eval_sets (:func:`describe_split`) and fallbacks (:mod:`empssl.fallbacks`).
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
        **scores,
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
    """What results.json says of an evaluation split: images, how they were read ("memory": one tensor; "stream":
    block by block), its split and source where a streamed split names them, and ``selection``: every image, or
    the class-balanced ``--train-subset`` / ``--test-subset`` N that ``subset`` gives."""
    out: dict[str, Any] = {"images": len(split), "read": "memory" if isinstance(split, ImageData) else "stream"}
    if isinstance(split, StreamedSplit):
        out.update(split=split.split, source=split.source)
    out["selection"] = f"class-balanced subset of {subset}" if 0 < subset <= len(split) else "every image"
    return out
