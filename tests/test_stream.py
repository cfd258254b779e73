"""The streamed tier: in-memory pixels, each image at most once an epoch, exact resume, two ranks, bad data, GPU decode.

The shard folders are written by ``empssl shard`` (:func:`empssl.shard.write_shards`) from ImageFolder trees that
the tests write from the bundled demo archive's files; tampering with shards themselves is tested in test_shard.py.
"""

import importlib
import io
import itertools
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from empssl import shard, stream
from empssl.checkpoint import read_checkpoint
from empssl.cli import main
from empssl.data import DataError, load, load_data, scan
from empssl.train import config_data, train

from .conftest import TINY
from .multinode_entry import logged_rows
from .test_distributed import WORLD, interrupt_after, poll, run_ranks

pytest.importorskip("litdata")
ENTRY = Path(__file__).with_name("multinode_entry.py")
train_module = importlib.import_module("empssl.train")


def image_tree(root: Path, data_dir, per_class: dict[str, int] | None = None) -> Path:
    """The demo archive's files as an ImageFolder tree ``root/train/<class>/NNNN.jpg``, ``root/test/...`` (the
    catalog's names, so a scan of the tree lists them in the archive's order); ``per_class`` keeps the first n
    images of each class of a split."""
    for r in scan("demo", str(data_dir)).records:
        split, _, stem = r.name.split("/")
        if per_class is None or int(stem.split(".")[0]) < per_class[split]:
            (root / r.name).parent.mkdir(parents=True, exist_ok=True)
            (root / r.name).write_bytes(r.read())
    return root


def shards_of(src: Path, out: Path, shard_size: int = 500) -> Path:
    shard.write_shards(str(src), out, workers=1, shard_size=shard_size, progress=False)
    return out


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory, data_dir):
    """The demo archive's 5,000 + 1,000 images as shards (10 + 2 of 500), in the catalog's order."""
    src = image_tree(tmp_path_factory.mktemp("tree"), data_dir)
    return shards_of(src, tmp_path_factory.mktemp("shards") / "shards")


def tiny_cfg(data_dir, **kw):
    base = dict(data="demo", data_dir=str(data_dir), width=4, hidden_dim=32, z_dim=16, patch_size=8, num_patches=4,
                batch_size=20, train_subset=200, test_subset=100, test_patches=2, probe_epochs=2, device="cpu",
                log_every=1, checkpoint_every=100, image_size=32, monitor_bank=60)
    return train_module.Config(**{**base, **kw})


def quiet(_: str) -> None:
    pass


def in_memory_by_name(split, mem_train):
    """The in-memory tier's image of every name of ``split`` (both in the catalog's order, after the same subset)."""
    return {split.items.item(int(r))[2]: mem_train.images[k] for k, r in enumerate(split.rows)}


def epochs_of(batches, steps_per_epoch: int, epochs: int) -> list[list[str]]:
    """The names each epoch of ``batches`` (a StreamBatches) trains on."""
    named = itertools.islice(batches.named(), steps_per_epoch * epochs)
    names = [n for _, step in named for n in step]
    per = len(names) // epochs
    return [names[e * per:(e + 1) * per] for e in range(epochs)]


@pytest.mark.parametrize("source", ["archive", "shards"])
@pytest.mark.parametrize("workers", [0, 1])
def test_streamed_batches_hold_the_in_memory_pixels_each_image_at_most_once_an_epoch(data_dir, demo_shards, source,
                                                                                    workers):
    data = "demo" if source == "archive" else str(demo_shards)
    cfg = tiny_cfg(data_dir, data=data, data_mode="stream")
    sample, test, split = stream.load_splits(cfg, False, lambda: pytest.fail("the stream tier was asked"), quiet)
    # the in-memory tier of the same data (shards hold the source's images in a seeded order of their own)
    mem_train, mem_test, _ = stream.load_splits(tiny_cfg(data_dir, data=data, data_mode="memory"), False,
                                                lambda: config_data(tiny_cfg(data_dir, data_mode="memory"), False),
                                                quiet)
    assert split is not None and len(split) == len(mem_train) == 200
    assert sample is split and isinstance(test, stream.StreamedSplit)  # read as they go, never decoded whole
    assert torch.equal(test.decoded(False).images, mem_test.images) and torch.equal(test.labels, mem_test.labels)
    assert torch.equal(split.subset(60).decoded(False).images, mem_train.subset(60).images)  # the monitor's bank
    want = in_memory_by_name(split, mem_train)
    with stream.StreamBatches(split, batch_size=20, seed=3, device="cpu", workers=workers) as batches:
        assert batches.steps_per_epoch == 10
        seen = []
        for images, names in itertools.islice(batches.named(), 20):  # two epochs
            assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
            assert all(torch.equal(image, want[n]) for image, n in zip(images, names, strict=True))
            seen.extend(names)
    epochs = [seen[:200], seen[200:]]
    assert all(sorted(e) == sorted(want) for e in epochs)  # each of the subset's images once an epoch
    assert epochs[0] != epochs[1]  # reshuffled


@pytest.mark.parametrize("source", ["archive", "shards"])
def test_a_resumed_stream_goes_on_with_the_uninterrupted_batches_with_its_recorded_workers(data_dir, demo_shards,
                                                                                          source):
    data = "demo" if source == "archive" else str(demo_shards)
    split = stream.load_splits(tiny_cfg(data_dir, data=data, data_mode="stream"), False,
                               lambda: pytest.fail("stream asked"), quiet)[2]
    kw = dict(batch_size=20, seed=5, device="cpu")
    with stream.StreamBatches(split, workers=2, **kw) as whole:
        want = epochs_of(whole, 10, 2)
    with stream.StreamBatches(split, workers=2, **kw) as first:
        head = [n for _, names in itertools.islice(first.named(), 13) for n in names]  # into the second epoch
        state = first.state_dict()
    assert state["step"] == 13 and state["workers"] == 2
    with stream.StreamBatches(split, workers=1, **kw) as resumed:  # another machine's worker count: the checkpoint's
        resumed.load_state_dict(state)
        assert resumed.loader.num_workers == (2 if source == "shards" else 1)  # (a folder's order: any count)
        tail = [n for _, names in itertools.islice(resumed.named(), 7) for n in names]
    assert head + tail == want[0] + want[1]


def test_a_resume_through_another_cache_folder_is_refused_in_one_line(tmp_path, data_dir, demo_shards):
    split = stream.load_splits(tiny_cfg(data_dir, data=str(demo_shards), data_mode="stream"), False,
                               lambda: pytest.fail("stream asked"), quiet)[2]

    def through(cache):  # (a local folder is read in place; an s3:// one through the cache under --data-dir)
        items = split.items
        return replace(split, items=stream.ShardItems(items.folder, items.count, None, items.shards,
                                                      {"cache_dir": str(cache)}))

    with stream.StreamBatches(through(tmp_path / "a"), batch_size=20, seed=0, device="cpu", workers=0) as first:
        next(iter(first))
        state = first.state_dict()
    again = stream.StreamBatches(through(tmp_path / "b"), batch_size=20, seed=0, device="cpu", workers=0)
    with pytest.raises(DataError) as e:
        again.load_state_dict(state)
    assert "\n" not in str(e.value) and f"cache {tmp_path / 'a'}; this command's is {tmp_path / 'b'}" in str(e.value)
    assert "--data-dir" in str(e.value)


@pytest.mark.slow  # three training processes (the slow tier runs in CI too)
def test_stream_run_killed_mid_epoch_ends_with_the_uninterrupted_weights(tmp_path, data_dir, demo_shards):
    """kill -9 after a mid-epoch checkpoint, then the same command: the weights of a run never stopped, bitwise."""
    args = ["train", "--data", str(demo_shards), "--data-dir", str(data_dir), "--data-mode", "stream",
            "--image-size", "32", "--no-eval", "--no-progress", "--train-subset", "200", "--monitor-bank", "20",
            "--epochs", "1.5", "--checkpoint-every", "4", *TINY]

    def command(out, **env):
        return subprocess.Popen([sys.executable, str(ENTRY), *args, "--out", str(out)], env={**os.environ, **env},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    ref = command(tmp_path / "ref")
    run = command(tmp_path / "run", EMPSSL_TEST_PAUSE="1")  # stops after its first checkpoint (step 4 of 15)
    poll(lambda: run.poll() is not None or (tmp_path / "run" / "config.json").exists(), "the first checkpoint")
    run.kill()
    run.wait()
    assert read_checkpoint(tmp_path / "run")["step"] == 4
    again = command(tmp_path / "run")
    assert again.wait(timeout=600) == 0 and ref.wait(timeout=600) == 0, again.stderr.read() if again.stderr else ""
    a, b = read_checkpoint(tmp_path / "ref"), read_checkpoint(tmp_path / "run")
    assert b["step"] == a["step"] == 15
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_stream_run_interrupted_mid_epoch_resumes_as_if_never_stopped(tmp_path, data_dir, demo_shards):
    cfg = tiny_cfg(data_dir, data=str(demo_shards), data_mode="stream", epochs=1.5)
    ref = train(cfg, tmp_path / "ref", progress=False, log=quiet, evaluate_at_end=False)
    real_step = train_module.train_step
    interrupt_after(4)  # a SIGINT in step 4 of 15: the loop saves step 4 and stops
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / "run", progress=False, log=quiet, evaluate_at_end=False)
    finally:
        train_module.train_step = real_step
    assert read_checkpoint(tmp_path / "run")["step"] == 4
    results = train(cfg, tmp_path / "run", progress=False, log=quiet, evaluate_at_end=True)
    assert results["images"] == ref["images"] == 200 and results["n_train"] == 200  # on the split, not the bank
    a, b = read_checkpoint(tmp_path / "ref"), read_checkpoint(tmp_path / "run")
    assert b["step"] == a["step"] == 15
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_two_ranks_read_every_image_of_an_epoch_at_most_once(tmp_path, data_dir, demo_shards, monkeypatch):
    seen = tmp_path / "seen"
    seen.mkdir()
    monkeypatch.setattr(stream.StreamBatches, "named", logged_rows(seen, stream.StreamBatches.named))
    cfg = tiny_cfg(data_dir, data=str(demo_shards), data_mode="stream", train_subset=80, epochs=2,
                   width=8, hidden_dim=64, z_dim=32)
    run_ranks(cfg, tmp_path / "run", None)
    per_rank = [[json.loads(line) for line in (seen / f"rank{r}.jsonl").read_text().splitlines()] for r in range(WORLD)]
    assert [len(steps) for steps in per_rank] == [8, 8]  # the same number of steps, 10 images each
    assert all(len(batch) == 10 for steps in per_rank for batch in steps)
    split = stream.load_splits(cfg, False, lambda: pytest.fail("stream asked"), quiet)[2]
    subset = {split.items.item(int(r))[2] for r in split.rows}
    for epoch in range(2):
        read = [n for steps in per_rank for batch in steps[epoch * 4:(epoch + 1) * 4] for n in batch]
        assert sorted(read) == sorted(subset)  # all 80 images of the epoch, each once (80 = 4 steps of 20)


# --- bad input: one line, exit 2, no run directory --------------------------------------------------------


def small_shards(tmp_path, data_dir, damage=None):
    """Shards of 60 + 20 demo images (6 + 2 per class) in shards of 10; ``damage(src)`` edits the tree first."""
    src = image_tree(tmp_path / "src", data_dir, {"train": 6, "test": 2})
    if damage:
        damage(src)
    return shards_of(src, tmp_path / "shards", shard_size=10)


def run_cli(tmp_path, data, *extra):
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "out"), "--data-mode", "stream", "--image-size",
            "32", "--no-progress", "--train-subset", "40", "--epochs", "1", *TINY, *extra]
    return main(argv)


def _one_line(capsys, *parts):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for p in parts:
        assert p in err, err


def test_shards_that_do_not_match_their_manifest_are_refused_before_training(tmp_path, data_dir, capsys):
    root = small_shards(tmp_path, data_dir)
    chunk = sorted((root / "train").glob("chunk-*.bin"))[1]
    data = chunk.read_bytes()
    chunk.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # the same size, one bit changed: only the hash sees it
    assert run_cli(tmp_path, root) == 2
    _one_line(capsys, "sha256")
    chunk.write_bytes(data[: len(data) // 2])
    assert run_cli(tmp_path, root) == 2
    _one_line(capsys, "truncated")
    chunk.write_bytes(data)
    (root / "test" / "labels.npy").unlink()
    assert run_cli(tmp_path, root) == 2
    _one_line(capsys, "missing", "labels.npy")
    assert not (tmp_path / "out").exists()


def test_shards_without_classes_are_refused_and_differing_class_lists_are_not_sharded(tmp_path, data_dir, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for r in scan("demo", str(data_dir)).records[:30]:
        (photos / r.name.replace("/", "_")).write_bytes(r.read())
    root = shards_of(photos, tmp_path / "flat")
    assert run_cli(tmp_path, root) == 2
    _one_line(capsys, "no classes", "needs labels")
    assert not (tmp_path / "out").exists()
    src = image_tree(tmp_path / "src", data_dir, {"train": 2, "test": 2})
    (src / "test" / "truck").rename(src / "test" / "lorry")
    assert main(["shard", str(src), "--out", str(tmp_path / "other"), "--workers", "1", "--no-progress"]) == 2
    _one_line(capsys, "different classes")
    assert not (tmp_path / "other").exists()


def test_an_image_that_does_not_decode_stops_with_one_line(tmp_path, data_dir, capsys):
    def damage(src):  # the header reads (so empssl shard stores it), the pixels do not
        bad = src / "train" / "bird" / "0003.jpg"
        data = bad.read_bytes()
        bad.write_bytes(data[: data.index(b"\xff\xda") + 20])

    root = small_shards(tmp_path, data_dir, damage)
    assert run_cli(tmp_path, root, "--train-subset", "0", "--monitor-bank", "20", "--batch-size", "60") == 2
    _one_line(capsys, "cannot decode image train/bird/0003.jpg")


def test_labels_come_from_the_manifest_without_reading_the_items(tmp_path, data_dir, monkeypatch):
    root = small_shards(tmp_path, data_dir)
    source = [r.label for r in scan(str(tmp_path / "src")).records[:60]]
    want = torch.tensor([source[i] for i in shard.write_order(60, 0)])  # (empssl shard's seeded order)
    monkeypatch.setattr(stream.ShardItems, "item", lambda self, i: pytest.fail("an item was read"))
    train_items, test_items, classes, held = stream.open_shards(root)
    assert held == "test" and len(classes) == 10 and len(test_items) == 20
    assert torch.equal(train_items.labels(), want)


def test_shard_then_train_streamed_evaluates_as_the_in_memory_tier_would(tmp_path, data_dir, capsys):
    src = image_tree(tmp_path / "src", data_dir, {"train": 10, "test": 4})
    assert main(["shard", str(src), "--out", str(tmp_path / "shards"), "--shard-size", "30", "--workers", "1",
                 "--no-progress"]) == 0
    out = tmp_path / "stream"
    assert main(["train", "--data", str(tmp_path / "shards"), "--data-mode", "stream", "--image-size", "32",
                 "--out", str(out), "--no-progress", "--epochs", "2", "--monitor-bank", "40", *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["n_train"] == 100 and read_checkpoint(out)["step"] == 10  # every image, not the bank of 40
    assert results["eval_sets"]["train"]["read"] == "stream"
    again = tmp_path / "memory.json"  # the same checkpoint evaluated in memory: the same features, the same scores
    assert main(["eval", "--checkpoint", str(out), "--data-mode", "memory", "--out", str(again), "--no-progress"]) == 0
    for key in ("linear_top1", "knn_top1"):
        assert json.loads(again.read_text())[key] == results[key], key


def test_stream_needs_an_image_size_and_a_streamable_source(tmp_path, data_dir, capsys):
    assert main(["train", "--data", "demo", "--data-dir", str(data_dir), "--out", str(tmp_path / "o"),
                 "--data-mode", "stream", *TINY]) == 2
    _one_line(capsys, "needs --image-size")
    assert main(["train", "--data", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--data-mode", "stream", "--image-size", "32", *TINY]) == 2
    _one_line(capsys, "array dataset")
    assert not (tmp_path / "o").exists()


def test_auto_streams_what_does_not_fit_and_memory_refuses_it(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(load, "memory_available", lambda: 1000)
    lines = []
    cfg = tiny_cfg(tmp_path / "fresh", data="demo", data_mode="auto")  # a fresh cache dir: nothing is cached
    _, _, split = stream.load_splits(cfg, False, lambda: config_data(cfg, progress=False), lines.append)
    assert split is not None and len(split) == 200 and "streaming it" in lines[0]
    with pytest.raises(load.TooBigForMemory, match="--data-mode stream"):
        stream.load_splits(cfg.replace(data_mode="memory"), False, lambda: config_data(cfg, progress=False), quiet)


# --- decoding a batch on the GPU, and its fallback ------------------------------------------------------------


def _encoded(data_dir):
    catalog = scan("demo", str(data_dir))
    raws = [r.read() for r in catalog.records[:6]]
    png = io.BytesIO()
    Image.fromarray(np.full((40, 48, 3), 200, dtype=np.uint8)).save(png, format="PNG")
    raws[2] = png.getvalue()
    names = [f"x{i}" for i in range(len(raws))]
    want = torch.stack([torch.from_numpy(stream.decode_image(r, 24)).permute(2, 0, 1) for r in raws])
    return [torch.frombuffer(bytearray(r), dtype=torch.uint8) for r in raws], names, want


def test_a_batch_that_the_gpu_refuses_is_decoded_on_the_cpu(data_dir, capsys):
    raw, names, want = _encoded(data_dir)
    calls = []

    def refuse(batch, device, mode):
        calls.append(len(batch))
        raise RuntimeError("nvjpeg: unsupported")

    got = stream.decode_batch(raw, names, 24, torch.device("cpu"), gpu_decode=refuse)
    assert calls == [5] and torch.equal(got, want)  # the PNG never went to the JPEG decoder


def test_the_batched_jpeg_path_matches_the_cpu_decoder_closely(data_dir):
    raw, names, want = _encoded(data_dir)
    got = stream.decode_batch(raw, names, 24, torch.device("cpu"))  # torchvision's decode_jpeg, on the CPU here
    assert got.shape == want.shape == (6, 3, 24, 24) and got.dtype == torch.uint8
    assert torch.equal(got[2], want[2])  # PNG: the CPU decoder
    assert (got.float() - want.float()).abs().mean() < 6  # resampling differs by rounding, not by content


def test_shards_go_in_memory_when_they_fit_and_stream_when_they_do_not(data_dir, demo_shards, monkeypatch):
    def written(split):  # the split in the order empssl shard wrote its items (a seeded one)
        rows = torch.from_numpy(shard.write_order(len(split), 0))
        return replace(split, images=split.images[rows], labels=split.labels[rows])

    source_train, source_test = load_data("demo", str(data_dir), 32, progress=False)
    mem_train, mem_test = config_data(tiny_cfg(data_dir), False, (written(source_train), written(source_test)))
    for mode in ("memory", "auto"):
        cfg = tiny_cfg(data_dir, data=str(demo_shards), data_mode=mode)
        train_, test, split = stream.load_splits(cfg, False, lambda: pytest.fail("shards are not a folder"), quiet)
        assert split is None and torch.equal(train_.images, mem_train.images) and torch.equal(test.images,
                                                                                              mem_test.images)
    monkeypatch.setattr(load, "memory_available", lambda: 1000)
    lines = []
    cfg = tiny_cfg(data_dir, data=str(demo_shards), data_mode="auto")
    assert stream.load_splits(cfg, False, lambda: pytest.fail("shards"), lines.append)[2] is not None
    assert "streaming it" in lines[0]
    with pytest.raises(load.TooBigForMemory):
        stream.load_splits(cfg.replace(data_mode="memory"), False, lambda: pytest.fail("shards"), quiet)


def test_gpu_decoding_without_a_gpu_is_refused(tmp_path, data_dir, demo_shards, capsys):
    assert run_cli(tmp_path, demo_shards, "--decode", "cuda") == 2
    _one_line(capsys, "--decode cuda")
    assert not (tmp_path / "out").exists()


def test_raw_bytes_from_the_workers_are_decoded_a_batch_at_a_time(data_dir, demo_shards):
    cfg = tiny_cfg(data_dir, data=str(demo_shards), data_mode="stream")
    split = stream.load_splits(cfg, False, lambda: pytest.fail("stream asked"), quiet)[2]
    kw = dict(batch_size=20, seed=0, device="cpu", workers=1)
    with stream.StreamBatches(split, decode="cuda", **kw) as raw, stream.StreamBatches(split, **kw) as cpu:
        pairs = list(itertools.islice(zip(raw, cpu), 3))  # --decode cuda's path, with torchvision's CPU JPEG decoder
    assert len(pairs) == 3
    for a, b in pairs:
        assert a.shape == b.shape == (20, 3, 32, 32) and a.dtype == torch.uint8
        assert (a.float() - b.float()).abs().mean() < 6
