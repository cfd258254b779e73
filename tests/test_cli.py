"""The command line: every user mistake answers with one line on stderr and a non-zero exit, no traceback."""

import dataclasses
import io
import json
import subprocess
import sys
import tarfile

import pytest
import torch

from empssl.cli import _explicit, build_parser, main
from empssl.config import Config, flag, flag_fields
from empssl.methods import method_class, method_names

from .conftest import TINY


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    code = main(["train", "--data", "demo", "--data-dir", str(data_dir), "--out", str(out), "--no-progress",
                 "--train-subset", "100", "--test-subset", "50", "--epochs", "1", *TINY])
    assert code == 0
    return out


def test_train_then_eval_roundtrip(tiny_run, data_dir, capsys, tmp_path):
    out = tmp_path / "eval.json"
    code, stdout, err = run(["eval", "--checkpoint", str(tiny_run), "--out", str(out), "--no-progress",
                             "--test-patches", "3", "--probe-epochs", "1"], capsys)
    assert code == 0, err
    import json

    res = json.loads(out.read_text())
    assert res["test_patches"] == 3 and "linear_top1" in res and "knn_top1" in res
    assert "test patches" in stdout
    # the run session's one timing account, as train's results.json has it, and its last line
    assert {"data", "features", "knn", "probe", "total"} <= set(res["timing"]), res["timing"]
    assert stdout.rstrip().splitlines()[-1].startswith("time: ")


def test_rerun_of_finished_run_does_not_retrain(tiny_run, capsys):
    before = torch.load(tiny_run / "checkpoint.pt", weights_only=True)["model"]
    code, stdout, _ = run(["train", "--out", str(tiny_run), "--no-eval", "--no-progress"], capsys)
    assert code == 0 and "already trained" in stdout
    after = torch.load(tiny_run / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("argv, needles", [
    (["train", "--data", "/no/such/place", "--out", "{tmp}/r"], ["/no/such/place"]),
    (["train", "--num-patches", "0", "--out", "{tmp}/r"], ["--num-patches"]),
    (["train", "--num-patches", "many", "--out", "{tmp}/r"], ["--num-patches"]),
    (["train", "--crop-scale", "0.5", "0.2", "--out", "{tmp}/r"], ["--crop-scale"]),
    (["train", "--preset", "nope", "--out", "{tmp}/r"], ["nope"]),
    (["train", "--config", "{tmp}/missing.json", "--out", "{tmp}/r"], ["missing.json"]),
    (["train", "--arch", "vgg11", "--out", "{tmp}/r"], ["vgg11"]),
    (["train", "--device", "tpu", "--out", "{tmp}/r"], ["--device"]),
    (["train", "--channels-last", "maybe", "--out", "{tmp}/r"], ["maybe"]),
    (["train", "--bogus-flag", "--out", "{tmp}/r"], ["--bogus-flag"]),
    (["train"], ["--out"]),
    (["eval", "--checkpoint", "{tmp}/nothing.pt"], ["nothing.pt"]),
    (["frobnicate"], ["frobnicate"]),
])
def test_user_mistakes(argv, needles, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, *needles)


def test_corrupt_and_foreign_checkpoints(tmp_path, tiny_run, capsys):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint at all")
    code, _, err = run(["eval", "--checkpoint", str(bad)], capsys)
    assert_one_line_error(code, err, "garbage.pt")

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    code, _, err = run(["eval", "--checkpoint", str(foreign)], capsys)
    assert_one_line_error(code, err, "not an empssl checkpoint")

    code, _, err = run(["eval", "--checkpoint", str(tiny_run)], capsys)  # sanity: it is a good checkpoint
    ckpt = torch.load(tiny_run / "checkpoint.pt", weights_only=True)
    ckpt["config"]["width"] = 8  # claims another architecture than its weights have
    mismatched = tmp_path / "mismatch.pt"
    torch.save(ckpt, mismatched)
    code, _, err = run(["eval", "--checkpoint", str(mismatched)], capsys)
    assert_one_line_error(code, err, "does not match the architecture", "width 8")


def test_resume_refuses_changed_training_settings(tiny_run, capsys):
    code, _, err = run(["train", "--out", str(tiny_run), "--lr", "0.1", "--no-progress"], capsys)
    assert_one_line_error(code, err, "lr=0.3", "0.1")


def test_corrupt_image_is_named(tmp_path, capsys):
    archive = tmp_path / "broken.tar.gz"
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(png, format="PNG")
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            for cls in ("a", "b"):
                for i, payload in enumerate([png.getvalue(), b"\x89PNG broken" if split == "train" and cls == "b"
                                            else png.getvalue()]):
                    info = tarfile.TarInfo(f"{split}/{cls}/{i}.png")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    code, _, err = run(["train", "--data", str(archive), "--data-dir", str(tmp_path / "d"),
                        "--out", str(tmp_path / "r"), "--no-progress"], capsys)
    assert_one_line_error(code, err, "b/1.png")


def subcommand(name):
    return build_parser()._subparsers._group_actions[0].choices[name]


def test_every_setting_has_a_flag_with_its_declared_help():
    """Each Config field and each method's setting is a flag of `train` whose help is the one declared on the
    field (written once), and every other flag has help too."""
    actions = {a.dest: a for a in subcommand("train")._actions}
    declared = [f for f in flag_fields(Config)]
    declared += [f for m in method_names() for f in dataclasses.fields(method_class(m).Settings)]
    for f in declared:
        assert f.name in actions, f"{f.name} has no flag"
        action = actions[f.name]
        assert action.option_strings == [flag(f.name)]
        assert f.metadata["help"] and action.help.startswith(f.metadata["help"].replace("%", "%%")), f.name
    for action in actions.values():
        assert action.help, action.dest


def test_help_and_flag_errors_do_not_import_torch():
    """`empssl --help`, every command's --help and the flag errors answer before torch is imported (about a second,
    which bench/cli_startup.py times), the method settings' flags included."""
    commands = list(build_parser()._subparsers._group_actions[0].choices)
    argvs = [["--help"], *([c, "--help"] for c in commands), ["train", "--bogus"],
             ["train", "--out", "x", "--epochs", "abc"], ["compare", "--out", "x", "--tau-base", "x"]]
    code = ("import contextlib, io, json, sys\nfrom empssl.cli import main\nout = []\n"
            f"for argv in {argvs!r}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as text, contextlib.redirect_stderr(io.StringIO()):\n"
            "        try:\n            status = main(argv)\n        except SystemExit as e:\n"
            "            status = e.code\n"
            "    out.append([status, '--tau-base' in text.getvalue(), 'torch' in sys.modules])\n"
            "print(json.dumps(out))")
    got = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout)
    assert [status for status, _, _ in got] == [0] * (1 + len(commands)) + [2, 2, 2]
    assert [torch_loaded for _, _, torch_loaded in got] == [False] * len(argvs)
    shown = [c for c, (_, tau, _) in zip(commands, got[1:]) if tau]  # BYOL's setting, read without importing it
    assert shown == ["train", "ablate-patches", "compare"]


def test_a_bad_method_setting_is_answered_before_torch_loads(tmp_path):
    """`empssl train --tau-base 2`: a method's setting out of bounds, or one of another method, is checked against
    the declarations read from the methods' source, before torch loads (seconds); nothing is written."""
    out = str(tmp_path / "run")
    argvs = [["train", "--out", out, "--method", "byol", "--tau-base", "2"], ["train", "--out", out, "--tau-base", "1"],
             ["ablate-patches", "--out", out, "--method", "simclr", "--temperature", "0"]]
    code = ("import contextlib, io, json, sys\nfrom empssl.cli import main\nout = []\n"
            f"for argv in {argvs!r}:\n"
            "    with contextlib.redirect_stderr(io.StringIO()) as err:\n        status = main(argv)\n"
            "    out.append([status, err.getvalue(), 'torch' in sys.modules])\n"
            "print(json.dumps(out))")
    got = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout)
    assert [(status, err, torch_loaded) for status, err, torch_loaded in got] == [
        (2, "empssl: error: --tau-base must be <= 1, got 2\n", False),
        (2, "empssl: error: --tau-base is a setting of byol, not of --method emp-ssl\n", False),
        (2, "empssl: error: --temperature must be > 0, got 0\n", False)]
    assert not (tmp_path / "run").exists()


def test_compare_takes_the_model_patch_and_optimisation_flags_of_train():
    compare, train = subcommand("compare"), subcommand("train")
    names = {a.dest for a in compare._actions}
    assert {f.name for f in flag_fields(Config)} - names == {"method"}  # the method is --methods
    args = compare.parse_args(["--out", "x", "--arch", "resnet34-cifar", "--width", "8", "--num-patches", "4",
                               "--patch-size", "16", "--hidden-dim", "64", "--z-dim", "32", "--crop-scale", "0.2",
                               "1", "--batch-size", "50", "--lr", "0.1", "--epochs", "2"])
    assert _explicit(args) == {"arch": "resnet34-cifar", "width": 8, "num_patches": 4, "patch_size": 16,
                               "hidden_dim": 64, "z_dim": 32, "crop_scale": (0.2, 1.0), "batch_size": 50,
                               "lr": 0.1, "epochs": 2.0}
    # the same help as train's
    assert {a.dest: a.help for a in compare._actions}["width"] == {a.dest: a.help for a in train._actions}["width"]


@pytest.mark.parametrize("text, value", [("true", True), ("no", False), ("OFF", False), ("1", True)])
def test_bool_flags_parse_explicitly(text, value):
    assert subcommand("train").parse_args(["--out", "x", "--nesterov", text]).nesterov is value
    assert subcommand("train").parse_args(["--out", "x", "--nesterov"]).nesterov is True  # bare: true


def test_console_script_entry_point_reports_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "empssl.cli", "train", "--data", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert_one_line_error(proc.returncode, proc.stderr, "nope")


# --- every bad input: one line on stderr, exit 2, nothing left behind ------------------------------------------


def test_unknown_top_level_flag_has_one_prefix(capsys):
    code, _, err = run(["--frobnicate"], capsys)
    assert_one_line_error(code, err, "--frobnicate")
    assert err.startswith("empssl: error: unrecognized option --frobnicate") and "empssl: error: empssl" not in err


def test_subcommand_errors_name_the_subcommand_once(tmp_path, capsys):
    code, _, err = run(["train", "--num-patches", "many", "--out", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, "train: argument --num-patches")
    assert err.startswith("empssl: error: train: ") and err.count("empssl") == 1


def test_bare_empssl_prints_a_usage_line(capsys):
    code, _, err = run([], capsys)
    assert_one_line_error(code, err, "usage: empssl", "train", "eval", "--help")
    assert code == 2


@pytest.mark.parametrize("value", ["0", "1"])
def test_num_patches_has_one_rule(value, tmp_path, capsys):
    code, _, err = run(["train", "--num-patches", value, "--out", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, "--num-patches must be >= 2")


def test_choice_flags_list_their_choices_in_help():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    text = train.format_help()
    for choices in ("resnet18-cifar,resnet18-imagenet,resnet34-cifar", "emp-ssl,simclr,vicreg,byol",
                    "auto,patches,full"):
        assert choices in text.replace("\n", "").replace(" ", ""), choices


@pytest.mark.parametrize("payload, needle", [(b"", "an empty file"), (b"\x00" * 3, "not an empssl checkpoint")])
def test_empty_and_tiny_checkpoints(payload, needle, tmp_path, capsys):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(payload)
    code, _, err = run(["eval", "--checkpoint", str(bad)], capsys)
    assert_one_line_error(code, err, needle)


def test_pickled_objects_are_refused_without_suggesting_weights_only_false(tmp_path, capsys):
    import argparse

    bad = tmp_path / "pickled.pt"
    torch.save({"model": {}, "config": {}, "extra": argparse.Namespace(a=1)}, bad)
    code, _, err = run(["eval", "--checkpoint", str(bad)], capsys)
    assert_one_line_error(code, err, "not an empssl checkpoint")
    assert "weights_only" not in err and "False" not in err


def _corrupt_archive(tmp_path):
    archive = tmp_path / "broken.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, payload in (("train/a/0.png", b"\x89PNG broken"), ("test/a/0.png", b"\x89PNG broken")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return archive


def _flat_archive(tmp_path):
    archive = tmp_path / "flat.tar"
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(png, format="PNG")
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("just/one.png")
        info.size = len(png.getvalue())
        tar.addfile(info, io.BytesIO(png.getvalue()))
    return archive


@pytest.mark.parametrize("case", ["missing data", "corrupt image", "bad layout", "batch too large"])
def test_failed_train_leaves_no_run_directory(case, tmp_path, data_dir, capsys):
    out = tmp_path / "new-run"
    flags = {"missing data": ["--data", str(tmp_path / "nowhere")],
             "corrupt image": ["--data", str(_corrupt_archive(tmp_path)), "--data-dir", str(tmp_path / "d")],
             "bad layout": ["--data", str(_flat_archive(tmp_path)), "--data-dir", str(tmp_path / "d")],
             "batch too large": ["--data", "demo", "--data-dir", str(data_dir), "--train-subset", "10"]}[case]
    code, _, err = run(["train", *flags, "--out", str(out), "--no-progress", *TINY], capsys)
    assert_one_line_error(code, err)
    assert not out.exists()


def test_failed_resume_keeps_the_run_directory(tiny_run, tmp_path, capsys):
    before = sorted(p.name for p in tiny_run.iterdir())
    code, _, err = run(["train", "--out", str(tiny_run), "--lr", "0.5", "--no-progress"], capsys)
    assert_one_line_error(code, err, "lr=0.3")
    code, _, err = run(["train", "--out", str(tiny_run), "--data", str(tmp_path / "gone"), "--no-progress"], capsys)
    assert_one_line_error(code, err)
    assert sorted(p.name for p in tiny_run.iterdir()) == before


def test_resuming_a_finished_run_trains_nothing(tiny_run, capsys):
    code, out, err = run(["train", "--out", str(tiny_run), "--no-progress", "--probe-epochs", "1"], capsys)
    assert code == 0, err
    assert "training" not in out and "nothing to train" in out


def _as_saved_by_version_0_2(cfg: dict) -> dict:
    """A config dict in empssl 0.2's flat form: every method's settings at their 0.2 defaults, and ``extra``."""
    from .test_config import V02_METHOD_SETTINGS

    return {**V02_METHOD_SETTINGS, **cfg, "extra": {}}


def test_a_run_directory_of_version_0_2_resumes(tmp_path, data_dir, capsys):
    """A run interrupted under empssl 0.2 (its config.json and checkpoint in 0.2's flat form, every method's
    settings and ``extra`` in them) resumes to the same weights as an uninterrupted run."""
    common = ["--data", "demo", "--data-dir", str(data_dir), "--no-progress", "--no-eval", "--train-subset", "100",
              "--test-subset", "50", "--epochs", "2", *TINY]
    ref, old = tmp_path / "ref", tmp_path / "old"
    assert main(["train", "--out", str(ref), *common]) == 0
    # the first epoch of the same schedule, then the run directory rewritten as 0.2 wrote it, unfinished
    assert main(["train", "--out", str(old), *common, "--epochs", "1", "--schedule-epochs", "2"]) == 0
    saved = json.loads((old / "config.json").read_text())
    saved["config"] = _as_saved_by_version_0_2({**saved["config"], "epochs": 2.0, "schedule_epochs": 0.0})
    (old / "config.json").write_text(json.dumps(saved))
    ckpt = torch.load(old / "checkpoint.pt", weights_only=True)
    ckpt["config"] = _as_saved_by_version_0_2({**ckpt["config"], "epochs": 2.0, "schedule_epochs": 0.0})
    ckpt["finished"] = False
    torch.save(ckpt, old / "checkpoint.pt")
    capsys.readouterr()

    code, out, err = run(["train", "--out", str(old), "--no-eval", "--no-progress"], capsys)
    assert code == 0, err
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (ref, old))
    assert b["step"] == a["step"] and b["finished"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


@pytest.mark.parametrize("flags", [
    ["--epochs", "inf"], ["--eval-every", "nan"], ["--warmup-epochs", "nan"], ["--momentum", "nan"],
    ["--weight-decay", "nan"], ["--eps", "inf"], ["--preset", "../../x"], ["--nesterov", "maybe"],
    ["--method", "simclr", "--temperature", "-1"], ["--temperature", "0.5"],
])
def test_bad_flag_values_are_one_line_errors(flags, tmp_path, capsys):
    code, _, err = run(["train", *flags, "--out", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, flags[-2] if flags[-2] != "--method" else flags[-1])
    assert code == 2 and not (tmp_path / "r").exists()


@pytest.mark.parametrize("settings, needle", [
    ({"lr": None}, "--lr must be a finite number, got None"), ({"lr": "fast"}, "--lr must be a finite number"),
    ({"probe_lrs": "0.1"}, "--probe-lrs must be a list of finite numbers"),
    ({"crop_scale": 0.5}, "--crop-scale must be 2 finite numbers"), ({"epochs": None}, "--epochs must be"),
    ({"nesterov": "no"}, "--nesterov must be true or false"), ({"method": ["simclr"]}, "--method must be a string"),
    ({"method": "byol", "tau_base": 2}, "--tau-base must be <= 1"), ({"typo": 1}, "unknown config keys: typo"),
])
def test_bad_config_file_values_are_one_line_errors(settings, needle, tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(settings))
    code, _, err = run(["train", "--config", str(path), "--out", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, needle)
