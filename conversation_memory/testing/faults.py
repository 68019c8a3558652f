"""Scriptable faults for :class:`~conversation_memory.testing.ChatServer`.

A :class:`Fault` describes what goes wrong with one chat request. Queue them
with ``server.fail(fault, times=n)``; each chat request takes the next queued
fault, in order. Faults fall into two groups:

* **replacing** faults answer instead of the model: :meth:`Fault.status`,
  :meth:`Fault.not_json`, :meth:`Fault.context_length`,
  :meth:`Fault.content_filter` (the model's answer, stopped by a filter);
* **transport** faults deliver the normal answer badly:
  :meth:`Fault.slow_first_byte`, :meth:`Fault.drip`, :meth:`Fault.cut_stream`,
  :meth:`Fault.abrupt_close`, :meth:`Fault.sse_error`,
  :meth:`Fault.malformed_json`. Those that damage a success body
  (cut, SSE error, malformed JSON) leave an error answer (a strict-mode 400,
  say) untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from email.utils import format_datetime
from typing import Any, Literal

from conversation_memory.testing.replies import FILTER_CATEGORIES

__all__ = ["ContextStyle", "Fault"]

ContextStyle = Literal["openai", "llamacpp", "llama-cpp-python"]
"""Whose words a context-length 400 uses (see ``ChatServer`` for the exact texts)."""

_STYLES = ("openai", "llamacpp", "llama-cpp-python")
_SSE_ERROR = "The server had an error while processing your request. Sorry about that!"


@dataclass(frozen=True, slots=True)
class Fault:
    """One request's misfortune. Build it with the class methods, not directly."""

    kind: str
    code: int | None = None
    """HTTP status of a ``status`` fault."""
    headers: tuple[tuple[str, str], ...] = ()
    """Extra response headers (``Retry-After`` and friends)."""
    body: Any = None
    """Response body override: a dict is sent as JSON, a str/bytes as plain text."""
    seconds: float = 0.0
    """Delay before the first byte, or between chunks for ``drip``."""
    after_chunks: int = 0
    """How many SSE events go out before a cut, an error event or a close."""
    done: bool = False
    """Whether a cut stream still ends with ``data: [DONE]``."""
    message: str = ""
    style: ContextStyle = "openai"
    chunk_bytes: int = 16
    """Size of the pieces a non-stream body is dripped in."""
    before_headers: bool = False
    """``abrupt_close`` before sending anything at all."""
    limit: int | None = None
    """The window a ``context_length`` fault claims (default: the server's)."""
    echo_headers: bool = False
    """A ``status`` fault's message quotes the request's headers, credentials included."""
    category: str = "violence"
    """The category a ``content_filter`` fault says it caught."""

    @classmethod
    def status(
        cls,
        code: int,
        *,
        retry_after: float | None = None,
        retry_after_ms: float | None = None,
        retry_after_date: datetime | str | None = None,
        body: Any = None,
        echo_headers: bool = False,
    ) -> Fault:
        """Answer with HTTP ``code`` and OpenAI's body for it (or ``body``).

        401 carries OpenAI's ``invalid_api_key`` body, 429 its rate-limit body
        and ``x-ratelimit-*`` headers, 5xx its server-error bodies (502 is an
        HTML page, as a gateway sends). ``retry_after*`` set the
        ``retry-after`` / ``retry-after-ms`` headers; a datetime becomes an
        HTTP date. ``echo_headers=True`` answers as a misconfigured gateway
        does: an error whose message quotes every request header, the
        ``Authorization`` or ``api-key`` one included.
        """
        if not 400 <= code <= 599:
            raise ValueError(f"Fault.status needs a 4xx or 5xx code, not {code}")
        headers: list[tuple[str, str]] = []
        if retry_after is not None:
            headers.append(("retry-after", _number(retry_after)))
        if retry_after_ms is not None:
            headers.append(("retry-after-ms", _number(retry_after_ms)))
        if retry_after_date is not None:
            when = (
                format_datetime(retry_after_date, usegmt=True)
                if isinstance(retry_after_date, datetime)
                else retry_after_date
            )
            headers.append(("retry-after", when))
        return cls(
            "status", code=code, headers=tuple(headers), body=body, echo_headers=echo_headers
        )

    @classmethod
    def slow_first_byte(cls, seconds: float) -> Fault:
        """Wait ``seconds`` before sending the status line (a slow server)."""
        return cls("slow_first_byte", seconds=_positive(seconds))

    @classmethod
    def drip(cls, seconds_per_chunk: float, *, chunk_bytes: int = 16) -> Fault:
        """Send slowly: a pause before each SSE event, or each ``chunk_bytes`` of a body."""
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be at least 1")
        return cls("drip", seconds=_positive(seconds_per_chunk), chunk_bytes=chunk_bytes)

    @classmethod
    def cut_stream(cls, after_chunks: int, *, done: bool = False) -> Fault:
        """End the stream cleanly after ``after_chunks`` events, before any finish_reason.

        With ``done=True`` a ``data: [DONE]`` follows, as a proxy that loses
        the upstream might send. A non-stream request gets a JSON body cut
        short of its Content-Length (the client sees a broken connection).
        """
        return cls("cut_stream", after_chunks=_count(after_chunks), done=done)

    @classmethod
    def abrupt_close(cls, *, after_chunks: int = 1, before_headers: bool = False) -> Fault:
        """Close the socket mid-response (mid-stream, or halfway through a JSON body).

        ``before_headers=True`` closes right after reading the request.
        """
        return cls("abrupt_close", after_chunks=_count(after_chunks), before_headers=before_headers)

    @classmethod
    def sse_error(cls, message: str = _SSE_ERROR, *, after_chunks: int = 2) -> Fault:
        """Mid-stream ``event: error`` with an OpenAI error object, then the stream ends.

        A non-stream request gets a 200 whose JSON body is only ``{"error": ...}``.
        """
        return cls("sse_error", message=message, after_chunks=_count(after_chunks))

    @classmethod
    def malformed_json(cls) -> Fault:
        """200 with a JSON body cut in half (a stream gets one truncated ``data:`` line)."""
        return cls("malformed_json")

    @classmethod
    def not_json(cls) -> Fault:
        """200 with a ``text/html`` page, as a captive portal or wrong base URL gives."""
        return cls("not_json")

    @classmethod
    def context_length(cls, style: ContextStyle = "openai", *, limit: int | None = None) -> Fault:
        """The server's context-length 400 in ``style``, whatever the prompt's size."""
        if style not in _STYLES:
            raise ValueError(f"style must be one of {', '.join(_STYLES)}, not {style!r}")
        return cls("context_length", style=style, limit=limit)

    @classmethod
    def content_filter(cls, category: str = "violence", *, after_chunks: int = 1) -> Fault:
        """A content filter stops the reply after ``after_chunks`` text pieces (about two
        words each, streamed or not): ``finish_reason`` is ``"content_filter"``, and on an
        Azure route the choice's ``content_filter_results`` mark ``category`` filtered."""
        if category not in FILTER_CATEGORIES:
            raise ValueError(
                f"category must be one of {', '.join(FILTER_CATEGORIES)}, not {category!r}"
            )
        return cls("content_filter", category=category, after_chunks=_count(after_chunks))

    def __repr__(self) -> str:
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if f.name != "kind" and getattr(self, f.name) != f.default
        ]
        return f"Fault.{self.kind}({', '.join(changed)})"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _positive(seconds: float) -> float:
    if seconds < 0:
        raise ValueError("seconds must not be negative")
    return float(seconds)


def _count(chunks: int) -> int:
    if chunks < 0:
        raise ValueError("after_chunks must not be negative")
    return chunks
