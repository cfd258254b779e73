"""Reading a shard folder never runs code, and names from its metadata stay in it (issue 22).

A shard folder travels with its manifest's sha256, so whoever hands one over can re-sign it: the integrity checks
pass. These folders are crafted that way from a real ``empssl shard`` run: one whose items' labels are pickles
(LitData's pickle serializer) that create a marker file when loaded, and one that names a chunk outside the folder.
Every reader (both training tiers, online, eval, embed, ``shard --append``) must refuse them in one line, exit 2,
before reading an item.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from empssl import shard
from empssl.cli import main
from empssl.data import DataError
from empssl.stream import ShardItems

from .conftest import TINY

litdata = pytest.importorskip("litdata")
from litdata.streaming.writer import BinaryWriter  # noqa: E402


class Touch:
    """Pickled, it becomes ``path.write_text("1")``, which makes the marker file and returns the label 1: the code
    a crafted shard would run when loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return Path.write_text, (self.path, "1")


def class_tree(root: Path, train: int = 10, test: int = 3) -> Path:
    """``root/{train,test}/{a,b}/<i>.png``: 16 x 16 pictures."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def _sign(entry: dict, path: Path) -> None:
    entry.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def pickled_labels(root: Path, marker: Path, fmt: str = "pickle") -> None:
    """Rewrite each split of ``root`` as one chunk whose labels are :class:`Touch` pickles (``fmt``: the
    data_format index.json gives them), and re-sign manifest.json."""
    manifest = json.loads((root / shard.MANIFEST).read_text())
    for name, split in manifest["splits"].items():
        folder = root / name
        ds = litdata.StreamingDataset(str(folder))
        items = [ds[i] for i in range(len(ds))]
        for f in split["shards"]:
            (folder / f["name"]).unlink()
        writer = BinaryWriter(str(folder / "tmp"), chunk_size=len(items))
        for i, d in enumerate(items):
            writer.add_item(i, {"image": bytes(d["image"]), "label": Touch(marker), "name": d["name"]})
        writer.done()
        index = json.loads(next((folder / "tmp").glob("*.index.json")).read_text())
        assert index["config"]["data_format"][1] == "pickle"  # LitData's choice for any object
        index["config"]["data_format"][1] = fmt
        (chunk,) = index["chunks"]
        shutil.move(folder / "tmp" / chunk["filename"], folder / chunk["filename"])
        shutil.rmtree(folder / "tmp")
        (folder / "index.json").write_text(json.dumps(index))
        split["shards"] = [{"name": chunk["filename"], "images": len(items)}]
        _sign(split["shards"][0], folder / chunk["filename"])
    (root / shard.MANIFEST).write_text(json.dumps(manifest))


def outside_chunk(root: Path, name: str) -> Path:
    """Move train's first chunk out of ``root`` (to ``root/../outside.bin``) and name it there in manifest.json
    and index.json, "relative" to the split's folder (``../../outside.bin``) or "absolute"; it keeps its size and
    sha256."""
    outside = root.parent / "outside.bin"
    manifest = json.loads((root / shard.MANIFEST).read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    shutil.move(root / "train" / entry["name"], outside)
    entry["name"] = "../../outside.bin" if name == "relative" else str(outside)
    index = json.loads((root / "train" / "index.json").read_text())
    index["chunks"][0]["filename"] = entry["name"]
    (root / "train" / "index.json").write_text(json.dumps(index))
    (root / shard.MANIFEST).write_text(json.dumps(manifest))
    return outside


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, Path]:
    """(shards of a class tree, a run trained on them for eval and embed), written once."""
    tmp = tmp_path_factory.mktemp("good")
    src = class_tree(tmp / "src")
    assert main(["shard", str(src), "--out", str(tmp / "shards"), "--no-progress", "--shard-size", "8"]) == 0
    run = tmp / "run"
    assert main(["train", "--data", str(tmp / "shards"), "--out", str(run), "--data-mode", "memory", "--image-size",
                 "16", "--epochs", "1", "--no-eval", "--no-progress", *TINY]) == 0
    return tmp / "shards", run


def readers(tmp: Path, shards: Path, run: Path) -> dict[str, list[str]]:
    """The command line of each reader of ``shards``."""
    new = class_tree(tmp / "new", train=1, test=0) / "train"
    train = ["train", "--data", str(shards), "--out", str(tmp / "out"), "--image-size", "16", "--epochs", "1",
             "--no-progress", *TINY]
    return {
        "train memory": [*train, "--data-mode", "memory"],
        "train stream": [*train, "--data-mode", "stream"],
        "train online": [*train, "--online", "--online-timeout", "1"],
        "eval": ["eval", "--checkpoint", str(run), "--data", str(shards), "--out", str(tmp / "e.json"),
                 "--no-progress"],
        "embed": ["embed", "--checkpoint", str(run), "--data", str(shards), "--out", str(tmp / "e.npz"),
                  "--no-progress"],
        "shard --append": ["shard", str(new), "--out", str(shards), "--append", "--no-progress"],
    }


READERS = ["train memory", "train stream", "train online", "eval", "embed", "shard --append"]


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("reader", READERS)
def test_a_pickle_field_is_refused_by_every_reader_before_it_runs(reader, good, tmp_path, capsys):
    shards = shutil.copytree(good[0], tmp_path / "shards")
    marker = tmp_path / "ran"
    pickled_labels(shards, marker)
    _refused(readers(tmp_path, shards, good[1])[reader], capsys, "split train", "field 1", "'pickle'")
    assert not marker.exists()


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("name", ["relative", "absolute"])
def test_a_chunk_named_outside_the_folder_is_refused_by_every_reader(reader, name, good, tmp_path, capsys):
    shards = shutil.copytree(good[0], tmp_path / "shards")
    outside = outside_chunk(shards, name)
    _refused(readers(tmp_path, shards, good[1])[reader], capsys, "not a plain file name", outside.name)
    assert not (tmp_path / "out").exists()



def test_the_serializer_is_resolved_as_litdata_resolves_it_and_litdata_cannot_reach_pickle(good, tmp_path):
    shards = shutil.copytree(good[0], tmp_path / "shards")
    marker = tmp_path / "ran"
    pickled_labels(shards, marker, "int:pickle")  # an allowed name before the colon; LitData reads it with pickle
    with pytest.raises(DataError, match="field 1 of its items \\('int:pickle'\\) is read by LitData's 'pickle'"):
        shard.verify_shards(shards)
    items = ShardItems(shards / "train", 20)  # past the check: LitData is handed no pickle to read it with
    with pytest.raises(DataError, match="'pickle' serializer builds Python objects"):
        items.item(0)
    assert not marker.exists()


def test_users_litdata_folders_of_images_bytes_arrays_and_int_labels_pass_and_read(tmp_path):
    """What LitData writes for PIL images, JPEG files, raw bytes, tensors and arrays with int labels."""
    picture = Image.fromarray(np.full((8, 8, 3), 90, dtype=np.uint8))
    picture.save(tmp_path / "p.jpg")
    item = {"pil": picture, "jpeg": Image.open(tmp_path / "p.jpg"), "bytes": b"\x01\x02", "label": 3, "name": "x",
            "tensor": torch.zeros(2, 3), "vector": torch.arange(4), "array": np.ones((2, 2), np.float32),
            "row": np.arange(3, dtype=np.int16)}
    writer = BinaryWriter(str(tmp_path / "ds"), chunk_size=1)
    writer.add_item(0, item)
    writer.done()
    writer.merge()
    formats = json.loads((tmp_path / "ds" / "index.json").read_text())["config"]["data_format"]
    assert {"pil", "jpeg", "bytes", "int", "str", "tensor", "numpy"} <= {f.split(":")[0] for f in formats}, formats
    shard.check_data_format(formats, "a user's folder")
    read = litdata.StreamingDataset(str(tmp_path / "ds"), serializers=shard.reader_serializers())[0]
    assert read["label"] == 3 and bytes(read["bytes"]) == b"\x01\x02" and torch.equal(read["vector"], torch.arange(4))


NAMES = ["../x", "/etc/passwd", "a/b", "..", "", "a\\b"]


@pytest.mark.parametrize("where, name", [(w, n) for w in ("split", "shard", "labels", "index") for n in NAMES] +
                         [(w, 7) for w in ("shard", "labels", "index")])  # JSON's keys (split names) are strings
def test_names_in_the_metadata_are_plain_file_names(where, name, good, tmp_path):
    shards = shutil.copytree(good[0], tmp_path / "shards")
    manifest = json.loads((shards / shard.MANIFEST).read_text())
    test = manifest["splits"]["test"]
    if where == "split":
        manifest["splits"] = {"train": manifest["splits"]["train"], name: test}
    elif where in ("shard", "labels"):
        (test["shards"][0] if where == "shard" else test["labels"])["name"] = name
    else:
        index = json.loads((shards / "test" / "index.json").read_text())
        index["chunks"][0]["filename"] = name
        (shards / "test" / "index.json").write_text(json.dumps(index))
    (shards / shard.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=re.escape(f"names {name!r}, which is not a plain file name")):
        shard.verify_shards(shards, hashes=False)
