"""Model calls, asyncio: :class:`AsyncLLM` and its :class:`AsyncReplyStream`.

The twin of :mod:`.sync`, for ``openai.AsyncOpenAI`` clients; only the I/O
differs, everything else is shared (:mod:`._shared`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import openai
import tenacity

from conversation_memory.llm._shared import Shared, StreamState, attempt_timeout, build_request
from conversation_memory.llm.assembly import Completion
from conversation_memory.llm.retry import RetryPolicy

__all__ = ["AsyncLLM", "AsyncReplyStream"]


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
        self._shared = Shared(client, retry=retry, clock=clock, now=now, is_async=True)
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
        request = build_request(model, messages, tools, params)
        shared = self._shared
        attempts = shared.attempts()
        result: Completion | None = None
        async for attempt in tenacity.AsyncRetrying(sleep=self._sleep, **attempts.controls()):
            with attempt:
                timeout = attempt_timeout(shared.client, attempts.begin(model))
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
        return AsyncReplyStream(self, build_request(model, messages, tools, params))


class AsyncReplyStream:
    """The async twin of :class:`ReplyStream`: ``async for``, ``async with``, ``aclose()``.

    Asking for ``.completion`` early marks the reply abandoned but can't close
    the connection from a property; ``async with`` (or ``await aclose()``) does.
    """

    def __init__(self, llm: AsyncLLM, request: dict[str, Any]) -> None:
        self._state = StreamState(llm._shared, request)
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
