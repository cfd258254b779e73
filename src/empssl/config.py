"""One config dataclass whose defaults are the paper's CIFAR-10 recipe; presets override it, flags override both.

Every setting is declared once, with :func:`setting`: default, ``--help`` text, group of flags and rule, which
:meth:`Config.validate` checks. A method's own settings (SimCLR's temperature, ...) are declared the same way beside
the method, as a :class:`MethodSettings`; a Config holds those given in ``method_settings`` and reads and writes them
as flat keys (``cfg.to_dict()["temperature"]``), as their flags name them.

Nothing here imports torch: the package's methods' settings and presets are read from their source
(:mod:`empssl.registry`), so that validating a config and the command line's flags answer before torch loads.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

from . import registry
from .errors import ConfigError as ConfigError  # raised here and by the registry; importable from here as before

# The architecture names, declared here so that validating a config imports neither torch nor the models;
# empssl.models.ARCHS has an implementation of each (a test checks that both agree). Method names come from
# the method registry (empssl.registry), which reads them without importing torch.
ARCH_NAMES = ("resnet18-cifar", "resnet18-imagenet", "resnet34-cifar")
LOGGER_NAMES = ("tensorboard", "wandb", "mlflow")  # --log (empssl.tracking)


def logger_names(text: str) -> list[str]:
    """``--log`` -> the chosen loggers, once each: ``"none"`` -> [], ``",tensorboard,wandb"`` -> ["tensorboard",
    "wandb"]."""
    names = [t.strip() for t in text.split(",") if t.strip() and t.strip() != "none"]
    return list(dict.fromkeys(names))


def setting(default: Any, help: str, group: str = "", *, low: float | None = None, above: float | None = None,
            high: float | None = None, choices: tuple[str, ...] = (), why: str = "") -> Any:
    """A dataclass field with its ``help`` text, ``group`` of flags and rule (:func:`check_fields`): value >= ``low``,
    > ``above``, <= ``high``, one of ``choices``; ``why`` is added to the message of a broken bound."""
    meta = {"help": help, "group": group, "low": low, "above": above, "high": high, "choices": choices, "why": why}
    return field(default=default, metadata=meta)


def flag(name: str) -> str:
    """The command-line flag of a setting: ``num_patches`` -> ``--num-patches``."""
    return "--" + name.replace("_", "-")


@dataclass
class Config:
    """Every setting of a run; the method's own in ``method_settings``. Build one with ``Config(...)``,
    ``Config.from_dict(flat)`` or ``cfg.replace(...)``; then :meth:`validate`."""

    # --- data ---------------------------------------------------------------------------------------------------
    data: str = setting("cifar10", "cifar10, cifar100, tiny-imagenet, demo (bundled 5,000-image CIFAR-10 subset), "
                        "imagenet100:PATH or imagenet:PATH (an ImageNet train/val tree), or a path to an "
                        "ImageFolder root with train/ and test/ (or val/), Tiny ImageNet as distributed, or a "
                        ".tar/.tar.gz/.zip of one; or a shard folder (empssl shard), also s3:// or "
                        "gs://BUCKET/PREFIX", "data")
    data_dir: str = setting("./data", "folder for torchvision datasets, the decoded-image cache and the cache of "
                                      "shards read from an object store", "data")
    image_size: int = setting(0, "resize images (shorter side + centre crop) to this size; 0 keeps their own size "
                              "(they must all agree)", "data", low=0)
    train_subset: int = setting(0, "use only the first N training images (class-balanced); 0 = all", "data", low=0)
    test_subset: int = setting(0, "use only the first N test images (class-balanced); 0 = all", "data", low=0)
    data_mode: str = setting("auto", "memory (decode everything into one in-memory tensor), stream (decode the "
                             "training images batch by batch from shards or the source; needs --image-size), or "
                             "auto (stream when the decoded images would not fit in memory; README: Streaming "
                             "data that does not fit in memory)", "data", choices=("auto", "memory", "stream"))
    image_key: str = setting("", "the field of a LitData folder's items (one without empssl's manifest.json) that "
                             "holds the image (default: found from its serializers)", "data")
    label_key: str = setting("", "the field of a LitData folder's items that holds the int label (default: "
                             "\"label\", else the one int field)", "data")
    decode: str = setting("auto", "where the streamed tier decodes JPEGs: cpu (in DataLoader workers), cuda (the "
                          "batch at once on the GPU, nvjpeg; what it cannot decode falls back to the CPU), or auto "
                          "(cuda when training on CUDA)", "data", choices=("auto", "cpu", "cuda"))
    # --- patches (official: RandomResizedCrop(32, scale=(0.25, 0.25), ratio=(1, 1)) + colour augmentations) -----
    num_patches: int = setting(20, "patches per image per step (20 official; 200 in the paper's best runs)",
                               "patches", low=2, why=" (the invariance term compares patches)")
    patch_size: int = setting(32, "patch side in pixels after resizing", "patches", low=1)
    crop_scale: tuple[float, float] = setting((0.25, 0.25), "crop area as a fraction of the image (min max)", "patches")
    crop_ratio: tuple[float, float] = setting((1.0, 1.0), "crop aspect ratio range (min max)", "patches")
    patch_chunks: int = setting(1, "EMP-SSL: make and push a step's patches through the network in this many "
                                "equal groups (of --num-patches / K patches of every image), so that a step holds "
                                "one group's patches and activations, at one more forward pass; the loss is over "
                                "all patches, BatchNorm normalises each group as the official code's DataParallel "
                                "does on K GPUs (README: Many large patches). Must divide --num-patches", "patches",
                                low=1)
    # --- method: its name here; its own settings are declared by the method (empssl.methods) -------------------
    method: str = setting("emp-ssl", "self-supervised method; one without --preset starts from its own preset "
                          "(simclr: simclr-cifar10, ...)", "method")
    method_settings: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "the method's own settings that differ from its defaults, by name (its flags)", "group": ""})
    # --- model --------------------------------------------------------------------------------------------------
    arch: str = setting("resnet18-cifar", "backbone architecture", "model", choices=ARCH_NAMES)
    width: int = setting(64, "channels of the first ResNet stage (64 = standard ResNet-18)", "model", low=1)
    hidden_dim: int = setting(4096, "EMP-SSL: pre-feature and projector width; baselines: projector hidden width",
                              "model", low=1)
    z_dim: int = setting(1024, "projector output dimension", "model", low=1)
    # --- optimisation (SGD + LARS, cosine per step) -------------------------------------------------------------
    epochs: float = setting(1.0, "training epochs (fractions allowed)", "optimisation", above=0)
    schedule_epochs: float = setting(0.0, "length of the cosine schedule in epochs; 0 = --epochs (use 2 with "
                                     "--epochs 1 for the official README's 1-epoch figure)", "optimisation", low=0)
    batch_size: int = setting(100, "images per step", "optimisation", low=2,
                              why=" (BatchNorm and the losses need a batch)")
    lr: float = setting(0.3, "peak learning rate", "optimisation", above=0)
    momentum: float = setting(0.9, "SGD (Nesterov) momentum", "optimisation", low=0)
    weight_decay: float = setting(1e-4, "weight decay (not applied to biases and norm parameters)", "optimisation",
                                  low=0)
    lars_eta: float = setting(0.005, "LARS trust coefficient", "optimisation", low=0)
    nesterov: bool = setting(True, "Nesterov momentum", "optimisation")
    warmup_epochs: float = setting(0.0, "linear learning-rate warm-up from --warmup-start-lr before the cosine "
                                   "decay, in epochs", "optimisation", low=0)
    warmup_start_lr: float = setting(0.0, "learning rate at the start of the warm-up", "optimisation", low=0)
    min_lr: float = setting(0.0, "learning rate at the end of the cosine decay", "optimisation", low=0)
    # --- run ----------------------------------------------------------------------------------------------------
    seed: int = setting(0, "random seed (model init, batch order, patches)", "run")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N", "run")
    precision: str = setting("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32", "run",
                             choices=("auto", "bf16", "fp32"))
    channels_last: bool = setting(True, "channels_last memory format on CUDA", "run")
    log_every: int = setting(20, "steps between lines in metrics.jsonl", "run", low=1)
    checkpoint_every: int = setting(200, "steps between checkpoints (one is also written at every epoch end)",
                                    "run", low=1)
    log: str = setting("none", "also stream the metrics, the config and the results to: none, or comma-separated "
                       "tensorboard, wandb (offline unless logged in), mlflow; each needs its extra: pip install "
                       "'empssl[NAME]' (README: Watching a run)", "run")
    # --- evaluation ---------------------------------------------------------------------------------------------
    test_patches: int = setting(128, "augmented patches averaged per image (bag of features)", "evaluation", low=1)
    eval_view: str = setting("auto", "patches (bag of features, EMP-SSL's own) or full (the whole image, the "
                             "baselines' own); auto = the method's own", "evaluation",
                             choices=("auto", "patches", "full"))
    eval_feature: str = setting("auto", "pre (EMP-SSL's 4096-d pre-feature) or backbone (512-d); auto = the "
                                "method's own", "evaluation", choices=("auto", "pre", "backbone"))
    eval_seed: int = setting(0, "seed of the test patches", "evaluation")
    eval_batch_size: int = setting(0, "patches per forward pass when extracting features; 0 = automatic",
                                   "evaluation", low=0)
    probe_epochs: int = setting(100, "linear-probe epochs", "evaluation", low=1)
    probe_lr: float = setting(0.03, "linear-probe learning rate", "evaluation", above=0)
    probe_lrs: tuple[float, ...] = setting((), "comma-separated learning rates: one probe head each, trained "
                                           "together; the one best on a validation split of the training set is "
                                           "reported (beyond the official recipe); none = --probe-lr alone",
                                           "evaluation")
    probe_momentum: float = setting(0.9, "linear-probe SGD momentum", "evaluation", low=0)
    probe_weight_decay: float = setting(5e-5, "linear-probe weight decay", "evaluation", low=0)
    probe_batch_size: int = setting(100, "linear-probe batch size", "evaluation", low=1)
    probe_val_fraction: float | None = setting(None, "if > 0, select the probe epoch (and lr) on this fraction of "
                                               "the training set, never on the test set; 0 reports the final epoch "
                                               "(none: 0.1 with --probe-lrs, else 0)", "evaluation")
    knn_k: int = setting(20, "neighbours in the weighted kNN", "evaluation", low=1)
    knn_temperature: float = setting(0.07, "kNN temperature", "evaluation", above=0)
    compare_random_init: bool = setting(False, "also evaluate the untrained encoder (same initialisation) with the "
                                        "same protocol", "evaluation")
    # --- monitoring ---------------------------------------------------------------------------------------------
    eval_every: float = setting(0.0, "kNN accuracy during training (RUN/monitor.jsonl) every N steps (N >= 1) or "
                                "every fraction of an epoch (0 < N < 1); 0 = off", "monitoring", low=0)
    monitor_patches: int = setting(4, "test patches per image in the kNN during training", "monitoring", low=1)
    monitor_bank: int = setting(5000, "training images (class-balanced) in its kNN memory bank", "monitoring", low=1)
    monitor_test: int = setting(2000, "test images (class-balanced) it classifies", "monitoring", low=1)
    # --- online: one pass over a stream (empssl.online) -------------------------------------------------------
    online: bool = setting(False, "learn from a stream in one pass, each image once in arrival order: --data is a "
                           "folder that keeps receiving image files, or a shard folder that empssl shard --append "
                           "adds to (README: Online learning)", "online")
    online_stop: int = setting(0, "stop once this many images have been learned (rounded up to whole batches); "
                               "0 = follow the stream until Ctrl-C or --online-timeout", "online", low=0)
    online_timeout: float = setting(600.0, "stop when no new image has arrived for this many seconds; 0 = wait "
                                    "for ever", "online", low=0)
    online_settle: float = setting(1.0, "seconds a file's size and modification time must stay unchanged before "
                                   "it is read (files still being written are left alone)", "online", above=0)
    online_warmup: int = setting(0, "images of linear learning-rate warm-up from --warmup-start-lr to --lr "
                                 "(rounded to whole steps); the rate then stays at --lr", "online", low=0)
    online_eval: str = setting("", "labelled data for the kNN monitor: its train split is the memory bank "
                               "(--monitor-bank images), its test split the queries (--monitor-test); any --data "
                               "value (demo, cifar10, an ImageFolder root ...); empty = no monitor", "online")
    online_eval_every: int = setting(0, "images between kNN checks against --online-eval (rounded to whole "
                                     "steps); 0 = off", "online", low=0)
    # --- scale-out / speed --------------------------------------------------------------------------------------
    tcr_global: bool = setting(True, "under torchrun: EMP-SSL's coding rate over the all-gathered global batch, "
                               "as one process on --batch-size images would compute it (false: over each rank's "
                               "images)", "speed")
    sync_bn: bool = setting(False, "under torchrun: BatchNorm statistics over all ranks' patches (SyncBatchNorm)",
                            "speed")
    grad_checkpointing: str = setting("auto", "recompute each residual block in the backward pass (exact, ~1/3 "
                                      "more compute, far less memory): auto (on CUDA only when the step would not "
                                      "fit), on or off", "speed", choices=("auto", "on", "off"))
    compile: str = setting("auto", "torch.compile the training step: auto (on CUDA when the run is long enough to "
                           "win back the compile time, decided after measuring the eager step), on or off", "speed",
                           choices=("auto", "on", "off"))

    def validate(self) -> Config:
        """Raise ConfigError (one line) for values that cannot work; return self. Each value against its declaration,
        then the combinations, then the method's own settings where any are given."""
        check_fields(self)
        if self.method not in registry.method_names():  # the registry imports no method module for this
            raise ConfigError(f"--method must be one of {', '.join(registry.method_names())}, got {self.method!r}")
        if 0 < self.schedule_epochs < self.epochs:
            raise ConfigError(f"--schedule-epochs ({self.schedule_epochs:g}) must be >= --epochs ({self.epochs:g})")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"--crop-scale must satisfy 0 < min <= max <= 1, got {lo:g} {hi:g}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ConfigError(f"--crop-ratio must satisfy 0 < min <= max, got {lo:g} {hi:g}")
        if self.num_patches % self.patch_chunks:
            raise ConfigError(f"--patch-chunks ({self.patch_chunks}) must divide --num-patches ({self.num_patches}): "
                              f"every group holds the same patches of every image")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.probe_val_fraction is not None and not 0 <= self.probe_val_fraction < 1:
            raise ConfigError(f"--probe-val-fraction must be in [0, 1), got {self.probe_val_fraction:g}")
        if any(not lr > 0 for lr in self.probe_lrs):
            raise ConfigError(f"--probe-lrs must all be > 0, got {','.join(f'{lr:g}' for lr in self.probe_lrs)}")
        if self.probe_lrs and self.probe_val_fraction == 0:
            raise ConfigError("--probe-lrs chooses a learning rate on a validation split: "
                              "--probe-val-fraction must be > 0")
        if self.warmup_epochs and self.warmup_epochs >= (self.schedule_epochs or self.epochs):
            raise ConfigError(f"--warmup-epochs ({self.warmup_epochs:g}) must be shorter than the schedule "
                              f"({self.schedule_epochs or self.epochs:g} epochs)")
        if any(n not in LOGGER_NAMES for n in logger_names(self.log)):  # --log
            raise ConfigError(f"--log must be none or comma-separated names from {', '.join(LOGGER_NAMES)}, "
                              f"got {self.log!r}")
        if self.eval_every >= 1 and self.eval_every != int(self.eval_every):
            raise ConfigError(f"--eval-every must be 0 (off), a whole number of steps, or a fraction of an epoch "
                              f"below 1, got {self.eval_every:g}")
        if self.online_eval_every and not self.online_eval:
            raise ConfigError("--online-eval-every needs --online-eval DATA (the labelled bank and queries)")
        if not isinstance(self.method_settings, dict) or not all(isinstance(k, str) for k in self.method_settings):
            raise ConfigError(f"method_settings must be a mapping of settings by name, got {self.method_settings!r}")
        if self.method_settings:
            self.settings()
        return self

    def settings(self) -> MethodSettings:
        """The method's own settings: its declared defaults with ``method_settings`` applied, validated."""
        return declared_settings_class(self.method).from_dict(self.method_settings, self.method)

    def probe_val(self) -> float:
        """The validation fraction the probe uses: as given, else 0.1 when sweeping --probe-lrs and 0 otherwise."""
        if self.probe_val_fraction is not None:
            return self.probe_val_fraction
        return 0.1 if self.probe_lrs else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Every setting by its flat name, the method's own ones included (what config.json and checkpoints hold)."""
        out = {f.name: getattr(self, f.name) for f in flag_fields(Config)}
        return {**out, **dataclasses.asdict(self.settings())}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Config:
        """A Config from flat settings (a preset, a --config file, a run's config.json): the keys that are not
        Config fields are the method's own settings; an unknown key is a ConfigError."""
        if not isinstance(d, Mapping) or not all(isinstance(k, str) for k in d):
            raise ConfigError(f"settings must be a mapping of names to values, got {d!r:.80}")
        d = dict(d)
        if "extra" in d:  # saved by empssl 0.1 or 0.2 (with a dict of notes): every method's settings as flat
            d.pop("extra")  # fields, of which only its own method's ever applied to it
            d = settings_for(d.get("method", Config.method), d)
        names = {f.name for f in flag_fields(cls)}
        own: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        cfg = cls(**own, method_settings={k: v for k, v in d.items() if k not in names})
        if cfg.method_settings:
            cfg.settings()  # unknown keys fail here, before anything runs
        return cfg

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied; the method's own settings by their flat names (``tau_base=0.9``)."""
        names = {f.name for f in dataclasses.fields(self)}
        own = {k: v for k, v in changes.items() if k in names}
        given = {k: v for k, v in changes.items() if k not in names}
        if given:
            own["method_settings"] = {**own.get("method_settings", self.method_settings), **given}
        return dataclasses.replace(self, **own)

    if not TYPE_CHECKING:  # for type checkers a setting is read from Config.settings(), typed by its method
        def __getattr__(self, name: str) -> Any:
            """A method setting by its flat name (``cfg.tau_base``), as a config.json or a flag names it."""
            if name.startswith("_") or name == "method_settings":
                raise AttributeError(name)
            try:
                settings = self.settings()
            except ConfigError:
                raise AttributeError(name) from None
            if name not in {f.name for f in dataclasses.fields(settings)}:
                raise AttributeError(f"'Config' object has no attribute {name!r}")
            return getattr(settings, name)


S = TypeVar("S", bound="MethodSettings")


@dataclass(frozen=True)
class MethodSettings:
    """A method's own settings: a frozen dataclass subclass whose fields are declared with :func:`setting`; its
    :meth:`check` holds the rules that tie several of them together."""

    def check(self) -> None:
        """Raise ConfigError for combinations of values that cannot work (each value alone is already checked)."""

    @classmethod
    def from_dict(cls: type[S], given: Mapping[str, Any], method: str) -> S:
        """These settings with ``given`` applied, validated; a key they do not declare is a ConfigError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - names)
        if unknown:
            owners = registry.settings_owners(unknown[0])
            if owners:
                raise ConfigError(f"{flag(unknown[0])} is a setting of {' and '.join(owners)}, not of "
                                  f"--method {method}")
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        settings = cls(**given)
        check_fields(settings)
        settings.check()
        return settings


def declared_settings_class(method: str) -> type[MethodSettings]:
    """The settings class ``method`` declares; for the package's methods, without importing torch: their settings
    class statement read from the source (:func:`empssl.registry.declared`), run alone. Validating a config and the
    command line's flags use it."""
    source = registry.declared(method)
    if source and source.settings:
        return _settings_class(source.settings, method)
    return registry.method_class(method).Settings


@functools.cache
def _settings_class(source: str, method: str) -> type[MethodSettings]:
    names: dict[str, Any] = {"dataclass": dataclass, "MethodSettings": MethodSettings, "setting": setting,
                             "ConfigError": ConfigError, "__name__": __name__}
    exec(compile(source, f"<settings of {method}>", "exec"), names)
    return next(v for v in names.values() if isinstance(v, type) and issubclass(v, MethodSettings)
                and v is not MethodSettings)


def settings_for(method: str, d: Mapping[str, Any]) -> dict[str, Any]:
    """``d`` without the settings that only other methods declare: what settings given to several methods alike
    (``empssl compare``) mean for ``method``."""
    owners = {k: registry.settings_owners(k) for k in d}
    return {k: v for k, v in d.items() if not owners[k] or method in owners[k]}


def flag_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of a Config or MethodSettings class that are settings (each has a flag)."""
    return [f for f in dataclasses.fields(cls) if f.name != "method_settings"]


_HINTS: dict[type, dict[str, Any]] = {}


def type_hints(cls: type) -> dict[str, Any]:
    """The annotations of a Config or MethodSettings class as types (``tuple[float, float]``, ``float | None``)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _numbers(x: Any) -> bool:
    return isinstance(x, tuple) and all(_is_number(v) for v in x)


# The annotations a setting may have: what a value must be, in words, and its test.
_KINDS: dict[Any, tuple[str, Callable[[Any], bool]]] = {
    bool: ("true or false", lambda x: isinstance(x, bool)),
    int: ("a whole number", lambda x: isinstance(x, int) and not isinstance(x, bool)),
    float: ("a finite number", _is_number),
    str: ("a string", lambda x: isinstance(x, str)),
    float | None: ("a finite number or none", lambda x: x is None or _is_number(x)),
    tuple[float, ...]: ("a list of finite numbers", _numbers),
    tuple[float, float]: ("2 finite numbers", lambda x: _numbers(x) and len(x) == 2),
}


def check_fields(obj: Any) -> None:
    """Check every setting of ``obj`` (a Config or MethodSettings) against its declaration: its type (finite for
    numbers), then its bounds and choices (:func:`setting`). Raises ConfigError in one line, naming the flag."""
    hints = type_hints(type(obj))
    for f in flag_fields(type(obj)):
        value, meta = getattr(obj, f.name), f.metadata
        what, ok = _KINDS[hints[f.name]]
        if not ok(value):
            as_tuple = " (a tuple)" if isinstance(value, list) and typing.get_origin(hints[f.name]) is tuple else ""
            shown = " ".join(repr(value).split())  # one line, even for a tensor in a damaged checkpoint's config
            raise ConfigError(f"{flag(f.name)} must be {what}{as_tuple}, got {shown:.80}")
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{flag(f.name)} must be one of {', '.join(meta['choices'])}, got {value!r}")
        for key, sign, broken in (("low", ">=", lambda v, b: v < b), ("above", ">", lambda v, b: not v > b),
                                  ("high", "<=", lambda v, b: v > b)):
            bound = meta.get(key)
            if bound is not None and broken(value, bound):
                raise ConfigError(f"{flag(f.name)} must be {sign} {bound:g}{meta['why']}, got {value:g}")


def method_preset(method: str) -> str | None:
    """The preset a method's runs start from without --preset (``simclr-cifar10`` ...); None for EMP-SSL, whose
    recipe is the defaults. Read from the source for the package's methods."""
    source = registry.declared(method)
    return source.preset if source else registry.method_class(method).preset


def method_recipe(method: str) -> dict[str, Any]:
    """The overrides of ``method``'s own recipe (:func:`method_preset`)."""
    preset = method_preset(method)
    return load_preset(preset) if preset else {}


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("empssl").joinpath("presets").iterdir()
                  if p.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    """The overrides a preset file (src/empssl/presets/NAME.json) makes to the defaults."""
    if name not in preset_names():  # also keeps a name like ../x from reading outside the presets
        raise ConfigError(f"unknown --preset {name!r}; choose from {', '.join(preset_names())}")
    overrides = settings_json((resources.files("empssl") / "presets" / f"{name}.json").read_text(), f"preset {name}")
    overrides.pop("_doc", None)
    Config.from_dict(overrides)  # reject unknown keys early
    return overrides


def settings_json(text: str, what: str) -> dict[str, Any]:
    """The JSON object of settings in ``text`` (a preset, a --config file); ConfigError naming ``what`` otherwise."""
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"{what} must hold a JSON object of settings")
    return settings
