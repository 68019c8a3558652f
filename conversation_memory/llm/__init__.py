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

Modules: :mod:`.clients` (SDK clients from the environment), :mod:`.sync` and
:mod:`.aio` (the calls, blocking and asyncio, over what :mod:`._shared` holds
for both), :mod:`.params`, :mod:`.retry`, :mod:`.mapping` (errors) and
:mod:`.assembly` (replies and streams into a :class:`Completion`).
"""

from typing import TYPE_CHECKING

from conversation_memory._lazy import loader
from conversation_memory.llm.clients import (
    async_client_from_env,
    client_from_env,
    server_configured,
)
from conversation_memory.llm.params import check_params, check_tools
from conversation_memory.llm.retry import RetryPolicy, parse_retry_after

if TYPE_CHECKING:
    from conversation_memory.llm.aio import AsyncLLM, AsyncReplyStream
    from conversation_memory.llm.assembly import Completion, Usage, completion_from
    from conversation_memory.llm.mapping import context_limits, map_error
    from conversation_memory.llm.sync import LLM, ReplyStream

# Modules that import the openai SDK: loaded on first use (see conversation_memory._lazy).
__getattr__ = loader(
    globals(),
    {
        "Completion": "conversation_memory.llm.assembly",
        "Usage": "conversation_memory.llm.assembly",
        "completion_from": "conversation_memory.llm.assembly",
        "LLM": "conversation_memory.llm.sync",
        "ReplyStream": "conversation_memory.llm.sync",
        "AsyncLLM": "conversation_memory.llm.aio",
        "AsyncReplyStream": "conversation_memory.llm.aio",
        "context_limits": "conversation_memory.llm.mapping",
        "map_error": "conversation_memory.llm.mapping",
    },
)


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
    "server_configured",
]
