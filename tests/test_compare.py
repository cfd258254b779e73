"""`empssl compare`: every method for the same wall-clock budget, then the time-to-accuracy report (toy size)."""

import json

from empssl.cli import main
from empssl.compare import MONITOR_POINTS, plan_run
from empssl.config import Config


def test_plan_sizes_the_schedule_to_the_budget():
    cfg = Config(method="simclr", batch_size=256, warmup_epochs=10, epochs=1000)
    planned = plan_run(cfg, steps_per_s=20.0, budget_seconds=120, n_train=50000)
    steps = 120 * 20
    assert planned.epochs == steps / (50000 // 256) and planned.schedule_epochs == 0
    assert planned.warmup_epochs == 0.1 * planned.epochs  # a tenth of the sized schedule at most
    assert planned.eval_every == steps // MONITOR_POINTS


def test_compare_smoke_trains_every_method_and_reports(tmp_path, data_dir, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--smoke", "--budget-seconds", "3", "--out", str(out), "--data-dir", str(data_dir),
            "--no-progress", "--targets", "15"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in summary["rows"]] == ["emp-ssl", "simclr", "vicreg", "byol"]
    for row in summary["rows"]:
        assert 0 <= row["linear_top1"] <= 100 and row["train_seconds"] > 0
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
