"""The OpenAI-compatible client layer: parameters, streaming, retries, errors.

::

    from conversation_memory.llm import LLM, client_from_env

    llm = LLM(client_from_env())
    reply = llm.complete(model="gpt-4o-mini", messages=[...], temperature=0.2)
    with llm.stream(model="gpt-4o-mini", messages=[...]) as stream:
        for piece in stream:
            print(piece, end="")
    stream.completion  # text, message to store, usage, finish_reason, complete

Parameters are checked before any request (:func:`check_params`). tenacity
is the only retry layer (the SDK's ``max_retries`` is forced to 0), with
exponential backoff, jitter, ``Retry-After`` and a total deadline per call
(:class:`RetryPolicy`). Every failure surfaces as a
:class:`~conversation_memory.errors.ModelError` subclass carrying ``status``,
``request_id``, ``attempts`` and ``model``.
"""

from typing import TYPE_CHECKING, Any

from conversation_memory.llm.params import check_params, check_tools
from conversation_memory.llm.retry import RetryPolicy, parse_retry_after

if TYPE_CHECKING:
    from conversation_memory.llm.assembly import Completion, Usage, completion_from
    from conversation_memory.llm.calls import (
        LLM,
        AsyncLLM,
        AsyncReplyStream,
        ReplyStream,
        async_client_from_env,
        client_from_env,
    )
    from conversation_memory.llm.mapping import context_limits, map_error

_LAZY = {
    "Completion": "assembly",
    "Usage": "assembly",
    "completion_from": "assembly",
    "LLM": "calls",
    "AsyncLLM": "calls",
    "AsyncReplyStream": "calls",
    "ReplyStream": "calls",
    "async_client_from_env": "calls",
    "client_from_env": "calls",
    "context_limits": "mapping",
    "map_error": "mapping",
}
"""Names from modules that import the ``openai`` SDK, loaded on first use (it takes
about a second), so storing and budgeting never pay for it."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'conversation_memory.llm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"conversation_memory.llm.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "LLM",
    "AsyncLLM",
    "AsyncReplyStream",
    "Completion",
    "ReplyStream",
    "RetryPolicy",
    "Usage",
    "async_client_from_env",
    "check_params",
    "check_tools",
    "client_from_env",
    "completion_from",
    "context_limits",
    "map_error",
    "parse_retry_after",
]
