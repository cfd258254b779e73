"""Online learning (empssl.online): a folder that a thread fills while training runs; each image learned once, in
arrival order; the stop, Ctrl-C and resume at the stream position, the empty-folder timeout, the monitor, the report."""

import json
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from empssl.checkpoint import read_checkpoint
from empssl.cli import main
from empssl.config import Config, ConfigError
from empssl.files import read_jsonl
from empssl.online import FolderStream, train_online
from empssl.report import write_report
from empssl.train import ENDLESS, Run, train

from .conftest import TINY

SETTLE = 0.2  # seconds a file must stay unchanged before it is read (the tests' writers are fast)
# --online-timeout of the runs that stop at --online-stop or Ctrl-C: a ceiling that only ends a run already wrong,
# however long a busy machine makes the writers wait between images (the timeout itself is tested on folders
# that are complete before the run starts)
CEILING = 600.0


def online_cfg(folder, data_dir, **kw) -> Config:
    base = dict(data=str(folder), data_dir=str(data_dir), online=True, online_settle=SETTLE, online_timeout=CEILING,
                width=4, hidden_dim=32, z_dim=16, patch_size=8, num_patches=4, batch_size=10, test_patches=2,
                probe_epochs=2, device="cpu", log_every=1, checkpoint_every=2)
    return Config(**{**base, **kw})


def png_bytes(img: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


class Writer(threading.Thread):
    """Writes ``n`` of the demo images into ``folder`` one by one (``img_00000.png`` ...), ``delay`` s apart, in
    an order whose names do not sort like their arrival (so that the order learned must be the arrival's)."""

    def __init__(self, folder: Path, images: np.ndarray, start: int, n: int, delay: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.folder, self.images, self.delay = folder, images, delay
        self.names = [f"img_{(start + i) * 7919 % 100003:05d}.png" for i in range(n)]
        self.offset = start

    def run(self) -> None:
        for i, name in enumerate(self.names):
            (self.folder / name).write_bytes(png_bytes(self.images[self.offset + i]))
            time.sleep(self.delay)


@pytest.fixture(scope="module")
def pictures(demo_data) -> np.ndarray:
    train, _ = demo_data
    return train.images[:200].permute(0, 2, 3, 1).numpy()  # (200, 32, 32, 3) uint8


def learned(out: Path) -> list[str]:
    """The images of ``out``'s stream.jsonl, in order (none before it is written)."""
    path = out / "stream.jsonl"
    return [n for rec in read_jsonl(path) for n in rec["images"]] if path.exists() else []


def test_each_image_is_learned_once_in_arrival_order_then_resumed_at_the_stream_position(tmp_path, data_dir,
                                                                                        pictures):
    folder, out = tmp_path / "in", tmp_path / "run"
    folder.mkdir()
    writer = Writer(folder, pictures, 0, 45)
    writer.start()
    lines: list[str] = []
    res = train_online(online_cfg(folder, data_dir, online_stop=25), out, progress=False, log=lines.append)
    writer.join()
    # --online-stop 25 with batches of 10: three steps, the first 30 arrivals, in arrival order
    assert res["steps"] == 3 and res["images_seen"] == 30 and res["stopped"].startswith("learned --online-stop")
    assert learned(out) == writer.names[:30]
    ckpt = read_checkpoint(out)
    assert ckpt["step"] == 3 and ckpt["finished"] and ckpt["source"]["names"] == writer.names[:30]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert "epoch" not in read_jsonl(out / "metrics.jsonl")[0]  # no epochs in a stream
    # the same command again: nothing to learn, the same account of the stream
    again = train_online(online_cfg(folder, data_dir, online_stop=25), out, progress=False, log=lines.append)
    assert again["steps"] == 3 and again["images_seen"] == 30 and learned(out) == writer.names[:30]

    # resumed with a later stop: the next unseen files (15 there, 10 more arriving), none learned twice
    more = Writer(folder, pictures, 45, 10)
    more.start()
    res = train_online(online_cfg(folder, data_dir, online_stop=50), out, progress=False, log=lines.append)
    more.join()
    assert res["steps"] == 5 and res["images_seen"] == 50
    assert learned(out) == (writer.names + more.names)[:50]
    assert read_checkpoint(out)["source"]["names"] == learned(out)
    assert len(set(learned(out))) == 50


def test_a_file_being_written_waits_and_a_broken_one_is_skipped(tmp_path, data_dir, pictures):
    folder, out = tmp_path / "in", tmp_path / "run"
    folder.mkdir()
    data = [png_bytes(p) for p in pictures[:21]]
    settle = 1.0  # the half-written file's second half must come within it: half of it is left for a busy machine

    def slow_writer() -> None:
        for i in range(10):
            (folder / f"a{i:02d}.png").write_bytes(data[i])
            time.sleep(0.01)
        (folder / "broken.png").write_bytes(data[10][: len(data[10]) // 2])  # stays truncated: skipped
        (folder / ".b00.png.tmp").write_bytes(data[11])  # hidden while written, renamed when done
        with (folder / "b01.png").open("wb") as f:  # written in two halves, settle / 2 apart: read whole
            f.write(data[12][:100])
            f.flush()
            time.sleep(settle / 2)
            f.write(data[12][100:])
        time.sleep(0.05)
        os.rename(folder / ".b00.png.tmp", folder / "b00.png")
        for i in range(13, 21):
            (folder / f"c{i:02d}.png").write_bytes(data[i])
            time.sleep(0.01)

    t = threading.Thread(target=slow_writer, daemon=True)
    t.start()
    lines: list[str] = []
    res = train_online(online_cfg(folder, data_dir, online_stop=20, online_settle=settle), out, progress=False,
                       log=lines.append)
    t.join()
    got = learned(out)
    assert res["images_skipped"] == 1 and any("broken.png" in line for line in lines)
    assert "broken.png" not in got and len(got) == len(set(got)) == 20
    assert got[:10] == [f"a{i:02d}.png" for i in range(10)] and {"b00.png", "b01.png"} <= set(got)
    assert not any(n.startswith(".") for n in got)


def test_ctrl_c_saves_the_stream_position_and_exits_130(tmp_path, data_dir, pictures, capsys):
    folder, out = tmp_path / "in", tmp_path / "run"
    folder.mkdir()
    writer = Writer(folder, pictures, 0, 25)  # two full batches, then 5 that wait for a third
    writer.start()

    def interrupt() -> None:
        deadline = time.time() + CEILING
        while time.time() < deadline and len(learned(out)) < 20:
            time.sleep(0.05)
        time.sleep(SETTLE * 3)  # the 5 left are ready and waiting for a full batch
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    args = ["train", "--online", "--data", str(folder), "--data-dir", str(data_dir), "--out", str(out),
            "--no-progress", "--online-settle", str(SETTLE), "--online-timeout", str(CEILING), *TINY, "--batch-size",
            "10", "--checkpoint-every", "100"]
    assert main(args) == 130
    assert "interrupted at step 2, after 20 images" in capsys.readouterr().err
    assert read_checkpoint(out)["source"]["names"] == writer.names[:20] == learned(out)
    # the 5 of the unfilled batch were not learned: the resumed run learns them first
    more = Writer(folder, pictures, 25, 5)
    more.start()
    assert main([*args, "--online-stop", "30", "--no-eval"]) == 0
    more.join()
    assert learned(out) == writer.names + more.names


def waits_then_times_out(folder: Path, out: Path, data_dir: Path, capsys, waiting: str) -> None:
    """``train --online --data folder`` says ``waiting`` and, after the 1 s timeout (not before it), stops: one
    line, exit 2, and no run directory left behind."""
    t0 = time.perf_counter()
    code = main(["train", "--online", "--data", str(folder), "--data-dir", str(data_dir), "--out", str(out),
                 "--no-progress", "--online-timeout", "1", "--online-settle", str(SETTLE), *TINY])
    captured = capsys.readouterr()
    assert code == 2 and time.perf_counter() - t0 >= 1
    assert waiting in captured.out
    assert captured.err.count("\n") == 1 and "nothing learned" in captured.err and "--online-timeout" in captured.err
    assert not out.exists()  # nothing left behind


def test_an_empty_folder_waits_then_stops_at_the_timeout_with_one_line(tmp_path, data_dir, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    waits_then_times_out(folder, tmp_path / "run", data_dir, capsys, f"waiting for images in {folder} ...")


def test_fewer_images_than_a_batch_learn_nothing_and_say_so(tmp_path, data_dir, pictures, capsys):
    folder, out = tmp_path / "in", tmp_path / "run"
    folder.mkdir()
    Writer(folder, pictures, 0, 3, delay=0.0).run()
    code = main(["train", "--online", "--data", str(folder), "--data-dir", str(data_dir), "--out", str(out),
                 "--no-progress", "--online-timeout", "1", "--online-settle", str(SETTLE), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "(3, fewer than a batch of 20)" in err and not out.exists()


def test_not_a_folder_is_one_line(tmp_path, data_dir, capsys):
    code = main(["train", "--online", "--data", str(tmp_path / "nope"), "--data-dir", str(data_dir), "--out",
                 str(tmp_path / "run"), "--no-progress", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not a folder" in err
    assert main(["train", "--online-eval-every", "10", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                 *TINY]) == 2
    lit = tmp_path / "litdata"
    lit.mkdir()
    (lit / "index.json").write_text("{}")
    with pytest.raises(ConfigError, match="LitData folder without empssl's manifest.json"):  # said at once
        train_online(online_cfg(lit, data_dir), tmp_path / "r3", progress=False, log=lambda s: None)
    assert not (tmp_path / "r3").exists()
    with pytest.raises(ConfigError, match="train --online"):  # the stream is opened by train_online
        train(online_cfg(tmp_path, data_dir), tmp_path / "r2", progress=False, log=lambda s: None)
    assert not (tmp_path / "r2").exists()


def test_monitor_records_accuracy_against_images_seen_and_the_report_shows_it(tmp_path, data_dir, pictures):
    folder, out = tmp_path / "in", tmp_path / "run"
    folder.mkdir()
    writer = Writer(folder, pictures, 0, 55, delay=0.0)
    writer.run()  # all there before the run starts: the 1 s timeout ends it only once they are learned
    # no --online-stop: the stream is followed until no image arrived for 1 s; 5 steps, 5 images left waiting
    cfg = online_cfg(folder, data_dir, online_timeout=1.0, online_eval="demo", online_eval_every=20,
                     monitor_bank=100, monitor_test=50, train_subset=200, test_subset=100, checkpoint_every=100)
    res = train_online(cfg, out, progress=False, log=lambda s: None)
    assert res["stopped"] == "no new image for 1 s" and res["images_seen"] == 50 and res["images_pending"] == 5
    mon = read_jsonl(out / "monitor.jsonl")
    # every 20 images, and once more at the stop
    assert [(r["step"], r["images_seen"]) for r in mon] == [(0, 0), (2, 20), (4, 40), (5, 50)]
    assert all(0 <= r["knn_top1"] <= 100 and "epoch" not in r for r in mon)
    assert [p["images_seen"] for p in res["accuracy_vs_images"]] == [0, 20, 40, 50]
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["mode"] == "online" and on_disk["data"] == "demo" and "linear_top1" in on_disk
    assert read_checkpoint(out)["step"] == 5 and not read_checkpoint(out)["finished"]
    md = write_report([out], tmp_path / "report").read_text()
    assert "## Online learning" in md and "accuracy_vs_images.png" in md
    assert "| run | emp-ssl | " + str(folder) + " | 50 | 0 | no new image for 1 s |" in md
    assert f"| run | 50 | 5 | {mon[-1]['knn_top1']:.1f} |" in md
    assert (tmp_path / "report" / "accuracy_vs_images.png").is_file()


def online_lr(cfg: Config, step: int, warmup: int) -> float:
    """The online run's learning rate at ``step`` (Run.lr of a stream without --online-stop)."""
    return Run.lr(SimpleNamespace(cfg=cfg, schedule_steps=ENDLESS, warmup_steps=warmup), step)  # type: ignore[arg-type]


def test_learning_rate_warms_up_then_stays_constant():
    cfg = Config(lr=0.4, batch_size=10, online=True, online_warmup=50, warmup_start_lr=0.0, min_lr=0.01)
    lrs = [online_lr(cfg, s, warmup=5) for s in range(12)]
    assert lrs[0] == 0.0 and lrs[4] == pytest.approx(0.4) and all(v == 0.4 for v in lrs[5:])
    assert all(a < b for a, b in zip(lrs[:5], lrs[1:5]))
    assert online_lr(Config(lr=0.3, online=True), 0, warmup=0) == 0.3  # no warm-up: constant from the first step
    assert online_lr(Config(lr=0.3), ENDLESS, warmup=0) == 0.0  # offline, the cosine ends at --min-lr


def test_arrival_order_is_poll_then_mtime_then_name(tmp_path):
    for name, mtime in (("b.png", 10), ("a.png", 20), ("c.png", 10)):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, ns=(mtime * 10**9, mtime * 10**9))
    stream = FolderStream(tmp_path, settle=0.01)
    assert stream.poll() == 0  # first look: not yet seen unchanged for the settle time
    time.sleep(0.02)
    assert stream.poll() == 3 and list(stream.ready) == ["b.png", "c.png", "a.png"]
    (tmp_path / "b.png").write_bytes(b"rewritten")  # a file already taken is never read again
    time.sleep(0.02)
    assert stream.poll() == 0 and stream.poll() == 0
