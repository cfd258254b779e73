"""Tests for empssl.data on small ImageFolder trees built here (folders, .tar.gz, .tar and .zip)."""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import urllib.error
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from empssl import data
from empssl.data import DataError, ImageData, demo_archive, load_data, load_images

from .conftest import default_sigint

CLASSES = ["cat", "dog", "frog"]  # created in a different order below; loading must sort them


def pixel(label: int, index: int) -> int:
    """The grey level of image ``index`` of class ``label``, so each image can be recognised after loading."""
    return 40 * label + index + 1


def make_tree(root: Path, n_train: int = 4, n_test: int = 2, size: tuple[int, int] = (8, 8),
              mode: str = "RGB", test_name: str = "test", classes: list[str] = CLASSES) -> Path:
    """root/{train,<test_name>}/<class>/NNNN.png, lossless, one flat grey level per image."""
    for split, n in (("train", n_train), (test_name, n_test)):
        for label in reversed(range(len(classes))):
            d = root / split / classes[label]
            d.mkdir(parents=True)
            for i in range(n):
                v = pixel(label, i)
                Image.new(mode, size, v if mode == "L" else (v, v, v)).save(d / f"{i:04d}.png")
    return root


def archive(tree: Path, out: Path, wrap: str | None = "wrapped") -> Path:
    """Pack ``tree`` into ``out`` (.tar, .tar.gz or .zip), under one top-level folder ``wrap`` if given."""
    files = sorted(p for p in tree.rglob("*") if p.is_file())

    def name(p: Path) -> str:
        rel = p.relative_to(tree).as_posix()
        return f"{wrap}/{rel}" if wrap else rel

    if out.name.endswith(".zip"):
        with zipfile.ZipFile(out, "w") as zf:
            for p in files:
                zf.write(p, name(p))
    else:
        with tarfile.open(out, "w:gz" if out.name.endswith(".gz") else "w") as tf:
            for p in files:
                tf.add(p, name(p))
    return out


def check_tree_data(train: ImageData, test: ImageData, n_train: int = 4, n_test: int = 2, hw: int = 8
                    ) -> None:
    for ds, n in ((train, n_train), (test, n_test)):
        assert ds.classes == CLASSES
        assert ds.images.shape == (n * len(CLASSES), 3, hw, hw)
        assert ds.images.dtype == torch.uint8 and ds.images.is_contiguous() and ds.images.device.type == "cpu"
        assert ds.labels.dtype == torch.int64
        assert ds.labels.tolist() == [c for c in range(len(CLASSES)) for _ in range(n)]
        # each image's pixels identify its class and index: labels and images stay aligned
        expected = torch.tensor([pixel(c, i) for c in range(len(CLASSES)) for i in range(n)]).to(torch.uint8)
        assert torch.equal(ds.images[:, :, 0, 0], expected[:, None].expand(-1, 3))
        assert len(ds) == n * len(CLASSES)


# --- loading ----------------------------------------------------------------------------------------


def test_folder_loads_with_sorted_classes_and_aligned_labels(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    train, test = load_data(str(root), data_dir=str(tmp_path / "cache"), progress=False)
    check_tree_data(train, test)


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz", ".tar", ".zip"])
@pytest.mark.parametrize("wrap", [None, "wrapped"])
def test_archive_matches_folder(tmp_path: Path, suffix: str, wrap: str | None) -> None:
    path = archive(make_tree(tmp_path / "tree"), tmp_path / f"tree{suffix}", wrap)
    train, test = load_data(str(path), data_dir=str(tmp_path / "cache"), progress=False)
    check_tree_data(train, test)
    # nothing but the finished cache is left behind
    assert [p.name.startswith("tree-") for p in (tmp_path / "cache" / "cache").iterdir()] == [True]


def test_val_split_is_accepted(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree", test_name="val")
    train, test = load_data(str(root), data_dir=str(tmp_path / "cache"), progress=False)
    check_tree_data(train, test)


def test_hidden_and_non_image_files_are_ignored(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (root / "train" / "cat" / "._0000.png").write_bytes(b"resource fork")
    (root / "train" / ".hidden_class").mkdir()
    (root / "train" / "cat" / ".cache").mkdir()
    Image.new("RGB", (8, 8)).save(root / "train" / "cat" / ".cache" / "x.png")
    # an upper-case extension counts
    Image.new("RGB", (8, 8), (1, 1, 1)).save(root / "test" / "dog" / "0002.JPEG")
    train, test = load_data(str(root), data_dir=str(tmp_path / "cache"), progress=False)
    assert len(train) == 12 and train.classes == CLASSES
    assert len(test) == 7 and test.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]


def test_grayscale_is_replicated_to_three_channels(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree", mode="L")
    train, test = load_data(str(root), data_dir=str(tmp_path / "cache"), progress=False)
    check_tree_data(train, test)
    assert torch.equal(train.images[:, 0], train.images[:, 2])


def test_mixed_sizes_need_image_size(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    Image.new("RGB", (12, 10), (9, 9, 9)).save(root / "train" / "dog" / "0009.png")
    with pytest.raises(DataError, match=r"--image-size.*|.*0009\.png.*"):
        load_data(str(root), data_dir=str(tmp_path / "cache"), progress=False)
    with pytest.raises(DataError) as e:
        load_data(str(root), data_dir=str(tmp_path / "cache"), progress=False)
    msg = str(e.value)
    assert "--image-size" in msg and "train/dog/0009.png" in msg and "\n" not in msg


def test_image_size_resizes_shorter_side_and_centre_crops(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree", size=(8, 8))
    # 24 x 12: left, middle and right thirds in different colours
    img = np.zeros((12, 24, 3), dtype=np.uint8)
    img[:, :8] = 200
    img[:, 8:16] = 100
    img[:, 16:] = 50
    Image.fromarray(img).save(root / "train" / "dog" / "0009.png")
    train, test = load_data(str(root), data_dir=str(tmp_path / "cache"), image_size=6, progress=False)
    assert train.images.shape == (13, 3, 6, 6) and test.images.shape == (6, 3, 6, 6)
    wide = train.images[train.labels.tolist().index(1) + 4]  # the 24 x 12 image, last of class dog
    # resized to 12 x 6 (thirds 4 wide), crop = columns 3..8: pure middle in the centre, blended at the edges
    assert torch.equal(wide[:, :, 2:4], torch.full((3, 6, 2), 100, dtype=torch.uint8))
    assert wide[:, :, 0].float().mean() > 100 and wide[:, :, 5].float().mean() < 100  # bilinear edges blend
    # flat images stay flat
    assert torch.equal(train.images[0], torch.full((3, 6, 6), pixel(0, 0), dtype=torch.uint8))


# --- the cache --------------------------------------------------------------------------------------


def forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(data.decode, "decode_catalog", fail)


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_second_load_uses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    root = make_tree(tmp_path / "tree")
    spec = str(root if kind == "folder" else archive(root, tmp_path / "tree.zip"))
    first = load_data(spec, data_dir=str(tmp_path / "d"), progress=False)
    caches = list((tmp_path / "d" / "cache").iterdir())
    assert len(caches) == 1 and (caches[0] / "meta.json").is_file()
    forbid_decoding(monkeypatch)
    second = load_data(spec, data_dir=str(tmp_path / "d"), progress=False)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.classes == b.classes
    with pytest.raises(AssertionError, match="decoded again"):  # another image size is another cache
        load_data(spec, data_dir=str(tmp_path / "d"), image_size=4, progress=False)


def test_changed_folder_is_decoded_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_tree(tmp_path / "tree")
    load_data(str(root), data_dir=str(tmp_path / "d"), progress=False)
    Image.new("RGB", (8, 8)).save(root / "train" / "cat" / "0100.png")
    train, _ = load_data(str(root), data_dir=str(tmp_path / "d"), progress=False)
    assert len(train) == 13
    forbid_decoding(monkeypatch)
    assert len(load_data(str(root), data_dir=str(tmp_path / "d"), progress=False)[0]) == 13


def test_damaged_cache_is_rebuilt(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    load_data(str(root), data_dir=str(tmp_path / "d"), progress=False)
    (cache,) = (tmp_path / "d" / "cache").iterdir()
    (cache / "images.npy").write_bytes(b"garbage")
    check_tree_data(*load_data(str(root), data_dir=str(tmp_path / "d"), progress=False))
    assert np.load(cache / "images.npy").shape == (18, 3, 8, 8)
    (cache / "labels.npy").unlink()
    check_tree_data(*load_data(str(root), data_dir=str(tmp_path / "d"), progress=False))
    assert np.load(cache / "labels.npy").shape == (18,)


# --- the process pool -------------------------------------------------------------------------------


def test_pool_decoding_matches_and_reports_bad_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data.decode, "POOL_MIN_IMAGES", 1)
    root = make_tree(tmp_path / "tree")
    check_tree_data(*load_data(str(root), data_dir=str(tmp_path / "d"), progress=True))
    (root / "test" / "frog" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(DataError, match=r"test/frog/0001\.png"):
        load_data(str(root), data_dir=str(tmp_path / "d"), progress=False)


# --- subset -----------------------------------------------------------------------------------------


def make_image_data(labels: list[int], n_classes: int) -> ImageData:
    n = len(labels)
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 2, 2).contiguous()
    return ImageData(images, torch.tensor(labels, dtype=torch.int64), [f"c{i}" for i in range(n_classes)])


def test_subset_is_class_balanced_first_images() -> None:
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(4), 10)).tolist()  # 4 classes x 10, shuffled like CIFAR
    ds = make_image_data(labels, 4)
    sub = ds.subset(10)
    assert len(sub) == 10
    # ceil(10 / 4) for the first 10 % 4 classes, floor for the rest
    assert torch.bincount(sub.labels, minlength=4).tolist() == [3, 3, 2, 2]
    for c, k in enumerate([3, 3, 2, 2]):  # the first k of each class, in stored order
        first_k = [i for i, label in enumerate(labels) if label == c][:k]
        assert sorted(sub.images[sub.labels == c, 0, 0, 0].tolist()) == first_k
    kept = sub.images[:, 0, 0, 0].tolist()
    assert kept == sorted(kept)  # stored order is kept
    assert torch.equal(ds.subset(10).images, sub.images)  # deterministic
    assert torch.equal(sub.subset(6).images, ds.subset(6).images)
    assert sub.classes == ds.classes and sub.images.is_contiguous()


def test_subset_small_class_leaves_its_share_to_others() -> None:
    ds = make_image_data([0] * 8 + [1] * 2, 2)
    assert torch.bincount(ds.subset(6).labels).tolist() == [4, 2]
    assert ds.subset(100) is ds
    with pytest.raises(DataError, match="subset"):
        ds.subset(0)


# --- user errors ------------------------------------------------------------------------------------


def load_error(spec: str | Path, tmp_path: Path, **kwargs: object) -> str:
    with pytest.raises(DataError) as e:
        load_data(str(spec), data_dir=str(tmp_path / "d"), progress=False, **kwargs)  # type: ignore[arg-type]
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def test_missing_path(tmp_path: Path) -> None:
    assert "nowhere" in load_error(tmp_path / "nowhere", tmp_path)


def test_neither_folder_nor_archive(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n")
    msg = load_error(tmp_path / "data.csv", tmp_path)
    assert "data.csv" in msg and "archive" in msg


def test_no_train_split(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    shutil.rmtree(root / "train")
    assert "train/" in load_error(root, tmp_path)


@pytest.mark.parametrize("suffix", ["", ".zip"])
def test_no_test_or_val_split(tmp_path: Path, suffix: str) -> None:
    root = make_tree(tmp_path / "tree")
    shutil.rmtree(root / "test")
    spec = archive(root, tmp_path / f"tree{suffix}") if suffix else root
    msg = load_error(spec, tmp_path)
    assert "test/" in msg and "val/" in msg and f"tree{suffix}" in msg


def test_split_without_class_folders(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    shutil.rmtree(root / "test")
    (root / "test").mkdir()
    Image.new("RGB", (8, 8)).save(root / "test" / "loose.png")
    assert "test/ has no class folders" in load_error(root, tmp_path)


def test_class_without_images(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    for p in (root / "train" / "dog").iterdir():
        p.unlink()
    (root / "train" / "dog" / "readme.txt").write_text("x")
    assert "train/dog/ has no images" in load_error(root, tmp_path)


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    (root / "train" / "cat" / "0002.png").write_bytes(b"not a png at all")
    assert "train/cat/0002.png" in load_error(root, tmp_path)


def test_truncated_jpeg_names_the_file(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, "JPEG")
    (root / "test" / "dog" / "0005.jpg").write_bytes(buf.getvalue()[:200])
    assert "test/dog/0005.jpg" in load_error(archive(root, tmp_path / "t.tar.gz"), tmp_path)


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_bad_image_in_archive_names_the_member(tmp_path: Path, suffix: str) -> None:
    root = make_tree(tmp_path / "tree")
    (root / "train" / "cat" / "0002.png").write_bytes(b"not a png at all")
    msg = load_error(archive(root, tmp_path / f"t{suffix}"), tmp_path)
    # the member's path inside the archive, and the archive; not PIL's "<_io.BytesIO object at 0x7f...>"
    assert "cannot decode image wrapped/train/cat/0002.png" in msg and f"t{suffix}" in msg
    assert "BytesIO" not in msg and "0x" not in msg


def test_train_and_test_classes_differ(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    shutil.rmtree(root / "test" / "frog")
    shutil.copytree(root / "test" / "dog", root / "test" / "zebra")
    msg = load_error(root, tmp_path)
    assert "only in train: frog" in msg and "only in test: zebra" in msg


@pytest.mark.parametrize("name", ["bad.tar.gz", "bad.zip", "bad.tar"])
def test_corrupt_archive(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(bytes(range(256)) * 8)
    msg = load_error(tmp_path / name, tmp_path)
    assert name in msg and "corrupt" in msg


def test_truncated_archive(tmp_path: Path) -> None:
    good = archive(make_tree(tmp_path / "tree"), tmp_path / "good.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(good[: len(good) // 2])
    assert "cut.tar.gz" in load_error(tmp_path / "cut.tar.gz", tmp_path)


@pytest.mark.parametrize("evil", ["../escape.png", "/abs/escape.png", "tree/../../escape.png"])
def test_archive_member_escaping_root_is_refused(tmp_path: Path, evil: str) -> None:
    path = archive(make_tree(tmp_path / "tree"), tmp_path / "evil.tar", wrap="tree")
    with tarfile.open(path, "a") as tf:
        info = tarfile.TarInfo(evil)
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    msg = load_error(path, tmp_path)
    assert "outside its root" in msg and evil in msg
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "d" / "escape.png").exists()


def test_archive_symlinks_are_not_followed(tmp_path: Path) -> None:
    path = archive(make_tree(tmp_path / "tree"), tmp_path / "links.tar", wrap="tree")
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    with tarfile.open(path, "a") as tf:
        info = tarfile.TarInfo("tree/train/cat/link.png")
        info.type, info.linkname = tarfile.SYMTYPE, str(secret)
        tf.addfile(info)
    train, _ = load_data(str(path), data_dir=str(tmp_path / "d"), progress=False)
    assert len(train) == 12


def test_train_and_test_sizes_differ(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    shutil.rmtree(root / "test")
    make_tree(tmp_path / "other", size=(10, 10))
    shutil.move(tmp_path / "other" / "test", root / "test")
    assert "--image-size" in load_error(root, tmp_path)
    train, test = load_data(str(root), data_dir=str(tmp_path / "d"), image_size=8, progress=False)
    assert train.images.shape[2:] == test.images.shape[2:] == (8, 8)


def test_unwritable_cache_dir_loads_without_caching(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "d").write_text("a file where the cache folder should go")
    check_tree_data(*load_data(str(make_tree(tmp_path / "tree")), data_dir=str(tmp_path / "d"), progress=False))
    note = capsys.readouterr().err.strip()
    assert note.startswith("note: the decoded images were not cached") and "--data-dir" in note and "\n" not in note


def test_negative_image_size(tmp_path: Path) -> None:
    assert "image size" in load_error(make_tree(tmp_path / "tree"), tmp_path, image_size=-1)


# --- torchvision datasets (faked: nothing can be downloaded here) --------------------------------------


class FakeCIFAR:
    def __init__(self, root: str, train: bool, download: bool) -> None:
        if not download:
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        n = 6 if train else 4
        self.data = np.arange(n * 32 * 32 * 3, dtype=np.int64).reshape(n, 32, 32, 3).astype(np.uint8)
        self.targets = [i % 2 for i in range(n)]
        self.classes = ["a", "b"]


def test_cifar_arrays_are_converted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torchvision

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR)
    train, test = load_data("cifar10", data_dir=str(tmp_path))
    assert train.images.shape == (6, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.images.is_contiguous() and train.labels.dtype == torch.int64
    assert torch.equal(train.images[1], torch.from_numpy(FakeCIFAR(".", True, True).data[1]).permute(2, 0, 1))
    assert train.classes == ["a", "b"] and train.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert load_data("cifar10", data_dir=str(tmp_path), image_size=16)[0].images.shape == (6, 3, 16, 16)


def test_cifar_offline_says_where_it_looked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torchvision

    class Offline(FakeCIFAR):
        def __init__(self, root: str, train: bool, download: bool) -> None:
            if download:
                raise urllib.error.URLError("no network")
            super().__init__(root, train, download)

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", Offline)
    msg = load_error("cifar100", tmp_path)
    assert "cifar100" in msg and str(tmp_path / "d") in msg and "downloaded" in msg and "ImageFolder" in msg


# --- the bundled demo archive -------------------------------------------------------------------------


def test_demo_archive_loads(tmp_path: Path) -> None:
    assert demo_archive().is_file() and demo_archive().stat().st_size < 3_000_000
    train, test = load_data("demo", data_dir=str(tmp_path), progress=False)
    assert train.images.shape == (5000, 3, 32, 32) and test.images.shape == (1000, 3, 32, 32)
    assert train.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                             "truck"]
    assert torch.bincount(train.labels).tolist() == [500] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert 60 < train.images.float().mean() < 200  # real photos, not blank


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def shared_cifar() -> Path:
    """The offline CIFAR-10 JPEG archive: in $EMPSSL_SHARED_DATA, else in ../shared/data beside the repository
    (where this machine's clones, CI's included, find it). Skips when neither is set up; fails when the
    variable is set but the archive is not there, since that is a broken set-up rather than another machine."""
    env = os.environ.get("EMPSSL_SHARED_DATA")
    path = (Path(env) if env else REPO.parent / "shared" / "data") / "cifar10-jpeg75.tar.gz"
    if not path.is_file():
        if env:
            pytest.fail(f"EMPSSL_SHARED_DATA={env} holds no cifar10-jpeg75.tar.gz")
        pytest.skip(f"needs the offline CIFAR-10 JPEG archive ({path}, or set EMPSSL_SHARED_DATA)")
    return path


@pytest.mark.slow
def test_demo_archive_rebuilds_byte_for_byte(tmp_path: Path, shared_cifar: Path) -> None:
    tool = REPO / "tools" / "make_demo_subset.py"
    out = tmp_path / "demo.tar.gz"
    subprocess.run([sys.executable, str(tool), "--source", str(shared_cifar), "--out", str(out)], check=True)
    assert out.read_bytes() == demo_archive().read_bytes()


# --- load_images: every image with its relative name ------------------------------------------------------


def images_of(spec: str | Path, tmp_path: Path, **kwargs: object) -> data.ImageSet:
    return load_images(str(spec), data_dir=str(tmp_path / "d"), progress=False, **kwargs)  # type: ignore[arg-type]


def tree_names(split: str, n: int) -> list[str]:
    return [f"{split}/{c}/{i:04d}.png" for c in CLASSES for i in range(n)]


def test_load_images_split_root_keeps_split_prefix_and_matches_load_data(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    s = images_of(root, tmp_path)
    assert s.names == tree_names("train", 4) + tree_names("test", 2)
    assert s.splits == [("train", 12), ("test", 6)] and s.classes == CLASSES and s.class_names is None
    train, test = load_data(str(root), data_dir=str(tmp_path / "d"), progress=False)
    assert torch.equal(s.images, torch.cat([train.images, test.images]))
    assert torch.equal(s.labels, torch.cat([train.labels, test.labels]))


def test_load_images_takes_every_split(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    shutil.copytree(root / "test", root / "val")
    s = images_of(root, tmp_path)
    assert s.splits == [("train", 12), ("val", 6), ("test", 6)]
    assert s.names[12:18] == tree_names("val", 2)
    shutil.rmtree(root / "val" / "frog")
    assert "only in train: frog" in str(pytest.raises(DataError, images_of, root, tmp_path).value)


def test_load_images_class_tree(tmp_path: Path) -> None:
    make_tree(tmp_path / "tree")
    s = images_of(tmp_path / "tree" / "train", tmp_path)
    assert s.names == [f"{c}/{i:04d}.png" for c in CLASSES for i in range(4)]
    assert s.classes == CLASSES and s.labels.tolist() == [c for c in range(3) for _ in range(4)]
    assert s.splits == [("", 12)]
    expected = torch.tensor([pixel(c, i) for c in range(3) for i in range(4)], dtype=torch.uint8)
    assert torch.equal(s.images[:, 0, 0, 0], expected)


def test_load_images_flat_folder_has_no_labels(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, v in (("b.png", 2), ("a.png", 1), ("C.jpeg", 3)):
        Image.new("RGB", (8, 8), (v, v, v)).save(folder / name)
    (folder / "more").mkdir()
    Image.new("RGB", (8, 8), (4, 4, 4)).save(folder / "more" / "d.png")
    (folder / "notes.txt").write_text("skipped")
    s = images_of(folder, tmp_path)
    assert s.names == ["C.jpeg", "a.png", "b.png", "more/d.png"]  # sorted; images below the top keep their path
    assert s.labels is None and s.classes is None and s.splits == [("", 4)]
    assert s.images[:, 0, 0, 0].tolist()[1:] == [1, 2, 4]


@pytest.mark.parametrize("layout", ["split", "classes", "flat"])
@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
@pytest.mark.parametrize("wrap", [None, "wrapped"])
def test_load_images_archive_matches_folder(tmp_path: Path, layout: str, suffix: str, wrap: str | None) -> None:
    make_tree(tmp_path / "tree")
    folder = {"split": tmp_path / "tree", "classes": tmp_path / "tree" / "train",
              "flat": tmp_path / "tree" / "train" / "dog"}[layout]
    from_folder = images_of(folder, tmp_path)
    from_archive = images_of(archive(folder, tmp_path / f"a{suffix}", wrap), tmp_path)
    assert from_archive.names == from_folder.names and from_archive.splits == from_folder.splits
    assert torch.equal(from_archive.images, from_folder.images)
    assert from_archive.classes == from_folder.classes
    assert (from_archive.labels is None) == (from_folder.labels is None) == (layout == "flat")


def test_load_images_mixed_sizes_need_image_size(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (8, 8), (5, 5, 5)).save(folder / "a.png")
    Image.new("RGB", (12, 10), (7, 7, 7)).save(folder / "b.png")
    msg = str(pytest.raises(DataError, images_of, folder, tmp_path).value)
    assert "--image-size" in msg and "b.png is 12x10" in msg and "\n" not in msg
    s = images_of(folder, tmp_path, image_size=6)
    assert s.images.shape == (2, 3, 6, 6) and s.names == ["a.png", "b.png"]


def test_load_images_uses_its_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_tree(tmp_path / "tree")
    first = images_of(root, tmp_path)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(data.decode, "decode_catalog", fail)
    second = images_of(root, tmp_path)
    assert second.names == first.names and second.splits == first.splits and torch.equal(second.images, first.images)
    Image.new("RGB", (8, 8)).save(root / "train" / "cat" / "0100.png")
    with pytest.raises(AssertionError, match="decoded again"):
        images_of(root, tmp_path)


def test_load_images_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    assert "no images" in str(pytest.raises(DataError, images_of, tmp_path / "empty", tmp_path).value)
    assert "nowhere" in str(pytest.raises(DataError, images_of, tmp_path / "nowhere", tmp_path).value)
    root = make_tree(tmp_path / "tree")
    (root / "train" / "dog" / "0001.png").write_bytes(b"broken")
    assert "train/dog/0001.png" in str(pytest.raises(DataError, images_of, root, tmp_path).value)


def test_load_images_torchvision_names_are_indices(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torchvision

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR)
    s = load_images("cifar10", data_dir=str(tmp_path))
    assert s.names == [f"train/{i:05d}" for i in range(6)] + [f"test/{i:05d}" for i in range(4)]
    assert s.splits == [("train", 6), ("test", 4)] and s.classes == ["a", "b"]
    assert s.labels.tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]


# --- the pieces a streamed tier builds on ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_scan_records_decoded_one_by_one_equal_load_images(tmp_path: Path, kind: str) -> None:
    root = make_tree(tmp_path / "tree")
    spec = str(root if kind == "folder" else archive(root, tmp_path / "t.zip"))
    catalog = data.scan(spec, data_dir=str(tmp_path / "d"))
    assert not (tmp_path / "d").exists()  # scanning decodes and caches nothing
    s = images_of(spec, tmp_path)
    assert [r.name for r in catalog.records] == s.names and catalog.splits == s.splits
    assert [r.label for r in catalog.records] == s.labels.tolist() and catalog.classes == s.classes
    one_by_one = np.stack([data.decode_image(r.read()) for r in catalog.records]).transpose(0, 3, 1, 2)
    assert torch.equal(torch.from_numpy(one_by_one), s.images)


# --- bounded, honest reading: bit depth and transparency ------------------------------------------------------


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_16_bit_gradient_is_scaled_to_0_255() -> None:
    exact = np.repeat((np.arange(256, dtype=np.uint16) * 257)[None], 4, axis=0)  # 0, 257, ..., 65535
    img = Image.fromarray(exact)
    raw = png_bytes(img)
    assert Image.open(io.BytesIO(raw)).mode in ("I;16", "I")  # a 16-bit greyscale PNG, as PIL reads it
    out = data.decode_image(raw)
    assert out.shape == (4, 256, 3) and out.dtype == np.uint8
    assert np.array_equal(out[0, :, 0], np.arange(256)) and np.array_equal(out[..., 0], out[..., 2])
    # a full-range gradient: round(v * 255 / 65535), every level present, mean at mid-grey
    full = np.linspace(0, 65535, 1024).round().astype(np.uint16)[None].repeat(2, axis=0)
    out = data.decode_image(png_bytes(Image.fromarray(full)))
    assert np.array_equal(out[0, :, 1], np.round(full[0].astype(np.int64) * 255 / 65535).astype(np.uint8))
    assert len(np.unique(out)) == 256 and abs(out.mean() - 127.5) < 0.5


def test_16_bit_images_load_through_the_pipeline(tmp_path: Path) -> None:
    folder = tmp_path / "deep"
    folder.mkdir()
    for v in (0, 100, 255):
        Image.fromarray(np.full((8, 8), v * 257, dtype=np.uint16)).save(folder / f"{v:03d}.png")
    s = images_of(folder, tmp_path)
    assert s.images[:, :, 0, 0].tolist() == [[0] * 3, [100] * 3, [255] * 3]


def test_transparency_is_composited_over_white() -> None:
    rgba = np.array([[[200, 10, 10, 0], [10, 20, 30, 255], [0, 0, 0, 128], [100, 200, 50, 51]]], dtype=np.uint8)
    out = data.decode_image(png_bytes(Image.fromarray(rgba, "RGBA")))
    expected = (rgba[..., :3].astype(int) * rgba[..., 3:] + 255 * (255 - rgba[..., 3:].astype(int)) + 127) // 255
    assert np.array_equal(out, expected)
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [10, 20, 30]  # hidden colour never shows
    la = Image.fromarray(np.array([[[0, 0], [0, 255], [90, 128]]], dtype=np.uint8), "LA")
    assert data.decode_image(png_bytes(la))[0, :, 0].tolist() == [255, 0, (90 * 128 + 255 * 127 + 127) // 255]
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0  # palette index 0 (red) is transparent
    assert data.decode_image(png_bytes(pal))[0].tolist() == [[255, 255, 255], [0, 0, 255]]


# --- bounded, honest reading: sizes --------------------------------------------------------------------------


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but holds only a few bytes of data: what a
    decompression bomb looks like from its header, at no cost to make."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_too_many_pixels_refused_from_the_header_without_pil_warnings(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    (root / "train" / "cat" / "bomb.png").write_bytes(huge_png_header(20000, 5000))
    limit_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        msg = load_error(root, tmp_path)
    assert "train/cat/bomb.png" in msg and "20000x5000 = 100,000,000 pixels" in msg and "89,478,485" in msg
    assert not caught and Image.MAX_IMAGE_PIXELS == limit_before  # no PIL warning; its setting restored
    with pytest.raises(DataError, match="2,000,000,000 pixels"):  # above twice PIL's limit: still our line
        data.decode_image(huge_png_header(40000, 50000))


def test_file_over_the_size_cap_is_refused_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data.sources, "MAX_FILE_BYTES", 10_000)
    root = make_tree(tmp_path / "tree")
    (root / "train" / "cat" / "big.png").write_bytes(png_bytes(Image.new("RGB", (8, 8))) + b"\0" * 20_000)
    msg = load_error(root, tmp_path)
    assert "train/cat/big.png" in msg and "20,0" in msg and "10,000" in msg


def lying_zip(path: Path, member: str, claimed: int) -> Path:
    """A zip holding a small image whose central-directory entry claims ``claimed`` unpacked bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("t/train/cat/0000.png", png_bytes(Image.new("RGB", (8, 8))))
        zf.writestr("t/test/cat/0000.png", png_bytes(Image.new("RGB", (8, 8))))
        zf.writestr(member, png_bytes(Image.new("RGB", (8, 8))))
    raw = bytearray(path.read_bytes())
    entry = raw.index(b"PK\x01\x02" + raw[raw.rindex(b"PK\x01\x02") + 4: raw.rindex(b"PK\x01\x02") + 8],
                      raw.rindex(b"PK\x01\x02"))
    struct.pack_into("<I", raw, entry + 24, claimed)  # uncompressed size of the last member
    path.write_bytes(bytes(raw))
    return path


def test_archive_member_refused_by_its_header_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a member over the cap was opened")

    # zip: 1 GiB claimed in the header (a bomb as the header shows it), never opened
    path = lying_zip(tmp_path / "bomb.zip", "t/train/cat/bomb.png", 2**30)
    with monkeypatch.context() as m:
        real_open = zipfile.ZipFile.open
        m.setattr(zipfile.ZipFile, "open",
                  lambda self, info, *a, **k: never() if "bomb" in str(getattr(info, "filename", info))
                  else real_open(self, info, *a, **k))
        msg = load_error(path, tmp_path)
    assert "t/train/cat/bomb.png" in msg and "1,073,741,824 bytes" in msg and "bomb.zip" in msg
    # tar: a header promising 1 GiB, with no data behind it: refused before tarfile is asked for any of it
    tar = tmp_path / "bomb.tar"
    with tarfile.open(tar, "w") as tf:
        info = tarfile.TarInfo("t/train/cat/bomb.png")
        info.size = 2**30
        tf.fileobj.write(info.tobuf(tf.format, tf.encoding, tf.errors))  # the header only, no data
    msg = load_error(tar, tmp_path)
    assert "t/train/cat/bomb.png" in msg and "1,073,741,824 bytes" in msg and "\n" not in msg


def test_archive_bytes_bounded_by_the_memory_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = archive(make_tree(tmp_path / "tree"), tmp_path / "t.tar.gz")
    total = sum(p.stat().st_size for p in (tmp_path / "tree").rglob("*.png"))
    monkeypatch.setattr(data.sources, "memory_available", lambda: total)  # half of it is less than the images
    msg = load_error(path, tmp_path)
    assert "t.tar.gz" in msg and "half the memory available" in msg and "extract it" in msg
    monkeypatch.setattr(data.sources, "memory_available", lambda: 2 * total)
    check_tree_data(*load_data(str(path), data_dir=str(tmp_path / "d"), progress=False))


def test_memory_check_reads_the_first_images_size_from_its_header(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A first image whose header is whole but whose pixels are cut off still sizes the memory check: the source
    that cannot fit is refused as such, before any decoding."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (folder / "a.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])  # the header, half the scan
    for i in range(3):
        (folder / f"b{i}.jpg").write_bytes(buf.getvalue())
    monkeypatch.setattr(data.load, "memory_available", lambda: 4 * 3 * 64 * 48 - 1)
    with pytest.raises(data.load.TooBigForMemory, match="64x48 px"):
        load_images(str(folder), data_dir=str(tmp_path / "d"), progress=False)


# --- bounded, honest reading: only regular files -------------------------------------------------------------


@pytest.fixture
def no_hang() -> object:
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def timeout(*_: object) -> None:
        raise AssertionError("hung reading a data folder")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(300)  # a ceiling: reading the small tree takes well under a second on an idle machine
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX file types")
def test_non_regular_entries_are_skipped_with_a_count(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      no_hang: object) -> None:
    root = make_tree(tmp_path / "tree")
    cat = root / "train" / "cat"
    os.mkfifo(cat / "fifo.png")
    (cat / "gone.png").symlink_to(tmp_path / "nowhere.png")  # leads nowhere
    (cat / "link.png").symlink_to(cat / "0000.png")  # a link to a regular file is read as that file
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(cat / "sock.png"))
    try:
        train, test = load_data(str(root), data_dir=str(tmp_path / "d"), progress=False)
    finally:
        sock.close()
    assert len(train) == 13 and len(test) == 6
    note = capsys.readouterr().err.strip()
    assert note.startswith("note: skipped 3 entries of") and "not a regular file" in note and "\n" not in note


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX file types")
def test_a_fifo_swapped_in_after_the_scan_is_refused_not_waited_on(tmp_path: Path, no_hang: object) -> None:
    os.mkfifo(tmp_path / "x.png")
    with pytest.raises(DataError, match="x.png: not a regular file"):
        data.ImageRecord("x.png", None, str(tmp_path / "x.png")).read()


def test_unreadable_image_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_tree(tmp_path / "tree")
    locked = str(root / "test" / "dog" / "0001.png")
    # chmod cannot lock out root (the CI user here), so os.access is told what a user without permission sees
    real_access = os.access
    monkeypatch.setattr(data.sources.os, "access", lambda p, mode: p != locked and real_access(p, mode))
    msg = load_error(root, tmp_path)
    assert "test/dog/0001.png" in msg and "permission denied" in msg


def test_archive_links_and_devices_are_skipped_with_a_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    path = archive(make_tree(tmp_path / "tree"), tmp_path / "t.tar", wrap="t")
    with tarfile.open(path, "a") as tf:
        for name, kind in (("t/train/cat/fifo.png", tarfile.FIFOTYPE), ("t/train/cat/dev.png", tarfile.CHRTYPE),
                           ("t/train/cat/hard.png", tarfile.LNKTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "t/train/cat/0000.png"
            tf.addfile(info)
    assert len(load_data(str(path), data_dir=str(tmp_path / "d"), progress=False)[0]) == 12
    assert "skipped 3 entries" in capsys.readouterr().err
    # a zip entry made from a symlink holds the link's target as its "contents": skipped, never decoded
    z = archive(make_tree(tmp_path / "tree2"), tmp_path / "t.zip", wrap="t")
    with zipfile.ZipFile(z, "a") as zf:
        info = zipfile.ZipInfo("t/train/cat/link.png")
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    assert len(load_data(str(z), data_dir=str(tmp_path / "d"), progress=False)[0]) == 12
    assert "skipped 1 entry" in capsys.readouterr().err


# --- the cache under a full disk, and after a kill ---------------------------------------------------------------


def test_full_disk_while_caching_loads_without_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    root = make_tree(tmp_path / "tree")
    saved: list[str] = []
    real_save = np.save

    def full(file: Path, array: np.ndarray) -> None:
        if saved:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        saved.append(str(file))
        real_save(file, array)  # the first array fits, the second finds the disk full

    monkeypatch.setattr(data.cache.np, "save", full)
    check_tree_data(*load_data(str(root), data_dir=str(tmp_path / "d"), progress=False))
    note = capsys.readouterr().err.strip()
    assert "not cached" in note and os.strerror(errno.ENOSPC) in note and "\n" not in note
    assert list((tmp_path / "d" / "cache").iterdir()) == []  # the half-written temp folder is gone
    # a read-only data dir, as the OS reports it
    monkeypatch.setattr(data.cache.tempfile, "mkdtemp",
                        lambda **_: (_ for _ in ()).throw(OSError(errno.EROFS, os.strerror(errno.EROFS))))
    check_tree_data(*load_data(str(root), data_dir=str(tmp_path / "d"), progress=False))
    assert os.strerror(errno.EROFS) in capsys.readouterr().err


KILL_WHILE_CACHING = """
import os, signal, sys
import numpy as np
import empssl.data.cache as cache

real_save = np.save
def save_then_die(file, array):
    real_save(file, array)
    os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write: one array saved, no meta.json, no rename
cache.np.save = save_then_die
from empssl.data import load_data
load_data(sys.argv[1], data_dir=sys.argv[2], progress=False)
"""


def test_temp_folder_of_a_killed_process_is_removed_at_the_next_load(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    d = tmp_path / "d"
    proc = subprocess.run([sys.executable, "-c", KILL_WHILE_CACHING, str(root), str(d)], env=os.environ.copy())
    assert proc.returncode == -signal.SIGKILL
    (left,) = (d / "cache").iterdir()
    assert left.name.startswith(".tree-") and left.name.endswith(".tmp") and not (left / "meta.json").exists()
    # a temp folder of a process that still runs (this one) is not touched
    alive = d / "cache" / f".tree-0123456789abcdef.{data.cache._host()}.{os.getpid()}.x1y2.tmp"
    alive.mkdir()
    check_tree_data(*load_data(str(root), data_dir=str(d), progress=False))
    names = sorted(p.name for p in (d / "cache").iterdir())
    assert left.name not in names and alive.name in names and len(names) == 2
    (cache,) = [p for p in (d / "cache").iterdir() if not p.name.startswith(".")]
    assert (cache / "meta.json").is_file()


CTRL_C_WHILE_DECODING = """
import os, signal, sys, time
import empssl.data.decode as dec
from empssl.data import load_data


dec.POOL_MIN_IMAGES, dec.pool_workers = 1, lambda: 2
real, parent, once = dec.decode_image, os.getpid(), sys.argv[1] + ".interrupted"
def slow(*args):
    if os.getpid() != parent:  # a pool worker decodes: Ctrl-C now (once), however fast or busy the machine is
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL))
            os.killpg(os.getpgid(0), signal.SIGINT)  # the whole process group, the pool's workers included
        except FileExistsError:
            pass
    time.sleep(0.2)  # 16 images: the load cannot end before the interrupt is handled
    return real(*args)
dec.decode_image = slow
try:
    load_data(sys.argv[1], data_dir=sys.argv[2], progress=False)
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
print("finished")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the pool forks on Linux")
def test_ctrl_c_while_the_pool_decodes_stops_the_load(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree", n_train=8, n_test=8)
    proc = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_DECODING, str(root), str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=600, start_new_session=True,
                          preexec_fn=default_sigint)
    assert proc.returncode == 130 and proc.stdout == "", proc.stderr
    assert proc.stderr.strip() == "interrupted"  # no traceback from any worker


def test_the_decode_pool_takes_this_rank_s_share_of_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from empssl.data import decode

    monkeypatch.setattr(decode, "usable_cpus", lambda: 6)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert decode.pool_workers() == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: two ranks on this node share its CPUs
    assert decode.pool_workers() == 3
