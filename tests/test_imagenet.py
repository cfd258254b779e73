"""ImageNet-100 and ImageNet-1k read from an ImageNet tree, on small copies of its layouts built here: every class
of the ImageNet-100 list (plus two that are not in it) with a couple of 16x16 JPEGs each, val/ flat with the
devkit's ground truth (folder or tarball) or Kaggle's LOC_val_solution.csv, or in class folders."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from empssl import cli, data
from empssl.config import Config, load_preset
from empssl.data import DataError, load_data, load_images, scan
from empssl.data.imagenet import imagenet100_classes

from .conftest import TINY

scipy_io = pytest.importorskip("scipy.io")

LIST = imagenet100_classes()
EXTRA = ["n01440764", "n01443537"]  # tench, goldfish: ImageNet-1k classes that are not in ImageNet-100
N_TRAIN = 2


def colour(wnid: str, everything: list[str]) -> tuple[int, int, int]:
    """The flat colour of every image of ``wnid``: recognisable after JPEG decoding (levels 40 apart)."""
    k = sorted(everything).index(wnid)
    return 20 + 40 * (k % 6), 20 + 40 * (k // 6 % 6), 20 + 40 * (k // 36)


def jpeg(value: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), value).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def val_number(j: int) -> int:
    """The ILSVRC2012_val_ number of the j-th val image: not consecutive, so the ground truth has lines for files
    that are not there (a subset of the 50,000 is labelled by the numbers in its names)."""
    return 3 * j + 2


def ilsvrc_id(wnid: str, everything: list[str]) -> int:
    """meta.mat's ILSVRC2012_ID for ``wnid``: a permutation, not the sorted order (as in the real devkit)."""
    k = sorted(everything).index(wnid)
    return (k * 37) % len(everything) + 1


def meta_mat(everything: list[str]) -> bytes:
    """meta.mat as the devkit has it: a struct array ``synsets`` with the leaves and one inner synset."""
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(ilsvrc_id(w, everything), w, f"words of {w}", "a gloss", 0, np.zeros(0), 0, N_TRAIN)
            for w in everything]
    rows.append((len(everything) + 1, "n00001740", "entity", "the root", 2, np.array([1, 2]), 19, 0))
    synsets = np.zeros((len(rows), 1), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        for f, v in zip(fields, row, strict=True):
            synsets[i, 0][f] = v
    buf = io.BytesIO()
    scipy_io.savemat(buf, {"synsets": synsets})
    return buf.getvalue()


def make_imagenet(top: Path, wnids: list[str], val: str = "devkit", kaggle: bool = False) -> Path:
    """An ImageNet tree under ``top``: train/<wnid>/<wnid>_<i>.JPEG and val/ as ``val`` says: "devkit" (flat,
    ILSVRC2012_devkit_t12/data/), "devkit-tar" (flat, the devkit tarball), "devkit-top" (flat, the two files in
    top), "csv" (flat, LOC_val_solution.csv + LOC_synset_mapping.txt) or "folders" (val/<wnid>/). ``kaggle``:
    the images under ILSVRC/Data/CLS-LOC/. One val image per class, in a scrambled number order."""
    images = top / "ILSVRC" / "Data" / "CLS-LOC" if kaggle else top
    for w in wnids:
        (images / "train" / w).mkdir(parents=True)
        for i in range(N_TRAIN):
            (images / "train" / w / f"{w}_{i}.JPEG").write_bytes(jpeg(colour(w, wnids)))
    scrambled = sorted(wnids, key=lambda w: (int(w[1:]) % 7, w))
    truth = {val_number(j): w for j, w in enumerate(scrambled)}
    (images / "val").mkdir(parents=True)
    for number, w in truth.items():
        folder = images / "val" / (w if val == "folders" else "")
        folder.mkdir(exist_ok=True)
        (folder / f"ILSVRC2012_val_{number:08d}.JPEG").write_bytes(jpeg(colour(w, wnids)))
    lines = [str(ilsvrc_id(truth.get(n, wnids[0]), wnids)) for n in range(1, max(truth) + 3)]
    gt, mat = ("\n".join(lines) + "\n").encode(), meta_mat(wnids)
    if val == "devkit":
        (top / "ILSVRC2012_devkit_t12" / "data").mkdir(parents=True)
        (top / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt").write_bytes(gt)
        (top / "ILSVRC2012_devkit_t12" / "data" / "meta.mat").write_bytes(mat)
    elif val == "devkit-top":
        (top / "ILSVRC2012_validation_ground_truth.txt").write_bytes(gt)
        (top / "meta.mat").write_bytes(mat)
    elif val == "devkit-tar":
        with tarfile.open(top / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tf:
            for name, payload in (("data/ILSVRC2012_validation_ground_truth.txt", gt), ("data/meta.mat", mat),
                                  ("readme.txt", b"devkit")):
                info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/{name}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    elif val == "csv":
        rows = [f"ILSVRC2012_val_{n:08d},{w} 1 2 14 15 {w} 0 0 8 8" for n, w in truth.items()]
        (top / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
        (top / "LOC_synset_mapping.txt").write_text("".join(f"{w} name of {w}, a thing\n" for w in wnids))
    return top


@pytest.fixture(scope="module")
def tree100(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 100 classes of the list and two more, val/ flat with the devkit folder (built once, never changed)."""
    return make_imagenet(tmp_path_factory.mktemp("in") / "imagenet", LIST + EXTRA)


def copy_of(tree: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tree, tmp_path / "imagenet"))


def check_colours(split: data.ImageData, wnids: list[str]) -> None:
    """Every image has the colour of the class its label names."""
    for image, label in zip(split.images, split.labels, strict=True):
        want = torch.tensor(colour(split.classes[int(label)], wnids), dtype=torch.float32)
        assert (image.float().mean(dim=(1, 2)) - want).abs().max() < 6


def one_line_error(spec: str, tmp_path: Path) -> str:
    with pytest.raises(DataError) as e:
        load_data(spec, data_dir=str(tmp_path / "d"), progress=False)
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


# --- the class list ------------------------------------------------------------------------------------------


def test_the_shipped_list_has_100_unique_wnids_and_names_its_source() -> None:
    assert len(LIST) == 100 and len(set(LIST)) == 100
    assert all(re.fullmatch(r"n\d{8}", w) for w in LIST)
    assert LIST[:3] == ["n02869837", "n01749939", "n02488291"] and LIST[-1] == "n02090622"  # CMC's order
    text = (Path(data.__file__).parent.parent / "assets" / "imagenet100_classes.txt").read_text()
    assert "HobbitLong/CMC" in text and "bc687a26de7ae350d98f671d25d164b65336b8c2" in text
    assert not set(EXTRA) & set(LIST)


# --- ImageNet-100 --------------------------------------------------------------------------------------------


def test_imagenet100_selects_the_100_classes_with_devkit_labels(tree100: Path, tmp_path: Path) -> None:
    train, val = load_data(f"imagenet100:{tree100}", data_dir=str(tmp_path / "d"), progress=False)
    assert train.classes == sorted(LIST) and val.classes == sorted(LIST)
    assert len(train) == 100 * N_TRAIN and len(val) == 100  # the two extra classes are left out of both
    assert train.labels.tolist() == [k for k in range(100) for _ in range(N_TRAIN)]
    assert val.labels.tolist() == list(range(100))  # grouped by class
    assert train.images.shape[1:] == (3, 16, 16)
    all_wnids = LIST + EXTRA
    check_colours(train, all_wnids)
    check_colours(val, all_wnids)
    assert train.class_names == [f"words of {w}" for w in sorted(LIST)]


def test_class_folder_val_gives_the_same_data(tree100: Path, tmp_path: Path) -> None:
    flat = load_data(f"imagenet100:{tree100}", data_dir=str(tmp_path / "d1"), progress=False)
    top = make_imagenet(tmp_path / "folders", LIST + EXTRA, val="folders")
    folders = load_data(f"imagenet100:{top}", data_dir=str(tmp_path / "d2"), progress=False)
    for a, b in zip(flat, folders, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.classes == b.classes
    assert folders[0].class_names is None  # no devkit, no LOC_synset_mapping.txt: no human-readable names
    # Caffe's synset_words.txt names the classes (and, being read, keys the cache: no stale names)
    (top / "synset_words.txt").write_text("".join(f"{w} caffe name of {w}\n" for w in LIST))
    named = load_data(f"imagenet100:{top}", data_dir=str(tmp_path / "d2"), progress=False)
    assert named[1].class_names == [f"caffe name of {w}" for w in sorted(LIST)]


@pytest.mark.parametrize("val", ["devkit-tar", "devkit-top", "csv"])
def test_every_ground_truth_source_labels_alike(tree100: Path, tmp_path: Path, val: str) -> None:
    want = load_data(f"imagenet100:{tree100}", data_dir=str(tmp_path / "d1"), progress=False)
    top = make_imagenet(tmp_path / val, LIST + EXTRA, val=val, kaggle=val == "csv")
    got = load_data(f"imagenet100:{top}", data_dir=str(tmp_path / "d2"), progress=False)
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.classes == b.classes
    names = {"csv": [f"name of {w}, a thing" for w in sorted(LIST)]}.get(val, [f"words of {w}" for w in sorted(LIST)])
    assert got[0].class_names == names


def test_scan_and_load_images_name_the_real_files(tree100: Path, tmp_path: Path) -> None:
    catalog = scan(f"imagenet100:{tree100}", data_dir=str(tmp_path / "d"))
    assert catalog.splits == [("train", 200), ("val", 100)] and catalog.classes == sorted(LIST)
    assert catalog.records[0].name == f"train/{sorted(LIST)[0]}/{sorted(LIST)[0]}_0.JPEG"
    assert all(re.fullmatch(r"val/ILSVRC2012_val_\d{8}\.JPEG", r.name) for r in catalog.records[200:])
    assert catalog.records[200].read() == (tree100 / catalog.records[200].name).read_bytes()
    s = load_images(f"imagenet100:{tree100}", data_dir=str(tmp_path / "d"), progress=False)
    assert s.names == [r.name for r in catalog.records] and s.splits == catalog.splits
    assert s.labels is not None and s.labels.tolist() == [r.label for r in catalog.records]
    kaggle = make_imagenet(tmp_path / "k", LIST + EXTRA, val="csv", kaggle=True)
    first = scan(f"imagenet100:{kaggle}", data_dir=str(tmp_path / "d")).where(0)
    assert first == f"ILSVRC/Data/CLS-LOC/train/{sorted(LIST)[0]}/{sorted(LIST)[0]}_0.JPEG in {kaggle}"


def test_second_load_uses_the_cache_and_imagenet_keeps_its_own(tree100: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    d = str(tmp_path / "d")
    first = load_data(f"imagenet100:{tree100}", data_dir=d, progress=False)
    everything = load_data(f"imagenet:{tree100}", data_dir=d, progress=False)
    assert len(everything[0].classes) == 102 and len(everything[1]) == 102

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(data.decode, "decode_catalog", fail)
    again = load_data(f"imagenet100:{tree100}", data_dir=d, progress=False)
    assert torch.equal(again[0].images, first[0].images) and again[1].classes == sorted(LIST)
    assert load_data(f"imagenet:{tree100}", data_dir=d, progress=False)[0].classes == sorted(LIST + EXTRA)


def test_bare_name_reads_data_dir_imagenet(tree100: Path, tmp_path: Path) -> None:
    shutil.copytree(tree100, tmp_path / "d" / "imagenet")
    train, _ = load_data("imagenet100", data_dir=str(tmp_path / "d"), progress=False)
    assert train.classes == sorted(LIST)


# --- ImageNet-1k on a few classes ------------------------------------------------------------------------------


@pytest.mark.parametrize("val", ["devkit", "csv", "folders"])
def test_imagenet_reads_every_class_folder(tmp_path: Path, val: str) -> None:
    wnids = ["n02119789", "n01440764", "n04592741"]  # kit fox, tench, wing
    top = make_imagenet(tmp_path / "in", wnids, val=val)
    train, test = load_data(f"imagenet:{top}", data_dir=str(tmp_path / "d"), progress=False)
    assert train.classes == sorted(wnids) and test.labels.tolist() == [0, 1, 2]
    check_colours(train, wnids)
    check_colours(test, wnids)


# --- mistakes: one line each ---------------------------------------------------------------------------------


def test_a_missing_class_folder_is_named(tree100: Path, tmp_path: Path) -> None:
    top = copy_of(tree100, tmp_path)
    shutil.rmtree(top / "train" / LIST[7])
    msg = one_line_error(f"imagenet100:{top}", tmp_path)
    assert "1 of the 100" in msg and LIST[7] in msg and "imagenet100_classes.txt" in msg


def test_a_class_folder_val_missing_a_class_is_named(tmp_path: Path) -> None:
    top = make_imagenet(tmp_path / "in", LIST, val="folders")
    shutil.rmtree(top / "val" / LIST[3])
    msg = one_line_error(f"imagenet100:{top}", tmp_path)
    assert LIST[3] in msg and "val/" in msg


def test_flat_val_without_ground_truth(tree100: Path, tmp_path: Path) -> None:
    top = copy_of(tree100, tmp_path)
    shutil.rmtree(top / "ILSVRC2012_devkit_t12")
    msg = one_line_error(f"imagenet100:{top}", tmp_path)
    assert "no ground truth" in msg and "LOC_val_solution.csv" in msg and "val/<wnid>/" in msg


def test_ground_truth_without_meta_mat(tree100: Path, tmp_path: Path) -> None:
    top = copy_of(tree100, tmp_path)
    (top / "ILSVRC2012_devkit_t12" / "data" / "meta.mat").unlink()
    assert "needs the devkit's meta.mat" in one_line_error(f"imagenet100:{top}", tmp_path)


def test_val_image_the_ground_truth_does_not_cover(tree100: Path, tmp_path: Path) -> None:
    top = copy_of(tree100, tmp_path)
    (top / "val" / "ILSVRC2012_val_09999999.JPEG").write_bytes(jpeg((0, 0, 0)))
    msg = one_line_error(f"imagenet100:{top}", tmp_path)
    assert "1 image(s)" in msg and "ILSVRC2012_val_09999999.JPEG" in msg
    (top / "val" / "ILSVRC2012_val_09999999.JPEG").rename(top / "val" / "holiday.JPEG")
    assert "is not named ILSVRC2012_val_" in one_line_error(f"imagenet100:{top}", tmp_path)


def test_class_lists_that_differ_between_train_and_val(tmp_path: Path) -> None:
    wnids = ["n02119789", "n01440764", "n04592741"]
    top = make_imagenet(tmp_path / "in", wnids, val="csv")
    shutil.rmtree(top / "train" / "n04592741")  # val's ground truth still names it
    msg = one_line_error(f"imagenet:{top}", tmp_path)
    assert "different classes" in msg and "only in val: n04592741" in msg
    # ImageNet-100: a selected class with no val image
    top = make_imagenet(tmp_path / "in100", LIST, val="csv")
    (top / "val" / "ILSVRC2012_val_00000002.JPEG").unlink()
    assert "different classes" in one_line_error(f"imagenet100:{top}", tmp_path)


def test_val_with_images_and_class_folders(tree100: Path, tmp_path: Path) -> None:
    top = copy_of(tree100, tmp_path)
    (top / "val" / LIST[0]).mkdir()
    assert "both images and class folders" in one_line_error(f"imagenet100:{top}", tmp_path)


@pytest.mark.parametrize("spec, needle", [
    ("imagenet100:", "give the ImageNet folder"),
    ("imagenet100:{tmp}/nowhere", "ImageNet folder not found"),
    ("imagenet", "--data-dir/imagenet"),
    ("imagenet:{tmp}/file.tar", "is not a folder"),
    ("imagenet:{tmp}", "no train/ folder"),
])
def test_bad_specs(tmp_path: Path, spec: str, needle: str) -> None:
    (tmp_path / "file.tar").write_bytes(b"")
    assert needle in one_line_error(spec.format(tmp=tmp_path), tmp_path)


def test_cli_says_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["train", "--data", f"imagenet100:{tmp_path}/nowhere", "--out", str(tmp_path / "run"),
                     "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "ImageNet folder not found" in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# --- the in-memory tier refuses what it cannot hold -----------------------------------------------------------


def test_too_big_for_memory_is_refused_before_decoding(tree100: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoding started")

    monkeypatch.setattr(data.decode, "decode_catalog", fail)
    # at their own size (the first image's): 300 images x 3 x 16 x 16 = 230,400 bytes
    monkeypatch.setattr(data.load, "memory_available", lambda: 200_000)
    msg = one_line_error(f"imagenet100:{tree100}", tmp_path)
    assert "16x16 px" in msg and "300 images" in msg and "--data-mode stream" in msg
    # 300 images x 3 x 224 x 224 = 45 MB
    monkeypatch.setattr(data.load, "memory_available", lambda: 40 * 10**6)
    with pytest.raises(DataError, match=r"at 224x224 px is 43\.1 MiB \(300 images\).*--data-mode stream"):
        load_images(f"imagenet100:{tree100}", data_dir=str(tmp_path / "d"), image_size=224, progress=False)
    assert not (tmp_path / "d" / "cache").exists() or not any((tmp_path / "d" / "cache").iterdir())
    # the scan does not decode: it works whatever the memory
    assert len(scan(f"imagenet100:{tree100}", data_dir=str(tmp_path / "d")).records) == 300


# --- the presets ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, patches", [("imagenet100", 20), ("imagenet100-200patches", 200)])
def test_presets_state_the_official_recipe(name: str, patches: int) -> None:
    cfg = Config.from_dict(load_preset(name)).validate()
    assert cfg.data == "imagenet100" and cfg.arch == "resnet18-imagenet" and cfg.patch_size == 224
    assert cfg.crop_scale == (0.25, 0.25) and cfg.num_patches == patches and cfg.batch_size == 100
    assert cfg.lr == 0.3 and cfg.test_patches == 128 and cfg.image_size > 0


# --- a real run ------------------------------------------------------------------------------------------------


def test_train_and_evaluate_on_imagenet100(tree100: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = cli.main(["train", "--data", f"imagenet100:{tree100}", "--data-dir", str(tmp_path / "d"), "--out", str(out),
                     *TINY, "--arch", "resnet18-cifar", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert (results["n_train"], results["n_test"], results["num_classes"]) == (200, 100, 100)
    assert results["steps"] == 200 // 20 and 0 <= results["knn_top1"] <= 100 and 0 <= results["linear_top1"] <= 100
