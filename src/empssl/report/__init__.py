"""Plots and the Markdown report of one or several run directories.

``write_report(run_dirs, out, targets=...)`` reads what each run left behind (:mod:`.runs`; a patch-count
ablation folder's n*/ runs join them) and writes ``out/report.md`` with its tables and PNG plots (:mod:`.plots`):
several runs, of one or several methods, side by side and overlaid: accuracy with its evaluation protocol and the
random-initialisation baseline, where the time went, and the time and epochs each run took to reach kNN accuracy
targets (:func:`time_to_targets`). A missing file is a note in the report, never an error.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import write_text
from ..rundir import TIMING_FIELDS
from .plots import plot_curves, plot_patch_ablation, plot_test_patch_ablation, plot_tsne
from .runs import ReportError, Run, is_run, loss_terms, read_json, read_run

__all__ = ["DEFAULT_TARGETS", "ReportError", "Run", "patch_ablation_table", "plot_patch_ablation",
           "plot_test_patch_ablation", "plot_tsne", "read_run", "report_targets", "test_patch_ablation_table",
           "time_to_targets", "write_report"]

DEFAULT_TARGETS: tuple[float, ...] = (50.0, 60.0, 70.0, 80.0)


def report_targets(extra: Sequence[float] = ()) -> list[float]:
    """The kNN targets (%) of the time-to-accuracy table: ``DEFAULT_TARGETS`` and ``extra``, sorted, unique;
    ReportError for a target outside (0, 100]."""
    bad = [t for t in extra if not 0 < t <= 100]  # also catches NaN
    if bad:
        raise ReportError(f"--targets are kNN accuracies in % and must lie in (0, 100], got {bad[0]:g}")
    return sorted({float(t) for t in (*DEFAULT_TARGETS, *extra)})


def time_to_targets(records: Sequence[dict[str, Any]], targets: Sequence[float]) -> list[dict[str, Any]]:
    """When the kNN accuracy of monitor.jsonl ``records`` (in the order written) first reached each target.

    One dict per target, sorted, unique: ``target``, ``reached`` and ``train_s``, ``epoch``, ``step``, ``knn_top1``
    of the first record with ``knn_top1 >= target`` (not interpolated; the untrained encoder's step-0 record
    counts). A target never reached: ``reached`` False and the last record's numbers (None without kNN records).
    """
    recs = [r for r in records if r.get("knn_top1") is not None]
    out = []
    for target in sorted(set(targets)):
        hit = next((r for r in recs if r["knn_top1"] >= target), None)
        at = hit or (recs[-1] if recs else {})
        out.append({"target": target, "reached": hit is not None, "train_s": at.get("train_s"),
                    "epoch": at.get("epoch"), "step": at.get("step"), "knn_top1": at.get("knn_top1")})
    return out


def _target_cell(t: dict[str, Any]) -> str:
    seconds, epoch = t["train_s"], t["epoch"]
    if seconds is None:
        return "no kNN record"
    when = f"{seconds:.{1 if seconds < 1000 else 0}f} s"
    if epoch is not None:  # two decimals at most: quarter epochs (--eval-every 0.25), but "4.0", not "4.00"
        when += f" ({round(float(epoch), 2)} epochs)"
    return when if t["reached"] else f"not reached in {when}"


def time_to_accuracy_table(runs: Sequence[Run], targets: Sequence[float]) -> list[str]:
    """Markdown lines: one row per run with monitor records, one column per target (time and epochs), and how to
    read them; none when no run has monitor records."""
    rows = [[r.label, r.method, *[_target_cell(t) for t in time_to_targets(r.monitor, targets)]]
            for r in runs if r.monitor]
    return table(["run", "method", *[f"kNN >= {t:g} %" for t in sorted(set(targets))]], rows) + [
        "Each figure is the first kNN evaluation at or above the target, not interpolated between evaluations: the "
        "target may have been crossed up to one evaluation interval earlier. \"not reached\" gives the time and "
        "epochs of the run's last evaluation.", ""] if rows else []


def median_throughput(metrics: list[dict[str, Any]]) -> float | None:
    # The first logged interval holds warm-up (cudnn autotuning, compilation): leave it out when others exist.
    vals = [m["patches_per_s"] for m in metrics if "patches_per_s" in m]
    vals = vals[1:] if len(vals) > 1 else vals
    return statistics.median(vals) if vals else None


def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.1f}"
    if isinstance(x, (list, tuple)):
        return " ".join(map(fmt, x))
    return str(x)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(fmt, row)) + " |" for row in rows]
    return lines + [""]


def patch_ablation_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines of the patch-count table (rows as ``experiments.ablation_row`` makes them)."""
    return table(["training patches", "linear top-1 (%)", "kNN top-1 (%)", "test patches", "train time (s)",
                   "eval time (s)", "train patches/s"],
                  [[r["n"], r.get("linear_top1"), r.get("knn_top1"), r.get("test_patches"), r.get("train_seconds"),
                    r.get("eval_seconds"), r.get("train_patches_per_s")] for r in rows])


def test_patch_ablation_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines of the test-patch table (rows of ``test_patch_ablation.json``)."""
    return table(["test patches", "linear top-1 (%)", "kNN top-1 (%)", "probe time (s)"],
                  [[r["test_patches"], r["linear_top1"], r["knn_top1"], r.get("probe_seconds")] for r in rows])


CONFIG_SUMMARY = ("method", "data", "train_subset", "image_size", "arch", "width", "hidden_dim", "num_patches",
                  "patch_size", "epochs", "schedule_epochs", "batch_size", "lr", "seed", "precision", "test_patches",
                  "eval_view", "eval_feature", "probe_epochs", "probe_lrs", "knn_k", "eval_every")


def _result_files(runs: Sequence[Run]) -> list[tuple[Run, str, dict[str, Any]]]:
    """(run, file name, results) of each run's results.json, then its results-*.json."""
    return [(r, name, res) for r in runs
            for name, res in ([("results.json", r.results)] if r.results else []) + list(r.extra_results.items())]


def accuracy_table(runs: Sequence[Run]) -> list[str]:
    """Markdown lines: one row per results file of every run, with its method and evaluation protocol."""
    rows = []
    for r, name, res in _result_files(runs):
        view, protocol = res.get("eval_view"), res.get("probe_protocol")  # final-epoch, val-epoch or lr-sweep
        if protocol is not None and res.get("probe_lr") is not None:
            protocol += f", lr {res['probe_lr']:g}"
        rows.append([r.label, r.method, name, res.get("data", r.config.get("data")), view, res.get("linear_top1"),
                     res.get("knn_top1"), res.get("test_patches") if view == "patches" else None, res.get("feature"),
                     protocol, res.get("probe_epoch"), res.get("n_train"), res.get("n_test")])
    if not rows:
        return ["No results.json in any run (train without --no-eval, or run empssl eval).", ""]
    return table(["run", "method", "file", "evaluated on", "eval view", "linear top-1 (%)", "kNN top-1 (%)",
                   "test patches", "feature", "probe", "probe epoch", "train images", "test images"], rows)


def random_init_table(runs: Sequence[Run]) -> list[str]:
    """Markdown lines: trained vs randomly initialised encoder (``random_init`` of results), or none."""
    def versus(key: str, res: dict[str, Any]) -> list[Any]:  # trained, random init, the gap
        trained, rand = res.get(key), res["random_init"].get(key)
        return [trained, rand, f"{trained - rand:+.1f}" if trained is not None and rand is not None else None]

    rows = [[r.label, r.method, name, *versus("linear_top1", res), *versus("knn_top1", res)]
            for r, name, res in _result_files(runs) if res.get("random_init")]
    if not rows:
        return []
    return ["## Trained vs random initialisation", "",
            "The same evaluation of the encoder the run started from (--compare-random-init); the gap is in "
            "points of top-1 accuracy.", ""] + \
        table(["run", "method", "file", "linear trained (%)", "linear random init (%)", "linear gap",
                "kNN trained (%)", "kNN random init (%)", "kNN gap"], rows)


def timing_table(runs: Sequence[Run]) -> list[str]:
    """Markdown lines of "Where the time went": one row per run, a column per ``timing`` key any run holds."""
    timed = [(r, r.results["timing"]) for r in runs if r.results and r.results.get("timing")]
    if not timed:
        return ["No results.json holds a timing breakdown (runs from before it was recorded).", ""]
    # the trainer's parts in its order, then any other key in its own
    keys = [k for k in (*TIMING_FIELDS, "total") if any(k in timing for _, timing in timed)]
    for _, timing in timed:
        keys += [k for k in timing if k not in keys]

    def cell(seconds: Any, total: Any) -> str | None:  # with its share of the total (none for the total itself)
        share = f" ({100 * seconds / total:.0f} %)" if seconds is not None and total else ""
        return None if seconds is None else f"{fmt(float(seconds))}{share}"

    rows = [[r.label, r.method, r.results.get("device"),
             *[cell(t.get(k), k != "total" and t.get("total")) for k in keys]] for r, t in timed]
    lines = table(["run", "method", "device", *[f"{k} (s)" for k in keys]], rows)
    lines += ["Seconds from results.json's timing, with each part's share of the total; \"-\": not recorded "
              "by that run.", ""]
    untimed = [r.label for r in runs if r.results and not r.results.get("timing")]
    if untimed:
        lines += [f"No timing in results.json of {', '.join(untimed)} (recorded before it existed).", ""]
    return lines


def probe_sweep_tables(runs: Sequence[Run]) -> list[str]:
    """Markdown lines: for every results file of a linear-probe lr sweep, its heads' validation accuracy."""
    lines: list[str] = []
    for r, name, res in _result_files(runs):
        if res.get("probe_sweep"):
            chosen = res.get("probe_lr")
            lines += [f"### Linear-probe sweep: {r.label} ({name})", ""]
            lines += table(["probe lr", "val top-1 (%)", "epoch", "chosen"],
                            [[f"{h['lr']:g}", h.get("val_top1"), h.get("epoch"), "yes" if h["lr"] == chosen else ""]
                             for h in res["probe_sweep"]])
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
    return table(["run", "method", "monitor test patches", "bank / test images", "first kNN (%)", "last kNN (%)",
                   "best kNN (%)", "at train time (s)"], rows) if rows else []


def online_tables(runs: Sequence[Run]) -> list[str]:
    """Markdown lines for the online runs (``train --online``): what each learned from its stream, and its kNN
    accuracy against the images seen (monitor.jsonl's ``images_seen``); none when no run is online."""
    online = [r for r in runs if r.results.get("mode") == "online" or r.config.get("online")]
    if not online:
        return []
    rows = [[r.label, r.method, r.results.get("source", r.config.get("data")),
             *[r.results.get(k) for k in ("images_seen", "images_skipped", "stopped")]] for r in online]
    lines = table(["run", "method", "stream", "images learned", "images skipped", "stopped"], rows)
    curve = [[r.label, m.get("images_seen"), m.get("step"), m.get("knn_top1"), m.get("elapsed_s")]
             for r in online for m in r.monitor if m.get("knn_top1") is not None]
    if curve:
        lines += table(["run", "images seen", "step", "kNN top-1 (%)", "wall time (s)"], curve)
    else:
        lines += ["No kNN records (train --online with --online-eval DATA --online-eval-every N).", ""]
    return lines


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, *, targets: Sequence[float] = ()) -> Path:
    """Write ``out_dir/report.md`` and its PNG plots for the given run (or patch-ablation) directories.

    ``targets``: kNN accuracies (%) added to ``DEFAULT_TARGETS`` in the time-to-accuracy table. Returns report.md's
    path; ReportError for a directory that is missing or holds neither a run nor an ablation, or a bad target.
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
    several_methods = len({r.method for r in runs}) > 1
    for r in runs:
        if labels.count(r.label) > 1:  # same folder names in different places: add the parent
            r.label = f"{r.path.parent.name}/{r.path.name}"
        r.legend = f"{r.label} ({r.method})" if several_methods else r.label

    def link(p: Path) -> str:
        return Path(os.path.relpath(p.resolve(), out.resolve())).as_posix()

    def curves(title: str, png: str, source: str, x: str, ys: list[tuple[str, str]], xlabel: str) -> list[str]:
        """A figure of :func:`plot_curves` (every run's ``source`` records), or the note that none has them."""
        drawn = plot_curves(runs, out / png, source, x, ys, xlabel) if ys else None
        if drawn is None:
            return [f"{title}: no {source}.jsonl in any run.", ""]
        return [f"### {title}", "", f"![{title}]({link(drawn)})", ""]

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
            res = r.results
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
        md += time_to_accuracy_table(runs, goals)
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
        md += [", ".join(f"{k} {v}" for k, v in abl.get("config", {}).items()), ""]
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
