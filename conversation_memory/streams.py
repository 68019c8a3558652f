"""Streamed turns: the pieces of a reply as they arrive, the turn stored once at the end.

:class:`TurnStream` (``Conversation.stream``) and :class:`AsyncTurnStream`
(``AsyncConversation.stream``) drive the same two flows of ``turns``:
``start_stream`` (the context and the started model stream) and, when the
stream ends for any reason, ``end_stream`` (the turn stored whole, incomplete,
or not at all per ``on_incomplete``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator
from contextlib import suppress
from types import TracebackType
from typing import TYPE_CHECKING, Any

from conversation_memory import turns
from conversation_memory.steps import Flow
from conversation_memory.turns import Called, Reply

if TYPE_CHECKING:
    from conversation_memory.aio import AsyncConversation
    from conversation_memory.engine import Conversation
    from conversation_memory.llm import AsyncReplyStream


class TurnStream:
    """The pieces of a streamed reply; the turn is stored once, when it ends.

    Iterate it for text pieces; use it as a context manager (or call
    ``close()``) to end it early. ``reply`` is set once it has ended.
    """

    def __init__(self, conversation: Conversation, called: Called, *, on_incomplete: str) -> None:
        self._conversation = conversation
        self._called = called
        self._inner = called.result
        self._on_incomplete = on_incomplete
        self._iterator: Iterator[str] = iter(self._inner)
        self.reply: Reply | None = None
        self._done = False

    @property
    def fold_wanted(self) -> bool:
        """Whether the turn's context asked for compaction afterwards."""
        return self._called.fold_wanted

    def __iter__(self) -> TurnStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._iterator)
        except BaseException:
            self._finish()
            raise

    def close(self) -> None:
        if self._done:
            return
        try:
            self._inner.close()
        finally:
            self._finish()

    def __enter__(self) -> TurnStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            with suppress(Exception):  # nobody to report to during garbage collection
                self.close()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        conversation = self._conversation
        flow = turns.end_stream(
            conversation._setup, self._called, on_incomplete=self._on_incomplete
        )
        self.reply = conversation._run(flow)


class AsyncTurnStream:
    """The pieces of a streamed reply; the turn is stored once, when it ends.

    Read it with ``async for``; end it early with ``async with`` (or
    ``await stream.aclose()``). The request is made on the first read, on
    entering ``async with``, or on ``await stream`` (which returns the
    stream). Errors that come before the reply begins (context length,
    authentication, spent retries, an invalid message) are raised there, and
    nothing is stored.

    Leaving an ``async for`` early (``break``, an exception) abandons the
    reply, like leaving a ``with`` block or calling ``aclose()``: the reply so
    far is stored as incomplete (``on_incomplete="store"``) or not at all
    (``"drop"``). ``async with`` or ``aclose()`` stores it before they
    return. A loop left without them has it stored when asyncio finalizes the
    loop's iterator. A stream closed before it connected sent nothing and
    stores nothing. ``reply`` is set once the turn is stored.
    """

    def __init__(
        self, conversation: AsyncConversation, flow: Flow[Called], *, on_incomplete: str
    ) -> None:
        self._conversation = conversation
        self._flow: Flow[Called] | None = flow
        self._on_incomplete = on_incomplete
        self._called: Called | None = None
        self._inner: AsyncReplyStream | None = None
        self._done = False
        self.reply: Reply | None = None

    @property
    def partial_text(self) -> str:
        """The text received so far."""
        return self._inner.partial_text if self._inner is not None else ""

    async def start(self) -> None:
        """Build the context and connect now, rather than on the first read."""
        flow, self._flow = self._flow, None
        if flow is None:
            return
        try:
            self._called = await self._conversation._run(flow)
        except BaseException:
            self._done = True  # no reply began: nothing to store
            raise
        self._inner = self._called.result

    def __await__(self) -> Generator[Any, None, AsyncTurnStream]:
        return self._connected().__await__()

    async def _connected(self) -> AsyncTurnStream:
        await self.start()
        return self

    def __aiter__(self) -> AsyncIterator[str]:
        # An async generator, so that a loop left early is finalized by asyncio,
        # and with it the stream: the reply is abandoned (as ReplyStream.__iter__ does).
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[str]:
        try:
            while True:
                try:
                    piece = await self.__anext__()
                except StopAsyncIteration:
                    return
                yield piece
        finally:
            await self.aclose()

    async def __anext__(self) -> str:
        """The next piece; reading it directly (not in ``async for``) never abandons."""
        if self._done:
            raise StopAsyncIteration
        await self.start()
        assert self._inner is not None
        try:
            return await self._inner.__anext__()
        except BaseException:
            await self._finish()
            raise

    async def aclose(self) -> None:
        """Stop reading; an unfinished reply is stored incomplete (or dropped)."""
        if self._done:
            return
        if self._inner is None:  # never connected: nothing was sent
            self._flow = None
            self._done = True
            return
        try:
            await self._inner.aclose()
        finally:
            await self._finish()

    async def __aenter__(self) -> AsyncTurnStream:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        assert self._called is not None
        conversation = self._conversation
        flow = turns.end_stream(
            conversation._setup, self._called, on_incomplete=self._on_incomplete
        )
        self.reply = await conversation._run(flow)


__all__ = ["AsyncTurnStream", "TurnStream"]
