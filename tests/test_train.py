"""Training runs: the run directory, resume after SIGKILL (bitwise), non-finite loss, end-to-end accuracy."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from empssl.checkpoint import read_checkpoint
from empssl.cli import main
from empssl.config import Config
from empssl.evaluate import evaluate
from empssl.files import read_jsonl
from empssl.rundir import RunLock, load_checkpoint
from empssl.train import TrainError, config_data, train

from .conftest import TINY, lock_held_elsewhere


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
    assert on_disk["test_patches"] == 2 and results["linear_top1"] == on_disk["linear_top1"]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 10 and ckpt["finished"] and set(ckpt["rng"]) == {"patches", "torch", "device"}
    model, cfg2, _ = load_checkpoint(out)
    assert cfg2.width == 4
    # the accuracies are those of the saved weights: evaluating the checkpoint again gives them exactly
    again = evaluate(model, *config_data(cfg2, progress=False), cfg2, "cpu", progress=False, log=lambda s: None)
    assert (again["linear_top1"], again["knn_top1"]) == (on_disk["linear_top1"], on_disk["knn_top1"])


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
           "--checkpoint-every", "4", "--log-every", "1", *TINY, "--width", "8", "--patch-size", "16", *extra]
    return cmd


# `empssl train` that SIGKILLs itself as its 7th step begins: after the checkpoint of step 4, with steps 5 and 6
# done and lost (the same point however fast or busy the machine is).
_KILLED_AT_STEP_7 = """
import importlib, os, signal, sys
from empssl.cli import main
t = importlib.import_module("empssl.train")  # the module (empssl.train is the function)
real, steps = t.train_step, []
def step(*args, **kwargs):
    steps.append(1)
    if len(steps) == 7:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
t.train_step = step
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_then_resume_is_bitwise_identical(tmp_path, data_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_cli(ref, data_dir), check=True, env=env, capture_output=True)

    proc = subprocess.run([sys.executable, "-c", _KILLED_AT_STEP_7, *_cli(killed, data_dir)[3:]], env=env,
                          capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    total = read_checkpoint(ref)["step"]
    assert read_checkpoint(killed)["step"] == 4 and total > 7

    done = subprocess.run(_cli(killed, data_dir), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = read_checkpoint(ref), read_checkpoint(killed)
    assert b["step"] == total and b["finished"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"])
    # metrics.jsonl was cut back to the checkpoint: one line per step, the same losses as the uninterrupted run
    ref_lines, lines = (read_jsonl(d / "metrics.jsonl") for d in (ref, killed))
    assert [r["step"] for r in lines] == [r["step"] for r in ref_lines] == list(range(1, total + 1))
    assert [r["loss"] for r in lines] == [r["loss"] for r in ref_lines]
    # the killed process's lock was taken over with a note; no lock and no temporary file are left behind
    assert "was left by a writer that was killed (or copied with its folder); lock taken over" in done.stdout
    assert not (killed / ".lock").exists() and not list(killed.glob(".*.tmp"))


def test_a_second_writer_of_a_run_directory_is_refused_naming_the_live_holder(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    out.mkdir()
    args = ["train", "--data", "demo", "--data-dir", str(data_dir), "--out", str(out), "--no-eval", "--no-progress",
            "--train-subset", "40", *TINY]
    with RunLock(out, log=print):  # this process writes the run (a notebook's second train() into it)
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and f"by this process (PID {os.getpid()})" in err
        assert not (out / "config.json").exists()  # refused before anything was written
    assert not (out / ".lock").exists()  # released
    # another process holds it, its file naming PID 1 (as a killed writer's PID left there would): the kernel's
    # holder is named, not the file's
    with lock_held_elsewhere(out / ".lock", in_file="1\n") as holder:
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert f"is being written by another empssl process (PID {holder.pid}); wait" in err
    # the holder killed: its file is taken over with a note that names no PID (the file's is not the writer's)
    assert main(args) == 0
    note = [line for line in capsys.readouterr().out.splitlines() if "lock taken over" in line]
    assert note == [f"{out / '.lock'} was left by a writer that was killed (or copied with its folder); lock taken "
                    f"over"]
    assert not (out / ".lock").exists()


# The trainer, its loop replaced: a forked child and a DataLoader worker (both inheriting the lock's descriptor)
# are started, then the pid of the child is written to MARK and the trainer waits to be killed.
_FORKING_TRAINER = """
import importlib, os, sys, time
import torch
train_module = importlib.import_module("empssl.train")
from empssl.cli import main

def loop(run, *args, **kwargs):
    child = os.fork()
    if child == 0:
        time.sleep(600)
        os._exit(0)
    batches = iter(torch.utils.data.DataLoader(range(8), num_workers=1))
    next(batches)
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(child))
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(600)

train_module.loop = loop
sys.exit(main(sys.argv[2:]))
"""


def test_the_same_command_right_after_kill_9_is_accepted_though_children_live_on(tmp_path, data_dir):
    out, mark = tmp_path / "run", tmp_path / "child.pid"
    argv = _cli(out, data_dir)[3:]  # empssl.cli's arguments
    proc = subprocess.Popen([sys.executable, "-c", _FORKING_TRAINER, str(mark), *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    child = None
    try:
        deadline = time.time() + 300  # a ceiling for a busy machine, not a measurement
        while not mark.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert mark.exists(), f"the trainer did not reach its loop (exit status {proc.poll()})"
        child = int(mark.read_text())
        proc.kill()
        proc.wait()
        os.kill(child, 0)  # the forked child lives on, holding the lock's descriptor
        done = subprocess.run([sys.executable, "-m", "empssl.cli", *argv], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "lock taken over" in done.stdout and read_checkpoint(out)["finished"]
    finally:
        proc.kill()
        if child is not None:
            os.kill(child, signal.SIGKILL)


def test_a_killed_writers_temporary_files_are_removed_at_the_next_start(tmp_path, data_dir):
    out = tmp_path / "run"
    cfg = tiny_cfg(data_dir, epochs=0.5, schedule_epochs=1, train_subset=100)
    train(cfg, out, progress=False, log=lambda s: None, evaluate_at_end=False)
    debris = [out / ".checkpoint.pt.k1llme.tmp", out / ".results.json.x.tmp"]  # as a SIGKILL mid-write leaves them
    for p in debris:
        p.write_bytes(b"half a file")
    (out / "keep.tmp").write_text("not ours")
    # and the lines a killed session logged after its last checkpoint (step 2), one of them torn
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')
    lines: list[str] = []
    train(cfg.replace(epochs=1), out, progress=False, log=lines.append, evaluate_at_end=False)
    assert not any(p.exists() for p in debris) and (out / "keep.tmp").exists()
    assert any("removed 2 temporary file(s)" in line for line in lines)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [2, 4, 5]


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


def test_a_non_finite_loss_never_reaches_the_weights(tmp_path, data_dir, monkeypatch):
    """A NaN injected into the loss of step 3: its update is skipped on the device (no host sync), the run goes on
    to the next step that syncs (the checkpoint step 4), stops there naming step 3, and keeps the last good
    checkpoint (step 2)."""
    train_module = importlib.import_module("empssl.train")
    from empssl.methods.emp_ssl import EMPSSL

    real_loss, real_step = EMPSSL.loss, train_module.train_step
    calls, states = [0], []

    def loss(self, net, views, amp, dist=None):
        calls[0] += 1
        terms = real_loss(self, net, views, amp)
        return terms * float("nan") if calls[0] == 3 else terms

    def step(net, *args, **kw):
        out = real_step(net, *args, **kw)
        states.append({k: v.clone() for k, v in net.state_dict().items()})
        return out

    monkeypatch.setattr(EMPSSL, "loss", loss)
    monkeypatch.setattr(train_module, "train_step", step)
    out = tmp_path / "run"
    with pytest.raises(TrainError, match="non-finite at step 3 .*stopped at step 4.*checkpoint \\(step 2\\)"):
        train(tiny_cfg(data_dir, epochs=1, log_every=5, checkpoint_every=2), out, progress=False,
              log=lambda s: None)
    assert len(states) == 4  # step 4 ran on the device before the check at the checkpoint step
    params = [k for k, v in states[0].items() if "running" not in k and "num_batches" not in k]
    for k in params:  # the weights after step 3 are those after step 2; step 4 (finite) trained again
        assert torch.equal(states[2][k], states[1][k]), k
    assert any(not torch.equal(states[3][k], states[2][k]) for k in params)
    assert all(torch.isfinite(states[3][k]).all() for k in params)
    ckpt = read_checkpoint(out)
    assert ckpt["step"] == 2
    assert not (out / "results.json").exists()


def test_a_checkpoint_of_another_device_resumes_with_a_note(tmp_path, data_dir):
    """A CUDA generator state (16 bytes) cannot be loaded into a CPU generator: the run says so in one line,
    reseeds the views' generator from (seed, step) and goes on."""
    out = tmp_path / "run"
    cfg = tiny_cfg(data_dir, epochs=1, schedule_epochs=2)
    train(cfg, out, progress=False, log=lambda s: None, evaluate_at_end=False)
    ckpt = read_checkpoint(out)
    ckpt["rng"]["patches"] = torch.zeros(16, dtype=torch.uint8)  # the size of a CUDA (Philox) generator state
    ckpt["rng"]["device"] = "cuda"
    ckpt["finished"] = False
    torch.save(ckpt, out / "checkpoint.pt")
    lines: list[str] = []
    train(cfg.replace(epochs=2), out, progress=False, log=lines.append, evaluate_at_end=False)
    notes = [line for line in lines if "not bitwise" in line]
    assert len(notes) == 1 and "written on cuda" in notes[0] and "resumes on cpu" in notes[0]
    assert read_checkpoint(out)["step"] == 20 and read_checkpoint(out)["rng"]["device"] == "cpu"


def test_results_account_for_the_wall_clock(tmp_path, data_dir, monkeypatch):
    import empssl.rundir as rundir

    monkeypatch.setattr(rundir, "_CLOCK_ORIGIN", None)  # as in a fresh process
    lines: list[str] = []
    results = train(tiny_cfg(data_dir, epochs=1), tmp_path / "run", progress=False, log=lines.append)
    timing = results["timing"]
    assert {"startup", "data", "train", "features", "knn", "probe", "total"} <= set(timing)
    # each figure is rounded to the millisecond: the parts' sum may exceed the total by half a unit each
    assert timing["total"] >= sum(v for k, v in timing.items() if k != "total") - 5e-4 * len(timing)
    assert lines[-2] == f"results written to {tmp_path / 'run' / 'results.json'}"
    assert lines[-1].startswith(f"time: {timing['total']:.1f} s from process start = startup")
    assert results["method"] == "emp-ssl" and results["compile"] == "auto: eager on the CPU"
    # a second run in the same process accounts from its own start, not the process's
    lines.clear()
    t0 = time.perf_counter()
    again = train(tiny_cfg(data_dir, epochs=1), tmp_path / "run2", progress=False, log=lines.append)["timing"]
    elapsed = time.perf_counter() - t0
    other = again["total"] - sum(v for k, v in again.items() if k != "total")
    # not the process's age (each figure rounded to the millisecond, as above)
    assert "startup" not in again and -5e-4 * len(again) <= other and again["total"] <= elapsed + 5e-4
    assert lines[-1].startswith(f"time: {again['total']:.1f} s from the start of this run = data")


def test_compile_auto_compiles_only_runs_long_enough_to_win_it_back():
    from empssl.compiling import COMPILE_GAIN, COMPILE_SECONDS, want_compile

    cuda = torch.device("cuda")
    assert want_compile("on", torch.device("cpu"), 10, None)[0]
    assert not want_compile("off", cuda, 10**6, 1.0)[0]
    assert not want_compile("auto", torch.device("cpu"), 10**6, 1.0)[0]
    assert not want_compile("auto", cuda, 10**6, None)[0]  # not measured yet
    one_epoch = want_compile("auto", cuda, 500, 0.0335)  # one CIFAR epoch at 20 patches on an H200
    assert not one_epoch[0] and "-> eager" in one_epoch[1]
    steps = int(COMPILE_SECONDS / (0.0335 * COMPILE_GAIN)) + 1
    assert want_compile("auto", cuda, steps, 0.0335)[0]


def test_train_from_python_resumes_only_the_run_the_checkpoint_holds(tmp_path, data_dir):
    """train(cfg, out) on an existing run compares cfg with the checkpoint's config as the command line does: a
    weight-changing difference is one ConfigError naming it; --epochs may move within a fixed --schedule-epochs
    (the same schedule, further along), not with another schedule; evaluation settings may change."""
    from empssl.config import ConfigError

    out = tmp_path / "run"
    cfg = tiny_cfg(data_dir, epochs=0.5, schedule_epochs=1, train_subset=100)
    train(cfg, out, progress=False, log=lambda s: None, evaluate_at_end=False)
    with pytest.raises(ConfigError, match=r"holds a run with lr=0\.3, not lr=0\.1.*drop --lr"):
        train(cfg.replace(lr=0.1), out, progress=False, log=lambda s: None, evaluate_at_end=False)
    with pytest.raises(ConfigError, match="epochs=0.5, schedule_epochs=1, not epochs=1, schedule_epochs=2"):
        train(cfg.replace(epochs=1, schedule_epochs=2), out, progress=False, log=lambda s: None,
              evaluate_at_end=False)  # another schedule
    assert read_checkpoint(out)["step"] == 2  # nothing trained by the refused calls
    train(cfg.replace(epochs=1, test_patches=3), out, progress=False, log=lambda s: None, evaluate_at_end=False)
    assert read_checkpoint(out)["step"] == 5 and read_checkpoint(out)["config"]["test_patches"] == 3
