"""A run knows its data: resuming over changed data is refused in one line (streamed and in-memory tiers over shards,
an in-memory folder), a checkpoint without the record still resumes; a shard truncated, deleted or replaced while
a run reads it stops with one line naming it, the last checkpoint kept."""

import importlib
import itertools
import os
import signal

import pytest
import torch

from empssl import stream
from empssl.checkpoint import read_checkpoint, save_atomic
from empssl.cli import main
from empssl.data import DataError
from empssl.data.load import fingerprint
from empssl.shard import append_shards, verify_shards

from .conftest import TINY
from .test_stream import image_tree, quiet, shards_of, small_shards, tiny_cfg

pytest.importorskip("litdata")
train_module = importlib.import_module("empssl.train")


def stop_in_step(monkeypatch, k):
    """A SIGINT (Ctrl-C) in this process's k-th training step: the loop saves that step and exits 130."""
    real, calls = train_module.train_step, [0]

    def step(*args, **kw):
        calls[0] += 1
        if calls[0] == k:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kw)

    monkeypatch.setattr(train_module, "train_step", step)


def train_cli(tmp_path, data, *extra):
    return main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "cache"),
                 "--image-size", "32", "--no-progress", "--epochs", "1", "--monitor-bank", "20", "--no-eval", *TINY,
                 *extra])


def one_line(capsys, *parts):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for p in parts:
        assert p in err, err
    return err


# --- resuming over changed data ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["stream", "memory"])
def test_resume_after_an_append_is_refused_with_one_line(tmp_path, data_dir, monkeypatch, capsys, mode):
    root = small_shards(tmp_path, data_dir)  # 60 training images in 6 shards
    with monkeypatch.context() as m:
        stop_in_step(m, 1)
        assert train_cli(tmp_path, root, "--data-mode", mode) == 130
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    assert read_checkpoint(tmp_path / "run")["data"]["train"] == 60
    more = image_tree(tmp_path / "more", data_dir, {"train": 2, "test": 0})
    append_shards(str(more), root, workers=1, progress=False)
    capsys.readouterr()
    assert train_cli(tmp_path, root, "--data-mode", mode) == 2
    one_line(capsys, f"{root / 'train'} now lists 8 shards / 80 images; this run was trained on 6 shards / 60 images",
             "new --out")
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_an_in_memory_run_over_a_folder_whose_images_changed_is_refused(tmp_path, data_dir, monkeypatch, capsys):
    src = image_tree(tmp_path / "src", data_dir, {"train": 6, "test": 2})
    with monkeypatch.context() as m:
        stop_in_step(m, 1)
        assert train_cli(tmp_path, src) == 130
    extra = src / "train" / "cat" / "extra.jpg"
    extra.write_bytes((src / "train" / "cat" / "0000.jpg").read_bytes())
    capsys.readouterr()
    assert train_cli(tmp_path, src) == 2
    one_line(capsys, f"{src} now holds 61 training images; this run was trained on 60 training images")
    (src / "train" / "dog" / "0000.jpg").unlink()  # the count is back, the files are not
    assert train_cli(tmp_path, src) == 2
    one_line(capsys, f"{src} has changed (file names, sizes or modification times)")
    assert read_checkpoint(tmp_path / "run")["step"] == 1


def test_a_checkpoint_without_the_record_resumes_with_a_note(tmp_path, data_dir, monkeypatch):
    cfg = tiny_cfg(data_dir, train_subset=60)  # 3 steps
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        stop_in_step(m, 1)
        train_module.train(cfg, tmp_path / "run", progress=False, log=quiet, evaluate_at_end=False)
    ckpt = read_checkpoint(tmp_path / "run")
    assert ckpt.pop("data") == {"train": 60, "files": fingerprint("demo", str(data_dir))}
    save_atomic(ckpt, tmp_path / "run" / "checkpoint.pt")  # as an older empssl wrote it
    lines = []
    train_module.train(cfg, tmp_path / "run", progress=False, log=lines.append, evaluate_at_end=False)
    assert any(line.startswith("note:") and "does not record the data" in line for line in lines), lines
    done = read_checkpoint(tmp_path / "run")
    assert done["step"] == 3 and done["data"]["train"] == 60  # recorded from now on


# --- a shard that changes while a run reads it -------------------------------------------------------------


def damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "deleted":
        path.unlink()
    else:  # the same size, other bytes: only its sha256 tells
        path.write_bytes(bytes(len(data)))
    return data


def damage_on_first_read(monkeypatch, shard, how, then=None):
    """Damage ``shard`` in the DataLoader worker as it prepares its first image (LitData has opened only the first
    few chunks of its order then); ``then()`` after that, in the worker. Returns where the original bytes are kept."""
    real, parent, done = stream._prepared_item, os.getpid(), shard.parents[2] / "original"  # tmp_path

    def prepared(*args, **kw):
        if os.getpid() != parent and not done.exists():
            done.write_bytes(damage(shard, how))
            if then:
                then()
        return real(*args, **kw)

    monkeypatch.setattr(stream, "_prepared_item", prepared)
    monkeypatch.setattr(stream, "_n_workers", lambda: 1)  # one worker reads the batches in step order
    return done


def read_only_in_step_3(root, cfg):
    """A train shard whose images the streamed run (one worker) reads in its third step only (and not before)."""
    _, _, split = stream.load_splits(cfg, False, lambda: pytest.fail("stream asked"), quiet)
    with stream.StreamBatches(split, batch_size=cfg.batch_size, seed=cfg.seed, device="cpu", workers=1) as batches:
        steps = [names for _, names in itertools.islice(batches.named(), 3)]
    shards = verify_shards(root, hashes=False).splits["train"].shards
    shard_of = {split.items.item(i)[2]: i // 2 for i in range(len(split.items))}  # 2 images per shard
    late = {shard_of[n] for n in steps[2]} - {shard_of[n] for n in steps[0] + steps[1]}
    return root / "train" / shards[min(late)].name


@pytest.mark.parametrize("how", ["truncated", "deleted", "replaced"])
def test_a_shard_damaged_while_a_streamed_run_reads_it_is_one_line_and_the_run_resumes_once_fixed(
        tmp_path, data_dir, monkeypatch, capsys, how):
    root = shards_of(image_tree(tmp_path / "src", data_dir, {"train": 6, "test": 2}), tmp_path / "shards",
                     shard_size=2)
    cfg = tiny_cfg(data_dir, data=str(root), data_mode="stream", train_subset=0, monitor_bank=20)
    shard = read_only_in_step_3(root, cfg)
    with monkeypatch.context() as m:
        done = damage_on_first_read(m, shard, how)
        assert train_cli(tmp_path, root, "--data-mode", "stream", "--checkpoint-every", "1") == 2
    said = {"truncated": "truncated or changed", "deleted": "missing shard", "replaced": "does not match its sha256"}
    one_line(capsys, str(shard), said[how], "resume")
    # the steps before the read are kept (LitData checks a chunk's header when it maps it, a few chunks ahead)
    assert read_checkpoint(tmp_path / "run")["step"] in (1, 2)
    shard.write_bytes(done.read_bytes())  # restored
    assert train_cli(tmp_path, root, "--data-mode", "stream", "--checkpoint-every", "1") == 0
    assert read_checkpoint(tmp_path / "run")["step"] == 3


def test_a_worker_killed_by_sigbus_names_the_truncated_shard(tmp_path, data_dir, monkeypatch):
    root = shards_of(image_tree(tmp_path / "src", data_dir, {"train": 6, "test": 2}), tmp_path / "shards",
                     shard_size=2)
    cfg = tiny_cfg(data_dir, data=str(root), data_mode="stream", train_subset=0, monitor_bank=20)
    shard = read_only_in_step_3(root, cfg)
    # what the kernel does to a worker reading a memory-mapped shard that was cut short under it
    damage_on_first_read(monkeypatch, shard, "truncated", lambda: os.kill(os.getpid(), signal.SIGBUS))
    split = stream.load_splits(cfg, False, lambda: pytest.fail("stream asked"), quiet)[2]
    with pytest.raises(DataError, match=f"shard {shard} is .* bytes, manifest.json says .*truncated"):
        # the death is raised where the main process happens to be: leaving the block names the shard
        with stream.StreamBatches(split, batch_size=20, seed=cfg.seed, device="cpu") as batches:
            list(itertools.islice(batches, 3))


@pytest.mark.parametrize("how", ["truncated", "deleted"])
def test_a_shard_lost_before_the_in_memory_tier_or_eval_decodes_it_is_one_line(tmp_path, data_dir, how):
    root = small_shards(tmp_path, data_dir)
    train, _, _, _ = stream.open_shards(root)  # checked here, then damaged before it is decoded
    split = stream.StreamedSplit(train, torch.arange(60), train.labels(), [str(c) for c in range(10)], 32, str(root))
    shard = sorted((root / "train").glob("chunk-*.bin"))[3]
    damage(shard, how)
    with pytest.raises(DataError, match=f"{'missing shard' if how == 'deleted' else 'shard'} {shard}"):
        split.decoded(progress=False)
