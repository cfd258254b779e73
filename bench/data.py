"""Throughput of the streamed tier's data work: shard writing, and JPEG decode + patching per CPU core (and on a GPU).

The images are ImageNet-size JPEGs made from the bundled demo archive's CIFAR-10 images (no ImageNet here): each
32x32 image upscaled to 500x375 (bicubic), with Gaussian grain added (sigma 24 per pixel, shared by the channels,
plus 8 per channel) so that the file is about as large as an ImageNet photo (about 110 KB), then saved as a
baseline 4:2:0 JPEG of quality 92. The sizes are printed.

Rows, each as images per wall-clock second and per CPU second of the process (per core: run it pinned to one core,
``taskset -c 0``, with OMP_NUM_THREADS=1; on a loaded machine the CPU-second rate is the per-core figure; GPU rows:
read the wall-clock rate):

    shard write          empssl.shard.write_shards of a folder of these files (one worker, stored byte for byte)
    shard write --max-side 256   the same, each image decoded, resized to 256x192 and encoded (JPEG q90)
    decode PIL           PIL open + RGB + numpy array (libjpeg-turbo, as empssl.data.decode_image)
    decode torchvision   torchvision.io.decode_jpeg of one file's bytes at a time, RGB (libjpeg-turbo)
    decode + 20 patches  torchvision decode of a batch, then empssl.patches.make_patches: 20 patches of 224 px
                         (crop scale 0.25, ratio 3/4..4/3, the imagenet100 preset's) per image
    cuda decode (+20 patches)   torchvision.io.decode_jpeg(list_of_tensors, device="cuda") (batched nvjpeg), and
                         the same patches on the GPU: only when CUDA is available

    OMP_NUM_THREADS=1 taskset -c 0 PYTHONPATH=src python bench/data.py
    PYTHONPATH=src python bench/data.py --smoke       # a few images, seconds: checks the code paths
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from empssl.data import decode_image, scan
from empssl.patches import Augment, make_patches

SIZE = (500, 375)  # (width, height): ImageNet's most common size
QUALITY = 92
PATCHES, PATCH_SIZE = 20, 224
AUG = Augment(size=PATCH_SIZE, scale=(0.25, 0.25), ratio=(3 / 4, 4 / 3))  # presets/imagenet100.json


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` ImageNet-size JPEG files made from the demo archive's CIFAR-10 images (module docstring)."""
    rng = np.random.default_rng(seed)
    records = scan("demo").records
    out = []
    for i in range(n):
        small = Image.fromarray(decode_image(records[i % len(records)].read()))
        x = np.asarray(small.resize(SIZE, Image.Resampling.BICUBIC), dtype=np.float32)
        x = x + rng.normal(0, 24, (SIZE[1], SIZE[0], 1)) + rng.normal(0, 8, x.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=QUALITY)
        out.append(buf.getvalue())
    return out


def rate(fn: Callable[[], int], seconds: float) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process) of ``fn`` (which returns how many images
    it did), called repeatedly for at least ``seconds`` after one warm-up call. On a shared, loaded machine the
    second is the one to read: the rate of one core that this process had to itself."""
    fn()
    done, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        done += fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return done / elapsed, done / max(1e-9, time.process_time() - c0)


def shard_write(files: list[bytes], seconds: float, max_side: int | None = None) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for i, data in enumerate(files):
            (src / f"{i:05d}.jpg").write_bytes(data)
        from empssl.shard import write_shards

        runs = [0]

        def once() -> int:
            runs[0] += 1
            write_shards(str(src), Path(tmp) / f"out{runs[0]}", max_side=max_side, workers=1, progress=False)
            return len(files)

        return rate(once, seconds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=200, help="how many distinct JPEGs to make (default 200)")
    ap.add_argument("--batch", type=int, default=32, help="images per patching batch (default 32)")
    ap.add_argument("--seconds", type=float, default=5.0, help="time each row for at least this long (default 5)")
    ap.add_argument("--smoke", action="store_true", help="8 images, 1 per batch, 2 patches, 0.2 s per row")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    n, batch, seconds, n_patches = args.images, args.batch, args.seconds, PATCHES
    if args.smoke:
        n, batch, seconds, n_patches = 8, 1, 0.2, 2
    files = make_jpegs(n)
    tensors = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]
    device = (f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)"
              + (f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "; no GPU"))
    print(f"device: {device}; torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"pillow {Image.__version__}")
    kb = [len(f) / 1000 for f in files]
    print(f"images: {n} JPEGs {SIZE[0]}x{SIZE[1]} q{QUALITY} from the demo archive, mean {np.mean(kb):.0f} KB "
          f"(min {min(kb):.0f}, max {max(kb):.0f})")
    rows: dict[str, tuple[float, float]] = {}
    cursor = [0]

    def take(k: int) -> list[int]:
        idx = [(cursor[0] + j) % n for j in range(k)]
        cursor[0] += k
        return idx

    def pil() -> int:
        (i,) = take(1)
        with Image.open(io.BytesIO(files[i])) as img:
            np.asarray(img.convert("RGB"))
        return 1

    def tv() -> int:
        (i,) = take(1)
        decode_jpeg(tensors[i], mode=ImageReadMode.RGB)
        return 1

    g = torch.Generator().manual_seed(0)

    def tv_patches() -> int:
        images = torch.stack([decode_jpeg(tensors[i], mode=ImageReadMode.RGB) for i in take(batch)])
        make_patches(images, n_patches, AUG, g)
        return batch

    rows["shard write"] = shard_write(files, seconds)
    rows["shard write --max-side 256"] = shard_write(files, seconds, max_side=256)
    rows["decode PIL"] = rate(pil, seconds)
    rows["decode torchvision"] = rate(tv, seconds)
    rows[f"decode + {n_patches} patches"] = rate(tv_patches, seconds)
    if torch.cuda.is_available():
        gpu = torch.Generator(device="cuda").manual_seed(0)

        def cuda_decode(patch: bool) -> Callable[[], int]:
            def fn() -> int:
                decoded = decode_jpeg([tensors[i] for i in take(batch)], mode=ImageReadMode.RGB, device="cuda")
                if patch:
                    make_patches(torch.stack(decoded), n_patches, AUG, gpu)
                torch.cuda.synchronize()
                return batch
            return fn

        rows["cuda decode"] = rate(cuda_decode(False), seconds)
        rows[f"cuda decode + {n_patches} patches"] = rate(cuda_decode(True), seconds)
    print(f"{'':28s} {'images/s':>10s} {'per CPU s':>10s}")
    for name, (wall, cpu) in rows.items():
        print(f"{name:28s} {wall:10,.1f} {cpu:10,.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows,
                                               "mean_kb": float(np.mean(kb)), "patches": n_patches}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
