"""Training runs: the run directory, resume after SIGKILL (bitwise), non-finite loss, end-to-end accuracy."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from empssl.checkpoint import load_checkpoint, read_checkpoint
from empssl.config import Config
from empssl.train import TrainError, train

from .conftest import TINY


def tiny_cfg(data_dir, **kw) -> Config:
    base = dict(data="demo", data_dir=str(data_dir), width=4, hidden_dim=32, z_dim=16, patch_size=8,
                num_patches=4, batch_size=20, train_subset=200, test_subset=100, test_patches=2,
                probe_epochs=2, device="cpu", log_every=2, checkpoint_every=3)
    return Config(**{**base, **kw})


def test_run_directory_contents(tmp_path, data_dir):
    out = tmp_path / "run"
    results = train(tiny_cfg(data_dir, epochs=1), out, progress=False, log=lambda s: None)
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "results.json"} <= {p.name for p in out.iterdir()}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["width"] == 4 and cfg["version"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6, 8, 10]
    for r in lines:
        assert {"loss", "tcr", "invariance", "lr", "patches_per_s", "epoch"} <= set(r)
        assert r["tcr"] > 0 and -1 <= r["invariance"] <= 1 and r["patches_per_s"] > 0
    assert lines[0]["lr"] > lines[-1]["lr"]
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["test_patches"] == 2 and 0 <= on_disk["linear_top1"] <= 100 and 0 <= on_disk["knn_top1"] <= 100
    assert results["linear_top1"] == on_disk["linear_top1"]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 10 and ckpt["finished"] and set(ckpt["rng"]) == {"patches", "torch"}
    model, cfg2, _ = load_checkpoint(out)
    assert cfg2.width == 4


def test_schedule_length_follows_dataset_and_schedule_epochs(tmp_path, data_dir):
    out = tmp_path / "run"
    train(tiny_cfg(data_dir, epochs=1, schedule_epochs=2, train_subset=100), out, progress=False,
          log=lambda s: None, evaluate_at_end=False)
    ckpt = read_checkpoint(out)
    assert ckpt["total_steps"] == 5 and ckpt["schedule_steps"] == 10
    last_lr = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["lr"]
    assert last_lr == pytest.approx(0.3 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 4 / 10)).item()))


def test_non_finite_loss_stops_with_clear_error(tmp_path, data_dir):
    out = tmp_path / "run"
    with pytest.raises(TrainError, match="non-finite"):
        train(tiny_cfg(data_dir, lr=1e30, epochs=2), out, progress=False, log=lambda s: None)
    if (out / "checkpoint.pt").exists():  # whatever was kept must be finite
        state = read_checkpoint(out)["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def _cli(out, data_dir, *extra):
    cmd = [sys.executable, "-m", "empssl.cli", "train", "--data", "demo", "--data-dir", str(data_dir),
           "--out", str(out), "--no-eval", "--no-progress", "--train-subset", "400", "--epochs", "5",
           "--checkpoint-every", "4", *TINY, "--width", "8", "--patch-size", "16", *extra]
    return cmd


def test_sigkill_then_resume_is_bitwise_identical(tmp_path, data_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_cli(ref, data_dir), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(_cli(killed, data_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = read_checkpoint(killed)["step"]
    total = read_checkpoint(ref)["step"]
    assert 0 < step_at_kill < total, "the run finished before it could be killed; the test proved nothing"

    done = subprocess.run(_cli(killed, data_dir), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = read_checkpoint(ref), read_checkpoint(killed)
    assert b["step"] == total and b["finished"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"])


@pytest.mark.slow
def test_end_to_end_trained_beats_random_init(tmp_path, data_dir):
    """Real images (the bundled CIFAR-10 subset): a short EMP-SSL run must beat its own initialisation."""
    cfg = tiny_cfg(data_dir, width=8, hidden_dim=256, z_dim=64, patch_size=16, num_patches=8, batch_size=50,
                   train_subset=1000, test_subset=500, epochs=3, test_patches=4, probe_epochs=30,
                   compare_random_init=True)
    results = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    trained, random_init = results["linear_top1"], results["random_init"]["linear_top1"]
    # Measured: 26.8 vs 17.8 (seed 0), 25.0 vs 16.4 (seed 1) with torch 2.14.1 on 2 CPU cores.
    assert trained > random_init + 5.0, (trained, random_init)
