"""Submodules as attributes, imported on first use: ``pdlab.measure.trace.breakdown(r)``
works without ``import pdlab.measure.trace`` first, and ``import pdlab`` stays cheap."""

import importlib
from collections.abc import Callable
from types import ModuleType


def submodules(package: str) -> Callable[[str], ModuleType]:
    """A module ``__getattr__`` for ``package`` that imports ``package.NAME`` on first use."""

    def __getattr__(name: str) -> ModuleType:
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as missing:
            if missing.name != f"{package}.{name}":
                raise  # the submodule exists but imports something missing
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return __getattr__
