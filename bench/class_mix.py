"""Classes per batch under LitData's own shuffle: a folder written in class order, empssl shard's seeded order, and
a global permutation.

LitData (``StreamingDataset(shuffle=True)``) shuffles the order of the chunks, then the items within a window of
one chunk; it never mixes the whole dataset. So what a batch holds depends on the order the folder was written in.
This writes a Tiny-ImageNet-like layout (``--classes`` x ``--per-class`` 1x1 PNGs: only the labels matter) twice,
with ``--chunk-images`` items per chunk:

(a) ``litdata.optimize`` over the images in class order, as a user's optimize over an ImageFolder writes them;
(b) ``empssl shard`` (:func:`empssl.shard.write_shards`, seeded random order) of the same images;

iterates each for one epoch with ``StreamingDataset(shuffle=True, drop_last=True)`` and ``StreamingDataLoader``
(``--batch`` images per batch, 0 and 2 workers), and prints the distinct classes per batch, beside (c) batches cut
from one global permutation of the labels (what an in-memory loader's shuffle gives).

    PYTHONPATH=src python bench/class_mix.py                       # 200 x 500, chunks of 25,000, batches of 256
    PYTHONPATH=src python bench/class_mix.py --chunk-images 1000
"""

from __future__ import annotations

import argparse
import io
import platform
import sys
import tempfile
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (128, 64, 32)).save(buf, format="PNG")
    return buf.getvalue()


def class_order_item(per_class: int, image: bytes, i: int) -> dict:
    """Item i of an ImageFolder in its order: class i // per_class."""
    return {"image": image, "label": i // per_class}


def per_batch(labels: list[np.ndarray]) -> np.ndarray:
    """(n_batches,) distinct classes in each batch."""
    return np.array([len(np.unique(b)) for b in labels])


def litdata_batches(folder: Path, batch: int, workers: int, seed: int) -> list[np.ndarray]:
    """One epoch of LitData's own shuffle: each batch's labels."""
    from litdata import StreamingDataLoader, StreamingDataset

    ds = StreamingDataset(str(folder), shuffle=True, drop_last=True, seed=seed)
    loader = StreamingDataLoader(ds, batch_size=batch, num_workers=workers, drop_last=True)
    return [b["label"].numpy() for b in loader]


def show(name: str, counts: np.ndarray) -> None:
    print(f"{name:<44} {len(counts):>7} {counts.mean():>6.1f} {np.median(counts):>6.0f} {counts.min():>4} "
          f"{counts.max():>4}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=200, help="classes (default: 200, Tiny ImageNet's)")
    parser.add_argument("--per-class", type=int, default=500, help="images per class (default: 500)")
    parser.add_argument("--chunk-images", type=int, default=25_000,
                        help="items per chunk, in both folders (default: 25,000, about LitData's 64 MB chunks of "
                             "Tiny ImageNet's ~2.5 KB JPEGs)")
    parser.add_argument("--batch", type=int, default=256, help="images per batch (default: 256)")
    parser.add_argument("--workers", default="0,2", help="StreamingDataLoader worker counts (default: 0,2)")
    parser.add_argument("--seed", type=int, default=0, help="LitData's shuffle seed and empssl shard's --seed")
    args = parser.parse_args()

    import litdata
    import torch

    from empssl import __version__
    from empssl.shard import verify_shards, write_shards

    n = args.classes * args.per_class
    image = png()
    print(f"# {args.classes} classes x {args.per_class} images, {args.chunk_images:,} per chunk, batches of "
          f"{args.batch}; python {platform.python_version()}, litdata {litdata.__version__}, torch "
          f"{torch.__version__}, numpy {np.__version__}, empssl {__version__}; {platform.machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        litdata.optimize(fn=partial(class_order_item, args.per_class, image), inputs=list(range(n)),
                         output_dir=str(root / "class-order"), chunk_size=args.chunk_images, num_workers=1)
        verify_shards(root / "class-order")  # a foreign folder: prints its class-order warning
        with zipfile.ZipFile(root / "tree.zip", "w") as z:
            for i in range(n):
                z.writestr(f"c{i // args.per_class:03d}/{i % args.per_class:04d}.png", image)
        write_shards(str(root / "tree.zip"), root / "shards", shard_size=args.chunk_images, progress=False,
                     seed=args.seed)
        print(f"{'order written / read by':<44} {'batches':>7} {'mean':>6} {'median':>6} {'min':>4} {'max':>4}"
              "  (distinct classes per batch)")
        for workers in (int(w) for w in args.workers.split(",")):
            show(f"(a) class order, litdata.optimize, {workers} workers",
                 per_batch(litdata_batches(root / "class-order", args.batch, workers, args.seed)))
            show(f"(b) empssl shard --seed {args.seed}, {workers} workers",
                 per_batch(litdata_batches(root / "shards" / "train", args.batch, workers, args.seed)))
    labels = np.arange(n) // args.per_class
    perm = np.random.default_rng(args.seed).permutation(n)
    show("(c) one global permutation", per_batch(np.split(labels[perm][: n // args.batch * args.batch],
                                                           n // args.batch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
