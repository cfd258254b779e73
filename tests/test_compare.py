"""`empssl compare`: every method for the same wall-clock budget, then the time-to-accuracy report (toy size)."""

import functools
import itertools
import json
import math

import pytest

from empssl import compare as cmp
from empssl.cli import build_parser, main
from empssl.compare import CALIBRATION_FRACTION, MONITOR_POINTS, method_config, plan_run
from empssl.config import Config, ConfigError
from empssl.rundir import RunLock

METHOD_NAMES = ("emp-ssl", "simclr", "vicreg", "byol")  # the methods with a compare-demo recipe


def ticking(seconds):
    """A clock that moves ``seconds`` at every reading: every calibration run takes exactly that, however busy the
    machine is."""
    now = itertools.count(0.0, seconds)
    return lambda: next(now)


def compare_with_clock(monkeypatch, clock):
    """`empssl compare` (the command line) calibrating with ``clock``."""
    monkeypatch.setattr(cmp, "compare", functools.partial(cmp.compare, clock=clock))


def test_plan_sizes_the_schedule_to_the_budget():
    cfg = Config(method="simclr", batch_size=256, warmup_epochs=10, epochs=1000)
    planned = plan_run(cfg, steps_per_s=20.0, budget_seconds=120, n_train=50000)
    steps = 120 * 20
    assert planned.epochs == steps / (50000 // 256) and planned.schedule_epochs == 0
    assert planned.warmup_epochs == 0.1 * planned.epochs  # a tenth of the sized schedule at most
    assert planned.eval_every == steps // MONITOR_POINTS


def test_compare_takes_the_model_and_patch_flags_for_every_method():
    from empssl.cli import _explicit

    argv = ["compare", "--out", "x", "--budget-seconds", "60", "--width", "8", "--num-patches", "4",
            "--patch-size", "16", "--hidden-dim", "64", "--z-dim", "32", "--pred-hidden-dim", "48",
            "--crop-scale", "0.3", "0.9", "--arch", "resnet18-cifar"]
    overrides = _explicit(build_parser().parse_args(argv))
    assert overrides == {"width": 8, "num_patches": 4, "patch_size": 16, "hidden_dim": 64, "z_dim": 32,
                         "pred_hidden_dim": 48, "crop_scale": (0.3, 0.9), "arch": "resnet18-cifar"}
    for method in METHOD_NAMES:
        cfg = method_config(method, overrides)
        assert (cfg.width, cfg.patch_size, cfg.hidden_dim, cfg.z_dim, cfg.crop_scale) == (8, 16, 64, 32, (0.3, 0.9))
        assert cfg.lr == method_config(method, {}).lr  # the rest stays the method's own recipe


def test_patch_chunks_go_to_emp_ssl_only():
    cfgs = {m: method_config(m, {"num_patches": 20, "patch_chunks": 4}) for m in METHOD_NAMES}
    assert {m: c.patch_chunks for m, c in cfgs.items()} == {m: 4 if m == "emp-ssl" else 1 for m in METHOD_NAMES}


def test_compare_demo_recipes_share_data_width_and_view_size():
    cfgs = [method_config(m, {}, recipes="compare-demo") for m in METHOD_NAMES]
    assert {(c.data, c.width, c.patch_size) for c in cfgs} == {("demo", 8, 16)}
    assert [c.method for c in cfgs] == list(METHOD_NAMES)
    own = {m: method_config(m, {}) for m in METHOD_NAMES}
    for c in cfgs:  # each keeps its own recipe's loss and crops
        assert c.crop_scale == own[c.method].crop_scale and c.lars_eta == own[c.method].lars_eta
    with pytest.raises(ConfigError, match="unknown --preset"):
        method_config("simclr", {}, recipes="no-such")


def test_calibration_stays_within_its_share_of_the_budget(monkeypatch):
    """The probe (3 steps) measures the step time and the set-up; the second run gets the steps that fit the rest."""
    calls = []
    step_s, set_up = 0.05, 0.4

    def fake(cfg, data, steps, log_every, clock):
        calls.append(steps)
        views = cfg.batch_size * cfg.num_patches
        return views / step_s, set_up + steps * step_s

    monkeypatch.setattr(cmp, "_throughput", fake)
    monkeypatch.setattr(cmp, "_warm", True)
    cfg = method_config("emp-ssl", {"batch_size": 10, "num_patches": 4})
    data = ([0] * 100, [0] * 10)
    got = cmp.calibrate(cfg, data, max_seconds=2.02, log=lambda s: None)
    assert calls == [3, 21]  # the probe took 0.55 s, a run's set-up is 0.4 s: (2.02 - 0.55 - 0.4) / 0.05 = 21.4
    assert got["seconds"] <= 2.02 and got["steps"] == 24 and got["steps_per_s"] == pytest.approx(1 / step_s)
    calls.clear()
    assert cmp.calibrate(cfg, data, max_seconds=100.0, log=lambda s: None)["steps"] == 3 + cmp.CALIBRATION_STEPS
    calls.clear()
    assert cmp.calibrate(cfg, data, max_seconds=0.9, log=lambda s: None)["steps"] == 3 and calls == [3]
    with pytest.raises(ConfigError, match=r"cannot fit one calibration.*--budget-seconds >= 6\b"):
        cmp.calibrate(cfg, data, max_seconds=0.5, log=lambda s: None)


def test_compare_refuses_a_budget_too_small_for_one_calibration(tmp_path, data_dir, capsys, monkeypatch):
    compare_with_clock(monkeypatch, ticking(1.0))  # the probe takes 1 s: more than 10 % of 5 s
    argv = ["compare", "--smoke", "--budget-seconds", "5", "--out", str(tmp_path / "cmp"), "--data-dir",
            str(data_dir), "--no-progress", "--methods", "simclr"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 steps took 1.0 s" in err[0] and "--budget-seconds >= 10 " in err[0], err
    assert not (tmp_path / "cmp" / "simclr").exists()  # nothing trained


def test_compare_refuses_a_folder_another_comparison_writes(tmp_path, data_dir, capsys, monkeypatch):
    compare_with_clock(monkeypatch, ticking(0.05))
    out = tmp_path / "cmp"
    out.mkdir()
    argv = ["compare", "--smoke", "--budget-seconds", "20", "--out", str(out), "--data-dir", str(data_dir),
            "--no-progress", "--methods", "simclr"]
    with RunLock(out, print):  # the folder's lock, as a running comparison holds it
        assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out} is being written by" in err[0], err
    assert not (out / "plan.json").exists() and not (out / "simclr").exists()


@pytest.mark.slow
def test_compare_smoke_trains_every_method_and_reports(tmp_path, data_dir, capsys, monkeypatch):
    tick = 0.05  # each calibration run: the probe alone, or the probe and a longer run, within 10 % of 20 s
    compare_with_clock(monkeypatch, ticking(tick))
    # every run's measured rate 1,280 views/s: schedules of 200 (emp-ssl, 128 views a step) or 400 steps (the
    # others, 64), however fast the machine is (a faster CI machine's longer VICReg schedule once went non-finite)
    monkeypatch.setattr(cmp, "median_throughput", lambda rows: 1280.0)
    out = tmp_path / "cmp"
    argv = ["compare", "--smoke", "--budget-seconds", "20", "--out", str(out), "--data-dir", str(data_dir),
            "--no-progress", "--targets", "15"]
    assert main(argv) == 0, capsys.readouterr().err  # (what refused it: once seen on a loaded machine)
    printed = capsys.readouterr().out
    summary = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in summary["rows"]] == ["emp-ssl", "simclr", "vicreg", "byol"]
    for m, entry in summary["plan"]["methods"].items():  # each calibration timed by the clock, run by run
        assert entry["steps_per_s"] == (10.0 if m == "emp-ssl" else 20.0)
        calibration = entry["calibration"]
        runs = 1 + (calibration["steps"] > cmp.PROBE_STEPS)
        assert calibration["seconds"] == pytest.approx(runs * tick), (m, entry)
        assert calibration["fraction_of_budget"] == round(calibration["seconds"] / 20, 4) <= CALIBRATION_FRACTION
    for row in summary["rows"]:
        results = json.loads((out / row["run"] / "results.json").read_text())
        assert math.isfinite(row["linear_top1"]) and row["linear_top1"] == results["linear_top1"]
        assert row["train_seconds"] > 0
        assert row["eval_view"] == ("patches" if row["method"] == "emp-ssl" else "full")
        monitor = (out / row["run"] / "monitor.jsonl").read_text().splitlines()
        assert len(monitor) >= 2  # step 0 and at least one point during training
    report = (out / "report.md").read_text()
    assert "Time to accuracy" in report and "15" in report
    assert (out / "accuracy_vs_time.png").is_file() and (out / "accuracy_vs_epochs.png").is_file()
    summary_lines = [line for line in printed.splitlines() if " after " in line and "epochs)" in line]
    assert [line.split(":")[0] for line in summary_lines] == ["emp-ssl", "simclr", "vicreg", "byol"]

    # resumable: a second call reads the finished runs back
    assert main(argv) == 0
    assert capsys.readouterr().out.count("not retrained") == 4
