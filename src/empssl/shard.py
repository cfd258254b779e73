"""Shards: any source the data package reads, written once as LitData chunks of encoded image bytes, for the
streamed tier (``empssl shard SRC --out DIR``; the format, its rules and why it is LitData: docs/DATA.md).

On disk::

    DIR/manifest.json             written last: versions, source, classes, per split its counts and every shard
                                  and labels file's name, images, bytes and sha256
    DIR/<split>/index.json        LitData's index of that split (what litdata.StreamingDataset(DIR/<split>) reads)
    DIR/<split>/chunk-0-<j>.bin   shard j of the split: items j*K .. j*K+K-1 (K = shard_size), the split's images
                                  in a seeded random order (:func:`write_order`)
    DIR/<split>/labels.npy        the split's labels in item order (int32), to sample without reading the items

Each item is ``{"image": bytes, "label": int, "name": str}``: the image file's bytes (:func:`prepare_image`), an
index into ``classes`` (-1 without classes), the name relative to the source ("train/cat/0001.jpg").

Resumable (docs/DATA.md, "Interrupted runs"): a shard is recorded in ``<split>/.parts/j.json`` once in place, and
index.json and the manifest come last; ``.plan.json`` fixes the order and shard boundaries before the first shard.

A LitData folder that empssl did not write (``DIR/index.json``, or ``DIR/<split>/index.json``, no manifest) is
read too (:func:`foreign_manifest`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from .data import TORCHVISION_DATASETS, DataError, decode_image, scan
from .data.decode import ignore_sigint, pool_workers, read_header
from .data.imagenet import parse_spec
from .data.images import split_rows
from .data.load import resolve
from .data.sources import read_file
from .files import OutputError, WriterLock, read_json, write_atomic, write_json
from .version import __version__

FORMAT = "empssl-shards"
FORMAT_VERSION = 2  # 2: each split's labels.npy
JPEG_QUALITY = 90  # re-encoded images only (those larger than --max-side)
SHARD_BYTES = 64 * 2**20  # the target size of one shard (LitData's own default chunk_bytes is 64 MB)
MANIFEST = "manifest.json"
PLAN = ".plan.json"  # the run's fixed plan, written before the first shard; removed once the manifest is written
NO_SPLIT = "train"  # the split name of a source without split folders
LABELS = "labels.npy"  # each split's labels, int32, in item order

_Rec = tuple[str, int, "str | bytes"]  # (name, label, path or bytes): an ImageRecord that pickles cheaply
# (split folder, shard index, its records, images per shard, max_side, source)
_Job = tuple[str, int, list[_Rec], int, "int | None", str]


@dataclass(frozen=True)
class ShardFile:
    """One shard file of a split: its name in ``DIR/<split>/``, how many images it holds, its size and sha256."""

    name: str
    images: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitShards:
    """One split's shards: ``images`` in all, ``stored`` byte for byte, ``reencoded`` (resized to max_side),
    ``formats`` (image format -> count, as PIL names them: "JPEG", "PNG", ...), ``labels`` its labels.npy."""

    images: int
    stored: int
    reencoded: int
    formats: dict[str, int]
    shards: list[ShardFile]
    labels: ShardFile


@dataclass(frozen=True)
class ItemKeys:
    """Which fields of a folder's LitData items hold the image (encoded bytes, a PIL image or a pixel array), its
    int label and its name (None: the items have none)."""

    image: str = "image"
    label: str | None = "label"
    name: str | None = "name"


@dataclass(frozen=True)
class Manifest:
    """A shard folder's ``manifest.json``, read and checked by :func:`verify_shards` (``data``: the whole JSON;
    label i is ``classes[i]``). A LitData folder that empssl did not write (:func:`foreign_manifest`) has
    ``data["format"] == "litdata"``, no sha256s, and its labels in ``label_arrays``."""

    root: Path
    source: str
    classes: list[str] | None
    class_names: list[str] | None
    max_side: int | None
    shard_size: int
    splits: dict[str, SplitShards]
    data: dict[str, Any]
    url: str = ""  # a folder in an object store (empssl.remote): root is then the local mirror of its small files
    keys: ItemKeys = ItemKeys()
    label_arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def where(self) -> str:
        """How messages name the folder: its path or URL."""
        return self.url or str(self.root)

    def split_source(self, split: str) -> str:
        """What ``litdata.StreamingDataset`` reads for ``split``: its folder, or its URL."""
        if self.url:
            return f"{self.url}/{split}"
        return str(self.root if self.data.get("layout") == "flat" else self.root / split)

    def labels(self, split: str) -> np.ndarray:
        """(N,) int32 labels of ``split`` in item order (-1: the source has no classes). DataError (one line) when
        its labels.npy cannot be read."""
        if split in self.label_arrays:  # a foreign folder's, every split's (a flat one's too)
            return self.label_arrays[split]
        path = self.root / split / self.splits[split].labels.name
        try:
            labels = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path} ({type(e).__name__}); shard the source again") from None
        if labels.dtype != np.int32 or labels.shape != (self.splits[split].images,):
            raise DataError(f"{path} holds {labels.dtype} {tuple(labels.shape)}, not the split's "
                            f"{self.splits[split].images} int32 labels; shard the source again")
        return labels


# --- writing ------------------------------------------------------------------------------------------


def write_shards(spec: str, out: str | Path, max_side: int | None = None, workers: int | None = None,
                 shard_size: int | None = None, data_dir: str = "./data", progress: bool = True,
                 seed: int | None = None) -> Manifest:
    """Write every image of ``spec`` (any source :func:`empssl.data.scan` reads) as LitData shards under ``out``: a
    new or empty folder, or an unfinished run of the same command (which is continued).

    ``max_side``: larger images are resized to it and re-encoded (None: no limit); ``workers``: processes (default:
    the usable CPU cores, at most 16); ``shard_size``: images per shard (default: about 64 MB of the source's
    files); ``seed``: of the write order (default 0, or an unfinished run's own). DataError (one line, nothing left
    behind) for a bad source or ``out``; KeyboardInterrupt leaves the finished shards for the next run.
    """
    for value, flag, least in ((max_side, "--max-side", 1), (shard_size, "--shard-size", 1), (seed, "--seed", 0)):
        if value is not None and value < least:
            raise DataError(f"{flag} must be >= {least}, got {value}")
    out = Path(out).expanduser()
    source = source_name(spec, data_dir)
    previous = _previous_plan(out, source)  # before the scan, which can take long: refuse a wrong --out at once
    catalog = scan(spec, data_dir)
    if catalog.skipped:
        n = len(catalog.skipped)
        print(f"note: skipped {n} entr{'y' if n == 1 else 'ies'} of {catalog.source} that are not regular files, "
              f"e.g. {catalog.skipped[0]}", file=sys.stderr)
    seed = seed if seed is not None else previous.get("seed", 0)
    blocks = {name or NO_SPLIT: _in_order(catalog.records[rows], seed)
              for name, rows in split_rows(catalog.splits).items()}
    plan = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "source": source,
        "max_side": max_side, "jpeg_quality": JPEG_QUALITY, "seed": seed,
        "shard_size": shard_size or previous.get("shard_size") or _auto_shard_size(catalog.records),
        "classes": catalog.classes, "class_names": catalog.class_names,
        "images": len(catalog.records), "splits": {name: len(recs) for name, recs in blocks.items()},
        "fingerprint": _fingerprint(catalog.records),
    }
    if previous:
        _check_same_plan(out, previous, plan)
        if (out / MANIFEST).is_file():
            print(f"{out} already holds every shard of {source} ({MANIFEST}); nothing to do", file=sys.stderr)
            return verify_shards(out, hashes=False)
    fresh = not out.exists()
    if not previous:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create {out}: {e.strerror or e}") from None
        write_json(out / PLAN, plan)
    try:
        return _write_all(out, plan, blocks, workers, progress)
    except DataError:  # nothing left behind: what the runs wrote, and out itself when a run created it
        for split in blocks:
            shutil.rmtree(out / split, ignore_errors=True)
        for name in (PLAN, MANIFEST):
            (out / name).unlink(missing_ok=True)
        if (fresh or previous) and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def source_name(spec: str, data_dir: str = "./data") -> str:
    """How a manifest names the source ``spec``: the resolved folder or archive, or ``imagenet100:/abs/path``.
    DataError when it does not exist."""
    if spec in TORCHVISION_DATASETS:
        raise DataError(f"{spec} is torchvision's array dataset, which has no image files to shard; shard a folder or "
                        f"archive of its images instead")
    imagenet = parse_spec(spec, Path(data_dir))
    return imagenet.shown if imagenet else str(resolve(spec, Path(data_dir)))


def write_order(n: int, seed: int) -> np.ndarray:
    """(n,) the order a split (or an append) of ``n`` source images is written in: item i is source image
    ``order[i]``. Random, so that every chunk, and every window of it that LitData shuffles within, mixes the
    classes; seeded, so that a resumed run and any number of workers write the same bytes."""
    return np.random.default_rng(seed).permutation(n)


def _in_order(records: list[Any], seed: int, labels: dict[int, int] | None = None) -> list[_Rec]:
    """``records`` in their write order, each label (None: -1) mapped by ``labels`` where given."""
    ordered = (records[i] for i in write_order(len(records), seed))
    return [(r.name, -1 if r.label is None else labels[r.label] if labels else r.label, r.data) for r in ordered]


def _auto_shard_size(records: list[Any]) -> int:
    """Images per shard for about :data:`SHARD_BYTES` per shard, from the sizes of up to 256 evenly spaced files."""
    step = max(1, len(records) // 256)
    sizes = [len(r.data) if isinstance(r.data, bytes) else os.stat(r.data).st_size for r in records[::step]]
    mean = max(1.0, sum(sizes) / max(1, len(sizes)))
    return max(1, min(100_000, int(SHARD_BYTES // mean)))


def _fingerprint(records: list[Any]) -> str:
    """sha256 of every record's name and label: a source that changed between two runs has another."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.name}\0{r.label}\n".encode())
    return h.hexdigest()


def _previous_plan(out: Path, source: str) -> dict[str, Any]:
    """The plan of the shard run in ``out`` ({} for a new or empty folder); DataError for a file, a folder of
    other things, or shards of another source."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder for the shards")
    if not out.exists() or not any(out.iterdir()):
        return {}
    path = next((out / name for name in (MANIFEST, PLAN) if (out / name).is_file()), None)
    try:
        previous = json.loads(path.read_text()) if path else None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}); remove {out} or pass another --out") from None
    if not isinstance(previous, dict) or previous.get("format") != FORMAT:
        raise DataError(f"--out {out} is a folder that holds other files, not empssl shards; give a new or empty "
                        f"folder")
    if previous.get("source") != source:
        raise DataError(f"--out {out} holds shards of another source ({previous.get('source')}), not "
                        f"{source}; pass another --out or remove it (or add to its train split: --append)")
    return previous


def _check_same_plan(out: Path, previous: dict[str, Any], plan: dict[str, Any]) -> None:
    """Refuse to continue (or call complete) a run in ``out`` that another source state or other settings made (the
    plan's shard size and seed are the previous run's unless given)."""
    for key, flag in (("max_side", "--max-side"), ("shard_size", "--shard-size"), ("seed", "--seed")):
        if previous.get(key) != plan[key]:
            raise DataError(f"--out {out} holds shards of {plan['source']} written with {flag} "
                            f"{_shown(previous.get(key))}, not {_shown(plan[key])}; pass another --out or "
                            f"remove it")
    if previous.get("fingerprint") != plan["fingerprint"] or previous.get("format_version") != FORMAT_VERSION:
        raise DataError(f"--out {out} holds shards of {plan['source']} as it was before ({previous.get('images')} "
                        f"images; now {plan['images']}, or renamed); remove {out} or pass another --out")


def _shown(value: Any) -> str:
    return "none" if value is None else str(value)


def _write_all(out: Path, plan: dict[str, Any], blocks: dict[str, list[_Rec]], workers: int | None,
               progress: bool) -> Manifest:
    jobs = {split: _jobs(out / split, recs, 0, int(plan["shard_size"]), plan["max_side"], str(plan["source"]))
            for split, recs in blocks.items()}
    parts = {split: _done_parts(out / split) for split in blocks}
    todo = [job for split in blocks for job in jobs[split] if job[1] not in parts[split]]
    try:
        for part in _run_jobs(todo, workers, "sharding", progress, sum(plan["splits"].values())):
            parts[Path(part["folder"]).name][part["index"]] = part
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted: {sum(map(len, parts.values()))} of {sum(map(len, jobs.values()))} "
                                f"shards are written in {out}; run the same command again to write the rest") from None
    splits = {split: _list_split(out / split, [parts[split][j] for j in range(len(jobs[split]))],
                                 [label for _, label, _ in recs]) for split, recs in blocks.items()}
    import litdata

    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "empssl_version": __version__,
        "litdata_version": litdata.__version__,
        **{k: plan[k] for k in ("source", "max_side", "jpeg_quality", "seed", "shard_size", "classes",
                                "class_names", "fingerprint")},
        "item": {"image": "the image file's bytes (stored as they are, or re-encoded: JPEG)",
                 "label": "int: index into classes, -1 without classes", "name": "str: path relative to the source"},
        **_totals(splits),
        "splits": splits,
    }
    _write_json(out / MANIFEST, manifest)
    (out / PLAN).unlink(missing_ok=True)
    for split in blocks:
        shutil.rmtree(out / split / ".parts", ignore_errors=True)
    return verify_shards(out, hashes=False)


def _jobs(folder: Path, recs: list[_Rec], first: int, size: int, max_side: int | None, source: str) -> list[_Job]:
    """Shards ``first``, ``first + 1``, ... of ``folder``: ``recs`` cut into ``size`` images each."""
    return [(str(folder), first + j, recs[at: at + size], size, max_side, source)
            for j, at in enumerate(range(0, len(recs), size))]


def _run_jobs(jobs: list[_Job], workers: int | None, desc: str, progress: bool,
              total: int = 0) -> Iterator[dict[str, Any]]:
    """Write the shards of ``jobs`` (a process pool of ``workers``, default the usable cores, or this process),
    yielding each one's record as it is done, behind a bar of ``total`` images (default: the jobs'); a shard's error
    (raised again here) stops the others."""
    todo = sum(len(job[2]) for job in jobs)
    workers = max(1, min(workers or pool_workers(), len(jobs)))
    pool = mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers, ignore_sigint) \
        if workers > 1 else None
    try:
        with tqdm(total=total or todo, initial=(total or todo) - todo, desc=desc, unit="img", file=sys.stderr,
                  disable=not progress) as bar:
            for part in pool.imap_unordered(_write_shard, jobs) if pool else map(_write_shard, jobs):
                bar.update(part["shard"]["images"])
                yield part
    finally:
        if pool is not None:
            pool.terminate()


def _write_shard(job: _Job) -> dict[str, Any]:
    """Write shard ``j`` of a split with LitData's BinaryWriter and record it in ``.parts/j.json``: its record."""
    from litdata.streaming.writer import BinaryWriter

    folder, j, recs, size, max_side, source = job
    split = Path(folder)
    tmp = split / f".tmp-{j}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    stored, formats = 0, Counter[str]()
    try:
        writer = BinaryWriter(str(tmp), chunk_size=size, chunk_index=j)  # one chunk: recs fit
        for i, (name, label, data) in enumerate(recs):
            where = f"image {name} in {source}"
            image, fmt, kept = prepare_image(data if isinstance(data, bytes) else read_file(data, where), max_side,
                                             where)
            stored += kept
            formats[fmt] += 1
            writer.add_item(i, {"image": image, "label": label, "name": name})
        writer.done()
        index = json.loads(next(tmp.glob("*.index.json")).read_text())
        (chunk,) = index["chunks"]
        path = split / chunk["filename"]
        os.replace(tmp / chunk["filename"], path)
    except OSError as e:  # disk full, no permission: the shards written so far stay for the next run
        raise OutputError(f"cannot write shard {j} in {split}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # "shard": its manifest entry; "chunk", "config": what index.json lists; the rest is counted in the manifest
    part = {"folder": folder, "index": j, "stored": stored, "reencoded": len(recs) - stored, "formats": dict(formats),
            "chunk": chunk, "config": index["config"],
            "shard": {"name": path.name, "images": len(recs), "bytes": path.stat().st_size, "sha256": _sha256(path)}}
    write_json(split / ".parts" / f"{j}.json", part)
    return part


def _done_parts(folder: Path) -> dict[int, dict[str, Any]]:
    """The shards of ``folder`` an earlier run finished (recorded in .parts/ and present at their size); stale
    temporary folders of a killed run are removed."""
    for tmp in folder.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    done = {}
    for record in sorted((folder / ".parts").glob("*.json")):
        try:
            part = json.loads(record.read_text())
            if "shard" not in part:  # empssl 0.3's record of a shard (a run it left unfinished, resumed now)
                part["shard"] = {"name": part["chunk"]["filename"], **{k: part[k] for k in ("images", "bytes",
                                                                                            "sha256")}}
            chunk = folder / part["shard"]["name"]
            if chunk.is_file() and chunk.stat().st_size == part["shard"]["bytes"]:
                done[int(part["index"])] = part
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a torn or foreign record: the shard is written again
    return done


def prepare_image(data: bytes, max_side: int | None, name: str = "image") -> tuple[bytes, str, bool]:
    """The bytes a shard stores for one image file: ``(bytes, format, stored_as_is)``, ``format`` the file's as PIL
    names it. The file itself when its longer side fits ``max_side`` (or there is no limit); else decoded by
    :func:`empssl.data.decode_image`'s rules, resized (Lanczos) to a longer side of ``max_side`` and encoded as JPEG
    :data:`JPEG_QUALITY`. DataError (one line, naming ``name``) when the header cannot be read."""
    fmt, (w, h) = read_header(data, name)
    if max_side is None or max(w, h) <= max_side:
        return data, fmt, True
    rgb = Image.fromarray(decode_image(data, 0, name))
    scale = max_side / max(w, h)
    rgb = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), fmt, False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _list_split(folder: Path, parts: list[dict[str, Any]], labels: list[int],
                counted: list[dict[str, Any]] | None = None, name: str = LABELS) -> dict[str, Any]:
    """Write the split's LitData ``index.json`` listing the shards ``parts`` (what LitData's own merge of per-worker
    indexes writes, with ``updated_at`` derived from the shards' hashes so that the same shards give the same file),
    then its ``labels`` (int32, in item order) as ``folder/name``: the split's manifest entry, its counts summed
    over ``counted`` (default: ``parts``)."""
    config = parts[0]["config"]
    for p in parts[1:]:
        if {k: v for k, v in p["config"].items() if k != "types"} != {k: v for k, v in config.items() if k != "types"}:
            raise DataError(f"shard {p['index']} of {folder} was written with another LitData layout than shard 0 "
                            f"(another litdata version?); remove {folder} and run again")
    digest = hashlib.sha256("".join(p["shard"]["sha256"] for p in parts).encode()).hexdigest()[:16]
    _write_json(folder / "index.json", {"chunks": [p["chunk"] for p in parts], "config": config,
                                       "updated_at": digest})
    path = folder / name
    try:
        with open(path, "wb") as f:
            np.save(f, np.asarray(labels, dtype=np.int32), allow_pickle=False)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    counted = parts if counted is None else counted
    formats = sum((Counter(p["formats"]) for p in counted), Counter[str]())
    return {"images": len(labels), "stored": sum(p["stored"] for p in counted),
            "reencoded": sum(p["reencoded"] for p in counted), "formats": dict(sorted(formats.items())),
            "shards": [p["shard"] for p in parts],
            "labels": {"name": name, "images": len(labels), "bytes": path.stat().st_size, "sha256": _sha256(path)}}


def _totals(splits: dict[str, dict[str, Any]]) -> dict[str, int]:
    """The manifest's counts over all its ``splits``."""
    return {key: sum(s[key] for s in splits.values()) for key in ("images", "stored", "reencoded")}


def _write_json(path: Path, obj: Any) -> None:
    """:func:`write_json`, readable by others as the umask allows (a shard folder is often shared)."""
    write_json(path, obj)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# --- appending ----------------------------------------------------------------------------------------

APPEND_LOCK = ".append.lock"  # held (files.WriterLock) by the one append writing to a folder


def append_shards(spec: str, out: str | Path, max_side: int | None = None, workers: int | None = None,
                  shard_size: int | None = None, data_dir: str = "./data", progress: bool = True,
                  seed: int | None = None) -> Manifest:
    """Add every image of ``spec`` (a folder or class tree; a split root may hold ``train/`` only) to the train
    split of the complete shard folder ``out``, as new shards after its last one (``empssl shard SRC --out DIR
    --append``; the rules, the order of writes and what a reader may rely on: docs/DATA.md, "Appending").

    Classes are mapped by name onto the folder's; ``max_side``, ``shard_size`` and ``seed`` are the folder's (giving
    others is an error). DataError (one line) for what it refuses; a failed or killed append leaves the folder as
    readers saw it before.
    """
    out = Path(out).expanduser()
    if not (out / MANIFEST).is_file():
        raise DataError(f"--append: {out} holds no {MANIFEST} (no complete shard folder); write it first: empssl "
                        f"shard SRC --out {out}")
    source = source_name(spec, data_dir)
    with WriterLock(out / APPEND_LOCK, lambda holder: f"--append: {holder} is appending to {out}; wait for it to "
                                                      f"finish", lambda note: print(note, file=sys.stderr)):
        manifest = verify_shards(out, hashes=False)
        for given, have, flag in ((max_side, manifest.max_side, "--max-side"),
                                  (shard_size, manifest.shard_size, "--shard-size"),
                                  (seed, manifest.data.get("seed", 0), "--seed")):
            if given is not None and given != have:
                raise DataError(f"--append: {out} was written with {flag} {_shown(have)}; appended shards keep it "
                                f"(leave {flag} out)")
        if NO_SPLIT not in manifest.splits:
            raise DataError(f"--append adds to the {NO_SPLIT} split, which {out} does not have")
        catalog = scan(spec, data_dir)
        held = [name for name, count in catalog.splits if name not in ("", NO_SPLIT) and count]
        if held:
            raise DataError(f"--append adds training images; {source} has a {held[0]} split too: append its "
                            f"{NO_SPLIT} folder only")
        labels = _appended_labels(catalog.classes, manifest, source)
        fingerprint = _fingerprint(catalog.records)
        if any(a.get("source") == source and a.get("fingerprint") == fingerprint
               for a in [manifest.data, *manifest.data.get("appends", [])]):
            print(f"{out} already holds the images of {source} (appended before); nothing to do", file=sys.stderr)
            return manifest
        folder, first = out / NO_SPLIT, len(manifest.splits[NO_SPLIT].shards)
        _remove_unlisted(folder, manifest)
        recs = _in_order(catalog.records, manifest.data.get("seed", 0), labels)
        jobs = _jobs(folder, recs, first, manifest.shard_size, manifest.max_side, source)
        try:
            parts = sorted(_run_jobs(jobs, workers, "appending", progress), key=lambda p: p["index"])
            return _publish_append(out, manifest, parts, [label for _, label, _ in recs],
                                   {"source": source, "fingerprint": fingerprint, "images": len(recs),
                                    "first_shard": first, "shards": len(parts), "empssl_version": __version__})
        except BaseException:
            with contextlib.suppress(DataError):  # the manifest read again: if replaced, the new shards stay listed
                _remove_unlisted(folder, verify_shards(out, hashes=False))
            raise


def _appended_labels(classes: list[str] | None, manifest: Manifest, source: str) -> dict[int, int]:
    """The appended source's label -> the folder's label, mapping classes by name (empty: neither has classes)."""
    if classes is None or manifest.classes is None:
        if classes is None and manifest.classes is None:
            return {}
        has = "has no classes" if classes is None else f"has classes ({', '.join(classes[:3])} ...)"
        where = "has classes" if manifest.classes else "has none"
        raise DataError(f"--append: {source} {has}, but the shard folder {where}; their labels would not mean the "
                        f"same")
    unknown = [c for c in classes if c not in manifest.classes]
    if unknown:
        raise DataError(f"--append: {source} has classes the shard folder has not ({', '.join(unknown[:5])}"
                        f"{' ...' if len(unknown) > 5 else ''}); appended images must be of its "
                        f"{len(manifest.classes)} classes")
    return {i: manifest.classes.index(c) for i, c in enumerate(classes)}


def _remove_unlisted(folder: Path, manifest: Manifest) -> None:
    """Remove what a failed or killed append left in ``folder`` (the train split's): shard files ``manifest`` does
    not list, temporary folders and shard records, and labels files but its own and the previous manifest's (kept
    for a reader that read that one, docs/DATA.md)."""
    split, appends = manifest.splits[NO_SPLIT], manifest.data.get("appends", [])
    listed = {f.name for f in split.shards} | {split.labels.name}
    if appends:  # the previous manifest's labels
        listed.add(_labels_name(len(appends) - 1, split.images - appends[-1]["images"]))
    for path in [*folder.glob("chunk-*.bin"), *folder.glob("labels*.npy")]:
        if path.name not in listed:
            path.unlink(missing_ok=True)
    for tmp in folder.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(folder / ".parts", ignore_errors=True)


def _publish_append(out: Path, manifest: Manifest, parts: list[dict[str, Any]], labels: list[int],
                    record: dict[str, Any]) -> Manifest:
    """List the appended shards ``parts`` (written and hashed): index.json, labels, then the manifest."""
    folder, data = out / NO_SPLIT, json.loads(json.dumps(manifest.data))  # a copy
    index, train = json.loads((folder / "index.json").read_text()), data["splits"][NO_SPLIT]
    # the shards listed before; index.json may list more, of an append that failed before its manifest
    old = [{"chunk": c, "config": index["config"], "shard": f} for c, f in zip(index["chunks"], train["shards"])]
    name = _labels_name(len(data.get("appends", [])) + 1, train["images"] + len(labels))
    data["splits"][NO_SPLIT] = _list_split(folder, old + parts, [*manifest.labels(NO_SPLIT).tolist(), *labels],
                                           [train, *parts], name)
    data.update(_totals(data["splits"]), appends=[*data.get("appends", []), record])
    _write_json(out / MANIFEST, data)
    published = verify_shards(out, hashes=False)
    _remove_unlisted(folder, published)
    return published


def _labels_name(appends: int, images: int) -> str:
    """The train split's labels file after ``appends`` appends, when it holds ``images`` images."""
    return f"labels-{images}.npy" if appends else LABELS


# --- checking ------------------------------------------------------------------------------------------


@dataclass
class ShardFolder:
    """Where :func:`verify_shards` reads a shard folder's files: a local folder ``root``
    (:class:`empssl.remote.RemoteFolder`: a bucket's, its small files mirrored in ``root``)."""

    root: Path
    known: KnownHashes | None = None  # sha256s computed before (set by verify_shards)
    url = ""

    def fetch(self, name: str) -> None:
        """Bring ``root/name`` (a plain name's path, checked before) up to date: nothing to do here."""

    def check_shard(self, split: str, f: ShardFile, hashes: bool) -> None:
        """DataError (one line) unless shard ``f`` of ``split`` is there at its size (and ``hashes``: its sha256)."""
        verify_file(self.root / split, f, hashes, self.known)


HASHES = "shard-sha256.json"  # under --data-dir: the shards' sha256s, by path and file stamp (KnownHashes)


class KnownHashes:
    """The sha256s of the files :func:`verify_shards` hashed before, in ``data_dir/shard-sha256.json``, each with
    the (size, mtime_ns, inode) the file had then: a file with the same stamp is not read again (the hole this
    leaves: docs/DATA.md). A damaged record is ignored (one note) and written anew."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir).expanduser() / HASHES
        self.files: dict[str, list[Any]] = {}
        self.changed = False
        if self.path.exists():
            try:
                self.files = dict(read_json(self.path)["files"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                print(f"note: ignoring {self.path} ({type(e).__name__}); the shards are hashed again",
                      file=sys.stderr)

    def sha256(self, path: Path) -> str:
        """The sha256 of the file ``path``: the one recorded, when its stamp is unchanged, else read."""
        st = path.stat()
        key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns, st.st_ino]
        known = self.files.get(key)
        if not (isinstance(known, list) and len(known) == 4 and known[:3] == stamp):
            known = self.files[key] = [*stamp, _sha256(path)]
            self.changed = True
        return str(known[3])

    def save(self) -> None:
        """Write the record when a file was hashed, for the files still there; if it cannot be, a note."""
        try:
            if self.changed:
                write_json(self.path, {"files": {k: v for k, v in self.files.items() if os.path.exists(k)}})
        except OutputError as e:
            print(f"note: {e}; the shards will be hashed again at the next start", file=sys.stderr)


def verify_shards(root: str | Path | ShardFolder, hashes: bool = True, data_dir: str | Path | None = None,
                  image_key: str = "", label_key: str = "") -> Manifest:
    """Check a shard folder against its ``manifest.json`` and return it; every reader of shard folders goes through
    it, a folder in an object store too (``root`` an :class:`empssl.remote.RemoteFolder`).

    Checks that every name in the manifest and each split's ``index.json`` is a plain file name
    (:func:`plain_name`), each index.json lists the manifest's shards and reads its items with safe serializers only
    (:func:`check_data_format`), every shard and labels file is there at its size and (``hashes``) sha256 (with
    ``data_dir``: recorded there, :class:`KnownHashes`), and the counts add up; DataError (one line) for the first
    problem. A local LitData folder without a manifest is read by :func:`foreign_manifest` (``image_key``,
    ``label_key``: its fields, found when not given).
    """
    folder = root if isinstance(root, ShardFolder) else ShardFolder(Path(root).expanduser())
    root = folder.root
    if not folder.url and not root.is_dir():
        raise DataError(f"shards not found: {root} is not a folder (make them with: empssl shard SRC --out {root})")
    folder.fetch(MANIFEST)
    path = root / MANIFEST
    if not path.is_file():
        if (root / PLAN).is_file():
            raise DataError(f"{root} holds an unfinished shard run (no {MANIFEST} yet); run the same empssl shard "
                            f"command again to finish it")
        if not folder.url and is_litdata_folder(root):
            return foreign_manifest(root, data_dir, image_key, label_key)
        raise DataError(f"no {MANIFEST} in {root}: not a folder of empssl shards (make them with: empssl shard SRC "
                        f"--out {root})")
    try:
        data = read_json(path)
        if data.get("format") != FORMAT:
            raise DataError(f"{path} is not an empssl shard manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{path} has shard format version {data.get('format_version')}; this empssl reads "
                            f"version {FORMAT_VERSION} (shard the source again)")
        splits = {plain_name(name, path): SplitShards(int(s["images"]), int(s["stored"]), int(s["reencoded"]),
                                                      dict(s["formats"]), [_shard_file(f, path) for f in s["shards"]],
                                                      _shard_file(s["labels"], path))
                  for name, s in data["splits"].items()}
        manifest = Manifest(root, str(data["source"]), data["classes"], data["class_names"], data["max_side"],
                            int(data["shard_size"]), splits, data, folder.url)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is damaged or not a shard manifest ({type(e).__name__}: {e}); shard the source "
                        f"again") from None
    folder.known = KnownHashes(data_dir) if hashes and data_dir is not None and not folder.url else None
    try:
        for name, split in manifest.splits.items():
            _verify_split(folder, name, split, hashes)
    finally:
        if folder.known is not None:
            folder.known.save()
    if sum(s.images for s in splits.values()) != data.get("images"):
        raise DataError(f"{path} counts {data.get('images')} images but its splits hold "
                        f"{sum(s.images for s in splits.values())}")
    return manifest


def _shard_file(f: dict[str, Any], where: Path) -> ShardFile:
    return ShardFile(plain_name(f["name"], where), int(f["images"]), int(f["bytes"]), str(f["sha256"]))


def plain_name(name: Any, where: Path | str) -> str:
    """``name``, read from ``where`` (a manifest or index.json), if it is a plain file name, else DataError (one
    line): a path could name any file on the machine, and a re-signed manifest would vouch for it."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise DataError(f"{where} names {name!r}, which is not a plain file name in its folder; refusing to read "
                        f"the shard folder")
    return name


# The LitData serializers (litdata.streaming.serializers._SERIALIZERS) that build only bytes, strings, numbers,
# arrays and images from a chunk's bytes (numpy refuses to build object arrays from bytes). The others build Python
# objects: "pickle" (and "graph", its fallback) runs whatever code a chunk holds, "json" nested containers, and
# video, audio, pdf, mesh, nifti and tiff hand the bytes to other libraries' parsers.
SAFE_SERIALIZERS = frozenset({"bytes", "file", "str", "text", "int", "float", "bool", "jpeg", "jpeg_array", "pil",
                              "image", "numpy", "no_header_numpy", "tensor", "no_header_tensor"})


def check_data_format(data_format: list[str], where: str) -> list[str]:
    """The serializer of each field of a LitData index's ``data_format``, resolved as LitData's reader resolves it
    ("int:pickle" is read by pickle); DataError (one line) unless each is one of :data:`SAFE_SERIALIZERS`."""
    from litdata.streaming.item_loader import PyTreeLoader
    from litdata.streaming.serializers import _get_serializers

    loader = PyTreeLoader()
    loader._serializers = _get_serializers(None)
    keys = [loader._data_format_to_key(fmt) for fmt in data_format]
    for i, (fmt, key) in enumerate(zip(data_format, keys, strict=True)):
        if key not in SAFE_SERIALIZERS:
            raise DataError(f"{where}: field {i} of its items ({fmt!r}) is read by LitData's {key!r} serializer, "
                            f"which builds Python objects (pickle runs any code a chunk holds); empssl reads only "
                            f"{', '.join(sorted(SAFE_SERIALIZERS))}")
    return keys


class _Refused:
    """LitData's serializer ``key`` outside :data:`SAFE_SERIALIZERS`: reading through it is an error, in case
    :func:`check_data_format` missed it; ``skip``: a field not wanted (the images, where only labels are read)."""

    def __init__(self, key: str, skip: bool = False) -> None:
        self.key, self.skip = key, skip

    def setup(self, data_format: Any) -> None:
        pass

    def deserialize(self, data: bytes) -> Any:
        if self.skip:
            return None
        raise DataError(f"LitData's {self.key!r} serializer builds Python objects; empssl does not read it")


def reader_serializers() -> dict[str, Any]:
    """``serializers=`` for ``litdata.StreamingDataset``: each outside :data:`SAFE_SERIALIZERS` refused (LitData
    adds its own for any name not given, so leaving them out is not enough)."""
    from litdata.streaming.serializers import _get_serializers

    return {key: _Refused(key) for key in _get_serializers(None) if key not in SAFE_SERIALIZERS}


ITEM_KEYS = ("image", "label", "name")  # what every item of an empssl shard folder holds (write_shards)


def read_index(path: Path, shown: Any, where: str) -> tuple[list[ShardFile], dict[str, str]]:
    """(its chunks, without sha256; its items' fields: name -> serializer) of the LitData index.json ``path``
    (``shown`` in messages; ``where`` names its split), names and serializers checked. DataError (one line) for one
    that is missing, damaged, or whose items are not flat dicts of named fields."""
    try:
        index = read_json(path)
        chunks = [ShardFile(plain_name(c["filename"], shown), int(c["chunk_size"]), int(c["chunk_bytes"]), "")
                  for c in index["chunks"]]
        serializers = check_data_format(index["config"]["data_format"], where)
        spec = json.loads(index["config"]["data_spec"])[1]
        keys = json.loads(spec["context"]) if spec["type"] == "builtins.dict" else None
        leaves = all(not child["children_spec"] for child in spec["children_spec"])
    except FileNotFoundError:
        raise DataError(f"missing {shown}") from None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise DataError(f"{shown} is damaged ({type(e).__name__})") from None
    if (index["config"].get("item_loader", "PyTreeLoader") != "PyTreeLoader" or not isinstance(keys, list)
            or not all(isinstance(k, str) for k in keys) or len(keys) != len(serializers) or not leaves):
        raise DataError(f"{shown}: its items are not dicts of named fields ({index['config'].get('item_loader')}, "
                        f"{spec.get('type')}); empssl reads items such as {{\"image\": ..., \"label\": int}}")
    return chunks, dict(zip(keys, serializers, strict=True))


def _verify_split(source: ShardFolder, name: str, split: SplitShards, hashes: bool) -> None:
    folder = source.root / name
    index_path = folder / "index.json"
    shown = f"{source.url}/{name}/index.json" if source.url else index_path  # how messages name it
    source.fetch(f"{name}/index.json")
    chunks, fields = read_index(index_path, shown, f"split {name} of {source.url or folder.parent}")
    if not set(ITEM_KEYS) <= set(fields):
        raise DataError(f"{shown}: its items hold {list(fields)}, not {', '.join(ITEM_KEYS)} (a LitData folder that "
                        f"empssl shard did not write); shard the images with empssl shard")
    # an append replaces index.json before the manifest: the index may list more shards (readers take the manifest's)
    if [(f.name, f.images) for f in chunks[:len(split.shards)]] != [(f.name, f.images) for f in split.shards]:
        raise DataError(f"{shown} does not list the shards that {MANIFEST} lists for {name}")
    if sum(f.images for f in split.shards) != split.images or split.stored + split.reencoded != split.images:
        raise DataError(f"{MANIFEST} counts {split.images} images in {name}, but its shards hold "
                        f"{sum(f.images for f in split.shards)} ({split.stored} stored + {split.reencoded} "
                        f"re-encoded)")
    if split.labels.images != split.images:
        raise DataError(f"{MANIFEST} counts {split.images} images in {name}, but {split.labels.images} labels")
    for f in split.shards:
        source.check_shard(name, f, hashes)
    source.fetch(f"{name}/{split.labels.name}")
    verify_file(folder, split.labels, hashes, source.known)


def check_size(path: str, size: int | None, f: ShardFile, listed_in: str | Path = MANIFEST) -> None:
    """DataError (one line) unless the file ``path`` of shard ``f`` is there (``size`` not None) at its size."""
    if size is None:
        raise DataError(f"missing shard {path} (listed in {listed_in})")
    if size != f.bytes:
        raise DataError(f"shard {path} is {size:,} bytes, {listed_in} says {f.bytes:,} (truncated or changed)")


def verify_file(folder: Path, f: ShardFile, hashes: bool = True, known: KnownHashes | None = None,
                listed_in: str | Path = MANIFEST) -> None:
    """DataError (one line) unless ``folder/f.name`` is there at its size and (``hashes``) sha256 (``known``: the
    one recorded for an unchanged file)."""
    path = folder / f.name
    check_size(str(path), path.stat().st_size if path.is_file() else None, f, listed_in)
    if hashes and (known.sha256(path) if known else _sha256(path)) != f.sha256:
        raise DataError(f"shard {path} does not match its sha256 in {MANIFEST} (changed or corrupt)")


# --- LitData folders that empssl did not write ----------------------------------------------------------------

IMAGE_SERIALIZERS = ("jpeg", "pil", "image", "jpeg_array")  # what LitData writes PIL images and JPEG files with
PIXEL_SERIALIZERS = ("bytes", "numpy", "no_header_numpy", "tensor", "no_header_tensor")  # encoded bytes or pixels
LABEL_SERIALIZERS = ("int", "numpy", "no_header_numpy", "tensor", "no_header_tensor")  # a given --label-key's
LABELS_CACHE = "litdata-labels"  # under --data-dir: a foreign folder's labels, read once (foreign_manifest)


def is_litdata_folder(root: str | Path) -> bool:
    """True when ``root`` holds a LitData folder that empssl shard did not write (:func:`foreign_manifest`)."""
    root = Path(root).expanduser()
    if (root / MANIFEST).exists() or (root / PLAN).exists() or (root / NO_SPLIT / LABELS).exists():
        return False  # empssl's, or one of its folders without its manifest: refused, not read without its sha256s
    return any((root / p).is_file() for p in ("index.json", f"{NO_SPLIT}/index.json"))


def foreign_manifest(root: Path, data_dir: str | Path | None = None, image_key: str = "",
                     label_key: str = "") -> Manifest:
    """The :class:`Manifest` of a LitData folder that empssl did not write: ``root/index.json`` (one split,
    ``train``), or ``root/<split>/index.json`` for ``train`` and ``val`` and/or ``test``.

    Its shards are the index's chunks (checked by size only: there is no sha256), its fields those :func:`item_keys`
    finds, its labels read once (:func:`_foreign_labels`), its classes "0" .. "K-1" for labels 0 .. K-1 (None
    without a label field).
    """
    flat = (root / "index.json").is_file()
    names = [NO_SPLIT] if flat else [s for s in ("train", "val", "test") if (root / s / "index.json").is_file()]
    splits, labels, keys = {}, {}, None
    for name in names:
        folder = root if flat else root / name
        index = folder / "index.json"
        chunks, fields = read_index(index, index, f"split {name} of {root}")
        if not chunks:  # (LitData's reader fails on it with an assertion)
            raise DataError(f"{index} lists no chunks: the {name} split holds no items")
        found = item_keys(fields, image_key, label_key, index)
        if keys is not None and found != keys:
            raise DataError(f"{index}: its items' fields ({found}) are not the train split's ({keys})")
        keys = found
        for f in chunks:
            verify_file(folder, f, hashes=False, listed_in=index)
        count = sum(f.images for f in chunks)
        labels[name] = _foreign_labels(folder, chunks, keys.label, fields.get(keys.label or ""), data_dir)
        splits[name] = SplitShards(count, count, 0, {}, chunks, ShardFile(LABELS, count, 0, ""))
    assert keys is not None  # verify_shards calls this where is_litdata_folder found an index.json
    classes = None if keys.label is None else [str(c) for c in range(max(int(v.max(initial=-1)) for v in
                                                                         labels.values()) + 1)]
    total = sum(s.images for s in splits.values())
    data = {"format": "litdata", "layout": "flat" if flat else "splits", "source": str(root), "images": total,
            "stored": total, "reencoded": 0, "keys": [keys.image, keys.label, keys.name]}
    return Manifest(root, str(root), classes, None, None, max(f.images for s in splits.values() for f in s.shards),
                    splits, data, keys=keys, label_arrays=labels)


def item_keys(fields: dict[str, str], image_key: str, label_key: str, where: Path) -> ItemKeys:
    """Which of ``fields`` (name -> LitData serializer) hold the image, label and name: ``image_key`` /
    ``label_key`` where given; else the field named "image" ("label") if it has an image's (an int's) serializer,
    else the one field with such a serializer (for images: a PIL or JPEG one first, then bytes or an array).
    DataError (one line naming the fields) when that is not one field."""
    shown = ", ".join(f"{k} ({s})" for k, s in fields.items())

    def pick(what: str, given: str, kinds: tuple[tuple[str, ...], ...]) -> str | None:
        flag = f"--{what}-key"
        if given:
            if fields.get(given) not in sum(kinds, ()):
                raise DataError(f"{where}: {flag} {given}: its items have no {what} field of that name; they hold "
                                f"{shown}")
            return given
        if fields.get(what) in sum(kinds, ()):
            return what
        for kind in kinds:
            hits = [k for k, s in fields.items() if s in kind]
            if len(hits) > 1:
                raise DataError(f"{where}: which field holds the {what}? its items hold {shown}; name it with {flag}")
            if hits:
                return hits[0]
        return None

    image = pick("image", image_key, (IMAGE_SERIALIZERS, PIXEL_SERIALIZERS))
    if image is None:
        raise DataError(f"{where}: no field of its items holds an image ({shown}); name it with --image-key")
    label = pick("label", label_key, (LABEL_SERIALIZERS,) if label_key else (("int",),))
    return ItemKeys(image, label, "name" if fields.get("name") == "str" and "name" not in (image, label) else None)


def read_item(item: dict[str, Any], keys: ItemKeys, index: int) -> tuple[bytes | Image.Image | np.ndarray, int, str]:
    """One LitData item as (image, label, name) for :func:`empssl.data.decode_image`: the image as encoded bytes, a
    PIL image or an (H, W, C) array (a tensor's (C, H, W) transposed); the label -1 without a label field; the
    name field, else ``f"item {index}"``."""
    image = item[keys.image]
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = bytes(image)
    elif not isinstance(image, Image.Image):
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = image.transpose(1, 2, 0)  # torchvision's (C, H, W)
    name = str(item[keys.name]) if keys.name is not None else f"item {index}"
    return image, -1 if keys.label is None else int(item[keys.label]), name


def _foreign_labels(folder: Path, chunks: list[ShardFile], label: str | None, serializer: str | None,
                    data_dir: str | Path | None) -> np.ndarray:
    """(N,) int32 labels of the split in ``folder`` (-1 without a ``label`` field): one pass over its items that
    decodes only that field, cached in ``data_dir/litdata-labels/`` by its index.json and its chunks' names, sizes
    and mtimes. DataError for a label < 0."""
    count = sum(f.images for f in chunks)
    if label is None:
        return np.full(count, -1, dtype=np.int32)
    stamps = [[f.name, (folder / f.name).stat().st_size, (folder / f.name).stat().st_mtime_ns] for f in chunks]
    key = hashlib.sha256((folder / "index.json").read_bytes() + json.dumps([label, stamps]).encode()).hexdigest()
    cached = Path(data_dir).expanduser() / LABELS_CACHE / f"{key[:32]}.npy" if data_dir is not None else None
    if cached is not None and cached.is_file():
        with contextlib.suppress(OSError, ValueError):  # else read again, and written anew
            labels = np.load(cached, allow_pickle=False)
            if labels.dtype == np.int32 and labels.shape == (count,):
                return labels
    from litdata import StreamingDataset

    skipped = {k: _Refused(k, skip=True) for k in SAFE_SERIALIZERS if k != serializer}  # no image is decoded
    ds = StreamingDataset(str(folder), serializers={**reader_serializers(), **skipped})
    labels = np.fromiter((int(ds[i][label]) for i in range(count)), dtype=np.int32, count=count)
    if count and labels.min() < 0:
        raise DataError(f"{folder}: item {int(np.argmin(labels))} has label {labels.min()} in field {label!r}; "
                        f"labels must be class indices 0, 1, ...")
    if cached is not None:
        buf = io.BytesIO()
        np.save(buf, labels, allow_pickle=False)
        write_atomic(cached, lambda tmp: tmp.write_bytes(buf.getvalue()))
    return labels
