"""One config dataclass whose defaults are the paper's CIFAR-10 recipe; presets override it, flags override both."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any


class ConfigError(ValueError):
    """A user mistake in the configuration (bad value, unknown preset, ...): reported in one line."""


# The names that configs may use, declared here so that validating a config imports neither torch nor the
# models; empssl.models and empssl.methods register an implementation under each (a test checks both lists).
ARCH_NAMES = ("resnet18-cifar", "resnet18-imagenet", "resnet34-cifar")
METHOD_NAMES = ("emp-ssl", "simclr", "vicreg", "byol")
LOGGER_NAMES = ("tensorboard", "wandb", "mlflow")  # --log (empssl.tracking)


@dataclass
class Config:
    # --- data -----------------------------------------------------------------------------------
    data: str = "cifar10"  # cifar10 | cifar100 | demo | path to an ImageFolder root or archive
    data_dir: str = "./data"  # torchvision datasets and the decoded-image cache live here
    image_size: int = 0  # 0: keep the images' own size (they must all agree); else resize to this
    train_subset: int = 0  # 0: all training images; else the first N (class-balanced)
    test_subset: int = 0  # 0: all test images; else the first N (class-balanced)
    # --- patches (official: RandomResizedCrop(32, scale=(0.25, 0.25), ratio=(1, 1)) + colour augs) -
    num_patches: int = 20
    patch_size: int = 32
    crop_scale: tuple[float, float] = (0.25, 0.25)
    crop_ratio: tuple[float, float] = (1.0, 1.0)
    # --- method -----------------------------------------------------------------------------------
    method: str = "emp-ssl"  # emp-ssl | simclr | vicreg | byol (see empssl.methods)
    # --- model ----------------------------------------------------------------------------------
    arch: str = "resnet18-cifar"
    width: int = 64
    hidden_dim: int = 4096  # EMP-SSL: pre-feature and projector width; baselines: projector hidden width
    z_dim: int = 1024  # projector output
    pred_hidden_dim: int = 4096  # BYOL: predictor hidden width
    # --- loss -----------------------------------------------------------------------------------
    eps: float = 0.2  # EMP-SSL: coding-rate epsilon
    invariance_weight: float = 200.0  # EMP-SSL: lambda
    temperature: float = 0.2  # SimCLR: NT-Xent temperature
    sim_weight: float = 25.0  # VICReg: invariance coefficient
    var_weight: float = 25.0  # VICReg: variance coefficient
    cov_weight: float = 1.0  # VICReg: covariance coefficient
    tau_base: float = 0.99  # BYOL: target momentum at the start (cosine to tau_final)
    tau_final: float = 1.0
    # --- optimisation (SGD + LARS, cosine per step) ---------------------------------------------
    epochs: float = 1.0
    schedule_epochs: float = 0.0  # 0: the cosine schedule spans `epochs`; else this many epochs
    batch_size: int = 100
    lr: float = 0.3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lars_eta: float = 0.005
    nesterov: bool = True
    warmup_epochs: float = 0.0  # linear warm-up from warmup_start_lr before the cosine decay
    warmup_start_lr: float = 0.0
    min_lr: float = 0.0  # the cosine decays to this
    # --- run ------------------------------------------------------------------------------------
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    channels_last: bool = True  # on CUDA only
    log_every: int = 20  # steps between metrics lines
    checkpoint_every: int = 200  # steps between checkpoints (and one at every epoch end)
    log: str = "none"  # also stream the run to: none | comma-separated tensorboard, wandb, mlflow
    # --- evaluation -----------------------------------------------------------------------------
    test_patches: int = 128
    eval_view: str = "auto"  # auto (the method's own) | patches (bag of features) | full (the whole image)
    eval_feature: str = "auto"  # auto (the method's own) | pre (EMP-SSL's 4096-d) | backbone (512-d)
    eval_seed: int = 0
    eval_batch_size: int = 0  # patches per forward pass in feature extraction; 0: automatic
    probe_epochs: int = 100
    probe_lr: float = 0.03
    probe_lrs: tuple[float, ...] = ()  # a sweep: one head per lr, chosen on a validation split; (): probe_lr alone
    probe_momentum: float = 0.9
    probe_weight_decay: float = 5e-5
    probe_batch_size: int = 100
    probe_val_fraction: float | None = None  # >0: select on this much of the train set; None: 0.1 if sweeping, else 0
    knn_k: int = 20
    knn_temperature: float = 0.07
    compare_random_init: bool = False  # also evaluate the untrained encoder (same init) with the same protocol
    # --- monitoring -------------------------------------------------------------------------------
    eval_every: float = 0.0  # kNN probe during training: N >= 1 steps, or a fraction (< 1) of an epoch; 0: off
    monitor_patches: int = 4  # test patches per image in that probe
    monitor_bank: int = 5000  # training images (class-balanced) in its kNN memory bank
    monitor_test: int = 2000  # test images (class-balanced) it classifies
    # --- scale-out / speed ------------------------------------------------------------------------
    tcr_global: bool = True  # under torchrun: coding rate over the all-gathered global batch (else per rank)
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over all ranks' patches
    grad_checkpointing: str = "auto"  # auto (on CUDA when the step would not fit) | on | off
    compile: str = "auto"  # auto (on CUDA when the run is long enough to win back the compile time) | on | off
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes saved with the run

    def validate(self) -> Config:
        """Raise ConfigError (one line) for values that cannot work; return self."""
        for name, (lowest, why) in _AT_LEAST.items():  # one rule and one message per field
            value = getattr(self, name)
            if value < lowest:
                raise ConfigError(f"{flag(name)} must be >= {lowest:g}{why}, got {value:g}")
        for name in _POSITIVE:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{flag(name)} must be > 0, got {getattr(self, name)}")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{flag(name)} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if 0 < self.schedule_epochs < self.epochs:
            raise ConfigError(f"--schedule-epochs ({self.schedule_epochs}) must be >= --epochs ({self.epochs})")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"--crop-scale must satisfy 0 < min <= max <= 1, got {lo} {hi}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ConfigError(f"--crop-ratio must satisfy 0 < min <= max, got {lo} {hi}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.probe_val_fraction is not None and not 0 <= self.probe_val_fraction < 1:
            raise ConfigError(f"--probe-val-fraction must be in [0, 1), got {self.probe_val_fraction}")
        if any(not lr > 0 for lr in self.probe_lrs):
            raise ConfigError(f"--probe-lrs must all be > 0, got {','.join(f'{lr:g}' for lr in self.probe_lrs)}")
        if self.probe_lrs and self.probe_val_fraction == 0:
            raise ConfigError("--probe-lrs chooses a learning rate on a validation split: "
                              "--probe-val-fraction must be > 0")
        if not 0 <= self.tau_base <= self.tau_final <= 1:
            raise ConfigError(f"--tau-base and --tau-final must satisfy 0 <= base <= final <= 1, got "
                              f"{self.tau_base} {self.tau_final}")
        if self.warmup_epochs and self.warmup_epochs >= (self.schedule_epochs or self.epochs):
            raise ConfigError(f"--warmup-epochs ({self.warmup_epochs:g}) must be shorter than the schedule "
                              f"({self.schedule_epochs or self.epochs:g} epochs)")
        if any(n.strip() not in ("none", *LOGGER_NAMES) for n in self.log.split(",")):  # --log
            raise ConfigError(f"--log must be none or comma-separated names from {', '.join(LOGGER_NAMES)}, "
                              f"got {self.log!r}")
        if self.eval_every < 0 or (self.eval_every >= 1 and self.eval_every != int(self.eval_every)):
            raise ConfigError(f"--eval-every must be 0 (off), a whole number of steps, or a fraction of an epoch "
                              f"below 1, got {self.eval_every}")
        return self

    def probe_val(self) -> float:
        """The validation fraction the probe uses: as given, else 0.1 when sweeping --probe-lrs and 0 otherwise."""
        if self.probe_val_fraction is not None:
            return self.probe_val_fraction
        return 0.1 if self.probe_lrs else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        d = dict(d)
        for key in ("crop_scale", "crop_ratio", "probe_lrs"):
            if key in d:
                d[key] = tuple(d[key])
        if isinstance(d.get("compile"), bool):  # runs saved by empssl 0.1 stored a bool
            d["compile"] = "on" if d["compile"] else "off"
        return cls(**d)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def flag(name: str) -> str:
    """The command-line flag of a Config field: ``num_patches`` -> ``--num-patches``."""
    return "--" + name.replace("_", "-")


# Validation rules, one per field. (lowest allowed value, why) for counts and sizes:
_AT_LEAST: dict[str, tuple[float, str]] = {
    **{name: (1, "") for name in ("patch_size", "width", "hidden_dim", "z_dim", "pred_hidden_dim", "log_every",
                                  "checkpoint_every", "test_patches", "probe_epochs", "probe_batch_size", "knn_k",
                                  "monitor_patches", "monitor_bank", "monitor_test")},
    "num_patches": (2, " (the invariance term compares patches)"),
    "batch_size": (2, " (BatchNorm and the losses need a batch)"),
    **{name: (0, "") for name in ("image_size", "train_subset", "test_subset", "eval_batch_size",
                                  "invariance_weight", "weight_decay", "lars_eta", "momentum", "probe_weight_decay",
                                  "probe_momentum", "schedule_epochs", "warmup_epochs", "warmup_start_lr", "min_lr",
                                  "sim_weight", "var_weight", "cov_weight")},
}
_POSITIVE = ("eps", "lr", "epochs", "knn_temperature", "probe_lr", "temperature")
CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHOD_NAMES,
    "arch": ARCH_NAMES,
    "eval_view": ("auto", "patches", "full"),
    "eval_feature": ("auto", "pre", "backbone"),
    "precision": ("auto", "bf16", "fp32"),
    "grad_checkpointing": ("auto", "on", "off"),
    "compile": ("auto", "on", "off"),
}


def method_preset(method: str) -> str | None:
    """The preset a method's runs start from when no --preset is given: a baseline's standard CIFAR recipe
    (``simclr-cifar10`` ...); None for EMP-SSL, whose recipe is the defaults."""
    return None if method == "emp-ssl" else f"{method}-cifar10"


def method_recipe(method: str) -> dict[str, Any]:
    """The overrides of ``method``'s own recipe: its preset (:func:`method_preset`), none for EMP-SSL."""
    preset = method_preset(method)
    return load_preset(preset) if preset else {}


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("empssl").joinpath("presets").iterdir()
                  if p.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    """The overrides a preset file (src/empssl/presets/NAME.json) makes to the defaults."""
    path = resources.files("empssl").joinpath("presets", f"{name}.json")
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(preset_names())}")
    overrides = json.loads(path.read_text())
    overrides.pop("_doc", None)
    Config.from_dict(overrides)  # reject unknown keys early
    return overrides
