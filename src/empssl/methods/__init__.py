"""Self-supervised methods as plug-ins: ``create_method(cfg)`` (``cfg.method``: one of ``method_names()``).

A method is a :class:`empssl.methods.base.Method` subclass in a module of its own, registered with
``@register("name")``, that declares its settings, preset, views, model, loss and logged terms (README.md,
"Adding a method"). The registry lives in :mod:`empssl.registry`, below the config, which asks it too; it imports
no method module (torch: seconds) until one is asked for, and does not know the :class:`Method` type, which
:func:`method_class` here adds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import registry
from ..config import Config
from ..registry import method_names, register, settings_owners

if TYPE_CHECKING:
    from .base import Method


def method_class(name: str) -> type[Method]:
    """The class registered as ``name`` (importing the package's module of it on first use)."""
    return registry.method_class(name)


def create_method(cfg: Config) -> Method:
    """The method ``cfg.method`` configured by ``cfg``."""
    return method_class(cfg.method)(cfg)


def eval_protocol(cfg: Config) -> tuple[str, str]:
    """(view, feature) of the evaluation: ``cfg.eval_view`` / ``cfg.eval_feature``, or the method's own for auto."""
    cls = method_class(cfg.method)
    return (cls.eval_view if cfg.eval_view == "auto" else cfg.eval_view,
            cls.eval_feature if cfg.eval_feature == "auto" else cfg.eval_feature)


def __getattr__(name: str) -> object:
    # `from empssl.methods import Method` without importing torch for the registry's own use
    if name == "Method":
        from .base import Method

        return Method
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Method", "create_method", "eval_protocol", "method_class", "method_names", "register",
           "settings_owners"]
