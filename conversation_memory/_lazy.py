"""Module attributes imported on first use (PEP 562).

The ``openai`` SDK takes about a second to import. Names whose modules need
it are resolved when first asked for, so storing and budgeting (and
``convmem sessions``) never pay for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def loader(package: dict[str, Any], modules: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` (its ``globals()``): ``modules`` maps each
    lazy name to the module that defines it; the value is cached in the package."""

    def __getattr__(name: str) -> Any:
        module = modules.get(name)
        if module is None:
            raise AttributeError(f"module {package['__name__']!r} has no attribute {name!r}")
        value = package[name] = getattr(importlib.import_module(module), name)
        return value

    return __getattr__
