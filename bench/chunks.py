"""Peak memory and time of one EMP-SSL training step with its patches made and consumed in groups (--patch-chunks).

Each K runs in a fresh process (the peak of one process is all the step's tensors at once): on the CPU the peak
resident memory (ru_maxrss) above what the process held before the step, on CUDA ``max_memory_allocated``
above the memory allocated before it; and the median time of a few steps after a warm-up one.

    PYTHONPATH=src OMP_NUM_THREADS=1 taskset -c 1 python bench/chunks.py --chunks 1,2,4,8
    PYTHONPATH=src python bench/chunks.py --device cuda --arch resnet18-imagenet --patch-size 224 \\
        --num-patches 200 --batch-size 100 --chunks 10,20 --precision bf16     # the 200 x 224 px step

Expected: the activations (most of a step's memory) shrink as 1/K; the time grows by about one more forward
pass (about a third of a step) whatever K is, plus per-group overheads once groups get small.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch


def one(args: argparse.Namespace, k: int) -> dict[str, float]:
    """One K in this process: peak memory of a step above the memory before it, and its median time."""
    from empssl.config import Config
    from empssl.devices import autocast_dtype, synchronize
    from empssl.methods import create_method
    from empssl.optim import LARS, lars_param_groups
    from empssl.train import train_step

    device = torch.device(args.device)
    cfg = Config(arch=args.arch, width=args.width, patch_size=args.patch_size, num_patches=args.num_patches,
                 batch_size=args.batch_size, patch_chunks=k, device=args.device, precision=args.precision,
                 crop_scale=(0.25, 0.25)).validate()
    method = create_method(cfg)
    torch.manual_seed(0)
    model = method.build_model().to(device)
    opt = LARS(lars_param_groups(model), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
               eta=cfg.lars_eta)
    side = args.image_size
    images = torch.randint(0, 256, (args.batch_size, 3, side, side), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    amp = autocast_dtype(cfg.precision, device)

    def step() -> None:
        train_step(model, opt, method, images, gen, amp, torch.contiguous_format)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the first step sets the peak
    step()  # warm-up: the momentum buffers, and the peak
    synchronize(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return {"chunks": k, "peak_gib": peak / 2**30, "step_s": statistics.median(times)}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", default="1,2,4,8", help="comma-separated --patch-chunks values (default 1,2,4,8)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"))
    ap.add_argument("--arch", default="resnet18-cifar")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--patch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--num-patches", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up one (default 3)")
    ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # the child process: one K
    return ap


def measure(argv: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """(a line saying what was measured, one row per K: ``one``'s figures, or ``{"chunks", "error"}``), each K in a
    fresh process."""
    args = parser().parse_args(argv)
    what = (f"torch {torch.__version__}, {args.device}, EMP-SSL {args.arch} width {args.width}, {args.num_patches} "
            f"patches x {args.batch_size} images of {args.patch_size} px ({args.image_size} px images), "
            f"{args.precision}")
    rows: list[dict[str, Any]] = []
    for k in (int(k) for k in args.chunks.split(",")):
        done = subprocess.run([sys.executable, __file__, *argv, "--one", str(k)], capture_output=True, text=True)
        if done.returncode:
            said = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
            rows.append({"chunks": k, "error": said[-1]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return what, rows


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The rows as a Markdown table, relative to the first row that ran."""
    lines = ["| --patch-chunks | peak memory of a step | step time (median) |", "|---|---|---|"]
    base = next((r for r in rows if "error" not in r), None)
    for r in rows:
        if "error" in r or base is None:
            lines.append(f"| {r['chunks']} | failed: {r.get('error')} | |")
            continue
        lines.append(f"| {r['chunks']} | {r['peak_gib']:.2f} GiB ({r['peak_gib'] / base['peak_gib']:.2f}x) | "
                     f"{r['step_s']:.3f} s ({r['step_s'] / base['step_s']:.2f}x) |")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.one:
        print(json.dumps(one(args, args.one)))
        return 0
    what, rows = measure(argv)
    print(what, f"{torch.get_num_threads()} threads", sep=", ")
    print("\n".join(markdown(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
