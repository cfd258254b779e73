"""A run knows its data: resuming over changed data is refused in one line (streamed and in-memory tiers over shards,
an in-memory folder), a checkpoint without the record still resumes; a shard truncated, deleted or replaced while
a run reads it stops with one line naming it, the last checkpoint kept."""

import importlib
import signal

import pytest

from empssl.checkpoint import read_checkpoint, save_atomic
from empssl.cli import main
from empssl.data.load import fingerprint
from empssl.shard import append_shards

from .conftest import TINY
from .test_stream import image_tree, quiet, small_shards, tiny_cfg

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
