"""empssl: EMP-SSL (Extreme-Multi-Patch Self-Supervised Learning) pretraining and evaluation, with SimCLR, VICReg
and BYOL in the same harness.

The public API, importable from the package itself (``import empssl; empssl.train(cfg, "runs/x")``)::

    Config, load_preset                 the recipe (defaults = the paper's CIFAR-10 settings) and its presets
    load_data, load_images              (train, test) uint8 image tensors; every image of a folder
    Augment, make_patches, MultiPatch   views: the augmentation, EMP-SSL's patches, the same as a transform
    EMPSSLModel, create_method          EMP-SSL's model; any method's model, views and loss (--method)
    emp_ssl_loss, total_coding_rate     the loss and its coding-rate term; EMPSSLLoss: the loss as a module
    LARS, lr_at                         the optimiser and the learning-rate schedule
    train                               the whole pipeline into a run directory
    load_checkpoint                     the model a run trained, with its config
    evaluate, image_features, extract_features, knn_predict, linear_probe    evaluation
    embed, load_embedding, export_backbone                                   using the trained encoder

Nothing is imported until a name is first used, so ``import empssl`` (and the CLI's start) stays cheap. Three
names are both a function and the module defining it (``train``, ``evaluate``, ``embed``): ``empssl.train`` is
always the function; reach the module with ``importlib.import_module("empssl.train")``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from .version import __version__ as __version__

# name -> the module that defines it
_API = {
    "Config": "config", "load_preset": "config",
    "load_data": "data", "load_images": "data",
    "Augment": "patches", "make_patches": "patches", "MultiPatch": "patches",
    "EMPSSLModel": "models", "create_method": "methods",
    "emp_ssl_loss": "losses", "total_coding_rate": "losses", "EMPSSLLoss": "losses",
    "LARS": "optim", "lr_at": "optim",
    "train": "train", "load_checkpoint": "rundir",
    "evaluate": "evaluate", "image_features": "evaluate", "extract_features": "evaluate", "knn_predict": "evaluate",
    "linear_probe": "probe",
    "embed": "embed", "load_embedding": "embed", "export_backbone": "export",
}

__all__ = [  # the names of _API (a test checks that the two agree)
    "LARS", "Augment", "Config", "EMPSSLLoss", "EMPSSLModel", "MultiPatch", "__version__", "create_method", "embed",
    "emp_ssl_loss", "evaluate", "export_backbone", "extract_features", "image_features", "knn_predict",
    "linear_probe", "load_checkpoint", "load_data", "load_embedding", "load_images", "load_preset", "lr_at",
    "make_patches", "total_coding_rate", "train",
]

if TYPE_CHECKING:
    from .config import Config, load_preset
    from .data import load_data, load_images
    from .embed import embed, load_embedding
    from .evaluate import evaluate, extract_features, image_features, knn_predict
    from .export import export_backbone
    from .losses import EMPSSLLoss, emp_ssl_loss, total_coding_rate
    from .methods import create_method
    from .models import EMPSSLModel
    from .optim import LARS, lr_at
    from .patches import Augment, MultiPatch, make_patches
    from .probe import linear_probe
    from .rundir import load_checkpoint
    from .train import train


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'empssl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


class _Package(types.ModuleType):
    """Importing a submodule sets it as an attribute of its package; for the API names that are also module names
    (train, evaluate, embed), keep the function instead, whatever the import order."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
