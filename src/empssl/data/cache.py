"""The decoded-image cache: ``data_dir/cache/<name>-<hash>/`` holding ``images.npy``, ``labels.npy`` (when the
source has classes) and ``meta.json`` (names, classes, splits, the source and the cache version), one per source
and image size: what :func:`empssl.data.load_images` returns.

- A cache folder is complete or absent: written into a temp folder ``.<name>-<hash>.<host>.<pid>.*.tmp`` beside it
  and renamed into place. Temp folders of dead processes are removed at the next load on the same host; a damaged
  cache folder is removed and decoded again.
- Writing is best effort: when the cache cannot be written (full disk, read-only or missing ``data_dir``), the
  images are returned all the same, with one note on stderr; nothing half-written is left behind.
- The key covers the source's path, the image size and the cache version, and the archive's size and mtime or
  every file of a folder (size and mtime): a folder's contents can change without its own mtime changing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .images import ImageSet
from .sources import ARCHIVE_SUFFIXES, Tree

# Bump when the cache layout or the decoding changes, so stale caches are not reused.
# 2: one format for load_data and load_images; 16-bit images scaled, transparency composited over white.
CACHE_VERSION = 2
_TMP_SUFFIX = ".tmp"


def cache_dir(source: Path, data_dir: Path, image_size: int, tree: Tree | None) -> Path:
    """``data_dir/cache/<name>-<hash>`` for ``source`` (an archive when ``tree`` is None) decoded at ``image_size``."""
    h = add_stamps(hashlib.sha256(f"{source}|{image_size}|{CACHE_VERSION}".encode()), source, tree)
    stem = source.name
    if tree is None:  # an archive: its name without the suffix
        stem = next((stem[:-len(s)] for s in ARCHIVE_SUFFIXES if stem.lower().endswith(s)), stem)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "data"
    return data_dir / "cache" / f"{safe}-{h.hexdigest()[:16]}"


def add_stamps(h: Any, source: Path, tree: Tree | None) -> Any:
    """``h`` (a hashlib hash) updated with an archive's (``tree`` None) size and mtime, or every file's name, size and
    mtime: the cache's key, and a run's record of its data (:func:`empssl.data.load.fingerprint`)."""
    if tree is None:
        st = source.stat()
        h.update(f"|{st.st_size}|{st.st_mtime_ns}".encode())
    else:
        for name, (size, mtime) in sorted(tree.stamps.items()):
            h.update(f"|{name}|{size}|{mtime}".encode())
    return h


def write_cache(cache: Path, images: ImageSet, source: str, image_size: int) -> None:
    """Save ``images`` under ``cache`` atomically; on an OS error, leave nothing behind and print a note."""
    tmp: Path | None = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.{_host()}.{os.getpid()}.", suffix=_TMP_SUFFIX,
                                    dir=cache.parent))
        arrays = {k: t.numpy() for k, t in (("images", images.images), ("labels", images.labels)) if t is not None}
        for key, array in arrays.items():
            np.save(tmp / f"{key}.npy", array)
        meta = {"version": CACHE_VERSION, "arrays": sorted(arrays), "source": source, "image_size": image_size,
                "names": images.names, "classes": images.classes, "class_names": images.class_names,
                "splits": images.splits}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, cache)
            tmp = None
        except OSError:
            if not (cache / "meta.json").is_file():  # else another process wrote the same cache first: as good
                raise
    except OSError as e:
        print(f"note: the decoded images were not cached under {cache.parent} ({e.strerror or e}); they are "
              f"decoded again next time (free some space, or pass a writable --data-dir)", file=sys.stderr)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def read_cache(cache: Path) -> ImageSet | None:
    """The cached :class:`ImageSet`, or None when absent or unreadable (then the caller decodes again)."""
    if not cache.exists():  # not read and removed: another process may be renaming its cache into place
        return None
    try:
        meta: dict[str, Any] = json.loads((cache / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION or "images" not in meta["arrays"]:
            raise ValueError("cache version or contents mismatch")
        arrays = {key: np.load(cache / f"{key}.npy") for key in meta["arrays"]}
        labels = torch.from_numpy(arrays["labels"]) if "labels" in arrays else None
        return ImageSet(torch.from_numpy(arrays["images"]), list(meta["names"]), labels, meta["classes"],
                        meta["class_names"], [(s, c) for s, c in meta["splits"]])
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        # Caches are renamed into place complete, so this one was damaged afterwards: rebuild it.
        shutil.rmtree(cache, ignore_errors=True)
        return None


def remove_stale_temps(cache_root: Path) -> None:
    """Remove the temp folders under ``cache_root`` left by processes of this host that no longer run."""
    if os.name != "posix":  # os.kill(pid, 0) probes a process only on POSIX
        return
    host = _host()
    for entry in cache_root.glob(f".*{_TMP_SUFFIX}"):  # none when there is no cache folder yet
        parts = entry.name.split(".")  # "", <name>-<hash> (dots allowed), host, pid, random, "tmp"
        if len(parts) >= 6 and parts[-4] == host and parts[-3].isdigit() and not _alive(int(parts[-3])):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:  # EPERM: alive, another user's
        return not isinstance(e, ProcessLookupError)
    return True


def _host() -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname()) or "host"
