"""What a run directory guarantees against what users and machines do: the checkpoint's config is the run's truth,
a failed start binds nothing, file-system errors are one line, metrics survive an interruption exactly, Ctrl-C at
any moment is one line and exit 130, and the messages say what is true."""

import errno
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import empssl.files
import empssl.rundir
from empssl.checkpoint import read_checkpoint
from empssl.cli import main
from empssl.config import Config, flag_fields
from empssl.files import read_jsonl
from empssl.rundir import RESUMABLE_CHANGES

from .conftest import TINY, default_sigint

TRAIN = importlib.import_module("empssl.train")  # the module (``empssl.train`` is the function)


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code, err, *needles, exit_code=2):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == exit_code and len(lines) == 1 and "Traceback" not in err, (code, err)
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def train_args(out, data_dir, *extra):
    return ["train", "--data", "demo", "--data-dir", data_dir, "--out", out, "--no-progress", "--no-eval",
            "--train-subset", "100", "--test-subset", "50", "--epochs", "1", "--log-every", "2",
            "--checkpoint-every", "3", *TINY, *extra]


@pytest.fixture
def trained(tmp_path, data_dir, capsys):
    """A finished tiny run (5 steps, lr 0.3), not evaluated."""
    out = tmp_path / "run"
    assert run(train_args(out, data_dir), capsys)[0] == 0
    return out


# --- the checkpoint's config is the run's truth --------------------------------------------------------------


def test_resumable_changes_are_settings_that_leave_the_weights_alone():
    names = {f.name for f in flag_fields(Config)}
    assert RESUMABLE_CHANGES <= names
    weights = {"lr", "seed", "batch_size", "epochs", "schedule_epochs", "num_patches", "patch_size", "width",
               "method", "data", "train_subset", "weight_decay", "momentum", "precision"}
    assert not RESUMABLE_CHANGES & weights


def test_an_edited_config_json_is_refused(trained, data_dir, capsys):
    saved = json.loads((trained / "config.json").read_text())
    saved["config"]["lr"], saved["config"]["seed"] = 0.05, 7
    (trained / "config.json").write_text(json.dumps(saved))
    before = (trained / "checkpoint.pt").read_bytes()
    code, _, err = run(train_args(trained, data_dir), capsys)
    line = one_line_error(code, err, "config.json says", "lr=0.05", "seed=7", "lr=0.3", "seed=0")
    assert "delete it" in line
    assert (trained / "checkpoint.pt").read_bytes() == before


def test_a_deleted_config_json_does_not_let_a_flag_change_the_run(trained, data_dir, capsys):
    truth = Config.from_dict(read_checkpoint(trained)["config"])
    (trained / "config.json").unlink()
    code, _, err = run(train_args(trained, data_dir, "--lr", "0.05", "--seed", "3"), capsys)
    one_line_error(code, err, "lr=0.3", "seed=0", "lr=0.05", "--lr", "--seed")
    assert not (trained / "config.json").exists()  # refused before anything was written
    # the same command without the changed flags resumes it, and config.json is written again from the checkpoint
    code, out, err = run([a for a in train_args(trained, data_dir, "--probe-epochs", "1") if a != "--no-eval"],
                         capsys)
    assert code == 0, err
    assert "rewritten from the checkpoint" in out
    assert Config.from_dict(json.loads((trained / "config.json").read_text())["config"]) == truth


def test_a_config_file_that_differs_from_the_checkpoint_is_refused(trained, data_dir, tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 0.1, "log_every": 1}))  # log_every may change; lr may not
    code, _, err = run(train_args(trained, data_dir, "--config", path), capsys)
    line = one_line_error(code, err, "lr=0.3", "lr=0.1")
    assert "log_every" not in line


def test_settings_that_may_change_on_resume_do(trained, data_dir, capsys):
    code, _, err = run(train_args(trained, data_dir, "--log-every", "1", "--probe-epochs", "1"), capsys)
    assert code == 0, err


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory, data_dir):
    """Runs of a 2-epoch --schedule-epochs, not evaluated: ``1`` trained 1 epoch (5 steps), ``2`` both (10)."""
    root = tmp_path_factory.mktemp("scheduled")
    for epochs in ("1", "2"):
        assert main([str(a) for a in train_args(root / epochs, data_dir, "--epochs", epochs, "--schedule-epochs",
                                                "2")]) == 0
    return root


@pytest.mark.parametrize("trained, epochs, no_eval, nothing_to_do", [
    ("1", "2", True, False),  # more epochs within the schedule: trained on, not evaluated
    ("1", "2", False, False),  # trained on and evaluated
    ("2", "2", True, True),  # at the end: nothing to do
    ("2", "2", False, False),  # at the end: evaluated
    ("2", "1", True, True),  # past the end: nothing to do
])
def test_no_eval_trains_on_unless_the_run_is_at_the_end_of_its_epochs(trained, epochs, no_eval, nothing_to_do,
                                                                      scheduled, tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    shutil.copytree(scheduled / trained, out)
    args = [a for a in train_args(out, data_dir, "--epochs", epochs, "--schedule-epochs", "2")
            if no_eval or a != "--no-eval"]
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    assert read_checkpoint(out)["step"] == 10
    assert ("already trained to the end; nothing to do" in stdout) == nothing_to_do, stdout
    assert (out / "results.json").is_file() == (not no_eval)


# --- nothing written before the run can start ---------------------------------------------------------------


def test_a_start_that_fails_before_its_first_checkpoint_binds_nothing(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    code, _, err = run(train_args(out, data_dir, "--lr", "1e30", "--log-every", "1", "--checkpoint-every", "100",
                                  "--epochs", "2"), capsys)
    line = one_line_error(code, err, "non-finite", "before any checkpoint", "lower --lr")
    assert "step 0" not in line and "kept" not in line
    assert not (out / "checkpoint.pt").exists() and not (out / "config.json").exists()
    # the advice works: the same --out with a lower --lr trains
    code, _, err = run(train_args(out, data_dir, "--lr", "0.3"), capsys)
    assert code == 0, err
    assert read_checkpoint(out)["config"]["lr"] == 0.3
    assert json.loads((out / "config.json").read_text())["config"]["lr"] == 0.3


def test_a_config_json_without_checkpoint_binds_nothing(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    out.mkdir()
    empssl.rundir.write_config(out, Config(lr=0.3))  # as an interrupted start of an older version left it
    code, _, err = run(train_args(out, data_dir, "--lr", "0.1"), capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["config"]["lr"] == 0.1


def test_a_non_finite_loss_after_a_checkpoint_advises_a_new_out(tmp_path, data_dir, capsys, monkeypatch):
    real = empssl.rundir.MetricsLog.non_finite_step
    monkeypatch.setattr(empssl.rundir.MetricsLog, "non_finite_step",
                        lambda self, step: step if step > 3 else real(self, step))
    out = tmp_path / "run"
    code, _, err = run(train_args(out, data_dir), capsys)
    one_line_error(code, err, "non-finite at step 4", "last good checkpoint (step 3) is kept", "new --out")
    assert read_checkpoint(out)["step"] == 3


# --- file-system errors: one line, exit 2, the last good checkpoint intact ----------------------------------


def _refuse_temp_files(monkeypatch, err=errno.EROFS):
    """Creating files fails, as on a read-only mount (the tests run as root, for whom chmod does not)."""
    def refuse(*args, **kwargs):
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(empssl.files.tempfile, "mkstemp", refuse)


def _no_space_for(monkeypatch, name, after=0):
    """fsync of the temporary file of ``name`` fails with ENOSPC from its (after+1)-th write on."""
    real, seen = os.fsync, []

    def fsync(fd):
        if f".{name}." in os.readlink(f"/proc/self/fd/{fd}"):
            seen.append(fd)
            if len(seen) > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)
    monkeypatch.setattr(empssl.files.os, "fsync", fsync)


def test_out_under_a_read_only_folder_is_refused_before_the_data_loads(tmp_path, data_dir, capsys, monkeypatch):
    _refuse_temp_files(monkeypatch)
    monkeypatch.setattr(TRAIN, "load_data", lambda *a, **k: pytest.fail("data loaded before the check"))
    code, _, err = run(train_args(tmp_path / "ro" / "run", data_dir), capsys)
    one_line_error(code, err, "cannot write --out", "Read-only file system")
    assert not (tmp_path / "ro").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_under_a_folder_without_write_permission(tmp_path, data_dir, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run(train_args(locked / "run", data_dir), capsys)
    finally:
        locked.chmod(0o700)
    one_line_error(code, err, "Permission denied")


def test_out_naming_a_file_is_refused(tmp_path, data_dir, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    code, _, err = run(train_args(path, data_dir), capsys)
    one_line_error(code, err, "is a file")
    code, _, err = run(train_args(path / "run", data_dir), capsys)
    one_line_error(code, err, "is a file")
    assert path.read_text() == "mine"


def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(tmp_path, data_dir, capsys, monkeypatch):
    out = tmp_path / "run"
    _no_space_for(monkeypatch, "checkpoint.pt", after=1)  # the checkpoint of step 3 is written, step 5's is not
    code, _, err = run(train_args(out, data_dir), capsys)
    one_line_error(code, err, "checkpoint.pt", "No space left on device", "the previous one is kept")
    assert read_checkpoint(out)["step"] == 3 and not list(out.glob(".*.tmp"))
    monkeypatch.undo()
    code, _, err = run(train_args(out, data_dir), capsys)  # space freed: the same command goes on
    assert code == 0, err
    assert read_checkpoint(out)["step"] == 5


def test_a_full_disk_while_writing_results_is_one_line(trained, data_dir, capsys, monkeypatch):
    _no_space_for(monkeypatch, "results.json")
    args = [a for a in train_args(trained, data_dir, "--probe-epochs", "1") if a != "--no-eval"]
    code, _, err = run(args, capsys)
    one_line_error(code, err, "results.json", "No space left on device", "nothing was written")
    assert read_checkpoint(trained)["finished"]


def test_a_read_only_run_is_refused_before_it_evaluates(trained, data_dir, capsys, monkeypatch):
    before = (trained / "checkpoint.pt").read_bytes()
    _refuse_temp_files(monkeypatch)
    monkeypatch.setattr(TRAIN, "evaluate", lambda *a, **k: pytest.fail("evaluated before the check"))
    args = [a for a in train_args(trained, data_dir) if a != "--no-eval"]
    code, _, err = run(args, capsys)
    one_line_error(code, err, "Read-only file system")
    assert (trained / "checkpoint.pt").read_bytes() == before


def test_eval_finds_out_before_evaluating_that_it_cannot_write(trained, capsys, monkeypatch):
    monkeypatch.setattr(importlib.import_module("empssl.evaluate"), "evaluate",
                        lambda *a, **k: pytest.fail("evaluated before the check"))
    _refuse_temp_files(monkeypatch, errno.EACCES)
    code, _, err = run(["eval", "--checkpoint", trained, "--no-progress"], capsys)
    one_line_error(code, err, "results-eval.json", "Permission denied")


@pytest.mark.parametrize("command", [
    ["eval", "--no-progress", "--out"], ["embed", "--data", "demo", "--no-progress", "--out"],
    ["export", "--out"], ["tsne", "--no-progress", "--out"], ["ablate-test-patches", "--no-progress", "--out"],
])
def test_outputs_under_a_file_are_refused_at_once(command, trained, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run([command[0], "--checkpoint", trained, *command[1:], blocker / "sub" / "x.png"], capsys)
    one_line_error(code, err, "is a file")
    code, _, err = run(["report", trained, "--out", blocker], capsys)
    one_line_error(code, err, "is a file")


def test_a_permission_error_anywhere_is_one_line(trained, capsys, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(trained / "checkpoint.pt"))
    monkeypatch.setattr("empssl.export.export_backbone", denied)
    code, _, err = run(["export", "--checkpoint", trained, "--out", trained / "b.pt"], capsys)
    one_line_error(code, err, "checkpoint.pt", "Permission denied")


@pytest.mark.parametrize("kind", ["symlink to a file", "dangling symlink", "folder", "hard link to a file"])
def test_a_lock_file_that_is_not_a_plain_file_is_refused_and_left_as_it_is(kind, tmp_path, data_dir, capsys):
    """tar and rsync keep links: a run directory's .lock is never followed, written, truncated or removed."""
    out, outside, lock = tmp_path / "run", tmp_path / "precious.txt", tmp_path / "run" / ".lock"
    out.mkdir()
    outside.write_text("not a PID")
    make = {"symlink to a file": lambda: lock.symlink_to(outside),
            "dangling symlink": lambda: lock.symlink_to(tmp_path / "nowhere"), "folder": lock.mkdir,
            "hard link to a file": lambda: os.link(outside, lock)}
    make[kind]()
    before = os.lstat(lock)
    code, _, err = run(train_args(out, data_dir), capsys)
    one_line_error(code, err, f"{lock} is not a plain file")
    after = os.lstat(lock)
    assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (before.st_ino, before.st_mode, before.st_mtime_ns)
    assert outside.read_text() == "not a PID" and not (tmp_path / "nowhere").exists()
    assert [p.name for p in out.iterdir()] == [".lock"]
    if kind.endswith("symlink"):
        assert os.readlink(lock) == str(outside if kind.startswith("symlink") else tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["metrics.jsonl", "tensorboard/events.out"])
def test_a_link_inside_a_run_directory_is_refused_and_nothing_written_through_it(name, tmp_path, data_dir, capsys):
    """A run appends to its files, and appending follows links: a received run directory holding one would make
    the run write outside it."""
    out, outside = tmp_path / "run", tmp_path / "precious.txt"
    outside.write_text("keep")
    link = out / name
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    code, _, err = run(train_args(out, data_dir), capsys)
    one_line_error(code, err, f"{link} is a symbolic link")
    assert outside.read_text() == "keep" and os.readlink(link) == str(outside)
    assert not (out / "checkpoint.pt").exists() and not (out / ".lock").exists()


# --- metrics.jsonl exact across an interruption -------------------------------------------------------------


def test_after_ctrl_c_and_resume_metrics_average_the_same_steps(tmp_path, data_dir, capsys, monkeypatch):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert run(train_args(ref, data_dir, "--checkpoint-every", "100"), capsys)[0] == 0
    real = empssl.rundir.MetricsLog.add

    def add(self, values, applied, step):
        real(self, values, applied, step)
        if step == 3:  # Ctrl-C between two log steps (log every 2 steps): the sums of step 3 are pending
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(empssl.rundir.MetricsLog, "add", add)
    code, _, err = run(train_args(cut, data_dir, "--checkpoint-every", "100"), capsys)
    one_line_error(code, err, "interrupted at step 3", exit_code=130)
    assert read_checkpoint(cut)["step"] == 3
    monkeypatch.undo()
    assert run(train_args(cut, data_dir, "--checkpoint-every", "100"), capsys)[0] == 0
    a, b = read_jsonl(ref / "metrics.jsonl"), read_jsonl(cut / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 4, 5]
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k != "patches_per_s"} == \
               {k: v for k, v in rb.items() if k != "patches_per_s"}
    ckpt_a, ckpt_b = read_checkpoint(ref), read_checkpoint(cut)
    for key, value in ckpt_a["model"].items():
        assert torch.equal(value, ckpt_b["model"][key]), key


# --- Ctrl-C at any moment ------------------------------------------------------------------------------------

# A subprocess that prints STAGE and sleeps when it reaches a stage, so that SIGINT arrives exactly there, however
# fast or busy the machine is.
_STAGED = textwrap.dedent("""
    import signal, sys, time
    stage = sys.argv[1]
    def pause(real):
        def paused(*a, **k):
            print("STAGE", flush=True)
            time.sleep(60)
            return real(*a, **k)
        return paused
    if stage == "imports":  # while main() imports the modules of its commands (and torch)
        import importlib.abc
        class Slow(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "empssl.checkpoint":
                    print("STAGE", flush=True)
                    time.sleep(60)
        sys.meta_path.insert(0, Slow())
    elif stage == "training":  # as the loop's second step begins; it waits for the loop's stop flag to be raised
        import importlib
        t = importlib.import_module("empssl.train")
        real, calls = t.train_step, []
        def step(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                print("STAGE", flush=True)
                flag = signal.getsignal(signal.SIGINT).__self__  # the loop's StopFlag
                deadline = time.time() + 600
                while not flag.requested and time.time() < deadline:
                    time.sleep(0.01)
            return real(*a, **k)
        t.train_step = step
    else:
        import importlib
        where, name = {"data": ("train", "load_data"), "setup": ("rundir", "open_tracking"),
                       "evaluation": ("train", "evaluate")}[stage]
        t = importlib.import_module("empssl." + where)
        setattr(t, name, pause(getattr(t, name)))
    from empssl.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["imports", "data", "setup", "training", "evaluation"])
def test_ctrl_c_at_any_moment_is_one_line_and_leaves_a_resumable_run(stage, tmp_path, data_dir):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [str(a) for a in train_args(out, data_dir, "--epochs", "6" if stage == "training" else "1")]
    if stage == "evaluation":
        subprocess.run([sys.executable, "-m", "empssl.cli", *args], check=True, env=env, capture_output=True)
    args = [a for a in args if a != "--no-eval"] if stage == "evaluation" else args
    # training: the loop's own stop, after the current step, with a checkpoint
    cmd = [sys.executable, "-c", _STAGED, stage, *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    for line in proc.stdout:
        if line.startswith("STAGE"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)  # a ceiling against a hang
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("empssl: interrupted"), err
    if (out / "checkpoint.pt").exists():  # the run started: it has a checkpoint, and the command resumes it
        assert "run the same command" in lines[0]
        assert Config.from_dict(read_checkpoint(out)["config"]) == \
               Config.from_dict(json.loads((out / "config.json").read_text())["config"])
        again = subprocess.run([sys.executable, "-m", "empssl.cli", *args], env=env, capture_output=True, text=True)
    else:  # it did not start: nothing binds the next command, even with other settings
        assert stage != "training" and not (out / "config.json").exists()
        again = subprocess.run([sys.executable, "-m", "empssl.cli", *args, "--lr", "0.2"], env=env,
                               capture_output=True, text=True)
    assert again.returncode == 0, again.stderr


# --- messages that say what is true ------------------------------------------------------------------------


def test_a_json_file_given_as_checkpoint_is_not_called_pickled(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"linear_top1": 50.0}))
    code, _, err = run(["eval", "--checkpoint", path], capsys)
    line = one_line_error(code, err, "not a PyTorch file")
    assert "pickled" not in line


def test_a_fractional_batch_size_is_refused_as_such(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"batch_size": 2.5}))
    code, _, err = run(["train", "--config", path, "--out", tmp_path / "r"], capsys)
    line = one_line_error(code, err, "--batch-size must be a whole number")
    assert "processes" not in line and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_tsne_out_may_be_a_folder_and_must_be_a_png(tmp_path, data_dir, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    assert run(train_args(out, data_dir, "--epochs", "0.4", "--schedule-epochs", "1"), capsys)[0] == 0
    maps = tmp_path / "maps"
    maps.mkdir()
    code, _, err = run(["tsne", "--checkpoint", out, "--out", maps, "--max-points", "20", "--no-progress"], capsys)
    assert code == 0, err
    assert (maps / "tsne.png").is_file() and (maps / "tsne.json").is_file()
    assert not (tmp_path / "maps.png").exists()
    code, _, err = run(["tsne", "--checkpoint", out, "--out", tmp_path / "x.txt"], capsys)
    one_line_error(code, err, "--out must be a .png file or a folder")


def test_report_refuses_a_folder_whose_results_json_is_not_a_run(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"accuracy": 0.9, "model": "other"}))
    code, _, err = run(["report", tmp_path], capsys)
    one_line_error(code, err, "holds no run")
    assert not (tmp_path / "report.md").exists()


def test_compare_smoke_with_a_zero_budget_is_refused(tmp_path, capsys):
    code, _, err = run(["compare", "--smoke", "--budget-seconds", "0", "--out", tmp_path / "c"], capsys)
    one_line_error(code, err, "--budget-seconds must be > 0, got 0")
