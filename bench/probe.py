"""Linear-probe speed: the launch-free probe (empssl.probe.linear_probe) and, with --reference, the plain
nn.Linear + torch.optim.SGD loop it is tested against, on synthetic class-separable features.

    PYTHONPATH=src python bench/probe.py --device cuda --n 50000 --dim 4096 --classes 10 --epochs 100
    PYTHONPATH=src python bench/probe.py --device cuda --lrs 0.003,0.01,0.03,0.1,0.3
    PYTHONPATH=src python bench/probe.py --device cpu --n 5000 --dim 512 --epochs 5 --reference

Times are wall-clock seconds of the whole call (split, set-up, graph capture, training, test accuracy), after an
untimed small probe that initialises CUDA and cuBLAS; on CUDA the device is synchronised around every call.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch

from empssl.probe import BACKENDS, ProbeResult, linear_probe, reference_linear_probe


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def features(n: int, dim: int, classes: int, noise: float, seed: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, dim) float32 Gaussian blobs, (n,) labels: class centres of unit norm (seeded, shared by every ``seed``)
    plus ``noise`` times standard Gaussian noise per coordinate."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)).to(device) / math.sqrt(dim)
    g = torch.Generator(device=device).manual_seed(1 + seed)
    labels = torch.randint(classes, (n,), generator=g, device=device)
    return centres[labels] + noise * torch.randn(n, dim, generator=g, device=device), labels


def timed(run: Callable[[], ProbeResult], device: torch.device, repeats: int) -> tuple[list[float], ProbeResult]:
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        result = run()
        sync(device)
        times.append(time.perf_counter() - t0)
    assert result is not None
    return times, result


def report(name: str, times: list[float], res: ProbeResult, steps: int) -> None:
    spread = f" (min {min(times):.3f}, max {max(times):.3f}, {len(times)} runs)" if len(times) > 1 else ""
    mean = statistics.mean(times)
    chosen = f", chose lr {res.lr:g} (val {res.val_top1:.1f}%)" if res.sweep else ""
    print(f"{name:<22} {mean:8.3f} s{spread} | {1e6 * mean / steps:7.1f} us/step | test top1 {res.top1:.2f}% "
          f"at epoch {res.epoch}{chosen}")


def time_probe(*, n: int, dim: int, classes: int, epochs: int, device: str, lrs: list[float] | None = None,
               val_fraction: float = 0.0, n_test: int = 10_000, noise: float = 0.25, seed: int = 0) -> dict:
    """Seconds of one fast-probe call (after an untimed warm-up call) on synthetic features: a dict for
    bench/gpu_check.py with n, dim, epochs, seconds, backend, top1, lr."""
    dev = torch.device(device)
    x, y = features(n, dim, classes, noise, seed, dev)
    xt, yt = features(min(n_test, n), dim, classes, noise, seed + 1, dev)
    kw = {"epochs": epochs, "val_fraction": val_fraction, "seed": seed, "device": dev, "lrs": lrs}
    linear_probe(x[:1000], y[:1000], xt[:100], yt[:100], classes, **{**kw, "epochs": 1})  # CUDA, cuBLAS start-up
    times, res = timed(lambda: linear_probe(x, y, xt, yt, classes, **kw), dev, 1)
    return {"n": n, "dim": dim, "epochs": epochs, "lrs": lrs, "seconds": times[0], "backend": res.backend,
            "top1": res.top1, "lr": res.lr, "protocol": res.protocol}


def compare_backends(*, n: int, dim: int, classes: int, epochs: int, device: str, seed: int = 0) -> dict:
    """The fast probe on ``device`` (the CUDA graph there) against the reference loop on the same features:
    the largest weight and bias differences (float32 rounding only: ~1e-7 relative)."""
    dev = torch.device(device)
    x, y = features(n, dim, classes, 0.25, seed, dev)
    xt, yt = features(max(n // 5, 10), dim, classes, 0.25, seed + 1, dev)
    kw = {"epochs": epochs, "seed": seed, "device": dev}
    fast = linear_probe(x, y, xt, yt, classes, **kw)
    ref = reference_linear_probe(x, y, xt, yt, classes, **kw)
    return {"backend": fast.backend, "max_abs_diff": max((fast.weight - ref.weight).abs().max().item(),
                                                         (fast.bias - ref.bias).abs().max().item()),
            "top1_fast": fast.top1, "top1_reference": ref.top1}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("features")
    g.add_argument("--n", type=int, default=50_000, help="training features")
    g.add_argument("--n-test", type=int, default=10_000, help="test features")
    g.add_argument("--dim", type=int, default=4096, help="feature dimension")
    g.add_argument("--classes", type=int, default=10, help="number of classes")
    g.add_argument("--noise", type=float, default=0.25, help="per-coordinate noise around unit-norm class centres")
    g = p.add_argument_group("probe")
    g.add_argument("--epochs", type=int, default=100, help="probe epochs")
    g.add_argument("--batch-size", type=int, default=100, help="probe batch size")
    g.add_argument("--lr", type=float, default=0.03, help="learning rate of the single-head probe")
    g.add_argument("--lrs", type=str, default="", help="comma-separated learning rates: a sweep, one head each")
    g.add_argument("--val-fraction", type=float, default=None,
                   help="validation split of the training features (default: 0.1 when sweeping, else 0)")
    g.add_argument("--backend", choices=BACKENDS, default="auto", help="fast probe backend")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--repeats", type=int, default=1, help="timed calls of each probe")
    g.add_argument("--reference", action="store_true", help="also time the reference loop (single lr only)")
    g.add_argument("--seed", type=int, default=0, help="seeds the features and the probe")
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    lrs = [float(v) for v in args.lrs.split(",") if v] or None
    val_fraction = args.val_fraction if args.val_fraction is not None else (0.1 if lrs else 0.0)
    x, y = features(args.n, args.dim, args.classes, args.noise, args.seed, device)
    xt, yt = features(args.n_test, args.dim, args.classes, args.noise, args.seed + 1, device)
    kw = {"epochs": args.epochs, "batch_size": args.batch_size, "val_fraction": val_fraction, "seed": args.seed,
          "device": device}
    n_train = args.n - round(val_fraction * args.n)
    steps = args.epochs * math.ceil(n_train / args.batch_size)

    print(f"device: {describe(device)} | torch {torch.__version__}")
    print(f"features: {args.n} x {args.dim}, {args.classes} classes | probe: {args.epochs} epochs, batch "
          f"{args.batch_size}, {steps} steps, lr {args.lrs or args.lr}, val fraction {val_fraction:g}")
    # Untimed: CUDA context, cuBLAS handles, first-call kernel loads.
    linear_probe(x[:1000], y[:1000], xt[:100], yt[:100], args.classes, lr=args.lr, lrs=lrs, epochs=1,
                 batch_size=args.batch_size, val_fraction=val_fraction, device=device, backend=args.backend)

    times, fast = timed(lambda: linear_probe(x, y, xt, yt, args.classes, lr=args.lr, lrs=lrs, backend=args.backend,
                                             **kw), device, args.repeats)
    report(f"fast ({fast.backend})", times, fast, steps)
    if args.reference:
        if lrs:
            print("reference: skipped (a sweep has no reference loop; drop --lrs)")
            return 0
        times, ref = timed(lambda: reference_linear_probe(x, y, xt, yt, args.classes, lr=args.lr, **kw), device,
                           args.repeats)
        report("reference", times, ref, steps)
        print(f"max |w_fast - w_ref| = {(fast.weight - ref.weight).abs().max().item():.2e}, "
              f"max |b_fast - b_ref| = {(fast.bias - ref.bias).abs().max().item():.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
