import os
import signal
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
