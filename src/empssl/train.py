"""The EMP-SSL training loop: patches -> encoder -> loss -> LARS step, with logging, checkpoints and resume."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import __version__
from .checkpoint import build_model, load_model_state, read_checkpoint, save_atomic
from .config import Config, ConfigError
from .data import ImageData, load_data
from .losses import EMPSSLLoss, emp_ssl_loss
from .optim import LARS, cosine_lr, lars_param_groups
from .patches import Augment, make_patches


class TrainError(RuntimeError):
    """Training cannot go on (non-finite loss, incompatible run directory...): reported in one line."""


# Keys that may differ between a run directory's saved config and the command that resumes it: they change
# where things are read or how often they are written, or the evaluation, never the trained weights.
RESUMABLE_CHANGES = {"device", "data_dir", "log_every", "checkpoint_every", "test_patches", "eval_feature",
                     "eval_seed", "eval_batch_size", "probe_epochs", "probe_lr", "probe_momentum",
                     "probe_weight_decay", "probe_batch_size", "probe_val_fraction", "knn_k",
                     "knn_temperature", "compare_random_init", "extra"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} requested but CUDA is not available")
    return torch.device(name)


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


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, aug: Augment,
               cfg: Config, gen: torch.Generator, amp: torch.dtype | None, channels_last: bool) -> EMPSSLLoss:
    """One optimisation step on a (B, 3, H, W) uint8 batch; returns the detached loss terms."""
    n, b = cfg.num_patches, images.shape[0]
    patches = make_patches(images, n, aug, gen).flatten(0, 1)  # (n*B, 3, s, s), patch-major like the official
    if channels_last:
        patches = patches.contiguous(memory_format=torch.channels_last)
    with torch.autocast(images.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        z = model(patches).view(n, b, -1)  # (n_patches, B, z_dim), unit rows, float32
    out = emp_ssl_loss(z, cfg.eps, cfg.invariance_weight)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    return EMPSSLLoss(*(t.detach() for t in out))


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
    device = resolve_device(cfg.device)
    amp = autocast_dtype(cfg, device)
    channels_last = cfg.channels_last and device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    train_data, test_data = data if data is not None else load_data(cfg.data, cfg.data_dir, cfg.image_size, progress)
    if cfg.train_subset:
        train_data = train_data.subset(cfg.train_subset)
    if cfg.test_subset:
        test_data = test_data.subset(cfg.test_subset)
    steps_per_epoch = len(train_data) // cfg.batch_size  # drop_last, as the official loader
    if steps_per_epoch == 0:
        raise ConfigError(f"--batch-size {cfg.batch_size} exceeds the {len(train_data)} training images")
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    schedule_steps = max(total_steps, round((cfg.schedule_epochs or cfg.epochs) * steps_per_epoch))

    torch.manual_seed(cfg.seed)  # model initialisation
    model = build_model(cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = LARS(lars_param_groups(model), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
               eta=cfg.lars_eta)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    step = 0

    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        ckpt = read_checkpoint(ckpt_path)
        load_model_state(model, ckpt["model"], f"checkpoint {ckpt_path}")
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["rng"]["patches"].to("cpu"))
        torch.set_rng_state(ckpt["rng"]["torch"])
        step = ckpt["step"]
        log(f"resuming {out} at step {step}/{total_steps}")
    else:
        (out / "config.json").write_text(json.dumps({"version": __version__, "config": cfg.to_dict()}, indent=2))

    def save(at_step: int) -> None:
        save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": at_step,
                     "epoch": at_step / steps_per_epoch, "total_steps": total_steps,
                     "schedule_steps": schedule_steps, "finished": at_step >= total_steps,
                     "rng": {"patches": gen.get_state(), "torch": torch.get_rng_state()},
                     "config": cfg.to_dict(), "version": __version__}, ckpt_path)

    # Training images live on the device as uint8 when they fit (CIFAR-10: 150 MB); patches are cut there.
    images = train_data.images.to(device) if train_data.images.numel() < 4 * 2**30 else train_data.images
    aug = augment_for(cfg)
    log(f"training {cfg.arch} (width {cfg.width}) on {len(train_data)} images, {cfg.num_patches} patches of "
        f"{cfg.patch_size}px, batch {cfg.batch_size}, {total_steps} steps on {device}"
        f"{' (bf16)' if amp else ''}")

    model.train()
    perm, perm_epoch = None, -1
    sums = torch.zeros(3, device=device)  # running (loss, tcr, invariance) since the last log line
    last_good_step, t_last, n_since = step, time.perf_counter(), 0
    bar = tqdm(total=total_steps, initial=step, disable=not progress, file=sys.stderr, dynamic_ncols=True,
               desc="train", unit="step")
    with _StopFlag() as stop, (out / "metrics.jsonl").open("a") as metrics:
        while step < total_steps:
            epoch, pos = divmod(step, steps_per_epoch)
            if epoch != perm_epoch:  # a fixed permutation per epoch, so a resumed run sees the same batches
                shuffle = torch.Generator().manual_seed(cfg.seed * 10007 + epoch)
                perm = torch.randperm(len(train_data), generator=shuffle)
                perm_epoch = epoch
            idx = perm[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]
            batch = images[idx.to(images.device)].to(device, non_blocking=True)
            lr = cosine_lr(step, schedule_steps, cfg.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            terms = train_step(model, opt, batch, aug, cfg, gen, amp, channels_last)
            sums += torch.stack(list(terms))
            step += 1
            n_since += 1
            bar.update(1)

            at_log = step % cfg.log_every == 0 or step == total_steps
            at_ckpt = step % cfg.checkpoint_every == 0 or step % steps_per_epoch == 0 or step == total_steps
            # A host sync only at log/checkpoint steps (every step on CPU, where it is free).
            if at_log or at_ckpt or stop.requested or device.type == "cpu":
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
            if at_ckpt or stop.requested:
                save(step)
                last_good_step = step
            if stop.requested and step < total_steps:
                bar.close()
                raise KeyboardInterrupt(f"interrupted at step {step}; checkpoint saved, run the same command to resume")
    bar.close()

    summary = {"steps": total_steps, "epochs": cfg.epochs, "images": len(train_data)}
    if not evaluate_at_end:
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
            f"(+{gap:.1f} points, {cfg.test_patches} test patches)")
    write_results(out / "results.json", results)
    return results


def write_results(path: Path, results: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


def finished(out_dir: str | Path) -> bool:
    p = Path(out_dir) / "checkpoint.pt"
    return p.exists() and bool(read_checkpoint(p).get("finished", False))

