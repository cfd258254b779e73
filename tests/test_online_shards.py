"""Online learning over a shard folder that ``empssl shard --append`` adds to (empssl.online.ShardStream): a thread
appends while training runs and every image is learned once, in item order (the seeded order empssl shard writes
each batch in); a killed run resumes at the stream position with appends in between; corrupt, truncated, missing
and rewritten shards; an unfinished shard folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from empssl.checkpoint import read_checkpoint
from empssl.cli import main
from empssl.config import ConfigError
from empssl.data import DataError
from empssl.files import read_jsonl
from empssl.online import train_online
from empssl.report import write_report
from empssl.shard import append_shards, verify_shards, write_order, write_shards
from empssl.train import TrainError

from .conftest import TINY
from .test_online import CEILING, SETTLE, learned, online_cfg, png_bytes, waits_then_times_out

pytest.importorskip("litdata")

K = 7  # images per shard: batches of 10 straddle shards


@pytest.fixture(scope="module")
def pictures(demo_data) -> np.ndarray:
    train, _ = demo_data
    return train.images[:120].permute(0, 2, 3, 1).numpy()  # (120, 32, 32, 3) uint8


def batch_folder(root: Path, b: int, images: np.ndarray, broken: int | None = None) -> tuple[Path, list[str]]:
    """``root/b<b>/`` holding ``images`` as PNGs named ``b<b>_<i>.png`` (unique across batches); ``broken``: that one
    keeps its header but loses its pixels (stored by empssl shard, which reads headers only; it does not decode).
    Returns the folder and its names in name order (:func:`in_item_order` gives the order its shards hold them)."""
    folder = root / f"b{b}"
    folder.mkdir(parents=True)
    names = []
    for i, img in enumerate(images):
        data = png_bytes(img)
        name = f"b{b}_{i:03d}.png"
        (folder / name).write_bytes(data[:60] if i == broken else data)
        names.append(name)
    return folder, names


def in_item_order(names: list[str]) -> list[str]:
    """``names`` (one source folder, or one append's) in the order empssl shard writes them as items
    (:func:`empssl.shard.write_order`, the folder's seed 0): the order the stream learns them in."""
    return [names[i] for i in write_order(len(names), 0)]


def shard_folder(tmp_path: Path, images: np.ndarray) -> tuple[Path, list[str]]:
    """A shard folder of ``images`` (shards of K), and their names in item order."""
    src, names = batch_folder(tmp_path / "src", 0, images)
    out = tmp_path / "shards"
    write_shards(str(src), out, workers=1, shard_size=K, progress=False)
    return out, in_item_order(names)


def test_a_thread_appends_while_training_runs_and_each_image_is_learned_once_in_order(tmp_path, data_dir, pictures):
    shards, names = shard_folder(tmp_path, pictures[:20])
    broken = int(write_order(15, 0)[4])  # the b2 image that its append writes as item 4, learned before the stop
    batches = [batch_folder(tmp_path / "src", b, pictures[20 + 15 * (b - 1): 20 + 15 * b],
                            broken=broken if b == 2 else None) for b in (1, 2)]

    out = tmp_path / "run"
    lines: list[str] = []

    def waits() -> int:
        return sum(line.startswith(f"waiting for shards in {shards}") for line in lines)

    def appender() -> None:
        for k, (folder, _) in enumerate(batches, 1):
            deadline = time.time() + CEILING  # once training learned what was there and says it waits for more
            while time.time() < deadline and waits() < k:
                time.sleep(0.05)
            append_shards(str(folder), shards, workers=1, progress=False)

    t = threading.Thread(target=appender, daemon=True)
    t.start()
    res = train_online(online_cfg(shards, data_dir, online_stop=40), out, progress=False, log=lines.append)
    t.join()
    bad = f"b2_{broken:03d}.png"
    everything = names + in_item_order(batches[0][1]) + in_item_order(batches[1][1])
    expected = [n for n in everything if n != bad]  # the broken one is skipped, counted, named
    assert res["stream"] == "shards" and res["steps"] == 4 and res["images_seen"] == 40
    assert res["images_skipped"] == 1 and any("skipped:" in line and bad in line for line in lines)
    assert waits() == 2 and learned(out)[:20] == names  # it learned the 20 there, then waited for each append
    assert learned(out) == expected[:40]
    trail = read_jsonl(out / "stream.jsonl")
    # shards 0-2 hold the first 20 (7 + 7 + 6), 3-5 b1's 15 (7 + 7 + 1), 6-8 b2's 15
    assert [r["from"] for r in trail] == [[0, 0], [1, 3], [2, 6], [4, 3]]
    assert trail[-1]["to"] == [6, 6]  # b2's items 0 .. 5, the broken item 4 skipped: 5 images
    state = read_checkpoint(out)["source"]
    manifest = verify_shards(shards)  # the appended folder checks as a whole
    assert state["kind"] == "shards" and state["images"] == 40 and (state["shard"], state["item"]) == (6, 6)
    assert state["skipped"] == [[6, 4, bad]]
    assert state["shard_name"] == manifest.splits["train"].shards[6].name
    assert len(manifest.splits["train"].shards) == 9 and manifest.splits["train"].images == 50


def test_a_killed_run_resumes_at_the_stream_position_with_appends_in_between(tmp_path, data_dir, pictures):
    shards, names = shard_folder(tmp_path, pictures[:35])  # three batches, then 5 that wait for a fourth
    out = tmp_path / "run"
    args = ["train", "--online", "--data", str(shards), "--data-dir", str(data_dir), "--out", str(out),
            "--no-progress", "--online-settle", str(SETTLE), "--online-timeout", str(CEILING), *TINY, "--batch-size",
            "10", "--checkpoint-every", "2", "--log-every", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "empssl.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + CEILING
    while time.time() < deadline and len(learned(out)) < 30:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # after step 3; the checkpoint is step 2's
    proc.wait()
    assert len(learned(out)) == 30 and read_checkpoint(out)["step"] == 2
    # appended while it was stopped
    more, more_names = batch_folder(tmp_path / "src", 1, pictures[35:60])
    append_shards(str(more), shards, workers=1, progress=False)
    assert main([*args, "--online-stop", "60", "--no-eval"]) == 0
    # steps 3.. learned again from step 2's position, none twice
    assert learned(out) == names + in_item_order(more_names)
    assert [r["step"] for r in read_jsonl(out / "stream.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_a_corrupt_shard_appended_mid_run_stops_with_one_line_and_the_run_resumes_once_fixed(tmp_path, data_dir,
                                                                                           pictures, capsys):
    shards, names = shard_folder(tmp_path, pictures[:14])  # shards 0, 1
    more, more_names = batch_folder(tmp_path / "src", 1, pictures[14:30])
    append_shards(str(more), shards, workers=1, progress=False)  # shards 2, 3, 4
    bad = shards / "train" / verify_shards(shards).splits["train"].shards[2].name
    good = bad.read_bytes()
    bad.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # the same size, another sha256
    out = tmp_path / "run"
    args = ["train", "--online", "--data", str(shards), "--data-dir", str(data_dir), "--out", str(out),
            "--no-progress", "--online-timeout", "1", "--online-settle", str(SETTLE), *TINY, "--batch-size", "10",
            "--checkpoint-every", "100", "--no-eval"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"shard {bad} does not match its sha256" in err
    assert read_checkpoint(out)["step"] == 1 and learned(out) == names[:10]  # the step learned before it is kept
    bad.write_bytes(good)
    assert main([*args, "--online-stop", "30"]) == 0
    assert learned(out) == names + in_item_order(more_names)


def test_a_truncated_or_missing_shard_is_one_line_and_leaves_no_run(tmp_path, data_dir, pictures, capsys):
    shards, _ = shard_folder(tmp_path, pictures[:21])
    chunks = [shards / "train" / f.name for f in verify_shards(shards).splits["train"].shards]
    out = tmp_path / "run"
    args = ["train", "--online", "--data", str(shards), "--data-dir", str(data_dir), "--out", str(out),
            "--no-progress", "--online-timeout", "1", *TINY, "--batch-size", "10"]
    data = chunks[1].read_bytes()
    chunks[1].write_bytes(data[:-5])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated or changed" in err and not out.exists()
    chunks[1].unlink()  # the manifest lists a shard that is not there
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"missing shard {chunks[1]}" in err and not out.exists()


def test_a_rewritten_folder_is_not_taken_for_an_appended_one(tmp_path, data_dir, pictures):
    shards, names = shard_folder(tmp_path, pictures[:20])
    out = tmp_path / "run"
    train_online(online_cfg(shards, data_dir, online_stop=10), out, progress=False, log=lambda s: None)
    # the folder sharded again from another source: its shard 1 (where the stream stands) is another file
    other, _ = batch_folder(tmp_path / "src", 1, pictures[20:40])
    for p in sorted(shards.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    write_shards(str(other), shards, workers=1, shard_size=K, progress=False)
    with pytest.raises(DataError, match="the checkpoint's stream position is shard 1 .* rewritten, not appended"):
        train_online(online_cfg(shards, data_dir, online_stop=20), out, progress=False, log=lambda s: None)
    assert learned(out) == names[:10]


def test_an_unfinished_shard_folder_waits_then_stops_at_the_timeout_with_one_line(tmp_path, data_dir, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / ".plan.json").write_text("{}")  # what empssl shard writes first; no manifest.json yet
    waits_then_times_out(shards, tmp_path / "run", data_dir, capsys,
                         f"waiting for shards in {shards} (no manifest.json yet: empssl shard is still writing) ...")


def test_shards_the_manifest_does_not_list_yet_are_not_read(tmp_path, data_dir, pictures):
    shards, names = shard_folder(tmp_path, pictures[:20])
    old = (shards / "manifest.json").read_bytes()
    more, more_names = batch_folder(tmp_path / "src", 1, pictures[20:40])
    append_shards(str(more), shards, workers=1, progress=False)
    new = (shards / "manifest.json").read_bytes()
    # as between an append's index.json and its manifest: the new shards are there, in index.json, not listed yet
    (shards / "manifest.json").write_bytes(old)
    verify_shards(shards)
    out = tmp_path / "run"
    # with the kNN monitor every 20 images, and the report: as for a folder
    cfg = online_cfg(shards, data_dir, online_timeout=1.0, online_eval="demo", online_eval_every=20,
                     monitor_bank=100, monitor_test=50, train_subset=200, test_subset=100, checkpoint_every=100)
    res = train_online(cfg, out, progress=False, log=lambda s: None)
    assert res["images_seen"] == 20 and learned(out) == names
    (shards / "manifest.json").write_bytes(new)  # the append's last step
    res = train_online(cfg, out, progress=False, log=lambda s: None)
    assert res["images_seen"] == 40 and learned(out) == names + in_item_order(more_names)
    assert [p["images_seen"] for p in res["accuracy_vs_images"]] == [0, 20, 40]
    md = write_report([out], tmp_path / "report").read_text()
    assert "## Online learning" in md and f"| run | emp-ssl | {shards} | 40 | 0 | no new image for 1 s |" in md


def test_a_folder_runs_checkpoint_is_not_resumed_over_shards(tmp_path, data_dir, pictures):
    folder, out = tmp_path / "shards", tmp_path / "run"
    folder.mkdir()
    for i in range(10):
        (folder / f"{i}.png").write_bytes(png_bytes(pictures[i]))
    train_online(online_cfg(folder, data_dir, online_stop=10), out, progress=False, log=lambda s: None)
    with pytest.raises(ConfigError, match="holds a run with data="):  # another --data: the config rule says so
        train_online(online_cfg(tmp_path / "in", data_dir, online_stop=20), out, progress=False, log=lambda s: None)
    for i in range(10):
        (folder / f"{i}.png").unlink()
    shards, _ = shard_folder(tmp_path, pictures[10:30])  # the same --data, now a shard folder
    with pytest.raises(TrainError, match="over a folder of image files; --data .* is a shard folder"):
        train_online(online_cfg(shards, data_dir, online_stop=20), out, progress=False, log=lambda s: None)


def test_the_held_out_set_may_be_a_shard_folder(tmp_path, data_dir, demo_data):
    """--online-eval over shards of the demo data: the demo's bank and queries, in memory, as its shards hold them
    (each split in its write order), cut by --train-subset / --test-subset as the demo would be."""
    import torch

    from empssl.data import ImageData
    from empssl.online import _held_out

    shards = tmp_path / "demo-shards"
    write_shards("demo", shards, workers=1, progress=False)
    cfg = online_cfg(tmp_path / "in", data_dir, train_subset=200, test_subset=100)
    bank, queries = _held_out(cfg.replace(online_eval=str(shards)), progress=False)
    for got, split, n in ((bank, demo_data[0], 200), (queries, demo_data[1], 100)):
        rows = torch.from_numpy(write_order(len(split), 0))
        ref = ImageData(split.images[rows], split.labels[rows], list(split.classes), split.class_names).subset(n)
        assert len(got) == n and torch.equal(got.images, ref.images) and torch.equal(got.labels, ref.labels)
