"""Model calls, blocking: :class:`LLM` and its :class:`ReplyStream`.

Only the I/O is here; what the async twin (:mod:`.aio`) shares with it, and
the rules for deadlines and stream retries, are in :mod:`._shared`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import openai
import tenacity

from conversation_memory.llm._shared import Shared, StreamState, attempt_timeout, build_request
from conversation_memory.llm.assembly import Completion
from conversation_memory.llm.retry import RetryPolicy

__all__ = ["LLM", "ReplyStream"]


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
        self._shared = Shared(client, retry=retry, clock=clock, now=now, is_async=False)
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
        request = build_request(model, messages, tools, params)
        shared = self._shared
        attempts = shared.attempts()
        result: Completion | None = None
        for attempt in tenacity.Retrying(sleep=self._sleep, **attempts.controls()):
            with attempt:
                timeout = attempt_timeout(shared.client, attempts.begin(model))
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
        return ReplyStream(self, build_request(model, messages, tools, params))


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
        self._state = StreamState(llm._shared, request)
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
