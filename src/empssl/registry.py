"""The method registry: which class is ``--method NAME``, found without importing torch.

It sits below the config and the methods (which both use it) and imports no method module until one is asked for:
they import torch (seconds), which validating a config, listing the names or ``--help`` must not. The package's
methods are found in their modules' source (``@register("...")`` classes, their settings and presets); a method
defined elsewhere (a test, a user's script) is listed once its module has registered it.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
from collections.abc import Callable
from importlib import resources
from typing import Any, NamedTuple, TypeVar

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


class Declared(NamedTuple):
    """What a package method's source declares, read without importing it."""

    module: str
    order: int
    settings: str  # the class statement of X in its ``Settings = X``, X defined in the same module; "" otherwise
    setting_names: tuple[str, ...]  # the fields that statement declares
    preset: str | None  # its ``preset = "..."``


@functools.cache
def _package_methods() -> dict[str, Declared]:
    """{method name: what it declares} of each class that ``@register(...)`` decorates in the package's methods."""
    out = {}
    for entry in resources.files(_PACKAGE).joinpath("methods").iterdir():
        if not entry.name.endswith(".py") or entry.name.startswith("_"):
            continue
        classes = {node.name: node for node in ast.parse(entry.read_text()).body if isinstance(node, ast.ClassDef)}
        for cls in classes.values():
            for d in cls.decorator_list:
                if isinstance(d, ast.Call) and ast.unparse(d.func) == "register" and d.args:
                    order = next((ast.literal_eval(k.value) for k in d.keywords if k.arg == "order"), LAST)
                    body = {ast.unparse(s.targets[0]): s.value for s in cls.body if isinstance(s, ast.Assign)}
                    settings = classes.get(ast.unparse(body["Settings"])) if "Settings" in body else None
                    names = tuple(ast.unparse(s.target) for s in getattr(settings, "body", ())
                                  if isinstance(s, ast.AnnAssign))
                    preset = ast.literal_eval(body["preset"]) if "preset" in body else None
                    source = ast.unparse(settings) if settings else ""
                    out[ast.literal_eval(d.args[0])] = Declared(entry.name[:-3], order, source, names, preset)
    return out


def method_names() -> tuple[str, ...]:
    """Every method's ``--method`` name, in their declared order (EMP-SSL, SimCLR, VICReg, BYOL, then any other by
    name). Imports no method module."""
    order = {**{n: d.order for n, d in _package_methods().items()}, **_ORDER}
    return tuple(sorted(order, key=lambda n: (order[n], n)))


def declared(name: str) -> Declared | None:
    """What the package's method ``name`` declares, read from its source (None for any other method)."""
    if not isinstance(name, str):
        raise ConfigError(f"--method must be a string, got {name!r}")
    return _package_methods().get(name)


def method_class(name: str) -> type[Any]:
    """The class registered as ``name`` (importing the package's module of it on first use); typed as a method by
    :func:`empssl.methods.method_class`."""
    source = declared(name)
    if name not in _REGISTERED and source:
        importlib.import_module(f"{_PACKAGE}.methods.{source.module}")
    if name not in _REGISTERED:
        raise ConfigError(f"unknown --method {name!r}; choose from {', '.join(method_names())}")
    return _REGISTERED[name]


def settings_owners(key: str) -> list[str]:
    """The methods that declare a setting called ``key`` (the package's read from their source)."""
    owners = []
    for m in method_names():
        source = declared(m)
        if key in (source.setting_names if source else {f.name for f in dataclasses.fields(method_class(m).Settings)}):
            owners.append(m)
    return owners
