"""The Python API refuses bad input with a ValueError or TypeError that says what it expected, and every setting the
command line is given is checked before anything is written (the cases test_cli.py does not already hold)."""

import json
import math

import pytest
import torch

import empssl
from empssl.cli import main
from empssl.config import Config, ConfigError

NAN, INF = math.nan, math.inf


def _uint8(b=2, size=16):
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8)


def _model():
    return empssl.EMPSSLModel(width=2, hidden_dim=8, z_dim=4)


def _feats(n, nan_row=None):
    x = torch.randn(n, 4)
    if nan_row is not None:
        x[nan_row, 1] = NAN
    return x


CASES = [
    # make_patches
    ("float images 0..255", lambda: empssl.make_patches(torch.rand(2, 3, 16, 16) * 255, 2, empssl.Augment(size=8),
                                                        torch.Generator()), ValueError, "divide by 255"),
    ("NaN float images", lambda: empssl.make_patches(torch.full((2, 3, 16, 16), NAN), 2, empssl.Augment(size=8),
                                                     torch.Generator()), ValueError, "[0, 1]"),
    ("int16 images", lambda: empssl.make_patches(_uint8().short(), 2, empssl.Augment(size=8), torch.Generator()),
     TypeError, "uint8"),
    ("rank-3 images", lambda: empssl.make_patches(_uint8()[0], 2, empssl.Augment(size=8), torch.Generator()),
     ValueError, "(B, 3, H, W)"),
    ("1-channel images", lambda: empssl.make_patches(_uint8()[:, :1], 2, empssl.Augment(size=8), torch.Generator()),
     ValueError, "(B, 3, H, W)"),
    ("a numpy array", lambda: empssl.make_patches(_uint8().numpy(), 2, empssl.Augment(size=8), torch.Generator()),
     TypeError, "torch.Tensor"),
    ("generator None", lambda: empssl.make_patches(_uint8(), 2, empssl.Augment(size=8), None), TypeError,
     "torch.Generator"),
    ("zero patches", lambda: empssl.make_patches(_uint8(), 0, empssl.Augment(size=8), torch.Generator()), ValueError,
     "n_patches"),
    ("aug not an Augment", lambda: empssl.make_patches(_uint8(), 2, {"size": 8}, torch.Generator()), TypeError,
     "Augment"),
    # the loss
    ("one patch", lambda: empssl.emp_ssl_loss(torch.randn(1, 4, 8)), ValueError, "at least 2 patches"),
    ("eps 0", lambda: empssl.emp_ssl_loss(torch.randn(2, 4, 8), eps=0), ValueError, "eps must be a finite number > 0"),
    ("eps -1", lambda: empssl.emp_ssl_loss(torch.randn(2, 4, 8), eps=-1), ValueError, "> 0"),
    ("eps inf", lambda: empssl.total_coding_rate(torch.randn(4, 8), eps=INF), ValueError, "finite"),
    ("eps a string", lambda: empssl.total_coding_rate(torch.randn(4, 8), eps="0.2"), TypeError, "number"),
    ("invariance weight nan", lambda: empssl.emp_ssl_loss(torch.randn(2, 4, 8), invariance_weight=NAN), ValueError,
     "invariance_weight"),
    # models
    ("width 0", lambda: empssl.EMPSSLModel(width=0), ValueError, "width must be >= 1"),
    ("width -3", lambda: empssl.EMPSSLModel(width=-3), ValueError, "width must be >= 1"),
    ("width 2.5", lambda: empssl.EMPSSLModel(width=2.5), TypeError, "whole number"),
    ("hidden_dim 0", lambda: empssl.EMPSSLModel(width=2, hidden_dim=0), ValueError, "hidden_dim"),
    ("z_dim 0", lambda: empssl.EMPSSLModel(width=2, z_dim=0), ValueError, "z_dim"),
    ("a baseline's z_dim 0", lambda: empssl.create_method(Config(method="simclr", z_dim=0)).build_model(),
     ValueError, ">= 1"),
    # kNN
    ("kNN NaN train features", lambda: empssl.knn_predict(_feats(5, 2), torch.zeros(5, dtype=torch.long),
                                                          _feats(3), 2), ValueError, "NaN or infinite"),
    ("kNN inf test features", lambda: empssl.knn_predict(_feats(5), torch.zeros(5, dtype=torch.long),
                                                         _feats(3) / 0, 2), ValueError, "NaN or infinite"),
    ("kNN labels for fewer features", lambda: empssl.knn_predict(_feats(5), torch.zeros(4, dtype=torch.long),
                                                                 _feats(3), 2), ValueError, "one label per"),
    ("kNN dims differ", lambda: empssl.knn_predict(_feats(5), torch.zeros(5, dtype=torch.long), torch.randn(3, 5), 2),
     ValueError, "(N, D) and (M, D)"),
    ("kNN float labels", lambda: empssl.knn_predict(_feats(5), torch.zeros(5), _feats(3), 2), TypeError, "integers"),
    ("kNN labels out of range", lambda: empssl.knn_predict(_feats(5), torch.full((5,), 3), _feats(3), 2), ValueError,
     "[0, 2)"),
    ("kNN temperature inf", lambda: empssl.knn_predict(_feats(5), torch.zeros(5, dtype=torch.long), _feats(3), 2,
                                                       temperature=INF), ValueError, "temperature"),
    # the linear probe
    ("probe NaN features", lambda: empssl.linear_probe(_feats(6, 0), torch.tensor([0, 1] * 3), _feats(2),
                                                       torch.tensor([0, 1]), 2), ValueError, "NaN or infinite"),
    ("probe epochs 1.5", lambda: empssl.linear_probe(_feats(6), torch.tensor([0, 1] * 3), _feats(2),
                                                     torch.tensor([0, 1]), 2, epochs=1.5), TypeError, "epochs"),
    ("probe lr nan", lambda: empssl.linear_probe(_feats(6), torch.tensor([0, 1] * 3), _feats(2), torch.tensor([0, 1]),
                                                 2, lr=NAN), ValueError, "lr > 0"),
    ("probe labels mismatch", lambda: empssl.linear_probe(_feats(6), torch.tensor([0, 1] * 2), _feats(2),
                                                          torch.tensor([0, 1]), 2), ValueError, "one label per"),
    # feature extraction
    ("extract aug None", lambda: empssl.extract_features(_model(), _uint8(), None, 2), TypeError, "Augment"),
    ("extract float images", lambda: empssl.extract_features(_model(), _uint8().float(), empssl.Augment(size=8), 2),
     ValueError, "uint8"),
    ("extract 0 patches", lambda: empssl.extract_features(_model(), _uint8(), empssl.Augment(size=8), 0), ValueError,
     ">= 1"),
    ("extract batch -5", lambda: empssl.extract_features(_model(), _uint8(), empssl.Augment(size=8), 2,
                                                         batch_images=-5), ValueError, "batch_images"),
    ("extract kind", lambda: empssl.extract_features(_model(), _uint8(), empssl.Augment(size=8), 2, kind="z"),
     ValueError, "feature kind"),
    # the optimiser
    ("LARS lr nan", lambda: empssl.LARS(_model().parameters(), lr=NAN), ValueError, "lr must be a finite number >= 0"),
    ("LARS lr -1", lambda: empssl.LARS(_model().parameters(), lr=-1), ValueError, "lr must be"),
    ("LARS momentum 1", lambda: empssl.LARS(_model().parameters(), lr=0.1, momentum=1), ValueError, "in [0, 1)"),
    ("LARS eta inf", lambda: empssl.LARS(_model().parameters(), lr=0.1, eta=INF), ValueError, "eta"),
    ("LARS lr a string", lambda: empssl.LARS(_model().parameters(), lr="0.3"), ValueError, "finite number"),
    # the data
    ("load_data None", lambda: empssl.load_data(None), TypeError, "dataset name, a folder"),
    ("load_data empty", lambda: empssl.load_data(""), TypeError, "dataset name, a folder"),
    ("load_data image_size 1.5", lambda: empssl.load_data("demo", image_size=1.5), TypeError, "whole number"),
]


@pytest.mark.parametrize("call, error, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_api_input_raises_what_was_expected(call, error, needle):
    with pytest.raises(error) as info:
        call()
    assert needle in str(info.value)


def test_good_input_still_passes():
    """The checks refuse only what cannot work: float images in [0, 1] and two patches are fine."""
    patches = empssl.make_patches(torch.rand(2, 3, 16, 16), 2, empssl.Augment(size=8), torch.Generator())
    assert patches.shape == (2, 2, 3, 8, 8) and torch.isfinite(patches).all()
    assert torch.isfinite(empssl.emp_ssl_loss(torch.nn.functional.normalize(torch.randn(2, 4, 8), dim=-1)).loss)


CONFIG_CASES = [
    ({"width": "8"}, "--width must be a whole number"), ({"seed": 1.5}, "--seed must be a whole number"),
    ({"seed": True}, "--seed must be a whole number"), ({"log": None}, "--log must be a string"),
    ({"method_settings": None}, "method_settings must be a mapping"),
    ({"method_settings": {1: 2}}, "method_settings must be a mapping"),
    ({"method_settings": {"eps": "x"}}, "--eps must be a finite number"),
    ({"crop_scale": (NAN, 0.3)}, "--crop-scale must be 2 finite numbers"),
    ({"probe_lrs": [0.1]}, "--probe-lrs must be a list of finite numbers (a tuple), got [0.1]"),
    ({"crop_scale": [0.2, 0.3]}, "--crop-scale must be 2 finite numbers (a tuple)"),
    ({"probe_val_fraction": INF}, "--probe-val-fraction must be a finite number or none"),
    ({"compile": True}, "--compile must be a string"), ({"crop_ratio": ("a", "b")}, "--crop-ratio must be"),
]


@pytest.mark.parametrize("fields, needle", CONFIG_CASES, ids=[repr(c[0]) for c in CONFIG_CASES])
def test_config_validate_raises_only_config_error(fields, needle):
    with pytest.raises(ConfigError, match=None) as info:
        Config(**fields).validate()
    assert needle in str(info.value)


@pytest.mark.parametrize("given", [[1], {1: 2}, "lr"])
def test_config_from_dict_refuses_what_is_not_settings(given):
    with pytest.raises(ConfigError, match="mapping of names"):
        Config.from_dict(given)


@pytest.mark.parametrize("flags", [
    ["--eval-every", "inf"], ["--schedule-epochs", "nan"], ["--lars-eta", "nan"], ["--invariance-weight", "nan"],
    ["--probe-lrs", "inf"], ["--warmup-epochs", "inf"], ["--lr", "nan"],
])
def test_non_finite_flags_are_refused_before_anything_is_written(flags, tmp_path, capsys):
    code = main(["train", *flags, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and flags[0] in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("settings, needle", [
    ({"eps": 0}, "--eps must be > 0"), ({"invariance_weight": "x"}, "--invariance-weight must be a finite number"),
    ({"probe_val_fraction": "0.1"}, "--probe-val-fraction must be a finite number or none"),
    ({"crop_ratio": [1, 2, 3]}, "--crop-ratio must be 2 finite numbers"), ({"device": 3}, "--device must be a string"),
])
def test_wrong_typed_config_file_values_leave_no_run_directory(settings, needle, tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(settings))
    code = main(["train", "--config", str(path), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "r").exists()


# --- a training step that cannot fit is refused at start ------------------------------------------------------


def test_a_step_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, capsys):
    """--patch-size 1000 would grow to terabytes: one line naming the estimate and the limit, exit 2, no run
    directory, and no patch of that size is ever allocated (the estimate measures patches of at most 64 px)."""
    code = main(["train", "--data", "demo", "--data-dir", str(tmp_path / "data"), "--patch-size", "1000",
                 "--device", "cpu", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "one training step of 2000 patches of 1000 px needs" in err and "available" in err, err
    assert not (tmp_path / "r").exists() and not (tmp_path / "data").exists()


def test_the_limit_is_what_is_available(monkeypatch):
    from empssl import recompute

    cfg = Config(width=4, hidden_dim=32, z_dim=16, patch_size=8, num_patches=4, batch_size=20)
    recompute.check_step_fits(cfg, torch.device("cpu"))  # a couple of MiB: fits
    monkeypatch.setattr(recompute, "available_bytes", lambda device: 2**20)
    with pytest.raises(ConfigError, match=r"needs ~\d+ MiB .* but the host has 1 MiB available"):
        recompute.check_step_fits(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match="with activation checkpointing"):  # asked for: estimated with it
        recompute.check_step_fits(cfg.replace(grad_checkpointing="on"), torch.device("cpu"))


@pytest.mark.parametrize("arch", ["resnet18-cifar", "resnet18-imagenet"])
def test_large_patches_are_extrapolated_from_small_ones(arch):
    """Beyond 64 px the activations are fitted through 32 and 64 px; for ResNets that is exact at 96 px."""
    from empssl.recompute import activation_bytes_at, activation_bytes_per_patch

    model = empssl.EMPSSLModel(arch, width=4, hidden_dim=16, z_dim=8)
    cpu = torch.device("cpu")
    assert activation_bytes_at(model, 96, cpu) == pytest.approx(activation_bytes_per_patch(model, 96, cpu), rel=0.02)


def test_a_two_view_model_is_measured_on_views():
    from empssl.recompute import activation_bytes_per_patch

    model = empssl.create_method(Config(method="simclr", width=4, hidden_dim=16, z_dim=8)).build_model()
    assert activation_bytes_per_patch(model, 16, torch.device("cpu")) > 0
