"""The report: tables and plots from hand-written run directories (no training), time to accuracy, missing
files, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from empssl.cli import main
from empssl.report import ReportError, plot_tsne, read_run, report_targets, time_to_targets, write_report
from empssl.report.runs import loss_terms


def assert_png(path: Path) -> None:
    """A real, non-blank image: PIL decodes it, it has pixels, and they are not all one colour."""
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 0 and im.height > 0
        extrema = im.convert("RGB").getextrema()
    assert any(lo != hi for lo, hi in extrema), f"{path} is a single colour"


def fake_run(path: Path, *, patches: int, speed: float, monitor: bool = True, results: bool = True,
             method: str = "emp-ssl", knn: tuple[float, ...] = (10.0, 20.0, 30.0, 40.0, 50.0),
             **extra_results: object) -> Path:
    """A run directory as `empssl train` leaves it, with made-up but plausible numbers.

    ``knn`` is the
    monitor's accuracy at steps 0, 5, 10 ... (train_s 1.5 s and 0.25 epochs per 5 steps); ``extra_results``
    are added to results.json.
    """
    path.mkdir(parents=True)
    cfg = {"data": "demo", "arch": "resnet18-cifar", "width": 4, "num_patches": patches, "epochs": 1.0,
           "batch_size": 20, "lr": 0.3, "test_patches": 2, "eval_every": 2.0}
    cfg["method"] = method
    (path / "config.json").write_text(json.dumps({"version": "0.2.0", "config": cfg}))
    with (path / "metrics.jsonl").open("w") as f:
        for step in range(2, 22, 2):
            f.write(json.dumps({"step": step, "epoch": step / 20, "loss": -100.0 - step * patches, "tcr": 5.0 + step,
                                "invariance": 0.5 + step / 50, "lr": 0.3 * (1 - step / 20),
                                "patches_per_s": speed * (1 + step % 4)}) + "\n")
        f.write('{"step": 22, "lo')  # torn last line of a killed run: skipped
    if monitor:
        with (path / "monitor.jsonl").open("w") as f:
            for i, acc in enumerate(knn):
                step = 5 * i
                f.write(json.dumps({"step": step, "epoch": step / 20, "elapsed_s": step * 1.8, "train_s": step * 0.3,
                                    "patches_seen": step * 20 * patches, "knn_top1": acc,
                                    "monitor_patches": 4, "monitor_s": 0.5, "n_bank": 100, "n_test": 50}) + "\n")
    if results:
        (path / "results.json").write_text(json.dumps({
            "linear_top1": 40.0 + patches, "knn_top1": 35.0 + patches, "test_patches": 2, "eval_view": "patches",
            "feature": "pre", "probe_protocol": "final-epoch",
            "probe_epoch": 2, "n_train": 200, "n_test": 100, "steps": 20, "train_seconds": 20.0 / speed,
            "monitor_seconds": 2.5, "feature_seconds": 1.0, "knn_seconds": 0.1, "probe_seconds": 0.5,
            "device": "cpu", **extra_results}))
    return path


def test_report_compares_runs_side_by_side(tmp_path, capsys):
    a = fake_run(tmp_path / "a", patches=4, speed=100.0)
    b = fake_run(tmp_path / "b", patches=8, speed=50.0)
    (a / "results-16.json").write_text(json.dumps({"linear_top1": 41.5, "knn_top1": 33.0, "test_patches": 16,
                                                   "eval_view": "patches", "data": "other.tar.gz"}))
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "rep")]) == 0
    out = tmp_path / "rep"
    md = (out / "report.md").read_text()
    # one column per run in the config table, one row per run in the accuracy table
    assert "|  | a | b |" in md and "| num_patches | 4 | 8 |" in md
    # an eval --out file beside it
    assert "| a | emp-ssl | results-16.json | other.tar.gz | patches | 41.5 | 33.0 | 16 |" in md
    assert "| a | emp-ssl | results.json | demo | patches | 44.0 | 39.0 | 2 |" in md
    assert "| b | emp-ssl | results.json | demo | patches | 48.0 | 43.0 |" in md
    # time table: train time from results.json, median patches/s without the first (warm-up) interval
    assert "| a | emp-ssl | cpu | 20 | 0.2 | 2.5 | 1.6 |" in md
    for name in ("loss", "lr", "throughput", "accuracy_vs_time", "accuracy_vs_epochs", "accuracy_vs_patches"):
        assert f"({name}.png)" in md
        assert_png(out / f"{name}.png")
    assert "no test_patch_ablation.json" in md and "tsne.png" in md  # missing optional files are notes
    assert "report written to" in capsys.readouterr().out


def test_loss_terms_are_the_ones_each_method_logged(tmp_path):
    a = read_run(fake_run(tmp_path / "a", patches=4, speed=10.0))  # EMP-SSL: loss, tcr, invariance
    v = fake_run(tmp_path / "v", patches=2, speed=10.0, method="vicreg")
    (v / "metrics.jsonl").write_text(json.dumps({"step": 2, "epoch": 0.1, "loss": 20.0, "invariance": 0.5,
                                                 "variance": 1.0, "covariance": 0.1, "lr": 0.3,
                                                 "patches_per_s": 5.0}) + "\n")
    assert loss_terms([a]) == ["loss", "tcr", "invariance"]
    assert loss_terms([a, read_run(v)]) == ["loss", "tcr", "invariance", "variance", "covariance"]
    assert loss_terms([read_run(v), a]) == ["loss", "invariance", "variance", "covariance", "tcr"]


def rec(step: int, knn: float | None, train_s: float) -> dict[str, object]:
    return {"step": step, "epoch": step / 10, "train_s": train_s, "knn_top1": knn}


def test_time_to_targets_takes_the_first_record_at_or_above_each_target():
    records = [rec(0, 12.0, 0.0), rec(10, 50.0, 4.0), rec(20, 49.0, 8.5), rec(25, None, 9.0), rec(30, 65.0, 12.0)]
    got = time_to_targets(records, [60, 50, 10, 50.0, 90])  # unsorted, with duplicates
    assert [t["target"] for t in got] == [10, 50, 60, 90]
    assert got[0] == {"target": 10, "reached": True, "train_s": 0.0, "epoch": 0.0, "step": 0, "knn_top1": 12.0}
    assert got[1]["reached"] and got[1]["step"] == 10 and got[1]["train_s"] == 4.0  # exactly at the target
    # first crossing, not interpolated, and not undone by the dip below 50 % at step 20
    assert got[2]["reached"] and (got[2]["step"], got[2]["train_s"], got[2]["epoch"]) == (30, 12.0, 3.0)
    assert got[3] == {"target": 90, "reached": False, "train_s": 12.0, "epoch": 3.0, "step": 30, "knn_top1": 65.0}


def test_time_to_targets_of_the_untrained_encoder_and_of_no_records():
    only_step0 = time_to_targets([rec(0, 55.0, 0.0)], [50, 60])
    assert only_step0[0]["reached"] and only_step0[0]["train_s"] == 0.0 and only_step0[0]["epoch"] == 0.0
    assert not only_step0[1]["reached"] and only_step0[1]["train_s"] == 0.0
    for t in time_to_targets([], [50]) + time_to_targets([rec(5, None, 1.0)], [50]):
        assert not t["reached"] and t["train_s"] is None and t["epoch"] is None


def test_report_targets_adds_to_the_defaults_sorted_and_unique():
    assert report_targets() == [50.0, 60.0, 70.0, 80.0]
    assert report_targets([75, 55.5, 60, 75]) == [50.0, 55.5, 60.0, 70.0, 75.0, 80.0]
    for bad in (0, -5, 101, float("nan")):
        with pytest.raises(ReportError, match="targets"):
            report_targets([bad])


def section(md: str, title: str) -> str:
    """The text of report section ``title`` (a "## " heading) up to the next "## " heading."""
    start = md.index(f"## {title}\n")
    end = md.find("\n## ", start + 3)
    return md[start:] if end < 0 else md[start:end]


def test_report_compares_methods_time_to_accuracy_and_where_the_time_went(tmp_path):
    # a: an EMP-SSL run with random-init numbers and timing
    a = fake_run(tmp_path / "a", patches=4, speed=100.0, knn=(10.0, 45.0, 60.0, 72.0, 75.0),
                 random_init={"linear_top1": 20.5, "knn_top1": 15.0},
                 timing={"startup": 1.0, "data": 2.0, "train": 15.0, "features": 1.0, "knn": 0.4, "probe": 0.6,
                         "total": 20.0})
    # b: a SimCLR run evaluated on whole images with a probe lr sweep, whose kNN never reaches 60 %
    b = fake_run(tmp_path / "b", patches=8, speed=50.0, method="simclr", knn=(10.0, 20.0, 30.0, 52.0, 55.0),
                 eval_view="full", feature="backbone", probe_protocol="lr-sweep", probe_lr=0.1, probe_epoch=100,
                 probe_sweep=[{"lr": 0.01, "val_top1": 40.0, "epoch": 90}, {"lr": 0.1, "val_top1": 47.5, "epoch": 100},
                              {"lr": 1.0, "val_top1": 30.0, "epoch": 12}],
                 timing={"compile": 4.0, "train": 30.0, "total": 40.0})
    c = fake_run(tmp_path / "c", patches=2, speed=10.0, method="vicreg", monitor=False)
    out = tmp_path / "rep"
    md = write_report([a, b, c], out, targets=[55]).read_text()

    assert "| a | emp-ssl | `" in md and "| b | simclr | `" in md  # the runs table
    assert "| method | emp-ssl | simclr | vicreg |" in md  # config table
    acc = section(md, "Accuracy")
    assert "| a | emp-ssl | results.json | demo | patches | 44.0 | 39.0 | 2 | pre | final-epoch | 2 |" in acc
    assert "| b | simclr | results.json | demo | full | 48.0 | 43.0 | - | backbone | lr-sweep, lr 0.1 | 100 |" in acc

    rand = section(md, "Trained vs random initialisation")
    assert "| a | emp-ssl | results.json | 44.0 | 20.5 | +23.5 | 39.0 | 15.0 | +24.0 |" in rand
    assert "| b |" not in rand  # b was not compared with its random initialisation

    sweep = section(md, "Linear-probe learning-rate sweeps")
    assert "### Linear-probe sweep: b (results.json)" in sweep
    assert "| 0.01 | 40.0 | 90 |  |" in sweep and "| 0.1 | 47.5 | 100 | yes |" in sweep
    assert "| 1 | 30.0 | 12 |  |" in sweep

    when = section(md, "Time and throughput")
    assert "| run | method | device | startup (s) | data (s) | compile (s) | train (s) | features (s) | knn (s) " \
           "| probe (s) | total (s) |" in when
    assert "| a | emp-ssl | cpu | 1.0 (5 %) | 2.0 (10 %) | - | 15.0 (75 %) | 1.0 (5 %) | 0.4 (2 %) | 0.6 (3 %) " \
           "| 20.0 |" in when
    assert "| b | simclr | cpu | - | - | 4.0 (10 %) | 30.0 (75 %) | - | - | - | 40.0 |" in when
    assert "No timing in results.json of c" in when

    tta = section(md, "Time to accuracy")
    assert "| run | method | kNN >= 50 % | kNN >= 55 % | kNN >= 60 % | kNN >= 70 % | kNN >= 80 % |" in tta
    # a: 50 and 60 % first at step 10 (exactly 60), 70 % at step 15, 80 % never (last record: step 20)
    assert ("| a | emp-ssl | 3.0 s (0.5 epochs) | 3.0 s (0.5 epochs) | 3.0 s (0.5 epochs) | 4.5 s (0.75 epochs) "
            "| not reached in 6.0 s (1.0 epochs) |") in tta
    assert ("| b | simclr | 4.5 s (0.75 epochs) | 6.0 s (1.0 epochs) | not reached in 6.0 s (1.0 epochs) "
            "| not reached in 6.0 s (1.0 epochs) | not reached in 6.0 s (1.0 epochs) |") in tta
    assert "not interpolated" in tta
    assert "| c |" not in tta.split("### ")[0] and "No monitor.jsonl in c" in tta  # a note, not a row
    for name in ("accuracy_vs_time", "accuracy_vs_epochs"):
        assert f"({name}.png)" in tta
        assert_png(out / f"{name}.png")


def test_report_without_any_monitor_says_so(tmp_path):
    run = fake_run(tmp_path / "r", patches=4, speed=10.0, monitor=False)
    md = write_report([run], tmp_path / "rep").read_text()
    tta = section(md, "Time to accuracy")
    assert "kNN >= 50 %" not in tta and "No monitor.jsonl in r" in tta
    assert "kNN accuracy vs epochs: no monitor.jsonl in any run." in tta
    assert not (tmp_path / "rep" / "accuracy_vs_epochs.png").exists()
    assert "No results.json holds a timing breakdown" in md


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
