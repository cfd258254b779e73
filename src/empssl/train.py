"""The training loop, the same for every method: views -> method loss -> LARS step.

``train()`` reads top to bottom: :func:`setup` (data and its batch source, model, optimiser, resume, and the speed
decisions: activation recomputation and ``--compile``), :func:`loop` (one :func:`train_step` per batch; logging,
monitoring and checkpoints at their steps), then the evaluation. Every source of batches (images in memory,
streamed shards, a user's iterable, the online stream of :mod:`empssl.online`) is an
:class:`empssl.batches.BatchSource`; the method (:mod:`empssl.methods`) supplies the model, the views and the
loss; the run's life in its directory is a :class:`empssl.rundir.RunSession`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import distributed
from .batches import BatchSource, IterableBatches, StepBatches
from .checkpoint import RESUMED, CheckpointError, load_model_state, read_checkpoint
from .compiling import Compiler
from .config import Config, ConfigError
from .data import DataError, ImageData, load_data
from .devices import autocast_dtype, device_name, synchronize
from .distributed import SINGLE, Dist
from .evaluate import evaluate, view_label
from .fallbacks import collecting
from .files import check_writable_dir
from .methods import Method, create_method
from .monitor import Monitor
from .optim import LARS, lars_param_groups, lr_at
from .recompute import check_step_fits, recompute_backbone, want_recompute
from .remote import refuse_output
from .rundir import MetricsLog, RunSession, finished, run_config, write_config
from .stream import ShardItems, StreamBatches, StreamedSplit, check_data, data_record, load_splits, resolve_decode
from .tracking import require_trackers
from .version import __version__

# The total steps of a stream without --online-stop: it never reaches the end of its schedule.
ENDLESS = 2**62


class TrainError(RuntimeError):
    """Training cannot go on (non-finite loss, incompatible run directory...): reported in one line."""


# What opens a source with data of its own (the online stream, :class:`empssl.online.OnlineBatches`): (cfg, device,
# the run's session (its folder, Ctrl-C flag and log), progress) -> (source, monitor bank, test data). Such a source
# may have two hooks: ``after_step(step)``, once a step commits (its record of the step), returning the seconds it
# waited for data since the last call (left out of the throughput), and ``summary()``, its account of the run for
# results.json.
SourceOpener = Callable[..., tuple[BatchSource, ImageData | StreamedSplit, ImageData | StreamedSplit]]


def train_step(net: nn.Module, opt: LARS, method: Method, images: torch.Tensor, generator: torch.Generator,
               amp: torch.dtype | None, memory_format: torch.memory_format,
               dist: Dist = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a (b, 3, H, W) uint8 batch (this rank's slice of the step's images).

    Returns (the method's detached (T,) loss terms, a 0-d bool tensor: was the update applied). A non-finite
    loss or gradient skips the update on the device (parameters and momentum unchanged) without a host sync.
    """
    opt.zero_grad(set_to_none=True)
    # views (V, b, 3, s, s) -> (T,) float32 loss terms, the minimised loss first -> backward
    terms = method.gradients(net, images, generator, amp, memory_format, dist)
    method.before_optimizer_step(net)  # between backward and the update: a method's gradient hook
    applied = opt.step(finite=torch.isfinite(terms[0]))
    return terms, applied


@dataclass
class Run:
    """Everything a training session works with, built by :func:`setup`."""

    cfg: Config
    out: Path
    dist: Dist
    device: torch.device
    own_group: bool  # this session created the process group (torchrun) and tears it down
    train_data: ImageData | StreamedSplit  # streamed: read as it goes by the monitor and the evaluation
    test_data: ImageData | StreamedSplit
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
    session: RunSession  # the run directory's lock, checkpoints, trackers, timing and results
    source: BatchSource  # the training batches, whatever the tier
    eval_every: float  # the kNN monitor's interval (--eval-every; online: --online-eval-every's images in steps)
    step: int = 0
    compiler: Compiler | None = None  # the module the step calls (set up once the step to start from is known)
    metrics_state: dict[str, Any] | None = None  # the checkpoint's running loss sums since its last log step
    data: dict[str, Any] | None = None  # what it trains on (stream.data_record): saved, checked on resume
    n_train: int = 0  # training images (of an epoch; 0 for a stream)

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def views_per_step(self) -> int:
        """Views made per step over all processes (EMP-SSL: patches)."""
        return self.method.views_per_image * self.cfg.batch_size

    def lr(self, step: int) -> float:
        """The run's learning-rate schedule: warm-up then cosine (:func:`empssl.optim.lr_at`); online, the rate
        stays at --lr after its warm-up (the cosine's floor is --lr), as no schedule can know the stream's
        length."""
        cfg = self.cfg
        return lr_at(step, self.schedule_steps, cfg.lr, warmup_steps=self.warmup_steps,
                     warmup_start_lr=cfg.warmup_start_lr, min_lr=cfg.lr if cfg.online else cfg.min_lr)


# --- set-up -------------------------------------------------------------------------------------------------


def config_data(cfg: Config, progress: bool = True, data: tuple[ImageData, ImageData] | None = None
                ) -> tuple[ImageData, ImageData]:
    """(train, test) of ``cfg.data`` (or ``data`` as given), cut to ``cfg.train_subset`` / ``cfg.test_subset``."""
    train, test = data if data is not None else load_data(cfg.data, cfg.data_dir, cfg.image_size, progress)
    if cfg.train_subset:
        train = train.subset(cfg.train_subset)
    if cfg.test_subset:
        test = test.subset(cfg.test_subset)
    return train, test


NO_IMAGES = ImageData(torch.empty(0, 3, 1, 1, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), [])


def _load_data(cfg: Config, data: tuple[ImageData, ImageData] | Iterable[Any] | None, dist: Dist,
               device: torch.device, progress: bool, evaluating: bool
               ) -> tuple[Callable[[], BatchSource], ImageData | StreamedSplit, ImageData | StreamedSplit, int,
                          dict[str, Any]]:
    """(what builds the batch source, called once the run directory is locked, as it may copy the images to the
    GPU; train, test, the images of an epoch, what it trains on: :func:`empssl.stream.data_record`); with a user's
    batches, train and test are ``cfg.data``'s for the monitor and the evaluation (loaded only for them)."""
    own = None
    train_data: ImageData | StreamedSplit
    test_data: ImageData | StreamedSplit
    splits = isinstance(data, tuple) and len(data) == 2 and all(isinstance(d, ImageData) for d in data)
    if data is not None and not splits:
        if dist.enabled:
            raise ConfigError("data= (an iterable of batches) trains in one process: under torchrun each rank's "
                              "position in it would need its own checkpoint")
        own = IterableBatches(data, batch_size=cfg.batch_size, device=device, image_size=cfg.image_size)
    with distributed.main_process_first(dist):  # torchrun: rank 0 downloads / fills the decoded-image cache first
        if own is not None and not (evaluating or cfg.eval_every):
            train_data, test_data, streamed = NO_IMAGES, NO_IMAGES, None
        elif data is None or own is not None:
            train_data, test_data, streamed = load_splits(cfg, progress, lambda: config_data(cfg, progress))
        else:
            train_data, test_data, streamed = (*config_data(cfg, progress, data), None)  # type: ignore[arg-type]
    n_train = own.steps_per_epoch * cfg.batch_size if own else len(train_data)
    if n_train < cfg.batch_size:  # drop_last, as the official loader
        raise ConfigError(f"--batch-size {cfg.batch_size} exceeds the {n_train} training images")
    if cfg.batch_size % dist.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the "
                          f"{dist.world_size} processes")
    read = streamed.items.shards if streamed is not None and isinstance(streamed.items, ShardItems) else None
    record = data_record(n_train, cfg.data if data is None else None, cfg.data_dir, (cfg.image_key, cfg.label_key),
                         read)
    order: dict[str, Any] = dict(batch_size=cfg.batch_size, seed=cfg.seed, device=device, rank=dist.rank,
                                 world=dist.world_size)

    def source() -> BatchSource:
        if own is not None:
            return own
        if streamed is not None:  # its steps: LitData's, per rank
            return StreamBatches(streamed, decode=resolve_decode(cfg.decode, device), **order)
        # in memory the images live on the device as uint8 when they fit (CIFAR-10: 150 MB), and views are cut there
        assert isinstance(train_data, ImageData)  # (not streamed)
        images = train_data.images
        return StepBatches(images.to(device) if images.numel() < 4 * 2**30 else images, **order,
                           total_steps=_schedule(cfg, n_train // cfg.batch_size)[0])

    return source, train_data, test_data, n_train, record


def _schedule(cfg: Config, steps_per_epoch: int) -> tuple[int, int, int, float]:
    """(total, schedule and warm-up steps, the monitor's --eval-every): epochs of the source's steps; online, images
    (--online-stop's, or no end; --online-warmup's, the rate then constant: :meth:`Run.lr`; --online-eval-every's)."""
    if cfg.online:
        total = math.ceil(cfg.online_stop / cfg.batch_size) if cfg.online_stop else ENDLESS
        warmup = round(cfg.online_warmup / cfg.batch_size)
        every = max(1, round(cfg.online_eval_every / cfg.batch_size)) if cfg.online_eval_every else 0
        return total, max(total, warmup + 1), warmup, every
    total = max(1, round(cfg.epochs * steps_per_epoch))
    return (total, max(total, round((cfg.schedule_epochs or cfg.epochs) * steps_per_epoch)),
            round(cfg.warmup_epochs * steps_per_epoch), cfg.eval_every)


def setup(cfg: Config, session: RunSession, data: tuple[ImageData, ImageData] | Iterable[Any] | None,
          progress: bool, log: Callable[[str], None], evaluating: bool = True, open_source: SourceOpener | None = None
          ) -> Run:
    """Data and its batch source, run directory, model, optimiser and generator; resumed from the session's
    checkpoint if there is one; then the speed decisions, made once: activation recomputation
    (``--grad-checkpointing``) and ``--compile``. The run directory is opened only once the data has loaded and
    the batch fits it, so a failed start leaves nothing that binds the next command."""
    t0, out = time.perf_counter(), session.out
    dist, device, own_group = distributed.setup(cfg.device)  # torchrun: join the group, take cuda:LOCAL_RANK
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    check_step_fits(cfg, device, dist.world_size)  # a step that cannot fit: one line, before any data or file
    if open_source is not None:  # a collection that grows while the run learns it once, in arrival order
        opened, train_data, test_data = open_source(cfg, device, session, progress)
        build, n_train, record = lambda: opened, 0, None  # (no epochs, no record: it follows a growing collection)
    else:
        build, train_data, test_data, n_train, record = _load_data(cfg, data, dist, device, progress, evaluating)
    session.add("data", time.perf_counter() - t0)
    session.open()
    source = build()

    total_steps, schedule_steps, warmup_steps, eval_every = _schedule(cfg, source.steps_per_epoch)
    memory_format = torch.channels_last if cfg.channels_last and device.type == "cuda" else torch.contiguous_format
    method = create_method(cfg)
    torch.manual_seed(cfg.seed)  # model initialisation
    model = method.build_model().to(device, memory_format=memory_format)  # type: ignore[call-overload]
    if dist.enabled and cfg.sync_bn:  # before the optimiser: the converted layers have new parameters
        model = distributed.convert_sync_batchnorm(model, device)
    opt = LARS(lars_param_groups(model), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
               eta=cfg.lars_eta, nesterov=cfg.nesterov)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed)
    run = Run(cfg=cfg, out=out, dist=dist, device=device, own_group=own_group, train_data=train_data,
              test_data=test_data, method=method, model=model, opt=opt, generator=generator,
              steps_per_epoch=source.steps_per_epoch, total_steps=total_steps, schedule_steps=schedule_steps,
              warmup_steps=warmup_steps, amp=autocast_dtype(cfg.precision, device), memory_format=memory_format,
              session=session, source=source, eval_every=eval_every, data=record, n_train=n_train)
    # torchrun: every rank sees rank 0's run directory and the same checkpoint, or every rank stops here
    ckpt = distributed.shared_checkpoint(out, dist, lambda path: read_checkpoint(path, require=RESUMED))
    if ckpt is not None:
        resume(run, log, ckpt)
    if run.step < run.total_steps:
        # exact activation recomputation when a step would not fit (the same choice on every rank)
        use, why = want_recompute(cfg.grad_checkpointing, model,
                                  run.views_per_step // dist.world_size // cfg.patch_chunks,
                                  cfg.patch_size, device, run.amp, memory_format == torch.channels_last)
        if distributed.any_rank(use, dist, device):
            log(f"activation checkpointing of {recompute_backbone(model)} residual blocks ({why})")
        run.compiler = Compiler(cfg.compile, model, device, dist, start_step=run.step, total_steps=total_steps,
                                log=log)
    return run


def resume(run: Run, log: Callable[[str], None], ckpt: dict[str, Any] | None = None) -> None:
    """Load the checkpoint of ``run.out`` (``ckpt``, if read already) into the run: weights, optimiser, step, RNG
    states, the run's clock."""
    ckpt = ckpt if ckpt is not None else read_checkpoint(run.ckpt_path, require=RESUMED)  # every rank loads it
    cfg, dist = run.cfg, run.dist
    if run.data is not None:  # (the online mode records none: it follows a growing collection)
        check_data(ckpt.get("data"), run.data, cfg.data, run.ckpt_path, log)  # before anything is loaded or written
    if ckpt.get("world_size", 1) != dist.world_size and not (cfg.tcr_global and cfg.sync_bn):
        raise TrainError(f"{run.out} was trained by {ckpt.get('world_size', 1)} processes; resume it with as many "
                         f"(only --tcr-global and --sync-bn make the run independent of that number)")
    load_model_state(run.model, ckpt["model"], f"checkpoint {run.ckpt_path}")
    run.opt.load_state_dict(ckpt["optimizer"])
    run.step, run.session.before, run.metrics_state = int(ckpt["step"]), ckpt.get("clock") or {}, ckpt.get("metrics")
    state = ckpt.get("source") or ckpt.get("stream")  # (an older checkpoint holds the step alone)
    if state or run.step < run.total_steps:  # the position also counts what a finished stream learned
        run.source.load_state_dict(state or {"step": run.step})
    if dist.is_main and not (run.out / "config.json").is_file():  # its readable copy, deleted: written again
        write_config(run.out, Config.from_dict(ckpt.get("config", {})))
        log(f"{run.out / 'config.json'} was missing; rewritten from the checkpoint")
    try:
        torch.set_rng_state(ckpt["rng"]["torch"])  # the CPU generator's state, whatever the device
    except RuntimeError as e:  # (another size or dtype: a damaged file)
        raise CheckpointError(f"{run.ckpt_path} is not an empssl checkpoint (its 'rng.torch' is not a generator's "
                              f"state: {str(e).splitlines()[0]})") from None
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
        log(f"resuming {run.out} at step {run.step}" + (f"/{run.total_steps}" if run.total_steps < ENDLESS else ""))


def save(run: Run, step: int, metrics: dict[str, Any] | None = None) -> None:
    """A checkpoint of the run at ``step`` (:meth:`empssl.rundir.RunSession.save`: atomic, rank 0, config.json with
    the first), with the run's clock, ``metrics`` (:meth:`MetricsLog.state`) and the source's position."""
    if not run.dist.is_main:  # (only rank 0 asks the source for its state)
        return
    run.session.save({"model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "step": step,
                      "epoch": step / run.steps_per_epoch if run.steps_per_epoch else None,
                      "total_steps": run.total_steps, "schedule_steps": run.schedule_steps,
                      "finished": step >= run.total_steps,
                      "rng": {"patches": run.generator.get_state(), "torch": torch.get_rng_state(),
                              "device": run.device.type},
                      "clock": run.session.clock(), "config": run.cfg.to_dict(), "version": __version__,
                      "world_size": run.dist.world_size, "metrics": metrics, "data": run.data,
                      "source": run.source.state_dict()}, run.cfg)


# --- the loop -----------------------------------------------------------------------------------------------


def loop(run: Run, monitor: Monitor, progress: bool, log: Callable[[str], None]) -> None:
    """Train from ``run.step`` until ``run.total_steps`` or the end of the source (a stream that stops): one
    :func:`train_step` per batch, a metrics line every ``log_every`` steps, a checkpoint every ``checkpoint_every``
    steps, at every epoch end and at the end. Ctrl-C saves and raises KeyboardInterrupt; bad data from the source
    (DataError) saves the steps learned, then is raised."""
    cfg, dist, device, model, opt, method = run.cfg, run.dist, run.device, run.model, run.opt, run.method
    compiler, batches, stop = run.compiler, run.source, run.session.stop
    assert compiler is not None, "setup() prepares the compiler"
    after_step = getattr(batches, "after_step", lambda step: 0.0)  # a source's hook (SourceOpener)
    endless = run.total_steps == ENDLESS
    steps = "until the stream stops" if endless else f"{run.total_steps - run.step} steps"
    log(f"training {cfg.method} ({cfg.arch}, width {cfg.width}) on {run.n_train or 'the arriving'} images, batch "
        f"{cfg.batch_size}, {steps} on {device}{' (bf16)' if run.amp else ''}")

    model.train()
    monitor.start(model)
    step = last_good = run.step
    bar = tqdm(total=None if endless else run.total_steps, initial=step, disable=not progress, file=sys.stderr,
               dynamic_ncols=True, desc="train", unit="step")
    metrics = MetricsLog(run.out / "metrics.jsonl" if dist.is_main else None, method.terms, device, bar=bar,
                         start_step=step, steps_per_epoch=run.steps_per_epoch, views_per_step=run.views_per_step,
                         tracker=run.session.tracker, state=run.metrics_state)
    stopping = False
    with stop, closing(metrics), batches, bar:
        try:
            for images in batches:  # from the step of its state: a resumed run sees the same batches
                lr = run.lr(step)
                for group in opt.param_groups:
                    group["lr"] = lr
                values, applied = compiler.call(train_step, opt, method, images, run.generator, run.amp,
                                                run.memory_format, dist, generator=run.generator, step=step)
                method.after_step(model, step + 1, run.schedule_steps, applied)  # e.g. BYOL's target
                metrics.add(values, applied, step + 1)
                step += 1
                waited = after_step(step)
                bar.update(1)
                compiler.after(step)

                at_log = step % cfg.log_every == 0 or step == run.total_steps
                at_ckpt = (step % cfg.checkpoint_every == 0 or step == run.total_steps
                           or (run.steps_per_epoch and step % run.steps_per_epoch == 0))
                stopping = stop.requested
                if dist.enabled:  # the ranks meet at the same steps (every step on the CPU, where it is free)
                    stopping = (at_log or at_ckpt or device.type == "cpu") and distributed.agree(metrics.sums,
                                                                                                 stop.requested, dist)
                if at_log or at_ckpt or stopping:  # a host sync; never log or save after a skipped update
                    _check_finite(run, metrics, step, last_good)
                if at_log:
                    metrics.write(step, lr)
                spent = waited + monitor.after_step(model, step)
                metrics.exclude(spent)  # waiting and monitoring stay out of patches_per_s and the compile decision
                compiler.exclude(spent)
                if at_ckpt or stopping:
                    save(run, step, metrics.state())
                    last_good = step
                if stopping or step == run.total_steps:
                    break
        except DataError:  # the source's data went bad (a shard that changed): the steps learned are kept
            if step != last_good:
                _check_finite(run, metrics, step, last_good)
                save(run, step, metrics.state())
            raise
        if step != last_good:  # the source stopped first (a stream): its last step is the run's last
            _check_finite(run, metrics, step, last_good)
            if metrics.n:
                metrics.write(step, run.lr(step - 1))
            if monitor.interval and step % monitor.interval:  # the accuracy at the stop
                monitor.evaluate(model, step)
            save(run, step, metrics.state())
    if (stopping or stop.requested) and step < run.total_steps:
        if step == 0:
            raise KeyboardInterrupt  # nothing was kept (the session says so)
        raise KeyboardInterrupt(f"interrupted at step {step}, after {step * cfg.batch_size} images; checkpoint "
                                f"saved, run the same command to resume")
    run.step = step


def _check_finite(run: Run, metrics: MetricsLog, step: int, last_good: int) -> None:
    """Stop if an update since the last check was skipped for a non-finite loss or gradient."""
    bad = metrics.non_finite_step(step)
    if bad is None:
        return
    stopped = f"the loss or a gradient became non-finite at step {bad} (its update was skipped); training stopped"
    if not run.ckpt_path.exists():  # nothing binds --out yet (config.json comes with the first checkpoint)
        raise TrainError(f"{stopped} at step {step}, before any checkpoint; run again with a lower --lr")
    raise TrainError(f"{stopped} at step {step}; the last good checkpoint (step {last_good}) is kept in "
                     f"{run.ckpt_path}; to try a lower --lr, choose a new --out (the run's settings are fixed)")


# --- the whole run ------------------------------------------------------------------------------------------


def train(cfg: Config, out_dir: str | Path, *, progress: bool = True, log: Callable[[str], None] = print,
          data: tuple[ImageData, ImageData] | Iterable[Any] | None = None, evaluate_at_end: bool = True,
          open_source: SourceOpener | None = None) -> dict[str, Any]:
    """Train (or resume) a run of ``cfg.method`` in ``out_dir`` and, unless ``evaluate_at_end`` is False, evaluate it.

    ``out_dir`` receives config.json, metrics.jsonl, checkpoint.pt and results.json. ``data`` is (train, test)
    ImageData, or the training batches themselves: any iterable with a ``len()`` of (b, 3, H, W) uint8 tensors or
    (images, labels) pairs, e.g. a DataLoader (:class:`empssl.batches.IterableBatches`; the monitor and the
    evaluation then use ``cfg.data``); by default ``cfg.data`` is loaded. ``open_source`` opens a source with data of
    its own (the online stream: :func:`empssl.online.train_online`). Returns the results dict (a summary without
    evaluation), whose ``timing`` accounts for the wall clock phase by phase (:data:`empssl.rundir.TIMING_FIELDS`).
    """
    cfg.validate()
    refuse_output(out_dir)  # a run directory on an object store: one line (it needs a lock and atomic renames)
    # resuming: the checkpoint's config is the truth, as for the command line (a setting that would change the
    # trained weights is refused in one line; the evaluation, logging and speed ones are taken from cfg)
    cfg = run_config(out_dir, cfg, cfg.to_dict())
    if cfg.online != (open_source is not None):  # the stream is opened by empssl.online
        raise ConfigError("--online runs through empssl train --online (empssl.online.train_online), not train()")
    require_trackers(cfg.log)  # a missing logger package: one line before anything loads
    check_writable_dir(out_dir, "--out")  # a read-only place or a file: one line before anything loads
    main = distributed.env_dist().is_main
    if not main:
        progress, log = False, lambda message: None  # ranks other than 0 say nothing
    # the run directory's lock until its results are written; the fast paths that failed and ran eager instead
    with RunSession(Path(out_dir), log, main=main) as session, collecting(log) as fallbacks:
        run = setup(cfg, session, data, progress, log, evaluate_at_end, open_source)
        session.open_tracking(cfg, run.step)
        monitor = Monitor(cfg.replace(eval_every=run.eval_every), run.train_data, run.test_data, run.device, run.out,
                          steps_per_epoch=run.steps_per_epoch, total_steps=run.total_steps,
                          patches_per_step=run.views_per_step, start_step=run.step, session=session, dist=run.dist)
        if run.step < run.total_steps:
            loop(run, monitor, progress, log)
        elif run.ckpt_path.exists():
            log(f"{run.out} is trained to the end (step {run.step}); nothing to train")
        accounted: dict[str, Any] = getattr(run.source, "summary", dict)()  # a source's hook (SourceOpener)
        del run.source  # the training images on the device, freed for the evaluation
        synchronize(run.device)
        clock = session.trained(run.compiler.compile_seconds if run.compiler else 0.0,
                                accounted.get("wait_seconds", 0.0))
        summary = {"method": cfg.method, "steps": run.step, "epochs": cfg.epochs, "images": run.n_train, **clock,
                   "device": device_name(run.device),
                   "compile": run.compiler.reason if run.compiler else None,  # monitoring: wall time and hardware
                   "fallbacks": fallbacks, **accounted}
        run.compiler = None  # the DDP wrapper goes while the process group is alive (distributed.teardown)
        # an online run without --online-eval has no labelled data: it ends with its summary
        if not evaluate_at_end or not len(run.test_data):
            distributed.teardown(run.own_group)
            return session.finish(summary, run.step, write=cfg.online)
        # a streamed run's kNN and probe train on its whole training split, streamed (the features, not the images,
        # are kept), as the in-memory run's do (results.json: eval_sets); under torchrun every rank computes its
        # share of the features, and rank 0 writes
        results = {**summary, **evaluate(run.model, run.train_data, run.test_data, cfg, run.device, progress=progress,
                                         log=log, dist=run.dist)}
        session.evaluated(results)
        if cfg.compare_random_init:
            torch.manual_seed(cfg.seed)  # the same initialisation the run started from
            baseline = run.method.build_model().to(run.device)
            log("evaluating the randomly initialised encoder with the same protocol")
            t0 = time.perf_counter()
            base = evaluate(baseline, run.train_data, run.test_data, cfg, run.device, progress=progress, log=log,
                            dist=run.dist)
            session.add("random_init_eval", time.perf_counter() - t0)
            results["random_init"] = {k: base[k] for k in ("linear_top1", "knn_top1")}
            gap = results["linear_top1"] - base["linear_top1"]
            log(f"linear probe: trained {results['linear_top1']:.1f}% vs random init {base['linear_top1']:.1f}% "
                f"({gap:+.1f} points, {view_label(results['eval_view'], cfg.test_patches)})")
        distributed.teardown(run.own_group)
        if not run.dist.is_main:
            return results
        results["fallbacks"] = fallbacks  # the training's and the evaluations'
        return session.finish(results, run.step)


def train_once(cfg: Config, out_dir: str | Path, *, name: str, progress: bool = True,
               log: Callable[[str], None] = print, data: tuple[ImageData, ImageData] | None = None) -> dict[str, Any]:
    """The results of the run in ``out_dir``: read back when it is finished and evaluated, else trained (or
    resumed) and evaluated by :func:`train`. ``name`` labels the log lines."""
    out = Path(out_dir)
    if (out / "results.json").is_file() and finished(out, cfg):
        log(f"{name}: finished run found in {out}, not retrained")
        return json.loads((out / "results.json").read_text())
    log(f"{name}: training {cfg.epochs:g} epochs in {out}")
    return train(cfg, out, progress=progress, log=log, data=data)
