"""Bag-of-features evaluation (EMP-SSL, Tong et al. 2023, arXiv 2304.03977): every image is cut into ``n_patches``
augmented patches, its feature is the mean of the patch features, and a weighted kNN and a linear probe
are run on those features.

Honest protocol: the test patches are seeded (same arguments -> same features), the linear probe reports
its final epoch or the epoch chosen on a validation split carved from the *training* features (never the
best epoch on the test set, as the official code printed), and the number of test patches is always
reported with the accuracy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .data import ImageData
from .models import EMPSSLModel
from .patches import Augment, make_patches

# Images per seeded generator draw. Fixed (not tied to the forward batch) so that the patches, and hence
# the features, do not depend on ``batch_images``: chunk c of the images is always augmented by a generator
# seeded from (seed, c).
RNG_CHUNK = 32
# Patches per forward pass when the caller does not say (about 50 MB of float32 32x32 patches).
DEFAULT_PATCHES_PER_FORWARD = 4096


class EvalError(Exception):
    """A user-facing evaluation error (bad shapes, empty data, mismatched classes ...): one line."""


def augment_from_config(cfg: Config) -> Augment:
    """The patch augmentation of training, as the config sets it (size, crop scale and ratio)."""
    return Augment(size=cfg.patch_size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio))


def _chunk_generator(seed: int, chunk: int, device: torch.device) -> torch.Generator:
    # SeedSequence mixes (seed, chunk) so that neighbouring seeds do not give overlapping streams.
    state = np.random.SeedSequence([seed % 2**64, chunk]).generate_state(2, dtype=np.uint32)
    g = torch.Generator(device=device)
    g.manual_seed((int(state[0]) << 31) ^ int(state[1]))
    return g


def extract_features(model: EMPSSLModel, images: torch.Tensor, aug: Augment, n_patches: int, *, kind: str = "pre",
                     seed: int = 0, batch_images: int = 0, device: torch.device | str = "cpu",
                     amp_dtype: torch.dtype | None = None, progress: bool = False,
                     desc: str = "features") -> torch.Tensor:
    """Bag-of-features: (N, 3, H, W) uint8 images -> (N, D) float32 CPU features, the mean over ``n_patches``
    augmented patches of ``model.features(patch, kind)`` (D = hidden_dim for "pre", 8*width for "backbone").

    The model must already be on ``device``; it runs in eval mode (BatchNorm on running statistics, so a
    patch's feature does not depend on its batch) and its train/eval mode is restored afterwards.
    Determinism: images are augmented in fixed chunks of ``RNG_CHUNK`` images, chunk c with a generator
    seeded from (seed, c), so the features depend on (seed, n_patches, image order) but not on
    ``batch_images`` (up to floating-point differences between convolution algorithms).

    Args:
        batch_images: images per forward pass (each contributes ``n_patches`` patches); 0 -> about
            ``DEFAULT_PATCHES_PER_FORWARD`` patches. At least one chunk (``RNG_CHUNK`` images) is
            augmented at a time, so memory is bounded by max(batch_images, RNG_CHUNK) * n_patches patches.
        amp_dtype: autocast dtype for the forward pass on CUDA (e.g. torch.bfloat16); ignored on CPU.
            Features are accumulated in float32 either way.
    """
    return extract_prefix_features(model, images, aug, [n_patches], kind=kind, seed=seed,
                                   batch_images=batch_images, device=device, amp_dtype=amp_dtype,
                                   progress=progress, desc=desc)[n_patches]


@torch.no_grad()
def extract_prefix_features(model: EMPSSLModel, images: torch.Tensor, aug: Augment, counts: Sequence[int], *,
                            kind: str = "pre", seed: int = 0, batch_images: int = 0,
                            device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
                            progress: bool = False, desc: str = "features") -> dict[int, torch.Tensor]:
    """Bag-of-features at several patch counts from one pass: ``P = max(counts)`` patches are cut and encoded
    per image, once, and for every m in ``counts`` the feature is the mean of the first m of them.

    Returns ``{m: (N, D) float32 CPU features}``. ``extract_features(..., n_patches=P)`` equals
    ``extract_prefix_features(..., [P])[P]``; for m < P the m patches are a prefix of the P drawn ones, so
    they differ from what ``extract_features(..., n_patches=m)`` draws (another sample of the same
    augmentation), which is why the test-patch ablation uses this function throughout. Memory: one (N, D)
    result per count (a per-patch (N, P, D) tensor would need 105 GB for CIFAR-10 at P=128, D=4096);
    other arguments and the determinism guarantees as :func:`extract_features`.
    """
    counts = sorted(set(int(m) for m in counts))
    if not counts or counts[0] < 1:
        raise EvalError(f"patch counts must be >= 1, got {counts}")
    n_patches = counts[-1]
    if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise EvalError(f"images must be (N, 3, H, W) uint8, got {tuple(images.shape)} {images.dtype}")
    if images.shape[0] == 0:
        raise EvalError("no images to extract features from")
    if kind not in ("pre", "backbone"):
        raise EvalError(f"unknown feature kind {kind!r}; use 'pre' or 'backbone'")
    device = torch.device(device)
    param = next(model.parameters(), None)
    if param is not None and param.device.type != device.type:
        raise EvalError(f"model is on {param.device} but features were asked for on {device}")

    n = images.shape[0]
    per_forward = batch_images * n_patches if batch_images > 0 else DEFAULT_PATCHES_PER_FORWARD
    group = max(1, per_forward // (n_patches * RNG_CHUNK)) * RNG_CHUNK  # images augmented together
    use_amp = amp_dtype is not None and device.type == "cuda"

    from tqdm import tqdm

    was_training = model.training
    model.eval()
    out: dict[int, torch.Tensor] = {}  # m -> (N, D) on device; one host copy at the end
    try:
        with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
            for start in range(0, n, group):
                x = images[start:start + group].to(device, non_blocking=True)  # (b, 3, H, W) uint8
                b = x.shape[0]
                patches = torch.cat([
                    make_patches(x[c:c + RNG_CHUNK], n_patches, aug,
                                 _chunk_generator(seed, (start + c) // RNG_CHUNK, device))
                    for c in range(0, b, RNG_CHUNK)
                ], dim=1).flatten(0, 1)  # (n_patches * b, 3, s, s), patch-major
                feats = []
                for i in range(0, patches.shape[0], per_forward):
                    with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=use_amp):
                        feats.append(model.features(patches[i:i + per_forward], kind).float())
                f = torch.cat(feats).view(n_patches, b, -1)  # (n_patches, b, D)
                for m in counts:
                    if m not in out:
                        out[m] = torch.empty(n, f.shape[2], dtype=torch.float32, device=device)
                    out[m][start:start + b] = f[:m].mean(0)  # (b, D)
                bar.update(b)
    finally:
        model.train(was_training)
    return {m: feats.cpu() for m, feats in out.items()}


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
    if k < 1 or not temperature > 0 or chunk < 1:
        raise EvalError(f"kNN needs k >= 1, temperature > 0 and chunk >= 1, got {k}, {temperature}, {chunk}")
    if int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes:
        raise EvalError(f"kNN labels must lie in [0, {num_classes})")
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


def stratified_split(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded class-stratified split of indices 0..N-1: (train_idx, val_idx), both sorted int64 CPU.

    Each class c with n_c members gives round(fraction * n_c) of them to validation, but keeps at least
    one for training. Raises EvalError if that leaves the validation set empty.
    """
    if not 0 < fraction < 1:
        raise EvalError(f"validation fraction must be in (0, 1), got {fraction}")
    labels = labels.cpu()
    g = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(members.numel(), generator=g)]
        n_val = min(math.floor(fraction * members.numel() + 0.5), members.numel() - 1)
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    val_idx = torch.cat(val_parts).sort().values
    if val_idx.numel() == 0:
        raise EvalError(f"validation fraction {fraction} leaves no validation example in {labels.numel()} "
                        "training features")
    return torch.cat(train_parts).sort().values, val_idx


@dataclass
class ProbeResult:
    top1: float  # test accuracy in % of the reported epoch
    epoch: int  # the reported epoch (1-based): the final one, or the one selected on validation
    val_top1: float | None  # validation accuracy in % of that epoch (None without a validation split)
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: epoch, train_loss, (val_top1)
    seconds: float = 0.0


@torch.no_grad()
def _accuracy(head: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Top-1 accuracy in % as a 0-d device tensor (no host sync)."""
    correct = torch.zeros((), device=x.device)
    for i in range(0, x.shape[0], chunk):
        correct += (head(x[i:i + chunk]).argmax(1) == y[i:i + chunk]).sum()
    return correct * (100.0 / max(x.shape[0], 1))


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, *, epochs: int = 100, lr: float = 0.03,
                 momentum: float = 0.9, weight_decay: float = 5e-5, batch_size: int = 100,
                 val_fraction: float = 0.0, seed: int = 0, device: torch.device | str = "cpu",
                 progress: bool = False) -> ProbeResult:
    """Linear probe on frozen features, the official recipe: nn.Linear(D, C), SGD(lr, momentum, wd),
    cross-entropy, batch 100, cosine learning rate annealed per step to 0 over all epochs.

    Args:
        train_feats: (N, D), train_labels: (N,); test_feats: (M, D), test_labels: (M,).
        val_fraction: 0 -> report the final epoch. > 0 -> carve a seeded class-stratified split of the
            *training* features off (see :func:`stratified_split`), train on the rest, and report the test
            accuracy of the weights of the epoch with the best validation accuracy (earliest on ties).
            The test set is used once, after training, in both cases.
        seed: seeds the head's initialisation, the split and the per-epoch shuffles (global RNG untouched).

    Everything runs on ``device`` without per-step host synchronisation; the best weights are tracked
    with ``torch.where`` rather than by reading the validation accuracy on the host.
    """
    if train_feats.dim() != 2 or test_feats.dim() != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise EvalError(f"linear probe needs (N, D) and (M, D) features, got {tuple(train_feats.shape)} and "
                        f"{tuple(test_feats.shape)}")
    if train_labels.shape != (train_feats.shape[0],) or test_labels.shape != (test_feats.shape[0],):
        raise EvalError("linear probe needs one label per feature")
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise EvalError("linear probe needs at least one training and one test feature")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise EvalError(f"linear probe needs epochs >= 1, batch size >= 1 and lr > 0, got {epochs}, "
                        f"{batch_size}, {lr}")
    if not 0 <= val_fraction < 1:
        raise EvalError(f"probe validation fraction must be in [0, 1), got {val_fraction}")
    t0 = time.perf_counter()
    device = torch.device(device)
    use_val = val_fraction > 0
    if use_val:
        tr_idx, val_idx = stratified_split(train_labels, val_fraction, seed)
        x_val = train_feats.cpu()[val_idx].to(device, torch.float32)
        y_val = train_labels.cpu()[val_idx].to(device, torch.long)
        x_tr, y_tr = train_feats.cpu()[tr_idx], train_labels.cpu()[tr_idx]
    else:
        x_tr, y_tr = train_feats, train_labels
    x_tr, y_tr = x_tr.to(device, torch.float32), y_tr.to(device, torch.long)
    n = x_tr.shape[0]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(x_tr.shape[1], num_classes)  # default init, as the official probe
    head.to(device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    schedule = [0.5 * lr * (1 + math.cos(math.pi * t / total_steps)) for t in range(total_steps)]
    shuffle = torch.Generator().manual_seed(seed + 1)  # CPU: the same order on every device

    epoch_loss = torch.zeros(epochs, device=device)
    val_acc = torch.full((epochs,), float("nan"), device=device)
    best_val = torch.full((), -1.0, device=device)
    best_epoch = torch.full((), epochs, dtype=torch.long, device=device)
    best_w, best_b = head.weight.detach().clone(), head.bias.detach().clone()

    from tqdm import tqdm

    step = 0
    for epoch in tqdm(range(epochs), desc="linear probe", unit="ep", disable=not progress, leave=False):
        head.train()
        perm = torch.randperm(n, generator=shuffle).to(device)
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            for group in opt.param_groups:
                group["lr"] = schedule[step]
            loss = F.cross_entropy(head(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            epoch_loss[epoch] += loss.detach() * idx.numel()
            step += 1
        if use_val:
            acc = _accuracy(head, x_val, y_val)
            val_acc[epoch] = acc
            with torch.no_grad():
                better = acc > best_val  # strict: the earliest epoch wins ties
                best_val = torch.where(better, acc, best_val)
                best_epoch = torch.where(better, torch.full_like(best_epoch, epoch + 1), best_epoch)
                best_w = torch.where(better, head.weight, best_w)
                best_b = torch.where(better, head.bias, best_b)

    if use_val:
        with torch.no_grad():
            head.weight.copy_(best_w)
            head.bias.copy_(best_b)
    test_top1 = _accuracy(head, test_feats.to(device, torch.float32), test_labels.to(device, torch.long))

    # The one host synchronisation of the probe.
    losses = (epoch_loss / n).tolist()
    vals = val_acc.tolist()
    history: list[dict[str, float]] = []
    for e in range(epochs):
        row: dict[str, float] = {"epoch": e + 1, "train_loss": losses[e]}
        if use_val:
            row["val_top1"] = vals[e]
        history.append(row)
    epoch = int(best_epoch) if use_val else epochs
    return ProbeResult(top1=float(test_top1), epoch=epoch, val_top1=vals[epoch - 1] if use_val else None,
                       history=history, seconds=time.perf_counter() - t0)


def check_splits(train: ImageData, test: ImageData) -> int:
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
    """The keyword arguments of :func:`extract_features` that ``cfg`` sets (kind, seed, batch, autocast)."""
    amp_dtype = torch.bfloat16 if device.type == "cuda" and cfg.precision in ("auto", "bf16") else None
    batch_images = max(1, cfg.eval_batch_size // n_patches) if cfg.eval_batch_size > 0 else 0
    return {"kind": cfg.eval_feature, "seed": cfg.eval_seed, "batch_images": batch_images, "device": device,
            "amp_dtype": amp_dtype, "progress": progress}


def score_features(train_f: torch.Tensor, train_labels: torch.Tensor, test_f: torch.Tensor,
                   test_labels: torch.Tensor, num_classes: int, cfg: Config, device: torch.device | str, *,
                   progress: bool = False) -> dict[str, Any]:
    """Weighted kNN (``cfg.knn_k``, ``cfg.knn_temperature``) and the linear probe (``cfg.probe_*``) on
    (N, D) train and (M, D) test features. Returns linear_top1, knn_top1 (in %), probe_epoch, probe_val_top1,
    knn_k (after clamping to the training set), knn_seconds, probe_seconds."""
    device = torch.device(device)
    t0 = time.perf_counter()
    k = min(cfg.knn_k, train_f.shape[0])
    pred = knn_predict(train_f.to(device), train_labels.to(device), test_f.to(device), num_classes,
                       k=k, temperature=cfg.knn_temperature)
    knn_top1 = (pred.cpu() == test_labels.cpu()).double().mean().item() * 100
    knn_seconds = time.perf_counter() - t0

    probe = linear_probe(train_f, train_labels, test_f, test_labels, num_classes, epochs=cfg.probe_epochs,
                         lr=cfg.probe_lr, momentum=cfg.probe_momentum, weight_decay=cfg.probe_weight_decay,
                         batch_size=cfg.probe_batch_size, val_fraction=cfg.probe_val_fraction,
                         seed=cfg.eval_seed, device=device, progress=progress)
    return {"linear_top1": probe.top1, "knn_top1": knn_top1, "probe_epoch": probe.epoch,
            "probe_val_top1": probe.val_top1, "knn_k": k, "knn_seconds": knn_seconds,
            "probe_seconds": probe.seconds}


def evaluate(model: EMPSSLModel, train: ImageData, test: ImageData, cfg: Config, device: torch.device | str,
             *, progress: bool = True, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """The full protocol of ``cfg``: bag-of-features for the train and test images (``cfg.test_patches``
    patches each, ``cfg.eval_feature``, seeded by ``cfg.eval_seed``), weighted kNN (``cfg.knn_k``,
    ``cfg.knn_temperature``) and the linear probe (``cfg.probe_*``).

    Returns a JSON-serialisable dict: linear_top1, knn_top1 (in %), test_patches, feature, probe_epoch,
    probe_val_top1, feature_seconds, knn_seconds, probe_seconds, n_train, n_test, num_classes, feature_dim,
    knn_k (after clamping to the training set), knn_temperature, eval_seed, probe_epochs. Logs one line.
    """
    device = torch.device(device)
    num_classes = check_splits(train, test)
    aug = augment_from_config(cfg)
    common = feature_options(cfg, device, cfg.test_patches, progress)

    t0 = time.perf_counter()
    train_f = extract_features(model, train.images, aug, cfg.test_patches, desc="train features", **common)
    test_f = extract_features(model, test.images, aug, cfg.test_patches, desc="test features", **common)
    feature_seconds = time.perf_counter() - t0  # .cpu() at the end of extraction synchronised

    scores = score_features(train_f, train.labels, test_f, test.labels, num_classes, cfg, device,
                            progress=progress)
    feature_name = "pre-feature" if cfg.eval_feature == "pre" else "backbone feature"
    selected = "" if scores["probe_val_top1"] is None else \
        f" (epoch {scores['probe_epoch']}, val {scores['probe_val_top1']:.1f}%)"
    log(f"linear {scores['linear_top1']:.1f}%{selected} | kNN {scores['knn_top1']:.1f}% "
        f"({cfg.test_patches} test patches, {feature_name})")
    return {
        **scores,  # linear_top1, knn_top1, probe_epoch, probe_val_top1, knn_k, knn_seconds, probe_seconds
        "test_patches": cfg.test_patches,
        "feature": cfg.eval_feature,
        "feature_dim": int(train_f.shape[1]),
        "probe_epochs": cfg.probe_epochs,
        "probe_val_fraction": cfg.probe_val_fraction,
        "knn_temperature": cfg.knn_temperature,
        "eval_seed": cfg.eval_seed,
        "feature_seconds": feature_seconds,
        "n_train": int(train_f.shape[0]),
        "n_test": int(test_f.shape[0]),
        "num_classes": num_classes,
    }
