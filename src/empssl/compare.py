"""The paper's time-to-accuracy comparison in one call: every method trained for the same wall-clock budget on
the same data and device, monitored with kNN on the way, evaluated with its own protocol, and reported.

For each method, in ``out/<method>/``:

1. **calibrate** (once; the plan is kept in ``out/plan.json``): a short eager run of the method's recipe
   (``CALIBRATION_STEPS`` steps) measures its training throughput on this device;
2. **size** the schedule so that it ends at the budget: ``epochs = budget * steps_per_second / steps_per_epoch``
   (the cosine schedule spans exactly those epochs; a recipe's warm-up is shortened to at most a tenth of them);
3. **train** it with the kNN monitor on (about ``MONITOR_POINTS`` points per run) and evaluate it.

Then ``out/report.md`` holds the time-to-accuracy table and the plots (:func:`empssl.report.write_report`), and
``out/compare.json`` the plan and the results. Everything is resumable: a method whose run is finished and
evaluated is read back; an interrupted one resumes from its checkpoint with the same plan.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, method_recipe, settings_for
from .data import ImageData
from .files import read_jsonl, write_json
from .report import write_report
from .rundir import run_config
from .train import config_data, train, train_once

CALIBRATION_STEPS = 30  # timed in lines of 10 steps; the first line (warm-up, cudnn autotuning) is left out
MONITOR_POINTS = 20  # kNN evaluations per run
MAX_WARMUP_FRACTION = 0.1  # of the sized schedule

# The toy size of `empssl compare --smoke` (CPU, bundled data, seconds per method), and the settings under any
# method's recipe that make each run that small. A lower lr than the recipes': their lr diverges on a network this
# small (VICReg's covariance term blew up to NaN within 6 steps at lr 0.3, width 4).
SMOKE = {"data": "demo", "device": "cpu", "train_subset": 512, "test_subset": 200, "width": 4, "hidden_dim": 64,
         "lr": 0.05,
         "z_dim": 32, "pred_hidden_dim": 64, "patch_size": 16, "num_patches": 4, "batch_size": 32,
         "test_patches": 2, "probe_epochs": 3, "monitor_patches": 2, "monitor_bank": 256, "monitor_test": 100,
         "log_every": 5, "checkpoint_every": 100}
SMOKE_BUDGET_SECONDS = 6.0


def method_config(method: str, overrides: dict[str, Any]) -> Config:
    """The method's own recipe (its preset, or the defaults for EMP-SSL) with ``overrides`` on top."""
    return Config.from_dict({**method_recipe(method), **settings_for(method, overrides), "method": method}).validate()


def calibrate(cfg: Config, data: tuple[ImageData, ImageData], log: Callable[[str], Any]) -> float:
    """Training steps per second of ``cfg`` on its device, from a short throw-away run (eager, no monitor)."""
    steps_per_epoch = len(data[0]) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"--batch-size {cfg.batch_size} exceeds the {len(data[0])} training images")
    steps = min(CALIBRATION_STEPS, 3 * steps_per_epoch)
    with tempfile.TemporaryDirectory(prefix="empssl-calibrate-") as tmp:
        probe = cfg.replace(epochs=steps / steps_per_epoch, schedule_epochs=0, warmup_epochs=0, eval_every=0,
                            log_every=max(1, steps // 3), checkpoint_every=10**9, compile="off")
        train(probe, Path(tmp) / "run", progress=False, log=lambda s: None, data=data, evaluate_at_end=False)
        rates = [r["patches_per_s"] for r in read_jsonl(Path(tmp) / "run" / "metrics.jsonl")]
    rate = statistics.median(rates[1:] if len(rates) > 1 else rates)  # views per second
    from .methods import create_method

    views_per_step = cfg.batch_size * create_method(cfg).views_per_image
    steps_per_s = rate / views_per_step
    log(f"{cfg.method}: {rate:,.0f} views/s = {steps_per_s:.2f} steps/s of batch {cfg.batch_size}")
    return steps_per_s


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
            targets: Sequence[float] = (), progress: bool = True,
            log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Train every method of ``methods`` for ``budget_seconds`` of training wall time on the same data and device
    (``overrides``: data, device, evaluation settings... applied on top of each method's recipe), evaluate each
    with its own protocol, and write ``out_dir/report.md`` and ``out_dir/compare.json``. Returns compare.json."""
    if not methods:
        raise ConfigError("--methods must name at least one method")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods names a method twice: {','.join(methods)}")
    if not budget_seconds > 0:
        raise ConfigError(f"--budget-seconds must be > 0, got {budget_seconds}")
    cfgs = {m: method_config(m, overrides) for m in methods}  # every recipe checked before anything runs
    first = cfgs[methods[0]]
    data = config_data(first, progress)  # loaded once: every method trains on the same images
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "plan.json"
    plan: dict[str, Any] = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
    if plan and plan.get("budget_seconds") != budget_seconds:
        raise ConfigError(f"{out} holds a comparison with a budget of {plan['budget_seconds']} s, not "
                          f"{budget_seconds} s; choose a new --out")
    plan["budget_seconds"] = budget_seconds
    plan.setdefault("methods", {})
    rows = []
    for m in methods:
        run = out / m
        if m not in plan["methods"]:
            log(f"{m}: calibrating on {len(data[0])} images")
            plan["methods"][m] = {"steps_per_s": calibrate(cfgs[m], data, log)}
            write_json(plan_path, plan)
        cfg = plan_run(cfgs[m], plan["methods"][m]["steps_per_s"], budget_seconds, len(data[0]))
        cfg = run_config(run, cfg, cfg.to_dict())  # a resumed run keeps its own plan
        plan["methods"][m].update(epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs)
        write_json(plan_path, plan)
        results = train_once(cfg, run, name=f"{m} (budget {budget_seconds:g} s)", progress=progress, log=log,
                             data=data)
        rows.append({"method": m, "run": m, "epochs": cfg.epochs, "train_seconds": results.get("train_seconds"),
                     "linear_top1": results.get("linear_top1"), "knn_top1": results.get("knn_top1"),
                     "eval_view": results.get("eval_view"), "feature": results.get("feature"),
                     "test_patches": results.get("test_patches"), "device": results.get("device")})
    summary = {"experiment": "time-to-accuracy comparison", "budget_seconds": budget_seconds,
               "data": first.data, "plan": plan, "rows": rows}
    write_json(out / "compare.json", summary)
    report = write_report([out / m for m in methods], out, targets=targets)
    log(f"report written to {report}")
    return summary

