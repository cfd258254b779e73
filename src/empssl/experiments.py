"""The paper's experiments as functions: a checkpoint evaluated on its own or on other data (transfer), the
patch-count ablation, the test-patch ablation and the t-SNE map. Each writes JSON, Markdown and PNG into a folder
and is resumable or cheap to re-run; all are loops over :func:`empssl.train.train` and :mod:`empssl.evaluate`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, ConfigError, flag
from .data import load_data
from .devices import resolve_device, synchronize
from .evaluate import (
    Split,
    check_splits,
    describe_split,
    extract_prefix_features,
    feature_options,
    image_features,
    score_features,
    split_images,
    view_label,
)
from .files import check_writable_dir, check_writable_file, write_json, write_text
from .methods import create_method, eval_protocol
from .report import (
    ReportError,
    patch_ablation_table,
    plot_patch_ablation,
    plot_test_patch_ablation,
    plot_tsne,
    test_patch_ablation_table,
)
from .rundir import load_checkpoint, run_config, run_dir_of
from .stream import eval_splits
from .train import config_data, train_once


def load_for_eval(checkpoint: str | Path, overrides: dict[str, Any], *, progress: bool = False,
                  log: Callable[[str], Any] = print
                  ) -> tuple[nn.Module, Config, dict[str, Any], Split, Split, torch.device]:
    """(model on its device, config, raw checkpoint dict, train, test, device) to evaluate ``checkpoint``, the data
    read by ``--data-mode`` as training reads them (:func:`empssl.stream.eval_splits`).

    ``overrides`` are evaluation flags (``cli.EVAL_FIELDS``). Transfer: when ``overrides["data"]`` names another
    dataset than the run's, its ``train_subset`` / ``test_subset`` (sizes chosen for *its* data) are reset to all
    images unless given again, so a run trained on a 200-image CIFAR subset is not silently evaluated on 2 images
    per class of a 100-class set; its ``--data-mode`` is reset to auto (a run streamed from shards may be evaluated
    on CIFAR-10).
    """
    model, cfg, ckpt = load_checkpoint(checkpoint, overrides)
    saved = ckpt.get("config", {})  # the config the run was trained with (config.json is only its readable copy)
    if overrides.get("data") and overrides["data"] != saved.get("data"):
        reset = [k for k in ("train_subset", "test_subset") if k not in overrides and saved.get(k)]
        if reset:
            log(f"evaluating on {overrides['data']} (trained on {saved.get('data')}): "
                f"{' and '.join(map(flag, reset))} reset to all images")
        cfg = cfg.replace(data_mode=overrides.get("data_mode", "auto"), **dict.fromkeys(reset, 0))
    device = resolve_device(cfg.device)
    train, test = eval_splits(cfg, progress, lambda: config_data(cfg, progress), log)
    return model.to(device), cfg, ckpt, train, test, device


def ablate_patches(cfg: Config, out_dir: str | Path, patch_counts: Sequence[int], *,
                   explicit: dict[str, Any] | None = None, progress: bool = True,
                   log: Callable[[str], Any] = print) -> list[dict[str, Any]]:
    """Train and evaluate the recipe ``cfg`` once per number of training patches n, in ``out_dir/n{n}/``;
    ``ablation.json``, ``.md`` and ``.png`` are rewritten after every run. Returns the rows (:func:`ablation_row`).

    Resumable: a finished run is read back, an interrupted one resumed. ``explicit`` holds the flags the user gave,
    so a rerun with changed weight-affecting flags is refused (as ``empssl train`` does)."""
    counts = sorted(set(patch_counts))
    if not counts or counts[0] < 2:
        raise ConfigError(f"--patches must list numbers >= 2 (the invariance term compares patches), got {counts}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg.data, cfg.data_dir, cfg.image_size, progress)
    rows = []
    for n in counts:
        run = out / f"n{n}"
        run_cfg = run_config(run, cfg.replace(num_patches=n).validate(), {**(explicit or {}), "num_patches": n})
        results = train_once(run_cfg, run, name=f"n={n}", progress=progress, log=log, data=data)
        rows.append(ablation_row(n, run.name, results, run_cfg))
        write_patch_ablation(out, rows, cfg)
    return rows


def ablation_row(n: int, run: str, results: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """One row of the patch-count table from a run's results.json."""
    train_s = results.get("train_seconds")
    eval_s = sum(results.get(k, 0.0) for k in ("feature_seconds", "knn_seconds", "probe_seconds"))
    steps = results.get("steps")
    pps = steps * cfg.batch_size * n / train_s if train_s and steps else None
    return {"n": n, "linear_top1": results.get("linear_top1"), "knn_top1": results.get("knn_top1"),
            "test_patches": results.get("test_patches"), "train_seconds": train_s, "eval_seconds": eval_s,
            "steps": steps, "train_patches_per_s": pps, "device": results.get("device"), "run": run}


def write_patch_ablation(out: Path, rows: list[dict[str, Any]], cfg: Config) -> None:
    meta = {k: getattr(cfg, k) for k in ("data", "epochs", "batch_size", "arch", "width", "method", "test_patches",
                                         "eval_view", "eval_feature")}
    write_json(out / "ablation.json", {"experiment": "patch-count ablation", "config": meta, "rows": rows})
    device = next((r["device"] for r in rows if r.get("device")), None)
    lines = [f"# Patch-count ablation: {cfg.data}, {cfg.epochs:g} epoch(s), batch {cfg.batch_size}, "
             f"{cfg.arch} width {cfg.width}", "", *patch_ablation_table(rows),
             "Train time: training loop wall time, monitoring excluded; eval time: feature extraction + kNN "
             "+ linear probe." + (f" Device: {device}." if device else ""), ""]
    write_text(out / "ablation.md", "\n".join(lines))
    plot_patch_ablation(rows, out / "ablation.png")


def ablate_test_patches(checkpoint: str | Path, counts: Sequence[int] | None = None,
                        overrides: dict[str, Any] | None = None, *,
                        out_dir: str | Path | None = None, progress: bool = True,
                        log: Callable[[str], Any] = print) -> Path:
    """Evaluate one checkpoint with bags of m test patches for every m in ``counts``, from one feature pass: the
    bag of m averages the first m of ``max(counts)`` patches (:func:`empssl.evaluate.extract_prefix_features`).
    Writes test_patch_ablation.json, .md and .png in ``out_dir`` (default: the run directory); returns the .md's
    path."""
    out = Path(out_dir) if out_dir else run_dir_of(checkpoint)
    check_writable_dir(out)  # before the features, not after them
    model, cfg, ckpt, train, test, device = load_for_eval(checkpoint, overrides or {}, progress=progress, log=log)
    # by default 1, 4, 16, 64 ... below the run's own bag size, and that size
    counts = sorted(set(counts or [4**i for i in range(16) if 4**i < cfg.test_patches] + [cfg.test_patches]))
    if eval_protocol(cfg)[0] != "patches":
        raise ConfigError(f"the test-patch ablation averages patches, but {cfg.method} is evaluated on the whole "
                          f"image; add --eval-view patches")
    num_classes = check_splits(train, test)
    aug = create_method(cfg).eval_augment()
    opts = feature_options(cfg, device, counts[-1], progress)
    t0 = time.perf_counter()
    train_f = extract_prefix_features(model, split_images(train), aug, counts, desc="train features", **opts)
    test_f = extract_prefix_features(model, split_images(test), aug, counts, desc="test features", **opts)
    synchronize(device)
    feature_seconds = time.perf_counter() - t0
    rows = []
    for m in counts:
        scores = score_features(train_f[m], train.labels, test_f[m], test.labels, num_classes, cfg, device,
                                progress=progress)
        log(f"{m} test patches: linear {scores['linear_top1']:.1f}% | kNN {scores['knn_top1']:.1f}%")
        rows.append({"test_patches": m, **scores})
    result = {"experiment": "test-patch ablation", "checkpoint": str(checkpoint), "step": ckpt.get("step"),
              "data": cfg.data, "feature": opts["kind"], "eval_seed": cfg.eval_seed,
              "n_train": len(train), "n_test": len(test), "feature_seconds": feature_seconds,
              "eval_sets": {"train": describe_split(train, cfg.train_subset),
                            "test": describe_split(test, cfg.test_subset)},
              "max_patches": counts[-1], "rows": rows}
    write_json(out / "test_patch_ablation.json", result)
    lines = [f"# Test-patch ablation: {checkpoint} (step {ckpt.get('step')}) on {cfg.data}", "",
             *test_patch_ablation_table(rows),
             f"Features of {counts[-1]} patches per image extracted once ({feature_seconds:.1f} s for "
             f"{len(train)} train + {len(test)} test images); the bag of m patches averages the first m.", ""]
    write_text(out / "test_patch_ablation.md", "\n".join(lines))
    plot_test_patch_ablation(rows, out / "test_patch_ablation.png")
    return out / "test_patch_ablation.md"


def tsne_map(checkpoint: str | Path, overrides: dict[str, Any] | None = None, *, max_points: int = 5000,
             out: str | Path | None = None, seed: int = 0, progress: bool = True,
             log: Callable[[str], Any] = print) -> Path:
    """2-D t-SNE (scikit-learn) of the evaluation features of up to ``max_points`` test images (class-balanced),
    coloured by class: a PNG (``out``: a .png file or a folder; by default ``RUN/tsne.png``) with a ``.json`` of its
    settings beside it. Returns the PNG path."""
    if max_points < 2:
        raise ConfigError(f"--max-points must be >= 2, got {max_points}")
    path = run_dir_of(checkpoint) if out is None else Path(out)
    if out is None or path.is_dir() or str(out).endswith(("/", os.sep)):
        path = path / "tsne.png"
    elif path.suffix.lower() != ".png":
        raise ConfigError(f"--out must be a .png file or a folder, got {out}")
    check_writable_file(path)  # before the features and the t-SNE, not after them
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise ReportError("t-SNE needs scikit-learn: pip install 'empssl[report]'") from None
    model, cfg, ckpt, _, test, device = load_for_eval(checkpoint, overrides or {}, progress=progress, log=log)
    test = test.subset(max_points)
    feats = image_features(model, split_images(test), cfg, device, progress=progress, desc="test features").cpu()
    view, kind = eval_protocol(cfg)
    test_patches = cfg.test_patches if view == "patches" else None
    how = view_label(view, cfg.test_patches)
    n = feats.shape[0]
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))  # sklearn requires perplexity < n
    t0 = time.perf_counter()
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        torch.nn.functional.normalize(feats, dim=1).numpy())
    log(f"t-SNE of {n} test images ({how}) in {time.perf_counter() - t0:.1f} s")
    title = f"t-SNE of {cfg.data} test features ({cfg.method}, step {ckpt.get('step')}, {how})"
    plot_tsne(xy, test.labels.numpy(), list(test.classes), path, title=title)
    write_json(path.with_suffix(".json"), {"checkpoint": str(checkpoint), "step": ckpt.get("step"),
                                            "data": cfg.data, "test_patches": test_patches, "n_points": n,
                                            "perplexity": perplexity, "seed": seed, "eval_view": view, "feature": kind})
    return path
