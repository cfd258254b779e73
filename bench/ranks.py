"""Steps per second of a tiny CPU training run with 1 and with N torchrun ranks (gloo) on this machine.

Each rank takes batch / N images of every step, so on a machine with N free cores N ranks should step about as
fast as one process (half the work each, half the cores each); threads that oversubscribe the cores make them
slower. The run's timed steps are those of metrics.jsonl after the first log line (which holds the warm-up):

    PYTHONPATH=src python bench/ranks.py --data-dir ./data --ranks 1,2
    OMP_NUM_THREADS=2 PYTHONPATH=src python bench/ranks.py --data-dir ./data   # a user's own setting
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from empssl.data import load_data

PATCHES, BATCH = 8, 32


def steps_per_s(ranks: int, data_dir: str, steps: int) -> float:
    """Median steps/s over the log lines after the first of one ``torchrun --nproc-per-node ranks`` run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "empssl.cli", "train", "--data", "demo", "--data-dir", data_dir, "--out", str(out),
               "--no-eval", "--no-progress", "--device", "cpu", "--width", "16", "--patch-size", "16",
               "--num-patches", str(PATCHES), "--batch-size", str(BATCH), "--train-subset", str(BATCH * steps),
               "--epochs", "1", "--log-every", "2", "--checkpoint-every", "1000"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"torchrun failed:\n{done.stderr[-3000:]}")
        lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()][1:]
        return statistics.median(r["patches_per_s"] for r in lines) / (PATCHES * BATCH)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="./data", help="where the bundled demo images are decoded once")
    ap.add_argument("--ranks", default="1,2", help="comma-separated numbers of ranks, one run each")
    ap.add_argument("--steps", type=int, default=20, help="training steps per run (one epoch)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per number of ranks (the median is printed)")
    args = ap.parse_args(argv)
    load_data("demo", args.data_dir, progress=False)  # decoded once, before any timed run
    print(f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}; EMP-SSL width 16, "
          f"{PATCHES} patches x {BATCH} images of 16 px (global batch), {args.steps} steps")
    for n in (int(s) for s in args.ranks.split(",")):
        runs = [steps_per_s(n, args.data_dir, args.steps) for _ in range(args.repeats)]
        print(f"{n} rank(s): {statistics.median(runs):.2f} steps/s (median of {len(runs)}; "
              f"{min(runs):.2f}-{max(runs):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
