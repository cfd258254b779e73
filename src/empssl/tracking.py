"""Runs in the tools people watch them with: TensorBoard, Weights & Biases and MLflow (``--log``).

``--log`` streams the scalars of metrics.jsonl and monitor.jsonl, the resolved config and the results through each
project's own client library (an extra), from rank 0 only. Where each writes, and how a resumed run continues the
same runs (ids in ``RUN/trackers.json``): README.md, "Watching a run".
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import math
import os
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import logger_names
from .errors import ConfigError
from .files import read_json, write_json
from .version import __version__

IDS_FILE = "trackers.json"


class TrackingError(ConfigError):
    """A logger that cannot start (its extra is not installed, its server refuses the run): reported in one line."""


def scalars(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """The numeric leaves of ``record`` as (``prefix`` + slash-joined key, value); ``step`` (the x axis), booleans
    and text are left out. ``{"timing": {"total": 3.0}}`` -> ``("timing/total", 3.0)``."""
    for key, value in _flat(record, prefix).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key.rpartition("/")[2] != "step":
            yield key, value


class Tracker(ABC):
    """One logging backend. ``open`` once, ``log_scalars`` any number of times, ``log_results`` at the end, then
    ``close``. The backend's package is imported inside ``open``, so empssl runs without it."""

    name: str  # as given to --log
    package: str  # the module that must be importable

    @abstractmethod
    def open(self, run_dir: Path, config: dict[str, Any], start_step: int, saved: dict[str, Any]) -> dict[str, Any]:
        """Start (``saved`` empty) or continue (``saved``: what an earlier ``open`` returned) the run of ``run_dir``
        at ``start_step``; record ``config``. Returns what a resumed session needs (ids)."""

    @abstractmethod
    def log_scalars(self, values: dict[str, float], step: int, wall_time: float) -> None:
        """``values``: tag -> number at ``step``, measured at ``wall_time`` (seconds since the epoch)."""

    @abstractmethod
    def log_results(self, results: dict[str, Any], step: int) -> None:
        """The final results (nested JSON), as scalars and as a document."""

    @abstractmethod
    def close(self, ok: bool) -> None:
        """Flush and end the run; ``ok`` False marks it as failed."""


class TensorBoardTracker(Tracker):
    name, package = "tensorboard", "tensorboard"

    def open(self, run_dir: Path, config: dict[str, Any], start_step: int, saved: dict[str, Any]) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter

        # A resumed session writes a new event file into the same directory; purge_step drops the events (of any
        # file) at and after it: what the previous session logged after the checkpoint it resumes from.
        purge = (start_step + 1 if start_step else 0) if saved else None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)
        self.writer.add_text("config", _markdown_json(config), global_step=start_step)
        return {"log_dir": "tensorboard"}

    def log_scalars(self, values: dict[str, float], step: int, wall_time: float) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step, walltime=wall_time)

    def log_results(self, results: dict[str, Any], step: int) -> None:
        self.log_scalars(dict(scalars(results, "results/")), step, time.time())
        self.writer.add_text("results", _markdown_json(results), global_step=step)

    def close(self, ok: bool) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    name, package = "wandb", "wandb"

    def open(self, run_dir: Path, config: dict[str, Any], start_step: int, saved: dict[str, Any]) -> dict[str, Any]:
        import wandb

        # Offline unless logged in: a run never blocks on a login prompt or a network it does not have.
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb.login(verify=False, prompt=False) else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "empssl"), name=run_dir.resolve().name,
                              dir=str(run_dir), id=saved.get("id"), resume="allow", config=config,
                              allow_val_change=True, mode=mode,  # type: ignore[arg-type]
                              reinit="create_new")
        # Charts against the training step, which a resumed session may repeat (W&B's own step may not go back).
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        return {"id": self.run.id, "project": self.run.project, "mode": mode}

    def log_scalars(self, values: dict[str, float], step: int, wall_time: float) -> None:
        self.run.log({"step": step, **values})

    def log_results(self, results: dict[str, Any], step: int) -> None:
        self.run.summary["results"] = results  # the runs table shows results.linear_top1 ...

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class MlflowTracker(Tracker):
    name, package = "mlflow", "mlflow"

    def open(self, run_dir: Path, config: dict[str, Any], start_step: int, saved: dict[str, Any]) -> dict[str, Any]:
        import mlflow
        from mlflow.entities import Param

        # The client API, not mlflow's global active run: a notebook's own run is left alone.
        uri = saved.get("tracking_uri") or mlflow.get_tracking_uri()
        self.client = mlflow.MlflowClient(uri)
        if saved.get("run_id"):
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            logged = self.client.get_run(self.run_id).data.params
        else:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "empssl")
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run = self.client.create_run(experiment_id, run_name=run_dir.resolve().name,
                                         tags={"empssl.run_dir": str(run_dir.resolve())})
            self.run_id, logged = run.info.run_id, {}
        # MLflow refuses to change a parameter: a resumed session adds the new ones; config.json has them all.
        params = [Param(k, str(v)[:6000]) for k, v in _flat(config).items() if k not in logged]
        self.client.log_batch(self.run_id, params=params)
        self.client.log_dict(self.run_id, config, "config.json")
        return {"run_id": self.run_id, "tracking_uri": uri}

    def log_scalars(self, values: dict[str, float], step: int, wall_time: float) -> None:
        from mlflow.entities import Metric

        ms = int(wall_time * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v in values.items()])

    def log_results(self, results: dict[str, Any], step: int) -> None:
        self.log_scalars(dict(scalars(results, "results/")), step, time.time())
        self.client.log_dict(self.run_id, results, "results.json")

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


TRACKERS: dict[str, type[Tracker]] = {t.name: t for t in (TensorBoardTracker, WandbTracker, MlflowTracker)}


def require_trackers(log: str) -> None:
    """Raise TrackingError (one line, with the pip command) when a logger chosen in ``log`` is not installed; cheap
    (nothing is imported), so a run checks it before it loads data."""
    missing = [n for n in logger_names(log) if importlib.util.find_spec(TRACKERS[n].package) is None]
    if missing:
        raise TrackingError(f"--log {','.join(missing)} needs {', '.join(TRACKERS[n].package for n in missing)}: "
                            f"pip install 'empssl[{','.join(missing)}]'")


class Tracking:
    """The fan-out over the chosen trackers that the training loop calls (a no-op when none is chosen). A tracker
    that fails mid-run is reported in one line and dropped (the JSONL files have everything); if the process exits
    without :meth:`close` (an error, Ctrl-C), the runs are ended as failed."""

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.trackers = list(trackers)
        if self.trackers:
            atexit.register(self.close, False)

    def log_scalars(self, record: Mapping[str, Any], *, step: int, wall_time: float, prefix: str = "") -> None:
        """The numeric fields of a metrics.jsonl / monitor.jsonl record at ``step``, as ``prefix`` + name."""
        self._each("log_scalars", dict(scalars(record, prefix)), step, wall_time)

    def log_results(self, results: Mapping[str, Any], *, step: int) -> None:
        self._each("log_results", _jsonable(results), step)

    def close(self, ok: bool = True) -> None:
        self._each("close", ok)
        self.trackers = []
        atexit.unregister(self.close)

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # a logger's failure must not cost the run
                self.trackers.remove(tracker)
                print(f"empssl: --log {tracker.name} failed and is off for the rest of the run "
                      f"({type(e).__name__}: {_first_line(e)})", file=sys.stderr)


NO_TRACKING = Tracking()


def open_tracking(log: str, run_dir: str | Path, config: dict[str, Any], *, start_step: int = 0,
                  enabled: bool = True) -> Tracking:
    """Open the loggers chosen in ``log`` (``--log``) for ``run_dir`` at ``start_step``, continuing the runs whose
    ids ``run_dir/trackers.json`` holds. ``enabled`` False (ranks other than 0) or no logger: :data:`NO_TRACKING`.
    TrackingError (one line) when a logger is not installed or cannot start its run.
    """
    names = logger_names(log)
    if not enabled or not names:
        return NO_TRACKING
    require_trackers(log)
    run_dir = Path(run_dir)
    ids = _saved_ids(run_dir / IDS_FILE)
    document = _jsonable({"empssl_version": __version__, **config})
    opened: list[Tracker] = []
    for name in names:
        tracker = TRACKERS[name]()
        try:
            ids[name] = tracker.open(run_dir, document, start_step, ids.get(name, {}))
        except Exception as e:
            for t in opened:
                t.close(ok=False)
            raise TrackingError(f"--log {name}: cannot start the run ({type(e).__name__}: {_first_line(e)})") from None
        opened.append(tracker)
        write_json(run_dir / IDS_FILE, ids)  # at once: a session killed later still resumes the same runs
    return Tracking(opened)


def _saved_ids(path: Path) -> dict[str, Any]:
    """What the trackers of an earlier session saved in ``path`` (``RUN/trackers.json``: name -> ids), {} without
    it. A damaged one is a TrackingError (one line): which runs to continue is the user's choice, not a guess."""
    if not os.path.lexists(path):
        return {}
    try:
        ids = read_json(path)
        why = "not an object of each logger's ids"
    except (OSError, ValueError) as e:  # a folder, unreadable, not JSON, not UTF-8
        ids, why = None, getattr(e, "strerror", None) or str(e)
    if isinstance(ids, dict) and all(isinstance(v, dict) for v in ids.values()):
        return ids
    raise TrackingError(f"{path} cannot be read as the loggers' run ids ({why}); restore it, or delete it and the "
                        f"loggers start new runs")


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> one level with slash-joined keys (MLflow parameters, :func:`scalars`)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _jsonable(obj: Any) -> Any:
    """``obj`` with tuples as lists and non-finite floats as None (strict JSON for every backend)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _markdown_json(obj: Any) -> str:
    """TensorBoard's text plugin renders Markdown: indent four spaces for a code block."""
    return "\n".join("    " + line for line in json.dumps(obj, indent=2).splitlines())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no message"
