"""The method registry: which class is ``--method NAME``, found without importing torch.

It imports nothing above :mod:`empssl.errors` (the config asks the registry for the method names and the method
modules import the config, so the registry sits below both) and knows nothing of what a method is: it holds the
classes that ``@register`` names; :mod:`empssl.methods` re-exports it with the types of a method.

It imports no method module until one is asked for: the method modules import torch (seconds), and validating a
config, listing the names or the command line's ``--help`` must not. :func:`method_names` reads the names of the
package's methods from their modules' ``@register("...")`` lines (``src/empssl/methods/*.py``) and
:func:`settings_source` their settings class statements; a method defined elsewhere (a test, a user's script) is
listed once its module has been imported and has registered it.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import re
from collections.abc import Callable
from importlib import resources
from typing import Any, TypeVar

from .errors import ConfigError

M = TypeVar("M", bound=type[Any])

_PACKAGE = __name__.rpartition(".")[0]  # empssl
METHODS_PACKAGE = f"{_PACKAGE}.methods"  # the package whose modules register its methods
_REGISTERED: dict[str, type[Any]] = {}
_ORDER: dict[str, int] = {}
_REGISTER_LINE = re.compile(r'^@register\("([^"]+)"(?:, order=(\d+))?\)', re.MULTILINE)
LAST = 1000  # the place of a method that gives no order: after the package's own, by name


def register(name: str, order: int = LAST) -> Callable[[M], M]:
    """Class decorator: ``@register("vicreg", order=2)`` makes the class the method ``--method vicreg`` (and sets
    its ``name``); ``order`` places it in :func:`method_names` (the default of ``empssl compare --methods``). A
    name taken by another class is an error. In this package, write it on one line as ``@register("name")`` or
    ``@register("name", order=N)``: that line is how the registry finds the method without importing it."""

    def add(cls: M) -> M:
        known = _REGISTERED.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"method {name!r} is registered twice: {known.__qualname__} and {cls.__qualname__}")
        cls.name = name
        _REGISTERED[name], _ORDER[name] = cls, order
        return cls

    return add


def _source(module: str) -> str:
    return (resources.files(_PACKAGE) / "methods" / f"{module}.py").read_text()


@functools.cache
def _package_methods() -> dict[str, tuple[str, int]]:
    """{method name: (module, order)} of the package's methods, read from their modules' source (not imported)."""
    out = {}
    for entry in resources.files(_PACKAGE).joinpath("methods").iterdir():
        if entry.name.endswith(".py") and not entry.name.startswith("_"):
            for name, order in _REGISTER_LINE.findall(_source(entry.name[:-3])):
                out[name] = (entry.name[:-3], int(order or LAST))
    return out


def method_names() -> tuple[str, ...]:
    """Every method's ``--method`` name, in their declared order (EMP-SSL, SimCLR, VICReg, BYOL, then any other by
    name). Imports no method module."""
    order = {**{n: o for n, (_, o) in _package_methods().items()}, **_ORDER}
    return tuple(sorted(order, key=lambda n: (order[n], n)))


def method_class(name: str) -> type[Any]:
    """The class registered as ``name`` (importing the package's module of it on first use); typed as a method by
    :func:`empssl.methods.method_class`."""
    if not isinstance(name, str):
        raise ConfigError(f"--method must be a string, got {name!r}")
    if name not in _REGISTERED and name in _package_methods():
        importlib.import_module(f"{METHODS_PACKAGE}.{_package_methods()[name][0]}")
    if name not in _REGISTERED:
        raise ConfigError(f"unknown --method {name!r}; choose from {', '.join(method_names())}")
    return _REGISTERED[name]


def settings_owners(key: str) -> list[str]:
    """The methods that declare a setting called ``key`` (imports every method module)."""
    return [m for m in method_names() if key in {f.name for f in dataclasses.fields(method_class(m).Settings)}]


@functools.cache
def settings_source(name: str) -> str:
    """The class statement (decorators included) of the settings class that the package's method ``name``
    declares, read from its module without importing it: the class named by ``Settings = X`` in the class that
    ``@register("name")`` decorates, defined in the same module. "" for a method outside the package, one already
    imported (its class is at hand) or one without settings of its own."""
    if name in _REGISTERED or name not in _package_methods():
        return ""
    tree = ast.parse(_source(_package_methods()[name][0]))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    for cls in classes.values():
        if any(isinstance(d, ast.Call) and ast.unparse(d.func) == "register" and d.args
               and ast.literal_eval(d.args[0]) == name for d in cls.decorator_list):
            for stmt in cls.body:
                if (isinstance(stmt, ast.Assign) and ast.unparse(stmt.targets[0]) == "Settings"
                        and isinstance(stmt.value, ast.Name) and stmt.value.id in classes):
                    return ast.unparse(classes[stmt.value.id])
    return ""
