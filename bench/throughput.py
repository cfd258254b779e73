"""Throughput of EMP-SSL training and evaluation, part by part, on one device.

Prints one table for a configuration (flags mirror ``empssl train``):

    augment      views made per second (uint8 images on the device -> normalised views in the network's layout)
    step         train step alone on pre-made views (forward, loss, backward, LARS update)
    end-to-end   the training loop's step: batch from the on-device images + views + step
    eval         evaluation feature extraction (the method's own view; EMP-SSL: seeded patches, bf16 on CUDA)

with views (EMP-SSL: patches) per second, ms per step and peak memory (CUDA: max_memory_allocated during that part;
CPU: the process's peak RSS so far). CUDA times come from CUDA events around the timed steps, after ``--warmup``
untimed steps and a synchronize.

    PYTHONPATH=src python bench/throughput.py --device cpu --width 16 --patch-size 16 --num-patches 4 \\
        --batch-size 32 --steps 5 --warmup 2 --repeats 3 --eval-images 64 --eval-patches 4
    PYTHONPATH=src python bench/throughput.py --device cuda --num-patches 20 --batch-size 100   # official size
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torchvision

from empssl.config import Config, method_recipe
from empssl.devices import autocast_dtype, resolve_device
from empssl.evaluate import image_features
from empssl.methods import create_method
from empssl.optim import LARS, lars_param_groups
from empssl.train import train_step


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {name}, {torch.get_num_threads()} threads"


class Timer:
    """Seconds per call of ``fn`` over ``steps`` calls after ``warmup`` calls (CUDA events on CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], object], steps: int, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / 1000 / max(steps, 1)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - t0) / max(steps, 1)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss_kib / 2**20


def load_images(spec: str, n: int, size: int) -> torch.Tensor:
    """(n, 3, H, W) uint8: random pixels ("synthetic") or the first n training images of a dataset spec."""
    if spec == "synthetic":
        return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    from empssl.data import load_data

    train, _ = load_data(spec, progress=False)
    if len(train) < n:
        reps = -(-n // len(train))
        return train.images.repeat(reps, 1, 1, 1)[:n]
    return train.images[:n]


def main(argv: list[str] | None = None) -> int:
    return 0 if run(argv) is not None else 1


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, time the requested rows, print the table; return the figures as a dict (for gpu_check)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--method", default="emp-ssl", help="emp-ssl | simclr | vicreg | byol (its own preset)")
    ap.add_argument("--arch", default="resnet18-cifar")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--hidden-dim", type=int, default=None, help="default: the method's")
    ap.add_argument("--z-dim", type=int, default=None, help="default: the method's")
    ap.add_argument("--patch-size", type=int, default=32)
    ap.add_argument("--num-patches", type=int, default=20, help="patches per image per step (EMP-SSL)")
    ap.add_argument("--batch-size", type=int, default=100, help="images per step")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--channels-last", type=parse_bool, default=True, metavar="BOOL", help="on CUDA only")
    ap.add_argument("--compile", type=parse_bool, nargs="?", const=True, default=False, metavar="BOOL",
                    help="torch.compile the model for the step and end-to-end rows")
    ap.add_argument("--grad-checkpointing", type=parse_bool, nargs="?", const=True, default=False, metavar="BOOL",
                    help="activation checkpointing of the backbone's residual blocks")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before each row")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of --steps steps per row (mean +- std)")
    ap.add_argument("--data", default="synthetic", help="synthetic (random uint8 images) or a dataset spec / path")
    ap.add_argument("--image-size", type=int, default=32, help="side of the synthetic images")
    ap.add_argument("--eval-images", type=int, default=2000, help="images in the evaluation row")
    ap.add_argument("--eval-patches", type=int, default=128, help="test patches per image in the evaluation row")
    ap.add_argument("--rows", default="augment,step,end-to-end,eval", help="comma-separated rows to run")
    args = ap.parse_args(argv)

    overrides = {k: v for k, v in dict(hidden_dim=args.hidden_dim, z_dim=args.z_dim).items() if v is not None}
    cfg = Config.from_dict({**method_recipe(args.method), "method": args.method, "arch": args.arch,
                            "width": args.width, "patch_size": args.patch_size, "num_patches": args.num_patches,
                            "batch_size": args.batch_size, "precision": args.precision,
                            "channels_last": args.channels_last, "device": args.device, **overrides}).validate()
    device = resolve_device(args.device)
    amp = autocast_dtype(cfg.precision, device)
    channels_last = args.channels_last and device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    method = create_method(cfg)
    B, s = args.batch_size, args.patch_size
    V = method.views_per_image  # the patches of EMP-SSL, 2 for the baselines
    P = V * B
    timer = Timer(device)

    print(f"device: {device_description(device)}")
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, python {platform.python_version()}")
    print(f"config: {args.method}, {args.arch} width {args.width}, {V} views x {B} images = {P} views/step of "
          f"{s}px, precision {'bf16' if amp else 'fp32'}, channels_last {channels_last}, compile {args.compile}, "
          f"grad_checkpointing {args.grad_checkpointing}, data {args.data}, {args.steps} timed steps after "
          f"{args.warmup} warm-up")

    n_images = max(B * 4, args.eval_images)
    images = load_images(args.data, n_images, args.image_size).to(device)
    torch.manual_seed(0)
    model = method.build_model().to(device, memory_format=memory_format)
    if args.grad_checkpointing:
        from empssl.recompute import recompute_backbone

        recompute_backbone(model)
    net = torch.compile(model) if args.compile else model
    opt = LARS(lars_param_groups(model), lr=0.1, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
               eta=cfg.lars_eta, nesterov=cfg.nesterov)
    gen = torch.Generator(device=device).manual_seed(0)
    rows: list[tuple[str, float, float, float, float]] = []  # name, views/s, its std, ms per step, peak GiB
    wanted = args.rows.split(",")

    def row(name: str, fn: Callable[[], object], patches: int, steps: int, warmup: int) -> None:
        reset_peak(device)
        secs = [timer(fn, steps, warmup if r == 0 else 0) for r in range(args.repeats)]
        rates = [patches / sec for sec in secs]
        std = statistics.stdev(rates) if len(rates) > 1 else 0.0
        rows.append((name, statistics.mean(rates), std, 1000 * statistics.mean(secs), peak_gib(device)))
        print(f"  {name:12s} {statistics.mean(rates):12,.0f} views/s", file=sys.stderr)

    if "augment" in wanted:
        batch = images[:B]
        row("augment", lambda: method.views(batch, gen, memory_format=memory_format), P, args.steps, args.warmup)

    if "step" in wanted:
        views = method.views(images[:B], gen, memory_format=memory_format)  # made once, reused every step
        model.train()

        def step() -> None:
            loss = method.loss(net, views, amp)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        row("step", step, P, args.steps, args.warmup)

    if "end-to-end" in wanted:
        model.train()
        n_steps = images.shape[0] // B
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0)).to(device)
        counter = iter(range(10**9))

        def end_to_end() -> None:
            i = next(counter) % n_steps
            batch = images.index_select(0, order[i * B:(i + 1) * B])
            train_step(net, opt, method, batch, gen, amp, memory_format)
            method.after_step(model, i + 1, 10**6, torch.ones((), dtype=torch.bool, device=device))

        row("end-to-end", end_to_end, P, args.steps, args.warmup)

    if "eval" in wanted:
        eval_images = images[:args.eval_images]
        eval_cfg = cfg.replace(test_patches=args.eval_patches)

        def features() -> None:
            image_features(model, eval_images, eval_cfg, device)

        view = "patches" if method.eval_view == "patches" else "full"
        per_image = args.eval_patches if view == "patches" else 1
        row("eval", features, args.eval_images * per_image, max(1, args.steps // 5), 1)

    print()
    print(f"| {'part':12s} | {'views/s':>22s} | {'ms/step':>9s} | {'peak GiB':>8s} |")
    print(f"|{'-' * 14}|{'-' * 23}:|{'-' * 10}:|{'-' * 9}:|")
    for name, rate, std, ms, peak in rows:
        print(f"| {name:12s} | {f'{rate:,.0f} +- {std:,.0f}':>22s} | {ms:9.1f} | {peak:8.2f} |")
    for name, rate, _, _, _ in rows:
        if name == "eval" and method.eval_view == "patches":
            print(f"eval: {args.eval_images} images x {args.eval_patches} patches per pass; "
                  f"60,000 images x {args.eval_patches} patches would take {60000 * args.eval_patches / rate:,.0f} s")
    if device.type == "cpu":
        print("peak GiB on CPU: the process's peak resident memory so far (it never decreases)")
    return {"device": device_description(device), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "config": {k: getattr(args, k) for k in vars(args)},
            "rows": {name: {"views_per_s": rate, "std": std, "ms_per_step": ms, "peak_gib": peak}
                     for name, rate, std, ms, peak in rows}}


if __name__ == "__main__":
    raise SystemExit(main())
