"""Decoding: one image's bytes -> (H, W, 3) uint8 (:func:`decode_image`), and a catalog's images -> one
(N, 3, H, W) uint8 tensor with a process pool (:func:`decode_catalog`).

The rules :func:`decode_image` applies, in order:

- **Size first.** An image of more than :data:`MAX_IMAGE_PIXELS` pixels (read from the header) is refused with
  one line naming it and its size. PIL's own bomb check (a warning above ``PIL.Image.MAX_IMAGE_PIXELS``, an error
  above twice that) is switched off meanwhile, so that this one rule applies, and then restored.
- **16-bit images** (PNG/TIFF modes ``I;16``, ``I;16B``, ``I;16L``, and ``I``, which PIL uses for 16-bit
  PNGs) are scaled from 0..65535 to 0..255 (``round(v * 255 / 65535)``; ``I`` is clipped to 0..65535 first),
  then replicated to three channels. 16-bit RGB PNGs are reduced to 8 bits by PIL itself (the high byte).
- **Transparency** (RGBA, LA, PA, and P/L/RGB images with a transparent colour): composited over white,
  ``out = (c * a + 255 * (255 - a)) / 255`` rounded, as an image viewer shows it on a white page. A fully
  transparent pixel is white whatever colour it hides; an opaque one keeps its colour.
- Everything else (L, 1, CMYK, YCbCr, F, ...) goes through PIL's ``convert("RGB")``; one-channel images
  become three equal channels.
- ``image_size`` S > 0: shorter side resized to S (bilinear, antialiased when shrinking), centre crop S x S.
"""

from __future__ import annotations

import contextlib
import io
import math
import multiprocessing as mp
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .images import DataError, resize_crop
from .layouts import Catalog
from .sources import read_file

# The largest image decoded, in pixels: PIL's default MAX_IMAGE_PIXELS (0.25 GiB as RGBA), enforced here as
# an error rather than PIL's warning. 100 Mpx = 300 MB decoded; such an image is refused from its header.
MAX_IMAGE_PIXELS = 89_478_485
# Below this many images a process pool costs more to start than it saves.
POOL_MIN_IMAGES = 512


def decode_image(data: bytes | Image.Image | np.ndarray, image_size: int = 0, name: str = "image") -> np.ndarray:
    """Decode one image file's bytes into (H, W, 3) uint8 (or (S, S, 3) with ``image_size`` S > 0) by the rules of
    the module docstring; a PIL image or an (H, W, 3|1) uint8 array (what a LitData folder may hold,
    :func:`empssl.shard.read_item`) goes the same way. ``name`` is how the one-line :class:`DataError` for an image
    that is too large or cannot be decoded names it ("image train/cat/1.png in /data/x")."""
    try:
        if isinstance(data, np.ndarray):
            if data.dtype != np.uint8 or data.ndim != 3 or data.shape[-1] not in (1, 3):
                raise DataError(f"cannot decode {name}: a {data.dtype} array of shape {data.shape}, not (H, W, 3) "
                                f"or (H, W, 1) uint8")
            data = Image.fromarray(data[..., 0] if data.shape[-1] == 1 else data)
        # (a PIL image given is the caller's: not closed here)
        with _pil_bomb_check_off(), \
                contextlib.nullcontext(data) if isinstance(data, Image.Image) else Image.open(io.BytesIO(data)) as img:
            rgb = _to_rgb(img, name)
            return resize_crop(rgb, image_size) if image_size else np.asarray(rgb, dtype=np.uint8)
    except DataError:
        raise
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise DataError(f"cannot decode {name}: {_why(e)}") from e


def read_header(data: bytes, name: str = "image") -> tuple[str, tuple[int, int]]:
    """(format as PIL names it, (width, height)) from an image file's header, without decoding its pixels;
    DataError (one line, naming ``name``) when it cannot be read."""
    try:
        with _pil_bomb_check_off(), Image.open(io.BytesIO(data)) as img:
            return str(img.format), img.size
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise DataError(f"cannot decode {name}: {_why(e)}") from e


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """``img`` as 8-bit RGB by the rules of the module docstring, after its size is checked."""
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        raise DataError(f"{name} is {w}x{h} = {w * h:,} pixels, more than the {MAX_IMAGE_PIXELS:,} "
                        f"allowed (empssl.data.decode.MAX_IMAGE_PIXELS); shrink it or leave it out")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint32)  # (H, W, 4)
        a = rgba[..., 3:]
        over_white = (rgba[..., :3] * a + 255 * (255 - a) + 127) // 255
        return Image.fromarray(over_white.astype(np.uint8), "RGB")
    return img.convert("RGB")


# PIL's bomb check is a module global; pool workers and threads share one switch, restored by the last user.
_bomb_lock = threading.Lock()
_bomb_users = 0
_bomb_saved: int | None = None


@contextlib.contextmanager
def _pil_bomb_check_off() -> Iterator[None]:
    global _bomb_users, _bomb_saved
    with _bomb_lock:
        if _bomb_users == 0:
            _bomb_saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        _bomb_users += 1
    try:
        yield
    finally:
        with _bomb_lock:
            _bomb_users -= 1
            if _bomb_users == 0:
                Image.MAX_IMAGE_PIXELS = _bomb_saved


# PIL puts the repr of the file object it was given into some messages ("<_io.BytesIO object at 0x7f...>"
# for archive members): meaningless to the user, who is told the member's name instead.
_FILE_REPR = re.compile(r"\s*<_io\.\w+ (?:object at 0x[0-9a-fA-F]+|name=[^>]*)>")


def _why(e: Exception) -> str:
    """One line saying why an image could not be decoded, without PIL's file-object repr."""
    if isinstance(e, UnidentifiedImageError):
        return "UnidentifiedImageError: not an image format PIL recognises (or a damaged header)"
    detail = _FILE_REPR.sub("", " ".join(str(e).split()))
    return f"{type(e).__name__}: {detail}" if detail else type(e).__name__


_Job = tuple[int, list[str | bytes], list[str], int]


class _SizesDiffer(Exception):
    """Two images differ in size: ``args`` are (row of the catalog, (H, W)) of each."""


def _decode_chunk(job: _Job) -> tuple[int, np.ndarray]:
    """Pool worker: decode images ``start, start + 1, ...`` (paths or bytes, named ``names``) into ``(start,
    (k, 3, H, W) uint8)``: one stacked array per chunk keeps the pickling between processes cheap. DataError for
    the first that cannot be read or decoded, :class:`_SizesDiffer` for the first unlike the chunk's first."""
    start, sources, names, image_size = job
    arrays: list[np.ndarray] = []
    for k, (src, name) in enumerate(zip(sources, names, strict=True)):
        arrays.append(decode_image(read_file(src, name), image_size, name))
        if arrays[-1].shape != arrays[0].shape:
            raise _SizesDiffer((start, arrays[0].shape[:2]), (start + k, arrays[-1].shape[:2]))
    return start, np.stack(arrays).transpose(0, 3, 1, 2)


def decode_catalog(catalog: Catalog, image_size: int, progress: bool) -> torch.Tensor:
    """Decode every image of ``catalog`` into one (N, 3, H, W) uint8 tensor, with a process pool when there
    are many. DataError names the first image that cannot be decoded, or two images of different size."""
    records = catalog.records
    n = len(records)
    if n == 0:
        raise DataError(f"no images to decode in {catalog.source}")
    names = [f"image {catalog.where(i)}" for i in range(n)]
    workers = pool_workers() if n >= POOL_MIN_IMAGES else 1
    size = max(1, min(256, math.ceil(n / (4 * workers))))  # >= 4 chunks per worker to balance the load
    jobs: list[_Job] = [(i, [r.data for r in records[i: i + size]], names[i: i + size], image_size)
                        for i in range(0, n, size)]
    out: np.ndarray | None = None  # (N, 3, H, W), allocated once the first chunk's image size is known
    # fork: workers need only PIL and numpy, and re-importing torch in each (spawn) costs seconds.
    # Workers ignore Ctrl-C: the parent alone gets KeyboardInterrupt and terminates them (no traceback per
    # worker, and no worker that dies of it while the pool replaces it and decoding goes on).
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ctx.Pool(workers, ignore_sigint) if workers > 1 else None
    results: Iterator[tuple[int, np.ndarray]] = (pool.imap_unordered(_decode_chunk, jobs) if pool
                                                 else map(_decode_chunk, jobs))
    try:
        with tqdm(total=n, desc="decoding", unit="img", file=sys.stderr, disable=not progress) as bar:
            for start, arr in results:
                if out is None:
                    out = np.empty((n, 3, *arr.shape[2:]), dtype=np.uint8)
                    first = start  # the chunk whose image size every other must have
                elif arr.shape[2:] != out.shape[2:]:
                    raise _SizesDiffer((first, out.shape[2:]), (start, arr.shape[2:]))
                out[start: start + len(arr)] = arr
                bar.update(len(arr))
    except _SizesDiffer as e:
        sizes = ", ".join(f"{catalog.root}{records[i].name} is {w}x{h}" for i, (h, w) in e.args)
        raise DataError(f"images differ in size ({sizes}); pass --image-size N to resize them all to N x N") from None
    finally:
        if pool is not None:
            pool.terminate()
    assert out is not None  # n >= 1 and every chunk either filled its rows or raised
    return torch.from_numpy(out)


def ignore_sigint() -> None:
    """A pool worker's initialiser: Ctrl-C is the parent's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_share() -> int:
    """This process's share of the CPUs: under torchrun, the node's usable CPUs over its local ranks."""
    return max(1, usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


def pool_workers() -> int:
    """Processes for a decoding or writing pool: this process's CPU share, at most 16."""
    return min(cpu_share(), 16)
