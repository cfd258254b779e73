"""Every GPU figure of this project in one go, for a session that has one GPU for a few minutes.

    python bench/gpu_check.py --data cifar10-jpeg75.tar.gz --out gpu-check          # < 8 min on an H100/H200
    python bench/gpu_check.py --data cifar10-jpeg75.tar.gz --out gpu-check --paper  # + ablation, t-SNE (< 8 more)
    python bench/gpu_check.py --smoke --out gpu-check-smoke                         # the same code paths, CPU, toy

What it runs, in this order (each part's figures go into OUT/gpu_check.json as soon as it ends, so a run cut
short keeps what it measured; the table OUT/gpu_check.md is rewritten after every part):

1. ``throughput``: bench/throughput.py rows at 20 and 200 patches x 100 images, eager and compiled
   (augment, step, end-to-end, eval at 128 test patches for the eager 20-patch row);
2. ``probe``: the linear probe on 50,000 x 4,096 synthetic features, 10 classes, 100 epochs (the official
   recipe's size), its CUDA-graph path checked against the eager path on a smaller problem, and the 5-lr sweep;
3. ``run``: ``empssl train --preset cifar10-readme-1epoch`` (1 epoch of a 2-epoch schedule, 128 test patches)
   as a fresh process timed from its start, its results.json (accuracy, the wall-clock account), then
   ``empssl eval --test-patches 16`` of the same checkpoint;
4. ``stream``: the streamed tier (issue 13) at ImageNet size: JPEGs the size of ImageNet's (the demo's CIFAR
   images upscaled to 500x375, bicubic, plus noise, JPEG q95: ~105 KiB, the mean is recorded) written as an
   ImageFolder tree and sharded by ``empssl shard``'s writer (its time recorded), then images/s
   arriving from ``empssl.stream.StreamBatches`` (``--decode cuda``, 224 px) and the on-device patching rate
   (bench/throughput.py augment row, 20 patches of 224 px) against the training step's own
   rate (ResNet-18 at 224 px, 20 patches, batch 100: bench/throughput.py's step row) and an ``empssl train
   --preset imagenet100 --data-mode stream`` run on the shards (end to end); target >= 600 images/s arriving,
   so that the GPU does not wait;
5. ``chunks``: one EMP-SSL step of 200 patches x 100 images at 224 px (``resnet18-imagenet``, bf16, the
   ``imagenet100-200patches`` preset's step) made and consumed in 10 and 20 groups (``--patch-chunks``,
   bench/chunks.py): peak GPU memory and step time; a step in one group would need ~279 GiB (estimated);
6. with ``--paper``: the patch-count ablation (2, 5, 10, 20, 50, 100, 200 patches, 1 epoch, 16 test patches) and
   the t-SNE map of the 1-epoch run.

The targets of issue 7 are checked in the table (probe <= 3 s, 128-patch extraction of 60,000 images <= 35 s,
training >= 90,000 patches/s end to end at 20 patches, the whole 1-epoch run <= 60 s from process start,
linear @16 >= 75.0), and issue 13's streamed row (>= 600 images/s arriving at 224 px).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ scripts import each other
import chunks as chunks_bench  # noqa: E402
import probe as probe_bench  # noqa: E402
import throughput  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# Toy sizes for --smoke (CPU, bundled data): every part runs its real code path in seconds.
SMOKE_MODEL = ["--width", "4", "--hidden-dim", "32", "--z-dim", "16", "--patch-size", "8"]
SMOKE_TRAIN = ["--data", "demo", "--train-subset", "200", "--test-subset", "100", "--batch-size", "20",
               "--num-patches", "4", "--probe-epochs", "2", "--device", "cpu", *SMOKE_MODEL]


class Check:
    """The JSON record of this run, written after every part."""

    def __init__(self, out: Path, args: argparse.Namespace) -> None:
        self.out, self.t0 = out, time.perf_counter()
        self.data: dict[str, Any] = {
            "command": " ".join([sys.executable, *sys.argv]), "smoke": args.smoke,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "cpu",
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "commit": _git_commit(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "parts": {},
        }

    def part(self, name: str, figures: dict[str, Any]) -> None:
        self.data["parts"][name] = figures
        self.data["seconds"] = time.perf_counter() - self.t0
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=2) + "\n")
        (self.out / "gpu_check.md").write_text(table(self.data))
        print(f"[gpu_check] {name} done at {self.data['seconds']:.0f} s", flush=True)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def empssl(*argv: str, log: Path) -> float:
    """Run ``empssl ARGV`` as a fresh process (its output appended to ``log``); return its wall time in seconds."""
    cmd = [sys.executable, "-m", "empssl.cli", *argv, "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"gpu_check: `empssl {' '.join(argv)}` failed (exit {done.returncode}); see {log}")
    return seconds


# --- the parts ---------------------------------------------------------------------------------------------


def throughput_part(args: argparse.Namespace) -> dict[str, Any]:
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        sizes = [("20 patches", ["--num-patches", "4", "--batch-size", "8", *SMOKE_MODEL, "--eval-images", "32",
                                 "--eval-patches", "4"])]
        timing = ["--steps", "2", "--warmup", "1", "--repeats", "1"]
    else:
        sizes = [("20 patches", ["--num-patches", "20", "--batch-size", "100"]),
                 ("200 patches", ["--num-patches", "200", "--batch-size", "100"])]
        timing = []
    out: dict[str, Any] = {}
    for name, size in sizes:
        big = "200" in name
        eager_rows = "augment,step,end-to-end" if big else "augment,step,end-to-end,eval"
        extra = ["--steps", "10", "--repeats", "2"] if big else []
        out[f"{name}, eager"] = throughput.run(["--device", device, *size, *timing, *extra, "--rows", eager_rows])
        # Compiling on the CPU takes minutes even for the toy model: --smoke runs the compiled rows eagerly
        # (the same function; only torch.compile is left out) and says so.
        compiled = [] if args.smoke else ["--compile"]
        out[f"{name}, compiled"] = throughput.run(["--device", device, *size, *timing, *extra, *compiled,
                                                   "--rows", "step,end-to-end"])
        out[f"{name}, compiled"]["compiled"] = not args.smoke
    return out


def probe_part(args: argparse.Namespace) -> dict[str, Any]:
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        full, check = dict(n=500, dim=64, classes=10, epochs=2), dict(n=230, dim=32, classes=5, epochs=2)
    else:
        full, check = dict(n=50000, dim=4096, classes=10, epochs=100), dict(n=5000, dim=512, classes=10, epochs=5)
    return {
        "official recipe": probe_bench.time_probe(device=device, **full),
        "lr sweep 0.003,0.01,0.03,0.1,0.3": probe_bench.time_probe(device=device, lrs=[0.003, 0.01, 0.03, 0.1, 0.3],
                                                                   val_fraction=0.1, **full),
        "fast path == eager path": probe_bench.compare_backends(device=device, **check),
    }


def run_part(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    log = out / "runs.log"
    run = out / "run1"
    if args.smoke:
        train_flags = [*SMOKE_TRAIN, "--epochs", "1", "--schedule-epochs", "2", "--test-patches", "8"]
    else:
        train_flags = ["--data", args.data, "--preset", "cifar10-readme-1epoch", "--test-patches", "128"]
    data_dir = ["--data-dir", str(args.data_dir)]
    # Decode the archive into the cache first, so that the timed run measures a warm start (the decoding of a
    # cold cache is timed separately).
    t0 = time.perf_counter()
    from empssl.data import load_data

    load_data("demo" if args.smoke else args.data, str(args.data_dir), progress=False)
    decode_s = time.perf_counter() - t0
    wall = empssl("train", *train_flags, *data_dir, "--out", str(run), log=log)
    results = json.loads((run / "results.json").read_text())
    eval16 = out / "results-16.json"
    eval_wall = empssl("eval", "--checkpoint", str(run), "--test-patches", "4" if args.smoke else "16",
                       *data_dir, "--out", str(eval16), log=log)
    r16 = json.loads(eval16.read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [m["patches_per_s"] for m in metrics[1:]] or [m["patches_per_s"] for m in metrics]
    n_images = results["n_train"] + results["n_test"]
    return {
        "decode_cold_cache_s": decode_s,
        "train_eval_wall_s": wall, "timing": results.get("timing"), "compile": results.get("compile"),
        "train_patches_per_s_median": sorted(rates)[len(rates) // 2] if rates else None,
        "train_seconds": results.get("train_seconds"),
        "n_images": n_images, "n_test": results["n_test"], "test_patches": results["test_patches"],
        "linear_top1": results["linear_top1"],
        "knn_top1": results["knn_top1"], "feature_seconds": results["feature_seconds"],
        "extraction_patches_per_s": n_images * results["test_patches"] / results["feature_seconds"],
        "probe_seconds": results["probe_seconds"], "knn_seconds": results["knn_seconds"],
        "eval16": {"wall_s": eval_wall, "test_patches": r16["test_patches"], "linear_top1": r16["linear_top1"],
                   "knn_top1": r16["knn_top1"], "feature_seconds": r16["feature_seconds"]},
    }


def _imagenet_size_jpeg(job: tuple[int, bytes]) -> bytes:
    """A JPEG of about ImageNet's size (500x375, ~105 KiB) from a small image: upscaled (bicubic), seeded
    Gaussian noise (sigma 12) for the fine detail a photo has and an upscaled thumbnail lacks, quality 95."""
    import io

    import numpy as np
    from PIL import Image

    seed, data = job
    with Image.open(io.BytesIO(data)) as img:
        big = np.asarray(img.convert("RGB").resize((500, 375), Image.Resampling.BICUBIC), dtype=np.float32)
    noisy = big + np.random.default_rng(seed).normal(0, 12, big.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy.round(), 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _no_memory_tier() -> Any:
    raise AssertionError("--data-mode stream over shards never loads the in-memory tier")


def stream_part(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from multiprocessing import get_context

    from empssl import stream
    from empssl.config import Config
    from empssl.data import scan
    from empssl.shard import write_shards

    smoke = args.smoke
    n_train, n_test, batch = (60, 20, 20) if smoke else (3000, 200, 100)
    catalog = scan("demo", str(args.data_dir))
    per_class = {"train": n_train // 10, "test": n_test // 10}  # the first images of each of the 10 classes
    records = [r for r in catalog.records if int(r.name.split("/")[2].split(".")[0]) < per_class[r.name.split("/")[0]]]
    t0 = time.perf_counter()
    with get_context("fork").Pool(max(1, min(16, os.cpu_count() or 1))) as pool:
        jpegs = pool.map(_imagenet_size_jpeg, [(i, r.read()) for i, r in enumerate(records)], chunksize=32)
    make_s = time.perf_counter() - t0
    src, shards = out / "jpegs", out / "shards"  # an ImageFolder tree (train/<class>/..., test/<class>/...),
    for old in (src, shards):  # sharded by empssl shard's writer; a rerun times a fresh write
        shutil.rmtree(old, ignore_errors=True)
    for jpeg, r in zip(jpegs, records, strict=True):
        (src / r.name).parent.mkdir(parents=True, exist_ok=True)
        (src / r.name).write_bytes(jpeg)
    t0 = time.perf_counter()
    write_shards(str(src), shards, progress=False)
    write_s = time.perf_counter() - t0
    size, patches = (32, 4) if smoke else (224, 20)
    device = torch.device("cpu" if smoke else "cuda")
    cfg = Config(data=str(shards), data_mode="stream", image_size=size, monitor_bank=batch, device=device.type)
    _, _, split = stream.load_splits(cfg, False, _no_memory_tier, print)
    assert split is not None
    decode = stream.resolve_decode("auto", device)
    steps, warm = (6, 1) if smoke else (60, 5)
    with stream.StreamBatches(split, batch_size=batch, seed=0, device=device, decode=decode) as batches:
        it = iter(batches)
        for _ in range(warm):
            next(it)
        torch.cuda.synchronize() if device.type == "cuda" else None
        t0 = time.perf_counter()
        for _ in range(steps - warm):
            next(it)
        torch.cuda.synchronize() if device.type == "cuda" else None
        arriving = (steps - warm) * batch / (time.perf_counter() - t0)
    model = SMOKE_MODEL if smoke else ["--arch", "resnet18-imagenet", "--patch-size", "224"]
    timing = ["--steps", "2", "--warmup", "1", "--repeats", "1"] if smoke else ["--steps", "10", "--repeats", "2"]
    rows = throughput.run(["--device", device.type, *model, "--num-patches", str(patches), "--batch-size", str(batch),
                           "--image-size", str(size), *timing, "--rows", "augment,step"])["rows"]
    step, augment = rows["step"], rows["augment"]
    run = out / "stream-run"
    flags = ([*SMOKE_TRAIN, "--data", str(shards), "--image-size", "32"] if smoke else
             ["--preset", "imagenet100", "--data", str(shards), "--compile", "off"])
    wall = empssl("train", *flags, "--data-mode", "stream", "--no-eval", "--epochs", "1", "--log-every", "2",
                  "--monitor-bank", str(batch), "--data-dir", str(args.data_dir), "--out", str(run),
                  log=out / "runs.log")
    rates = [json.loads(line)["patches_per_s"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"images": n_train, "jpeg_kib_mean": sum(map(len, jpegs[:n_train])) / n_train / 1024,
            "make_jpegs_s": make_s, "write_shards_s": write_s, "image_size": size, "num_patches": patches,
            "batch_size": batch, "decode": decode, "arriving_images_per_s": arriving,
            "step_images_per_s": step["views_per_s"] / patches,
            "patching_images_per_s": augment["views_per_s"] / patches,
            "train_images_per_s_median": sorted(rates)[len(rates) // 2] / patches if rates else None,
            "train_wall_s": wall}


def chunks_part(args: argparse.Namespace) -> dict[str, Any]:
    size = (["--device", "cpu", "--width", "8", "--num-patches", "8", "--batch-size", "8", "--steps", "1",
             "--chunks", "1,4"] if args.smoke else
            ["--device", "cuda", "--precision", "bf16", "--arch", "resnet18-imagenet", "--patch-size", "224",
             "--image-size", "224", "--num-patches", "200", "--batch-size", "100", "--chunks", "10,20"])
    what, rows = chunks_bench.measure(size)
    return {"what": what, "rows": rows}


def paper_part(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    log = out / "runs.log"
    ablation = out / "ablate-patches"
    if args.smoke:
        flags = [*[f for f in SMOKE_TRAIN if f not in ("--num-patches", "4")], "--test-patches", "2"]
        counts = "2,4"
    else:
        flags = ["--data", args.data, "--preset", "cifar10-paper", "--test-patches", "16"]
        counts = "2,5,10,20,50,100,200"
    wall = empssl("ablate-patches", *flags, "--data-dir", str(args.data_dir), "--patches", counts,
                  "--out", str(ablation), log=log)
    tsne_wall = empssl("tsne", "--checkpoint", str(out / "run1"), "--data-dir", str(args.data_dir),
                       "--test-patches", "4" if args.smoke else "16", "--max-points", "200" if args.smoke else "5000",
                       log=log)
    rows = json.loads((ablation / "ablation.json").read_text())["rows"]
    return {"ablation_wall_s": wall, "ablation": rows, "tsne_wall_s": tsne_wall, "tsne": str(out / "run1" / "tsne.png")}


# --- the table -----------------------------------------------------------------------------------------------


def _fmt(x: Any, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def table(data: dict[str, Any]) -> str:
    """A short Markdown table of every figure and target."""
    parts = data["parts"]
    lines = [f"# gpu_check ({'smoke, CPU' if data['smoke'] else data['device']})", "",
             f"torch {data['torch']}, torchvision {data['torchvision']}, Python {data['python']}, commit "
             f"{data['commit']}, {data['date']}; `{data['command']}`", ""]
    if "throughput" in parts:
        lines += ["| throughput (patches/s) | augment | step | end-to-end | eval | peak GiB |",
                  "|---|--:|--:|--:|--:|--:|"]
        for name, res in parts["throughput"].items():
            rows = res["rows"]
            cells = [_fmt(rows.get(k, {}).get("views_per_s")) for k in ("augment", "step", "end-to-end", "eval")]
            peak = max((r["peak_gib"] for r in rows.values()), default=None)
            lines.append(f"| {name}{'' if res.get('compiled', True) else ' (smoke: eager)'} | " + " | ".join(cells)
                         + f" | {_fmt(peak, '.1f')} |")
        lines.append("")
    if "probe" in parts:
        p = parts["probe"]
        lines += ["| probe | seconds | backend | top-1 |", "|---|--:|---|--:|"]
        for name in ("official recipe", "lr sweep 0.003,0.01,0.03,0.1,0.3"):
            r = p[name]
            lines.append(f"| {name} ({r['n']} x {r['dim']}, {r['epochs']} epochs) | {r['seconds']:.2f} | "
                         f"{r['backend']} | {r['top1']:.2f} |")
        c = p["fast path == eager path"]
        lines += [f"| fast == eager: max weight difference {c['max_abs_diff']:.2e} | | {c['backend']} | |", ""]
    if "run" in parts:
        r = parts["run"]
        t = r.get("timing") or {}
        lines += ["| 1-epoch run (README schedule) | figure |", "|---|--:|",
                  f"| train + {r['test_patches']}-patch eval, wall from process start (s) | "
                  f"{r['train_eval_wall_s']:.1f} |",
                  f"| ... as results.json accounts it | {t.get('total', float('nan')):.1f} = "
                  + " + ".join(f"{k} {v:.1f}" for k, v in t.items() if k != "total") + " |",
                  f"| train patches/s (median of the logged intervals) | {_fmt(r['train_patches_per_s_median'])} |",
                  f"| feature extraction, {r['test_patches']} patches x {r['n_images']:,} images (s) | "
                  f"{r['feature_seconds']:.1f} ({_fmt(r['extraction_patches_per_s'])} patches/s) |",
                  f"| linear probe (s) | {r['probe_seconds']:.2f} |",
                  f"| linear / kNN @{r['test_patches']} | {r['linear_top1']:.2f} / {r['knn_top1']:.2f} |",
                  f"| linear / kNN @{r['eval16']['test_patches']} | {r['eval16']['linear_top1']:.2f} / "
                  f"{r['eval16']['knn_top1']:.2f} |",
                  f"| compile | {r.get('compile')} |", ""]
        lines += ["| target (issue 7) | measured | met |", "|---|--:|:-:|"]
        official = (parts.get("probe") or {}).get("official recipe", {})
        e2e = (parts.get("throughput") or {}).get("20 patches, eager", {}).get("rows", {}).get("end-to-end", {})
        checks = [("probe <= 3 s", official.get("seconds"), lambda v: v <= 3),
                  ("128-patch extraction of 60,000 images <= 35 s", r["feature_seconds"], lambda v: v <= 35),
                  ("train >= 90,000 patches/s end to end (bench, eager)", e2e.get("views_per_s"),
                   lambda v: v >= 90000),
                  ("train >= 90,000 patches/s (the run's median)", r["train_patches_per_s_median"],
                   lambda v: v >= 90000),
                  ("1-epoch train + 128-patch eval <= 60 s from process start", r["train_eval_wall_s"],
                   lambda v: v <= 60),
                  ("linear @16 >= 75.0", r["eval16"]["linear_top1"], lambda v: v >= 75.0)]
        for name, value, ok in checks:
            met = "-" if value is None else ("yes" if ok(value) else "NO")
            lines.append(f"| {name} | {_fmt(value, ',.2f')} | {met} |")
        lines.append("")
    if "stream" in parts:
        r = parts["stream"]
        met = "- (smoke)" if data["smoke"] else "yes" if r["arriving_images_per_s"] >= 600 else "NO"
        lines += [f"| streamed tier: {r['images']:,} JPEGs of {r['jpeg_kib_mean']:.0f} KiB at {r['image_size']} px, "
                  f"{r['num_patches']} patches, batch {r['batch_size']} (images/s) | figure |", "|---|--:|",
                  f"| arriving from the shards (decode {r['decode']}) | {_fmt(r['arriving_images_per_s'])} |",
                  f"| patching alone, on the device (bench/throughput.py augment row) | "
                  f"{_fmt(r.get('patching_images_per_s'))} |",
                  f"| the training step alone (bench/throughput.py) | {_fmt(r['step_images_per_s'])} |",
                  f"| both: empssl train --data-mode stream (median of the logged intervals) | "
                  f"{_fmt(r['train_images_per_s_median'])} |",
                  f"| target: >= 600 arriving (met: {met}) | |", ""]
    if "chunks" in parts:
        c = parts["chunks"]
        lines += [f"A step in groups (--patch-chunks): {c['what']}", "", *chunks_bench.markdown(c["rows"]), ""]
    if "paper" in parts:
        p = parts["paper"]
        lines += [f"Patch-count ablation ({p['ablation_wall_s']:.0f} s):", "",
                  "| patches | linear | kNN | train s |", "|--:|--:|--:|--:|"]
        lines += [f"| {row['n']} | {_fmt(row['linear_top1'], '.2f')} | {_fmt(row['knn_top1'], '.2f')} | "
                  f"{_fmt(row['train_seconds'], '.1f')} |" for row in p["ablation"]]
        lines += ["", f"t-SNE: {p['tsne']} ({p['tsne_wall_s']:.0f} s)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="the CIFAR-10 archive or folder (e.g. cifar10-jpeg75.tar.gz); not with --smoke")
    ap.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and the runs")
    ap.add_argument("--data-dir", type=Path, default=None, help="decoded-image cache (default: OUT/data)")
    ap.add_argument("--parts", default="throughput,probe,run,stream,chunks", help="comma-separated parts to run")
    ap.add_argument("--paper", action="store_true", help="also the patch-count ablation and the t-SNE map")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU with the bundled data")
    args = ap.parse_args(argv)
    if not args.smoke and not args.data:
        ap.error("--data is required (or --smoke)")
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: this check is for a GPU (use --smoke to test it on the CPU)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.data_dir = args.data_dir or out / "data"
    if args.data and not args.smoke:
        args.data = str(Path(args.data).resolve())
    check = Check(out, args)
    parts = args.parts.split(",") + (["paper"] if args.paper else [])
    if "throughput" in parts:
        check.part("throughput", throughput_part(args))
    if "probe" in parts:
        check.part("probe", probe_part(args))
    if "run" in parts or "paper" in parts:
        check.part("run", run_part(args, out))
    if "stream" in parts:
        check.part("stream", stream_part(args, out))
    if "chunks" in parts:
        check.part("chunks", chunks_part(args))
    if "paper" in parts:
        check.part("paper", paper_part(args, out))
    print(table(check.data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
