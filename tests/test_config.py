"""The config: one validation rule and one message per field, names declared once, presets per method."""

import pytest

from empssl.config import ARCH_NAMES, METHOD_NAMES, Config, ConfigError, load_preset, method_preset, preset_names


@pytest.mark.parametrize("value", [0, 1, -3])
def test_one_rule_and_one_message_per_field(value):
    with pytest.raises(ConfigError) as e:
        Config(num_patches=value).validate()
    assert str(e.value) == f"--num-patches must be >= 2 (the invariance term compares patches), got {value}"


def test_names_are_declared_once_and_registered():
    from empssl.methods import METHODS
    from empssl.models import ARCHS

    assert set(ARCHS) == set(ARCH_NAMES)
    assert set(METHODS) == set(METHOD_NAMES)


def test_validation_does_not_import_the_models():
    import subprocess
    import sys

    code = ("import sys; from empssl.config import Config; Config(arch='resnet34-cifar').validate(); "
            "print('empssl.models' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.parametrize("kw, needle", [
    (dict(arch="vgg11"), "--arch must be one of resnet18-cifar"),
    (dict(method="moco"), "--method must be one of emp-ssl, simclr, vicreg, byol"),
    (dict(eval_view="crops"), "--eval-view"),
    (dict(compile="maybe"), "--compile"),
    (dict(probe_lrs=(0.1, -1.0)), "--probe-lrs"),
    (dict(probe_lrs=(0.1, 0.3), probe_val_fraction=0.0), "validation split"),
    (dict(tau_base=0.99, tau_final=0.9), "--tau-base"),
    (dict(epochs=2, warmup_epochs=2), "--warmup-epochs"),
    (dict(temperature=0), "--temperature"),
])
def test_invalid_values_are_one_line_errors(kw, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        Config(**kw).validate()


def test_probe_validation_fraction_defaults_to_a_split_only_when_sweeping():
    assert Config().probe_val() == 0.0
    assert Config(probe_lrs=(0.01, 0.1)).probe_val() == 0.1
    assert Config(probe_lrs=(0.01, 0.1), probe_val_fraction=0.2).probe_val() == 0.2
    assert Config(probe_val_fraction=0.3).probe_val() == 0.3


def test_runs_saved_by_version_0_1_still_load():
    cfg = Config.from_dict({"compile": True, "probe_val_fraction": 0.0, "crop_scale": [0.25, 0.25]}).validate()
    assert cfg.compile == "on" and cfg.crop_scale == (0.25, 0.25)
    assert Config.from_dict({"compile": False}).compile == "off"


def test_every_method_but_emp_ssl_has_its_own_preset():
    assert method_preset("emp-ssl") is None
    for m in METHOD_NAMES[1:]:
        name = method_preset(m)
        assert name in preset_names()
        assert load_preset(name)["method"] == m
        Config.from_dict(load_preset(name)).validate()
