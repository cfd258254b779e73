"""CPU seconds (``time.process_time``) of the augmentation, the train step and a short ``train()`` run on the CPU.

Wall-clock figures on a core shared with other processes measure the neighbours; CPU seconds of this process
do not, so this script compares two versions of the code on a busy machine (run it once per checkout):

    PYTHONPATH=src OMP_NUM_THREADS=1 taskset -c 0 python bench/cpu_seconds.py --data-dir ../empssl-data
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from empssl.config import Config
from empssl.data import load_data
from empssl.methods import create_method
from empssl.optim import LARS, lars_param_groups
from empssl.train import train, train_step


def cpu_ms(fn: Callable[[], object], calls: int, repeats: int = 5) -> list[float]:
    """CPU milliseconds per call of ``fn``, one figure per repeat of ``calls`` calls."""
    out = []
    for _ in range(repeats):
        t = time.process_time()
        for _ in range(calls):
            fn()
        out.append((time.process_time() - t) / calls * 1000)
    return out


def line(name: str, values: list[float], unit: str) -> str:
    return f"{name}: {statistics.median(values):.2f} {unit} CPU (median of {len(values)}; " \
           f"{min(values):.2f}-{max(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="./data", help="where the bundled demo images are decoded once")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = Config(width=16, patch_size=16, num_patches=4, batch_size=32, device="cpu")
    method = create_method(cfg)
    torch.manual_seed(0)
    model = method.build_model()
    opt = LARS(lars_param_groups(model), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
               eta=cfg.lars_eta)
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, 1 thread; EMP-SSL width 16, 4 patches x 32 images of 16 px")
    print(line("views (augment)", cpu_ms(lambda: method.views(images, gen), 20), "ms per batch"))
    cpu_ms(lambda: train_step(model, opt, method, images, gen, None, torch.contiguous_format), 3, 1)  # warm-up
    print(line("train_step", cpu_ms(lambda: train_step(model, opt, method, images, gen, None,
                                                        torch.contiguous_format), 5), "ms per step"))
    load_data("demo", args.data_dir, progress=False)
    runs = []
    for _ in range(3):
        with tempfile.TemporaryDirectory() as out:
            c = Config(data="demo", data_dir=args.data_dir, width=8, patch_size=16, num_patches=4, batch_size=32,
                       train_subset=640, epochs=1, device="cpu", log_every=5, checkpoint_every=10)
            t = time.process_time()
            train(c, out, progress=False, log=lambda s: None, evaluate_at_end=False)
            runs.append(time.process_time() - t)
    print(line("train() of 20 steps (set-up, loop, 2 checkpoints)", runs, "s"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
