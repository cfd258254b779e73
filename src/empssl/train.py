"""The training loop, the same for every method: views -> method loss -> LARS step, with logging, checkpoints,
resume and a wall-clock account of the whole run.

``train()`` reads top to bottom: set up (data, run directory, model, optimiser, resume), the loop (one
:func:`train_step` per batch; logging and checkpoints at their steps), then the evaluation. The method
(:mod:`empssl.methods`) supplies the model, the views and the loss; the loop knows nothing else about it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import __version__, distributed
from .batches import StepBatches
from .checkpoint import load_model_state, read_checkpoint, save_atomic
from .config import Config, ConfigError
from .data import ImageData
from .devices import autocast_dtype, device_name, resolve_device, synchronize
from .distributed import SINGLE, Dist
from .memory import checkpoint_backbone, want_checkpointing
from .methods import Method, create_method
from .monitor import Monitor
from .optim import LARS, lars_param_groups, lr_at
from .rundir import config_data, finished, write_config, write_json
from .tracking import NO_TRACKING, Tracking, open_tracking, require_trackers


class TrainError(RuntimeError):
    """Training cannot go on (non-finite loss, incompatible run directory...): reported in one line."""


# --compile auto: after this many eager steps (cudnn autotuning done) the step time is measured and the model
# compiled only if the rest of the run saves more than compiling costs. The two estimates come from one H200
# (torch 2.11, 20 patches x 100 images): eager 59,636 vs compiled 77,069 patches/s, i.e. 23% of the step time;
# the compile time is an assumption until bench/gpu_check.py has measured it.
COMPILE_PROBE_STEPS = 25
COMPILE_GAIN = 0.2  # fraction of an eager step's time that compiling saves
COMPILE_SECONDS = 60.0  # what compiling the training step costs, once


def want_compile(mode: str, device: torch.device, remaining_steps: int, step_seconds: float | None
                 ) -> tuple[bool, str]:
    """Decide ``--compile`` (auto | on | off). Returns (compile now, a one-line reason for the log and results).

    ``auto`` compiles only on CUDA, and only when ``remaining_steps * step_seconds * COMPILE_GAIN`` exceeds
    ``COMPILE_SECONDS``: a one-epoch CIFAR run (500 steps of ~34 ms) saves ~3 s and stays eager.
    """
    if mode in ("on", "off"):
        return mode == "on", f"--compile {mode}"
    if device.type != "cuda":
        return False, "auto: eager on the CPU"
    if step_seconds is None:
        return False, "auto: eager while the step time is measured"
    saving = remaining_steps * step_seconds * COMPILE_GAIN
    use = saving > COMPILE_SECONDS
    return use, (f"auto: {remaining_steps} steps of {1000 * step_seconds:.1f} ms would save ~{saving:.0f} s "
                 f"against ~{COMPILE_SECONDS:.0f} s of compiling -> {'compile' if use else 'eager'}")


def process_seconds() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere: since empssl was imported)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


def train_step(net: nn.Module, opt: LARS, method: Method, images: torch.Tensor, generator: torch.Generator,
               amp: torch.dtype | None, memory_format: torch.memory_format,
               dist: Dist = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a (b, 3, H, W) uint8 batch (this rank's slice of the step's images).

    Returns (the method's detached (T,) loss terms, a 0-d bool tensor: was the update applied). A non-finite
    loss or gradient skips the update on the device (parameters and momentum unchanged) without a host sync.
    """
    views = method.views(images, generator, dist, memory_format)  # (V, b, 3, s, s)
    terms = method.loss(net, views, amp, dist)  # (T,) float32, the minimised loss first
    opt.zero_grad(set_to_none=True)
    terms[0].backward()
    applied = opt.step(finite=torch.isfinite(terms[0]))
    return terms.detach(), applied


@dataclass
class Run:
    """Everything a training session works with, built by :func:`setup`."""

    cfg: Config
    out: Path
    dist: Dist
    device: torch.device
    own_group: bool  # this session created the process group (torchrun) and tears it down
    train_data: ImageData
    test_data: ImageData
    method: Method
    model: nn.Module  # what checkpoints hold and evaluation uses
    opt: LARS
    generator: torch.Generator  # the views' random parameters
    steps_per_epoch: int
    total_steps: int
    schedule_steps: int
    warmup_steps: int
    amp: torch.dtype | None
    memory_format: torch.memory_format
    step: int = 0
    clock_state: dict[str, float] | None = None  # the monitor clock of the sessions before a resume
    timing: dict[str, float] = field(default_factory=dict)  # seconds per phase of this session
    compile_reason: str = ""
    tracker: Tracking = NO_TRACKING  # --log: TensorBoard / W&B / MLflow, beside the JSONL files

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def views_per_step(self) -> int:
        """Views made per step over all processes (EMP-SSL: patches)."""
        return self.method.views_per_image * self.cfg.batch_size

    def lr(self, step: int) -> float:
        cfg = self.cfg
        return lr_at(step, self.schedule_steps, cfg.lr, warmup_steps=self.warmup_steps,
                     warmup_start_lr=cfg.warmup_start_lr, min_lr=cfg.min_lr)


# --- set-up -------------------------------------------------------------------------------------------------


def _load_data(cfg: Config, data: tuple[ImageData, ImageData] | None, dist: Dist, progress: bool
               ) -> tuple[ImageData, ImageData, int]:
    """(train, test, steps per epoch); a batch that the data cannot fill is a user error."""
    if dist.enabled:
        with distributed.main_process_first(dist):  # rank 0 downloads / fills the decoded-image cache first
            train_data, test_data = config_data(cfg, progress, data)
    else:
        train_data, test_data = config_data(cfg, progress, data)
    steps_per_epoch = len(train_data) // cfg.batch_size  # drop_last, as the official loader
    if steps_per_epoch == 0:
        raise ConfigError(f"--batch-size {cfg.batch_size} exceeds the {len(train_data)} training images")
    if cfg.batch_size % dist.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the "
                          f"{dist.world_size} processes")
    return train_data, test_data, steps_per_epoch


def setup(cfg: Config, out: Path, data: tuple[ImageData, ImageData] | None, progress: bool,
          log: Callable[[str], None]) -> Run:
    """Data, run directory, model, optimiser and generator; resumed from ``out/checkpoint.pt`` if there is one.

    The run directory is created only once the data has loaded and the batch fits it, so a failed start leaves
    nothing behind; an existing directory is never removed.
    """
    t0 = time.perf_counter()
    dist = distributed.env_dist()
    if dist.enabled:  # torchrun: join the process group; each rank takes cuda:LOCAL_RANK
        dist, device, own_group = distributed.setup(cfg.device)
    else:
        device, own_group = resolve_device(cfg.device), False
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_data, test_data, steps_per_epoch = _load_data(cfg, data, dist, progress)
    timing = {"data": time.perf_counter() - t0}
    if dist.is_main and not (out / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_config(out, cfg)

    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    schedule_steps = max(total_steps, round((cfg.schedule_epochs or cfg.epochs) * steps_per_epoch))
    method = create_method(cfg)
    torch.manual_seed(cfg.seed)  # model initialisation
    memory_format = torch.channels_last if cfg.channels_last and device.type == "cuda" else torch.contiguous_format
    model = method.build_model().to(device, memory_format=memory_format)
    if dist.enabled and cfg.sync_bn:  # before the optimiser: the converted layers have new parameters
        model = distributed.convert_sync_batchnorm(model, device)
    opt = LARS(lars_param_groups(model), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
               eta=cfg.lars_eta, nesterov=cfg.nesterov)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed)
    run = Run(cfg=cfg, out=out, dist=dist, device=device, own_group=own_group, train_data=train_data,
              test_data=test_data, method=method, model=model, opt=opt, generator=generator,
              steps_per_epoch=steps_per_epoch, total_steps=total_steps, schedule_steps=schedule_steps,
              warmup_steps=round(cfg.warmup_epochs * steps_per_epoch), amp=autocast_dtype(cfg.precision, device),
              memory_format=memory_format, timing=timing)
    if run.ckpt_path.exists():
        resume(run, log)
    return run


def resume(run: Run, log: Callable[[str], None]) -> None:
    """Load the checkpoint of ``run.out`` into the run: weights, optimiser, step, RNG states, clock."""
    ckpt = read_checkpoint(run.ckpt_path)  # every rank loads it
    cfg, dist = run.cfg, run.dist
    if ckpt.get("world_size", 1) != dist.world_size and not (cfg.tcr_global and cfg.sync_bn):
        raise TrainError(f"{run.out} was trained by {ckpt.get('world_size', 1)} processes; resume it with as many "
                         f"(only --tcr-global and --sync-bn make the run independent of that number)")
    load_model_state(run.model, ckpt["model"], f"checkpoint {run.ckpt_path}")
    run.opt.load_state_dict(ckpt["optimizer"])
    run.step, run.clock_state = int(ckpt["step"]), ckpt.get("clock")
    torch.set_rng_state(ckpt["rng"]["torch"])
    saved_on = ckpt["rng"].get("device")
    try:
        if saved_on not in (None, run.device.type):
            raise RuntimeError(f"generator state of {saved_on}")
        run.generator.set_state(ckpt["rng"]["patches"].to("cpu"))
    except RuntimeError:  # CUDA and CPU generators keep states of different sizes
        state = np.random.SeedSequence([cfg.seed, run.step]).generate_state(1, dtype=np.uint64)[0]
        run.generator.manual_seed(int(state))
        log(f"{run.ckpt_path} was written on {saved_on or 'another device'} and resumes on {run.device.type}: "
            f"the views' generator is reseeded from (seed, step), so the continuation is not bitwise what the "
            f"first device would have computed")
    if run.step < run.total_steps:
        log(f"resuming {run.out} at step {run.step}/{run.total_steps}")


def save(run: Run, step: int, clock: dict[str, float]) -> None:
    """An atomic checkpoint of the run at ``step`` (rank 0 only)."""
    if not run.dist.is_main:
        return
    save_atomic({"model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "step": step,
                 "epoch": step / run.steps_per_epoch, "total_steps": run.total_steps,
                 "schedule_steps": run.schedule_steps, "finished": step >= run.total_steps,
                 "rng": {"patches": run.generator.get_state(), "torch": torch.get_rng_state(),
                         "device": run.device.type},
                 "clock": clock, "config": run.cfg.to_dict(), "version": __version__,
                 "world_size": run.dist.world_size}, run.ckpt_path)


# --- the loop -----------------------------------------------------------------------------------------------


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


def _training_module(run: Run, compile: bool) -> nn.Module:
    """What the step calls: the model itself, or wrapped in DDP (several processes) and/or torch.compile."""
    if not (run.dist.enabled or compile):
        return run.model
    return distributed.training_module(run.model, run.device, run.dist, compile=compile)


class _Compiler:
    """``--compile``: the module the step calls (``net``), compiled from the start (``on``), never (``off``), or
    (``auto``, CUDA) after ``COMPILE_PROBE_STEPS`` eager steps were timed and :func:`want_compile` found the rest of
    the run long enough. Records the decision in ``run.compile_reason`` and the compile time in ``run.timing``."""

    def __init__(self, run: Run, log: Callable[[str], None]) -> None:
        self.run, self.log = run, log
        compiled, run.compile_reason = want_compile(run.cfg.compile, run.device, run.total_steps - run.step, None)
        self.net = _training_module(run, compiled)
        self.compile_from = run.step if compiled else None  # the step whose wall time includes compiling
        self.decide_at = -1
        if run.cfg.compile == "auto" and run.device.type == "cuda":
            self.decide_at = run.step + COMPILE_PROBE_STEPS
            if self.decide_at > run.total_steps:
                self.decide_at = -1
                run.compile_reason = f"auto: {run.total_steps - run.step} steps, too few to win back compiling"
        self.t_compile = self.t_probe = 0.0

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (e.g. monitoring) out of the step-time measurement."""
        self.t_probe += seconds

    def before(self, step: int) -> None:
        if step == self.compile_from:
            synchronize(self.run.device)
            self.t_compile = time.perf_counter()

    def after(self, step: int) -> None:
        """After ``step`` steps are done: account the compile time, or time the eager steps and decide."""
        run = self.run
        if self.compile_from is not None and step == self.compile_from + 1:
            synchronize(run.device)
            run.timing["compile"] = run.timing.get("compile", 0.0) + time.perf_counter() - self.t_compile
        if step == self.decide_at - COMPILE_PROBE_STEPS + 5:  # cudnn has autotuned: start timing
            synchronize(run.device)
            self.t_probe = time.perf_counter()
        if step == self.decide_at:
            synchronize(run.device)
            step_s = (time.perf_counter() - self.t_probe) / (COMPILE_PROBE_STEPS - 5)
            compiled, run.compile_reason = want_compile("auto", run.device, run.total_steps - step, step_s)
            if compiled:
                self.net, self.compile_from = _training_module(run, True), step
            self.log(f"--compile {run.compile_reason}")


class _Metrics:
    """The running loss terms (summed on the device) and a metrics.jsonl line every ``--log-every`` steps."""

    def __init__(self, run: Run, file: Any, bar: tqdm) -> None:
        self.run, self.file, self.bar = run, file, bar
        self.sums = torch.zeros(len(run.method.terms), device=run.device)
        self.n, self.t_last = 0, time.perf_counter()

    def add(self, values: torch.Tensor) -> None:
        self.sums += values
        self.n += 1

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (e.g. monitoring) out of the throughput."""
        self.t_last += seconds

    def write(self, step: int, lr: float) -> None:
        terms = self.run.method.terms
        dt = time.perf_counter() - self.t_last
        rec = {"step": step, "epoch": round(step / self.run.steps_per_epoch, 4),
               **dict(zip(terms, (self.sums / self.n).tolist())), "lr": lr,
               "patches_per_s": self.n * self.run.views_per_step / max(dt, 1e-9)}
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        self.run.tracker.log_scalars(rec, step=step, wall_time=time.time(), prefix="train/")
        self.bar.set_postfix({k: f"{rec[k]:.3g}" for k in terms[:3]} | {"views/s": f"{rec['patches_per_s']:.0f}"})
        self.sums.zero_()
        self.n, self.t_last = 0, time.perf_counter()


def _check_finite(run: Run, first_bad: torch.Tensor, sums: torch.Tensor, step: int, last_good: int) -> None:
    """At a step that syncs anyway: stop if an update was skipped for a non-finite loss or gradient."""
    bad = int(first_bad)
    if bad >= 0 or not torch.isfinite(sums).all():
        raise TrainError(f"the loss or a gradient became non-finite at step {bad if bad >= 0 else step} (its update "
                         f"was skipped); training stopped at step {step}, and the last good checkpoint (step "
                         f"{last_good}) is kept in {run.ckpt_path}; try a lower --lr")


def loop(run: Run, monitor: Monitor, progress: bool, log: Callable[[str], None]) -> None:
    """Train from ``run.step`` to ``run.total_steps``: one :func:`train_step` per batch, a metrics line every
    ``log_every`` steps, a checkpoint every ``checkpoint_every`` steps, at every epoch end and at the end."""
    cfg, dist, device, model, opt = run.cfg, run.dist, run.device, run.model, run.opt
    # Training images live on the device as uint8 when they fit (CIFAR-10: 150 MB); views are cut there.
    images = run.train_data.images
    images = images.to(device) if images.numel() < 4 * 2**30 else images
    # speed: exact activation checkpointing when a step would not fit (the same choice on every rank)
    use_ckpt, why = want_checkpointing(cfg.grad_checkpointing, model, run.views_per_step // dist.world_size,
                                       cfg.patch_size, device, run.amp, run.memory_format == torch.channels_last)
    if distributed.any_rank(use_ckpt, dist, device) if dist.enabled else use_ckpt:
        log(f"activation checkpointing of {checkpoint_backbone(model)} residual blocks ({why})")
    compiler = _Compiler(run, log)
    batches = StepBatches(images, batch_size=cfg.batch_size, seed=cfg.seed, start_step=run.step,
                          total_steps=run.total_steps, device=device, rank=dist.rank, world=dist.world_size)
    log(f"training {cfg.method} ({cfg.arch}, width {cfg.width}) on {len(run.train_data)} images, batch "
        f"{cfg.batch_size}, {run.total_steps - run.step} steps on {device}{' (bf16)' if run.amp else ''}")

    model.train()
    monitor.start(model)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step whose update was skipped
    step = last_good = run.step
    bar = tqdm(total=run.total_steps, initial=step, disable=not progress, file=sys.stderr, dynamic_ncols=True,
               desc="train", unit="step")
    metrics_path = run.out / "metrics.jsonl" if dist.is_main else Path(os.devnull)
    with _StopFlag() as stop, metrics_path.open("a") as file, batches, bar:
        metrics = _Metrics(run, file, bar)
        stream = iter(batches)  # a fixed permutation per epoch, so a resumed run sees the same batches
        while step < run.total_steps:
            lr = run.lr(step)
            for group in opt.param_groups:
                group["lr"] = lr
            compiler.before(step)
            values, applied = train_step(compiler.net, opt, run.method, next(stream), run.generator, run.amp,
                                         run.memory_format, dist)
            run.method.after_step(model, step + 1, run.schedule_steps, applied)  # e.g. BYOL's target
            first_bad = torch.where(applied | (first_bad >= 0), first_bad, step + 1)
            metrics.add(values)
            step += 1
            bar.update(1)
            compiler.after(step)

            at_log = step % cfg.log_every == 0 or step == run.total_steps
            at_ckpt = step % cfg.checkpoint_every == 0 or step % run.steps_per_epoch == 0 or step == run.total_steps
            # A host sync only at log/checkpoint steps. Under torchrun the ranks meet there (and at every step on
            # the CPU, where it is free) at the same steps: losses are averaged and a stop request reaches all.
            stopping = stop.requested and not dist.enabled
            if dist.enabled and (at_log or at_ckpt or device.type == "cpu"):
                stopping = distributed.agree(metrics.sums, stop.requested, dist)
            if at_log or at_ckpt or stopping:  # never log or save after a skipped (non-finite) update
                _check_finite(run, first_bad, metrics.sums, step, last_good)
            if at_log:
                metrics.write(step, lr)
            spent = monitor.after_step(model, step)
            metrics.exclude(spent)  # monitoring time stays out of patches_per_s and the compile decision
            compiler.exclude(spent)
            if at_ckpt or stopping:
                save(run, step, monitor.clock())
                last_good = step
            if stopping and step < run.total_steps:
                raise KeyboardInterrupt(f"interrupted at step {step}; checkpoint saved, run the same command to resume")
    run.step = step


# --- the whole run ------------------------------------------------------------------------------------------


def _silent(message: str) -> None:
    """The log of ranks other than 0."""


def train(cfg: Config, out_dir: str | Path, *, progress: bool = True, log: Callable[[str], None] = print,
          data: tuple[ImageData, ImageData] | None = None, evaluate_at_end: bool = True) -> dict[str, Any]:
    """Train (or resume) a run of ``cfg.method`` in ``out_dir`` and, unless ``evaluate_at_end`` is False, evaluate it.

    ``out_dir`` receives config.json, metrics.jsonl, checkpoint.pt and results.json. ``data`` may pass
    (train, test) directly (used by tests and notebooks); otherwise ``cfg.data`` is loaded.
    Returns the results dict (or a summary when evaluation is skipped). Its ``timing`` entry accounts for the
    wall clock from process start: startup, data, compile, train, monitor, features, knn, probe and total.
    """
    global _CLOCK_ORIGIN
    cfg.validate()
    require_trackers(cfg.log)  # --log: a missing extra fails here, before any data is loaded
    # The wall-clock account starts at process start for the first run of a process (the CLI's case) and at the
    # call for later ones (a notebook, the experiments' loops), so that runs do not count each other's time.
    if _CLOCK_ORIGIN is None:
        _CLOCK_ORIGIN, startup = 0.0, {"startup": process_seconds()}
    else:
        _CLOCK_ORIGIN, startup = process_seconds(), {}
    if not distributed.env_dist().is_main:
        progress, log = False, _silent
    run = setup(cfg, Path(out_dir), data, progress, log)
    run.timing = {**startup, **run.timing}
    run.tracker = open_tracking(cfg.log, run.out, cfg.to_dict(), start_step=run.step, enabled=run.dist.is_main)
    monitor = Monitor(cfg, run.train_data, run.test_data, run.device, run.out, steps_per_epoch=run.steps_per_epoch,
                      total_steps=run.total_steps,
                      patches_per_step=run.views_per_step, start_step=run.step,
                      clock_state=run.clock_state, enabled=run.dist.is_main, tracker=run.tracker)
    if run.step < run.total_steps:
        loop(run, monitor, progress, log)
    elif run.ckpt_path.exists():
        log(f"{run.out} is trained to the end (step {run.step}); nothing to train")
    synchronize(run.device)
    clock = monitor.clock()
    if run.dist.enabled:
        distributed.teardown(run.own_group)  # evaluation below runs on rank 0 alone
    session_train = clock["train_seconds"] - (run.clock_state or {}).get("train_seconds", 0.0)
    run.timing.update(train=session_train - run.timing.get("compile", 0.0),
                      monitor=clock["monitor_seconds"] - (run.clock_state or {}).get("monitor_seconds", 0.0))
    summary = {"method": cfg.method, "steps": run.total_steps, "epochs": cfg.epochs, "images": len(run.train_data),
               **clock, "device": device_name(run.device),
               "compile": run.compile_reason or None}  # monitoring: wall time and hardware
    if not evaluate_at_end or not run.dist.is_main:
        done: dict[str, Any] = {**summary, "timing": _timing(run.timing)}
        run.tracker.log_results(done, step=run.step)
        run.tracker.close()
        return done
    from .evaluate import evaluate, view_label

    results = {**summary, **evaluate(run.model, run.train_data, run.test_data, cfg, run.device, progress=progress,
                                     log=log)}
    for key, name in (("features", "feature_seconds"), ("knn", "knn_seconds"), ("probe", "probe_seconds")):
        run.timing[key] = results[name]
    if cfg.compare_random_init:
        torch.manual_seed(cfg.seed)  # the same initialisation the run started from
        baseline = run.method.build_model().to(run.device)
        log("evaluating the randomly initialised encoder with the same protocol")
        t0 = time.perf_counter()
        base = evaluate(baseline, run.train_data, run.test_data, cfg, run.device, progress=progress, log=log)
        run.timing["random_init_eval"] = time.perf_counter() - t0
        results["random_init"] = {k: base[k] for k in ("linear_top1", "knn_top1")}
        gap = results["linear_top1"] - base["linear_top1"]
        log(f"linear probe: trained {results['linear_top1']:.1f}% vs random init {base['linear_top1']:.1f}% "
            f"({gap:+.1f} points, {view_label(results['eval_view'], cfg.test_patches)})")
    results["timing"] = _timing(run.timing)
    write_json(run.out / "results.json", results)
    run.tracker.log_results(results, step=run.step)
    run.tracker.close()
    log(f"results written to {run.out / 'results.json'}")
    log(time_line(results["timing"]))  # the run's last line: where the time went
    return results


def train_once(cfg: Config, out_dir: str | Path, *, name: str, progress: bool = True,
               log: Callable[[str], None] = print, data: tuple[ImageData, ImageData] | None = None) -> dict[str, Any]:
    """The results of the run in ``out_dir``: read back when it is finished and evaluated, else trained (or
    resumed) and evaluated by :func:`train`. ``name`` labels the log lines (for the loops over runs of the
    experiments and the comparison)."""
    out = Path(out_dir)
    if (out / "results.json").is_file() and finished(out):
        log(f"{name}: finished run found in {out}, not retrained")
        return json.loads((out / "results.json").read_text())
    log(f"{name}: training {cfg.epochs:g} epochs in {out}")
    return train(cfg, out, progress=progress, log=log, data=data)


_CLOCK_ORIGIN: float | None = None  # process_seconds() at which the current run's account starts

_TIMING_ORDER = ("startup", "data", "compile", "train", "monitor", "features", "knn", "probe", "random_init_eval")


def _timing(parts: dict[str, float]) -> dict[str, float]:
    """The phases in a fixed order, with ``total`` = seconds from process start (or, for a later run of the same
    process, from the start of its train() call) to now."""
    out = {k: round(parts[k], 3) for k in _TIMING_ORDER if parts.get(k)}
    out["total"] = round(process_seconds() - (_CLOCK_ORIGIN or 0.0), 3)
    return out


def time_line(timing: dict[str, float]) -> str:
    """The run's last line: where the wall-clock time went, e.g.
    ``time: 58.1 s from process start = startup 2.1 + data 3.2 + train 23.3 + features 20.1 + ... (other 0.4)``."""
    parts = [(k, v) for k, v in timing.items() if k != "total"]
    other = timing["total"] - sum(v for _, v in parts)
    names = {"knn": "kNN", "random_init_eval": "random-init eval"}
    start = "process start" if "startup" in timing else "the start of this run"
    return (f"time: {timing['total']:.1f} s from {start} = "
            + " + ".join(f"{names.get(k, k)} {v:.1f}" for k, v in parts) + f" (other {other:.1f})")
