"""What the sync and async model calls share; each side only does its own I/O.

:class:`~conversation_memory.llm.LLM` (:mod:`.sync`) and
:class:`~conversation_memory.llm.AsyncLLM` (:mod:`.aio`) are shells that
await or don't. Everything else is here or below: checking the client and
the request (:func:`build_request`, with :mod:`.params`), each attempt's
timeout, mapping and redacting errors (:class:`Shared`, with :mod:`.mapping`
and :mod:`.retry`), reading a whole body (:meth:`Shared.whole`, with
:mod:`.assembly`), and the per-stream bookkeeping both stream shells need
(:class:`StreamState`).

Deadline: the SDK's ``timeout`` applies to each network read, not to the
call, so a server that drips one byte a second never times out. Each attempt
gets ``timeout=`` the time left, and a stream checks the deadline after
every chunk and aborts with :class:`~conversation_memory.errors.ModelTimeout`.
A single read can still block up to the time that was left when the attempt
began.

Streams retry only before their first text piece reaches the caller: a
retry after that would repeat text the caller already showed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import openai

from conversation_memory.errors import (
    ConfigurationError,
    MalformedResponse,
    ModelError,
    ModelTimeout,
    redact,
)
from conversation_memory.llm.assembly import Assembler, Completion, completion_from_body
from conversation_memory.llm.clients import NO_KEY
from conversation_memory.llm.mapping import map_error
from conversation_memory.llm.params import check_params, check_tools
from conversation_memory.llm.retry import Attempts, RetryPolicy

__all__ = ["Shared", "StreamState", "attempt_timeout", "build_request"]


def _without_sdk_retries(client: Any) -> Any:
    """The same client with the SDK's own retries off (a copy sharing its connections)."""
    retries = getattr(client, "max_retries", 0)
    if isinstance(retries, int) and retries > 0:
        return client.with_options(max_retries=0)
    return client


def _check_client(client: Any, *, is_async: bool) -> None:
    completions = getattr(getattr(client, "chat", None), "completions", None)
    if completions is None:
        raise ConfigurationError(
            f"client must be an openai.{'AsyncOpenAI' if is_async else 'OpenAI'} (or a "
            f"compatible client), got {type(client).__name__}.",
            argument="client",
        )
    if is_async and isinstance(client, openai.OpenAI):
        raise ConfigurationError(
            "AsyncLLM needs an openai.AsyncOpenAI client; use LLM for openai.OpenAI.",
            argument="client",
        )
    if not is_async and isinstance(client, openai.AsyncOpenAI):
        raise ConfigurationError(
            "LLM needs an openai.OpenAI client; use AsyncLLM for openai.AsyncOpenAI.",
            argument="client",
        )


def attempt_timeout(client: Any, left: float | None) -> Any:
    """The SDK ``timeout`` for an attempt that may take ``left`` seconds."""
    if left is None:
        return openai.NOT_GIVEN
    configured = getattr(client, "timeout", None)
    connect = configured.connect if isinstance(configured, openai.Timeout) else None
    return openai.Timeout(left, connect=min(connect, left) if connect else left)


def build_request(
    model: str, messages: Sequence[Mapping[str, Any]], tools: Any, params: Mapping[str, Any]
) -> dict[str, Any]:
    if not isinstance(model, str) or not model:
        raise ConfigurationError(f"model must be a model name, got {model!r}.", argument="model")
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise ConfigurationError(
            "messages must be a non-empty list of chat messages.", argument="messages"
        )
    kwargs = check_params(params, model=model)
    if tools is not None:
        if "tools" in kwargs:
            raise ConfigurationError("give tools once, as tools=...", argument="tools")
        tools = check_tools(tools)
        if tools:  # the API refuses an empty list; no tools means leave it out
            kwargs["tools"] = tools
    return {"model": model, "messages": [dict(m) for m in messages], **kwargs}


def _client_secrets(client: Any) -> tuple[str, ...]:
    """The credentials a client sends: its API key, and an Azure AD token when it has one."""
    found = (getattr(client, "api_key", None), getattr(client, "_azure_ad_token", None))
    return tuple(value for value in found if isinstance(value, str) and value != NO_KEY)


def _scrub(exc: BaseException | None, secrets: tuple[str, ...]) -> None:
    """Redact the SDK's own exceptions in place: ours keeps them as ``__cause__``, and a
    traceback (``convmem --debug``) prints their messages, which quote the error body."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.args = tuple(redact(a, secrets) if isinstance(a, str) else a for a in exc.args)
        message = getattr(exc, "message", None)
        if isinstance(message, str):
            with contextlib.suppress(AttributeError):  # a read-only property
                exc.message = redact(message, secrets)  # type: ignore[attr-defined]
        exc = exc.__cause__ or exc.__context__


class Shared:
    """What LLM and AsyncLLM share: settings, and mapping errors of one attempt."""

    def __init__(
        self,
        client: Any,
        *,
        retry: RetryPolicy,
        clock: Callable[[], float],
        now: Callable[[], float],
        is_async: bool,
    ) -> None:
        _check_client(client, is_async=is_async)
        if not isinstance(retry, RetryPolicy):
            raise ConfigurationError(
                f"retry must be a RetryPolicy, got {type(retry).__name__}.", argument="retry"
            )
        self.client = _without_sdk_retries(client)
        self.secrets = _client_secrets(client)
        self.retry = retry
        self.clock = clock
        self.now = now

    def attempts(self) -> Attempts:
        return Attempts(self.retry, clock=self.clock)

    def mapped(
        self,
        exc: Exception,
        attempts: Attempts,
        model: str,
        request_id: str | None = None,
    ) -> Exception:
        """Our error for an exception from one attempt (unknown ones are returned as they are)."""
        error = map_error(
            exc, model=model, attempts=attempts.number, now=self.now, request_id=request_id
        )
        if error is None:
            return exc
        _scrub(exc, self.secrets)
        status = getattr(error, "status", None)
        if isinstance(error, ModelTimeout) and status is None and attempts.expired():
            # The read timed out because the deadline did: say so, and stop.
            return attempts.timeout(model, request_id=request_id)
        return self.stamp(error, attempts=attempts.number, request_id=request_id)

    def stamp(self, error: ModelError, **context: Any) -> ModelError:
        """Fill context the raiser could not know (attempts, request id), and hide the
        client's key, which a server may have echoed into the message."""
        for key, value in context.items():
            if value is not None and getattr(error, key, None) in (None, 0):
                setattr(error, key, value)
                error.context[key] = value
        message = redact(error.message, self.secrets)
        if message == error.message:
            return error
        return type(error)(message, **error.context)

    def check_deadline(self, attempts: Attempts, model: str, request_id: str | None) -> None:
        """Between two chunks of a reply: abort once the call's deadline has passed."""
        if attempts.expired():
            raise attempts.timeout(model, request_id=request_id, what="did not finish its reply")

    def whole(
        self, body: bytes, request_id: str | None, attempts: Attempts, model: str
    ) -> Completion:
        """The completion from a whole (non-streamed) reply body."""
        try:
            data = json.loads(body)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise self.mapped(exc, attempts, model, request_id) from exc
        try:
            return completion_from_body(
                data,
                model=model,
                request_id=request_id,
                latency_ms=attempts.elapsed_ms(),
                attempts=attempts.number,
            )
        except ModelError as error:
            raise self.stamp(error, attempts=attempts.number, request_id=request_id) from None


class StreamState:
    """One stream's bookkeeping, shared by the sync and async shells."""

    def __init__(self, shared: Shared, request: dict[str, Any]) -> None:
        self.shared = shared
        self.model: str = request["model"]
        self.request = {
            **request,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        self.attempts: Attempts | None = None
        self.assembler = Assembler(self.model)
        self.request_id: str | None = None
        self.content_type = ""
        self.started = False  # the opening phase is over: no more retries
        self.outcome: str | None = None  # "ended", "broken" or "abandoned"
        self.latency_ms = 0.0
        self._completion: Completion | None = None

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def begin(self) -> Any:
        """Start an attempt: fresh assembly; returns the SDK ``timeout``."""
        if self.attempts is None:
            self.attempts = self.shared.attempts()
        self.assembler = Assembler(self.model)
        self.request_id = None
        self.content_type = ""
        return attempt_timeout(self.shared.client, self.attempts.begin(self.model))

    def opened(self, sdk_stream: Any) -> None:
        headers = sdk_stream.response.headers
        self.request_id = headers.get("x-request-id")
        self.content_type = headers.get("content-type", "")

    def error(self, exc: Exception) -> Exception:
        assert self.attempts is not None
        return self.shared.mapped(exc, self.attempts, self.model, self.request_id)

    def feed(self, chunk: Any) -> str:
        """Take one chunk (after the deadline check); return its text."""
        attempts = self.attempts
        assert attempts is not None
        self.shared.check_deadline(attempts, self.model, self.request_id)
        try:
            return self.assembler.feed(chunk)
        except ModelError as error:
            raise self.shared.stamp(
                error, attempts=attempts.number, request_id=self.request_id
            ) from None

    def ended(self) -> None:
        """The SDK stream ran out (with or without a finish_reason)."""
        if self.assembler.chunks == 0 and "event-stream" not in self.content_type:
            assert self.attempts is not None
            raise self.shared.stamp(
                MalformedResponse(
                    f"the server answered a streaming request for model {self.model!r} with "
                    f"{self.content_type or 'no content type'} and no events; it does not "
                    "seem to speak the OpenAI streaming format.",
                    model=self.model,
                    status=None,
                    request_id=self.request_id,
                    attempts=self.attempts.number,
                    retryable=False,
                )
            )
        self.finish("ended")

    def finish(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.latency_ms = self.attempts.elapsed_ms() if self.attempts else 0.0

    def stopped_by(self, exc: BaseException) -> None:
        # An Exception broke the stream; anything else (KeyboardInterrupt,
        # GeneratorExit, cancellation) means the caller left.
        self.finish("broken" if isinstance(exc, Exception) else "abandoned")

    def completion(self) -> Completion | None:
        self.finish("abandoned")
        if not self.started:
            return None  # no reply began: the call failed first, or was never made
        if self._completion is None:
            self._completion = self.assembler.completion(
                request_id=self.request_id,
                latency_ms=self.latency_ms,
                attempts=self.attempts.number if self.attempts else 0,
                complete=self.outcome == "ended",
            )
        return self._completion
