"""Throughput of EMP-SSL patch generation: ours (empssl.patches) vs kornia vs a torchvision.v2 loop.

All three make the same workload: a uint8 batch (B, 3, S, S) in, B * n_patches normalised 32 px patches out,
with per-patch random parameters (crop 1/4 of the area + flip + ColorJitter p0.8 + grayscale p0.2 +
Gaussian blur p0.1 + solarize p0.1 + normalise).

    PYTHONPATH=src python bench/augment.py --device cpu --repeats 3
    PYTHONPATH=src python bench/augment.py --methods ours --memory-format channels_last --dtype bfloat16
    PYTHONPATH=src python bench/augment.py --device cpu --traffic   # ops and bytes of one step of ours
    PYTHONPATH=src python bench/augment.py --methods ours --image-size 64 --scale 0.08,1 --ratio 0.75,1.3333
    PYTHONPATH=src python bench/augment.py --device cpu --against ../old/src   # ours vs another checkout's

``--against SRC`` times the ``make_patches`` of another checkout (``SRC/empssl/patches.py``, e.g. from
``git archive OLD src | tar -x -C ../old``) and ours in alternation, step by step in one process, so that the load
of a shared machine falls on both alike; it prints the median of each.

``--traffic`` counts, for one step of ``ours`` with the pixel ops in one chunk as on a GPU, the aten ops run
(each a kernel launch on a GPU) and the bytes they read and write, in units of one float32 patch tensor
(P, 3, 32, 32): a device-independent measure of the work, since these ops are memory- or launch-bound.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

from empssl import patches
from empssl.patches import Augment, make_patches

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> list[float]:
    """Seconds per call, after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def ours(images: torch.Tensor, n: int, aug: Augment, out_dtype: torch.dtype = torch.float32,
         memory_format: torch.memory_format = torch.contiguous_format) -> Callable[[], torch.Tensor]:
    g = torch.Generator(device=images.device).manual_seed(0)
    return lambda: make_patches(images, n, aug, g, out_dtype=out_dtype, memory_format=memory_format)


class Traffic(TorchDispatchMode):
    """Counts the aten ops run under it and the bytes of the tensors each one reads and writes (views and
    allocations are free; a broadcast operand counts at its own size)."""

    FREE = {"empty", "empty_strided", "empty_like", "lift_fresh", "detach", "alias", "_unsafe_view",
            "_record_function_enter_new", "_record_function_exit"}

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func.__name__.split(".")[0] in self.FREE:
            return out
        self.ops += 1
        if func.__name__.startswith("copy_"):  # reads the source, writes the destination
            self.bytes += 2 * args[1].numel() * args[1].element_size()
            return out
        read = [*args, *(v for k, v in kwargs.items() if k != "out")]
        read = [t for a in read for t in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(t, torch.Tensor)]
        written = [t for t in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(t, torch.Tensor)]
        self.bytes += sum(t.numel() * t.element_size() for t in read + written)
        return out


def traffic(fn: Callable[[], torch.Tensor], n_patches: int, size: int) -> tuple[int, float]:
    """(aten ops, bytes moved in float32 (P, 3, size, size) tensors) of one call of ``fn``, after a warm-up
    call, with the pixel ops in one chunk as on a GPU."""
    chunk, patches._CPU_CHUNK_ELEMENTS = patches._CPU_CHUNK_ELEMENTS, 1 << 62
    try:
        fn()
        with Traffic() as t:
            fn()
    finally:
        patches._CPU_CHUNK_ELEMENTS = chunk
    return t.ops, t.bytes / (n_patches * 3 * size * size * 4)


def kornia_pipeline(images: torch.Tensor, n: int, aug: Augment) -> Callable[[], torch.Tensor]:
    import kornia.augmentation as K

    blur_k = 2 * int(torch.tensor(3 * aug.blur_sigma[1]).ceil()) + 1
    pipe = K.AugmentationSequential(
        K.RandomResizedCrop((aug.size, aug.size), scale=aug.scale, ratio=aug.ratio),
        K.RandomHorizontalFlip(p=aug.flip_p),
        K.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue, p=aug.jitter_p),
        K.RandomGrayscale(p=aug.gray_p),
        K.RandomGaussianBlur((blur_k, blur_k), aug.blur_sigma, p=aug.blur_p),
        K.RandomSolarize(thresholds=0.0, additions=0.0, p=aug.solarize_p),  # threshold exactly 0.5
        K.Normalize(mean=torch.tensor(aug.mean), std=torch.tensor(aug.std)),
    ).to(images.device)

    def run() -> torch.Tensor:
        # Same contract as ours: uint8 in, (n, B, ...) out; kornia needs each patch as its own batch row.
        x = images.float().div(255).repeat(n, 1, 1, 1)
        return pipe(x).view(n, images.shape[0], 3, aug.size, aug.size)

    return run


def torchvision_loop(images: torch.Tensor, n: int, aug: Augment) -> Callable[[], torch.Tensor]:
    import torchvision.transforms.v2 as T

    blur_k = 2 * int(torch.tensor(3 * aug.blur_sigma[1]).ceil()) + 1
    pipe = T.Compose(
        [
            T.RandomResizedCrop(aug.size, scale=aug.scale, ratio=aug.ratio, antialias=True),
            T.RandomHorizontalFlip(aug.flip_p),
            T.RandomApply(
                [T.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue)], p=aug.jitter_p
            ),
            T.RandomGrayscale(aug.gray_p),
            T.RandomApply([T.GaussianBlur(blur_k, sigma=aug.blur_sigma)], p=aug.blur_p),
            T.RandomSolarize(0.5, p=aug.solarize_p),
            T.Normalize(aug.mean, aug.std),
        ]
    )

    def run() -> torch.Tensor:
        # v2 draws one set of parameters per call, so per-patch parameters need one call per patch.
        x = images.float().div(255)
        return torch.stack([torch.stack([pipe(img) for img in x]) for _ in range(n)])

    return run


METHODS = {"ours": ours, "kornia": kornia_pipeline, "torchvision": torchvision_loop}


def alternate(images: torch.Tensor, n: int, aug: Augment, other_src: str, repeats: int) -> tuple[float, float]:
    """Median seconds per step of (the other checkout's make_patches, ours), timed in turns after a warm-up."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("other_patches", Path(other_src) / "empssl" / "patches.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"no empssl/patches.py under {other_src}")
    other = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = other  # dataclasses look their module up there
    spec.loader.exec_module(other)
    other_aug = other.Augment(**{f: getattr(aug, f) for f in ("size", "scale", "ratio")})
    fns = [lambda g: other.make_patches(images, n, other_aug, g), lambda g: make_patches(images, n, aug, g)]
    times: list[list[float]] = [[], []]
    for r in range(repeats + 1):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for k in order:
            g = torch.Generator(device=images.device).manual_seed(r)
            sync(images.device)
            t0 = time.perf_counter()
            fns[k](g)
            sync(images.device)
            if r > 0:  # the first round warms both up
                times[k].append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def pair(text: str) -> tuple[float, float]:
    lo, hi = (float(v) for v in text.split(","))
    return lo, hi


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: cuda if available)")
    ap.add_argument("--batch", type=int, default=100, help="images per step")
    ap.add_argument("--patches", type=int, default=20, help="patches per image")
    ap.add_argument("--image-size", type=int, default=32, help="side of the (random uint8) source images")
    ap.add_argument("--scale", default="0.25,0.25",
                    help="crop area range LO,HI (0.08,1: the baselines' RandomResizedCrop; with --image-size 64 "
                         "some crops are downsampled)")
    ap.add_argument("--ratio", default="1,1", help="crop aspect range LO,HI (3/4,4/3 for the baselines: 0.75,1.3333)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per method, after one warm-up step")
    ap.add_argument(
        "--methods", default="ours,kornia,torchvision", help="comma-separated: " + ",".join(METHODS)
    )
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of our patches")
    ap.add_argument("--memory-format", default="contiguous", choices=list(MEMORY_FORMATS),
                    help="layout of our (P, 3, s, s) patches (channels_last: a channels_last network's input)")
    ap.add_argument("--against", metavar="SRC",
                    help="also time another checkout's make_patches (SRC/empssl/patches.py) alternated with ours")
    ap.add_argument("--traffic", action="store_true",
                    help="also print the aten ops and bytes moved by one step of ours (see the module docstring)")
    args = ap.parse_args(argv)

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    versions = f"torch {torch.__version__}, torchvision {torchvision.__version__}"
    try:
        import kornia

        versions += f", kornia {kornia.__version__}"
    except ImportError:
        versions += ", kornia not installed"
    print(f"device: {describe(device)}; {versions}")
    print(
        f"workload: {args.batch} images of {args.image_size}px x {args.patches} patches "
        f"= {args.batch * args.patches} patches/step, {args.repeats} timed steps; "
        f"ours in {args.dtype}, {args.memory_format}; crop scale {args.scale}, ratio {args.ratio}"
    )

    try:
        aug = Augment(scale=pair(args.scale), ratio=pair(args.ratio))
    except (ValueError, patches.AugmentError) as e:
        print(f"bad --scale/--ratio: {e}")
        return 2
    images = torch.randint(
        0,
        256,
        (args.batch, 3, args.image_size, args.image_size),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(0),
    ).to(device)
    n_out = args.batch * args.patches
    if args.against:
        theirs, mine = alternate(images, args.patches, aug, args.against, args.repeats)
        print(f"{'against':12s} {n_out / theirs:12,.0f} patches/s ({args.against}); ours {n_out / mine:,.0f} "
              f"patches/s; ours/theirs time {mine / theirs:.2f} (medians of {args.repeats} alternated steps)")
    for name in args.methods.split(","):
        if name not in METHODS:
            print(f"{name}: unknown method, choose from {', '.join(METHODS)}")
            return 2
        try:
            if name == "ours":
                fn = ours(images, args.patches, aug, DTYPES[args.dtype], MEMORY_FORMATS[args.memory_format])
            else:
                fn = METHODS[name](images, args.patches, aug)
        except ImportError as e:
            print(f"{name:12s} skipped ({e})")
            continue
        secs = time_it(fn, device, args.repeats)
        rates = [n_out / s for s in secs]
        spread = statistics.stdev(rates) if len(rates) > 1 else 0.0
        print(
            f"{name:12s} {statistics.mean(rates):12,.0f} patches/s  (+- {spread:,.0f}; "
            f"{1000 * statistics.mean(secs):8.1f} ms/step)"
        )
        if name == "ours" and args.traffic:
            ops, moved = traffic(fn, n_out, aug.size)
            print(f"{'':12s} {ops} aten ops per step, {moved:.1f} x P*3*{aug.size}*{aug.size}*4 bytes moved")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
