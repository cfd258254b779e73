"""The run directory and the run's bookkeeping.

A run directory holds config.json (the resolved config and the empssl version), metrics.jsonl, checkpoint.pt
(model, optimiser, step, RNG states, config), monitor.jsonl with --eval-every, and results.json. This module
holds the rules that training, evaluation, the experiments and the CLI share about it (which settings may
change on resume, whether a run is finished, rebuilding its model), and what a training session keeps while
it writes one: :class:`MetricsLog`, :class:`StopFlag` and :class:`RunSession` (lock, config.json, checkpoints,
trackers, the run's clock and the wall-clock account, results.json). None of them needs the trainer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from .checkpoint import CheckpointError, load_model_state, read_checkpoint, save_atomic
from .config import Config, ConfigError, flag
from .files import OutputError, WriterLock, cut_jsonl, read_json, write_json
from .methods import create_method
from .tracking import NO_TRACKING, Tracking, open_tracking
from .version import __version__

# Keys that may differ between a run directory's saved config and the command that resumes it: they change
# where things are read or how often they are written, or the evaluation, never the trained weights.
RESUMABLE_CHANGES = frozenset({
    "device", "data_dir", "log_every", "checkpoint_every", "log",  # where and how often
    "test_patches", "eval_view", "eval_feature", "eval_seed", "eval_batch_size", "probe_epochs", "probe_lr",
    "probe_lrs", "probe_momentum", "probe_weight_decay", "probe_batch_size", "probe_val_fraction", "knn_k",
    "knn_temperature", "compare_random_init", "test_subset",  # evaluation
    "eval_every", "monitor_patches", "monitor_bank", "monitor_test",  # monitoring
    "grad_checkpointing", "compile",  # speed: exact or numerically equivalent
    "online_stop", "online_timeout", "online_settle", "online_eval", "online_eval_every",  # following a stream
})


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run directory of a checkpoint path (a run directory stands for its own checkpoint.pt)."""
    path = Path(checkpoint)
    return path if path.is_dir() else path.parent


def _trained_config(ckpt: dict[str, Any], path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """The config of checkpoint ``ckpt`` (read from ``path``), updated by ``overrides``."""
    try:
        return Config.from_dict({**ckpt.get("config", {}), **(overrides or {})}).validate()
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} has an unusable config: {e}") from None


def _shown(d: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{k}={d.get(k)!r}" for k in keys)


def run_config(out_dir: str | Path, cfg: Config, explicit: dict[str, Any]) -> Config:
    """The config to use for ``out_dir``: ``cfg`` for a new run; for an existing run its checkpoint's config with
    the explicitly given settings of :data:`RESUMABLE_CHANGES` applied.

    The checkpoint's config is the run's truth and config.json its readable copy: a config.json that differs
    from it, or an explicit setting (a flag, --config, a preset) that differs from it outside
    :data:`RESUMABLE_CHANGES`, is a one-line ConfigError naming every such field. A config.json without a
    checkpoint is left by a start that never reached its first checkpoint: it binds nothing (and is rewritten
    with the first checkpoint), so a corrected command starts afresh.
    """
    out, path = Path(out_dir), Path(out_dir) / "checkpoint.pt"
    if not path.is_file():
        return cfg
    truth = _trained_config(read_checkpoint(path), path)
    t, copy = truth.to_dict(), out / "config.json"
    if copy.is_file():
        try:
            c = Config.from_dict(read_json(copy)["config"]).to_dict()
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
            raise ConfigError(f"{copy} is not an empssl config ({type(e).__name__}: {e}); delete it and it is "
                              f"rewritten from the checkpoint") from None
        edited = [k for k in {**c, **t} if k not in RESUMABLE_CHANGES and c.get(k) != t.get(k)]
        if edited:
            raise ConfigError(f"{copy} says {_shown(c, edited)} but the checkpoint was trained with "
                              f"{_shown(t, edited)}; the checkpoint is the run's truth: restore config.json or "
                              f"delete it (it is rewritten from the checkpoint)")
    # --epochs may change where --schedule-epochs fixes the schedule and the new stop lies within it: the run goes
    # on along the same schedule, so its weights are those of a run started with the new --epochs
    same_schedule = 0 < truth.schedule_epochs == cfg.schedule_epochs and cfg.epochs <= cfg.schedule_epochs
    may_change = RESUMABLE_CHANGES | {"epochs"} if same_schedule else RESUMABLE_CHANGES
    given = cfg.to_dict()
    changed = [k for k in explicit if k not in may_change and given.get(k) != t.get(k)]
    if changed:
        raise ConfigError(f"{out} holds a run with {_shown(t, changed)}, not {_shown(given, changed)}; drop "
                          f"{', '.join(flag(k) for k in changed)} to resume it or choose a new --out (only "
                          f"the settings listed in the README may change on resume)")
    return truth.replace(**{k: getattr(cfg, k) for k in explicit if k in may_change}).validate()


def write_config(out_dir: str | Path, cfg: Config) -> None:
    write_json(Path(out_dir) / "config.json", {"version": __version__, "config": cfg.to_dict()})


def finished(out_dir: str | Path, cfg: Config | None = None) -> bool:
    """True when ``out_dir`` holds a checkpoint trained to the end of its run, and of ``cfg.epochs`` if given (a
    resume may ask for more epochs within a fixed ``--schedule-epochs``: :func:`run_config`)."""
    p = Path(out_dir) / "checkpoint.pt"
    if not p.exists():
        return False
    ckpt = read_checkpoint(p)
    return bool(ckpt.get("finished", False)) and (cfg is None or ckpt.get("config", {}).get("epochs", 0) >= cfg.epochs)


def load_checkpoint(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[nn.Module, Config, dict]:
    """Rebuild the model a run (or its checkpoint file) trained, from its saved config updated by ``overrides``,
    and load its weights strictly. Returns (model on CPU, config, raw checkpoint dict)."""
    ckpt = read_checkpoint(path)
    cfg = _trained_config(ckpt, path, overrides)
    model = create_method(cfg).build_model()
    load_model_state(model, ckpt["model"], f"checkpoint {path} ({cfg.method}, {cfg.arch}, width {cfg.width}, "
                                           f"hidden {cfg.hidden_dim}, z {cfg.z_dim})")
    return model, cfg, ckpt


# --- one writer per run directory -------------------------------------------------------------------------


class RunLock(WriterLock):
    """One writer per run directory: ``RUN/.lock`` (:class:`empssl.files.WriterLock`), held while a process writes
    the run; a second one is refused in one line naming the first one's PID."""

    def __init__(self, out_dir: Path, log: Callable[[str], None]) -> None:
        super().__init__(out_dir / ".lock", lambda holder: f"{out_dir} is being written by {holder}; wait for it to "
                                                           f"finish or choose another --out", log)


def refuse_links(out_dir: Path) -> None:
    """OutputError (one line) if anything inside ``out_dir`` is a symbolic link. A run appends to its files
    (metrics.jsonl, monitor.jsonl, the loggers' folders) and appending follows a link: a run directory received by
    tar or rsync, which keep links, could make a run write anywhere. Atomic writes replace a link, never follow it,
    but one rule for the whole folder is simpler to trust than one per file. ``wandb/`` is left out: W&B makes
    links of its own there (latest-run, its debug logs) at every start."""
    for folder, dirs, files in os.walk(out_dir):
        if folder == str(out_dir):
            dirs[:] = [d for d in dirs if d != "wandb" or os.path.islink(os.path.join(folder, d))]
        for name in dirs + files:
            if os.path.islink(os.path.join(folder, name)):
                raise OutputError(f"{os.path.join(folder, name)} is a symbolic link; empssl writes only inside its "
                                  f"run directory and follows no link there: remove it and run again")


# --- a training session's bookkeeping ----------------------------------------------------------------------


def process_seconds() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere: since empssl.rundir was imported)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()
# perf_counter() at which the current run's account starts (the process's start, estimated, for its first run): the
# phases are timed by perf_counter too, where /proc's process age moves in clock ticks (10 ms)
_CLOCK_ORIGIN: float | None = None

# The phases of results.json's "timing", in their order ("total" follows them); the report uses the same list.
TIMING_FIELDS = ("startup", "data", "loggers", "compile", "train", "monitor", "features", "knn", "probe",
                 "random_init_eval")


def time_line(timing: dict[str, float]) -> str:
    """The run's last line: where the wall-clock time went, e.g.
    ``time: 58.1 s from process start = startup 2.1 + data 3.2 + train 23.3 + features 20.1 + ... (other 0.4)``."""
    parts = [(k, v) for k, v in timing.items() if k != "total"]
    other = timing["total"] - sum(v for _, v in parts)
    names = {"knn": "kNN", "random_init_eval": "random-init eval"}
    start = "process start" if "startup" in timing else "the start of this run"
    return (f"time: {timing['total']:.1f} s from {start} = "
            + " + ".join(f"{names.get(k, k)} {v:.1f}" for k, v in parts) + f" (other {other:.1f})")


# The bookkeeping keys of a metrics.jsonl line; its other keys are the method's loss terms (Method.terms).
METRICS_FIELDS = ("step", "epoch", "lr", "patches_per_s")


class MetricsLog:
    """The running loss terms (summed on the device, no host sync) and a metrics.jsonl line per log step, and the
    first step whose update was skipped (read at the steps that sync anyway). ``path`` None (ranks other than 0)
    writes nothing. A resumed run cuts the file back to ``start_step`` and starts the sums from ``state`` (saved
    with that checkpoint), so that every step has one line and each line averages an uninterrupted run's steps.
    """

    def __init__(self, path: Path | None, terms: tuple[str, ...], device: torch.device, *, start_step: int,
                 steps_per_epoch: int, views_per_step: int, bar: Any = None, tracker: Tracking = NO_TRACKING,
                 state: dict[str, Any] | None = None) -> None:
        if path is not None:
            cut_jsonl(path, start_step)
        self.terms, self.steps_per_epoch, self.views_per_step, self.bar = terms, steps_per_epoch, views_per_step, bar
        self.tracker = tracker  # the --log trackers, given every line as it is written
        self.file: IO[str] = open(path if path is not None else os.devnull, "a")  # noqa: SIM115 (closed in close())
        self.sums = torch.zeros(len(terms), device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step whose update was skipped
        self.n, self.t_last = 0, time.perf_counter()
        self.timed = 0  # steps since t_last (a resumed run's restored steps were timed by the session before)
        if state is not None and tuple(state["sums"].shape) == (len(terms),):
            self.sums.copy_(state["sums"])
            self.n = int(state["n"])

    def state(self) -> dict[str, Any]:
        """The running sums since the last line (a checkpoint keeps them: see the class)."""
        return {"sums": self.sums.detach().cpu().clone(), "n": self.n}

    def add(self, values: torch.Tensor, applied: torch.Tensor, step: int) -> None:
        """Add step ``step``'s (T,) loss terms; ``applied`` (0-d bool) says whether its update was applied."""
        self.sums += values
        self.first_bad = torch.where(applied | (self.first_bad >= 0), self.first_bad, step)
        self.n += 1
        self.timed += 1

    def non_finite_step(self, step: int) -> int | None:
        """The first step whose loss or gradient was non-finite (``step`` if only the sums show it), or None."""
        bad = int(self.first_bad)
        if bad >= 0:
            return bad
        return None if bool(torch.isfinite(self.sums).all()) else step

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (e.g. monitoring) out of the throughput."""
        self.t_last += seconds

    def write(self, step: int, lr: float) -> None:
        """Append the mean terms since the last line, the lr and the throughput; reset the sums."""
        dt = time.perf_counter() - self.t_last
        rec = {"step": step, **({"epoch": round(step / self.steps_per_epoch, 4)} if self.steps_per_epoch else {}),
               **dict(zip(self.terms, (self.sums / self.n).tolist())), "lr": lr,
               "patches_per_s": self.timed * self.views_per_step / max(dt, 1e-9)}
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        self.tracker.log_scalars(rec, step=step, wall_time=time.time(), prefix="train/")
        if self.bar is not None:
            self.bar.set_postfix({k: f"{rec[k]:.3g}" for k in self.terms[:3]}
                                 | {"views/s": f"{rec['patches_per_s']:.0f}"})
        self.sums.zero_()
        self.n, self.timed, self.t_last = 0, 0, time.perf_counter()

    def close(self) -> None:
        self.file.close()


class StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the current step and save, instead of dying mid-update."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
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


# --- a run's life in its directory --------------------------------------------------------------------------

class RunSession:
    """One run's life in its directory: a ``with`` block around the whole run (``stop``: its Ctrl-C flag).

    Nothing binds the directory before the first checkpoint (config.json comes with it); leaving the block by an
    error or Ctrl-C before one removes a directory this session created, and a bare Ctrl-C outside the loop is
    reworded by what the directory keeps. The wall-clock account (:data:`TIMING_FIELDS`) starts at process start
    for a process's first run (``startup``) and at the block's start for later ones, so that runs do not count each
    other's time; its "train" and "monitor" phases are this session's share of the run's clock (:meth:`clock`),
    which checkpoints keep. ``trains=False`` (``empssl eval``, a comparison's folder) neither removes nor rewords.
    """

    def __init__(self, out: Path, log: Callable[[str], None], *, main: bool = True, trains: bool = True) -> None:
        self.out, self.log, self.main, self.trains = Path(out), log, main, trains  # main: rank 0, the one that writes
        self.parts: dict[str, float] = {}  # seconds per phase
        self.origin = 0.0  # perf_counter() at the account's start
        self.before: dict[str, float] = {}  # the run's clock as a resume finds it (its checkpoint's "clock")
        self.started: float | None = None  # perf_counter() when this session's training began (Monitor.start)
        self.stop = StopFlag()
        self.tracker: Tracking = NO_TRACKING
        self.created = self.config_written = False
        self._held = ExitStack()

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def __enter__(self) -> RunSession:
        global _CLOCK_ORIGIN
        now = time.perf_counter()
        if _CLOCK_ORIGIN is None:
            self.parts["startup"] = process_seconds()
            _CLOCK_ORIGIN = now - self.parts["startup"]
        else:
            _CLOCK_ORIGIN = now
        self.origin = _CLOCK_ORIGIN
        return self

    def open(self) -> None:
        """Create the run directory (rank 0), lock it and remove the temporary files (``.NAME.*.tmp``,
        :func:`empssl.files.write_atomic`) of a killed process."""
        if not self.main:
            return
        self.created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        self._held.enter_context(RunLock(self.out, self.log))
        refuse_links(self.out)  # (the lock is released by __exit__)
        orphans = sorted(self.out.glob(".*.tmp"))  # no writer uses them: the lock is held
        for p in orphans:
            p.unlink(missing_ok=True)
        if orphans:
            self.log(f"removed {len(orphans)} temporary file(s) that an interrupted process left in {self.out} "
                     f"(e.g. {orphans[0].name})")

    def add(self, phase: str, seconds: float) -> None:
        self.parts[phase] = self.parts.get(phase, 0.0) + seconds

    def open_tracking(self, cfg: Config, step: int) -> None:
        """The --log trackers (TensorBoard, W&B, MLflow), from ``step``; their start-up is the "loggers" phase."""
        t0 = time.perf_counter()
        self.tracker = open_tracking(cfg.log, self.out, cfg.to_dict(), start_step=step, enabled=self.main)
        if self.tracker.trackers:
            self.add("loggers", time.perf_counter() - t0)

    def save(self, ckpt: dict[str, Any], cfg: Config) -> None:
        """Write ``ckpt`` atomically (rank 0); config.json, its readable copy, follows this session's first one."""
        if not self.main:
            return
        save_atomic(ckpt, self.ckpt_path)
        if not self.config_written:
            write_config(self.out, cfg)
            self.config_written = True

    def clock(self) -> dict[str, float]:
        """The run's wall time so far, going on across resumes from :attr:`before`: ``train_seconds`` (all but the
        monitor's checks, which :meth:`add` their seconds as "monitor"), ``monitor_seconds``, ``elapsed_seconds``."""
        now = 0.0 if self.started is None else time.perf_counter() - self.started
        monitor = self.parts.get("monitor", 0.0)
        train = self.before.get("train_seconds", 0.0) + now - monitor
        monitor += self.before.get("monitor_seconds", 0.0)
        return {"train_seconds": train, "monitor_seconds": monitor, "elapsed_seconds": train + monitor}

    def trained(self, compile_seconds: float, waited: float) -> dict[str, float]:
        """The run's clock at the end of training; this session's training time is the "compile" phase and the
        "train" one (less the seconds a source ``waited`` for data, left in "other")."""
        clock = self.clock()
        self.add("compile", compile_seconds)
        self.add("train", clock["train_seconds"] - self.before.get("train_seconds", 0.0) - compile_seconds - waited)
        return clock

    def evaluated(self, results: dict[str, Any]) -> None:
        """The phases of an evaluation's ``results`` (:func:`empssl.evaluate.evaluate`)."""
        for key, name in (("features", "feature_seconds"), ("knn", "knn_seconds"), ("probe", "probe_seconds")):
            self.add(key, results[name])

    def finish(self, results: dict[str, Any], step: int, *, write: bool = True,
               path: Path | None = None) -> dict[str, Any]:
        """``results`` with the timing (the phases that took time, in :data:`TIMING_FIELDS` order, and ``total``:
        seconds from the account's start to now), written to ``path`` (default: results.json) when ``write`` (and
        rank 0), given to the trackers; the run's last line says where the time went."""
        results["timing"] = {k: round(self.parts[k], 3) for k in TIMING_FIELDS if self.parts.get(k)}
        results["timing"]["total"] = round(time.perf_counter() - self.origin, 3)
        if write and self.main:
            path = path or self.out / "results.json"
            write_json(path, results)
            self.log(f"results written to {path}")
            self.log(time_line(results["timing"]))
        self.tracker.log_results(results, step=step)
        self.tracker.close()
        return results

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        self._held.close()
        if kind is None or not self.trains:
            return
        if self.created and not self.ckpt_path.exists():  # nothing learned: nothing left behind
            shutil.rmtree(self.out, ignore_errors=True)
        if kind is KeyboardInterrupt and not str(error):  # one outside the loop, which saves and says so itself
            if self.ckpt_path.is_file():
                raise KeyboardInterrupt(f"interrupted; the checkpoint in {self.out} is kept: run the same command "
                                        f"to go on") from None
            raise KeyboardInterrupt("interrupted before the first checkpoint; nothing was kept, run the command "
                                    "again to start") from None
