"""The report's plots, each on its own Agg canvas (no global pyplot state, no display needed).

matplotlib is imported inside the functions (the ``report`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..files import write_atomic
from .runs import ReportError, Run


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
    return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def _log_x_panel(ax: Any, rows: Sequence[dict[str, Any]], x: str, ys: Sequence[tuple[str, str]], **labels: str
                 ) -> None:
    """Lines of ``rows``' ``ys`` (key, legend) against ``x`` on a log x axis labelled at exactly the values of ``x``
    (2, 5, 10 ...), not at powers of ten; a missing value is a gap."""
    from matplotlib.ticker import NullLocator

    xs = [r[x] for r in rows]
    for key, label in ys:
        ax.plot(xs, [r.get(key) if r.get(key) is not None else np.nan for r in rows], "o-", label=label)
    ax.set(xscale="log", **labels)
    ax.set_xticks(xs, [str(v) for v in xs])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.grid(alpha=0.3)
    ax.legend()


def plot_patch_ablation(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Accuracy (linear, kNN) and time (train, eval) against the number of training patches, log x."""
    fig, ax = _figure(1, 2, (10, 4))
    title = f"accuracy ({next((r.get('test_patches') for r in rows), None)} test patches)"
    _log_x_panel(ax[0, 0], rows, "n", [("linear_top1", "linear probe"), ("knn_top1", "kNN")],
                 xlabel="training patches per image", ylabel="top-1 accuracy (%)", title=title)
    _log_x_panel(ax[0, 1], rows, "n", [("train_seconds", "training"), ("eval_seconds", "evaluation")],
                 xlabel="training patches per image", ylabel="wall time (s)", title="time")
    return _save(fig, path)


def plot_test_patch_ablation(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Accuracy (linear, kNN) against the number of test patches averaged per image, log x."""
    fig, ax = _figure(1, 1, (6, 4))
    _log_x_panel(ax[0, 0], rows, "test_patches", [("linear_top1", "linear probe"), ("knn_top1", "kNN")],
                 xlabel="test patches per image", ylabel="top-1 accuracy (%)", title="bag-of-features size")
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


def plot_curves(runs: Sequence[Run], path: Path, source: str, x: str, ys: Sequence[tuple[str, str]],
                 xlabel: str) -> Path | None:
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
        ax[0, i].set(xlabel=xlabel, ylabel=label)
        ax[0, i].grid(alpha=0.3)
        if len(have) > 1:
            ax[0, i].legend(fontsize="small")
    return _save(fig, path)
