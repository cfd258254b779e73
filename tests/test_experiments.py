"""The experiments: accuracy monitoring during training (and that it leaves training bitwise untouched), the
patch-count and test-patch ablations, t-SNE, transfer to another dataset, and a report of real runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from empssl.checkpoint import read_checkpoint
from empssl.cli import main
from empssl.config import Config, ConfigError
from empssl.evaluate import _chunk_generator, extract_features, extract_prefix_features
from empssl.files import read_jsonl
from empssl.methods import create_method
from empssl.monitor import Monitor, monitor_interval
from empssl.patches import Augment, make_patches
from empssl.rundir import RunSession, load_checkpoint
from empssl.train import config_data, train

from .conftest import TINY, assert_hit_rate
from .test_report import assert_png
from .test_train import tiny_cfg

TINY_NO_PATCHES = [a for i, a in enumerate(TINY) if "--num-patches" not in TINY[max(i - 1, 0):i + 1]]
MONITORED = dict(train_subset=60, test_subset=30, epochs=1, eval_every=2, monitor_bank=40, monitor_test=20,
                 log_every=1)


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory, data_dir):
    """A tiny finished run (3 steps of 20 demo images) with the kNN monitor every 2 steps, evaluated."""
    out = tmp_path_factory.mktemp("runs") / "monitored"
    train(tiny_cfg(data_dir, **MONITORED), out, progress=False, log=quiet)
    return out


# --- monitoring --------------------------------------------------------------------------------------------


def test_monitor_records_and_leaves_weights_bitwise_identical(monitored_run, data_dir, tmp_path):
    recs = read_jsonl(monitored_run / "monitor.jsonl")
    assert [r["step"] for r in recs] == [0, 2, 3]  # the untrained encoder, every 2 steps, the last step
    for r in recs:
        assert r["monitor_patches"] == 4
        assert_hit_rate(r["knn_top1"], r["n_test"])
        assert r["patches_seen"] == r["step"] * 20 * 4 and (r["n_bank"], r["n_test"]) == (40, 20)
        assert 0 <= r["train_s"] <= r["elapsed_s"]
    assert recs[1]["train_s"] > 0 and recs[2]["elapsed_s"] - recs[1]["elapsed_s"] >= recs[1]["monitor_s"]
    # the last record is the kNN of the final weights: the same check of the saved checkpoint gives it again
    model, cfg, _ = load_checkpoint(monitored_run)
    (tmp_path / "again").mkdir()
    again = Monitor(cfg, *config_data(cfg, progress=False), torch.device("cpu"), tmp_path / "again", steps_per_epoch=3,
                    total_steps=3, patches_per_step=80)
    again.start(model)  # a fresh run records the encoder it is given at step 0
    assert read_jsonl(tmp_path / "again" / "monitor.jsonl")[0]["knn_top1"] == recs[-1]["knn_top1"]
    results = json.loads((monitored_run / "results.json").read_text())
    assert results["monitor_seconds"] >= sum(r["monitor_s"] for r in recs) * 0.99
    assert results["train_seconds"] > 0 and results["device"] == "cpu"

    plain = tmp_path / "plain"
    train(tiny_cfg(data_dir, **{**MONITORED, "eval_every": 0}), plain, progress=False, log=quiet,
          evaluate_at_end=False)
    assert not (plain / "monitor.jsonl").exists()
    a, b = read_checkpoint(monitored_run), read_checkpoint(plain)
    for key, value in a["model"].items():  # includes the BatchNorm running statistics
        assert torch.equal(value, b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and torch.equal(a["rng"]["patches"], b["rng"]["patches"])


def test_monitor_check_touches_no_state(demo_data, tmp_path):
    cfg = Config(width=4, hidden_dim=32, z_dim=16, patch_size=8, eval_every=1, monitor_bank=30, monitor_test=10,
                 device="cpu")
    torch.manual_seed(0)
    model = create_method(cfg).build_model()
    with torch.no_grad():  # non-trivial running statistics
        model(torch.randn(8, 3, 8, 8))
    model.train()
    mon = Monitor(cfg, *demo_data, torch.device("cpu"), tmp_path, steps_per_epoch=5, total_steps=5,
                  patches_per_step=80)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    mon.start(model)
    assert mon.after_step(model, 1) > 0
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    recs = read_jsonl(tmp_path / "monitor.jsonl")
    assert [r["step"] for r in recs] == [0, 1]
    assert recs[0]["knn_top1"] == recs[1]["knn_top1"]  # same weights, same seeded patches -> same accuracy


@pytest.mark.parametrize("eval_every, expected", [(0, 0), (5, 5), (1, 1), (0.5, 5), (0.25, 2), (0.01, 1)])
def test_monitor_interval(eval_every, expected):
    assert monitor_interval(eval_every, steps_per_epoch=10) == expected


def test_monitor_resume_keeps_clock_and_drops_lost_records(demo_data, tmp_path):
    lines = [json.dumps({"step": s, "knn_top1": 1.0}) for s in (0, 2, 4)]
    (tmp_path / "monitor.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "kn')
    cfg = Config(eval_every=2, monitor_bank=10, monitor_test=10)
    session = RunSession(tmp_path, quiet)
    session.before = {"train_seconds": 7.0, "monitor_seconds": 3.0}  # as resume() reads the checkpoint's clock
    mon = Monitor(cfg, *demo_data, torch.device("cpu"), tmp_path, steps_per_epoch=10, total_steps=10,
                  patches_per_step=1, start_step=2, session=session)
    assert [r["step"] for r in read_jsonl(tmp_path / "monitor.jsonl")] == [0, 2]
    clock = session.clock()
    assert clock == {"train_seconds": 7.0, "monitor_seconds": 3.0, "elapsed_seconds": 10.0}
    mon.start(create_method(Config(width=4, hidden_dim=32, z_dim=16)).build_model())  # resumed: no step-0 record
    assert session.clock()["train_seconds"] >= 7.0 and len(read_jsonl(tmp_path / "monitor.jsonl")) == 2


@pytest.mark.parametrize("value", [-1.0, 1.5, 2.25])
def test_eval_every_rejects_bad_values(value, capsys, tmp_path):
    with pytest.raises(ConfigError, match="--eval-every"):
        Config(eval_every=value).validate()
    code = main(["train", "--out", str(tmp_path / "r"), "--eval-every", str(value)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--eval-every" in err


# --- test-patch ablation -----------------------------------------------------------------------------------


def test_prefix_features_average_the_first_patches():
    torch.manual_seed(0)
    model = create_method(Config(width=4, hidden_dim=24, z_dim=8)).build_model().eval()
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    aug = Augment(size=8)
    got = extract_prefix_features(model, images, aug, [4, 1, 2], seed=3)
    assert sorted(got) == [1, 2, 4]
    with torch.no_grad():
        patches = make_patches(images, 4, aug, _chunk_generator(3, 0, torch.device("cpu")))  # (4, 5, 3, 8, 8)
        per_patch = model.features(patches.flatten(0, 1)).view(4, 5, -1)
    for m in (1, 2, 4):
        torch.testing.assert_close(got[m], per_patch[:m].mean(0))
    assert torch.equal(got[4], extract_features(model, images, aug, 4, seed=3))  # the largest bag is the usual one


def test_ablate_test_patches_cli(monitored_run, capsys):
    code = main(["ablate-test-patches", "--checkpoint", str(monitored_run), "--counts", "4,1,2", "--no-progress",
                 "--probe-epochs", "2"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((monitored_run / "test_patch_ablation.json").read_text())
    assert [r["test_patches"] for r in res["rows"]] == [1, 2, 4] and res["max_patches"] == 4
    assert res["n_train"] == 60 and res["n_test"] == 30 and res["step"] == 3
    for r in res["rows"]:
        assert_hit_rate(r["linear_top1"], 30)
        assert_hit_rate(r["knn_top1"], 30)
    md = (monitored_run / "test_patch_ablation.md").read_text()
    assert md.count("\n| ") == 4  # header + 3 rows
    assert_png(monitored_run / "test_patch_ablation.png")


@pytest.mark.parametrize("argv, needle", [
    (["ablate-test-patches", "--checkpoint", "{run}", "--counts", "1,x"], "--counts"),
    (["ablate-test-patches", "--checkpoint", "{run}", "--counts", "0,4"], "--counts"),
    (["ablate-test-patches", "--checkpoint", "{run}/missing.pt"], "missing.pt"),
    (["ablate-patches", "--out", "{run}/abl", "--patches", "1,4"], ">= 2"),
    (["ablate-patches", "--out", "{run}/abl", "--num-patches", "4"], "--num-patches"),
    (["tsne", "--checkpoint", "{run}", "--max-points", "1"], "--max-points"),
])
def test_experiment_user_mistakes(argv, needle, monitored_run, capsys):
    code = main([a.replace("{run}", str(monitored_run)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


# --- t-SNE -------------------------------------------------------------------------------------------------


def test_tsne_cli(monitored_run, capsys):
    code = main(["tsne", "--checkpoint", str(monitored_run), "--test-patches", "2", "--max-points", "20",
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert_png(monitored_run / "tsne.png")
    meta = json.loads((monitored_run / "tsne.json").read_text())
    assert meta["n_points"] == 20 and meta["test_patches"] == 2 and meta["perplexity"] < 20


# --- patch-count ablation, then a report of it ---------------------------------------------------------------


def test_ablate_patches_is_resumable_and_reportable(tmp_path, data_dir, capsys):
    out = tmp_path / "abl"
    argv = ["ablate-patches", "--out", str(out), "--patches", "3,2", "--data", "demo", "--data-dir", str(data_dir),
            "--train-subset", "40", "--test-subset", "20", "--no-progress", *TINY_NO_PATCHES, "--eval-every", "2",
            "--monitor-bank", "20", "--monitor-test", "10"]
    assert main(argv) == 0, capsys.readouterr().err
    abl = json.loads((out / "ablation.json").read_text())
    assert [r["n"] for r in abl["rows"]] == [2, 3]
    for r in abl["rows"]:
        results = json.loads((out / r["run"] / "results.json").read_text())
        assert (r["linear_top1"], r["knn_top1"]) == (results["linear_top1"], results["knn_top1"])
        assert_hit_rate(r["linear_top1"], 20)
        assert_hit_rate(r["knn_top1"], 20)
        assert r["test_patches"] == 2
        assert r["train_seconds"] > 0 and r["eval_seconds"] > 0 and r["steps"] == 2
        assert json.loads((out / r["run"] / "config.json").read_text())["config"]["num_patches"] == r["n"]
    assert "| 3 |" in (out / "ablation.md").read_text()
    assert_png(out / "ablation.png")
    capsys.readouterr()

    mtime = (out / "n2" / "checkpoint.pt").stat().st_mtime_ns
    assert main(argv) == 0
    assert capsys.readouterr().out.count("not retrained") == 2
    assert (out / "n2" / "checkpoint.pt").stat().st_mtime_ns == mtime
    # a changed recipe must not silently reuse the runs
    assert main([*argv, "--lr", "0.1"]) == 2 and "lr" in capsys.readouterr().err

    assert main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "|  | n2 | n3 |" in md and "## Patch-count ablation" in md
    for name in ("loss", "lr", "throughput", "accuracy_vs_time", "accuracy_vs_patches"):
        assert_png(out / f"{name}.png")


# --- transfer: evaluate on another dataset -----------------------------------------------------------------


def make_tree(root, classes, size, mode, n_train, n_test, seed):
    """An ImageFolder tree of PNGs whose classes differ in brightness (so there is something to learn)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 64, (size, size, 3)) + c * 90
                Image.fromarray(pixels.astype(np.uint8)).convert(mode).save(d / f"{i:03d}.png")
    return root


def test_transfer_to_other_classes_size_and_channels(tmp_path, capsys):
    a = make_tree(tmp_path / "rgb32", ["a", "b", "c"], 32, "RGB", 20, 4, 0)
    b = make_tree(tmp_path / "gray48", ["left", "right"], 48, "L", 20, 6, 1)
    with Image.open(next((b / "train" / "left").iterdir())) as im:
        assert im.mode == "L" and im.size == (48, 48)
    run = tmp_path / "run"
    assert main(["train", "--data", str(a), "--data-dir", str(tmp_path / "cache"), "--out", str(run),
                 "--no-progress", "--train-subset", "30", "--no-eval", *TINY]) == 0
    capsys.readouterr()
    res_path = tmp_path / "transfer.json"
    code = main(["eval", "--checkpoint", str(run), "--data", str(b), "--out", str(res_path), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    res = json.loads(res_path.read_text())
    assert res["num_classes"] == 2 and res["data"] == str(b)
    # the run's --train-subset 30 (chosen for its own data) is not applied to the new data
    assert (res["n_train"], res["n_test"]) == (40, 12) and "reset to all images" in captured.out
    assert_hit_rate(res["linear_top1"], 12)
    assert_hit_rate(res["knn_top1"], 12)
    # given again, a subset is honoured
    assert main(["eval", "--checkpoint", str(run), "--data", str(b), "--out", str(res_path), "--no-progress",
                 "--train-subset", "10"]) == 0
    assert json.loads(res_path.read_text())["n_train"] == 10
