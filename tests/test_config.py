"""The config: every setting declared once (default, help, rule), one validation and one message style for every
value, names declared once, presets per method, runs of v0.2 still load."""

import dataclasses
import math
import subprocess
import sys

import pytest

from empssl.config import (
    ARCH_NAMES,
    Config,
    ConfigError,
    MethodSettings,
    flag_fields,
    load_preset,
    method_preset,
    preset_names,
)
from empssl.methods import method_class, method_names

# Every method's own settings and their defaults in empssl 0.2, when they were flat Config fields.
V02_METHOD_SETTINGS = {"eps": 0.2, "invariance_weight": 200.0, "temperature": 0.2, "sim_weight": 25.0,
                       "var_weight": 25.0, "cov_weight": 1.0, "tau_base": 0.99, "tau_final": 1.0,
                       "pred_hidden_dim": 4096}


@pytest.mark.parametrize("value", [0, 1, -3])
def test_one_rule_and_one_message_per_field(value):
    with pytest.raises(ConfigError) as e:
        Config(num_patches=value).validate()
    assert str(e.value) == f"--num-patches must be >= 2 (the invariance term compares patches), got {value}"


def test_names_are_declared_once_and_registered():
    from empssl.models import ARCHS

    assert set(ARCHS) == set(ARCH_NAMES)
    # the names read from the modules without importing them are the names the classes register
    assert method_names()[:4] == ("emp-ssl", "simclr", "vicreg", "byol")
    for name in method_names():
        assert method_class(name).name == name
    # every class the package's modules register is listed (its @register line was read)
    import importlib
    import pkgutil

    import empssl.methods
    from empssl import registry

    for module in pkgutil.iter_modules(empssl.methods.__path__):
        importlib.import_module(f"empssl.methods.{module.name}")
    assert set(registry._REGISTERED) == set(method_names())


def test_validation_does_not_import_the_models():
    code = ("import sys; from empssl.config import Config; from empssl.methods import method_names; "
            "Config(arch='resnet34-cifar').validate(); Config(method='byol').validate(); method_names(); "
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
    (dict(method="byol", tau_base=0.99, tau_final=0.9), "--tau-base"),
    (dict(epochs=2, warmup_epochs=2), "--warmup-epochs"),
    (dict(method="simclr", temperature=0), "--temperature must be > 0"),
    (dict(method="byol", tau_final=1.5), "--tau-final must be <= 1"),
    (dict(temperature=0.5), "--temperature is a setting of simclr, not of --method emp-ssl"),
    (dict(bogus=1), "unknown config keys: bogus"),
])
def test_invalid_values_are_one_line_errors(kw, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        Config.from_dict(kw).validate()


def test_probe_validation_fraction_defaults_to_a_split_only_when_sweeping():
    assert Config().probe_val() == 0.0
    assert Config(probe_lrs=(0.01, 0.1)).probe_val() == 0.1
    assert Config(probe_lrs=(0.01, 0.1), probe_val_fraction=0.2).probe_val() == 0.2
    assert Config(probe_val_fraction=0.3).probe_val() == 0.3


def test_every_setting_declares_its_help_group_and_a_valid_default():
    for f in flag_fields(Config):
        assert f.metadata["help"] and f.metadata["group"], f.name
    for name in method_names():
        settings = method_class(name).Settings
        assert issubclass(settings, MethodSettings) and dataclasses.is_dataclass(settings)
        for f in dataclasses.fields(settings):
            assert f.metadata["help"], (name, f.name)
            assert f.name not in {g.name for g in dataclasses.fields(Config)}, f"{name}.{f.name} shadows a Config field"
        settings.from_dict({}, name)  # the defaults pass their own rules


def test_settings_read_from_the_source_declare_what_the_imported_classes_do(monkeypatch):
    """The command line's flags come from the settings class statements read from the method modules' source
    (empssl.registry.declared): the same fields, defaults, help, rules and types as the imported classes."""
    from empssl import config, registry

    def described(cls):
        return [(f.name, f.default, dict(f.metadata), config.type_hints(cls)[f.name]) for f in dataclasses.fields(cls)]

    imported = {name: method_class(name).Settings for name in method_names()}
    monkeypatch.setattr(registry, "_REGISTERED", {})  # as in a process that has imported no method module
    for name, cls in imported.items():
        declared = config.declared_settings_class(name)
        assert declared is not cls and issubclass(declared, MethodSettings)
        assert described(declared) == described(cls), name


def test_presets_and_setting_names_read_from_the_source_are_the_classes_own():
    from empssl import registry

    for name in method_names():
        cls = method_class(name)
        source = registry.declared(name)
        assert source.preset == method_preset(name) == cls.preset
        assert source.setting_names == tuple(f.name for f in dataclasses.fields(cls.Settings))


def test_method_settings_and_recipes_need_no_torch():
    """A method setting out of bounds (--tau-base 2), one of another method, a method's own recipe and what
    `empssl compare` gives each method are all answered from the methods' source, before torch loads."""
    code = ("import sys\nfrom empssl.config import Config, ConfigError, method_recipe, settings_for\n"
            "for given in ({'method': 'byol', 'tau_base': 2}, {'tau_base': 2}):\n"
            "    try:\n        Config.from_dict(given).validate()\n    except ConfigError as e:\n        print(e)\n"
            "print(method_recipe('byol')['method'], Config(method='simclr').to_dict()['temperature'],\n"
            "      sorted(settings_for('vicreg', {'temperature': 1, 'sim_weight': 2, 'lr': 3})))\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["--tau-base must be <= 1, got 2",
                                "--tau-base is a setting of byol, not of --method emp-ssl",
                                "byol 0.2 ['lr', 'sim_weight']", "False"]


def test_method_settings_read_and_write_as_flat_keys():
    cfg = Config.from_dict({"method": "byol", "tau_base": 0.9}).validate()
    assert cfg.method_settings == {"tau_base": 0.9}
    assert cfg.settings().tau_base == 0.9 and cfg.tau_base == 0.9 and cfg.pred_hidden_dim == 4096
    d = cfg.to_dict()
    assert d["tau_base"] == 0.9 and d["tau_final"] == 1.0 and "method_settings" not in d and "temperature" not in d
    assert Config.from_dict(d).settings() == cfg.settings()
    assert cfg.replace(tau_final=0.95).settings().tau_final == 0.95
    assert Config().to_dict()["eps"] == 0.2  # EMP-SSL's own settings, as a v0.2 config.json named them
    with pytest.raises(AttributeError):
        _ = cfg.temperature  # SimCLR's, not BYOL's


def test_a_config_saved_by_version_0_2_still_loads():
    """empssl 0.2 saved every method's settings as flat fields (and an ``extra`` dict): the run's own method's
    settings are kept, the others dropped (they never applied to it)."""
    flat = {**Config().to_dict(), **V02_METHOD_SETTINGS, "extra": {}, "crop_scale": [0.25, 0.25]}
    cfg = Config.from_dict(flat).validate()
    assert cfg.method == "emp-ssl" and cfg.crop_scale == (0.25, 0.25)
    assert cfg.method_settings == {"eps": 0.2, "invariance_weight": 200.0}
    byol = Config.from_dict({**flat, "method": "byol", "tau_base": 0.9}).validate()
    assert byol.method_settings == {"pred_hidden_dim": 4096, "tau_base": 0.9, "tau_final": 1.0}


def test_every_method_preset_names_its_method():
    assert method_preset("emp-ssl") is None
    for m in method_names():
        name = method_preset(m)
        if name is None:
            continue
        assert name in preset_names()
        assert load_preset(name)["method"] == m
        Config.from_dict(load_preset(name)).validate()
    assert all(method_preset(m) for m in ("simclr", "vicreg", "byol"))


# --- one validation of every value: whatever the source, a ConfigError in one style -----------------------------


@pytest.mark.parametrize("given, needle", [
    (dict(epochs=math.inf), "--epochs must be a finite number, got inf"),
    (dict(eval_every=math.nan), "--eval-every must be a finite number, got nan"),
    (dict(warmup_epochs=math.nan), "--warmup-epochs must be a finite number"),
    (dict(momentum=math.nan), "--momentum must be a finite number"),
    (dict(weight_decay=math.nan), "--weight-decay must be a finite number"),
    (dict(lr=None), "--lr must be a finite number, got None"),
    (dict(lr="fast"), "--lr must be a finite number, got 'fast'"),
    (dict(epochs=None), "--epochs must be a finite number, got None"),
    (dict(probe_lrs="0.1"), "--probe-lrs must be a list of finite numbers, got '0.1'"),
    (dict(crop_scale=0.5), "--crop-scale must be 2 finite numbers, got 0.5"),
    (dict(crop_scale=[0.5]), "--crop-scale must be 2 finite numbers, got (0.5,)"),
    (dict(nesterov="no"), "--nesterov must be true or false, got 'no'"),
    (dict(num_patches=2.5), "--num-patches must be a whole number, got 2.5"),
    (dict(num_patches=True), "--num-patches must be a whole number, got True"),
    (dict(probe_val_fraction="x"), "--probe-val-fraction must be a finite number or none"),
    (dict(eps=math.inf), "--eps must be a finite number, got inf"),
    (dict(method="byol", tau_base="high"), "--tau-base must be a finite number, got 'high'"),
    (dict(method=3), "--method must be a string, got 3"),
    (dict(method={}, tau_base=0.9), "--method must be a string, got {}"),
])
def test_every_value_is_checked_once_with_one_message_style(given, needle):
    with pytest.raises(ConfigError) as e:
        Config.from_dict(given).validate()
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["../../x", "../presets/cpu-demo", "/etc/passwd", "nope"])
def test_preset_names_cannot_leave_the_presets(name):
    with pytest.raises(ConfigError, match="unknown --preset"):
        load_preset(name)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_is_a_valid_config(name):
    cfg = Config.from_dict(load_preset(name)).validate()
    assert set(load_preset(name)) <= set(cfg.to_dict())
