"""bench/data.py --smoke: the data benchmark's rows at toy size (a few seconds)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("litdata")


def test_data_bench_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_data", ROOT / "bench" / "data.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--json", str(tmp_path / "rows.json")]) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert {"shard write", "shard write --max-side 256", "decode PIL", "decode torchvision",
            "decode + 2 patches"} <= set(rows)
    assert all(wall > 0 and cpu > 0 for wall, cpu in rows.values())
    out = capsys.readouterr().out
    assert "500x375" in out and "images/s" in out
    files = bench.make_jpegs(2)
    assert all(80_000 < len(f) < 140_000 for f in files)  # about an ImageNet photo's size
