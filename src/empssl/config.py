"""One config dataclass whose defaults are the paper's CIFAR-10 recipe; presets override it, flags override both."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any


class ConfigError(ValueError):
    """A user mistake in the configuration (bad value, unknown preset, ...): reported in one line."""


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
    # --- model ----------------------------------------------------------------------------------
    arch: str = "resnet18-cifar"
    width: int = 64
    hidden_dim: int = 4096
    z_dim: int = 1024
    # --- loss -----------------------------------------------------------------------------------
    eps: float = 0.2
    invariance_weight: float = 200.0
    # --- optimisation (SGD + LARS, cosine per step) ---------------------------------------------
    epochs: float = 1.0
    schedule_epochs: float = 0.0  # 0: the cosine schedule spans `epochs`; else this many epochs
    batch_size: int = 100
    lr: float = 0.3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lars_eta: float = 0.005
    # --- run ------------------------------------------------------------------------------------
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    channels_last: bool = True  # on CUDA only
    log_every: int = 20  # steps between metrics lines
    checkpoint_every: int = 200  # steps between checkpoints (and one at every epoch end)
    # --- evaluation -----------------------------------------------------------------------------
    test_patches: int = 128
    eval_feature: str = "pre"  # pre (4096-d) | backbone (512-d)
    eval_seed: int = 0
    eval_batch_size: int = 0  # patches per forward pass in feature extraction; 0: automatic
    probe_epochs: int = 100
    probe_lr: float = 0.03
    probe_momentum: float = 0.9
    probe_weight_decay: float = 5e-5
    probe_batch_size: int = 100
    probe_val_fraction: float = 0.0  # >0: select the probe epoch on this much of the train set
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
    compile: bool = False  # torch.compile the model for training
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes saved with the run

    def validate(self) -> Config:
        """Raise ConfigError (one line) for values that cannot work; return self."""
        pos_int = ["num_patches", "patch_size", "width", "hidden_dim", "z_dim", "batch_size", "log_every",
                   "checkpoint_every", "test_patches", "probe_epochs", "probe_batch_size", "knn_k",
                   "monitor_patches", "monitor_bank", "monitor_test"]
        for name in pos_int:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ["image_size", "train_subset", "test_subset", "eval_batch_size"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        pos_float = ["eps", "lr", "epochs", "knn_temperature", "probe_lr"]
        for name in pos_float:
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ["invariance_weight", "weight_decay", "lars_eta", "momentum", "probe_weight_decay",
                     "probe_momentum", "schedule_epochs"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.num_patches < 2:
            raise ConfigError("--num-patches must be >= 2 (the invariance term compares patches)")
        if self.batch_size < 2:
            raise ConfigError("--batch-size must be >= 2 (BatchNorm and the coding rate need a batch)")
        if 0 < self.schedule_epochs < self.epochs:
            raise ConfigError(f"--schedule-epochs ({self.schedule_epochs}) must be >= --epochs ({self.epochs})")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"--crop-scale must satisfy 0 < min <= max <= 1, got {lo} {hi}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ConfigError(f"--crop-ratio must satisfy 0 < min <= max, got {lo} {hi}")
        if self.eval_feature not in ("pre", "backbone"):
            raise ConfigError(f"--eval-feature must be 'pre' or 'backbone', got {self.eval_feature!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"--precision must be auto, bf16 or fp32, got {self.precision!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not 0 <= self.probe_val_fraction < 1:
            raise ConfigError(f"--probe-val-fraction must be in [0, 1), got {self.probe_val_fraction}")
        # --- monitoring ---
        if self.eval_every < 0 or (self.eval_every >= 1 and self.eval_every != int(self.eval_every)):
            raise ConfigError(f"--eval-every must be 0 (off), a whole number of steps, or a fraction of an epoch "
                              f"below 1, got {self.eval_every}")
        # --- scale-out / speed ---
        if self.grad_checkpointing not in ("auto", "on", "off"):
            raise ConfigError(f"--grad-checkpointing must be auto, on or off, got {self.grad_checkpointing!r}")
        from .models import ARCHS

        if self.arch not in ARCHS:
            raise ConfigError(f"unknown --arch {self.arch!r}; choose from {', '.join(sorted(ARCHS))}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        d = dict(d)
        for key in ("crop_scale", "crop_ratio"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


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
