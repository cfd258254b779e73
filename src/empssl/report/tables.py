"""The report's Markdown tables, and the time each run took to reach kNN accuracy targets."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from ..rundir import TIMING_FIELDS
from .runs import ReportError, Run

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
    when = f"{_seconds(t['train_s'])} s" + (f" ({_epochs(t['epoch'])} epochs)" if t["epoch"] is not None else "")
    return when if t["reached"] else f"not reached in {when}"


def time_to_accuracy_table(runs: Sequence[Run], targets: Sequence[float]) -> list[str]:
    """Markdown lines: one row per run with monitor records, one column per target (time and epochs)."""
    rows = [[r.label, r.method, *[_target_cell(t) for t in time_to_targets(r.monitor, targets)]]
            for r in runs if r.monitor]
    return table(["run", "method", *[f"kNN >= {t:g} %" for t in sorted(set(targets))]], rows)


def median_throughput(metrics: list[dict[str, Any]]) -> float | None:
    # The first logged interval holds warm-up (cudnn autotuning, compilation): leave it out when others exist.
    vals = [m["patches_per_s"] for m in metrics if "patches_per_s" in m]
    vals = vals[1:] if len(vals) > 1 else vals
    return statistics.median(vals) if vals else None


def fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    if isinstance(x, (list, tuple)):
        return " ".join(fmt(v, digits) for v in x)
    return str(x)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
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
# The order of results.json's "timing" keys in the table (the trainer's list); other keys follow in their own order.
TIMING_KEYS = (*TIMING_FIELDS, "total")


def _probe_protocol(res: dict[str, Any]) -> str | None:
    """The probe protocol (final-epoch, val-epoch or lr-sweep) and its lr."""
    protocol = res.get("probe_protocol")
    if protocol is not None and res.get("probe_lr") is not None:
        protocol += f", lr {res['probe_lr']:g}"
    return protocol


def accuracy_table(runs: Sequence[Run]) -> list[str]:
    """Markdown lines: one row per results file of every run, with its method and evaluation protocol."""
    rows = []
    for r in runs:
        for name, res in r.result_files():
            view = res.get("eval_view")
            rows.append([r.label, r.method, name, res.get("data", r.config.get("data")), view,
                         res.get("linear_top1"), res.get("knn_top1"),
                         res.get("test_patches") if view == "patches" else None, res.get("feature"),
                         _probe_protocol(res), res.get("probe_epoch"), res.get("n_train"), res.get("n_test")])
    if not rows:
        return ["No results.json in any run (train without --no-eval, or run empssl eval).", ""]
    return table(["run", "method", "file", "evaluated on", "eval view", "linear top-1 (%)", "kNN top-1 (%)",
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
        table(["run", "method", "file", "linear trained (%)", "linear random init (%)", "linear gap",
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
            cells.append(None if v is None else f"{fmt(float(v))}{share}")
        rows.append([r.label, r.method, (r.results or {}).get("device"), *cells])
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
    for r in runs:
        for name, res in r.result_files():
            sweep = res.get("probe_sweep")
            if not sweep:
                continue
            chosen = res.get("probe_lr")
            lines += [f"### Linear-probe sweep: {r.label} ({name})", ""]
            lines += table(["probe lr", "val top-1 (%)", "epoch", "chosen"],
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
    return table(["run", "method", "monitor test patches", "bank / test images", "first kNN (%)", "last kNN (%)",
                   "best kNN (%)", "at train time (s)"], rows) if rows else []


def online_tables(runs: Sequence[Run]) -> list[str]:
    """Markdown lines for the online runs (``train --online``): what each learned from its stream, and its kNN
    accuracy against the images seen (monitor.jsonl's ``images_seen``); none when no run is online."""
    online = [r for r in runs if (r.results or {}).get("mode") == "online" or r.config.get("online")]
    if not online:
        return []
    rows = [[r.label, r.method, (r.results or {}).get("source", r.config.get("data")),
             (r.results or {}).get("images_seen"), (r.results or {}).get("images_skipped"),
             (r.results or {}).get("stopped")] for r in online]
    lines = table(["run", "method", "stream", "images learned", "images skipped", "stopped"], rows)
    curve = [[r.label, m.get("images_seen"), m.get("step"), m.get("knn_top1"), m.get("elapsed_s")]
             for r in online for m in r.monitor if m.get("knn_top1") is not None]
    if curve:
        lines += table(["run", "images seen", "step", "kNN top-1 (%)", "wall time (s)"], curve)
    else:
        lines += ["No kNN records (train --online with --online-eval DATA --online-eval-every N).", ""]
    return lines
