"""Two CPU processes over gloo against one process on the same global batch.

The ranks are forked from the test process (torch is already imported there, so a rank starts in
milliseconds) and join through the same env:// rendezvous torchrun sets up; one slow test runs the real
``torchrun ... -m empssl.cli train``.
"""

import contextlib
import gc
import importlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from empssl import distributed
from empssl.batches import epoch_permutation
from empssl.checkpoint import read_checkpoint
from empssl.config import Config
from empssl.losses import emp_ssl_loss
from empssl.methods import create_method
from empssl.optim import LARS, lars_param_groups, lr_at
from empssl.patches import Augment, make_patches
from empssl.train import TrainError, train

train_module = importlib.import_module("empssl.train")  # empssl.train is the function
WORLD = 2


def tiny_cfg(data_dir, **kw) -> Config:
    # 80 images / batch 20: a 4-step schedule, of which 2 steps are run.
    base = dict(data="demo", data_dir=str(data_dir), width=8, hidden_dim=64, z_dim=32, patch_size=8, num_patches=4,
                batch_size=20, train_subset=80, device="cpu", log_every=1, checkpoint_every=100, lr=0.05,
                epochs=0.5, schedule_epochs=1)
    return Config(**{**base, **kw})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interrupt_after(k: int) -> None:
    """Make this process's training loop get a SIGINT (as from Ctrl-C) during its k-th step."""
    real_step = train_module.train_step
    calls = [0]

    def step(*args, **kw):
        calls[0] += 1
        if calls[0] == k:
            signal.raise_signal(signal.SIGINT)
        return real_step(*args, **kw)

    train_module.train_step = step


def _checked_destroy(destroy):
    """torch.distributed.destroy_process_group, refusing to run while a DDP wrapper is alive: its Reducer would then
    hold the group's last reference and free it with the GIL held, which deadlocks torch 2.11's gloo."""

    def checked(*args, **kw):
        if any(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects()):
            raise AssertionError("a DDP wrapper outlives the process group")
        return destroy(*args, **kw)

    return checked


def _rank_main(rank: int, port: int, cfg: Config, out: str, data, interrupt: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.distributed.destroy_process_group = _checked_destroy(torch.distributed.destroy_process_group)
    torch.set_num_threads(1)  # two ranks on a two-core machine; also keeps the forked OpenMP pool unused
    if interrupt and rank == WORLD - 1:  # a stop asked on the last rank must stop rank 0 too
        interrupt_after(interrupt)
    try:
        train(cfg, out, progress=False, log=lambda s: None, data=data, evaluate_at_end=False)
    except KeyboardInterrupt:
        os._exit(0 if interrupt else 1)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(1 if interrupt else 0)


def run_ranks(cfg: Config, out, data, interrupt: int = 0) -> None:
    """Train ``cfg`` into ``out`` with WORLD forked processes (rank 0 writes ``out``); with ``interrupt`` = k,
    the last rank gets a SIGINT in step k and every rank must stop with a KeyboardInterrupt."""
    port = _free_port()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_rank_main, args=(r, port, cfg, str(out), data, interrupt)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)  # a ceiling against a hang, not a speed limit
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * WORLD


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def initial_state(cfg: Config) -> dict:
    torch.manual_seed(cfg.seed)
    return create_method(cfg).build_model().state_dict()


# The biases of the Linear layers followed by BatchNorm have an exactly zero gradient (BatchNorm removes any
# shift), so their "update" is rounding noise: compared with an absolute tolerance only.
ZERO_GRADIENT = ("pre_feature.0.bias", "projection.0.bias")


def assert_same_update(w0: dict, a: dict, b: dict, rel: float, keys=None) -> None:
    """Every tensor of ``b`` moved from ``w0`` as the one of ``a`` did, within ``rel`` of that move."""
    for k in keys or a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
        elif k in ZERO_GRADIENT:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
        else:
            move = (a[k] - w0[k]).norm()
            assert (a[k] - b[k]).norm() <= rel * move + 1e-7, (k, float((a[k] - b[k]).norm() / move))


@pytest.fixture(scope="module")
def single_reference(tmp_path_factory, data_dir, demo_data):
    """One process, global batch 20, interrupted after step 1 (a copy is kept) and resumed to step 2: the run
    that --tcr-global --sync-bn must reproduce with two ranks. Returns (run after step 1, run after step 2)."""
    out = tmp_path_factory.mktemp("single") / "run"
    real_step = train_module.train_step
    interrupt_after(1)
    try:
        with pytest.raises(KeyboardInterrupt, match="interrupted at step 1"):
            train(tiny_cfg(data_dir, tcr_global=True, sync_bn=True), out, progress=False, log=lambda s: None,
                  data=demo_data, evaluate_at_end=False)
    finally:
        train_module.train_step = real_step
    step1 = out.parent / "step1"
    shutil.copytree(out, step1)
    train(tiny_cfg(data_dir, tcr_global=True, sync_bn=True), out, progress=False, log=lambda s: None,
          data=demo_data, evaluate_at_end=False)
    return step1, out


# --- no process group needed ----------------------------------------------------------------------------


def test_rank_patches_are_the_single_process_patches_of_the_same_images():
    images = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    aug = Augment(size=8)
    full = make_patches(images, 5, aug, torch.Generator().manual_seed(7))  # (5, 6, 3, 8, 8)
    for rank in range(3):
        d = distributed.Dist(rank, 3, rank)
        mine = distributed.rank_patches(images[2 * rank:2 * rank + 2], 5, aug, torch.Generator().manual_seed(7), d)
        torch.testing.assert_close(mine, full[:, 2 * rank:2 * rank + 2], atol=1e-6, rtol=0)
    # and a rank's patches are not simply the patches its images would get on their own
    alone = make_patches(images[2:4], 5, aug, torch.Generator().manual_seed(7))
    assert not torch.allclose(alone, full[:, 2:4])


def test_single_process_setup_uses_no_process_group(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    d, device, created = distributed.setup("cpu")
    assert d == distributed.SINGLE and device == torch.device("cpu") and not created
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(distributed.ConfigError, match="names one GPU"):
        distributed.setup("cuda:0")


def test_rank_threads_share_the_cores_and_keep_the_users_setting():
    torchrun_default = {"OMP_NUM_THREADS": "1"}  # what torchrun gives ranks when its own environment has none
    assert distributed.rank_threads({}, {}, 16, 2) == 8
    assert distributed.rank_threads({}, {}, 2, 2) == 1
    assert distributed.rank_threads({}, None, 3, 8) == 1  # at least one thread
    assert distributed.rank_threads(torchrun_default, {"PATH": "/bin"}, 16, 4) == 4
    # the user's own value, torchrun's default included where the launcher's environment cannot be read
    assert distributed.rank_threads({"OMP_NUM_THREADS": "3"}, {}, 16, 2) is None
    assert distributed.rank_threads(torchrun_default, torchrun_default, 16, 2) is None
    assert distributed.rank_threads(torchrun_default, None, 16, 2) is None


@pytest.mark.parametrize("omp, want", [(None, 3), ("5", 5)])
def test_setup_sets_a_ranks_threads_unless_the_user_did(monkeypatch, omp, want):
    monkeypatch.setattr(distributed, "usable_cpus", lambda: 6)
    monkeypatch.setattr(distributed, "die_with_parent", lambda: None)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # joined already: no rendezvous here
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("OMP_NUM_THREADS") if omp is None else monkeypatch.setenv("OMP_NUM_THREADS", omp)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(5)
        distributed.setup("cpu")
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_a_rank_dies_with_its_parent():
    r, w = os.pipe()
    parent = os.fork()
    if parent == 0:  # stands in for torchrun's launcher; its child for a rank
        try:
            if os.fork() == 0:
                distributed.die_with_parent()
                os.write(w, f"{os.getpid()}\n".encode())
            time.sleep(600)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        rank = int(f.readline())
    try:
        os.kill(parent, signal.SIGKILL)
        os.waitpid(parent, 0)
        poll(lambda: not alive(rank), "the rank ended")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rank, signal.SIGKILL)


def test_training_module_keeps_plain_state_dict_keys():
    cfg = Config(width=4, hidden_dim=32, z_dim=16)
    model = create_method(cfg).build_model()
    keys = list(model.state_dict())
    net = distributed.training_module(model, torch.device("cpu"), distributed.SINGLE, compile=True)
    assert net is not model and type(net).__name__ == "OptimizedModule"  # compiled lazily: nothing runs here
    assert list(model.state_dict()) == keys
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in model.state_dict())
    assert list(net.state_dict())[0].startswith("_orig_mod.")  # what saving the wrapper would have written


def test_speed_flags_parse_bare_or_with_a_value():
    from empssl.cli import build_parser

    args = build_parser().parse_args(["train", "--out", "x", "--sync-bn", "--tcr-global", "false", "--compile",
                                      "--grad-checkpointing", "on"])
    assert (args.sync_bn, args.tcr_global, args.compile, args.grad_checkpointing) == (True, False, "on", "on")
    assert Config().tcr_global and not Config().sync_bn and Config().compile == "auto"


# --- two ranks ---------------------------------------------------------------------------------------------


def test_global_tcr_and_sync_bn_match_one_process(tmp_path, data_dir, demo_data, single_reference):
    """Two ranks stopped after step 1 (the stop is asked on rank 1) and resumed: the same steps as one process.

    Tolerances: the updates after step 1 agree to 1e-4 of their size. Step 2 amplifies rounding: two
    single-process runs that differ only in how BatchNorm's statistics are summed already differ by ~3%
    of the step-2 update in some conv layers of this tiny network, so 10% is asked there; a real error
    (BatchNorm or coding rate over the local images) moves them by 80-240%.
    """
    cfg = tiny_cfg(data_dir, tcr_global=True, sync_bn=True)
    ref1, ref2 = (read_checkpoint(d) for d in single_reference)
    w0 = initial_state(cfg)
    out = tmp_path / "two"
    run_ranks(cfg, out, demo_data, interrupt=1)
    after1 = read_checkpoint(out)
    assert after1["step"] == 1 and after1["world_size"] == 2 and not after1["finished"]
    assert_same_update(w0, ref1["model"], after1["model"], rel=1e-4)

    run_ranks(cfg, out, demo_data)  # every rank loads the checkpoint
    after2 = read_checkpoint(out)
    assert after2["step"] == 2 and after2["finished"]
    # rank 0 alone wrote: one metrics line per step, not one per rank; the step-2 loss depends on step 1's update
    assert losses(out) == pytest.approx(losses(single_reference[1]), rel=1e-6)
    assert losses(out)[0] != pytest.approx(losses(out)[1], rel=1e-3)
    assert_same_update(w0, ref2["model"], after2["model"], rel=0.1)
    for pid, state in ref2["optimizer"]["state"].items():
        a, b = state["momentum_buffer"], after2["optimizer"]["state"][pid]["momentum_buffer"]
        assert (a - b).norm() <= 0.1 * a.norm() + 1e-5, pid  # + the zero-gradient biases (ZERO_GRADIENT)
    assert torch.equal(ref2["rng"]["patches"], after2["rng"]["patches"])


def test_two_ranks_resume_a_single_process_checkpoint(tmp_path, data_dir, demo_data, single_reference):
    out = tmp_path / "resumed"
    shutil.copytree(single_reference[0], out)  # one process, stopped after step 1
    run_ranks(tiny_cfg(data_dir, tcr_global=True, sync_bn=True), out, demo_data)
    got, ref = read_checkpoint(out), read_checkpoint(single_reference[1])
    assert got["step"] == 2 and got["world_size"] == 2
    assert losses(out) == pytest.approx(losses(single_reference[1]), rel=1e-6)
    assert_same_update(initial_state(tiny_cfg(data_dir)), ref["model"], got["model"], rel=0.1)


def test_local_tcr_matches_the_mean_of_per_rank_losses(tmp_path, data_dir, demo_data, single_reference):
    cfg = tiny_cfg(data_dir, tcr_global=False, sync_bn=False)
    out = tmp_path / "two"
    run_ranks(cfg, out, demo_data)

    # Reference: one process, the same patches; each half of the batch through the model on its own
    # (BatchNorm over that half) with its own local coding rate, and the mean of the two losses minimised.
    train_images = demo_data[0].subset(cfg.train_subset).images
    torch.manual_seed(cfg.seed)
    model = create_method(cfg).build_model()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    opt = LARS(lars_param_groups(model), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
               eta=cfg.lars_eta)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, b = cfg.num_patches, cfg.batch_size // WORLD
    ref_losses = []
    for step in range(2):
        perm = epoch_permutation(len(train_images), cfg.seed, 0)  # steps 0 and 1 of epoch 0
        images = train_images[perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]]
        patches = make_patches(images, n, Augment.from_config(cfg), gen)  # (n, B, 3, s, s)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, 4, cfg.lr)
        per_rank = [emp_ssl_loss(model(patches[:, r * b:(r + 1) * b].flatten(0, 1)).view(n, b, -1), cfg.eps,
                                 cfg.invariance_weight).loss for r in range(WORLD)]
        loss = torch.stack(per_rank).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_losses.append(loss.item())
    assert losses(out) == pytest.approx(ref_losses, rel=1e-6)
    # BatchNorm statistics are rank 0's alone (DDP broadcasts them), not comparable with the reference's
    params = [k for k, _ in model.named_parameters()]
    assert_same_update(w0, dict(model.named_parameters()), read_checkpoint(out)["model"], rel=0.1, keys=params)
    # the first step's loss (same initial weights) tells the local objective from the global one
    assert losses(out)[0] != pytest.approx(losses(single_reference[1])[0], rel=1e-3)


def _shared_checkpoint_rank(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GROUP_RANK=str(rank))
    torch.set_num_threads(1)  # the forked OpenMP pool stays unused
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        distributed.shared_checkpoint(out, distributed.Dist(rank, WORLD, 0), lambda path: {"step": 2 + rank})
    except distributed.OutputError as e:
        (out / f"rank{rank}.txt").write_text(str(e))
    os._exit(0)


def test_ranks_that_see_checkpoints_of_different_steps_all_stop_in_the_same_words(tmp_path):
    """The token check passes (one folder), the checkpoints read differ (a node's stale copy): every rank stops."""
    (tmp_path / "checkpoint.pt").touch()  # read by the stub: rank r sees step 2 + r
    ctx, port = mp.get_context("fork"), _free_port()
    procs = [ctx.Process(target=_shared_checkpoint_rank, args=(r, port, tmp_path)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)  # a ceiling against a hang
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)]
    assert said[0] == said[1]
    assert "rank 1 (node 1, " in said[0] and "the checkpoint of step 3 there, rank 0 (node 0, " in said[0]
    assert said[0].endswith("the checkpoint of step 2; nothing was trained")
    assert not (tmp_path / distributed.SHARED_TOKEN).exists()  # rank 0 removes it once every rank has read it


def test_resume_with_another_world_size_is_refused_when_it_changes_the_run(tmp_path, data_dir, demo_data):
    cfg = tiny_cfg(data_dir, tcr_global=False, epochs=0.25)
    out = tmp_path / "run"
    train(cfg, out, progress=False, log=lambda s: None, data=demo_data, evaluate_at_end=False)
    ckpt = read_checkpoint(out)
    ckpt.update(world_size=2, finished=False)
    torch.save(ckpt, out / "checkpoint.pt")
    with pytest.raises(TrainError, match="trained by 2 processes"):
        train(cfg, out, progress=False, log=lambda s: None, data=demo_data, evaluate_at_end=False)


@pytest.mark.slow
def test_torchrun_cli_writes_once(tmp_path, data_dir):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "empssl.cli", "train", "--data", "demo", "--data-dir", str(data_dir), "--out", str(out),
           "--no-eval", "--no-progress", "--train-subset", "80", "--width", "4", "--hidden-dim", "32",
           "--z-dim", "16", "--patch-size", "8", "--num-patches", "4", "--batch-size", "20", "--device", "auto",
           "--log-every", "1", "--sync-bn"]  # a bare bool flag means true
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=1200)  # a ceiling against a hang
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("trained 4 steps") == 1  # rank 0 reports
    assert len(losses(out)) == 4 and read_checkpoint(out)["world_size"] == 2
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["sync_bn"] and cfg["tcr_global"]


def job_processes(marker: str) -> dict[int, int]:
    """pid -> parent pid of the live processes whose command line holds ``marker`` (Linux's /proc)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "cmdline").read_bytes():
                found[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:  # it ended meanwhile
            pass
    return found


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (one that ended, its exit status not yet collected)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def poll(condition, what: str, ceiling: float = 180) -> None:
    """Wait until ``condition()`` holds; the ceiling only ends a test that would otherwise hang."""
    deadline = time.monotonic() + ceiling
    while not condition():
        assert time.monotonic() < deadline, f"not within {ceiling:.0f} s: {what}"
        time.sleep(0.2)


@pytest.mark.slow  # about 30 s each on the 2-core CPU machine
@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG and /proc are Linux's")
@pytest.mark.parametrize("victim", ["launcher", "rank"])
def test_a_killed_job_leaves_no_process_behind(tmp_path, data_dir, victim):
    out = tmp_path / "run"  # in every command line of the job: its marker
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "empssl.cli", "train", "--data", "demo", "--data-dir", str(data_dir), "--out", str(out),
           "--data-mode", "stream", "--image-size", "32", "--no-eval", "--no-progress", "--train-subset", "80",
           "--width", "4", "--hidden-dim", "32", "--z-dim", "16", "--patch-size", "8", "--num-patches", "4",
           "--batch-size", "20", "--device", "cpu", "--log-every", "1", "--epochs", "10000"]  # hours of steps
    log = tmp_path / "log"
    with open(log, "w") as f:
        job = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=f, stderr=f)
    try:
        metrics = out / "metrics.jsonl"
        poll(lambda: job.poll() is not None or (metrics.exists() and "\n" in metrics.read_text()),
             "a step trained")
        assert job.poll() is None, log.read_text()[-3000:]
        procs = job_processes(str(out))
        ranks = [pid for pid, parent in procs.items() if parent == job.pid]
        workers = [pid for pid, parent in procs.items() if parent in ranks]
        assert len(ranks) == 2 and workers, procs  # the streamed tier reads through DataLoader workers
        os.kill(job.pid if victim == "launcher" else max(ranks), signal.SIGKILL)
        poll(lambda: job.poll() is not None and not job_processes(str(out)), "every process of the job ended")
    finally:
        for pid in job_processes(str(out)):  # a failed test leaves nothing training either
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        job.wait()
