import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from empssl.data import ImageData, load_data

TINY = ["--width", "4", "--hidden-dim", "32", "--z-dim", "16", "--patch-size", "8", "--num-patches", "4",
        "--batch-size", "20", "--test-patches", "2", "--probe-epochs", "2", "--device", "cpu"]


def assert_hit_rate(top1: float, n: int) -> None:
    """``top1`` (%) is k / n for a whole number k of the ``n`` test images: an accuracy measured on exactly those."""
    hits = top1 * n / 100
    assert abs(hits - round(hits)) < 1e-6 and 0 <= round(hits) <= n, (top1, n)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data dir whose cache already holds the decoded bundled demo subset (decoded once per session)."""
    d = tmp_path_factory.mktemp("data")
    load_data("demo", str(d), progress=False)
    return d


@pytest.fixture(scope="session")
def demo_data(data_dir) -> tuple[ImageData, ImageData]:
    return load_data("demo", str(data_dir), progress=False)


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    # Subprocesses started by tests get the same thread count as this process, so runs compare bitwise.
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))


def default_sigint() -> None:
    """``preexec_fn`` of a subprocess that a test interrupts with SIGINT: Ctrl-C's default handling (Python's
    KeyboardInterrupt), also where the test run itself was started with SIGINT ignored, as a background job of a
    non-interactive shell is (and so every process it starts)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def lock_held_elsewhere(path: Path, in_file: str = "1") -> Iterator[subprocess.Popen]:
    """Another process holding the :class:`empssl.files.WriterLock` on ``path``, its file saying ``in_file`` (as the
    PID a killed writer left there would); killed (SIGKILL) when the block ends, leaving the file."""
    script = ("import os, sys; from pathlib import Path; from empssl.files import WriterLock\n"
              "lock = WriterLock(Path(sys.argv[1]), str, lambda s: None).__enter__()\n"
              "os.ftruncate(lock.fd, 0); os.pwrite(lock.fd, sys.argv[2].encode(), 0)\n"
              "print('ready', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", script, str(path), in_file], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()
