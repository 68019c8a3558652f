"""Model calls through the OpenAI SDK: whole replies and streams, sync and async.

The shells here do only I/O. Everything else is shared: parameters
(:mod:`.params`), retry decisions (:mod:`.retry`), error mapping
(:mod:`.mapping`), and reply assembly (:mod:`.assembly`); the per-stream
bookkeeping that both stream shells need lives in :class:`_StreamState`.

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

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import openai
import tenacity

from conversation_memory import _config
from conversation_memory.errors import (
    ConfigurationError,
    MalformedResponse,
    ModelError,
    ModelTimeout,
    redact,
)
from conversation_memory.llm.assembly import Assembler, Completion, completion_from_body
from conversation_memory.llm.mapping import map_error
from conversation_memory.llm.params import check_params, check_tools
from conversation_memory.llm.retry import Attempts, RetryPolicy

__all__ = [
    "LLM",
    "AsyncLLM",
    "AsyncReplyStream",
    "ReplyStream",
    "async_client_from_env",
    "client_from_env",
]

_DEFAULT_BASE_URL = "https://api.openai.com/v1"
_NO_KEY = "no-key"
"""Sent as the key to a server named by OPENAI_BASE_URL when no key is set (local servers
ignore it; one that checks it answers 401, which says how to set the key)."""


# --- clients -----------------------------------------------------------------------------


def _client_settings(env: Mapping[str, str] | None, options: dict[str, Any]) -> dict[str, Any]:
    if "max_retries" in options:
        raise ConfigurationError(
            "max_retries: the SDK's retries stay off (one retry layer); "
            "set LLM(..., retry=RetryPolicy(attempts=...)) instead.",
            argument="max_retries",
        )
    key = options.pop("api_key", None) or _config.openai_api_key(env)
    base_url = options.pop("base_url", None) or _config.openai_base_url(env)
    if not key:
        if not base_url:
            raise ConfigurationError(
                "No API key: set OPENAI_API_KEY (for OpenAI), or OPENAI_BASE_URL for a "
                "local OpenAI-compatible server (e.g. http://127.0.0.1:8080/v1), or pass "
                "client=OpenAI(api_key=..., base_url=...).",
                argument="OPENAI_API_KEY",
            )
        key = _NO_KEY
    # Both passed explicitly, so the SDK doesn't read the process environment itself.
    return {"api_key": key, "base_url": base_url or _DEFAULT_BASE_URL, "max_retries": 0, **options}


def client_from_env(env: Mapping[str, str] | None = None, **options: Any) -> openai.OpenAI:
    """An ``OpenAI`` client from ``OPENAI_API_KEY`` / ``OPENAI_BASE_URL``, SDK retries off.

    ``env`` replaces the process environment (for tests); ``options`` go to
    ``openai.OpenAI`` (``timeout``, ``default_headers``, ``http_client``...).
    """
    return openai.OpenAI(**_client_settings(env, dict(options)))


def async_client_from_env(
    env: Mapping[str, str] | None = None, **options: Any
) -> openai.AsyncOpenAI:
    """The ``AsyncOpenAI`` twin of :func:`client_from_env`."""
    return openai.AsyncOpenAI(**_client_settings(env, dict(options)))


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


def _timeout(client: Any, left: float | None) -> Any:
    """The SDK ``timeout`` for an attempt that may take ``left`` seconds."""
    if left is None:
        return openai.NOT_GIVEN
    configured = getattr(client, "timeout", None)
    connect = configured.connect if isinstance(configured, openai.Timeout) else None
    return openai.Timeout(left, connect=min(connect, left) if connect else left)


def _request(
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
    return tuple(value for value in found if isinstance(value, str) and value != _NO_KEY)


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


class _Shared:
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


# --- sync --------------------------------------------------------------------------------


class LLM:
    """Calls an OpenAI-compatible chat model with one retry layer and mapped errors.

    ``sleep``, ``clock`` (monotonic seconds, for the deadline) and ``now`` (Unix
    time, for ``Retry-After`` dates) are injectable so tests run instantly.
    A client with SDK retries on is used through a copy with them off.
    """

    def __init__(
        self,
        client: openai.OpenAI,
        *,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen, so sharing it is safe
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._shared = _Shared(client, retry=retry, clock=clock, now=now, is_async=False)
        self._sleep = sleep

    @property
    def client(self) -> openai.OpenAI:
        """The client in use (SDK retries off)."""
        return self._shared.client  # type: ignore[no-any-return]

    @property
    def retry(self) -> RetryPolicy:
        return self._shared.retry

    def complete(
        self,
        *,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        **params: Any,
    ) -> Completion:
        """One whole reply. Raises a ModelError subclass once retries are spent."""
        request = _request(model, messages, tools, params)
        shared = self._shared
        attempts = shared.attempts()
        result: Completion | None = None
        for attempt in tenacity.Retrying(sleep=self._sleep, **attempts.controls()):
            with attempt:
                timeout = _timeout(shared.client, attempts.begin(model))
                request_id = None
                body = bytearray()
                try:
                    # Read the body in chunks, so a slowly dripped reply can't outlast the
                    # deadline (the SDK's timeout bounds each read, not the whole).
                    with shared.client.chat.completions.with_streaming_response.create(
                        **request, timeout=timeout
                    ) as response:
                        request_id = response.headers.get("x-request-id")
                        for part in response.iter_bytes():
                            body += part
                            shared.check_deadline(attempts, model, request_id)
                except Exception as exc:
                    raise shared.mapped(exc, attempts, model, request_id) from exc
                result = shared.whole(bytes(body), request_id, attempts, model)
        assert result is not None
        return result

    def stream(
        self,
        *,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        **params: Any,
    ) -> ReplyStream:
        """A streamed reply; parameters are checked now, the request is made on first read."""
        return ReplyStream(self, _request(model, messages, tools, params))


class _StreamState:
    """One stream's bookkeeping, shared by the sync and async shells."""

    def __init__(self, shared: _Shared, request: dict[str, Any]) -> None:
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
        return _timeout(self.shared.client, self.attempts.begin(self.model))

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


class ReplyStream:
    """Text pieces of one streamed reply; ``.completion`` once it is over.

    Iterate it (or use it as a context manager). Ending early — leaving a
    ``for`` loop, ``close()``, leaving a ``with`` block, KeyboardInterrupt, or
    asking for ``.completion`` before the end — abandons the reply: the
    connection is closed and ``completion.complete`` is False (``next()`` on
    the stream itself reads on without abandoning). ``partial_text`` is the
    text so far at any time.
    """

    def __init__(self, llm: LLM, request: dict[str, Any]) -> None:
        self._state = _StreamState(llm._shared, request)
        self._sleep = llm._sleep
        self._sdk: Any = None
        self._pending: str | None = None

    @property
    def partial_text(self) -> str:
        return self._state.assembler.text

    @property
    def completion(self) -> Completion | None:
        """The assembled reply; asking before the end abandons the stream.

        None when no reply began: the call failed before its first piece (the
        error was raised), or the stream was closed before it started.
        """
        if not self._state.finished:
            self.close()
        return self._state.completion()

    def __iter__(self) -> Iterator[str]:
        # A generator, so that a loop left early (break, an exception in the loop body,
        # GeneratorExit) closes it, and with it the stream: the reply is abandoned.
        try:
            while (piece := self._next_piece()) is not None:
                yield piece
        finally:
            self.close()

    def __next__(self) -> str:
        piece = self._next_piece()
        if piece is None:
            raise StopIteration
        return piece

    def start(self) -> None:
        """Connect now, retrying as needed, rather than on the first read.

        Errors that come before the reply begins (context length, auth, spent
        retries) are raised here; the first piece is kept for the first read.
        """
        state = self._state
        if not (state.started or state.finished):
            self._pending = self._guarded(self._first)

    def _next_piece(self) -> str | None:
        state = self._state
        if state.finished:
            return None
        if not state.started:
            self.start()
            if state.finished:
                return None
        pending, self._pending = self._pending, None
        if pending is not None:
            return pending
        return self._guarded(self._read)

    def _guarded(self, read: Callable[[], str | None]) -> str | None:
        """Run one read; on any exit but a piece, settle the outcome and release the stream."""
        state = self._state
        try:
            piece = read()
        except BaseException as exc:
            state.stopped_by(exc)
            self._close_sdk()
            raise
        state.started = True
        if piece is None:
            self._close_sdk()
        return piece

    def _first(self) -> str | None:
        """Open the stream and read to the first piece, retrying on the way."""
        state = self._state
        state.attempts = state.shared.attempts()
        piece: str | None = None
        for attempt in tenacity.Retrying(sleep=self._sleep, **state.attempts.controls()):
            with attempt:
                self._close_sdk()
                timeout = state.begin()
                try:
                    self._sdk = state.shared.client.chat.completions.create(
                        **state.request, timeout=timeout
                    )
                except Exception as exc:
                    raise state.error(exc) from exc
                state.opened(self._sdk)
                piece = self._read()
        return piece

    def _read(self) -> str | None:
        """The next text piece, or None at the end of the stream."""
        state = self._state
        while True:
            try:
                chunk = next(self._sdk)
            except StopIteration:
                state.ended()
                return None
            except Exception as exc:
                raise state.error(exc) from exc
            piece = state.feed(chunk)
            if piece:
                return piece

    def _close_sdk(self) -> None:
        sdk, self._sdk = self._sdk, None
        if sdk is not None:
            sdk.close()

    def close(self) -> None:
        """Stop reading; an unfinished reply is abandoned (``complete`` False)."""
        self._state.finish("abandoned")
        self._close_sdk()

    def __enter__(self) -> ReplyStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Release the connection of a stream that was dropped without close().
        with contextlib.suppress(Exception):  # nothing useful to do while collecting garbage
            self._close_sdk()


# --- async -------------------------------------------------------------------------------


class AsyncLLM:
    """The asyncio twin of :class:`LLM`, for ``openai.AsyncOpenAI`` clients."""

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        *,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen, so sharing it is safe
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._shared = _Shared(client, retry=retry, clock=clock, now=now, is_async=True)
        self._sleep = sleep

    @property
    def client(self) -> openai.AsyncOpenAI:
        """The client in use (SDK retries off)."""
        return self._shared.client  # type: ignore[no-any-return]

    @property
    def retry(self) -> RetryPolicy:
        return self._shared.retry

    async def complete(
        self,
        *,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        **params: Any,
    ) -> Completion:
        """One whole reply. Raises a ModelError subclass once retries are spent."""
        request = _request(model, messages, tools, params)
        shared = self._shared
        attempts = shared.attempts()
        result: Completion | None = None
        async for attempt in tenacity.AsyncRetrying(sleep=self._sleep, **attempts.controls()):
            with attempt:
                timeout = _timeout(shared.client, attempts.begin(model))
                request_id = None
                body = bytearray()
                try:
                    async with shared.client.chat.completions.with_streaming_response.create(
                        **request, timeout=timeout
                    ) as response:
                        request_id = response.headers.get("x-request-id")
                        async for part in response.iter_bytes():
                            body += part
                            shared.check_deadline(attempts, model, request_id)
                except Exception as exc:
                    raise shared.mapped(exc, attempts, model, request_id) from exc
                result = shared.whole(bytes(body), request_id, attempts, model)
        assert result is not None
        return result

    def stream(
        self,
        *,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        **params: Any,
    ) -> AsyncReplyStream:
        """A streamed reply; parameters are checked now, the request is made on first read."""
        return AsyncReplyStream(self, _request(model, messages, tools, params))


class AsyncReplyStream:
    """The async twin of :class:`ReplyStream`: ``async for``, ``async with``, ``aclose()``.

    Asking for ``.completion`` early marks the reply abandoned but can't close
    the connection from a property; ``async with`` (or ``await aclose()``) does.
    """

    def __init__(self, llm: AsyncLLM, request: dict[str, Any]) -> None:
        self._state = _StreamState(llm._shared, request)
        self._sleep = llm._sleep
        self._sdk: Any = None
        self._pending: str | None = None

    @property
    def partial_text(self) -> str:
        return self._state.assembler.text

    @property
    def completion(self) -> Completion | None:
        """The assembled reply (None when no reply began); asking early abandons it."""
        return self._state.completion()

    def __aiter__(self) -> AsyncReplyStream:
        return self

    async def start(self) -> None:
        """Connect now, retrying as needed, rather than on the first read (see ReplyStream)."""
        state = self._state
        if not (state.started or state.finished):
            self._pending = await self._guarded(self._first)

    async def __anext__(self) -> str:
        state = self._state
        if not (state.started or state.finished):
            await self.start()
        if state.finished:
            raise StopAsyncIteration
        pending, self._pending = self._pending, None
        if pending is not None:
            return pending
        piece = await self._guarded(self._read)
        if piece is None:
            raise StopAsyncIteration
        return piece

    async def _guarded(self, read: Callable[[], Awaitable[str | None]]) -> str | None:
        state = self._state
        try:
            piece = await read()
        except BaseException as exc:
            state.stopped_by(exc)
            await self._close_sdk()
            raise
        state.started = True
        if piece is None:
            await self._close_sdk()
        return piece

    async def _first(self) -> str | None:
        state = self._state
        state.attempts = state.shared.attempts()
        piece: str | None = None
        async for attempt in tenacity.AsyncRetrying(sleep=self._sleep, **state.attempts.controls()):
            with attempt:
                await self._close_sdk()
                timeout = state.begin()
                try:
                    self._sdk = await state.shared.client.chat.completions.create(
                        **state.request, timeout=timeout
                    )
                except Exception as exc:
                    raise state.error(exc) from exc
                state.opened(self._sdk)
                piece = await self._read()
        return piece

    async def _read(self) -> str | None:
        state = self._state
        while True:
            try:
                chunk = await self._sdk.__anext__()
            except StopAsyncIteration:
                state.ended()
                return None
            except Exception as exc:
                raise state.error(exc) from exc
            piece = state.feed(chunk)
            if piece:
                return piece

    async def _close_sdk(self) -> None:
        sdk, self._sdk = self._sdk, None
        if sdk is not None:
            await sdk.close()

    async def aclose(self) -> None:
        """Stop reading; an unfinished reply is abandoned (``complete`` False)."""
        self._state.finish("abandoned")
        await self._close_sdk()

    close = aclose

    async def __aenter__(self) -> AsyncReplyStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
