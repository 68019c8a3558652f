"""The test server's tokenizer: deliberately not tiktoken.

:class:`~conversation_memory.testing.ChatServer` counts with these rules, so
that calibration against a server's reported ``usage`` is exercised (our own
counter never agrees with it exactly)::

    text tokens   = ceil(utf-8 bytes / 3)
    message       = 4 + text(content) + text(name) + text(tool_call_id)
                      + text(compact JSON of tool_calls)
    prompt        = 2 (priming) + sum(messages) + text(compact JSON of tools)
    completion    = text(reply content) + text(compact JSON of reply tool_calls)

Content given as parts counts each text part's text and any other part's
compact JSON. "Compact JSON" is ``json.dumps(..., separators=(",", ":"),
ensure_ascii=False)``. Pure: no sockets, no clock.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "PER_MESSAGE",
    "PRIMING",
    "compact",
    "completion_tokens",
    "count_text",
    "count_tokens",
    "max_tokens_of",
    "truncate_to_tokens",
]

PER_MESSAGE = 4
PRIMING = 2


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def count_text(text: str) -> int:
    """Tokens of one string: ceil(utf-8 bytes / 3)."""
    return -(-len(text.encode("utf-8")) // 3)


def _content_tokens(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return count_text(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                total += count_text(str(part.get("text", "")))
            else:
                total += count_text(compact(part))
        return total
    return count_text(compact(content))


def count_tokens(messages: Sequence[Mapping[str, Any]], *, tools: Any = None) -> int:
    """Prompt tokens of ``messages`` (and ``tools``) by the server's own tokenizer."""
    total = PRIMING
    for message in messages:
        total += PER_MESSAGE
        if not isinstance(message, Mapping):
            total += count_text(compact(message))
            continue
        total += _content_tokens(message.get("content"))
        for key in ("name", "tool_call_id"):
            if isinstance(message.get(key), str):
                total += count_text(message[key])
        if message.get("tool_calls"):
            total += count_text(compact(message["tool_calls"]))
        if message.get("function_call"):
            total += count_text(compact(message["function_call"]))
    if tools:
        total += count_text(compact(tools))
    return total


def completion_tokens(content: str | None, tool_calls: list[dict[str, Any]] | None) -> int:
    """Tokens of a reply, as reported in ``usage.completion_tokens``."""
    total = count_text(content) if content else 0
    if tool_calls:
        total += count_text(compact(tool_calls))
    return total


def truncate_to_tokens(text: str, tokens: int) -> str:
    """The longest prefix of ``text`` that is at most ``tokens`` tokens."""
    data = text.encode("utf-8")[: max(tokens, 0) * 3]
    return data.decode("utf-8", errors="ignore")


def max_tokens_of(body: Mapping[str, Any]) -> int | None:
    """The reply cap a request body asks for (``max_completion_tokens``, else ``max_tokens``)."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
