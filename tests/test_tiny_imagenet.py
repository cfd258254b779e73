"""Tiny ImageNet read as distributed, on a small copy of its layout built here (3 classes of 64x64 JPEGs)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from empssl import data
from empssl.config import ARCH_NAMES, Config, load_preset
from empssl.data import DataError, load_data, load_images

from .test_data import archive

WNIDS = ["n03", "n01", "n02"]  # wnids.txt order; the classes must come out sorted
SORTED = sorted(WNIDS)
WORDS = {"n01": "goldfish, Carassius auratus", "n02": "tabby, tabby cat", "n03": "school bus",
         "n99": "not in this copy"}
N_TRAIN = 3
# val file -> wnid, deliberately not grouped by class
VAL = {"val_0.JPEG": "n02", "val_1.JPEG": "n03", "val_2.JPEG": "n01", "val_3.JPEG": "n02", "val_4.JPEG": "n01",
       "val_5.JPEG": "n03"}


def grey(wnid: str, index: int, split: str) -> int:
    """The flat grey level of an image, so that it can be recognised after (lossy) JPEG decoding."""
    return 30 + 60 * SORTED.index(wnid) + 12 * index + (6 if split == "val" else 0)


def jpeg(path: Path, value: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (64, 64), value if mode == "L" else (value,) * 3).save(path, "JPEG", quality=95)


def make_tiny(root: Path) -> Path:
    """root/tiny-imagenet-200/ as distributed: wnids.txt, words.txt, train/<wnid>/images + boxes, val/images +
    val_annotations.txt, test/images. Returns the tiny-imagenet-200 folder."""
    top = root / "tiny-imagenet-200"
    top.mkdir(parents=True)
    (top / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (top / "words.txt").write_text("".join(f"{w}\t{name}\n" for w, name in WORDS.items()))
    for wnid in WNIDS:
        for i in range(N_TRAIN):
            # Tiny ImageNet has some one-channel JPEGs; they must come out as three equal channels
            jpeg(top / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", grey(wnid, i, "train"),
                 "L" if (wnid, i) == ("n02", 1) else "RGB")
        (top / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(f"{wnid}_{i}.JPEG\t0\t0\t10\t10\n"
                                                                        for i in range(N_TRAIN)))
    lines = []
    for file, wnid in VAL.items():
        index = sorted(f for f, w in VAL.items() if w == wnid).index(file)
        jpeg(top / "val" / "images" / file, grey(wnid, index, "val"))
        lines.append(f"{file}\t{wnid}\t0\t0\t63\t63\n")
    (top / "val" / "val_annotations.txt").write_text("".join(lines))
    for k in range(2):
        jpeg(top / "test" / "images" / f"test_{k}.JPEG", 250)
    return top


def expected_val() -> list[tuple[str, str]]:
    """(file, wnid) of val in the loaded order: grouped by sorted class, sorted by file name within."""
    return sorted(VAL.items(), key=lambda fw: (SORTED.index(fw[1]), fw[0]))


def check_tiny(train: data.ImageData, val: data.ImageData) -> None:
    for ds in (train, val):
        assert ds.classes == SORTED
        assert ds.class_names == [WORDS[w] for w in SORTED]
        assert ds.images.shape[1:] == (3, 64, 64) and ds.images.dtype == torch.uint8
    assert len(train) == 3 * N_TRAIN and train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    want = [grey(w, i, "train") for w in SORTED for i in range(N_TRAIN)]
    assert (train.images[:, :, 32, 32].int() - torch.tensor(want)[:, None]).abs().max() <= 2
    assert torch.equal(train.images[:, 0], train.images[:, 2])  # grey JPEGs (and the one-channel one)
    # val labels come from val_annotations.txt, not from any folder
    order = expected_val()
    assert val.labels.tolist() == [SORTED.index(w) for _, w in order]
    index = {f: sorted(g for g, w in VAL.items() if w == VAL[f]).index(f) for f in VAL}
    want_val = [grey(w, index[f], "val") for f, w in order]
    assert (val.images[:, :, 32, 32].int() - torch.tensor(want_val)[:, None]).abs().max() <= 2


# --- load_data ----------------------------------------------------------------------------------------


def test_folder_loads_train_and_val_with_sorted_wnids(tmp_path: Path) -> None:
    top = make_tiny(tmp_path / "src")
    train, val = load_data(str(top), data_dir=str(tmp_path / "d"), progress=False)
    check_tiny(train, val)


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_archive_equals_folder(tmp_path: Path, suffix: str) -> None:
    top = make_tiny(tmp_path / "src")
    # as distributed: every member under tiny-imagenet-200/
    path = archive(top, tmp_path / f"tiny-imagenet-200{suffix}", wrap="tiny-imagenet-200")
    from_folder = load_data(str(top), data_dir=str(tmp_path / "d"), progress=False)
    from_archive = load_data(str(path), data_dir=str(tmp_path / "d"), progress=False)
    check_tiny(*from_archive)
    for a, b in zip(from_folder, from_archive, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert a.classes == b.classes and a.class_names == b.class_names


def test_folder_wrapping_the_dataset_is_found(tmp_path: Path) -> None:
    make_tiny(tmp_path / "src")  # src/tiny-imagenet-200/...
    check_tiny(*load_data(str(tmp_path / "src"), data_dir=str(tmp_path / "d"), progress=False))


def test_test_split_and_boxes_are_not_read(tmp_path: Path) -> None:
    top = make_tiny(tmp_path / "src")
    (top / "test" / "images" / "test_0.JPEG").write_bytes(b"never decoded")
    (top / "train" / "n01" / "n01_boxes.txt").write_text("garbage\n")
    check_tiny(*load_data(str(top), data_dir=str(tmp_path / "d"), progress=False))


def test_without_words_txt_there_are_no_class_names(tmp_path: Path) -> None:
    top = make_tiny(tmp_path / "src")
    (top / "words.txt").unlink()
    train, val = load_data(str(top), data_dir=str(tmp_path / "d"), progress=False)
    assert train.classes == SORTED and train.class_names is None and val.class_names is None


def test_val_rearranged_into_class_folders(tmp_path: Path) -> None:
    """Many copies were rearranged into val/<wnid>/images/ by a script; that is read as class folders."""
    top = make_tiny(tmp_path / "src")
    for file, wnid in VAL.items():
        (top / "val" / wnid / "images").mkdir(parents=True, exist_ok=True)
        shutil.move(top / "val" / "images" / file, top / "val" / wnid / "images" / file)
    (top / "val" / "images").rmdir()
    _, val = load_data(str(top), data_dir=str(tmp_path / "d"), progress=False)
    assert val.labels.tolist() == [0, 0, 1, 1, 2, 2] and val.class_names == [WORDS[w] for w in SORTED]


def test_second_load_uses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    top = make_tiny(tmp_path / "src")
    first = load_data(str(top), data_dir=str(tmp_path / "d"), progress=False)
    set_before = load_images(str(top), data_dir=str(tmp_path / "d"), progress=False)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(data.decode, "decode_catalog", fail)
    second = load_data(str(top), data_dir=str(tmp_path / "d"), progress=False)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.images, b.images) and a.classes == b.classes and a.class_names == b.class_names
    again = load_images(str(top), data_dir=str(tmp_path / "d"), progress=False)
    assert again.names == set_before.names and torch.equal(again.images, set_before.images)
    # the labels live in val_annotations.txt: editing it must not reuse the cache
    text = (top / "val" / "val_annotations.txt").read_text()
    (top / "val" / "val_annotations.txt").write_text(text.replace("val_0.JPEG\tn02", "val_0.JPEG\tn03"))
    with pytest.raises(AssertionError, match="decoded again"):
        load_data(str(top), data_dir=str(tmp_path / "d"), progress=False)


# --- the tiny-imagenet dataset name and the preset ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["zip", "folder"])
def test_dataset_name_looks_in_data_dir(tmp_path: Path, kind: str) -> None:
    top = make_tiny(tmp_path / "src")
    d = tmp_path / "d"
    d.mkdir()
    if kind == "zip":
        archive(top, d / "tiny-imagenet-200.zip", wrap="tiny-imagenet-200")
    else:
        shutil.copytree(top, d / "tiny-imagenet-200")
    check_tiny(*load_data("tiny-imagenet", data_dir=str(d), progress=False))


def test_dataset_name_missing_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_data("tiny-imagenet", data_dir=str(tmp_path / "empty"), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "empty") in msg and "tiny-imagenet-200.zip" in msg and "http" in msg


def test_preset_is_valid_and_names_the_dataset() -> None:
    preset = load_preset("tiny-imagenet")
    cfg = Config.from_dict(preset).validate()
    assert cfg.data == "tiny-imagenet" and cfg.arch in ARCH_NAMES
    assert cfg.crop_scale == (0.25, 0.25) and cfg.test_patches == 128 and cfg.batch_size == 100


# --- load_images ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_load_images_gives_train_then_val_with_names(tmp_path: Path, kind: str) -> None:
    top = make_tiny(tmp_path / "src")
    spec = top if kind == "folder" else archive(top, tmp_path / "t.zip", wrap="tiny-imagenet-200")
    s = load_images(str(spec), data_dir=str(tmp_path / "d"), progress=False)
    train_names = [f"train/{w}/images/{w}_{i}.JPEG" for w in SORTED for i in range(N_TRAIN)]
    assert s.names == train_names + [f"val/images/{f}" for f, _ in expected_val()]
    assert s.splits == [("train", 9), ("val", 6)] and s.classes == SORTED
    assert s.class_names == [WORDS[w] for w in SORTED]
    train, val = load_data(str(top), data_dir=str(tmp_path / "d2"), progress=False)
    assert torch.equal(s.images, torch.cat([train.images, val.images]))
    assert torch.equal(s.labels, torch.cat([train.labels, val.labels]))


# --- a broken layout: one line naming what is wrong ----------------------------------------------------------


def tiny_error(top: Path, tmp_path: Path) -> str:
    with pytest.raises(DataError) as e:
        load_data(str(top), data_dir=str(tmp_path / "d"), progress=False)
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def test_missing_val_annotations(tmp_path: Path) -> None:
    top = make_tiny(tmp_path / "src")
    (top / "val" / "val_annotations.txt").unlink()
    msg = tiny_error(top, tmp_path)
    assert "val_annotations.txt" in msg and str(top) in msg


def test_annotation_with_unknown_wnid(tmp_path: Path) -> None:
    top = make_tiny(tmp_path / "src")
    with open(top / "val" / "val_annotations.txt", "a") as f:
        f.write("val_0.JPEG\tn77\t0\t0\t1\t1\n")
    msg = tiny_error(top, tmp_path)
    assert "n77" in msg and "line 7" in msg


def test_annotation_naming_a_missing_file(tmp_path: Path) -> None:
    top = make_tiny(tmp_path / "src")
    (top / "val" / "images" / "val_4.JPEG").unlink()
    msg = tiny_error(top, tmp_path)
    assert "val_4.JPEG" in msg and "val/images/" in msg


def test_val_image_without_annotation(tmp_path: Path) -> None:
    top = make_tiny(tmp_path / "src")
    jpeg(top / "val" / "images" / "val_9.JPEG", 10)
    msg = tiny_error(top, tmp_path)
    assert "val/images/val_9.JPEG" in msg and "no line" in msg


def test_malformed_annotation_line(tmp_path: Path) -> None:
    top = make_tiny(tmp_path / "src")
    with open(top / "val" / "val_annotations.txt", "a") as f:
        f.write("just-a-name\n")
    assert "line 7" in tiny_error(top, tmp_path)


def test_wnid_without_train_folder(tmp_path: Path) -> None:
    top = make_tiny(tmp_path / "src")
    (top / "wnids.txt").write_text("\n".join([*WNIDS, "n04"]) + "\n")
    msg = tiny_error(top, tmp_path)
    assert "wnids.txt" in msg and "n04" in msg


def test_corrupt_jpeg_in_the_zip_names_the_member(tmp_path: Path) -> None:
    top = make_tiny(tmp_path / "src")
    (top / "train" / "n03" / "images" / "n03_2.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    path = archive(top, tmp_path / "t.zip", wrap="tiny-imagenet-200")
    msg = tiny_error(path, tmp_path)
    assert "tiny-imagenet-200/train/n03/images/n03_2.JPEG" in msg and "t.zip" in msg
    assert "BytesIO" not in msg and "0x" not in msg
