"""Strategies named on a command line: the built-ins, or the user's own from Python code."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from conversation_memory import Strategy, as_strategy
from conversation_memory.errors import ConfigurationError

__all__ = ["BUILTIN", "load_strategy"]

BUILTIN = ("truncate", "window", "summary", "hierarchical", "recall")


def load_strategy(spec: Any) -> Strategy:
    """A strategy from a built-in's name, ``module.path:Name`` or ``path/to/file.py:Name``.

    ``Name`` may be a strategy object, a function ``(state, budget) ->
    Selection``, or a class (instantiated with no arguments). Objects and
    functions are accepted as they are.
    """
    if not isinstance(spec, str):
        return as_strategy(spec)
    text = spec.strip()
    if text.split("+", 1)[0].split(":", 1)[0].strip().lower() in BUILTIN:
        return as_strategy(text)  # summary:high=0.8 and summary+recall alike
    where, colon, name = text.rpartition(":")
    if not colon or not where or not all(part.isidentifier() for part in name.split(".")):
        raise ConfigurationError(
            f"unknown strategy {spec!r}: give a built-in ({', '.join(BUILTIN)}, with "
            "parameters such as 'summary:high=0.9,low=0.6', or NAME+recall such as "
            "'summary+recall'), 'package.module:Name' or "
            "'path/to/file.py:Name'",
            argument="strategy",
        )
    module = _from_file(where) if _is_path(where) else _from_module(where)
    value: Any = module
    for part in name.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ConfigurationError(
                f"strategy {spec!r}: {where} has no {name!r}", argument="strategy"
            ) from None
    if isinstance(value, type):
        try:
            value = value()
        except TypeError as exc:
            raise ConfigurationError(
                f"strategy {spec!r}: the class {name} could not be built without arguments "
                f"({exc}); name an instance instead",
                argument="strategy",
            ) from None
    return as_strategy(value)


def _is_path(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def _from_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ConfigurationError(
            f"cannot import {name!r} for a strategy ({exc}); is it on PYTHONPATH?",
            argument="strategy",
        ) from None


def _from_file(where: str) -> Any:
    path = Path(where).expanduser().resolve()
    if not path.is_file():
        raise ConfigurationError(f"strategy file {where!r} does not exist", argument="strategy")
    digest = hashlib.sha1(str(path).encode(), usedforsecurity=False).hexdigest()[:12]
    module_name = f"_convmem_lab_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigurationError(f"cannot load {where!r} as Python", argument="strategy")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while being built
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ConfigurationError(
            f"strategy file {where!r} failed to load: {type(exc).__name__}: {exc}",
            argument="strategy",
        ) from exc
    return module
