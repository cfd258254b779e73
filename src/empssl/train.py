"""The EMP-SSL training loop: patches -> encoder -> loss -> LARS step, with logging, checkpoints and resume."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import __version__, distributed
from .batches import StepBatches
from .checkpoint import build_model, load_model_state, read_checkpoint, save_atomic
from .config import Config, ConfigError
from .data import ImageData, load_data
from .losses import EMPSSLLoss
from .memory import checkpoint_backbone, want_checkpointing
from .monitor import Monitor, device_name
from .optim import LARS, cosine_lr, lars_param_groups
from .patches import Augment


class TrainError(RuntimeError):
    """Training cannot go on (non-finite loss, incompatible run directory...): reported in one line."""


# Keys that may differ between a run directory's saved config and the command that resumes it: they change
# where things are read or how often they are written, or the evaluation, never the trained weights.
RESUMABLE_CHANGES = {"device", "data_dir", "log_every", "checkpoint_every", "test_patches", "eval_feature",
                     "eval_seed", "eval_batch_size", "probe_epochs", "probe_lr", "probe_momentum",
                     "probe_weight_decay", "probe_batch_size", "probe_val_fraction", "knn_k",
                     "knn_temperature", "compare_random_init", "extra",
                     "eval_every", "monitor_patches", "monitor_bank", "monitor_test",  # monitoring
                     "grad_checkpointing", "compile"}  # speed: exact or numerically equivalent


def resolve_device(name: str) -> torch.device:
    """The device of a single process (under torchrun, train() takes cuda:LOCAL_RANK instead)."""
    return distributed.resolve_device(name)


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (official recipe trains fp32; bf16 is our speed default), fp32 on CPU."""
    if cfg.precision == "fp32" or (cfg.precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def augment_for(cfg: Config) -> Augment:
    return Augment(size=cfg.patch_size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio))


def run_config(out_dir: Path, cfg: Config, explicit: dict[str, Any]) -> Config:
    """The config to use for ``out_dir``: ``cfg`` for a new run; for an existing run its saved config with the
    explicitly given flags applied, refusing flags that would change the weights being resumed."""
    saved_path = Path(out_dir) / "config.json"
    if not saved_path.is_file():
        return cfg
    saved = Config.from_dict(json.loads(saved_path.read_text())["config"])
    changed = [k for k, v in explicit.items() if k not in RESUMABLE_CHANGES and getattr(saved, k) != v]
    if changed:
        k = changed[0]
        raise ConfigError(f"{out_dir} holds a run with {k}={getattr(saved, k)!r}, not {explicit[k]!r}; "
                          f"drop the flag to resume it or choose a new --out")
    return saved.replace(**{k: v for k, v in explicit.items() if k in RESUMABLE_CHANGES}).validate()


def config_data(cfg: Config, progress: bool = True,
                data: tuple[ImageData, ImageData] | None = None) -> tuple[ImageData, ImageData]:
    """(train, test) of ``cfg.data`` (or ``data`` as given), cut to ``cfg.train_subset`` / ``cfg.test_subset``."""
    train_data, test_data = data if data is not None else load_data(cfg.data, cfg.data_dir, cfg.image_size, progress)
    if cfg.train_subset:
        train_data = train_data.subset(cfg.train_subset)
    if cfg.test_subset:
        test_data = test_data.subset(cfg.test_subset)
    return train_data, test_data


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, aug: Augment,
               cfg: Config, gen: torch.Generator, amp: torch.dtype | None, channels_last: bool,
               dist: distributed.Dist = distributed.SINGLE) -> EMPSSLLoss:
    """One optimisation step on a (B, 3, H, W) uint8 batch; returns the detached loss terms.

    Under torchrun ``images`` is this rank's (b, 3, H, W) slice and ``model`` the DDP-wrapped one; the
    patches and (with ``cfg.tcr_global``) the coding rate are those of the global batch (see distributed).
    """
    n, b = cfg.num_patches, images.shape[0]
    # (n*B, 3, s, s), patch-major like the official
    patches = distributed.rank_patches(images, n, aug, gen, dist).flatten(0, 1)
    if channels_last:
        patches = patches.contiguous(memory_format=torch.channels_last)
    with torch.autocast(images.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        z = model(patches).view(n, b, -1)  # (n_patches, B, z_dim), unit rows, float32
    out = distributed.rank_loss(z, cfg.eps, cfg.invariance_weight, dist, cfg.tcr_global)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    return EMPSSLLoss(*(t.detach() for t in out))


def _silent(message: str) -> None:
    """The log of ranks other than 0."""


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the current step and save, instead of dying mid-update."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: Config, out_dir: str | Path, *, progress: bool = True, log: Callable[[str], None] = print,
          data: tuple[ImageData, ImageData] | None = None, evaluate_at_end: bool = True) -> dict[str, Any]:
    """Train (or resume) an EMP-SSL run in ``out_dir`` and, unless ``evaluate_at_end`` is False, evaluate it.

    ``out_dir`` receives config.json, metrics.jsonl, checkpoint.pt and results.json. ``data`` may pass
    (train, test) directly (used by tests and notebooks); otherwise ``cfg.data`` is loaded.
    Returns the results dict (or a summary when evaluation is skipped).
    """
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # scale-out: under torchrun, join the process group; only rank 0 writes files, logs and shows progress
    dist, device, own_group = distributed.setup(cfg.device)
    if not dist.is_main:
        progress, log = False, _silent
    amp = autocast_dtype(cfg, device)
    channels_last = cfg.channels_last and device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    with distributed.main_process_first(dist):  # rank 0 downloads / fills the decoded-image cache first
        train_data, test_data = config_data(cfg, progress, data)
    steps_per_epoch = len(train_data) // cfg.batch_size  # drop_last, as the official loader
    if steps_per_epoch == 0:
        raise ConfigError(f"--batch-size {cfg.batch_size} exceeds the {len(train_data)} training images")
    if cfg.batch_size % dist.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the "
                          f"{dist.world_size} processes")
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    schedule_steps = max(total_steps, round((cfg.schedule_epochs or cfg.epochs) * steps_per_epoch))

    torch.manual_seed(cfg.seed)  # model initialisation
    model = build_model(cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist.enabled and cfg.sync_bn:  # before the optimiser: the converted layers have new parameters
        model = distributed.convert_sync_batchnorm(model, device)
    opt = LARS(lars_param_groups(model), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
               eta=cfg.lars_eta)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    step = 0
    clock_state: dict[str, float] | None = None  # monitoring: wall time of the sessions before a resume

    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        ckpt = read_checkpoint(ckpt_path)  # every rank loads it
        if ckpt.get("world_size", 1) != dist.world_size and not (cfg.tcr_global and cfg.sync_bn):
            raise TrainError(f"{out} was trained by {ckpt.get('world_size', 1)} processes; resume it with as many "
                             f"(only --tcr-global and --sync-bn make the run independent of that number)")
        load_model_state(model, ckpt["model"], f"checkpoint {ckpt_path}")
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["rng"]["patches"].to("cpu"))
        torch.set_rng_state(ckpt["rng"]["torch"])
        step = ckpt["step"]
        clock_state = ckpt.get("clock")
        log(f"resuming {out} at step {step}/{total_steps}")
    elif dist.is_main:
        (out / "config.json").write_text(json.dumps({"version": __version__, "config": cfg.to_dict()}, indent=2))

    def save(at_step: int) -> None:
        if not dist.is_main:
            return
        save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": at_step,
                     "epoch": at_step / steps_per_epoch, "total_steps": total_steps,
                     "schedule_steps": schedule_steps, "finished": at_step >= total_steps,
                     "rng": {"patches": gen.get_state(), "torch": torch.get_rng_state()},
                     "clock": monitor.clock(),
                     "config": cfg.to_dict(), "version": __version__, "world_size": dist.world_size}, ckpt_path)

    # Training images live on the device as uint8 when they fit (CIFAR-10: 150 MB); patches are cut there.
    images = train_data.images.to(device) if train_data.images.numel() < 4 * 2**30 else train_data.images
    aug = augment_for(cfg)
    # speed: exact activation checkpointing when a step would not fit (the same choice on every rank)
    local_patches = cfg.num_patches * cfg.batch_size // dist.world_size
    use_ckpt, why = want_checkpointing(cfg.grad_checkpointing, model, local_patches, cfg.patch_size, device, amp,
                                       channels_last)
    if distributed.any_rank(use_ckpt, dist, device):
        log(f"activation checkpointing of {checkpoint_backbone(model)} residual blocks ({why})")
    # the DDP / compiled wrapper used for training; checkpoints and evaluation use `model` itself
    net = distributed.training_module(model, device, dist, compile=cfg.compile)
    batches = StepBatches(images, batch_size=cfg.batch_size, seed=cfg.seed, start_step=step, total_steps=total_steps,
                          device=device, rank=dist.rank, world=dist.world_size)
    log(f"training {cfg.arch} (width {cfg.width}) on {len(train_data)} images, {cfg.num_patches} patches of "
        f"{cfg.patch_size}px, batch {cfg.batch_size}, {total_steps} steps on {device}"
        f"{' (bf16)' if amp else ''}")

    # monitoring: the wall-time clock and, with --eval-every, the kNN probe (monitor.jsonl)
    monitor = Monitor(cfg, train_data, test_data, device, out, steps_per_epoch=steps_per_epoch,
                      total_steps=total_steps, patches_per_step=cfg.batch_size * cfg.num_patches,
                      start_step=step, clock_state=clock_state, enabled=dist.is_main)
    model.train()
    monitor.start(model)
    sums = torch.zeros(3, device=device)  # running (loss, tcr, invariance) since the last log line
    last_good_step, t_last, n_since = step, time.perf_counter(), 0
    bar = tqdm(total=total_steps, initial=step, disable=not progress, file=sys.stderr, dynamic_ncols=True,
               desc="train", unit="step")
    metrics_path = out / "metrics.jsonl" if dist.is_main else Path(os.devnull)
    with _StopFlag() as stop, metrics_path.open("a") as metrics, batches:
        stream = iter(batches)  # a fixed permutation per epoch, so a resumed run sees the same batches
        while step < total_steps:
            batch = next(stream)
            lr = cosine_lr(step, schedule_steps, cfg.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            terms = train_step(net, opt, batch, aug, cfg, gen, amp, channels_last, dist)
            sums += torch.stack(list(terms))
            step += 1
            n_since += 1
            bar.update(1)

            at_log = step % cfg.log_every == 0 or step == total_steps
            at_ckpt = step % cfg.checkpoint_every == 0 or step % steps_per_epoch == 0 or step == total_steps
            # A host sync only at log/checkpoint steps (every step on CPU, where it is free). Under torchrun
            # the ranks meet there at the same steps: losses are averaged and a stop request reaches all.
            stopping = False
            if at_log or at_ckpt or device.type == "cpu" or (stop.requested and not dist.enabled):
                stopping = distributed.agree(sums, stop.requested, dist)
                if not torch.isfinite(sums).all():
                    bar.close()
                    raise TrainError(f"loss became non-finite by step {step}; training stopped, the last good "
                                     f"checkpoint (step {last_good_step}) is kept in {ckpt_path}; try a lower --lr")
            if at_log:
                loss, tcr, inv = (sums / n_since).tolist()
                dt = time.perf_counter() - t_last
                rec = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss, "tcr": tcr,
                       "invariance": inv, "lr": lr,
                       "patches_per_s": n_since * cfg.batch_size * cfg.num_patches / max(dt, 1e-9)}
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{loss:.2f}", tcr=f"{tcr:.1f}", inv=f"{inv:.3f}",
                                pps=f"{rec['patches_per_s']:.0f}")
                sums.zero_()
                t_last, n_since = time.perf_counter(), 0
            t_last += monitor.after_step(model, step)  # monitoring time stays out of patches_per_s
            if at_ckpt or stopping:
                save(step)
                last_good_step = step
            if stopping and step < total_steps:
                bar.close()
                raise KeyboardInterrupt(f"interrupted at step {step}; checkpoint saved, run the same command to resume")
    bar.close()
    distributed.teardown(own_group)  # evaluation below runs on rank 0 alone

    summary = {"steps": total_steps, "epochs": cfg.epochs, "images": len(train_data),
               **monitor.clock(), "device": device_name(device)}  # monitoring: wall time and hardware
    if not evaluate_at_end or not dist.is_main:
        return summary
    from .evaluate import evaluate

    results = {**summary, **evaluate(model, train_data, test_data, cfg, device, progress=progress, log=log)}
    if cfg.compare_random_init:
        torch.manual_seed(cfg.seed)  # the same initialisation the run started from
        baseline = build_model(cfg).to(device)
        log("evaluating the randomly initialised encoder with the same protocol")
        base = evaluate(baseline, train_data, test_data, cfg, device, progress=progress, log=log)
        results["random_init"] = {k: base[k] for k in ("linear_top1", "knn_top1")}
        gap = results["linear_top1"] - base["linear_top1"]
        log(f"linear probe: trained {results['linear_top1']:.1f}% vs random init {base['linear_top1']:.1f}% "
            f"({gap:+.1f} points, {cfg.test_patches} test patches)")
    write_results(out / "results.json", results)
    return results


def write_results(path: Path, results: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


def finished(out_dir: str | Path) -> bool:
    p = Path(out_dir) / "checkpoint.pt"
    return p.exists() and bool(read_checkpoint(p).get("finished", False))

