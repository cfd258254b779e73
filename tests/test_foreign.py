"""LitData folders that empssl shard did not write (a user's litdata.optimize): read through verify_shards, their
fields found from index.json or named by flags, their labels read once and cached, a class-ordered one warned of."""

from __future__ import annotations

import io
import json
import os
from fractions import Fraction
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from empssl import shard
from empssl.data import DataError, decode_image
from empssl.shard import ItemKeys, read_item, verify_shards

litdata = pytest.importorskip("litdata")
torch = pytest.importorskip("torch")


def pixels(i: int) -> np.ndarray:
    """(6, 5, 3) uint8: item i's picture (smooth, so that JPEG decoders agree on it)."""
    small = Image.fromarray(np.random.default_rng(i).integers(0, 256, (2, 2, 3), dtype=np.uint8))
    return np.asarray(small.resize((5, 6), Image.Resampling.BILINEAR))


def jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels(i)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_item(kind: str, i: int) -> dict | tuple:
    """Item i of a user's folder of ``kind``: its image, label i % 3, under the field names users pick."""
    if kind == "pil":
        return {"image": Image.fromarray(pixels(i)), "label": i % 3, "name": f"p{i}.png"}
    if kind == "jpeg":  # a JPEG file opened with PIL: LitData's jpeg serializer
        return {"picture": Image.open(io.BytesIO(jpeg(i))), "target": i % 3}
    if kind == "bytes":
        return {"data": jpeg(i), "y": i % 3, "name": f"b{i}.jpg"}
    if kind == "tensor":  # torchvision's (C, H, W)
        return {"pixels": torch.from_numpy(pixels(i)).permute(2, 0, 1).contiguous(), "label": i % 3}
    if kind == "two-images":
        return {"a": Image.fromarray(pixels(i)), "b": Image.fromarray(pixels(i + 1)), "label": i % 3}
    if kind == "two-ints":
        return {"image": jpeg(i), "cls": i % 3, "idx": i}
    if kind == "no-label":
        return {"image": jpeg(i)}
    if kind == "no-image":
        return {"x": i, "name": "n"}
    if kind == "pickle":
        return {"image": jpeg(i), "label": i % 3, "extra": Fraction(i, 7)}
    if kind == "tuple":
        return (jpeg(i), i % 3)
    if kind == "sorted":  # class order, as an optimize over an ImageFolder writes it
        return {"image": jpeg(i), "label": i // 10}
    raise ValueError(kind)


def optimize(kind: str, out: Path, n: int = 12, chunk: int = 5) -> Path:
    """What ``litdata.optimize`` writes for items ``make_item(kind, i)``, written by the writer it uses (optimize
    itself starts worker processes: seconds per folder; :func:`test_a_folder_written_by_optimize_itself`)."""
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(str(out), chunk_size=chunk)
    for i in range(n):
        writer.add_item(i, make_item(kind, i))
    writer.done()
    writer.merge()
    return out


def user_folder(kind: str, root: Path, flat: bool = False) -> Path:
    """``root/train`` (12 items) and ``root/test`` (6), or ``root`` itself (one split) with ``flat``."""
    if flat:
        return optimize(kind, root)
    optimize(kind, root / "train")
    optimize(kind, root / "test", n=6)
    return root


KEYS = {"pil": ItemKeys("image", "label", "name"), "jpeg": ItemKeys("picture", "target", None),
        "bytes": ItemKeys("data", "y", "name"), "tensor": ItemKeys("pixels", "label", None)}


@pytest.mark.parametrize("kind", list(KEYS))
def test_a_users_folder_is_described_and_its_items_decode(kind, tmp_path):
    root = user_folder(kind, tmp_path / "ds", flat=kind == "bytes")
    m = verify_shards(root, data_dir=tmp_path / "data")
    assert m.data["format"] == "litdata" and m.keys == KEYS[kind] and m.classes == ["0", "1", "2"]
    assert list(m.splits) == (["train"] if kind == "bytes" else ["train", "test"])
    train = m.splits["train"]
    assert train.images == 12 and [f.images for f in train.shards] == [5, 5, 2] and train.shards[0].sha256 == ""
    assert m.labels("train").tolist() == [i % 3 for i in range(12)]
    ds = litdata.StreamingDataset(m.split_source("train"), serializers=shard.reader_serializers())
    for i in (0, 7):
        image, label, name = read_item(ds[i], m.keys, i)
        assert label == i % 3
        assert name == ({"pil": f"p{i}.png", "bytes": f"b{i}.jpg"}.get(kind) or f"item {i}")
        decoded = decode_image(image, 0, name)
        if kind in ("pil", "tensor"):  # lossless: the pixels written
            assert np.array_equal(decoded, pixels(i))
        else:  # JPEG (LitData's jpeg serializer may encode again, and decodes with torchvision): close to item i's
            error = [np.abs(decoded.astype(int) - pixels(j)).mean() for j in (i, i + 1)]
            assert decoded.shape == (6, 5, 3) and error[0] < error[1] / 2, error


@pytest.mark.slow  # litdata.optimize starts a worker process that imports torch: about 10 s
def test_a_folder_written_by_optimize_itself(tmp_path):
    litdata.optimize(fn=partial(make_item, "jpeg"), inputs=list(range(12)), output_dir=str(tmp_path / "ds"),
                     chunk_size=5, num_workers=1)
    m = verify_shards(tmp_path / "ds")
    assert m.keys == KEYS["jpeg"] and m.labels("train").tolist() == [i % 3 for i in range(12)]


def test_labels_are_read_once_and_read_again_when_a_chunk_changes(tmp_path, monkeypatch):
    root = user_folder("pil", tmp_path / "ds")
    data_dir = tmp_path / "data"
    verify_shards(root, data_dir=data_dir)
    assert len(list((data_dir / shard.LABELS_CACHE).glob("*.npy"))) == 2  # train, test
    reads = []
    real = litdata.StreamingDataset
    monkeypatch.setattr(litdata, "StreamingDataset", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    m = verify_shards(root, data_dir=data_dir)
    assert reads == [] and m.labels("test").tolist() == [0, 1, 2, 0, 1, 2]
    chunk = root / "test" / "chunk-0-0.bin"
    stamp = chunk.stat()
    os.utime(chunk, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    verify_shards(root, data_dir=data_dir)
    assert reads == [str(root / "test")]


def test_the_image_and_label_fields_are_named_in_one_line_when_unclear_and_flags_choose(tmp_path):
    two = user_folder("two-images", tmp_path / "two")
    with pytest.raises(DataError, match=r"which field holds the image\? its items hold a \(pil\), b \(pil\), "
                                        r"label \(int\); name it with --image-key") as e:
        verify_shards(two)
    assert "\n" not in str(e.value)
    assert verify_shards(two, image_key="b").keys == ItemKeys("b", "label", None)
    ints = user_folder("two-ints", tmp_path / "ints")
    with pytest.raises(DataError, match=r"which field holds the label\? its items hold image \(bytes\), cls \(int\), "
                                        r"idx \(int\); name it with --label-key"):
        verify_shards(ints)
    m = verify_shards(ints, label_key="cls")
    assert m.keys == ItemKeys("image", "cls", None) and m.labels("train").tolist() == [i % 3 for i in range(12)]
    with pytest.raises(DataError, match=r"--label-key nope: its items have no label field of that name; they hold "
                                        r"image \(bytes\), cls \(int\), idx \(int\)"):
        verify_shards(ints, label_key="nope")
    with pytest.raises(DataError, match=r"--image-key cls: its items have no image field of that name"):
        verify_shards(ints, image_key="cls")
    none = user_folder("no-image", tmp_path / "none", flat=True)
    with pytest.raises(DataError, match=r"no field of its items holds an image \(x \(int\), name \(str\)\); name it "
                                        r"with --image-key"):
        verify_shards(none)


def test_items_that_are_not_dicts_of_named_fields_are_refused_in_one_line(tmp_path):
    with pytest.raises(DataError, match=r"index.json: its items are not dicts of named fields \(PyTreeLoader, "
                                        r"builtins.tuple\); empssl reads items such as"):
        verify_shards(user_folder("tuple", tmp_path / "ds", flat=True))


def test_a_folder_without_labels_has_no_classes(tmp_path):
    m = verify_shards(user_folder("no-label", tmp_path / "ds", flat=True))
    assert m.keys == ItemKeys("image", None, None) and m.classes is None
    assert m.labels("train").tolist() == [-1] * 12


def test_a_pickle_field_is_refused_as_in_empssl_folders(tmp_path):
    root = user_folder("pickle", tmp_path / "ds", flat=True)
    with pytest.raises(DataError, match="field 2 of its items .* is read by LitData's 'pickle' serializer"):
        verify_shards(root)


def test_a_folder_in_class_order_is_warned_of_in_one_line_where_training_streams_it(tmp_path, capsys):
    from empssl.stream import StreamBatches, StreamedSplit, shard_items

    def stream(root: Path, rank: int = 0) -> None:
        m = verify_shards(root)
        items = shard_items(m, "train", m.labels("train").tolist())
        labels = items.labels()
        split = StreamedSplit(items, torch.arange(len(labels)), labels, m.classes, 8, str(root))
        with StreamBatches(split, batch_size=4, seed=0, device="cpu", workers=0, rank=rank, world=1):
            pass

    verify_shards(optimize("sorted", tmp_path / "sorted", n=40, chunk=20))
    assert capsys.readouterr().err == ""  # only read (eval, embed): nothing to warn of
    stream(tmp_path / "sorted")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "grouped by class (92% of neighbouring items are of one class" in err
    assert f"the train split of {tmp_path / 'sorted'}" in err and "write the images with empssl shard" in err
    stream(tmp_path / "sorted", rank=1)  # said once, by rank 0
    assert capsys.readouterr().err == ""
    stream(optimize("bytes", tmp_path / "mixed", n=40, chunk=20))  # labels i % 3
    assert capsys.readouterr().err == ""


def test_chunks_are_checked_by_size(tmp_path):
    root = user_folder("pil", tmp_path / "ds")
    chunk = root / "train" / "chunk-0-1.bin"
    chunk.write_bytes(chunk.read_bytes()[:-3])
    with pytest.raises(DataError, match=r"chunk-0-1.bin is .* bytes, .*index.json says .* \(truncated or changed\)"):
        verify_shards(root)
    chunk.unlink()
    with pytest.raises(DataError, match=r"missing shard .*chunk-0-1.bin \(listed in .*index.json\)"):
        verify_shards(root)
    index = json.loads((root / "test" / "index.json").read_text())
    assert index["chunks"]  # the held-out split is read the same way


def test_decode_image_refuses_an_array_that_is_not_pixels_in_one_line():
    with pytest.raises(DataError, match=r"cannot decode item 3: a float32 array of shape \(4, 4, 3\)"):
        decode_image(np.zeros((4, 4, 3), np.float32), 0, "item 3")
    assert decode_image(np.full((4, 4, 1), 7, np.uint8)).tolist() == np.full((4, 4, 3), 7).tolist()


def test_a_split_without_chunks_is_refused_in_one_line(tmp_path):
    root = user_folder("pil", tmp_path / "ds")
    index = json.loads((root / "test" / "index.json").read_text())
    for chunk in index["chunks"]:
        (root / "test" / chunk["filename"]).unlink()
    (root / "test" / "index.json").write_text(json.dumps({**index, "chunks": []}))
    with pytest.raises(DataError, match=r"ds/test/index.json lists no chunks: the test split holds no items"):
        verify_shards(root, data_dir=tmp_path / "data")
