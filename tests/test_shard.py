"""empssl shard: LitData shards of a source's encoded images, their manifest, resume, verify_shards, bad input."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from empssl import shard
from empssl.cli import main
from empssl.data import DataError, scan
from empssl.files import OutputError
from empssl.shard import verify_shards, write_shards

from .conftest import lock_held_elsewhere

litdata = pytest.importorskip("litdata")


def _image(path: Path, size: tuple[int, int], seed: int, fmt: str) -> None:
    """A smooth random picture (JPEG-friendly like a photo, unlike pixel noise)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    small = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8))
    small.resize(size, Image.Resampling.BILINEAR).save(path, format=fmt, **({"quality": 80} if fmt == "JPEG" else {}))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A split root: train/ (3 classes, 4 images each) and test/ (2 each); JPEGs 32x24 and 16x16, a few PNGs."""
    root = tmp_path / "src"
    seed = 0
    for split, n in (("train", 4), ("test", 2)):
        for c in ("ant", "bee", "cat"):
            for i in range(n):
                seed += 1
                fmt = "PNG" if i == 1 else "JPEG"
                size = (32, 24) if i % 2 == 0 else (16, 16)
                _image(root / split / c / f"{i}.{'png' if fmt == 'PNG' else 'jpg'}", size, seed, fmt)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_split(folder: Path) -> list[dict]:
    ds = litdata.StreamingDataset(str(folder))
    return [ds[i] for i in range(len(ds))]


def test_round_trip_through_streaming_dataset(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    m = write_shards(str(tree), out, workers=1, shard_size=5, progress=False)
    catalog = scan(str(tree))
    assert list(m.splits) == ["train", "test"] and m.classes == ["ant", "bee", "cat"]
    assert [len(s.shards) for s in m.splits.values()] == [3, 2]  # 12 = 5+5+2, 6 = 5+1
    _check_against_scan(str(tree), out, tmp_path)
    written = [item["name"] for item in _read_split(out / "train")]
    assert written != [r.name for r in catalog.records[:12]] and m.data["seed"] == 0  # not in class order
    assert m.data["stored"] == 18 and m.data["reencoded"] == 0
    assert m.splits["train"].formats == {"JPEG": 9, "PNG": 3}
    assert not (out / shard.PLAN).exists() and not list(out.rglob(".parts"))


def test_folder_without_classes_is_one_split_with_label_minus_one(tmp_path: Path) -> None:
    for i in range(3):
        _image(tmp_path / "photos" / f"{i}.jpg", (20, 10), i, "JPEG")
    m = write_shards(str(tmp_path / "photos"), tmp_path / "out", workers=1, progress=False)
    assert list(m.splits) == [shard.NO_SPLIT] and m.classes is None
    items = _read_split(tmp_path / "out" / shard.NO_SPLIT)
    assert sorted((i["name"], i["label"]) for i in items) == [("0.jpg", -1), ("1.jpg", -1), ("2.jpg", -1)]
    assert m.labels(shard.NO_SPLIT).tolist() == [-1, -1, -1]


def test_max_side_keeps_fitting_jpegs_byte_for_byte_and_reencodes_the_rest(tree: Path, tmp_path: Path) -> None:
    m = write_shards(str(tree), tmp_path / "out", max_side=20, workers=1, shard_size=4, progress=False)
    records = {r.name: r for r in scan(str(tree)).records}
    items = _read_split(tmp_path / "out" / "train") + _read_split(tmp_path / "out" / "test")
    kept = reencoded = 0
    for item in items:
        data, source = bytes(item["image"]), records[item["name"]].read()
        with Image.open(io.BytesIO(source)) as img:
            w, h = img.size
        if max(w, h) <= 20:  # the 16x16 JPEGs and PNGs: the file itself
            assert data == source
            kept += 1
        else:  # 32x24 -> 20x15, one JPEG q90
            with Image.open(io.BytesIO(data)) as img:
                assert img.format == "JPEG" and img.size == (20, 15)
                back = np.asarray(img.convert("RGB"), dtype=np.float64)
            with Image.open(io.BytesIO(source)) as img:
                want = np.asarray(img.convert("RGB").resize((20, 15), Image.Resampling.LANCZOS), dtype=np.float64)
            assert np.abs(back - want).mean() < 8  # the same picture through one q90 encoding (4:2:0, 20x15 px)
            reencoded += 1
    assert (kept, reencoded) == (m.data["stored"], m.data["reencoded"]) == (9, 9)
    assert m.max_side == 20 and m.data["jpeg_quality"] == 90


def test_the_seed_orders_each_split_and_is_kept_by_a_resumed_run(tree: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shard", str(tree), "--out", str(tmp_path / "s3"), "--seed", "3", "--no-progress"]) == 0
    _check_against_scan(str(tree), tmp_path / "s3", tmp_path, seed=3)
    assert not (shard.write_order(12, 3) == shard.write_order(12, 0)).all()
    _fails(["shard", str(tree), "--out", str(tmp_path / "s3"), "--seed", "5"], capsys, "written with --seed 3, not 5")
    _fails(["shard", str(tree), "--out", str(tmp_path / "neg"), "--seed", "-1"], capsys, "--seed must be >= 0")


def test_parallel_run_writes_the_same_files_as_a_serial_run(tree: Path, tmp_path: Path) -> None:
    write_shards(str(tree), tmp_path / "serial", workers=1, shard_size=2, progress=False)
    write_shards(str(tree), tmp_path / "parallel", workers=2, shard_size=2, progress=False)
    serial, parallel = _files(tmp_path / "serial"), _files(tmp_path / "parallel")
    assert len(serial) == 6 + 3 + 2 + 2 + 1 and serial == parallel  # 6 + 3 shards, 2 index.json, 2 labels.npy


@pytest.mark.parametrize("records_of_0_3", [False, True])
def test_resume_after_an_interruption_gives_the_uninterrupted_files(tree: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     records_of_0_3: bool) -> None:
    write_shards(str(tree), tmp_path / "clean", workers=1, shard_size=2, progress=False)
    real, calls = shard.prepare_image, [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 8:  # in shard 3 of train: shards 0-2 are written, 3 half
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(shard, "prepare_image", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt, match="3 of 9 shards"):
        write_shards(str(tree), out, workers=1, shard_size=2, progress=False)
    with pytest.raises(DataError, match="unfinished shard run"):
        verify_shards(out)
    if records_of_0_3:  # an unfinished run of empssl 0.3.0, whose records held the shard's fields at the top
        for record in (out / "train" / ".parts").glob("*.json"):
            part = json.loads(record.read_text())
            entry = part.pop("shard")
            record.write_text(json.dumps({**part, **{k: entry[k] for k in ("images", "bytes", "sha256")}}))
    monkeypatch.setattr(shard, "prepare_image", real)
    calls[0] = 0
    rerun, counted = shard.prepare_image, []
    monkeypatch.setattr(shard, "prepare_image", lambda *a, **k: counted.append(1) or rerun(*a, **k))
    write_shards(str(tree), out, workers=1, progress=False)  # the plan's shard size is kept
    assert len(counted) == 18 - 6  # the three finished shards are not written again
    assert _files(out) == _files(tmp_path / "clean")
    verify_shards(out)


_KILLER = """
import os, signal, sys
from empssl import shard
real, n = shard.prepare_image, [0]
def prepare(*a, **k):
    n[0] += 1
    if n[0] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
shard.prepare_image = prepare
shard.write_shards(sys.argv[1], sys.argv[2], workers=1, shard_size=3, progress=False)
"""


@pytest.mark.slow  # two subprocesses that import torch: about 20 s on the loaded 2-core machine
def test_a_killed_run_is_not_taken_for_complete_and_the_next_run_finishes_it(tree: Path, tmp_path: Path) -> None:
    write_shards(str(tree), tmp_path / "clean", workers=1, shard_size=3, progress=False)
    out = tmp_path / "out"
    for kill_at in (5, 14):  # in train's second shard; then, resumed, in test's first
        proc = subprocess.run([sys.executable, "-c", _KILLER, str(tree), str(out), str(kill_at)],
                              env={**os.environ, "PYTHONPATH": str(Path(shard.__file__).parents[1])})
        assert proc.returncode == -9
        assert list(out.glob("*/.tmp-*")) and not (out / "manifest.json").exists()
        with pytest.raises(DataError, match="unfinished"):
            verify_shards(out)
    assert main(["shard", str(tree), "--out", str(out), "--no-progress"]) == 0
    assert _files(out) == _files(tmp_path / "clean")
    assert main(["shard", str(tree), "--out", str(out), "--no-progress"]) == 0  # complete: nothing to do


def test_verify_shards_finds_tampering(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_shards(str(tree), out, workers=1, shard_size=4, progress=False)
    assert verify_shards(out).splits["train"].images == 12
    chunk = out / "train" / "chunk-0-1.bin"
    good = chunk.read_bytes()
    chunk.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(DataError, match="does not match its sha256"):
        verify_shards(out)
    verify_shards(out, hashes=False)  # same size: only the hash tells
    chunk.write_bytes(good[:-10])
    with pytest.raises(DataError, match="truncated"):
        verify_shards(out)
    chunk.unlink()
    with pytest.raises(DataError, match="missing shard"):
        verify_shards(out)
    chunk.write_bytes(good)
    labels = out / "test" / shard.LABELS
    saved = labels.read_bytes()
    np.save(labels, np.array([2, 1, 0, 0, 1, 2], dtype=np.int32))  # the same size, other labels
    with pytest.raises(DataError, match="labels.npy does not match its sha256"):
        verify_shards(out)
    labels.write_bytes(saved)
    verify_shards(out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["test"]["images"] = 7
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="counts 7 images in test"):
        verify_shards(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="damaged"):
        verify_shards(out)
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="not a folder of empssl shards"):
        verify_shards(out)


def test_a_shard_hashed_before_is_not_read_again_until_its_stamp_changes(tree: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out, data_dir = tmp_path / "out", tmp_path / "data"
    write_shards(str(tree), out, workers=1, shard_size=4, progress=False)
    real, hashed = shard._sha256, []
    monkeypatch.setattr(shard, "_sha256", lambda path: hashed.append(path.name) or real(path))
    verify_shards(out, data_dir=data_dir)
    assert len(hashed) == 3 + 2 + 2  # every shard and labels.npy, once
    recorded = json.loads((data_dir / shard.HASHES).read_text())["files"]
    assert str((out / "train" / "chunk-0-1.bin").resolve()) in recorded
    hashed.clear()
    verify_shards(out, data_dir=data_dir)
    assert hashed == []  # unchanged: nothing read
    chunk = out / "train" / "chunk-0-1.bin"
    good, stamp = chunk.read_bytes(), chunk.stat()
    os.utime(chunk, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))  # touched, same bytes: hashed again, passes
    verify_shards(out, data_dir=data_dir)
    assert hashed == ["chunk-0-1.bin"]
    chunk.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # changed at its size: a new mtime, so hashed again
    with pytest.raises(DataError, match="does not match its sha256"):
        verify_shards(out, data_dir=data_dir)
    # the hole (docs/DATA.md): a change that keeps size, mtime and inode is not read again
    os.utime(chunk, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    chunk.write_bytes(good)
    os.utime(chunk, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    verify_shards(out, data_dir=data_dir)
    chunk.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    os.utime(chunk, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    verify_shards(out, data_dir=data_dir)
    with pytest.raises(DataError, match="does not match its sha256"):
        verify_shards(out)  # without the record, it is read
    chunk.write_bytes(good)
    (data_dir / shard.HASHES).write_text("{damaged")  # ignored in one note, then written anew
    capsys.readouterr()
    hashed.clear()
    verify_shards(out, data_dir=data_dir)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"note: ignoring {data_dir / shard.HASHES} (JSONDecodeError)" in err
    assert len(hashed) == 7 and json.loads((data_dir / shard.HASHES).read_text())["files"]


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tree: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    _fails(["shard", str(tmp_path / "nowhere"), "--out", str(out)], capsys, "data not found")
    (tmp_path / "empty").mkdir()
    _fails(["shard", str(tmp_path / "empty"), "--out", str(out)], capsys, "no images")
    _fails(["shard", "cifar10", "--out", str(out)], capsys, "no image files to shard")
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    _fails(["shard", str(tree), "--out", str(tmp_path / "file")], capsys, "is a file")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    _fails(["shard", str(tree), "--out", str(tmp_path / "other")], capsys, "holds other files")
    _fails(["shard", str(tree), "--out", str(out), "--max-side", "0"], capsys, "expected a whole number >= 1")
    assert main(["shard", str(tree), "--out", str(out), "--no-progress", "--shard-size", "5"]) == 0
    capsys.readouterr()
    for i in range(2):
        _image(tmp_path / "src2" / f"{i}.jpg", (8, 8), i, "JPEG")
    _fails(["shard", str(tmp_path / "src2"), "--out", str(out)], capsys, f"holds shards of another source ({tree})")
    _fails(["shard", str(tree), "--out", str(out), "--max-side", "10"], capsys, "written with --max-side none")
    (tree / "train" / "ant" / "9.jpg").write_bytes((tree / "train" / "ant" / "0.jpg").read_bytes())
    _fails(["shard", str(tree), "--out", str(out)], capsys, "as it was before (18 images; now 19")
    verify_shards(out)  # refused runs leave the shards alone


def test_an_image_that_cannot_be_read_stops_the_run_and_removes_it(tree: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tree / "test" / "cat" / "1.png").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    _fails(["shard", str(tree), "--out", str(out), "--shard-size", "2", "--workers", "2", "--no-progress"], capsys,
           "cannot decode image test/cat/1.png in")
    assert not out.exists()


def _check_against_scan(spec: str, out: Path, data_dir: Path, seed: int = 0) -> None:
    """Every split of ``out`` holds the images of ``scan(spec)`` in its seeded write order: bytes, labels, names;
    its labels.npy the items' labels."""
    catalog = scan(spec, str(data_dir))
    m = verify_shards(out)
    assert m.classes == catalog.classes and m.class_names == catalog.class_names and m.data["seed"] == seed
    at = 0
    for split, count in catalog.splits:
        items = _read_split(out / split)
        records = [catalog.records[at + i] for i in shard.write_order(count, seed)]
        assert [(bytes(i["image"]), i["label"], i["name"]) for i in items] == [
            (r.read(), r.label, r.name) for r in records]
        assert m.labels(split).tolist() == [i["label"] for i in items]
        at += count


def test_tiny_imagenet_archive_and_imagenet100_tree(tmp_path: Path) -> None:
    from .test_data import archive
    from .test_imagenet import EXTRA, LIST, make_imagenet
    from .test_tiny_imagenet import make_tiny

    tiny = archive(make_tiny(tmp_path / "t"), tmp_path / "tiny-imagenet-200.zip", wrap="tiny-imagenet-200")
    m = write_shards(str(tiny), tmp_path / "tiny", workers=2, shard_size=3, progress=False)
    assert list(m.splits) == ["train", "val"] and m.class_names is not None
    _check_against_scan(str(tiny), tmp_path / "tiny", tmp_path)
    tree = make_imagenet(tmp_path / "in" / "imagenet", LIST + EXTRA)
    spec = f"imagenet100:{tree}"
    m = write_shards(spec, tmp_path / "in100", workers=2, progress=False)
    assert m.source == f"imagenet100:{tree.resolve()}" and len(m.classes or []) == 100
    _check_against_scan(spec, tmp_path / "in100", tmp_path)


# --- empssl shard --append -------------------------------------------------------------------------------------


def _shard_files(root: Path) -> dict[str, bytes]:
    return {k: v for k, v in _files(root).items() if not k.endswith(shard.APPEND_LOCK)}


def test_append_adds_new_shards_to_train_and_leaves_the_existing_ones(tree: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out, new = tmp_path / "out", tmp_path / "new"
    write_shards(str(tree), out, workers=1, shard_size=5, progress=False)
    before = _shard_files(out)
    for i, c in enumerate(("cat", "bee", "cat", "cat")):  # two of the folder's three classes
        _image(new / c / f"n{i}.jpg", (20, 20), 100 + i, "JPEG")
    assert main(["shard", str(new), "--out", str(out), "--append", "--no-progress", "--workers", "1"]) == 0
    capsys.readouterr()
    after = _shard_files(out)
    # every file of before is there unchanged, but the three that list the shards and the old labels.npy (kept)
    changed = {k for k in before if after.get(k) != before[k]}
    assert changed == {"manifest.json", "train/index.json"}, changed
    m = verify_shards(out)
    assert [f.name for f in m.splits["train"].shards][3:] == ["chunk-0-3.bin"]  # 12 = 5+5+2, then 4 in one shard
    assert m.splits["train"].labels.name == "labels-16.npy" and m.splits["test"].images == 6
    items = _read_split(out / "train")
    assert len(items) == 16 == m.data["images"] - 6
    # classes mapped by name onto the folder's ("bee" is 1, "cat" 2 there; 0 and 1 in the appended tree), in the
    # append's own seeded order
    source = [("bee/n1.jpg", 1), ("cat/n0.jpg", 2), ("cat/n2.jpg", 2), ("cat/n3.jpg", 2)]
    assert [(i["name"], i["label"]) for i in items[12:]] == [source[j] for j in shard.write_order(4, 0)]
    assert bytes(next(i for i in items if i["name"] == "bee/n1.jpg")["image"]) == (new / "bee" / "n1.jpg").read_bytes()
    assert m.labels("train").tolist() == [i["label"] for i in items]
    assert m.data["appends"][0]["source"] == str(new.resolve()) and m.data["appends"][0]["images"] == 4
    # the same source again, and the first command again: nothing to do, nothing changed
    assert main(["shard", str(new), "--out", str(out), "--append", "--no-progress"]) == 0
    assert "appended before); nothing to do" in capsys.readouterr().err
    assert main(["shard", str(tree), "--out", str(out), "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert _shard_files(out) == after


def test_append_refuses_other_classes_and_sources_in_one_line_and_changes_nothing(
        tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    _fails(["shard", str(tree), "--out", str(out), "--append"], capsys, "holds no manifest.json")
    write_shards(str(tree), out, workers=1, shard_size=5, progress=False)
    before = _shard_files(out)
    _image(tmp_path / "dogs" / "dog" / "0.jpg", (8, 8), 1, "JPEG")
    _fails(["shard", str(tmp_path / "dogs"), "--out", str(out), "--append"], capsys,
           "has classes the shard folder has not (dog)")
    _image(tmp_path / "plain" / "0.jpg", (8, 8), 2, "JPEG")
    _fails(["shard", str(tmp_path / "plain"), "--out", str(out), "--append"], capsys, "has no classes, but the shard")
    _fails(["shard", str(tree), "--out", str(out), "--append"], capsys, "has a test split too")
    _fails(["shard", str(tree / "train"), "--out", str(out), "--append", "--max-side", "8"], capsys,
           "was written with --max-side none")
    _fails(["shard", str(tree / "train"), "--out", str(out), "--append", "--seed", "4"], capsys,
           "was written with --seed 0")
    # an image that cannot be read, in the second of two new shards: the first one, written, is removed again
    for i in range(6):
        _image(tmp_path / "broken" / "ant" / f"{i}.jpg", (8, 8), 10 + i, "JPEG")
    (tmp_path / "broken" / "ant" / "5.jpg").write_bytes(b"not an image")
    _fails(["shard", str(tmp_path / "broken"), "--out", str(out), "--append", "--workers", "1", "--no-progress"],
           capsys, "cannot decode image ant/5.jpg")
    assert _shard_files(out) == before
    verify_shards(out)


def test_one_append_at_a_time(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_shards(str(tree), out, workers=1, shard_size=5, progress=False)
    _image(tmp_path / "new" / "ant" / "0.jpg", (8, 8), 1, "JPEG")
    with lock_held_elsewhere(out / shard.APPEND_LOCK) as holder:  # as an append under way holds it
        with pytest.raises(OutputError, match=f"--append: another empssl process \\(PID {holder.pid}\\) is appending"):
            shard.append_shards(str(tmp_path / "new"), out, progress=False)
    assert shard.append_shards(str(tmp_path / "new"), out, progress=False).splits["train"].images == 13


def test_the_previous_manifests_labels_stay_until_the_next_append_is_published(tree: Path, tmp_path: Path) -> None:
    """docs/DATA.md: a reader of the previous manifest finds its labels file, also while (and after) another append
    fails; an append that is published removes the older ones."""
    out = tmp_path / "out"
    write_shards(str(tree), out, workers=1, shard_size=5, progress=False)
    for name, seed in (("a", 1), ("b", 2)):
        _image(tmp_path / name / "ant" / "0.jpg", (8, 8), seed, "JPEG")
    shard.append_shards(str(tmp_path / "a"), out, workers=1, progress=False)
    train = out / "train"
    assert sorted(p.name for p in train.glob("labels*.npy")) == ["labels-13.npy", "labels.npy"]
    _image(tmp_path / "broken" / "ant" / "0.jpg", (8, 8), 3, "JPEG")
    (tmp_path / "broken" / "ant" / "1.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot decode image"):
        shard.append_shards(str(tmp_path / "broken"), out, workers=1, progress=False)
    assert sorted(p.name for p in train.glob("labels*.npy")) == ["labels-13.npy", "labels.npy"]
    shard.append_shards(str(tmp_path / "b"), out, workers=1, progress=False)
    assert sorted(p.name for p in train.glob("labels*.npy")) == ["labels-13.npy", "labels-14.npy"]
    assert verify_shards(out).splits["train"].labels.name == "labels-14.npy"


def test_an_append_into_a_folder_it_cannot_write_says_so(tree: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    write_shards(str(tree), out, workers=1, shard_size=5, progress=False)
    _image(tmp_path / "new" / "ant" / "0.jpg", (8, 8), 1, "JPEG")
    real_open = os.open

    def read_only(path: str, flags: int, *args: int) -> int:  # a read-only mount (root ignores chmod)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, flags, *args)
    monkeypatch.setattr(os, "open", read_only)
    _fails(["shard", str(tmp_path / "new"), "--out", str(out), "--append", "--no-progress"], capsys,
           f"empssl: error: cannot write {out}: Read-only file system")
