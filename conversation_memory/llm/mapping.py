"""Turning whatever a model call raised into one of our ModelError classes.

The SDK raises its own tree (``APIStatusError`` by status, ``APITimeoutError``,
``APIConnectionError``, a bare ``APIError`` for an error event inside a
stream), but it also lets lower-level exceptions through untouched:

- ``json.JSONDecodeError`` when a 200 reply (or one SSE event) is not JSON;
- ``UnicodeDecodeError`` when an SSE line is not UTF-8;
- raw ``httpx2`` transport errors when a *streamed* request gets an error
  status and the error body itself breaks off while being read;
- nothing at all for a 200 whose body is plain text (``parse()`` returns the
  text) or JSON of the wrong shape (built without validation).

So the mapping takes any exception and the callers parse reply bodies
themselves (:mod:`conversation_memory.llm.assembly`) instead of trusting the
SDK's lenient models.

Every mapped error carries ``status``, ``request_id``, ``attempts``, ``model``
and ``retryable`` (what :mod:`.retry` decides on), plus ``retry_after`` (the
server's ask, in seconds) when the server said.
"""

from __future__ import annotations

import json
import re
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import httpx2
import openai

from conversation_memory.errors import (
    AuthenticationFailed,
    BadRequest,
    ConnectionFailed,
    ContextLengthExceeded,
    MalformedResponse,
    ModelError,
    ModelTimeout,
    RateLimited,
    ServerError,
)
from conversation_memory.llm.retry import parse_retry_after

__all__ = ["context_limits", "error_from_body", "is_context_length_error", "map_error"]

RETRY_STATUSES = frozenset({408, 409, 429})
"""Statuses worth another attempt besides every 5xx."""

_KEY_HELP = (
    "Set OPENAI_API_KEY to a valid key (and OPENAI_BASE_URL when the server is not "
    "OpenAI's), or pass client=OpenAI(api_key=..., base_url=...)."
)

# Each wording seen in the wild, in either order inside the message:
#   OpenAI:     "This model's maximum context length is 8192 tokens. However, your messages
#                resulted in 9000 tokens." / "... However, you requested 9000 tokens (...)"
#   llama-cpp-python: the same sentences as OpenAI's from its server; its library's own
#               ValueError reads "Requested tokens (9000) exceed context window of 8192".
#   llama.cpp:  "request (9000 tokens) exceeds the available context size (8192 tokens),
#               try increasing it", type "exceed_context_size_error", with n_prompt_tokens
#               and n_ctx fields (checked against the server conversation_memory.local runs);
#               older builds say only "the request exceeds the available context size".
_LIMIT_RES = (
    re.compile(r"maximum context length is (\d+)", re.IGNORECASE),
    re.compile(r"context (?:size|window|length) (?:of |is )?\(?(\d+)", re.IGNORECASE),
    re.compile(r"n_ctx(?:_slot)?\b\W{0,3}(\d+)", re.IGNORECASE),
)
_REQUESTED_RES = (
    re.compile(r"resulted in (\d+) tokens", re.IGNORECASE),
    re.compile(r"requested (\d+) tokens", re.IGNORECASE),
    re.compile(r"request \((\d+) tokens?\)", re.IGNORECASE),
    re.compile(r"requested tokens \((\d+)\)", re.IGNORECASE),
    re.compile(r"n_prompt_tokens\b\W{0,3}(\d+)", re.IGNORECASE),
    re.compile(r"prompt (?:is|has|of) (\d+) tokens", re.IGNORECASE),
    re.compile(r"(\d+) tokens? (?:exceeds?|is more than|is longer than)", re.IGNORECASE),
)
_CONTEXT_RE = re.compile(
    r"maximum context length|context[ _](?:length|size|window)[ _]exceeded"
    r"|exceeds? (?:the )?(?:available |maximum )?context|n_ctx"
    r"|longer than the (?:model's )?context|too long for the context",
    re.IGNORECASE,
)
_CONTEXT_CODES = frozenset({"context_length_exceeded", "exceed_context_size_error"})


def _error_object(body: object) -> Mapping[str, Any]:
    """The ``{"message", "type", "code", ...}`` object of an error body, or {}."""
    if isinstance(body, Mapping):
        inner = body.get("error")
        if isinstance(inner, Mapping):
            return inner
        return body
    return {}


def _message_of(body: object, fallback: str) -> str:
    error = _error_object(body)
    message = error.get("message")
    if isinstance(message, str) and message:
        return message
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return fallback


def is_context_length_error(body: object, message: str = "") -> bool:
    """Whether an error body (or its message) says the prompt is over the window."""
    error = _error_object(body)
    codes = {str(error.get(key)) for key in ("code", "type")}
    if codes & _CONTEXT_CODES:
        return True
    text = _message_of(body, message)
    return bool(_CONTEXT_RE.search(text))


def _first_int(patterns: tuple[re.Pattern[str], ...], text: str) -> int | None:
    for pattern in patterns:
        match = pattern.search(text)
        if match:
            return int(match.group(1))
    return None


def context_limits(body: object, message: str = "") -> tuple[int | None, int | None]:
    """``(limit, requested)`` tokens from a context-length error, None where not said."""
    error = _error_object(body)
    limit = error.get("n_ctx")
    requested = error.get("n_prompt_tokens")
    text = _message_of(body, message)
    if not isinstance(limit, int) or isinstance(limit, bool):
        limit = _first_int(_LIMIT_RES, text)
    if not isinstance(requested, int) or isinstance(requested, bool):
        requested = _first_int(_REQUESTED_RES, text)
    return limit, requested


def _where(request: httpx2.Request | None) -> str:
    if request is None:
        return ""
    try:
        url = request.url
        return f" at {url.scheme}://{url.netloc.decode('ascii', 'replace')}"
    except (AttributeError, ValueError):  # pragma: no cover - a request without a URL
        return ""


def error_from_body(
    body: object,
    *,
    status: int | None,
    model: str,
    attempts: int,
    request_id: str | None = None,
    retry_after: float | None = None,
    where: str = "",
    fallback: str = "",
) -> ModelError:
    """The error for a server's error reply: an HTTP status, or an error event in a stream."""
    message = _message_of(body, fallback or "no error message")
    context: dict[str, Any] = {
        "status": status,
        "request_id": request_id,
        "attempts": attempts,
        "model": model,
    }
    said = f" (status {status})" if status is not None else ""
    rid = f" [request id {request_id}]" if request_id else ""
    if is_context_length_error(body, message):
        limit, requested = context_limits(body, message)
        return ContextLengthExceeded(
            f"model {model!r}{where} refused the prompt as longer than its context window"
            f"{said}: {message}{rid}. Lower the budget, or register the model's real window.",
            limit=limit,
            requested=requested,
            retryable=False,
            **context,
        )
    error = _error_object(body)
    kind = str(error.get("type") or error.get("code") or "").lower()
    if status in (401, 403):
        return AuthenticationFailed(
            f"the server{where} refused the credentials for model {model!r}{said}: "
            f"{message}{rid}. {_KEY_HELP}",
            retryable=False,
            **context,
        )
    if status == 429 or (status is None and "rate_limit" in kind):
        return RateLimited(
            f"model {model!r}{where} is rate limited{said}: {message}{rid}. Wait and try "
            "again, lower the request rate, or raise RetryPolicy(attempts=...).",
            retryable=True,
            retry_after=retry_after,
            **context,
        )
    if status is not None and status >= 500:
        return ServerError(
            f"the server{where} failed for model {model!r}{said}: {message}{rid}.",
            retryable=True,
            retry_after=retry_after,
            **context,
        )
    if status == 408:
        return ModelTimeout(
            f"the server{where} timed out the request for model {model!r}{said}: {message}{rid}.",
            retryable=True,
            retry_after=retry_after,
            **context,
        )
    if status is None:
        # An error event inside a 200 stream: the server's fault unless it says otherwise.
        if "invalid_request" in kind:
            return BadRequest(
                f"model {model!r}{where} refused the request mid-stream: {message}{rid}.",
                retryable=False,
                **context,
            )
        return ServerError(
            f"model {model!r}{where} sent an error in its stream: {message}{rid}.",
            retryable=True,
            retry_after=retry_after,
            **context,
        )
    return BadRequest(
        f"model {model!r}{where} refused the request{said}: {message}{rid}. "
        "Retrying can't help; check the model name, messages and parameters.",
        retryable=status in RETRY_STATUSES,
        retry_after=retry_after,
        **context,
    )


def map_error(
    exc: BaseException,
    *,
    model: str,
    attempts: int,
    now: Callable[[], float],
    request_id: str | None = None,
) -> ModelError | None:
    """Our error for ``exc``, or None when it is not a model-call failure (a bug: re-raise)."""
    if isinstance(exc, ModelError):
        return exc
    context: dict[str, Any] = {"request_id": request_id, "attempts": attempts, "model": model}
    if isinstance(exc, openai.APIStatusError):
        response = exc.response
        rid = exc.request_id or request_id
        return error_from_body(
            exc.body,
            status=exc.status_code,
            model=model,
            attempts=attempts,
            request_id=rid,
            retry_after=parse_retry_after(response.headers, now=now()),
            where=_where(exc.request),
            fallback=exc.message,
        )
    if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException):
        return ModelTimeout(
            f"model {model!r}{_where(_request_of(exc))} did not answer in time: {exc}.",
            status=None,
            retryable=True,
            **context,
        )
    if isinstance(exc, openai.APIResponseValidationError):
        return _malformed(f"{exc.message}", status=exc.status_code, **context)
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        if isinstance(cause, httpx2.DecodingError):
            return _malformed(f"the reply could not be decoded{detail}", status=None, **context)
        return _connection_failed(cause, _where(exc.request), detail, **context)
    if isinstance(exc, openai.APIError):
        # A bare APIError is what the SDK raises for an error event inside a stream.
        return error_from_body(
            {"error": exc.body} if isinstance(exc.body, Mapping) else exc.body,
            status=None,
            model=model,
            attempts=attempts,
            request_id=request_id,
            where=_where(exc.request),
            fallback=exc.message,
        )
    if isinstance(exc, httpx2.DecodingError):
        return _malformed(f"the reply could not be decoded ({exc})", status=None, **context)
    if isinstance(exc, httpx2.RequestError | ssl.SSLError | ConnectionError):
        detail = f" ({type(exc).__name__}: {exc})"
        return _connection_failed(exc, _where(_request_of(exc)), detail, **context)
    if isinstance(exc, json.JSONDecodeError | UnicodeDecodeError):
        return _malformed(
            f"the reply is not valid JSON/UTF-8 ({type(exc).__name__}: {exc})",
            status=None,
            **context,
        )
    if _is_anyio_end_of_stream(exc):
        return ConnectionFailed(
            f"the server closed the connection for model {model!r}.",
            status=None,
            retryable=True,
            **context,
        )
    return None


def _connection_failed(
    cause: BaseException | None, where: str, detail: str, **context: Any
) -> ModelError:
    model = context["model"]
    if isinstance(cause, httpx2.ConnectError | httpx2.UnsupportedProtocol | ConnectionRefusedError):
        what = "could not reach the server"
        fix = "Check OPENAI_BASE_URL (or the client's base_url) and that the server is up."
    else:
        what = "lost the connection to the server"
        fix = "The server or a proxy hung up mid-reply; try again."
    return ConnectionFailed(
        f"{what}{where} for model {model!r}{detail}. {fix}",
        status=None,
        retryable=True,
        **context,
    )


def _request_of(exc: BaseException) -> httpx2.Request | None:
    try:
        request = getattr(exc, "request", None)
    except RuntimeError:  # httpx raises when an error was made without its request
        return None
    return request if isinstance(request, httpx2.Request) else None


def _is_anyio_end_of_stream(exc: BaseException) -> bool:
    try:
        import anyio
    except ImportError:  # pragma: no cover - anyio ships with the SDK
        return False
    return isinstance(exc, anyio.EndOfStream | anyio.BrokenResourceError)


def _malformed(detail: str, *, model: str, status: int | None, **context: Any) -> ModelError:
    return MalformedResponse(
        f"the server's reply for model {model!r} is not in the OpenAI chat format: {detail}. "
        "Check that OPENAI_BASE_URL points at an OpenAI-compatible /v1 endpoint.",
        model=model,
        status=status,
        retryable=False,
        **context,
    )
