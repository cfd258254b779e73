"""empssl.tracking (--log): what TensorBoard, W&B and MLflow receive, read back with each project's own reader.

One tiny run is trained in two sessions (10 steps without evaluation, then resumed to 20 steps and evaluated) with
every installed logger; each backend's test reads back what it wrote and compares it with metrics.jsonl,
monitor.jsonl and results.json. Nothing contacts the network: W&B runs offline, MLflow writes a local file store
under the test's folder.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from empssl.checkpoint import read_checkpoint
from empssl.cli import main
from empssl.config import LOGGER_NAMES, Config, ConfigError
from empssl.files import read_jsonl
from empssl.rundir import run_config, write_config
from empssl.tracking import (
    IDS_FILE,
    NO_TRACKING,
    TRACKERS,
    Tracker,
    Tracking,
    TrackingError,
    logger_names,
    open_tracking,
    require_trackers,
    scalars,
)
from empssl.train import train

from .conftest import TINY

INSTALLED = [n for n in LOGGER_NAMES if importlib.util.find_spec(TRACKERS[n].package) is not None]


def _cfg(data_dir: Path, **kw: Any) -> Config:
    base: dict[str, Any] = dict(data="demo", data_dir=str(data_dir), width=4, hidden_dim=32, z_dim=16, patch_size=8,
                                num_patches=4, batch_size=20, train_subset=200, test_subset=100, test_patches=2,
                                probe_epochs=2, device="cpu", log_every=2, checkpoint_every=3, eval_every=5,
                                monitor_bank=100, monitor_test=50, schedule_epochs=2, log=",".join(INSTALLED))
    return Config(**{**base, **kw})


# The steps the first session logged after its last checkpoint (10) and a resume must not show twice.
STALE_STEP, STALE_VALUE = 12, 999.0


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Any]:
    """Two sessions of one run with every installed logger: steps 1-10 (no evaluation), then resumed to 20."""
    if not INSTALLED:
        pytest.skip("none of tensorboard, wandb, mlflow is installed")
    root = tmp_path_factory.mktemp("tracking")
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # nothing lands in the folder pytest was started from
        for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(root),
                           "WANDB_CONFIG_DIR": str(root / "wandb-config"), "WANDB_CACHE_DIR": str(root / "wandb-cache"),
                           "WANDB_DATA_DIR": str(root / "wandb-data"), "WANDB_PROJECT": "empssl-test",
                           # the local file store: a sqlite store (MLflow's default) spends ~10 s creating its tables
                           "MLFLOW_TRACKING_URI": (root / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",
                           "MLFLOW_EXPERIMENT_NAME": "empssl-test"}.items():
            mp.setenv(key, value)
        t0 = time.time()
        first = train(_cfg(data_dir, epochs=1), out, progress=False, log=lambda s: None, evaluate_at_end=False)
        ids_first = json.loads((out / IDS_FILE).read_text())
        if "tensorboard" in INSTALLED:  # what a session killed after step 10 would have left behind
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(str(out / "tensorboard")) as w:
                w.add_scalar("train/loss", STALE_VALUE, global_step=STALE_STEP)
        results = train(_cfg(data_dir, epochs=2), out, progress=False, log=lambda s: None)
        t1 = time.time()
    return {"out": out, "root": root, "first": first, "results": results, "ids_first": ids_first,
            "ids": json.loads((out / IDS_FILE).read_text()), "t0": t0, "t1": t1,
            "metrics": read_jsonl(out / "metrics.jsonl"), "monitor": read_jsonl(out / "monitor.jsonl")}


def _train_loss(run: dict[str, Any]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in run["metrics"]}


def test_the_two_sessions_logged_steps_1_to_20(logged_run: dict[str, Any]) -> None:
    assert sorted(_train_loss(logged_run)) == list(range(2, 21, 2))
    assert [r["step"] for r in logged_run["monitor"]] == [0, 5, 10, 15, 20]
    assert logged_run["ids"] == logged_run["ids_first"]  # the resumed session continued the same runs
    assert set(logged_run["ids"]) == set(INSTALLED)


# --- TensorBoard ---------------------------------------------------------------------------------------------


def test_tensorboard_event_files_hold_the_jsonl_scalars_config_and_results(logged_run: dict[str, Any]) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logged_run["out"] / "tensorboard"))
    acc.Reload()
    # both sessions in one directory; the stale step-12 value from after the checkpoint was purged on resume
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert len(acc.Scalars("train/loss")) == len(loss)
    assert loss == pytest.approx(_train_loss(logged_run), rel=1e-6) and loss[STALE_STEP] != STALE_VALUE
    for key in ("lr", "patches_per_s", "tcr", "invariance", "epoch"):
        want = {r["step"]: r[key] for r in logged_run["metrics"]}
        assert {e.step: e.value for e in acc.Scalars(f"train/{key}")} == pytest.approx(want, rel=1e-6), key
    knn = acc.Scalars("monitor/knn_top1")
    assert {e.step: e.value for e in knn} == pytest.approx({r["step"]: r["knn_top1"] for r in logged_run["monitor"]})
    assert all(logged_run["t0"] <= e.wall_time <= logged_run["t1"] for e in acc.Scalars("train/loss") + knn)
    assert acc.Scalars("results/linear_top1")[-1].value == pytest.approx(logged_run["results"]["linear_top1"])
    assert acc.Scalars("results/linear_top1")[-1].step == 20
    texts = {tag: [json.loads(t.tensor_proto.string_val[0].decode()) for t in acc.Tensors(f"{tag}/text_summary")]
             for tag in ("config", "results")}
    assert [c["epochs"] for c in texts["config"]] == [1, 2] and texts["config"][0]["width"] == 4
    assert texts["results"][-1]["linear_top1"] == logged_run["results"]["linear_top1"]
    assert texts["results"][0]["steps"] == 10  # the first session's summary (it skipped the evaluation)


# --- Weights & Biases ----------------------------------------------------------------------------------------


def _wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B offline run file (run-ID.wandb): a 7-byte header, then LevelDB-log records in
    32 KiB blocks (7-byte record header: crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if room >= 7 else (0, 0, 0)
        if room < 7 or (length == 0 and kind == 0):  # block trailer padding
            pos += room
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_session(path: Path) -> dict[str, Any]:
    """run id, config, history rows and the final summary of one offline session."""
    run: dict[str, Any] = {"history": [], "summary": {}}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
            run["config"] = {i.key: json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "history":
            run["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                   for i in record.history.item})
        elif kind == "summary":
            run["summary"].update({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                   for i in record.summary.update})
    return run


def test_wandb_offline_runs_hold_the_jsonl_scalars_config_and_results(logged_run: dict[str, Any]) -> None:
    pytest.importorskip("wandb")
    run_id = logged_run["ids"]["wandb"]["id"]
    assert logged_run["ids"]["wandb"]["mode"] == "offline"
    files = sorted((logged_run["out"] / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # one per session, both of the same run id (wandb sync uploads them as one run)
    sessions = [_wandb_session(f) for f in files]
    assert [s["id"] for s in sessions] == [run_id, run_id]
    assert sessions[0]["config"]["width"] == 4 and sessions[1]["config"]["epochs"] == 2
    rows = sessions[0]["history"] + sessions[1]["history"]
    loss = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert loss == pytest.approx(_train_loss(logged_run), rel=1e-6)
    assert {r["step"]: r["monitor/knn_top1"] for r in rows if "monitor/knn_top1" in r} == pytest.approx(
        {r["step"]: r["knn_top1"] for r in logged_run["monitor"]})
    assert all(logged_run["t0"] <= r["_timestamp"] <= logged_run["t1"] for r in rows)
    assert all({"train/lr", "train/patches_per_s", "train/tcr"} <= set(r) for r in rows if "train/loss" in r)
    assert sessions[0]["summary"]["results"]["steps"] == 10
    final = sessions[1]["summary"]["results"]
    assert final["linear_top1"] == logged_run["results"]["linear_top1"] and final["steps"] == 20


# --- MLflow --------------------------------------------------------------------------------------------------


def test_mlflow_store_holds_the_jsonl_scalars_config_and_results(logged_run: dict[str, Any]) -> None:
    mlflow = pytest.importorskip("mlflow")
    ids = logged_run["ids"]["mlflow"]
    assert ids["tracking_uri"] == (logged_run["root"] / "mlruns").as_uri()
    client = mlflow.MlflowClient(ids["tracking_uri"])
    run = client.get_run(ids["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "empssl-test"
    history = client.get_metric_history(ids["run_id"], "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx(_train_loss(logged_run), rel=1e-6)
    assert all(logged_run["t0"] * 1000 - 1 <= m.timestamp <= logged_run["t1"] * 1000 for m in history)
    knn = client.get_metric_history(ids["run_id"], "monitor/knn_top1")
    assert {m.step: m.value for m in knn} == pytest.approx({r["step"]: r["knn_top1"] for r in logged_run["monitor"]})
    assert run.data.metrics["results/linear_top1"] == pytest.approx(logged_run["results"]["linear_top1"])
    assert run.data.params["width"] == "4" and run.data.params["epochs"] == "1"  # a parameter never changes
    local = Path(run.info.artifact_uri.removeprefix("file://"))
    assert json.loads((local / "config.json").read_text())["epochs"] == 2  # the resumed session's config
    assert json.loads((local / "results.json").read_text())["linear_top1"] == logged_run["results"]["linear_top1"]


def test_mlflow_that_cannot_start_its_run_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    with pytest.raises(TrackingError, match="--log mlflow: cannot start the run") as e:
        open_tracking("mlflow", tmp_path / "run", {"lr": 0.3})
    assert "\n" not in str(e.value)


# --- without any backend -------------------------------------------------------------------------------------


def test_log_names_are_validated_at_start() -> None:
    assert tuple(TRACKERS) == LOGGER_NAMES
    assert logger_names("none") == [] and logger_names("wandb, tensorboard,wandb") == ["wandb", "tensorboard"]
    Config(log="tensorboard,wandb,mlflow").validate()
    Config(log=",none,").validate()  # empty names are dropped, here as where the loggers are chosen
    assert logger_names(",none,") == [] and logger_names(",wandb,") == ["wandb"]
    with pytest.raises(ConfigError, match="--log must be none or comma-separated names from tensorboard"):
        Config(log="tensorbord").validate()


def test_a_missing_extra_fails_before_anything_starts(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    installed = {"tensorboard": True, "wandb": False, "mlflow": False}  # whatever this machine has
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if installed[name] else None) if name in installed
                        else find_spec(name, *a))
    out = tmp_path / "run"
    rc = main(["train", "--data", "demo", "--data-dir", str(data_dir), "--out", str(out), "--no-progress",
               "--log", "tensorboard,wandb,mlflow", *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err == "empssl: error: --log wandb,mlflow needs wandb, mlflow: pip install 'empssl[wandb,mlflow]'\n"
    assert not out.exists()
    with pytest.raises(TrackingError, match=r"pip install 'empssl\[wandb\]'"):
        require_trackers("wandb")


def test_only_rank_0_and_a_chosen_logger_open_anything(tmp_path: Path) -> None:
    assert open_tracking("tensorboard,wandb,mlflow", tmp_path / "run", {}, enabled=False) is NO_TRACKING
    assert open_tracking("none", tmp_path / "run", {}) is NO_TRACKING
    assert not (tmp_path / "run").exists()


class _Recorder(Tracker):
    name, package = "recorder", "json"

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[Any] = []

    def open(self, run_dir: Path, config: dict[str, Any], start_step: int, saved: dict[str, Any]) -> dict[str, Any]:
        return {}

    def log_scalars(self, values: dict[str, float], step: int, wall_time: float) -> None:
        if self.fail:
            raise OSError("disk full")
        self.calls.append(("scalars", values, step))

    def log_results(self, results: dict[str, Any], step: int) -> None:
        self.calls.append(("results", results, step))

    def close(self, ok: bool) -> None:
        self.calls.append(("close", ok))


def test_fan_out_scalars_and_a_failing_logger_is_dropped_in_one_line(capsys: pytest.CaptureFixture) -> None:
    good, bad = _Recorder(), _Recorder(fail=True)
    tracking = Tracking([bad, good])
    tracking.log_scalars({"step": 4, "loss": -1.5, "lr": 0.1, "ok": True, "note": "x"}, step=4, wall_time=1.0,
                         prefix="train/")
    tracking.log_scalars({"step": 6, "loss": -2.0}, step=6, wall_time=2.0, prefix="train/")
    tracking.log_results({"linear_top1": 40.0, "timing": {"total": 3.0}, "big": float("inf"), "crop": (0.25, 1)},
                         step=6)
    tracking.close()
    tracking.close()  # a second close (the exit hook after the end) does nothing
    assert good.calls == [("scalars", {"train/loss": -1.5, "train/lr": 0.1}, 4), ("scalars", {"train/loss": -2.0}, 6),
                          ("results", {"linear_top1": 40.0, "timing": {"total": 3.0}, "big": None,
                                       "crop": [0.25, 1]}, 6), ("close", True)]
    assert bad.calls == []
    err = capsys.readouterr().err
    assert err == "empssl: --log recorder failed and is off for the rest of the run (OSError: disk full)\n"
    assert dict(scalars({"a": {"b": 1, "c": "x"}, "step": 3})) == {"a/b": 1}


def test_a_run_that_exits_without_finishing_ends_its_loggers_as_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    hooks: list[Any] = []
    monkeypatch.setattr(atexit, "register", lambda hook, *args: hooks.append((hook, args)))
    rec = _Recorder()
    Tracking([rec])
    assert len(hooks) == 1
    hook, args = hooks[0]
    hook(*args)  # what the exit hook does when train() raised before close()
    assert rec.calls == [("close", False)]


def test_log_may_be_added_when_resuming(tmp_path: Path) -> None:
    write_config(tmp_path, Config(epochs=3))
    assert run_config(tmp_path, Config(log="wandb"), {"log": "wandb"}).log == "wandb"
    assert run_config(tmp_path, Config(), {}).log == "none"


@pytest.mark.parametrize("damage", ['{"wandb": {"id": "abc"', '["abc"]', '{"wandb": "abc"}', b"\xff\xfe", "folder"])
def test_a_damaged_trackers_json_is_one_line_naming_it(damage: str | bytes, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TRACKERS, "wandb", _Recorder)  # nothing is opened: the file is read first
    ids, data = tmp_path / IDS_FILE, damage if isinstance(damage, bytes) else damage.encode()
    if damage == "folder":
        ids.mkdir()
    else:
        ids.write_bytes(data)
    with pytest.raises(TrackingError, match=f"{ids} cannot be read as the loggers' run ids .*delete it and the "
                                            f"loggers start new runs") as e:
        open_tracking("wandb", tmp_path, {})
    assert "\n" not in str(e.value)
    assert ids.is_dir() if damage == "folder" else ids.read_bytes() == data  # left as it was


def test_a_damaged_trackers_json_stops_the_resume_in_one_line(tmp_path: Path, data_dir: Path,
                                                              capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TRACKERS, "tensorboard", _Recorder)
    out = tmp_path / "run"
    args = ["train", "--data", "demo", "--data-dir", str(data_dir), "--out", str(out), "--no-progress", "--no-eval",
            "--train-subset", "40", "--epochs", "1", "--schedule-epochs", "2", *TINY]
    assert main(args) == 0
    (out / IDS_FILE).write_text("{not json")
    assert main([*args, "--epochs", "2", "--log", "tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"empssl: error: {out / IDS_FILE} cannot be read") and err.count("\n") == 1, err
    assert read_checkpoint(out)["step"] == 2  # nothing trained
