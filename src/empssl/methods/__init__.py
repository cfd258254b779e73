"""Self-supervised methods as plug-ins: one module per method, registered by its ``--method`` name.

    from empssl.methods import create_method
    method = create_method(cfg)            # cfg.method: emp-ssl | simclr | vicreg | byol
    model = method.build_model()

See :class:`empssl.methods.base.Method` for what a method states and what the training loop asks of it.
"""

from __future__ import annotations

from ..config import Config, ConfigError
from .base import Method
from .byol import BYOL
from .emp_ssl import EMPSSL
from .simclr import SimCLR
from .vicreg import VICReg

METHODS: dict[str, type[Method]] = {m.name: m for m in (EMPSSL, SimCLR, VICReg, BYOL)}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"unknown --method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def create_method(cfg: Config) -> Method:
    """The method ``cfg.method`` configured by ``cfg``."""
    return method_class(cfg.method)(cfg)


def eval_protocol(cfg: Config) -> tuple[str, str]:
    """(view, feature) of the evaluation: ``cfg.eval_view`` / ``cfg.eval_feature``, or the method's own for auto."""
    cls = method_class(cfg.method)
    view = cls.eval_view if cfg.eval_view == "auto" else cfg.eval_view
    feature = cls.eval_feature if cfg.eval_feature == "auto" else cfg.eval_feature
    return view, feature


__all__ = ["METHODS", "Method", "create_method", "eval_protocol", "method_class"]
