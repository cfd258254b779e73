"""The paper's time-to-accuracy comparison in one call: every method trained for the same wall-clock budget on
the same data and device, monitored with kNN on the way, evaluated with its own protocol, and reported.

For each method, in ``out/<method>/``: 1. **calibrate** (once; kept in ``out/plan.json``) its training throughput
on this device in short eager runs (:func:`calibrate`); 2. **size** the schedule to end at the budget:
``epochs = budget * steps_per_second / steps_per_epoch``; 3. **train** it with the kNN monitor on and evaluate it.
Then ``out/report.md`` compares them and ``out/compare.json`` holds the plan and the results. Resumable: a finished
run is read back; an interrupted one resumes with the same plan.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, load_preset, method_recipe, settings_for
from .data import ImageData
from .files import read_jsonl, write_json
from .methods import create_method, method_class
from .report import median_throughput, write_report
from .rundir import RunSession
from .train import config_data, train, train_once

CALIBRATION_FRACTION = 0.1  # of the budget, at most, spent calibrating a method (wall time, set-up included)
PROBE_STEPS = 3  # the first calibration run: one warm-up step (cudnn autotuning...) and two timed ones
CALIBRATION_STEPS = 30  # the most steps of the second, longer run, timed in three lines (the first left out)
MONITOR_POINTS = 20  # kNN evaluations per run
_warm = False  # whether this process has run training steps (see calibrate)
MAX_WARMUP_FRACTION = 0.1  # of the sized schedule

# The toy size of `empssl compare --smoke` (CPU, bundled data, seconds per method), and the settings under any
# method's recipe that make each run that small. A lower lr than the recipes': their lr diverges on a network this
# small (VICReg's covariance term blew up to NaN within 6 steps at lr 0.3, width 4; at lr 0.05 VICReg collapsed or
# went non-finite after 300-400 steps in some schedules of 700-1200 steps, as the budget sizes them on a CPU; at
# 0.03 no schedule of 200-3000 steps did, nor did the other methods' runs at 40 and 80 steps/s).
SMOKE = {"data": "demo", "device": "cpu", "train_subset": 512, "test_subset": 200, "width": 4, "hidden_dim": 64,
         "lr": 0.03, "z_dim": 32, "pred_hidden_dim": 64, "patch_size": 16, "num_patches": 4, "batch_size": 32,
         "test_patches": 2, "probe_epochs": 3, "monitor_patches": 2, "monitor_bank": 256, "monitor_test": 100,
         "log_every": 5, "checkpoint_every": 100}
SMOKE_BUDGET_SECONDS = 20.0  # each calibration may take 2 s (10 %): a run's set-up alone is ~0.5 s here


def method_config(method: str, overrides: dict[str, Any], recipes: str | None = None) -> Config:
    """The method's own recipe, or the preset ``{recipes}-{method}`` (``compare-demo-simclr``), with the
    ``overrides`` that apply to it on top (a method's own settings; ``--patch-chunks`` for a chunked method)."""
    recipe = load_preset(f"{recipes}-{method}") if recipes else method_recipe(method)
    given = settings_for(method, overrides)
    if not method_class(method).chunked:
        given.pop("patch_chunks", None)
    return Config.from_dict({**recipe, **given, "method": method}).validate()


def _throughput(cfg: Config, data: tuple[ImageData, ImageData], steps: int, log_every: int,
                clock: Callable[[], float]) -> tuple[float, float]:
    """(median views per second over the logged lines but the first, wall seconds of the whole call by ``clock``)
    of a throw-away eager run of ``steps`` steps of ``cfg`` without monitor or evaluation."""
    steps_per_epoch = len(data[0]) // cfg.batch_size
    t0 = clock()
    with tempfile.TemporaryDirectory(prefix="empssl-calibrate-") as tmp:
        probe = cfg.replace(epochs=steps / steps_per_epoch, schedule_epochs=0, warmup_epochs=0, eval_every=0,
                            log_every=log_every, checkpoint_every=10**9, compile="off")
        train(probe, Path(tmp) / "run", progress=False, log=lambda s: None, data=data, evaluate_at_end=False)
        rate = median_throughput(read_jsonl(Path(tmp) / "run" / "metrics.jsonl"))
    assert rate is not None, "a training run logs its throughput"
    return rate, clock() - t0


def calibrate(cfg: Config, data: tuple[ImageData, ImageData], max_seconds: float, log: Callable[[str], Any],
              clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Training steps per second of ``cfg`` on its device, measured in at most about ``max_seconds`` of wall time
    (by ``clock``): a run of PROBE_STEPS steps, then, if the rest holds at least 10 more steps, a run of up to
    CALIBRATION_STEPS steps whose rate replaces the probe's. Returns {"steps_per_s", "seconds", "steps",
    "process_warm_up_seconds"}; ConfigError when the probe alone takes longer than ``max_seconds``."""
    if len(data[0]) < cfg.batch_size:  # not one step per epoch
        raise ConfigError(f"--batch-size {cfg.batch_size} exceeds the {len(data[0])} training images")
    views_per_step = cfg.batch_size * create_method(cfg).views_per_image
    global _warm
    warm_up = 0.0
    if not _warm:  # a process's first steps pay one-time costs (lazy init, seconds on a CPU): not this method's
        warm_up = _throughput(cfg, data, 1, log_every=1, clock=clock)[1]
        _warm = True
    rate, spent = _throughput(cfg, data, PROBE_STEPS, log_every=1, clock=clock)
    steps = PROBE_STEPS
    if spent > max_seconds:
        need = math.ceil(spent / CALIBRATION_FRACTION)
        raise ConfigError(f"{cfg.method}: the budget cannot fit one calibration: {PROBE_STEPS} steps took "
                          f"{spent:.1f} s, more than the {max_seconds:.1f} s ({CALIBRATION_FRACTION:.0%} of the "
                          f"budget) a calibration may take; give --budget-seconds >= {need} or a smaller model or "
                          f"batch (--width, --num-patches, --batch-size ...)")
    step_s = views_per_step / rate
    set_up = max(0.0, spent - PROBE_STEPS * step_s)  # the part of a run's wall time that is not steps
    more = min(CALIBRATION_STEPS, int((max_seconds - spent - set_up) / step_s))
    if more >= 10:
        rate, seconds = _throughput(cfg, data, more, log_every=max(1, more // 3), clock=clock)
        spent, steps = spent + seconds, steps + more
    steps_per_s = rate / views_per_step
    log(f"{cfg.method}: {rate:,.0f} views/s = {steps_per_s:.2f} steps/s of batch {cfg.batch_size} "
        f"(calibrated in {spent:.1f} s, {steps} steps)")
    return {"steps_per_s": steps_per_s, "seconds": round(spent, 2), "steps": steps,
            "process_warm_up_seconds": round(warm_up, 2)}


def plan_run(cfg: Config, steps_per_s: float, budget_seconds: float, n_train: int) -> Config:
    """``cfg`` with its schedule sized to end at the budget, and the monitor set to ~MONITOR_POINTS points."""
    steps_per_epoch = n_train // cfg.batch_size
    steps = max(1, round(budget_seconds * steps_per_s))
    epochs = steps / steps_per_epoch
    return cfg.replace(epochs=epochs, schedule_epochs=0,
                       warmup_epochs=min(cfg.warmup_epochs, MAX_WARMUP_FRACTION * epochs),
                       eval_every=max(1, steps // MONITOR_POINTS), compile="off" if cfg.compile == "auto" else
                       cfg.compile)


def compare(methods: Sequence[str], out_dir: str | Path, budget_seconds: float, overrides: dict[str, Any], *,
            recipes: str | None = None, targets: Sequence[float] = (), progress: bool = True,
            log: Callable[[str], Any] = print, clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Train every method of ``methods`` for ``budget_seconds`` of training wall time (``overrides`` applied alike
    on top of each one's recipe, :func:`method_config`), evaluate each with its own protocol, and write
    ``out_dir/report.md`` and ``out_dir/compare.json``. Returns compare.json. ``clock``: :func:`calibrate`'s."""
    if not methods:
        raise ConfigError("--methods must name at least one method")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods names a method twice: {','.join(methods)}")
    if not budget_seconds > 0:
        raise ConfigError(f"--budget-seconds must be > 0, got {budget_seconds}")
    cfgs = {m: method_config(m, overrides, recipes) for m in methods}  # every recipe checked before anything runs
    first = cfgs[methods[0]]
    data = config_data(first, progress)  # loaded once: every method trains on the same images
    out = Path(out_dir)
    # the comparison's folder is locked for its plan.json and compare.json, as each run's directory is for its own
    with RunSession(out, log, trains=False) as session:
        session.open()
        plan_path = out / "plan.json"
        plan: dict[str, Any] = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
        if plan and plan.get("budget_seconds") != budget_seconds:
            raise ConfigError(f"{out} holds a comparison with a budget of {plan['budget_seconds']} s, not "
                              f"{budget_seconds} s; choose a new --out")
        plan.update(budget_seconds=budget_seconds, calibration_max_fraction=CALIBRATION_FRACTION, recipes=recipes)
        plan.setdefault("methods", {})
        for m in methods:  # every method calibrated before any trains: a budget too small is refused up front
            if m not in plan["methods"]:
                log(f"{m}: calibrating on {len(data[0])} images")
                calibration = calibrate(cfgs[m], data, CALIBRATION_FRACTION * budget_seconds, log, clock)
                calibration["fraction_of_budget"] = round(calibration["seconds"] / budget_seconds, 4)
                plan["methods"][m] = {"steps_per_s": calibration.pop("steps_per_s"), "calibration": calibration}
                write_json(plan_path, plan)
        rows = []
        for m in methods:
            run = out / m
            cfg = plan_run(cfgs[m], plan["methods"][m]["steps_per_s"], budget_seconds, len(data[0]))
            plan["methods"][m].update(epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs)
            write_json(plan_path, plan)
            results = train_once(cfg, run, name=f"{m} (budget {budget_seconds:g} s)", progress=progress, log=log,
                                 data=data)
            kept = ("train_seconds", "linear_top1", "knn_top1", "eval_view", "feature", "test_patches", "device")
            rows.append({"method": m, "run": m, "epochs": cfg.epochs, **{k: results.get(k) for k in kept}})
        summary = {"experiment": "time-to-accuracy comparison", "budget_seconds": budget_seconds,
                   "data": first.data, "plan": plan, "rows": rows}
        write_json(out / "compare.json", summary)
        report = write_report([out / m for m in methods], out, targets=targets)
        log(f"report written to {report}")
        return summary

