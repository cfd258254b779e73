"""empssl.embed: bag-of-features embeddings of every image, written to .npz and .safetensors."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from empssl import __version__
from empssl.checkpoint import CheckpointError, save_atomic
from empssl.config import Config
from empssl.data import DataError, load_data
from empssl.embed import EmbedError, embed, load_embedding
from empssl.evaluate import image_features
from empssl.methods import create_method
from empssl.rundir import load_checkpoint

from .test_data import CLASSES, archive, make_tree

embed_module = importlib.import_module("empssl.embed")  # empssl.embed is the function
TINY_MODEL = dict(data="demo", width=4, hidden_dim=24, z_dim=16, patch_size=8, num_patches=4, test_patches=3,
                  device="cpu")


def make_checkpoint(run: Path, step: int = 7, **overrides: object) -> Path:
    """A run folder holding checkpoint.pt in the format train writes (model, config, step, version), with random
    weights and non-trivial BatchNorm statistics (evaluation runs BatchNorm on its running statistics)."""
    cfg = Config(**{**TINY_MODEL, **overrides}).validate()  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = create_method(cfg).build_model()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    run.mkdir(parents=True, exist_ok=True)
    save_atomic({"model": model.state_dict(), "config": cfg.to_dict(), "step": step, "version": __version__},
                run / "checkpoint.pt")
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("run"))


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "tree")  # train/ (3 classes x 4) and test/ (3 x 2), 8x8 PNGs


def names(split: str, n: int) -> list[str]:
    return [f"{split}/{c}/{i:04d}.png" for c in CLASSES for i in range(n)]


def run_embed(run: Path, data: Path | str, out: Path, **kwargs: object) -> dict:
    return embed(run, str(data), out, data_dir=str(out.parent / "data"), progress=False, **kwargs)  # type: ignore[arg-type]


# --- contents --------------------------------------------------------------------------------------------


def test_npz_contents(run: Path, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb.npz"
    summary = run_embed(run, tree, out)
    assert summary["n"] == 18 and summary["dim"] == 24 and summary["format"] == "npz" and summary["labelled"]
    with np.load(out, allow_pickle=False) as z:  # plain arrays: no pickled objects
        assert set(z.files) == {"features", "names", "labels", "classes", "protocol"}
        assert z["features"].shape == (18, 24) and z["features"].dtype == np.float32
        assert np.isfinite(z["features"]).all() and z["features"].std() > 0
        assert z["names"].tolist() == names("train", 4) + names("test", 2)
        assert z["labels"].dtype == np.int64
        assert z["labels"].tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [0, 0, 1, 1, 2, 2]
        assert z["classes"].tolist() == CLASSES
        protocol = json.loads(str(z["protocol"]))
    assert protocol["test_patches"] == 3 and protocol["feature"] == "pre" and protocol["view"] == "patches"
    assert protocol["step"] == 7 and protocol["eval_seed"] == 0 and protocol["checkpoint"] == str(run)
    assert protocol["splits"] == [["train", 12], ["test", 6]] and protocol["empssl_version"] == __version__


def test_safetensors_contents_equal_npz(run: Path, tree: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    run_embed(run, tree, tmp_path / "emb.npz")
    run_embed(run, tree, tmp_path / "emb.safetensors")
    with safe_open(str(tmp_path / "emb.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"features", "labels"}
        features, labels, meta = f.get_tensor("features"), f.get_tensor("labels"), f.metadata()
    assert features.dtype == torch.float32 and labels.dtype == torch.int64
    assert json.loads(meta["names"]) == names("train", 4) + names("test", 2)
    assert json.loads(meta["classes"]) == CLASSES
    assert json.loads(meta["protocol"])["test_patches"] == 3
    npz = load_embedding(tmp_path / "emb.npz")
    assert torch.equal(features, npz.features) and torch.equal(labels, npz.labels)
    back = load_embedding(tmp_path / "emb.safetensors")
    assert back.names == npz.names and back.classes == npz.classes and back.protocol == npz.protocol


def test_same_inputs_give_identical_features_and_flags_change_them(run: Path, tree: Path, tmp_path: Path) -> None:
    a = run_embed(run, tree, tmp_path / "a.npz")
    run_embed(run, tree, tmp_path / "b.npz")
    fa, fb = load_embedding(tmp_path / "a.npz").features, load_embedding(tmp_path / "b.npz").features
    assert torch.equal(fa, fb)
    assert a["test_patches"] == 3
    other_seed = run_embed(run, tree, tmp_path / "c.npz", eval_seed=1)
    assert other_seed["eval_seed"] == 1 and not torch.equal(load_embedding(tmp_path / "c.npz").features, fa)
    more = run_embed(run, tree, tmp_path / "d.npz", test_patches=5)
    assert more["test_patches"] == 5 and not torch.equal(load_embedding(tmp_path / "d.npz").features, fa)
    backbone = run_embed(run, tree, tmp_path / "e.npz", eval_feature="backbone")
    assert backbone["feature"] == "backbone" and backbone["dim"] == 32  # 8 * width


def test_rows_equal_the_evaluation_features(run: Path, tree: Path, tmp_path: Path) -> None:
    """Each split is embedded exactly as evaluation extracts it (the seeded patches follow the image index)."""
    run_embed(run, tree, tmp_path / "emb.npz")
    features = load_embedding(tmp_path / "emb.npz").features
    model, cfg, _ = load_checkpoint(run)
    train, test = load_data(str(tree), data_dir=str(tmp_path / "d"), progress=False)
    assert torch.equal(features[:12], image_features(model, train.images, cfg, "cpu").cpu())
    assert torch.equal(features[12:], image_features(model, test.images, cfg, "cpu").cpu())


def test_archive_gives_the_same_rows_as_its_folder(run: Path, tree: Path, tmp_path: Path) -> None:
    run_embed(run, tree, tmp_path / "folder.npz")
    run_embed(run, archive(tree, tmp_path / "tree.zip"), tmp_path / "zip.safetensors")
    a, b = load_embedding(tmp_path / "folder.npz"), load_embedding(tmp_path / "zip.safetensors")
    assert a.names == b.names and torch.equal(a.features, b.features) and torch.equal(a.labels, b.labels)


def test_folder_of_images_of_different_sizes(run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in (("a.png", (8, 8)), ("b.jpg", (20, 12)), ("c.png", (9, 30))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    with pytest.raises(DataError) as e:
        run_embed(run, folder, tmp_path / "x.npz")
    assert "--image-size" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "x.npz").exists()
    summary = run_embed(run, folder, tmp_path / "x.npz", image_size=16)
    assert summary["n"] == 3 and not summary["labelled"] and summary["image_size"] == 16
    with np.load(tmp_path / "x.npz", allow_pickle=False) as z:
        assert "labels" not in z.files and "classes" not in z.files
        assert z["names"].tolist() == ["a.png", "b.jpg", "c.png"] and z["features"].shape == (3, 24)
    assert load_embedding(tmp_path / "x.npz").labels is None


# --- the output file ------------------------------------------------------------------------------------------


def test_other_suffix_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(EmbedError) as e:
        embed(tmp_path / "no-such-run", "nowhere", tmp_path / "emb.csv", progress=False)
    assert "emb.csv" in str(e.value) and ".npz" in str(e.value) and ".safetensors" in str(e.value)


def test_unwritable_output(run: Path, tree: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file where a folder should be")
    with pytest.raises(EmbedError, match="cannot write"):
        run_embed(run, tree, tmp_path / "file" / "emb.npz")
    (tmp_path / "folder.npz").mkdir()
    with pytest.raises(EmbedError, match="folder"):
        run_embed(run, tree, tmp_path / "folder.npz")


def test_output_folder_is_created(run: Path, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "emb.safetensors"
    assert run_embed(run, tree, out)["out"] == str(out) and out.is_file()


def test_interrupted_write_leaves_no_file(run: Path, tree: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out" / "emb.npz"
    run_embed(run, tree, out)
    before = out.read_bytes()

    def half_then_interrupt(path: Path, e: object) -> None:
        path.write_bytes(b"PK half an npz")
        raise KeyboardInterrupt

    monkeypatch.setattr(embed_module, "_write_npz", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_embed(run, tree, out, test_patches=5)
    assert out.read_bytes() == before  # the previous file, whole
    assert [p.name for p in out.parent.iterdir() if p.name != "data"] == ["emb.npz"]  # no temp file left
    with pytest.raises(KeyboardInterrupt):
        run_embed(run, tree, tmp_path / "out" / "fresh.npz")
    assert not (tmp_path / "out" / "fresh.npz").exists()


def test_missing_checkpoint_and_unreadable_embedding(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        embed(tmp_path / "no-run", str(tree), tmp_path / "e.npz", progress=False)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(EmbedError, match="junk.safetensors"):
        load_embedding(tmp_path / "junk.safetensors")
