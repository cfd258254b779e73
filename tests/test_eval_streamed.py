"""Evaluation, embedding and the experiments over shard folders and streamed data: block by block, only the features
kept, and bitwise the features of the in-memory path; a run trained from shards evaluated without --data; bad
shards refused in one line by eval and embed.

The shard folders are written by ``empssl shard`` from ImageFolder trees of the bundled demo archive's images
(test_stream.py's helpers); the checkpoints are test_embed.py's (random weights, non-trivial BatchNorm statistics)
or a short streamed training run.
"""

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import traceback

import numpy as np
import pytest
import torch

from empssl import shard, stream
from empssl.cli import main
from empssl.data import ImageSet, load_images
from empssl.distributed import SINGLE, Dist
from empssl.embed import embed, load_embedding
from empssl.evaluate import evaluate, extract_full_features, extract_prefix_features, image_features
from empssl.files import read_jsonl
from empssl.methods import create_method
from empssl.monitor import Monitor
from empssl.rundir import load_checkpoint

from .conftest import TINY
from .test_distributed import _free_port
from .test_embed import make_checkpoint
from .test_stream import image_tree, shards_of

pytest.importorskip("litdata")
PER_CLASS = {"train": 10, "test": 4}  # 100 + 40 demo images, 32x32 JPEGs


@pytest.fixture(scope="module")
def src(tmp_path_factory, data_dir):
    return image_tree(tmp_path_factory.mktemp("src"), data_dir, PER_CLASS)


@pytest.fixture(scope="module")
def shards(src, tmp_path_factory):
    return shards_of(src, tmp_path_factory.mktemp("shards") / "shards", shard_size=30)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("run"), image_size=32)


@pytest.fixture()
def small_blocks(monkeypatch):
    """Blocks of 40 decoded 32 px images (a multiple of the 32 images augmented together: 64), and a record of
    the images each block decodes."""
    sizes: list[int] = []
    decode = stream.decode_catalog

    def counted(catalog, *args, **kwargs):
        sizes.append(len(catalog.records))
        return decode(catalog, *args, **kwargs)

    monkeypatch.setattr(stream, "BLOCK_BYTES", 40 * 3 * 32 * 32)
    monkeypatch.setattr(stream, "decode_catalog", counted)
    return sizes


def in_memory(cfg):
    """(train, test) of the same shards in the in-memory tier: what a streamed split is compared with (shards hold
    their source's images in a seeded order of their own, and evaluation patches are seeded by position, so the
    source folder's features are another draw)."""
    return stream.eval_splits(cfg.replace(data_mode="memory"), False, lambda: pytest.fail("shards are not a folder"))


def in_shard_order(src, data_dir) -> tuple[ImageSet, list[torch.Tensor]]:
    """The source folder in memory, and the rows of each of its splits in the order ``empssl shard`` wrote them
    (:func:`empssl.shard.write_order`, seed 0)."""
    images = load_images(str(src), str(data_dir), 32, progress=False)
    rows, at = [], 0
    for _, count in images.splits:
        rows.append(at + torch.from_numpy(shard.write_order(count, 0)))
        at += count
    return images, rows


def _one_line(capsys, *parts):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for p in parts:
        assert p in err, err


# --- the same features, block by block --------------------------------------------------------------------


@pytest.mark.parametrize("batch_images", [16, 32])
def test_streamed_features_are_bitwise_the_in_memory_features(run, src, shards, data_dir, small_blocks,
                                                             batch_images):
    model, cfg, _ = load_checkpoint(run, {"data": str(shards), "data_mode": "stream", "image_size": 32})
    train, test = stream.eval_splits(cfg, False, lambda: pytest.fail("the in-memory tier was asked"))
    assert isinstance(train, stream.StreamedSplit) and (len(train), len(test)) == (100, 40)
    mem_train, mem_test = in_memory(cfg)
    source, rows = in_shard_order(src, data_dir)  # the pixels and labels of the source, item by item
    for memory, r in zip((mem_train, mem_test), rows, strict=True):
        assert torch.equal(memory.images, source.images[r]) and torch.equal(memory.labels, source.labels[r])
    aug = create_method(cfg).eval_augment()
    # 3 patches of 16 or 32 images per forward pass, 32 images augmented together: blocks of 32 (not 40, which
    # would cut a group of patches in two)
    for streamed, memory in ((train, mem_train), (test, mem_test)):
        small_blocks.clear()
        got = extract_prefix_features(model, streamed, aug, [1, 3], batch_images=batch_images, seed=5)
        want = extract_prefix_features(model, memory.images, aug, [1, 3], batch_images=batch_images, seed=5)
        assert len(small_blocks) > 1 and max(small_blocks) <= 64 and sum(small_blocks) == len(memory)
        for m in (1, 3):
            assert torch.equal(got[m], want[m]), m
        whole = extract_full_features(model, streamed, aug, batch_images=16)
        assert torch.equal(whole, extract_full_features(model, memory.images, aug, batch_images=16))
        assert torch.equal(streamed.labels, memory.labels)


def _monitored(cfg, train, test, model, out, d: Dist = SINGLE) -> float | None:
    """The kNN accuracy of one monitor check of ``model`` on a bank of 30 of ``train``'s images and 20 queries
    (their features computed block by block for a streamed split), from the monitor.jsonl written in ``out``."""
    cfg = cfg.replace(eval_every=1, monitor_bank=30, monitor_test=20, monitor_patches=2)
    out.mkdir(parents=True)
    Monitor(cfg, train, test, torch.device("cpu"), out, steps_per_epoch=1, total_steps=1, patches_per_step=1,
            dist=d).start(model)
    return read_jsonl(out / "monitor.jsonl")[0]["knn_top1"] if (out / "monitor.jsonl").exists() else None


def test_the_monitor_reads_a_streamed_split_block_by_block_and_sees_what_memory_sees(run, shards, tmp_path,
                                                                                    small_blocks):
    model, cfg, _ = load_checkpoint(run, {"data": str(shards), "data_mode": "stream", "image_size": 32})
    streamed = stream.load_splits(cfg, False, lambda: pytest.fail("the in-memory tier was asked"))
    assert streamed[0] is streamed[2] and isinstance(streamed[1], stream.StreamedSplit)  # nothing decoded yet
    assert small_blocks == []
    got = _monitored(cfg, *streamed[:2], model, tmp_path / "stream")
    assert sorted(small_blocks) == [20, 30]  # the bank and the queries, decoded for the check, one block each
    assert got == _monitored(cfg, *in_memory(cfg), model, tmp_path / "memory")


def _features(run, shards, decoded: list[int], out, d: Dist) -> dict:
    """What the ranks compute: features of the streamed test split (40 images: a share of 32 and one of 8), of a
    20-image part of it (one rank without images), and of the same images in memory; the whole evaluation and a
    monitor check (written by rank 0 alone)."""
    model, cfg, _ = load_checkpoint(run, {"data": str(shards), "data_mode": "stream", "image_size": 32,
                                          "probe_epochs": 2})
    train, test = stream.eval_splits(cfg, False, lambda: pytest.fail("the in-memory tier was asked"))
    aug = create_method(cfg).eval_augment()
    decoded.clear()
    got = {"prefix": extract_prefix_features(model, test, aug, [1, 3], batch_images=16, seed=5, dist=d),
           "decoded": sum(decoded),
           "full": extract_full_features(model, test, aug, batch_images=16, dist=d),
           "few": extract_prefix_features(model, test.part(0, 20), aug, [2], seed=5, dist=d)[2],
           "memory": extract_prefix_features(model, in_memory(cfg)[1].images, aug, [1, 3], batch_images=16, seed=5,
                                             dist=d)}
    results = evaluate(model, train, test, cfg, "cpu", progress=False, log=lambda s: None, dist=d)
    return {**got, "results": {k: results[k] for k in ("linear_top1", "knn_top1", "n_train", "n_test")},
            "monitor": _monitored(cfg, train, test, model, out / f"rank{d.rank}", d)}


def _features_rank(rank: int, port: int, args: tuple, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks on two cores; the forked OpenMP pool stays unused
    try:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
        torch.save(_features(*args, out, Dist(rank, 2)), out / f"rank{rank}.pt")
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def test_two_ranks_compute_their_shares_and_gather_the_features_of_one_process(run, shards, tmp_path, small_blocks):
    """Each rank decodes and encodes only its share of whole groups of images (patches are seeded per 32 images),
    and every rank gets all the features, bitwise those of one process, so the evaluation is the same."""
    args = (run, shards)
    ctx, port = mp.get_context("fork"), _free_port()
    procs = [ctx.Process(target=_features_rank, args=(r, port, (*args, small_blocks), tmp_path)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)  # a ceiling against a hang, not a speed limit
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    one = _features(*args, small_blocks, tmp_path / "one", SINGLE)
    assert [r["decoded"] for r in ranks] == [32, 8] and one["decoded"] == 40
    for got in ranks:
        for m in (1, 3):
            assert torch.equal(got["prefix"][m], one["prefix"][m]) and torch.equal(got["memory"][m], one["prefix"][m])
        assert torch.equal(got["full"], one["full"]) and torch.equal(got["few"], one["few"])
        assert got["results"] == one["results"]
    assert ranks[0]["monitor"] == one["monitor"] is not None and ranks[1]["monitor"] is None  # rank 0 writes


def test_eval_of_shards_streamed_equals_eval_of_the_shards_in_memory(run, src, shards, data_dir, tmp_path, capsys,
                                                                    small_blocks):
    """The streamed and the in-memory tier of the same shards give the same evaluation; the source folder, whose
    images the shards hold in another order (and so with other seeded patches), the same sets and protocol."""
    results = {}
    for name, data, mode in (("source", src, "memory"), ("stream", shards, "stream"), ("memory", shards, "memory")):
        out = tmp_path / f"{name}.json"
        assert main(["eval", "--checkpoint", str(run), "--data", str(data), "--data-dir", str(data_dir),
                     "--data-mode", mode, "--image-size", "32", "--probe-epochs", "3", "--eval-batch-size", "48",
                     "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
        results[name] = json.loads(out.read_text())
    for key in ("linear_top1", "knn_top1", "n_train", "n_test", "feature_dim", "test_patches"):
        assert results["stream"][key] == results["memory"][key], key
    for key in ("n_train", "n_test", "feature_dim", "test_patches", "num_classes"):
        assert results["stream"][key] == results["source"][key], key
    sets = results["stream"]["eval_sets"]
    assert sets["train"] == {"images": 100, "read": "stream", "split": "train", "source": str(shards),
                             "selection": "every image"}
    assert sets["test"]["read"] == "stream" and sets["test"]["split"] == "test"
    assert results["memory"]["eval_sets"]["train"]["read"] == "memory"
    assert len(small_blocks) > 2  # the streamed evaluation read its splits in blocks


# --- a run trained from shards ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def streamed_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--data", str(shards), "--data-mode", "stream", "--image-size", "32", "--out", str(out),
                 "--no-progress", "--epochs", "1", "--monitor-bank", "20", "--train-subset", "60", *TINY]) == 0
    return out


def test_a_streamed_run_is_evaluated_on_its_whole_training_split_and_says_so(streamed_run, shards):
    results = json.loads((streamed_run / "results.json").read_text())
    assert results["n_train"] == 60  # the --train-subset, not the monitor's bank of 20
    assert results["eval_sets"]["train"] == {"images": 60, "read": "stream", "split": "train", "source": str(shards),
                                             "selection": "class-balanced subset of 60"}
    assert results["eval_sets"]["test"] == {"images": 40, "read": "stream", "split": "test", "source": str(shards),
                                            "selection": "every image"}  # never decoded whole, as the monitor's


def test_a_run_trained_from_shards_is_evaluated_embedded_and_ablated_without_data(streamed_run, shards, tmp_path,
                                                                                 capsys):
    assert main(["eval", "--checkpoint", str(streamed_run), "--no-progress"]) == 0, capsys.readouterr().err
    trained = json.loads((streamed_run / "results.json").read_text())
    again = json.loads((streamed_run / "results-eval.json").read_text())
    for key in ("linear_top1", "knn_top1", "n_train", "n_test"):
        assert again[key] == trained[key], key  # the same data and features as the run's own final evaluation
    assert again["eval_sets"]["test"]["read"] == "stream"  # the run's --data-mode stream, for both splits
    assert main(["ablate-test-patches", "--checkpoint", str(streamed_run), "--counts", "1,2", "--no-progress",
                 "--out", str(tmp_path / "abl")]) == 0, capsys.readouterr().err
    abl = json.loads((tmp_path / "abl" / "test_patch_ablation.json").read_text())
    assert abl["n_train"] == 60 and [r["test_patches"] for r in abl["rows"]] == [1, 2]
    assert abl["rows"][1]["linear_top1"] == trained["linear_top1"]  # the bag of 2 is the run's own protocol
    assert main(["tsne", "--checkpoint", str(streamed_run), "--max-points", "20", "--out", str(tmp_path / "t.png"),
                 "--no-progress"]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "t.json").read_text())["n_points"] == 20
    assert main(["embed", "--checkpoint", str(streamed_run), "--data", str(shards), "--out", str(tmp_path / "e.npz"),
                 "--no-progress"]) == 0, capsys.readouterr().err
    assert load_embedding(tmp_path / "e.npz").features.shape[0] == 140


@pytest.mark.slow  # two torchrun ranks and one process, each a short streamed run with its evaluation
def test_a_streamed_run_under_torchrun_monitors_and_evaluates_on_every_rank(shards, tmp_path, capsys):
    args = ["train", "--data", str(shards), "--data-mode", "stream", "--image-size", "32", "--no-progress",
            "--epochs", "1", "--train-subset", "40", "--eval-every", "1", "--monitor-bank", "40", *TINY]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0, capsys.readouterr().err
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "empssl.cli",
           *args, "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=1200)  # a ceiling against a hang
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = (read_jsonl(tmp_path / run / "monitor.jsonl") for run in ("one", "two"))
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 1, 2]  # written once, by rank 0
    assert two[0]["knn_top1"] == one[0]["knn_top1"]  # the same initial weights: the same check
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (results["n_train"], results["n_test"]) == (40, 40) and results["eval_sets"]["test"]["read"] == "stream"


# --- embedding shards -------------------------------------------------------------------------------------


def _embedded_in_shard_order(run, src, data_dir) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """(features, names, labels) of the source's images in the order its shards hold them, the features computed
    split by split in that order as ``embed`` computes them (its patches are seeded by position)."""
    model, cfg, _ = load_checkpoint(run, {"eval_batch_size": 48})
    source, rows = in_shard_order(src, data_dir)
    features = torch.cat([image_features(model, source.images[r], cfg, "cpu") for r in rows])
    order = torch.cat(rows)
    return features, [source.names[i] for i in order], source.labels[order]


@pytest.mark.parametrize("mode", ["stream", "memory", "auto"])
def test_embedding_shards_gives_the_rows_of_the_source(run, src, shards, data_dir, tmp_path, small_blocks, mode):
    kw = dict(image_size=32, data_dir=str(data_dir), eval_batch_size=48, progress=False)
    want = load_embedding(embed(run, str(src), tmp_path / "src.npz", **kw)["out"])
    got_summary = embed(run, str(shards), tmp_path / "sh.npz", data_mode=mode, **kw)
    got = load_embedding(tmp_path / "sh.npz")
    features, names, labels = _embedded_in_shard_order(run, src, data_dir)
    assert torch.equal(got.features, features)
    assert got.names == names and len(got.names) == 140  # the shards' order, named as the source names them
    assert torch.equal(got.labels, labels) and got.classes == want.classes
    assert got.protocol["splits"] == [["train", 100], ["test", 40]] == want.protocol["splits"]
    assert got.protocol["data_mode"] == ("stream" if mode == "stream" else "memory")
    assert got_summary["labelled"] and got_summary["num_classes"] == 10
    if mode == "stream":
        assert len(small_blocks) > 2 and max(small_blocks) <= 64


def test_embedding_a_folder_streamed_and_shards_without_classes(run, src, data_dir, tmp_path, small_blocks):
    kw = dict(image_size=32, data_dir=str(data_dir), eval_batch_size=48, progress=False)
    want = load_embedding(embed(run, str(src), tmp_path / "mem.npz", **kw)["out"])
    embed(run, str(src), tmp_path / "streamed.npz", data_mode="stream", **kw)
    got = load_embedding(tmp_path / "streamed.npz")
    assert len(small_blocks) > 2  # read through the folder's catalog, block by block
    assert torch.equal(got.features, want.features) and got.names == want.names
    assert torch.equal(got.labels, want.labels)
    flat = src / "train" / "cat"  # a folder without classes
    shards = shards_of(flat, tmp_path / "flat")
    embed(run, str(shards), tmp_path / "flat.npz", data_mode="stream", **kw)
    got = load_embedding(tmp_path / "flat.npz")
    order = shard.write_order(10, 0)
    assert got.labels is None and got.classes is None and got.names == [f"{i:04d}.jpg" for i in order]
    model, cfg, _ = load_checkpoint(run, {"eval_batch_size": 48})
    folder = load_images(str(flat), str(data_dir), 32, progress=False)
    assert folder.names == [f"{i:04d}.jpg" for i in range(10)]
    assert torch.equal(got.features, image_features(model, folder.images[torch.from_numpy(order)], cfg, "cpu"))


# --- bad input: one line, exit 2, nothing written -----------------------------------------------------------


def _commands(run, data, tmp_path, train=False):
    commands = {"eval": ["eval", "--checkpoint", str(run), "--data", str(data), "--image-size", "32", "--data-mode",
                     "stream", "--out", str(tmp_path / "r.json"), "--no-progress"],
            "embed": ["embed", "--checkpoint", str(run), "--data", str(data), "--image-size", "32", "--data-mode",
                      "stream", "--out", str(tmp_path / "e.npz"), "--no-progress"]}
    if train:
        commands["train"] = ["train", "--data", str(data), "--data-mode", "stream", "--image-size", "32", "--out",
                             str(tmp_path / "out"), "--no-progress", *TINY]
    return commands


def test_bad_shards_are_refused_by_eval_embed_and_train_in_one_line(run, src, tmp_path, capsys):
    root = shards_of(src, tmp_path / "bad", shard_size=30)
    chunk = sorted((root / "train").glob("chunk-*.bin"))[1]
    good = chunk.read_bytes()
    manifest = json.loads((root / "manifest.json").read_text())
    cases = [(lambda: chunk.write_bytes(good[: len(good) // 2]), "truncated"),
             (lambda: chunk.unlink(), "missing shard"),
             (lambda: (root / "manifest.json").write_text(json.dumps(
                 {**manifest, "splits": {**manifest["splits"], "test": {**manifest["splits"]["test"], "images": 41}}})),
              "counts 41 images in test")]
    for damage, message in cases:
        damage()
        for name, argv in _commands(run, root, tmp_path, train=True).items():
            assert main(argv) == 2, name
            _one_line(capsys, message)
        chunk.write_bytes(good)
        (root / "manifest.json").write_text(json.dumps(manifest))
    assert not any((tmp_path / f).exists() for f in ("r.json", "e.npz", "out"))


def test_an_image_that_does_not_decode_stops_eval_and_embed_naming_it(run, src, tmp_path, capsys):
    bad = tmp_path / "damaged"
    shutil.copytree(src, bad)
    jpeg = bad / "test" / "bird" / "0003.jpg"
    data = jpeg.read_bytes()
    jpeg.write_bytes(data[: data.index(b"\xff\xda") + 20])  # the header reads (empssl shard stores it), not the pixels
    root = shards_of(bad, tmp_path / "shards", shard_size=30)
    for name, argv in _commands(run, root, tmp_path).items():
        assert main(argv) == 2, name
        _one_line(capsys, "cannot decode image test/bird/0003.jpg")
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "e.npz").exists()


def test_class_lists_that_differ_between_train_and_test_are_refused_when_streamed(run, data_dir, tmp_path, capsys):
    src = image_tree(tmp_path / "src", data_dir, {"train": 2, "test": 2})
    (src / "test" / "truck").rename(src / "test" / "lorry")
    for name, argv in _commands(run, src, tmp_path, train=True).items():
        assert main(argv) == 2, name
        _one_line(capsys, "different classes")
    assert not (tmp_path / "out").exists() and not (tmp_path / "e.npz").exists()


def test_streaming_without_an_image_size_is_refused(run, src, tmp_path, capsys):
    for argv in _commands(run, src, tmp_path).values():
        argv[argv.index("--image-size") + 1] = "0"
        assert main(argv) == 2
        _one_line(capsys, "needs --image-size")


def test_labels_of_other_classes_come_from_the_new_data(run, src, tmp_path, capsys):
    """Transfer: a checkpoint of 10-class data evaluated on shards of 3 of the classes (another class list)."""
    three = tmp_path / "three"
    for split in ("train", "test"):
        for c in ("bird", "cat", "dog"):
            shutil.copytree(src / split / c, three / split / c)
    root = shards_of(three, tmp_path / "s3", shard_size=30)
    assert main(["eval", "--checkpoint", str(run), "--data", str(root), "--image-size", "32", "--data-mode", "stream",
                 "--out", str(tmp_path / "r.json"), "--no-progress", "--probe-epochs", "2"]) == 0, \
        capsys.readouterr().err
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["num_classes"] == 3 and res["n_train"] == 30 and res["n_test"] == 12
    assert np.isfinite(res["linear_top1"]) and res["eval_sets"]["train"]["source"] == str(root)
