"""The bench scripts at toy size: gpu_check.py --smoke (the GPU check's code paths on the CPU), stream_bench.py smoke"""

import importlib.util
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


@pytest.mark.slow  # about 40 CPU-s (2.5 min at load 10) on the 2-core machine: nine processes importing torch
def test_stream_bench_smoke(tmp_path, capsys, monkeypatch):
    """bench/stream_bench.py smoke: issue 21's streamed-engine rows at toy size, the S3 row on moto's server."""
    pytest.importorskip("litdata")
    pytest.importorskip("moto.server")  # the test extra: moto[server]
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # the row's own server on 127.0.0.1
    spec = importlib.util.spec_from_file_location("stream_bench", ROOT / "bench" / "stream_bench.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["smoke", "--root", str(tmp_path)]) == 0
    rows: dict[str, list[dict]] = {}
    for line in capsys.readouterr().out.splitlines():
        row = json.loads(line)  # every line is one JSON object
        rows.setdefault(row["row"], []).append(row)
    assert {"versions", "shard write", "throughput: streamed source", "throughput: in-memory decoder",
            "throughput: streamed / in-memory, per CPU-second", "startup to the first batch", "peak RSS, stream",
            "peak RSS, memory", "s3: uploaded", "s3 vs local: s3", "s3 vs local: local"} == set(rows)
    assert [r["images"] for r in rows["shard write"]] == [4 * 30 + 4 * 5, 200 + 200]  # train + val of each tree
    streamed = rows["throughput: streamed source"][0]
    assert streamed["images"] == 2 * 20 and streamed["images_per_cpu_s"] > 0  # --steps 2 of --batch-size 20
    assert rows["throughput: in-memory decoder"][0]["images"] == 4 * 30  # the tree's train split, decoded
    assert rows["throughput: streamed / in-memory, per CPU-second"][0]["ratio"] > 0
    startup = rows["startup to the first batch"][0]
    assert startup["train_images"] == 200 and startup["first_batch_s"] > 0 and startup["images"] == 20
    for mode in ("stream", "memory"):
        (memory,) = rows[f"peak RSS, {mode}"]
        assert memory["peak_pss_tree_mib"] >= memory["peak_pss_anon_tree_mib"] > 0 and memory["peak_rss_mib"] > 0
        assert memory["images"] == 40
    for where in ("s3", "local"):
        assert rows[f"s3 vs local: {where}"][0]["images"] == 40
    assert rows["s3 vs local: s3"][0]["data"].startswith("s3://")
    assert rows["s3 vs local: s3"][0]["requests"]["GET"] > 0  # counted from the server's access log
