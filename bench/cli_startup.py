"""Wall and CPU time of the command line's start: ``empssl --help``, ``empssl train --help``, a bad flag and a bad
method setting, each in a new process (medians of ``--runs``), and whether it imported torch.

    PYTHONPATH=src python bench/cli_startup.py            # this checkout
    cd OTHER && .venv/bin/python /path/to/bench/cli_startup.py   # another checkout's empssl (its editable install)

Wall time on a shared machine includes waiting for the neighbours (the load average is printed); the process's CPU
seconds (user + system) do not, nor does "torch imported".
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

CASES = {"empssl --help": ["--help"], "empssl train --help": ["train", "--help"],
         "empssl train --epochs x (bad flag)": ["train", "--out", "x", "--epochs", "x"],
         "empssl train --method byol --tau-base 2 (bad method setting)": ["train", "--out", "x", "--method", "byol",
                                                                          "--tau-base", "2"]}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
    except OSError:
        found = None
    return found.group(1) if found else platform.processor() or platform.machine()


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(argv: list[str], *flags: str) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """(wall seconds, CPU seconds, the finished process) of ``python -m empssl.cli ARGV``."""
    t, cpu = time.perf_counter(), cpu_of_children()
    done = subprocess.run([sys.executable, *flags, "-m", "empssl.cli", *argv], capture_output=True, text=True)
    return time.perf_counter() - t, cpu_of_children() - cpu, done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="processes timed per command (default: 10)")
    args = ap.parse_args(argv)
    spec = importlib.util.find_spec("empssl")
    torch_spec = importlib.util.find_spec("torch")
    torch_version = "absent"
    if torch_spec is not None and torch_spec.origin:  # read, not imported: the version file beside the package
        found = re.search(r"__version__ = .*?'([^']+)'", open(os.path.join(os.path.dirname(torch_spec.origin),
                                                                             "version.py")).read())
        torch_version = found.group(1) if found else "?"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"empssl from {os.path.dirname(spec.origin or '?') if spec else '?'}; Python {platform.python_version()}, "
          f"torch {torch_version}; {cpu_name()}, {cores} usable cores, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average "
          f"{os.getloadavg()[0]:.1f}")
    for name, case in CASES.items():
        wall, cpu, _ = zip(*(run(case) for _ in range(args.runs)))
        traced = run(case, "-X", "importtime")[2]
        torch_loaded = re.search(r"\|\s+torch$", traced.stderr, re.M) is not None
        print(f"{name}: {statistics.median(wall):.3f} s wall ({min(wall):.3f}-{max(wall):.3f}), "
              f"{statistics.median(cpu):.3f} s CPU, median of {len(wall)}; exit {traced.returncode}, torch imported: "
              f"{'yes' if torch_loaded else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
