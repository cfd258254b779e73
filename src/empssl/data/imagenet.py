"""ImageNet-1k and ImageNet-100 read from an extracted ImageNet train/val tree: ``--data imagenet100:PATH`` and
``--data imagenet:PATH`` (``imagenet100`` / ``imagenet`` alone: ``--data-dir/imagenet``).

``imagenet100`` reads only the folders of CMC's 100 classes (``empssl/assets/imagenet100_classes.txt``, with its
source), the subset solo-learn and the EMP-SSL paper use; ``imagenet`` every class folder of ``train/``. Classes
are the sorted wnids (torchvision's ``ImageFolder`` order). The tree (extract the tarballs, or let torchvision's
``ImageNet`` do it once) is ``PATH/train/<wnid>/*.JPEG`` and ``PATH/val/`` (torchvision's root, ``valprep.sh``
trees), or Kaggle's ``PATH/ILSVRC/Data/CLS-LOC/{train,val}/``. ``val/`` is class folders ``val/<wnid>/*.JPEG``,
or flat ``val/*.JPEG`` labelled by the first of:

1. ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the label is the first wnid of the string), in PATH
   (for Kaggle's tree also in ``ILSVRC/`` or beside ``train/``);
2. the ILSVRC2012 devkit: ``data/ILSVRC2012_validation_ground_truth.txt`` (line i: the 1-based ILSVRC2012_ID of
   ``ILSVRC2012_val_<i, 8 digits>.JPEG``) mapped to wnids by ``data/meta.mat`` (its ``synsets``: ILSVRC2012_ID ->
   WNID, the 1,000 leaves), read from ``PATH/ILSVRC2012_devkit_t12/``, from the two files directly in PATH, or
   from inside ``PATH/ILSVRC2012_devkit_t12.tar.gz``. torchvision pairs the lines with the sorted file list; here a
   file is paired with the line its number names: the same for all 50,000, and still right for a subset. Reading
   meta.mat needs scipy.

Class names come from meta.mat's ``words``, or ``LOC_synset_mapping.txt`` / Caffe's ``synset_words.txt``
(``<wnid> <words>`` per line).
"""

from __future__ import annotations

import csv
import io
import re
import tarfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .images import DataError
from .layouts import Catalog, _catalog, _read_text, _scan_classes, _Split
from .sources import MAX_FILE_BYTES, Tree, _members, is_image, read_file, walk_folder

IMAGENET_SPECS = ("imagenet100", "imagenet")
KAGGLE_ROOT = "ILSVRC/Data/CLS-LOC/"
DEVKIT = "ILSVRC2012_devkit_t12"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
LOC_SOLUTION = "LOC_val_solution.csv"
# "<wnid> <words>" per line: Kaggle's file, and the same format as Caffe's synset_words.txt
SYNSET_NAMES = ("LOC_synset_mapping.txt", "synset_words.txt")
_VAL_NAME = re.compile(r"ILSVRC2012_val_\d{8}\.[A-Za-z]+")


def imagenet100_classes() -> list[str]:
    """The 100 wnids of ImageNet-100 (CMC's list), in the order of the shipped file."""
    text = (resources.files("empssl") / "assets" / "imagenet100_classes.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@dataclass(frozen=True)
class ImageNetSpec:
    """A parsed ``imagenet100:PATH`` / ``imagenet:PATH``: which classes, and the folder as given (resolved)."""

    variant: str  # "imagenet100" | "imagenet"
    path: Path

    @property
    def shown(self) -> str:
        return f"{self.variant}:{self.path}"

    def walk(self) -> Tree:
        """The tree below ``path`` that this spec reads: the selected train/ (and val/ class) folders, a flat val/
        whole, and the ground-truth and class-name files (whose stamps key the cache with the images')."""
        base = _image_root(self.path)
        tree = Tree(set(), {})
        train = self.path / base / "train"
        if not train.is_dir():
            raise DataError(f"no train/ folder in {self.path / base} (expected train/<wnid>/*.JPEG)")
        for wnid in self._wanted(train, f"{base}train/"):
            walk_folder(train / wnid, tree, f"{base}train/{wnid}/")
        val = self.path / base / "val"
        if not val.is_dir():
            raise DataError(f"no val/ folder in {self.path / base} (expected val/<wnid>/*.JPEG, or val/*.JPEG "
                            f"with {LOC_SOLUTION} or the ILSVRC2012 devkit)")
        if _is_flat(val) or self.variant == "imagenet":
            walk_folder(val, tree, f"{base}val/")
        else:
            for wnid in self._wanted(val, f"{base}val/"):
                walk_folder(val / wnid, tree, f"{base}val/{wnid}/")
        kaggle = [top + name for top in _tops(base) for name in (LOC_SOLUTION, *SYNSET_NAMES)]
        for rel in [*kaggle, f"{DEVKIT}/data/{GROUND_TRUTH}", f"{DEVKIT}/data/meta.mat", GROUND_TRUTH, "meta.mat",
                    f"{DEVKIT}.tar.gz"]:
            file = self.path / rel
            if file.is_file():
                st = file.stat()
                tree.meta[rel] = str(file)
                tree.stamps[rel] = (st.st_size, st.st_mtime_ns)
        return tree

    def catalog(self, tree: Tree) -> Catalog:
        """(train, val) of :meth:`walk`'s tree as a :class:`Catalog`, names relative to the train/ folder's parent."""
        base = _image_root(self.path)
        train = _scan_classes(tree, f"{base}train/", "train/")
        train.class_names = _class_names(tree, base, self.path, train.classes)
        prefix = f"{base}val/"
        loose = sorted(n for n in tree.files if n.startswith(prefix) and "/" not in n[len(prefix):])
        if loose:
            val = _label_flat_val(tree, base, self.path, loose, train.classes, self.variant == "imagenet100")
        else:
            val = _scan_classes(tree, prefix, "val/")
        return _catalog(tree, self.shown, base, [("train", train), ("val", val)], str(self.path))

    def _wanted(self, folder: Path, shown: str) -> list[str]:
        """The class folders of ``folder`` this spec reads; DataError naming the selected ones that are missing."""
        if self.variant == "imagenet":
            found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not found:
                raise DataError(f"{shown} of {self.path} has no class folders (expected {shown}<wnid>/*.JPEG)")
            return found
        wnids = imagenet100_classes()
        missing = [w for w in wnids if not (folder / w).is_dir()]
        if missing:
            raise DataError(f"{len(missing)} of the 100 ImageNet-100 classes have no folder in {shown} of "
                            f"{self.path}: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''} (the "
                            f"list: empssl/assets/imagenet100_classes.txt)")
        return sorted(wnids)


def parse_spec(spec: str, data_dir: Path) -> ImageNetSpec | None:
    """The :class:`ImageNetSpec` that ``spec`` names, or None when it is not an ImageNet spec."""
    variant, sep, path = spec.partition(":")
    if variant not in IMAGENET_SPECS:
        return None
    if sep and not path:
        raise DataError(f"--data {spec}: give the ImageNet folder after the colon ({variant}:PATH)")
    folder = Path(path).expanduser() if sep else data_dir / "imagenet"
    if not folder.exists():
        where = "" if sep else f" (--data {variant} reads --data-dir/imagenet; or pass --data {variant}:PATH)"
        raise DataError(f"ImageNet folder not found: {folder}{where}")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: ImageNet is read from its extracted train/ and val/ folders "
                        f"(extract the tarballs, or let torchvision.datasets.ImageNet do it once)")
    return ImageNetSpec(variant, folder.resolve())


def _image_root(path: Path) -> str:
    """"" when ``path`` holds train/, else Kaggle's ``ILSVRC/Data/CLS-LOC/`` when that holds it."""
    if not (path / "train").is_dir() and (path / KAGGLE_ROOT / "train").is_dir():
        return KAGGLE_ROOT
    return ""


def _is_flat(val: Path) -> bool:
    """Whether val/ holds its images directly (flat) rather than in class folders; DataError when it has both."""
    entries = [entry for entry in val.iterdir() if not entry.name.startswith(".")]
    has_dirs = any(entry.is_dir() for entry in entries)
    has_images = any(entry.is_file() and is_image(entry.name) for entry in entries)
    if has_images and has_dirs:
        raise DataError(f"{val} holds both images and class folders; keep one layout (val/<wnid>/*.JPEG, or "
                        f"val/*.JPEG with its ground truth)")
    return has_images


def _tops(base: str) -> list[str]:
    """Where Kaggle's files may lie, relative to PATH: PATH, and for Kaggle's tree ILSVRC/ and train/'s folder."""
    return ["", "ILSVRC/", base] if base else [""]


def _label_flat_val(tree: Tree, base: str, path: Path, loose: list[str], classes: list[str], select: bool
                    ) -> _Split:
    """Flat val/ images labelled by their ground truth. ``select`` (ImageNet-100): keep those of ``classes``, and
    give val/ the selected classes it has images of; else keep them all, and give val/ every class its ground truth
    names, so that a class without a train/ folder is a mismatch."""
    solution = next((top + LOC_SOLUTION for top in _tops(base) if top + LOC_SOLUTION in tree.meta), None)
    if solution is not None:
        truth, source = _loc_solution(_read_text(tree, solution, path), f"{solution} in {path}"), solution
    else:
        gt_text, meta, source = _devkit_files(tree, path) or (None, b"", "")
        if gt_text is None:  # no devkit, or a meta.mat without the ground truth
            raise DataError(f"val/ of {path} is flat (val/*.JPEG) but has no ground truth: put {LOC_SOLUTION}, "
                            f"{DEVKIT}/ or {DEVKIT}.tar.gz in {path}, or sort val/ into val/<wnid>/ folders")
        truth = _ground_truth(gt_text, _synsets(meta, f"{source} in {path}")[0], source)
        misnamed = [name for name in loose if not _VAL_NAME.fullmatch(Path(name).name)]
        if misnamed:
            raise DataError(f"{misnamed[0]} in {path} is not named ILSVRC2012_val_<8 digits>.JPEG, so the devkit's "
                            f"{GROUND_TRUTH} (one line per numbered file) cannot label it")
    unlabelled = [name for name in loose if Path(name).stem not in truth]
    if unlabelled:
        raise DataError(f"{len(unlabelled)} image(s) in val/ of {path} have no ground truth in {source} "
                        f"(e.g. {unlabelled[0][len(base):]})")
    wnid = {name: truth[Path(name).stem] for name in loose}
    index = {c: i for i, c in enumerate(classes)}
    label_of: dict[str, int | None] = {name: index[wnid[name]] for name in loose if wnid[name] in index}
    return _Split(label_of, sorted({wnid[name] for name in (label_of if select else loose)}))


def _loc_solution(text: str, shown: str) -> dict[str, str]:
    """Kaggle's LOC_val_solution.csv: image id (file stem) -> wnid (the first of its boxes)."""
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
        raise DataError(f"{shown}: expected the header ImageId,PredictionString, got {','.join(header or [])[:80]!r}")
    truth: dict[str, str] = {}
    for lineno, row in enumerate(rows, 2):
        if not row:
            continue
        words = row[1].split() if len(row) >= 2 else []
        if not words or not words[0].startswith("n"):
            raise DataError(f"{shown} line {lineno}: expected <ImageId>,<wnid> <box>..., got {','.join(row)[:80]!r}")
        truth[row[0].strip()] = words[0]
    return truth


def _devkit_files(tree: Tree, path: Path) -> tuple[str | None, bytes, str] | None:
    """The devkit's (val ground truth text or None, meta.mat's bytes, where they were read), None without one."""
    for folder in (f"{DEVKIT}/data/", ""):
        gt, mat = folder + GROUND_TRUTH, folder + "meta.mat"
        if mat in tree.meta:
            text = _read_text(tree, gt, path) if gt in tree.meta else None
            return text, read_file(tree.meta[mat], f"{mat} in {path}"), mat
        if gt in tree.meta:
            raise DataError(f"{gt} in {path} needs the devkit's meta.mat beside it (it maps ILSVRC2012_IDs to wnids)")
    archive = f"{DEVKIT}.tar.gz"
    if archive not in tree.meta:
        return None
    # meta.mat and the val ground truth from inside the devkit tarball, each at most the usual size cap
    shown = f"{archive} in {path}"
    wanted = {f"{DEVKIT}/data/{GROUND_TRUTH}": GROUND_TRUTH, f"{DEVKIT}/data/meta.mat": "meta.mat"}
    found: dict[str, bytes] = {}
    try:
        for name, kind, size, read in _members(Path(str(tree.meta[archive]))):
            if kind == "file" and name in wanted and size <= MAX_FILE_BYTES:
                found[wanted[name]] = read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read {shown}: {type(e).__name__}: {e}") from e
    missing = sorted(set(wanted.values()) - set(found))
    if missing:
        raise DataError(f"{shown} has no {DEVKIT}/data/{missing[0]}")
    return found[GROUND_TRUTH].decode("utf-8", errors="replace"), found["meta.mat"], archive


def _synsets(meta: bytes, shown: str) -> tuple[dict[int, str], dict[str, str]]:
    """meta.mat's leaf synsets: (ILSVRC2012_ID -> wnid, wnid -> words)."""
    try:
        from scipy.io import loadmat  # type: ignore[import-untyped]
    except ImportError:
        raise DataError(f"reading {shown} needs scipy (pip install scipy), or label val/ by {LOC_SOLUTION} "
                        f"or class folders") from None
    try:
        synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        ids, wnids, words, children = (np.atleast_1d(synsets[f]) for f in
                                       ("ILSVRC2012_ID", "WNID", "words", "num_children"))
    except Exception as e:  # scipy raises many types for a damaged file; KeyError/ValueError for another one
        raise DataError(f"cannot read the synsets of {shown}: {type(e).__name__}: {e}") from e
    leaves = [i for i in range(len(ids)) if int(children[i]) == 0]
    return ({int(ids[i]): str(wnids[i]) for i in leaves}, {str(wnids[i]): str(words[i]) for i in leaves})


def _ground_truth(text: str, wnid_of: dict[int, str], shown: str) -> dict[str, str]:
    """ILSVRC2012_validation_ground_truth.txt: the stem of the file it numbers (ILSVRC2012_val_<8 digits>) -> wnid."""
    truth: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            truth[f"ILSVRC2012_val_{lineno:08d}"] = wnid_of[int(line)]
        except (ValueError, KeyError):
            raise DataError(f"{shown} line {lineno}: expected an ILSVRC2012_ID of meta.mat's 1,000 classes, got "
                            f"{line.strip()[:40]!r}") from None
    return truth


def _class_names(tree: Tree, base: str, path: Path, classes: list[str]) -> list[str] | None:
    """Human-readable names of ``classes`` from meta.mat or LOC_synset_mapping.txt, else None."""
    files = _devkit_files(tree, path)
    if files is not None:
        words = _synsets(files[1], f"{files[2]} in {path}")[1]
        return [words.get(c, c) for c in classes]
    for rel in (top + name for top in _tops(base) for name in SYNSET_NAMES):
        if rel in tree.meta:
            lines = (line.split(" ", 1) for line in _read_text(tree, rel, path).splitlines() if " " in line)
            mapping = {w.strip(): name.strip() for w, name in lines}
            return [mapping.get(c, c) for c in classes]
    return None
