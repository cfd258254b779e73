"""Plots and the Markdown report of one or several run directories.

``write_report(run_dirs, out, targets=...)`` reads what each run left behind (config.json, results.json,
results-*.json, metrics.jsonl, monitor.jsonl, test_patch_ablation.json, tsne.png, and ablation.json for a
patch-count ablation folder, whose n*/ runs join the report) and writes ``out/report.md`` with tables and PNG
plots beside it, several runs (of one or several methods) side by side and overlaid: accuracy with its
evaluation protocol and the random-initialisation baseline, where the time went, and the time and epochs each
run took to reach kNN accuracy targets (:func:`time_to_targets`). A missing file is a note in the report,
never an error.

Three parts: :mod:`.runs` reads run directories, :mod:`.tables` makes the Markdown tables, :mod:`.plots` draws
the figures; this module puts them together.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import write_text
from .plots import plot_curves, plot_patch_ablation, plot_test_patch_ablation, plot_tsne
from .runs import ReportError, Run, is_run, loss_terms, read_json, read_run
from .tables import (
    CONFIG_SUMMARY,
    DEFAULT_TARGETS,
    accuracy_table,
    fmt,
    median_throughput,
    monitor_table,
    online_tables,
    patch_ablation_table,
    probe_sweep_tables,
    random_init_table,
    report_targets,
    table,
    test_patch_ablation_table,
    time_to_accuracy_table,
    time_to_targets,
    timing_table,
)

__all__ = ["DEFAULT_TARGETS", "ReportError", "Run", "patch_ablation_table", "plot_patch_ablation",
           "plot_test_patch_ablation", "plot_tsne", "read_run", "report_targets", "test_patch_ablation_table",
           "time_to_targets", "write_report"]


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
            abl = read_json(d / "ablation.json", notes)
            if abl is not None:
                ablations.append((d, abl))
                runs += [read_run(d / r["run"]) for r in abl.get("rows", []) if (d / r["run"]).is_dir()]
        elif is_run(d):
            runs.append(read_run(d))
        else:
            raise ReportError(f"{d} holds no run (a config.json, results.json or metrics.jsonl as empssl "
                              f"writes them) and no ablation.json")
    labels = [r.label for r in runs]
    for r in runs:  # same folder names in different places: add the parent
        if labels.count(r.label) > 1:
            r.label = f"{r.path.parent.name}/{r.path.name}"
    several_methods = len({r.method for r in runs}) > 1
    for r in runs:
        r.legend = f"{r.label} ({r.method})" if several_methods else r.label

    def link(p: Path) -> str:
        return Path(os.path.relpath(p.resolve(), out.resolve())).as_posix()

    def figure(title: str, p: Path | None, missing: str) -> list[str]:
        return [f"{title}: {missing}", ""] if p is None else [f"### {title}", "", f"![{title}]({link(p)})", ""]

    def curves(title: str, png: str, source: str, x: str, ys: list[tuple[str, str]], xlabel: str) -> list[str]:
        """A figure of :func:`plot_curves` (every run's ``source`` records), or the note that none has them."""
        drawn = plot_curves(runs, out / png, source, x, ys, xlabel) if ys else None
        return figure(title, drawn, f"no {source}.jsonl in any run.")

    knn = [("knn_top1", "kNN top-1 (%)")]

    md = ["# empssl report", ""]
    md += table(["run", "method", "directory"], [[r.label, r.method, f"`{r.path}`"] for r in runs] or
                 [["-", "-", "-"]])

    if runs:
        md += ["## Configuration", ""]
        keys = [k for k in CONFIG_SUMMARY if k == "method" or any(k in r.config for r in runs)]
        md += table(["", *[r.label for r in runs]],
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
                         res.get("train_seconds"), res.get("monitor_seconds"), eval_s, median_throughput(r.metrics)])
        md += table(["run", "method", "device", "steps", "train time (s)", "monitor time (s)", "eval time (s)",
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
        md += curves("kNN accuracy vs training wall time", "accuracy_vs_time.png", "monitor", "train_s", knn,
                     "training wall time (s, monitoring excluded)")
        md += curves("kNN accuracy vs epochs", "accuracy_vs_epochs.png", "monitor", "epoch", knn, "epoch")

        online = online_tables(runs)  # train --online: accuracy against the images seen
        if online:
            md += ["## Online learning", "", "Each image of the stream learned once, in arrival order; kNN "
                   "accuracy against the --online-eval data as the images arrived (wall time includes waiting "
                   "for images).", ""] + online
            md += curves("kNN accuracy vs images seen", "accuracy_vs_images.png", "monitor", "images_seen", knn,
                         "images seen")

        md += ["## Training curves", ""]
        # each method's own loss terms (Method.terms), as its runs logged them
        md += curves("Loss terms", "loss.png", "metrics", "step", [(t, t) for t in loss_terms(runs)], "step")
        md += curves("Learning rate", "lr.png", "metrics", "step", [("lr", "learning rate")], "step")
        md += curves("Throughput", "throughput.png", "metrics", "step", [("patches_per_s", "patches / s")], "step")
        md += curves("kNN accuracy vs patches seen", "accuracy_vs_patches.png", "monitor", "patches_seen", knn,
                     "training patches seen")

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
                   f"patches extracted once in {fmt(tpa.get('feature_seconds'))} s.", ""]
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
    return write_text(out / "report.md", "\n".join(md))
