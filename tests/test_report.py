"""The report: tables and plots from hand-written run directories (no training), missing files, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from empssl.cli import main
from empssl.report import ReportError, plot_tsne, write_report


def assert_png(path: Path) -> None:
    """A real, non-blank image: PIL decodes it, it has pixels, and they are not all one colour."""
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 0 and im.height > 0
        extrema = im.convert("RGB").getextrema()
    assert any(lo != hi for lo, hi in extrema), f"{path} is a single colour"


def fake_run(path: Path, *, patches: int, speed: float, monitor: bool = True, results: bool = True) -> Path:
    """A run directory as `empssl train` leaves it, with made-up but plausible numbers."""
    path.mkdir(parents=True)
    cfg = {"data": "demo", "arch": "resnet18-cifar", "width": 4, "num_patches": patches, "epochs": 1.0,
           "batch_size": 20, "lr": 0.3, "test_patches": 2, "eval_every": 2.0}
    (path / "config.json").write_text(json.dumps({"version": "0.1.0", "config": cfg}))
    with (path / "metrics.jsonl").open("w") as f:
        for step in range(2, 22, 2):
            f.write(json.dumps({"step": step, "epoch": step / 20, "loss": -100.0 - step * patches, "tcr": 5.0 + step,
                                "invariance": 0.5 + step / 50, "lr": 0.3 * (1 - step / 20),
                                "patches_per_s": speed * (1 + step % 4)}) + "\n")
        f.write('{"step": 22, "lo')  # torn last line of a killed run: skipped
    if monitor:
        with (path / "monitor.jsonl").open("w") as f:
            for step in range(0, 21, 5):
                f.write(json.dumps({"step": step, "epoch": step / 20, "elapsed_s": step * 1.5, "train_s": step * 1.0,
                                    "patches_seen": step * 20 * patches, "knn_top1": 10.0 + step * 2,
                                    "monitor_patches": 4, "monitor_s": 0.5, "n_bank": 100, "n_test": 50}) + "\n")
    if results:
        (path / "results.json").write_text(json.dumps({
            "linear_top1": 40.0 + patches, "knn_top1": 35.0 + patches, "test_patches": 2, "feature": "pre",
            "probe_epoch": 2, "n_train": 200, "n_test": 100, "steps": 20, "train_seconds": 20.0 / speed,
            "monitor_seconds": 2.5, "feature_seconds": 1.0, "knn_seconds": 0.1, "probe_seconds": 0.5,
            "device": "cpu"}))
    return path


def test_report_compares_runs_side_by_side(tmp_path, capsys):
    a = fake_run(tmp_path / "a", patches=4, speed=100.0)
    b = fake_run(tmp_path / "b", patches=8, speed=50.0)
    (a / "results-16.json").write_text(json.dumps({"linear_top1": 41.5, "knn_top1": 33.0, "test_patches": 16,
                                                   "data": "other.tar.gz"}))
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "rep")]) == 0
    out = tmp_path / "rep"
    md = (out / "report.md").read_text()
    # one column per run in the config table, one row per run in the accuracy table
    assert "|  | a | b |" in md and "| num_patches | 4 | 8 |" in md
    assert "| a | results-16.json | other.tar.gz | 41.5 | 33.0 | 16 |" in md  # an eval --out file beside it
    assert "| a | results.json | demo | 44.0 | 39.0 | 2 |" in md and "| b | results.json | demo | 48.0 | 43.0 |" in md
    # time table: train time from results.json, median patches/s without the first (warm-up) interval
    assert "| a | cpu | 20 | 0.2 | 2.5 | 1.6 |" in md
    for name in ("loss", "lr", "throughput", "accuracy_vs_time", "accuracy_vs_patches"):
        assert f"({name}.png)" in md
        assert_png(out / f"{name}.png")
    assert "no test_patch_ablation.json" in md and "tsne.png" in md  # missing optional files are notes
    assert "report written to" in capsys.readouterr().out


def test_report_skips_missing_files_with_notes(tmp_path):
    run = fake_run(tmp_path / "bare", patches=4, speed=10.0, monitor=False, results=False)
    (run / "metrics.jsonl").unlink()
    path = write_report([run], run)  # default place: the run itself
    md = path.read_text()
    assert path == run / "report.md"
    assert "no results.json" in md and "no monitor.jsonl" in md and "no metrics.jsonl" in md
    assert "No results.json in any run" in md
    assert not (run / "loss.png").exists()


def test_report_includes_ablations_and_tsne(tmp_path):
    abl = tmp_path / "abl"
    rows = []
    for n in (2, 4):
        fake_run(abl / f"n{n}", patches=n, speed=10.0 * n)
        rows.append({"n": n, "linear_top1": 40.0 + n, "knn_top1": 30.0 + n, "test_patches": 2,
                     "train_seconds": 5.0 * n, "eval_seconds": 1.0, "train_patches_per_s": 10.0, "run": f"n{n}"})
    (abl / "ablation.json").write_text(json.dumps({"config": {"data": "demo"}, "rows": rows}))
    run = abl / "n4"
    (run / "test_patch_ablation.json").write_text(json.dumps({
        "data": "demo", "step": 20, "max_patches": 4, "feature_seconds": 1.0,
        "rows": [{"test_patches": m, "linear_top1": 40.0 + m, "knn_top1": 30.0 + m} for m in (1, 2, 4)]}))
    xy = np.random.default_rng(0).normal(size=(30, 2))
    plot_tsne(xy, np.arange(30) % 3, ["cat", "dog", "frog"], run / "tsne.png", title="t")
    md = write_report([abl], tmp_path / "rep").read_text()
    assert "## Patch-count ablation" in md and "| 4 | 44.0 | 34.0 | 2 | 20.0 |" in md
    assert_png(tmp_path / "rep" / "ablation-abl.png")  # drawn from ablation.json since no PNG was there
    assert "## Test-patch ablation: n4" in md and "| 4 | 44.0 | 34.0 |" in md
    assert "![t-SNE](../abl/n4/tsne.png)" in md
    assert "|  | n2 | n4 |" in md  # the ablation's runs join the comparison


@pytest.mark.parametrize("argv, needle", [
    (["report", "{tmp}/nowhere"], "not a directory"),
    (["report", "{tmp}"], "holds no run"),
    (["report", "{tmp}/a", "{tmp}/a"], "--out"),
])
def test_report_user_mistakes(argv, needle, tmp_path, capsys):
    fake_run(tmp_path / "a", patches=2, speed=1.0)
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_write_report_rejects_empty_folder(tmp_path):
    with pytest.raises(ReportError):
        write_report([tmp_path], tmp_path)
