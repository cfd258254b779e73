"""Issue 21's figures for the streamed engine: throughput per CPU-second, start-up, peak memory, object store.

Every figure comes from a fresh child process (``measure`` / ``decode``, internal sub-commands), so that its CPU
time, its DataLoader workers and its peak RSS are its own. CPU-seconds count the process and its children (the
DataLoader's or the decode pool's workers), read with getrusage(RUSAGE_SELF) + getrusage(RUSAGE_CHILDREN) once
they have ended: on a machine shared with other jobs these are robust to the load; wall-clock figures are not, and
every row that gives one also gives the 1-minute load average. Each row is printed as one JSON object per line.

Rows (sub-commands):

    throughput   a synthetic Tiny ImageNet tree (train/<wnid>/images/*.JPEG, val/images + val_annotations.txt,
                 wnids.txt; 64 px JPEGs), sharded with ``empssl shard``; the training batch source iterated for
                 --steps batches without a model (images per CPU-second), beside the in-memory decoder
                 (``empssl.data.decode.decode_catalog`` of the same tree's train split, images per CPU-second)
    startup      shard folders of --sizes tiny (8 px) JPEGs; seconds from the process's start to the first
                 training batch (--image-size 8)
    memory       peak memory of a streamed run and of the in-memory run of the same shards (--image-size 32),
                 for --sizes: ru_maxrss of the process and of its largest child, and the peak of the summed PSS
                 of the process and its workers, and of its anonymous part (sampled every 50 ms; RSS counts
                 the pages a forked worker shares with its parent in each, PSS divides them; the rest of PSS is
                 file-backed: mapped shards and libraries)
    s3           the throughput row's shards read from an S3 endpoint (AWS_ENDPOINT_URL and the usual AWS_*
                 settings; without one, moto's ThreadedMotoServer on 127.0.0.1), against the local copy

    PYTHONPATH=src python bench/stream_bench.py throughput          # 200 classes x 100 images, 200 batches
    PYTHONPATH=src python bench/stream_bench.py startup --sizes 10000,100000,1000000
    PYTHONPATH=src python bench/stream_bench.py memory --sizes 10000,100000
    PYTHONPATH=src python bench/stream_bench.py s3 --steps 50     # at 428d066: about 2 requests per image
    PYTHONPATH=src python bench/stream_bench.py smoke --root /tmp/x  # every row at toy size (about 40 CPU-s)

Data is built once under --root (default /tmp/bench-data) and reused: a tree and its shards are made only when
missing. The tiny trees of ``startup`` are ImageFolder roots (train/<class>/, val/<class>/, 10 classes, a fixed
val split of 1,000 images) of distinct random 8x8 JPEGs (about 700 bytes each), sharded by ``empssl shard`` (its
time is printed as a row too); the tree is deleted once its shards are complete.

To measure another version of the engine, adapt :func:`batch_source` (the only place that builds the source).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve()
# the training settings beside the data: a tiny EMP-SSL model, so that set-up's model costs little (it is not run)
TINY_MODEL = dict(width=4, hidden_dim=32, z_dim=16, patch_size=8, num_patches=2, test_patches=2, device="cpu",
                  compile="off")
TINY_CLASSES, TINY_VAL = 10, 1000


# --- the batch source: the one function to adapt to another version of the engine -----------------------------


@contextmanager
def batch_source(data: str, mode: str, image_size: int, batch_size: int, work: Path) -> Iterator[Iterable[Any]]:
    """The training loop's batch source over ``data`` as ``empssl train --data DATA --data-mode MODE --image-size
    S --batch-size B`` builds it (``empssl.train.setup``: the shards checked, the monitor's bank and the held-out
    split decoded, a tiny model built and not run), yielding (b, 3, S, S) uint8 batches; its workers are stopped
    when the block ends. ``work`` is an empty folder for the run directory and the --data-dir cache."""
    from empssl.config import Config
    from empssl.rundir import RunSession
    from empssl.train import setup

    cfg = Config(data=data, data_mode=mode, image_size=image_size, batch_size=batch_size, epochs=100,
                 data_dir=str(work / "data-dir"), **TINY_MODEL).validate()  # type: ignore[arg-type]
    with RunSession(work / "run", lambda line: None) as session:
        run = setup(cfg, session, None, False, lambda line: None, evaluating=False)
        with run.source as source:
            yield source


# --- measurements in a child process --------------------------------------------------------------------------


def cpu_seconds() -> float:
    """User + system seconds of this process and of its ended (waited-for) children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def peak_mib() -> dict[str, float]:
    """Peak RSS in MiB of this process and of its largest ended child (Linux reports ru_maxrss in KiB)."""
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_rss_children_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def tree_pss_kib() -> tuple[int, int]:
    """(all, anonymous) summed proportional set size (KiB) of this process and its descendants now (Linux):
    forked workers share pages with their parent, which their RSS each count whole and PSS divides among them;
    the rest is file-backed (mapped shards, libraries: pages the kernel may drop)."""
    total, anon, pids = 0, 0, [os.getpid()]
    while pids:
        pid = pids.pop()
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                fields = {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith("Pss")}
            total, anon = total + fields["Pss"], anon + fields["Pss_Anon"]
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    pids += [int(c) for c in f.read().split()]
        except (OSError, KeyError):  # a worker that ended meanwhile
            continue
    return total, anon


class PeakPss(threading.Thread):
    """The peaks of :func:`tree_pss_kib`, sampled every ``every`` seconds until :meth:`stop`."""

    def __init__(self, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.every, self.peak, self.peak_anon, self._done = every, 0, 0, threading.Event()
        self.start()

    def run(self) -> None:
        while True:
            total, anon = tree_pss_kib()
            self.peak, self.peak_anon = max(self.peak, total), max(self.peak_anon, anon)
            if self._done.wait(self.every):
                return

    def stop(self) -> dict[str, float]:
        """The peaks in MiB."""
        self._done.set()
        self.join()
        return {"peak_pss_tree_mib": self.peak / 1024, "peak_pss_anon_tree_mib": self.peak_anon / 1024}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Set up the source, then take --steps batches: seconds from ``--t0`` (the parent's clock when it started
    this process) to the first batch, and the CPU-seconds spent by then (imports included; of the children, those
    that ended: not the DataLoader's workers), CPU-seconds of set-up (imports excluded) and of the iteration (its
    workers included), peak RSS
    and, with --pss, the peak summed PSS of the process and its workers (sampled, which costs CPU: off for the
    CPU figures)."""
    import torch

    sampler = PeakPss() if args.pss else None
    cpu0, images = cpu_seconds(), 0
    with tempfile.TemporaryDirectory(dir=args.work) as work, ExitStack() as stack:
        source = stack.enter_context(batch_source(args.data, args.mode, args.image_size, args.batch_size, Path(work)))
        setup_cpu = cpu_seconds() - cpu0  # the set-up's pool workers (decoding the bank) have ended
        cpu1, wall1 = cpu_seconds(), time.perf_counter()
        for step, batch in enumerate(source):
            if step == 0:
                first, first_cpu = time.time() - args.t0, cpu_seconds()
            assert batch.dtype == torch.uint8 and batch.shape[-1] == args.image_size, (batch.dtype, batch.shape)
            images += len(batch)
            if step + 1 == args.steps:
                break
        wall = time.perf_counter() - wall1
        stack.close()  # the DataLoader's workers end (and are waited for) here
        iter_cpu = cpu_seconds() - cpu1
    pss = sampler.stop() if sampler else {}
    return {"images": images, "first_batch_s": first, "first_batch_cpu_s": first_cpu, "setup_cpu_s": setup_cpu,
            "iter_cpu_s": iter_cpu,
            "iter_wall_s": wall, "images_per_cpu_s": images / iter_cpu, "images_per_s": images / wall, **peak_mib(),
            **pss}


def decode(args: argparse.Namespace) -> dict[str, Any]:
    """The in-memory decoder over the train split of the tree ``--data``: images per CPU-second of
    ``empssl.data.decode_catalog`` (its process pool included), the tree's scan not counted."""
    from empssl.data import scan
    from empssl.data.decode import decode_catalog

    catalog = scan(args.data)
    n = dict(catalog.splits)["train"]
    catalog.records, catalog.splits = catalog.records[:n], [("train", n)]
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    images = decode_catalog(catalog, args.image_size, progress=False)
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    return {"images": len(images), "cpu_s": cpu, "wall_s": wall, "images_per_cpu_s": len(images) / cpu,
            "images_per_s": len(images) / wall, **peak_mib()}


def child(kind: str, data: str | Path, image_size: int, work: Path, mode: str = "stream", batch_size: int = 100,
          steps: int = 1, env: dict[str, str] | None = None, pss: bool = False) -> dict[str, Any]:
    """Run ``measure`` or ``decode`` in a fresh Python process; its JSON answer."""
    argv = [sys.executable, str(BENCH), kind, "--data", str(data), "--image-size", str(image_size), "--work",
            str(work), "--mode", mode, "--batch-size", str(batch_size), "--steps", str(steps), *["--pss"] * pss]
    t0 = time.time()
    done = subprocess.run([*argv, "--t0", repr(t0)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"stream_bench: {kind} of {data} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# --- data -----------------------------------------------------------------------------------------------------


def jpeg_bytes(rng: np.random.Generator, side: int, quality: int = 90) -> bytes:
    """A JPEG of random smooth-ish colour (noise over a random flat colour), ``side`` x ``side``."""
    import io

    from PIL import Image

    base = rng.integers(0, 256, (1, 1, 3))
    pixels = np.clip(base + rng.normal(0, 40, (side, side, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def tiny_imagenet(root: Path, classes: int, per_class: int, val_per_class: int, side: int = 64) -> Path:
    """A synthetic Tiny ImageNet tree (its layout, random JPEGs) at ``root``, made once."""
    if (root / "wnids.txt").is_file():
        return root
    rng = np.random.default_rng(0)
    tmp = root.with_name(root.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    wnids = [f"n{i:08d}" for i in range(classes)]
    annotations: list[str] = []
    for wnid in wnids:
        folder = tmp / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{wnid}_{i}.JPEG").write_bytes(jpeg_bytes(rng, side))
        for _ in range(val_per_class):
            name = f"val_{len(annotations)}.JPEG"
            (tmp / "val" / "images").mkdir(parents=True, exist_ok=True)
            (tmp / "val" / "images" / name).write_bytes(jpeg_bytes(rng, side))
            annotations.append(f"{name}\t{wnid}\t0\t0\t{side - 1}\t{side - 1}\n")
    (tmp / "val" / "val_annotations.txt").write_text("".join(annotations))
    (tmp / "wnids.txt").write_text("\n".join(wnids) + "\n")
    tmp.rename(root)
    return root


def tiny_tree(root: Path, n: int, side: int = 8) -> Path:
    """An ImageFolder root of ``n`` training and TINY_VAL held-out distinct random ``side`` px JPEGs in
    TINY_CLASSES classes (train/<class>/, val/<class>/), made once."""
    if (root / "train").is_dir():
        return root
    rng = np.random.default_rng(n)
    tmp = root.with_name(root.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, count in (("train", n), ("val", min(n, TINY_VAL))):
        for c in range(TINY_CLASSES):
            folder = tmp / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(c, count, TINY_CLASSES):
                (folder / f"{i:07d}.jpg").write_bytes(jpeg_bytes(rng, side))
    tmp.rename(root)
    return root


def shards(tree: Path, out: Path, shard_size: int, remove_tree: bool = False) -> tuple[Path, dict[str, Any] | None]:
    """``empssl shard TREE --out OUT --shard-size K`` unless OUT is complete; the shards and the writer's row (or
    None when they existed)."""
    if (out / "manifest.json").is_file():
        return out, None
    argv = [sys.executable, "-c", "import sys; from empssl.cli import main; sys.exit(main())", "shard", str(tree),
            "--out", str(out), "--shard-size", str(shard_size), "--no-progress"]
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter() - t0
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    images = sum(s["images"] for s in json.loads((out / "manifest.json").read_text())["splits"].values())
    if remove_tree:
        shutil.rmtree(tree)
    return out, {"row": "shard write", "source": str(tree), "images": images, "shard_size": shard_size,
                 "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "images_per_cpu_s": round(images / cpu),
                 "command": " ".join(["empssl", *argv[3:]]), **load()}


# --- the rows ---------------------------------------------------------------------------------------------------


def load() -> dict[str, float]:
    return {"load_avg_1m": round(os.getloadavg()[0], 2)}


def emit(row: dict[str, Any]) -> None:
    print(json.dumps({k: round(v, 4 if abs(v) < 10 else 1) if isinstance(v, float) else v for k, v in row.items()}),
          flush=True)


def tiny_imagenet_shards(args: argparse.Namespace) -> tuple[Path, Path]:
    tree = tiny_imagenet(args.root / f"tiny-imagenet-{args.classes}x{args.per_class}", args.classes,
                         args.per_class, args.val_per_class)
    out, wrote = shards(tree, args.root / f"{tree.name}-shards", args.shard_size)
    if wrote:
        emit(wrote)
    return tree, out


def row_throughput(args: argparse.Namespace) -> None:
    tree, folder = tiny_imagenet_shards(args)
    for _ in range(args.repeats):
        streamed = child("measure", folder, 64, args.root, batch_size=args.batch_size, steps=args.steps)
        emit({"row": "throughput: streamed source", "data": str(folder), "batch_size": args.batch_size, **streamed,
              **load()})
        memory = child("decode", tree, 64, args.root)
        emit({"row": "throughput: in-memory decoder", "data": str(tree), **memory, **load()})
        emit({"row": "throughput: streamed / in-memory, per CPU-second",
              "ratio": streamed["images_per_cpu_s"] / memory["images_per_cpu_s"]})


def tiny_shards(args: argparse.Namespace, n: int) -> Path:
    """The shard folder of :func:`tiny_tree` ``n``, made (and the tree deleted) when missing."""
    folder = args.root / f"tiny8-{n}-shards"
    if not (folder / "manifest.json").is_file():
        folder, wrote = shards(tiny_tree(args.root / f"tiny8-{n}", n), folder, args.shard_size, remove_tree=True)
        if wrote:
            emit(wrote)
    return folder


def row_startup(args: argparse.Namespace) -> None:
    for n in args.sizes:
        folder = tiny_shards(args, n)
        for _ in range(args.repeats):
            got = child("measure", folder, 8, args.root, batch_size=args.batch_size, steps=1)
            emit({"row": "startup to the first batch", "data": str(folder), "train_images": n, **got, **load()})


def row_memory(args: argparse.Namespace) -> None:
    for n in args.sizes:
        folder = tiny_shards(args, n)
        for mode in ("stream", "memory"):
            got = child("measure", folder, args.image_size, args.root, mode=mode, batch_size=args.batch_size,
                        steps=args.steps, pss=True)
            emit({"row": f"peak RSS, {mode}", "data": str(folder), "train_images": n, "image_size": args.image_size,
                  **got, **load()})


class Requests(logging.Handler):
    """Counts the requests that moto's server logs (werkzeug's access log, one record per request), by method,
    instead of printing them."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"(GET|HEAD|PUT|POST|DELETE) /", record.getMessage())  # (after a colour code)
        method = found.group(1) if found else "other"
        self.counts[method] = self.counts.get(method, 0) + 1


@contextmanager
def s3_endpoint(work: Path) -> Iterator[tuple[dict[str, str], Requests | None]]:
    """(the environment for the children, the request counter or None): AWS_ENDPOINT_URL's store as it is set,
    else a ThreadedMotoServer on 127.0.0.1 (a free port) with test credentials, stopped at the end."""
    env = dict(os.environ)
    if env.get("AWS_ENDPOINT_URL"):
        yield env, None
        return
    from moto.server import ThreadedMotoServer

    requests = Requests()
    access_log = logging.getLogger("werkzeug")
    access_log.addHandler(requests)
    access_log.propagate = False
    access_log.setLevel(logging.INFO)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    missing = str(work / "no-aws-config")
    env.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": missing,
                "AWS_SHARED_CREDENTIALS_FILE": missing, "AWS_ALLOW_HTTP": "true"})  # (obstore's word for http)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        env.pop(key, None)
    try:
        yield env, requests
    finally:
        server.stop()
        access_log.removeHandler(requests)


def upload(folder: Path, url: str, env: dict[str, str]) -> None:
    """Every file of ``folder`` to ``url`` (s3://bucket/prefix), the bucket created if missing (boto3)."""
    import boto3

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    s3 = boto3.session.Session(aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
                               aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
                               region_name=env.get("AWS_DEFAULT_REGION", "us-east-1")
                               ).client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=bucket)
    for path in sorted(folder.rglob("*")):
        if path.is_file() and ".parts" not in path.parts and not path.name.startswith("."):
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def row_s3(args: argparse.Namespace) -> None:
    _, folder = tiny_imagenet_shards(args)
    with s3_endpoint(args.root) as (env, requests):
        upload(folder, args.url, env)
        emit({"row": "s3: uploaded", "url": args.url, "endpoint": env["AWS_ENDPOINT_URL"]})
        for _ in range(args.repeats):
            for where in (args.url, str(folder)):
                if requests:
                    requests.counts.clear()
                got = child("measure", where, 64, args.root, batch_size=args.batch_size, steps=args.steps, env=env)
                remote = where.startswith("s3://")
                asked = {"requests": dict(requests.counts)} if requests and remote else {}
                emit({"row": f"s3 vs local: {'s3' if remote else 'local'}", "data": where,
                      "cache": "cold (a fresh --data-dir)", **got, **asked, **load()})


def versions() -> dict[str, Any]:
    import litdata
    import PIL
    import torch
    import torchvision

    import empssl

    commit = subprocess.run(["git", "-C", str(BENCH.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {"row": "versions", "empssl": empssl.__version__, "commit": commit, "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "litdata": litdata.__version__,
            "pillow": PIL.__version__, "cpu": platform.processor() or platform.machine(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("row", choices=["throughput", "startup", "memory", "s3", "smoke", "measure", "decode"])
    ap.add_argument("--root", type=Path, default=Path("/tmp/bench-data"), help="where the data is built and kept")
    ap.add_argument("--classes", type=int, default=200, help="throughput, s3: classes of the Tiny ImageNet tree")
    ap.add_argument("--per-class", type=int, default=100, help="throughput, s3: training images per class")
    ap.add_argument("--val-per-class", type=int, default=10, help="throughput, s3: val images per class")
    ap.add_argument("--shard-size", type=int, default=1000, help="images per shard (empssl shard --shard-size)")
    ap.add_argument("--sizes", default="10000,100000,1000000", help="startup, memory: training images per folder")
    ap.add_argument("--steps", type=int, default=200, help="batches taken (throughput, memory, s3)")
    ap.add_argument("--batch-size", type=int, default=100, help="images per batch")
    ap.add_argument("--image-size", type=int, default=32, help="memory: decoded side (measure/decode: the size)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each figure")
    ap.add_argument("--url", default="s3://empssl-bench/tiny-imagenet", help="s3: where the shards are uploaded")
    # the child's own flags
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="stream", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--pss", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.row in ("measure", "decode"):
        print(json.dumps(measure(args) if args.row == "measure" else decode(args)))
        return 0
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.root = args.root.resolve()
    args.root.mkdir(parents=True, exist_ok=True)
    emit(versions())
    if args.row == "smoke":  # every row at toy size: the code paths, in seconds
        args.classes, args.per_class, args.val_per_class, args.shard_size = 4, 30, 5, 40
        args.sizes, args.steps, args.batch_size = [200], 2, 20
        for row in (row_throughput, row_startup, row_memory, row_s3):
            row(args)
        return 0
    {"throughput": row_throughput, "startup": row_startup, "memory": row_memory, "s3": row_s3}[args.row](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
