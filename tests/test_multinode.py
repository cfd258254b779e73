"""Two nodes on this machine: two torchrun groups (``--nnodes 2 --node-rank 0/1``, one rank each, static
rendezvous on 127.0.0.1) training one streamed shard folder into one ``--out``, as two machines sharing storage
would; and the same two with ``--out`` folders of their own (no shared storage).

The jobs run tests/multinode_entry.py, which is ``empssl`` with two test hooks: a record of the images each rank
reads, and a pause after the first checkpoint, so that the kill lands after one whatever the machine's speed.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from empssl import stream
from empssl.checkpoint import read_checkpoint

from .test_distributed import _free_port, job_processes, poll
from .test_stream import small_shards

pytest.importorskip("litdata")
pytestmark = [pytest.mark.slow,  # about 15 s a job on the 2-core CPU machine, five jobs
              pytest.mark.skipif(sys.platform != "linux", reason="ranks die with their launcher on Linux only")]

ENTRY = Path(__file__).with_name("multinode_entry.py")
N_IMAGES, BATCH, SEED = 60, 16, 0  # 3 steps an epoch (LitData's drop_last leaves 12 images of each out)
STEPS = 6  # 2 epochs; checkpoints at steps 2 (--checkpoint-every), 3 (epoch end), 4 and 6


def launch(shards: Path, data_dir: Path, outs: tuple[Path, Path], logs: Path, **env: str) -> list[subprocess.Popen]:
    """Node 0 and node 1 of one job, each a torchrun of one rank training into its own ``outs[node]``; the ranks'
    stdout and stderr go to ``logs/node<N>/.../stderr.log`` (torchrun's --log-dir), the launchers' to
    ``logs/node<N>.txt``."""
    port = _free_port()
    procs = []
    for node, out in enumerate(outs):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
               "--log-dir", str(logs / f"node{node}"), "--redirects", "3", str(ENTRY), "train", "--data", str(shards),
               "--data-dir", str(data_dir), "--out", str(out), "--data-mode", "stream", "--image-size", "32",
               "--no-eval", "--no-progress", "--width", "4", "--hidden-dim", "32", "--z-dim", "16", "--patch-size",
               "8", "--num-patches", "4", "--batch-size", str(BATCH), "--device", "cpu", "--log-every", "1",
               "--monitor-bank", "20", "--epochs", "2", "--checkpoint-every", "2", "--seed", str(SEED)]
        with open(logs / f"node{node}.txt", "w") as f:
            procs.append(subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, stdout=f,
                                          stderr=subprocess.STDOUT))
    return procs


def finish(procs: list[subprocess.Popen], logs: Path) -> list[str]:
    """Wait for both launchers (a ceiling against a hang, not a speed limit); each rank's stderr."""
    for p in procs:
        p.wait(timeout=900)
    return [next((logs / f"node{n}").rglob("stderr.log")).read_text() for n in range(2)]


def two_nodes(tmp: Path, shards: Path, data_dir: Path, outs: tuple[Path, Path], **env: str) -> list[str]:
    logs = tmp / "logs"
    logs.mkdir(parents=True)
    procs = launch(shards, data_dir, outs, logs, **env)
    errors = finish(procs, logs)
    if any(p.returncode for p in procs):
        pytest.fail("\n".join(errors + [(logs / f"node{n}.txt").read_text()[-2000:] for n in range(2)]))
    return errors


@pytest.fixture(scope="module")
def shards(tmp_path_factory, data_dir) -> Path:
    """60 training images (6 a class) and 20 test images in shards of 10."""
    return small_shards(tmp_path_factory.mktemp("shards"), data_dir)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shards, data_dir) -> Path:
    """A two-node run of 6 steps, never stopped, whose ranks recorded the images they read (RUN/../rows)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    (tmp / "rows").mkdir()
    two_nodes(tmp, shards, data_dir, (tmp / "run", tmp / "run"), EMPSSL_TEST_ROWS=str(tmp / "rows"))
    return tmp / "run"


@pytest.fixture(scope="module")
def killed(tmp_path_factory, shards, data_dir) -> tuple[Path, Path]:
    """A two-node run whose launchers were killed (SIGKILL) once its first checkpoint (step 2) was written, and a
    copy of its run directory as the kill left it."""
    tmp = tmp_path_factory.mktemp("killed")
    out, logs = tmp / "run", tmp / "logs"
    logs.mkdir()
    procs = launch(shards, data_dir, (out, out), logs, EMPSSL_TEST_PAUSE="1")
    try:
        poll(lambda: any(p.poll() is not None for p in procs) or (out / "config.json").exists(),
             "the first checkpoint written", ceiling=600)
        assert all(p.poll() is None for p in procs), (logs / "node0.txt").read_text()[-2000:]
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)
        poll(lambda: all(p.poll() is not None for p in procs) and not job_processes(str(out)),
             "every process of the job ended")
    finally:
        for pid in job_processes(str(out)):  # a failed test leaves nothing training either
            os.kill(pid, signal.SIGKILL)
        for p in procs:
            p.kill()
            p.wait()
    shutil.copytree(out, tmp / "copy")
    return out, tmp / "copy"


def test_the_ranks_of_two_nodes_read_every_image_of_an_epoch_at_most_once(uninterrupted, shards):
    rows = [[json.loads(line) for line in (uninterrupted.parent / "rows" / f"rank{r}.jsonl").read_text().splitlines()]
            for r in range(2)]
    assert [len(steps) for steps in rows] == [STEPS, STEPS]  # every rank steps together, BATCH / 2 images a step
    assert all(len(batch) == BATCH // 2 for steps in rows for batch in steps)
    items = stream.open_shards(shards)[0]
    names = {items.item(i)[2] for i in range(N_IMAGES)}
    per_epoch = STEPS // 2
    for epoch in range(2):
        read = [n for steps in rows for batch in steps[epoch * per_epoch:(epoch + 1) * per_epoch] for n in batch]
        assert len(set(read)) == len(read) == per_epoch * BATCH and set(read) <= names  # drop_last: 12 left out


def test_two_nodes_killed_and_restarted_end_with_the_uninterrupted_weights(tmp_path, shards, data_dir,
                                                                           uninterrupted, killed):
    out, _ = killed
    assert read_checkpoint(out)["step"] == 2
    two_nodes(tmp_path, shards, data_dir, (out, out))  # the same commands again: both resume from step 2
    said = next((tmp_path / "logs" / "node0").rglob("stdout.log")).read_text()  # rank 0's log
    assert f"resuming {out} at step 2/{STEPS}" in said and f"{STEPS - 2} steps on cpu" in said, said
    got, want = read_checkpoint(out), read_checkpoint(uninterrupted)
    assert got["step"] == want["step"] == STEPS and got["world_size"] == 2
    for key, value in want["model"].items():
        assert torch.equal(value, got["model"][key]), key  # bitwise: the same ranks, threads and reduction order


def run_files(out: Path) -> dict[str, bytes]:
    """The run directory's files but its lock (whose file a killed writer leaves, and the next one removes)."""
    return {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}


@pytest.mark.parametrize("start", ["fresh", "resume"])
def test_a_node_whose_out_is_not_shared_stops_every_rank_in_one_line(tmp_path, shards, data_dir, killed, start):
    node0 = killed[1] if start == "resume" else tmp_path / "node0"  # resume: only node 0 holds the checkpoint
    before = run_files(node0) if start == "resume" else {}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = launch(shards, data_dir, (node0, tmp_path / "node1"), logs)
    errors = finish(procs, logs)
    assert all(p.returncode != 0 for p in procs)  # torchrun's own status for a rank's exit 2, named in its report
    assert all("exitcode  : 2" in (logs / f"node{n}.txt").read_text() for n in range(2))
    assert errors[0] == errors[1] and errors[0].count("\n") == 1, errors  # the same one line on both ranks
    assert errors[0].startswith("empssl: error: --out must be on storage every node shares: rank 1 (node 1, "), errors
    assert f"--out {tmp_path / 'node1'}) sees no token from rank 0 there, rank 0 (" in errors[0]
    assert f"--out {node0}) the token rank 0 has just written; nothing was trained\n" in errors[0]
    assert not (tmp_path / "node1" / "checkpoint.pt").exists()
    if start == "fresh":
        assert not node0.exists()  # the run directory it created, with no checkpoint: removed, token and lock too
    else:  # nothing trained, nothing written over
        assert run_files(node0) == before
