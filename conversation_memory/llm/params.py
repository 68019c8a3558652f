"""Checking sampling parameters before any request leaves.

A bad ``temperature`` should fail here, naming the parameter, rather than as a
400 from the server after a round trip (or, worse, be silently clamped by a
lenient local server).

Which parameters pass, and how:

- The ones the OpenAI SDK's ``chat.completions.create`` knows are checked
  where the API documents a range, then passed as keyword arguments.
- ``model``, ``messages``, ``stream``, ``stream_options`` and ``timeout`` are
  refused: the caller gives the first two as arguments, and we own streaming
  and the deadline (:class:`~conversation_memory.llm.RetryPolicy`).
- Any other name is sent in the request body through the SDK's
  ``extra_body``, because OpenAI-compatible servers take their own sampling
  knobs (llama.cpp's ``top_k``, ``min_p``, ``repeat_penalty``, ``grammar``)
  and the SDK would otherwise refuse them. A name that looks like a typo of a
  known one (``temprature``, ``max_token``) is refused instead, so a misspelling can't
  vanish into the body and be ignored.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Mapping
from typing import Any

from conversation_memory.errors import ConfigurationError
from conversation_memory.registry import default_registry

__all__ = ["check_params", "check_tools"]

# Ours to decide, or given as arguments: never accepted among the parameters.
_RESERVED = {
    "model": "pass it as model=...",
    "messages": "pass it as messages=...",
    "stream": "call stream() for a streamed reply and complete() for a whole one",
    "stream_options": "usage is always requested on streams; nothing to set",
    "timeout": "set the total deadline with RetryPolicy(deadline=...)",
}

# Passed to the SDK's create() as they are (besides what is checked below).
_SDK_EXTRAS = frozenset({"extra_headers", "extra_query", "extra_body"})


@functools.cache
def _known() -> frozenset[str]:
    """Every parameter the SDK's ``create()`` accepts (read on first use: importing
    the SDK's types takes about a second)."""
    return _sdk_names() | _CHECKED


def _sdk_names() -> frozenset[str]:
    try:
        from openai.types.chat.completion_create_params import CompletionCreateParamsBase
    except ImportError:  # pragma: no cover - an SDK that moved its types
        return frozenset()
    keys = (
        CompletionCreateParamsBase.__required_keys__ | CompletionCreateParamsBase.__optional_keys__
    )
    return frozenset(keys) - set(_RESERVED)


_CHECKED = frozenset(
    {
        "temperature",
        "top_p",
        "frequency_penalty",
        "presence_penalty",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "seed",
        "stop",
        "tools",
        "tool_choice",
    }
)


def _fail(name: str, problem: str, value: Any) -> ConfigurationError:
    return ConfigurationError(f"{name} {problem}, got {value!r}.", argument=name)


def _number(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(name, "must be a number", value)
    if value < low or value > high or (low_open and value == low):
        lower = f"greater than {low:g}" if low_open else f"at least {low:g}"
        raise _fail(name, f"must be {lower} and at most {high:g}", value)
    return value


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, "must be an integer", value)
    return value


def _max_tokens(name: str, value: Any, model: str) -> int:
    value = _integer(name, value)
    if value < 1:
        raise _fail(name, "must be at least 1", value)
    info = default_registry.find(model)
    if info is not None and value > info.max_output:
        raise ConfigurationError(
            f"{name}={value} is more than model {model!r} can write in one reply "
            f"(max_output {info.max_output}); lower it, or register the model with its "
            "real limit.",
            argument=name,
            model=model,
            limit=info.max_output,
        )
    return value


def _stop(value: Any) -> str | list[str]:
    if isinstance(value, str):
        return value
    if (
        not isinstance(value, list | tuple)
        or not 1 <= len(value) <= 4
        or not all(isinstance(item, str) and item for item in value)
    ):
        raise _fail("stop", "must be a string or a list of 1 to 4 non-empty strings", value)
    return list(value)


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """Tools as the API wants them: a list of ``{"type": "function", "function": {...}}``."""
    if not isinstance(tools, list | tuple):
        raise _fail("tools", "must be a list of tool definitions", tools)
    names: set[str] = set()
    out = []
    for n, tool in enumerate(tools):
        where = f"tools[{n}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise ConfigurationError(
                f'{where} must be {{"type": "function", "function": {{"name": ...}}}}, '
                f"got {tool!r}.",
                argument="tools",
            )
        function = tool.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not name:
            raise ConfigurationError(
                f"{where}.function.name must be a non-empty string, got {function!r}.",
                argument="tools",
            )
        if name in names:
            raise ConfigurationError(
                f"{where} repeats the function name {name!r}; names must be unique.",
                argument="tools",
            )
        names.add(name)
        out.append(dict(tool))
    return out


def check_params(params: Mapping[str, Any], *, model: str) -> dict[str, Any]:
    """Check sampling parameters for ``model``; return the SDK's keyword arguments.

    Unknown names are moved into ``extra_body`` (see the module docstring).
    Raises :class:`ConfigurationError` naming the parameter.
    """
    out: dict[str, Any] = {}
    extra_body: dict[str, Any] = {}
    if "max_tokens" in params and "max_completion_tokens" in params:
        raise ConfigurationError(
            "max_tokens and max_completion_tokens are the same limit; give only one.",
            argument="max_completion_tokens",
        )
    for name, value in params.items():
        if name in _RESERVED:
            raise ConfigurationError(
                f"{name} cannot be given as a parameter: {_RESERVED[name]}.", argument=name
            )
        if value is None:
            # The SDK treats None as "send null"; callers mean "not set".
            continue
        if name == "temperature":
            out[name] = _number(name, value, 0, 2)
        elif name == "top_p":
            out[name] = _number(name, value, 0, 1, low_open=True)
        elif name in ("frequency_penalty", "presence_penalty"):
            out[name] = _number(name, value, -2, 2)
        elif name in ("max_tokens", "max_completion_tokens"):
            out[name] = _max_tokens(name, value, model)
        elif name == "n":
            if _integer(name, value) != 1:
                raise _fail(
                    name, "must be 1: one reply is stored per turn (omit n, or pass 1)", value
                )
            out[name] = value
        elif name == "seed":
            out[name] = _integer(name, value)
        elif name == "stop":
            out[name] = _stop(value)
        elif name == "tools":
            out[name] = check_tools(value)
        elif name == "extra_body":
            if not isinstance(value, Mapping):
                raise _fail(name, "must be a dict", value)
            extra_body.update(value)
        elif name in _known() or name in _SDK_EXTRAS:
            out[name] = value
        else:
            close = difflib.get_close_matches(name, sorted(_known()), n=1, cutoff=0.85)
            if close:
                raise ConfigurationError(
                    f"unknown parameter {name!r}; did you mean {close[0]!r}? "
                    "(Unknown names are sent to the server in the request body, so a typo "
                    "would be silently ignored.)",
                    argument=name,
                )
            extra_body[name] = value
    if extra_body:
        out["extra_body"] = extra_body
    return out
