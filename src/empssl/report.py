"""Plots and the Markdown report of one or several run directories.

``write_report(run_dirs, out, targets=...)`` reads what each run left behind (config.json, results.json,
results-*.json, metrics.jsonl, monitor.jsonl, test_patch_ablation.json, tsne.png, and ablation.json for a
patch-count ablation folder, whose n*/ runs join the report) and writes ``out/report.md`` with tables and PNG
plots beside it, several runs (of one or several methods) side by side and overlaid: accuracy with its
evaluation protocol and the random-initialisation baseline, where the time went, and the time and epochs each
run took to reach kNN accuracy targets (:func:`time_to_targets`). A missing file is a note in the report,
never an error.

matplotlib is imported inside the plotting functions (the ``report`` extra), and figures are drawn on their
own Agg canvas: no global pyplot state, no display needed.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .rundir import read_jsonl


class ReportError(RuntimeError):
    """A report cannot be made (no run directory, matplotlib missing ...): reported in one line."""


# --- plotting ----------------------------------------------------------------------------------------------


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.0, 4.0)) -> tuple[Any, Any]:
    """A Figure on its own Agg canvas and its (nrows, ncols) array of axes."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("plots need matplotlib: pip install 'empssl[report]'") from None
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _log_x_at(ax: Any, values: Sequence[int]) -> None:
    """Log x axis labelled at exactly ``values`` (2, 5, 10 ...), not at powers of ten."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log")
    ax.set_xticks(list(values), [str(v) for v in values])
    ax.xaxis.set_minor_locator(NullLocator())


def plot_patch_ablation(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Accuracy (linear, kNN) and time (train, eval) against the number of training patches, log x."""
    fig, ax = _figure(1, 2, (10, 4))
    n = [r["n"] for r in rows]
    for key, label in (("linear_top1", "linear probe"), ("knn_top1", "kNN")):
        ax[0, 0].plot(n, [r.get(key) if r.get(key) is not None else np.nan for r in rows], "o-", label=label)
    for key, label in (("train_seconds", "training"), ("eval_seconds", "evaluation")):
        ax[0, 1].plot(n, [r.get(key) if r.get(key) is not None else np.nan for r in rows], "o-", label=label)
    test = next((r.get("test_patches") for r in rows), None)
    ax[0, 0].set(xlabel="training patches per image", ylabel="top-1 accuracy (%)",
                 title=f"accuracy ({test} test patches)")
    ax[0, 1].set(xlabel="training patches per image", ylabel="wall time (s)", title="time")
    for a in ax[0]:
        _log_x_at(a, n)
        a.grid(alpha=0.3)
        a.legend()
    return _save(fig, path)


def plot_test_patch_ablation(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Accuracy (linear, kNN) against the number of test patches averaged per image, log x."""
    fig, ax = _figure(1, 1, (6, 4))
    m = [r["test_patches"] for r in rows]
    ax[0, 0].plot(m, [r["linear_top1"] for r in rows], "o-", label="linear probe")
    ax[0, 0].plot(m, [r["knn_top1"] for r in rows], "s-", label="kNN")
    ax[0, 0].set(xlabel="test patches per image", ylabel="top-1 accuracy (%)", title="bag-of-features size")
    _log_x_at(ax[0, 0], m)
    ax[0, 0].grid(alpha=0.3)
    ax[0, 0].legend()
    return _save(fig, path)


def plot_tsne(xy: np.ndarray, labels: np.ndarray, classes: Sequence[str], path: Path, title: str = "") -> Path:
    """Scatter of (N, 2) points coloured by their (N,) labels, with a legend of class names."""
    fig, ax = _figure(1, 1, (8, 7))
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for c, name in enumerate(classes):
        pts = xy[labels == c]
        if len(pts):
            ax[0, 0].scatter(pts[:, 0], pts[:, 1], s=6, color=cmap(c % cmap.N), label=name, alpha=0.8)
    ax[0, 0].set(xticks=[], yticks=[], title=title)
    ax[0, 0].legend(markerscale=3, fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5),
                    ncol=1 if len(classes) <= 20 else 2)
    return _save(fig, path)


def _plot_curves(runs: Sequence[Run], path: Path, source: str, x: str, ys: Sequence[tuple[str, str]],
                 xlabel: str, logy: bool = False) -> Path | None:
    """One panel per (key, label) in ``ys``, every run that has ``source`` records overlaid; None if none."""
    have = [r for r in runs if getattr(r, source)]
    if not have:
        return None
    fig, ax = _figure(1, len(ys), (5 * len(ys), 3.8))
    for run in have:
        recs = [rec for rec in getattr(run, source) if x in rec]
        for i, (key, _) in enumerate(ys):
            pts = [(rec[x], rec[key]) for rec in recs if rec.get(key) is not None]
            if pts:
                xs, vs = zip(*pts)
                ax[0, i].plot(xs, vs, ".-" if len(pts) < 50 else "-", label=run.legend or run.label)
    for i, (_, label) in enumerate(ys):
        ax[0, i].set(xlabel=xlabel, ylabel=label, yscale="log" if logy else "linear")
        ax[0, i].grid(alpha=0.3)
        if len(have) > 1:
            ax[0, i].legend(fontsize="small")
    return _save(fig, path)


# --- reading runs ------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one run directory holds (absent files are empty)."""

    path: Path
    label: str = ""
    legend: str = ""  # the name of its lines in plots: the label, with the method when runs differ in it
    config: dict[str, Any] = field(default_factory=dict)
    version: str | None = None
    results: dict[str, Any] | None = None
    extra_results: dict[str, dict[str, Any]] = field(default_factory=dict)  # results-*.json by file name
    metrics: list[dict[str, Any]] = field(default_factory=list)
    monitor: list[dict[str, Any]] = field(default_factory=list)
    test_patch_ablation: dict[str, Any] | None = None
    tsne: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        """The training method; runs from before methods existed hold none and were EMP-SSL."""
        return self.config.get("method") or (self.results or {}).get("method") or "emp-ssl"

    def result_files(self) -> list[tuple[str, dict[str, Any]]]:
        """(file name, results) of results.json then every results-*.json."""
        return ([("results.json", self.results)] if self.results else []) + list(self.extra_results.items())


def _read_json(path: Path, notes: list[str]) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        notes.append(f"{path} could not be read ({type(e).__name__}); skipped")
        return None


def read_run(path: Path) -> Run:
    """Everything :func:`write_report` uses from one run directory; missing files become notes."""
    run = Run(Path(path), label=Path(path).name)
    notes = run.notes
    for name, attr in (("config.json", "config"), ("results.json", "results"),
                       ("test_patch_ablation.json", "test_patch_ablation")):
        p = run.path / name
        if not p.is_file():
            notes.append(f"no {name} in {run.path}")
            continue
        data = _read_json(p, notes)
        if data is None:
            continue
        if attr == "config":
            run.config, run.version = data.get("config", {}), data.get("version")
        else:
            setattr(run, attr, data)
    for p in sorted(run.path.glob("results-*.json")):  # empssl eval's default name and --out files beside it
        data = _read_json(p, notes)
        if data is not None:
            run.extra_results[p.name] = data
    for name in ("metrics", "monitor"):
        p = run.path / f"{name}.jsonl"
        if p.is_file():
            setattr(run, name, read_jsonl(p))
        else:
            notes.append(f"no {name}.jsonl in {run.path}" + (" (train with --eval-every to record accuracy "
                                                            "during training)" if name == "monitor" else ""))
    if (run.path / "tsne.png").is_file():
        run.tsne = run.path / "tsne.png"
    else:
        notes.append(f"no tsne.png in {run.path} (empssl tsne --checkpoint {run.path})")
    return run


# --- time to accuracy --------------------------------------------------------------------------------------

DEFAULT_TARGETS: tuple[float, ...] = (50.0, 60.0, 70.0, 80.0)


def report_targets(extra: Sequence[float] = ()) -> list[float]:
    """The kNN targets (%) of the time-to-accuracy table: ``DEFAULT_TARGETS`` and ``extra``, sorted, unique.

    Raises ReportError for a target outside (0, 100].
    """
    bad = [t for t in extra if not 0 < t <= 100]  # also catches NaN
    if bad:
        raise ReportError(f"--targets are kNN accuracies in % and must lie in (0, 100], got {bad[0]:g}")
    return sorted({float(t) for t in (*DEFAULT_TARGETS, *extra)})


def time_to_targets(records: Sequence[dict[str, Any]], targets: Sequence[float]) -> list[dict[str, Any]]:
    """When the kNN accuracy of monitor.jsonl ``records`` (in the order written) first reached each target.

    One dict per target, sorted by target, duplicates dropped: ``target``, ``reached`` and ``train_s``,
    ``epoch``, ``step``, ``knn_top1`` of the first record with ``knn_top1 >= target`` (no interpolation
    between records; the step-0 record of the untrained encoder counts). A target never reached gets
    ``reached`` False and the numbers of the last record (how long the run tried); with no record holding
    ``knn_top1``, they are None.
    """
    recs = [r for r in records if r.get("knn_top1") is not None]
    out = []
    for target in sorted(set(targets)):
        hit = next((r for r in recs if r["knn_top1"] >= target), None)
        at = hit or (recs[-1] if recs else {})
        out.append({"target": target, "reached": hit is not None, "train_s": at.get("train_s"),
                    "epoch": at.get("epoch"), "step": at.get("step"), "knn_top1": at.get("knn_top1")})
    return out


def _seconds(x: float) -> str:
    return f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def _epochs(x: float) -> str:
    # two decimals show quarter epochs (--eval-every 0.25) without printing "4.00"
    s = f"{x:.2f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


def _target_cell(t: dict[str, Any]) -> str:
    if t["train_s"] is None:
        return "no kNN record"
    when = f"{_seconds(t['train_s'])} s ({_epochs(t['epoch'])} epochs)" if t["epoch"] is not None else \
        f"{_seconds(t['train_s'])} s"
    return when if t["reached"] else f"not reached in {when}"


def time_to_accuracy_table(runs: Sequence[Run], targets: Sequence[float]) -> list[str]:
    """Markdown lines: one row per run with monitor records, one column per target (time and epochs)."""
    rows = [[r.label, r.method, *[_target_cell(t) for t in time_to_targets(r.monitor, targets)]]
            for r in runs if r.monitor]
    return _table(["run", "method", *[f"kNN >= {t:g} %" for t in sorted(set(targets))]], rows)


# --- tables ------------------------------------------------------------------------------------------------


def _median_throughput(metrics: list[dict[str, Any]]) -> float | None:
    # The first logged interval holds warm-up (cudnn autotuning, compilation): leave it out when others exist.
    vals = [m["patches_per_s"] for m in metrics if "patches_per_s" in m]
    vals = vals[1:] if len(vals) > 1 else vals
    return statistics.median(vals) if vals else None


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    if isinstance(x, (list, tuple)):
        return " ".join(_fmt(v, digits) for v in x)
    return str(x)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return lines + [""]


def patch_ablation_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines of the patch-count table (rows as ``experiments.ablation_row`` makes them)."""
    return _table(["training patches", "linear top-1 (%)", "kNN top-1 (%)", "test patches", "train time (s)",
                   "eval time (s)", "train patches/s"],
                  [[r["n"], r.get("linear_top1"), r.get("knn_top1"), r.get("test_patches"), r.get("train_seconds"),
                    r.get("eval_seconds"), r.get("train_patches_per_s")] for r in rows])


def test_patch_ablation_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines of the test-patch table (rows of ``test_patch_ablation.json``)."""
    return _table(["test patches", "linear top-1 (%)", "kNN top-1 (%)", "probe time (s)"],
                  [[r["test_patches"], r["linear_top1"], r["knn_top1"], r.get("probe_seconds")] for r in rows])


CONFIG_SUMMARY = ("method", "data", "train_subset", "image_size", "arch", "width", "hidden_dim", "num_patches",
                  "patch_size", "epochs", "schedule_epochs", "batch_size", "lr", "seed", "precision", "test_patches",
                  "eval_view", "eval_feature", "probe_epochs", "probe_lrs", "knn_k", "eval_every")
# The order of results.json's "timing" keys in the table; keys not listed here follow in their own order.
TIMING_KEYS = ("startup", "data", "compile", "train", "features", "knn", "probe", "total")


def _eval_view(res: dict[str, Any]) -> str:
    # results from before eval_view existed were all bags of patches
    return res.get("eval_view") or "patches"


def _probe_protocol(res: dict[str, Any]) -> str | None:
    """The probe protocol (final-epoch, val-epoch or lr-sweep) and its lr; older results tell it by probe_val_top1."""
    protocol = res.get("probe_protocol")
    if protocol is None and "probe_epoch" in res:
        protocol = "val-epoch" if res.get("probe_val_top1") is not None else "final-epoch"
    if protocol is not None and res.get("probe_lr") is not None:
        protocol += f", lr {res['probe_lr']:g}"
    return protocol


def accuracy_table(runs: Sequence[Run]) -> list[str]:
    """Markdown lines: one row per results file of every run, with its method and evaluation protocol."""
    rows = []
    for r in runs:
        for name, res in r.result_files():
            view = _eval_view(res)
            rows.append([r.label, r.method, name, res.get("data", r.config.get("data")), view,
                         res.get("linear_top1"), res.get("knn_top1"),
                         res.get("test_patches") if view == "patches" else None, res.get("feature"),
                         _probe_protocol(res), res.get("probe_epoch"), res.get("n_train"), res.get("n_test")])
    if not rows:
        return ["No results.json in any run (train without --no-eval, or run empssl eval).", ""]
    return _table(["run", "method", "file", "evaluated on", "eval view", "linear top-1 (%)", "kNN top-1 (%)",
                   "test patches", "feature", "probe", "probe epoch", "train images", "test images"], rows)


def random_init_table(runs: Sequence[Run]) -> list[str]:
    """Markdown lines: trained vs randomly initialised encoder (``random_init`` of results), or none."""
    rows = []
    for r in runs:
        for name, res in r.result_files():
            base = res.get("random_init")
            if not base:
                continue
            row: list[Any] = [r.label, r.method, name]
            for key in ("linear_top1", "knn_top1"):
                trained, rand = res.get(key), base.get(key)
                gap = f"{trained - rand:+.1f}" if trained is not None and rand is not None else None
                row += [trained, rand, gap]
            rows.append(row)
    if not rows:
        return []
    return ["## Trained vs random initialisation", "",
            "The same evaluation of the encoder the run started from (--compare-random-init); the gap is in "
            "points of top-1 accuracy.", ""] + \
        _table(["run", "method", "file", "linear trained (%)", "linear random init (%)", "linear gap",
                "kNN trained (%)", "kNN random init (%)", "kNN gap"], rows)


def timing_table(runs: Sequence[Run]) -> list[str]:
    """Markdown lines of "Where the time went": one row per run, a column per ``timing`` key any run holds."""
    timed = [(r, r.results["timing"]) for r in runs if r.results and r.results.get("timing")]
    if not timed:
        return ["No results.json holds a timing breakdown (runs from before it was recorded).", ""]
    keys = [k for k in TIMING_KEYS if any(k in timing for _, timing in timed)]
    for _, timing in timed:
        keys += [k for k in timing if k not in keys]
    rows = []
    for r, timing in timed:
        total = timing.get("total")
        cells: list[str | None] = []
        for k in keys:
            v = timing.get(k)
            share = f" ({100 * v / total:.0f} %)" if v is not None and k != "total" and total else ""
            cells.append(None if v is None else f"{_fmt(float(v))}{share}")
        rows.append([r.label, r.method, (r.results or {}).get("device"), *cells])
    lines = _table(["run", "method", "device", *[f"{k} (s)" for k in keys]], rows)
    lines += ["Seconds from results.json's timing, with each part's share of the total; \"-\": not recorded "
              "by that run.", ""]
    untimed = [r.label for r in runs if r.results and not r.results.get("timing")]
    if untimed:
        lines += [f"No timing in results.json of {', '.join(untimed)} (recorded before it existed).", ""]
    return lines


def probe_sweep_tables(runs: Sequence[Run]) -> list[str]:
    """Markdown lines: for every results file of a linear-probe lr sweep, its heads' validation accuracy."""
    lines: list[str] = []
    for r in runs:
        for name, res in r.result_files():
            sweep = res.get("probe_sweep")
            if not sweep:
                continue
            chosen = res.get("probe_lr")
            lines += [f"### Linear-probe sweep: {r.label} ({name})", ""]
            lines += _table(["probe lr", "val top-1 (%)", "epoch", "chosen"],
                            [[f"{h['lr']:g}", h.get("val_top1"), h.get("epoch"), "yes" if h["lr"] == chosen else ""]
                             for h in sweep])
    if lines:
        lines = ["## Linear-probe learning-rate sweeps", "",
                 "One head per learning rate, scored on a validation split of the training features; the head "
                 "with the best validation accuracy gives the test accuracy above.", ""] + lines
    return lines


def monitor_table(runs: Sequence[Run]) -> list[str]:
    """Markdown lines: the kNN probe of each monitored run (its size, first, last and best accuracy)."""
    mon = [r for r in runs if any(m.get("knn_top1") is not None for m in r.monitor)]
    rows = []
    for r in mon:
        recs = [m for m in r.monitor if m.get("knn_top1") is not None]
        best = max(recs, key=lambda m: m["knn_top1"])
        rows.append([r.label, r.method, recs[-1].get("monitor_patches"),
                     f"{recs[-1].get('n_bank')} / {recs[-1].get('n_test')}", recs[0]["knn_top1"],
                     recs[-1]["knn_top1"], best["knn_top1"], best.get("train_s")])
    return _table(["run", "method", "monitor test patches", "bank / test images", "first kNN (%)", "last kNN (%)",
                   "best kNN (%)", "at train time (s)"], rows) if rows else []


# --- the report --------------------------------------------------------------------------------------------


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, *, targets: Sequence[float] = ()) -> Path:
    """Write ``out_dir/report.md`` and its PNG plots for the given run (or patch-ablation) directories.

    ``targets`` are kNN accuracies (%) added to ``DEFAULT_TARGETS`` in the time-to-accuracy table.
    Returns the path of report.md. Raises ReportError if a directory does not exist or holds neither a run
    nor an ablation, or for a target outside (0, 100].
    """
    goals = report_targets(targets)
    out = Path(out_dir)
    runs: list[Run] = []
    ablations: list[tuple[Path, dict[str, Any]]] = []
    notes: list[str] = []
    for d in map(Path, run_dirs):
        if not d.is_dir():
            raise ReportError(f"not a directory: {d}")
        if (d / "ablation.json").is_file():
            abl = _read_json(d / "ablation.json", notes)
            if abl is not None:
                ablations.append((d, abl))
                runs += [read_run(d / r["run"]) for r in abl.get("rows", []) if (d / r["run"]).is_dir()]
        elif (d / "config.json").is_file() or (d / "results.json").is_file() or (d / "metrics.jsonl").is_file():
            runs.append(read_run(d))
        else:
            raise ReportError(f"{d} holds no run (config.json, results.json, metrics.jsonl) and no ablation.json")
    labels = [r.label for r in runs]
    for r in runs:  # same folder names in different places: add the parent
        if labels.count(r.label) > 1:
            r.label = f"{r.path.parent.name}/{r.path.name}"
    several_methods = len({r.method for r in runs}) > 1
    for r in runs:
        r.legend = f"{r.label} ({r.method})" if several_methods else r.label
    out.mkdir(parents=True, exist_ok=True)

    def link(p: Path) -> str:
        return Path(os.path.relpath(p.resolve(), out.resolve())).as_posix()

    def figure(title: str, p: Path | None, missing: str) -> list[str]:
        return [f"{title}: {missing}", ""] if p is None else [f"### {title}", "", f"![{title}]({link(p)})", ""]

    md = ["# empssl report", ""]
    md += _table(["run", "method", "directory"], [[r.label, r.method, f"`{r.path}`"] for r in runs] or
                 [["-", "-", "-"]])

    if runs:
        md += ["## Configuration", ""]
        keys = [k for k in CONFIG_SUMMARY if k == "method" or any(k in r.config for r in runs)]
        md += _table(["", *[r.label for r in runs]],
                     [[k, *[r.method if k == "method" else r.config.get(k) for r in runs]] for k in keys]
                     + [["version", *[r.version for r in runs]]])

        md += ["## Accuracy", ""] + accuracy_table(runs)
        md += random_init_table(runs)
        md += probe_sweep_tables(runs)

        md += ["## Time and throughput", ""]
        rows = []
        for r in runs:
            res = r.results or {}
            eval_s = sum(res.get(k, 0.0) for k in ("feature_seconds", "knn_seconds", "probe_seconds")) or None
            last = r.metrics[-1] if r.metrics else {}
            rows.append([r.label, r.method, res.get("device"), res.get("steps", last.get("step")),
                         res.get("train_seconds"), res.get("monitor_seconds"), eval_s, _median_throughput(r.metrics)])
        md += _table(["run", "method", "device", "steps", "train time (s)", "monitor time (s)", "eval time (s)",
                      "median patches/s"], rows)
        md += ["Train time: the training loop's wall time without monitoring; patches/s: median over the "
               "logged intervals after the first (warm-up).", ""]
        md += ["### Where the time went", ""] + timing_table(runs)

        md += ["## Time to accuracy", "",
               "Training wall time (monitoring excluded) and epochs until the kNN accuracy measured during "
               "training (--eval-every) first reached each target.", ""]
        if any(r.monitor for r in runs):
            md += time_to_accuracy_table(runs, goals)
            md += ["Each figure is the first kNN evaluation at or above the target, not interpolated between "
                   "evaluations: the target may have been crossed up to one evaluation interval earlier. "
                   "\"not reached\" gives the time and epochs of the run's last evaluation.", ""]
        unmonitored = [r.label for r in runs if not r.monitor]
        if unmonitored:
            md += [f"No monitor.jsonl in {', '.join(unmonitored)}, so no time to accuracy there (train with "
                   "--eval-every).", ""]
        md += monitor_table(runs)
        md += figure("kNN accuracy vs training wall time", _plot_curves(
            runs, out / "accuracy_vs_time.png", "monitor", "train_s", [("knn_top1", "kNN top-1 (%)")],
            "training wall time (s, monitoring excluded)"), "no monitor.jsonl in any run.")
        md += figure("kNN accuracy vs epochs", _plot_curves(
            runs, out / "accuracy_vs_epochs.png", "monitor", "epoch", [("knn_top1", "kNN top-1 (%)")], "epoch"),
            "no monitor.jsonl in any run.")

        md += ["## Training curves", ""]
        no_metrics = "no metrics.jsonl in any run."
        md += figure("Loss terms", _plot_curves(runs, out / "loss.png", "metrics", "step",
                                                [("loss", "loss"), ("tcr", "coding rate (TCR)"),
                                                 ("invariance", "invariance (cosine)")], "step"), no_metrics)
        md += figure("Learning rate", _plot_curves(runs, out / "lr.png", "metrics", "step",
                                                   [("lr", "learning rate")], "step"), no_metrics)
        md += figure("Throughput", _plot_curves(runs, out / "throughput.png", "metrics", "step",
                                                [("patches_per_s", "patches / s")], "step"), no_metrics)
        md += figure("kNN accuracy vs patches seen", _plot_curves(
            runs, out / "accuracy_vs_patches.png", "monitor", "patches_seen", [("knn_top1", "kNN top-1 (%)")],
            "training patches seen"), "no monitor.jsonl in any run.")

    for d, abl in ablations:
        md += [f"## Patch-count ablation: `{d}`", ""]
        cfg = abl.get("config", {})
        md += [", ".join(f"{k} {v}" for k, v in cfg.items()), ""]
        md += patch_ablation_table(abl.get("rows", []))
        png = d / "ablation.png"
        if not png.is_file() and abl.get("rows"):
            png = plot_patch_ablation(abl["rows"], out / f"ablation-{d.name}.png")
        if png.is_file():
            md += [f"![patch-count ablation]({link(png)})", ""]

    for r in runs:
        if r.test_patch_ablation:
            tpa = r.test_patch_ablation
            md += [f"## Test-patch ablation: {r.label}", "",
                   f"Evaluated on {tpa.get('data')}, step {tpa.get('step')}; features of {tpa.get('max_patches')} "
                   f"patches extracted once in {_fmt(tpa.get('feature_seconds'))} s.", ""]
            md += test_patch_ablation_table(tpa.get("rows", []))
            png = r.path / "test_patch_ablation.png"
            if png.is_file():
                md += [f"![test-patch ablation]({link(png)})", ""]
    for r in runs:
        if r.tsne:
            md += [f"## t-SNE: {r.label}", "", f"![t-SNE]({link(r.tsne)})", ""]

    all_notes = notes + [n for r in runs for n in r.notes]
    if all_notes:
        md += ["## Notes", ""] + [f"- {n}" for n in all_notes] + [""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
