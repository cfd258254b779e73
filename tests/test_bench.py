"""bench/gpu_check.py --smoke: the GPU check's code paths at toy size on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import assert_hit_rate

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # about 70 s on the 2-core CPU machine
def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "check"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=1800)  # a ceiling against a hang
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    assert set(data["parts"]) == {"throughput", "probe", "run", "stream", "chunks"}
    groups = {r["chunks"]: r for r in data["parts"]["chunks"]["rows"]}
    assert set(groups) == {1, 4} and all(r["peak_gib"] > 0 and r["step_s"] > 0 for r in groups.values())
    assert data["parts"]["stream"]["arriving_images_per_s"] > 0 and data["parts"]["stream"]["decode"] == "cpu"
    rows = data["parts"]["throughput"]["20 patches, eager"]["rows"]
    assert {"augment", "step", "end-to-end", "eval"} <= set(rows)
    run = data["parts"]["run"]
    assert run["timing"]["total"] > 0
    # the smoke run's accuracies (at 128 and at 16 test patches) are hit counts over its test images
    for acc in (run["linear_top1"], run["knn_top1"], run["eval16"]["linear_top1"], run["eval16"]["knn_top1"]):
        assert_hit_rate(acc, run["n_test"])
    table = (out / "gpu_check.md").read_text()
    assert "probe <= 3 s" in table and "linear @16 >= 75.0" in table
