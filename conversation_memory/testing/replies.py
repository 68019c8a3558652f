"""What the test server's model answers: default replies, summaries, scripted replies.

**Replies.** ``Reply #<n> to: <the last user message>``, unless
``ChatServer(reply=...)`` says otherwise (:data:`ReplySpec`). A request whose
system message mentions summarizing gets a summary instead: the distinct
capitalized words and numbers of the transcript (:func:`summarize`). A reply
longer than the request's cap is cut (``finish_reason: "length"``) by the
server's own tokenizer (:mod:`~conversation_memory.testing.tokenizer`).

**Azure's content filter.** Azure OpenAI adds ``prompt_filter_results`` to a
reply (the first chunk of a stream, with no choices) and
``content_filter_results`` to each choice, one verdict per category; a reply
its filter stopped ends with ``finish_reason: "content_filter"``.

Pure: no sockets, no clock.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from conversation_memory.testing.tokenizer import count_text, truncate_to_tokens

__all__ = [
    "FILTER_CATEGORIES",
    "Answer",
    "ReplySpec",
    "cap_answer",
    "default_reply",
    "default_summary",
    "filter_results",
    "filtered_answer",
    "is_summarization",
    "normalize_answer",
    "summarize",
    "text_of",
]

ReplySpec = (
    str | Mapping[str, Any] | Callable[[dict[str, Any]], str | Mapping[str, Any] | None] | None
)
"""What ``ChatServer(reply=...)`` accepts: fixed text, a fixed reply dict, or a function
of the request body returning either (or None to fall back to the default)."""

FILTER_CATEGORIES = ("hate", "self_harm", "sexual", "violence")


def filter_results(filtered: str | None = None) -> dict[str, Any]:
    """Azure's per-category verdicts: all safe, or ``filtered`` caught."""
    return {
        category: {"filtered": True, "severity": "high"}
        if category == filtered
        else {"filtered": False, "severity": "safe"}
        for category in FILTER_CATEGORIES
    }


@dataclass(frozen=True, slots=True)
class Answer:
    """The assistant turn the server sends back."""

    content: str | None
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str = "stop"


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or its text parts joined by spaces."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return ""


def _last(messages: Any, roles: tuple[str, ...]) -> str | None:
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, Mapping) and message.get("role") in roles:
            return text_of(message.get("content"))
    return None


def is_summarization(body: Mapping[str, Any]) -> bool:
    """A request whose system/developer message mentions summar(y/ize/ies)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return False
    return any(
        isinstance(m, Mapping)
        and m.get("role") in ("system", "developer")
        and "summar" in text_of(m.get("content")).casefold()
        for m in messages
    )


def default_reply(body: Mapping[str, Any], n: int) -> str:
    """``Reply #<n> to: <first 40 characters of the last user message>``."""
    last = _last(body.get("messages"), ("user",))
    return f"Reply #{n} to: {(last or '(nothing)')[:40]}"


_WORD = re.compile(r"[^\W_][\w'\u2019-]*")
_BLOCK = re.compile(r"<(transcript[-\w]*)>(.*?)</\1>", re.IGNORECASE | re.DOTALL)
_PREVIOUS = re.compile(r"summary:\s*(.*?)(?:\n\s*\n|$)", re.IGNORECASE | re.DOTALL)
_STOP = frozenset(
    {
        *("a", "an", "and", "are", "as", "at", "be", "but", "by", "do", "does", "did"),
        *("for", "from", "had", "has", "have", "he", "her", "his", "how", "i", "if", "in"),
        *("is", "it", "its", "me", "my", "no", "not", "of", "ok", "okay", "on", "or", "our"),
        *("please", "she", "so", "that", "the", "their", "them", "then", "there", "these"),
        *("they", "this", "to", "was", "we", "were", "what", "when", "where", "which", "who"),
        *("why", "will", "with", "yes", "you", "your", "hello", "hi", "thanks", "thank"),
        *("sure", "nice", "great", "good", "well", "oh", "none"),
        # words of the summarization prompt and transcript, not of the conversation
        *("summary", "previous", "new", "write", "user", "assistant", "system", "tool"),
        "developer",
    }
)
_MAX_FACTS = 24


def _summary_source(text: str) -> str:
    """The transcript (and previous summary) inside a summarization prompt, or all of it."""
    block = _BLOCK.search(text)
    if not block:
        return text
    before = text[: block.start()]
    previous = _PREVIOUS.search(before)
    return f"{previous.group(1) if previous else ''}\n{block.group(2)}"


def default_summary(body: Mapping[str, Any], max_tokens: int | None) -> str:
    """The summary the server answers a summarization request with (see :func:`summarize`)."""
    return summarize(_summary_source(_last(body.get("messages"), ("user",)) or ""), max_tokens)


def summarize(source: str, max_tokens: int | None) -> str:
    """``Summary: Alice, Paris, 42.``: the distinct capitalized words and numbers, in order.

    Keeps the oldest facts when the cap forces a cut; never empty, never over
    ``max_tokens`` (by this module's tokenizer).
    """
    facts: list[str] = []
    seen: set[str] = set()
    words = [w.group().strip("'\u2019-") for w in _WORD.finditer(source)]
    for word in words:
        if not word or word.casefold() in _STOP or word.casefold() in seen:
            continue
        if word[0].isupper() or word[0].isdigit():
            seen.add(word.casefold())
            facts.append(word)
            if len(facts) == _MAX_FACTS:
                break
    if not facts:
        facts = [w for w in words if w.casefold() not in _STOP][:8] or ["nothing to note"]
    text = f"Summary: {', '.join(facts)}."
    if max_tokens is None:
        return text
    while len(facts) > 1 and count_text(text) > max_tokens:
        facts.pop()
        text = f"Summary: {', '.join(facts)}."
    if count_text(text) > max_tokens:
        text = truncate_to_tokens(text, max_tokens) or text[0]
    return text


def normalize_answer(value: Any, n: int) -> Answer | None:
    """Turn what a ``reply=`` gave into an :class:`Answer` (None: use the default)."""
    if value is None:
        return None
    if isinstance(value, str):
        return Answer(value)
    if not isinstance(value, Mapping):
        raise TypeError(f"reply must give a str, a dict or None, not {type(value).__name__}")
    calls = value.get("tool_calls")
    tool_calls = [_normalize_call(call, n, j) for j, call in enumerate(calls)] if calls else None
    content = value.get("content")
    finish = value.get("finish_reason") or ("tool_calls" if tool_calls else "stop")
    return Answer(content if content is not None or tool_calls else "", tool_calls, finish)


def _normalize_call(call: Mapping[str, Any], n: int, j: int) -> dict[str, Any]:
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {
        "id": call.get("id") or f"call_{n}_{j}",
        "type": "function",
        "function": {"name": function["name"], "arguments": arguments},
    }


def cap_answer(answer: Answer, max_tokens: int | None) -> Answer:
    """Cut a text reply that is longer than ``max_tokens``: finish_reason becomes length."""
    if max_tokens is None or answer.tool_calls or not answer.content:
        return answer
    if count_text(answer.content) <= max_tokens:
        return answer
    return Answer(truncate_to_tokens(answer.content, max_tokens), None, "length")


def filtered_answer(answer: Answer, pieces: int) -> Answer:
    """What is left of ``answer`` once a content filter stops it after ``pieces`` stream
    pieces (about two words each): finish_reason ``content_filter``."""
    words = (answer.content or "").split(" ")[: 2 * pieces]
    return Answer(" ".join(words), None, "content_filter")
