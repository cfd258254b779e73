"""The method registry: which class is ``--method NAME``, found without importing torch.

It sits below the config and the methods (which both use it) and imports no method module until one is asked for:
they import torch (seconds), which validating a config, listing the names or ``--help`` must not. The package's
methods are found in their modules' source (``@register("...")`` classes, settings class statements); a method
defined elsewhere (a test, a user's script) is listed once its module has registered it.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
from collections.abc import Callable
from importlib import resources
from typing import Any, TypeVar

from .errors import ConfigError

M = TypeVar("M", bound=type[Any])

_PACKAGE = __name__.rpartition(".")[0]  # empssl
_REGISTERED: dict[str, type[Any]] = {}
_ORDER: dict[str, int] = {}
LAST = 1000  # the place of a method that gives no order: after the package's own, by name


def register(name: str, order: int = LAST) -> Callable[[M], M]:
    """Class decorator: ``@register("vicreg", order=2)`` makes the class ``--method vicreg``; ``order`` places it in
    :func:`method_names`. The package's methods are found by this line in their source, without importing them."""

    def add(cls: M) -> M:
        known = _REGISTERED.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"method {name!r} is registered twice: {known.__qualname__} and {cls.__qualname__}")
        cls.name = name
        _REGISTERED[name], _ORDER[name] = cls, order
        return cls

    return add


@functools.cache
def _package_methods() -> dict[str, tuple[str, int, str]]:
    """{method name: (module, order, settings class statement)} of the package's methods, read from their modules'
    source without importing them: each class that ``@register(...)`` decorates, and the class ``X`` of its
    ``Settings = X`` where X is defined in the same module ("" otherwise)."""
    out = {}
    for entry in resources.files(_PACKAGE).joinpath("methods").iterdir():
        if not entry.name.endswith(".py") or entry.name.startswith("_"):
            continue
        classes = {node.name: node for node in ast.parse(entry.read_text()).body if isinstance(node, ast.ClassDef)}
        for cls in classes.values():
            for d in cls.decorator_list:
                if isinstance(d, ast.Call) and ast.unparse(d.func) == "register" and d.args:
                    order = next((ast.literal_eval(k.value) for k in d.keywords if k.arg == "order"), LAST)
                    settings = [ast.unparse(classes[stmt.value.id]) for stmt in cls.body
                                if isinstance(stmt, ast.Assign) and ast.unparse(stmt.targets[0]) == "Settings"
                                and isinstance(stmt.value, ast.Name) and stmt.value.id in classes]
                    out[ast.literal_eval(d.args[0])] = (entry.name[:-3], order, "".join(settings))
    return out


def method_names() -> tuple[str, ...]:
    """Every method's ``--method`` name, in their declared order (EMP-SSL, SimCLR, VICReg, BYOL, then any other by
    name). Imports no method module."""
    order = {**{n: o for n, (_, o, _) in _package_methods().items()}, **_ORDER}
    return tuple(sorted(order, key=lambda n: (order[n], n)))


def method_class(name: str) -> type[Any]:
    """The class registered as ``name`` (importing the package's module of it on first use); typed as a method by
    :func:`empssl.methods.method_class`."""
    if not isinstance(name, str):
        raise ConfigError(f"--method must be a string, got {name!r}")
    if name not in _REGISTERED and name in _package_methods():
        importlib.import_module(f"{_PACKAGE}.methods.{_package_methods()[name][0]}")
    if name not in _REGISTERED:
        raise ConfigError(f"unknown --method {name!r}; choose from {', '.join(method_names())}")
    return _REGISTERED[name]


def settings_owners(key: str) -> list[str]:
    """The methods that declare a setting called ``key`` (imports every method module)."""
    return [m for m in method_names() if key in {f.name for f in dataclasses.fields(method_class(m).Settings)}]


@functools.cache
def settings_source(name: str) -> str:
    """The class statement of the settings class that the package's method ``name`` declares, read without
    importing it; "" for a method outside the package, one already imported or one without settings of its own."""
    return "" if name in _REGISTERED or name not in _package_methods() else _package_methods()[name][2]
