"""Reading run directories for the report: what each run left behind, with a note for every missing file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import files
from ..files import read_jsonl
from ..rundir import METRICS_FIELDS


class ReportError(RuntimeError):
    """A report cannot be made (no run directory, matplotlib missing ...): reported in one line."""


@dataclass
class Run:
    """What one run directory holds (absent files are empty)."""

    path: Path
    label: str = ""
    legend: str = ""  # the name of its lines in plots: the label, with the method when runs differ in it
    config: dict[str, Any] = field(default_factory=dict)
    version: str | None = None
    results: dict[str, Any] = field(default_factory=dict)
    extra_results: dict[str, dict[str, Any]] = field(default_factory=dict)  # results-*.json by file name
    metrics: list[dict[str, Any]] = field(default_factory=list)
    monitor: list[dict[str, Any]] = field(default_factory=list)
    test_patch_ablation: dict[str, Any] | None = None
    tsne: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        """The training method (from config.json, else results.json; "-" when neither is there)."""
        return self.config.get("method") or self.results.get("method") or "-"


def read_json(path: Path, notes: list[str]) -> dict[str, Any] | None:
    """The JSON object in ``path``; None, with a note, for a missing file (or a FIFO, which would block), a file that
    cannot be read or one that holds no object."""
    if not path.is_file():
        notes.append(f"no {path.name} in {path.parent}")
        return None
    try:
        data = files.read_json(path)
    except (OSError, ValueError) as e:
        notes.append(f"{path} could not be read ({type(e).__name__}); skipped")
        return None
    if not isinstance(data, dict):
        notes.append(f"{path} holds no JSON object; skipped")
        return None
    return data


def is_run(path: Path) -> bool:
    """True when ``path`` holds files of an empssl run: a config.json, results.json or metrics.jsonl with the keys
    empssl writes (another program's results.json is not a run)."""
    config = read_json(path / "config.json", [])
    if config and isinstance(config.get("config"), dict) and "method" in config["config"]:
        return True
    results = read_json(path / "results.json", [])
    if results and "method" in results and ("linear_top1" in results or "steps" in results):
        return True
    metrics = read_jsonl(path / "metrics.jsonl") if (path / "metrics.jsonl").is_file() else []
    return any({"step", "loss", "lr"} <= set(r) for r in metrics[:1])


def read_run(path: Path) -> Run:
    """Everything :func:`write_report` uses from one run directory; missing files become notes."""
    run = Run(Path(path), label=Path(path).name)
    saved = read_json(run.path / "config.json", run.notes) or {}
    config = saved.get("config")
    run.config, run.version = config if isinstance(config, dict) else {}, saved.get("version")
    run.results = read_json(run.path / "results.json", run.notes) or {}
    run.test_patch_ablation = read_json(run.path / "test_patch_ablation.json", run.notes)
    for p in sorted(run.path.glob("results-*.json")):  # empssl eval's default name and --out files beside it
        data = read_json(p, run.notes)
        if data is not None:
            run.extra_results[p.name] = data
    for name in ("metrics", "monitor"):
        p = run.path / f"{name}.jsonl"
        if p.is_file():
            setattr(run, name, read_jsonl(p))
        else:
            run.notes.append(f"no {name}.jsonl in {run.path}" + (" (train with --eval-every to record accuracy "
                                                                "during training)" if name == "monitor" else ""))
    if (run.path / "tsne.png").is_file():
        run.tsne = run.path / "tsne.png"
    else:
        run.notes.append(f"no tsne.png in {run.path} (empssl tsne --checkpoint {run.path})")
    return run


def loss_terms(runs: list[Run]) -> list[str]:
    """The loss terms the runs logged (metrics.jsonl keys other than :data:`empssl.rundir.METRICS_FIELDS`), in
    the order they were logged, the minimised ``loss`` first: each method's own (:attr:`Method.terms`)."""
    terms: list[str] = []
    for run in runs:
        for rec in run.metrics:
            terms += [k for k in rec if k not in METRICS_FIELDS and k not in terms]
    return terms
