"""AsyncMemory and AsyncConversation: the asyncio shell over the same engine.

The async API behaves exactly like :class:`~conversation_memory.Memory` and
:class:`~conversation_memory.Conversation`, and shares their code instead of
copying it:

- **The store stays sync.** SQLite and PostgreSQL are reached through their
  sync drivers. A database step is a few fixed statements (about 0.5 ms), so
  each one runs in a worker thread (``asyncio.to_thread``) and the event loop
  never waits on the database. An :class:`AsyncMemory` wraps a ``Memory`` and
  an :class:`AsyncConversation` wraps a ``Conversation``: every method that
  makes no model call is the sync method, awaited in a thread.
- **Model calls are async.** ``send`` and ``stream`` call the model through
  :class:`~conversation_memory.llm.AsyncLLM` (``client=`` an ``AsyncOpenAI``,
  or one built from the environment and closed by ``aclose()``), and reuse
  the non-I/O pieces of :mod:`.chat`. A turn takes one thread hop to build its
  messages and context, then the model call, then one hop in which
  ``chat.finish_turn`` stores the turn and its usage in one transaction and
  feeds the calibration. On a context-length error the turn re-fits once from
  the server's numbers, as the sync turn does.
- **Compaction is the sync algorithm, with the summarizer on the loop.**
  After a turn, :func:`compaction.compact` itself (the lease, the fold point,
  the chunks, "extends the newest summary", hierarchical merges, failure
  rows) runs in a thread of the AsyncMemory's own small pool. A sync
  summarizer (such as ``RecordingSummarizer``) is called in that thread. An
  async one (``async def summarize``, like the default
  :class:`AsyncModelSummarizer` over the same ``AsyncOpenAI`` client) is run
  on the event loop by :class:`_OnLoop`, while that thread waits for it. The
  pool is separate from asyncio's default one, which ``to_thread`` and DNS
  lookups use. So a waiting compaction can neither starve nor deadlock the
  calls its own summary depends on. Keeping one algorithm means the async
  shell can't drift from the sync one. The wrapped ``Memory`` is opened with
  ``compaction="manual"``, so the sync turn code never compacts on its own;
  this module compacts after the turn when ``AsyncMemory(compaction="after")``.

A conversation object serves one task at a time, as a ``Conversation`` serves
one thread. Different conversations run concurrently (``asyncio.gather``),
their database steps in parallel worker threads.

Streams: ``conversation.stream(...)`` returns an :class:`AsyncTurnStream`.
It connects on the first read, on entering ``async with``, or on ``await``.
It stores the turn once, when the stream ends. A stream that ends without a
finish_reason, is left early, or is closed is stored as incomplete or not at
all (``on_incomplete``), never as complete.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import io
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from conversation_memory import chat, compaction
from conversation_memory.budget import Context
from conversation_memory.chat import Reply
from conversation_memory.compaction import Outcome
from conversation_memory.engine import (
    Conversation,
    Memory,
    UsageTotals,
    check_modes,
    llm_options,
)
from conversation_memory.errors import (
    ConfigurationError,
    ContextLengthExceeded,
    ConversationMemoryError,
    ModelError,
    SummarizationFailed,
)
from conversation_memory.store.values import ConversationInfo, Entry, StoredMessage
from conversation_memory.store.values import NewMessage as Pending
from conversation_memory.strategies import Strategy, Summarizing
from conversation_memory.summarize import (
    DEFAULT_PROMPT,
    ModelSummarizer,
    PromptTemplate,
    SummaryText,
)
from conversation_memory.types import Budget, Correction, Message, State

if TYPE_CHECKING:
    from conversation_memory.llm import AsyncLLM, AsyncReplyStream, Completion
    from conversation_memory.store.database import Database
    from conversation_memory.tokens import TokenCounter

__all__ = [
    "AsyncConversation",
    "AsyncMemory",
    "AsyncModelSummarizer",
    "AsyncSummarizer",
    "AsyncTurnStream",
]

T = TypeVar("T")


# --- summarizing -------------------------------------------------------------------------


class AsyncSummarizer(Protocol):
    """A summarizer whose ``summarize`` is a coroutine (sync :class:`Summarizer` s work too)."""

    async def summarize(
        self, previous: str | None, messages: Sequence[Message], *, max_tokens: int
    ) -> SummaryText:
        """A summary of ``previous`` (None at first) followed by ``messages``."""
        ...


class AsyncModelSummarizer:
    """:class:`~conversation_memory.ModelSummarizer`'s prompt, called through an AsyncLLM."""

    def __init__(
        self, llm: AsyncLLM, *, model: str, prompt: PromptTemplate = DEFAULT_PROMPT
    ) -> None:
        self.llm = llm
        self.model = model
        self.prompt = prompt
        self._prompting = ModelSummarizer(llm, model=model, prompt=prompt)

    async def summarize(
        self, previous: str | None, messages: Sequence[Message], *, max_tokens: int
    ) -> SummaryText:
        try:
            reply = await self.llm.complete(
                model=self.model,
                messages=self._prompting.messages(previous, messages, max_tokens=max_tokens),
                max_tokens=max_tokens,
                temperature=0,
            )
        except ModelError as exc:
            raise SummarizationFailed(f"the summarizer call failed: {exc}") from exc
        return self._prompting.summary_of(reply)


_LOOP_GONE = "the event loop closed before the summary was made; nothing was stored"
_LOOP_CHECK_SECONDS = 1.0
"""How often a compaction thread waiting for the loop checks that it still exists."""


class _OnLoop:
    """A sync summarizer facade for an async one: each call runs on the event loop.

    Only the compaction thread calls it (never the loop's own thread, which it
    would block); that thread waits while the loop makes the call.
    """

    def __init__(self, summarizer: AsyncSummarizer, loop: asyncio.AbstractEventLoop) -> None:
        self._summarizer = summarizer
        self._loop = loop

    def summarize(
        self, previous: str | None, messages: Sequence[Message], *, max_tokens: int
    ) -> SummaryText:
        call = self._summarizer.summarize(previous, messages, max_tokens=max_tokens)
        try:
            future = asyncio.run_coroutine_threadsafe(call, self._loop)
        except RuntimeError:  # the loop is closed
            call.close()
            raise SummarizationFailed(_LOOP_GONE) from None
        while True:
            try:
                return future.result(timeout=_LOOP_CHECK_SECONDS)
            except TimeoutError:
                # A loop stopped and closed mid-call never runs it: don't wait forever.
                if self._loop.is_closed():
                    future.cancel()
                    raise SummarizationFailed(_LOOP_GONE) from None


# --- turns -------------------------------------------------------------------------------


def _turn_context(
    conversation: Conversation,
    new: Any,
    tools: Sequence[Mapping[str, Any]] | None,
    params: Mapping[str, Any],
) -> tuple[list[Pending], Context, int]:
    """The turn's new messages (checked and counted) and the context around them."""
    pending = chat.turn_input(conversation, new)
    context, counted = chat.turn_context(conversation, pending, tools=tools, params=params)
    return pending, context, counted


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
        self,
        conversation: AsyncConversation,
        new: Any,
        call: Callable[[Context], Awaitable[AsyncReplyStream]],
        *,
        tools: Sequence[Mapping[str, Any]] | None,
        params: Mapping[str, Any],
        on_incomplete: str,
    ) -> None:
        self._conversation = conversation
        self._new = new
        self._call = call
        self._tools = tools
        self._params = params
        self._on_incomplete = on_incomplete
        self._inner: AsyncReplyStream | None = None
        self._pending: list[Pending] = []
        self._counted = 0
        self._fold_wanted = False
        self._started = False
        self._done = False
        self.reply: Reply | None = None

    @property
    def partial_text(self) -> str:
        """The text received so far."""
        return self._inner.partial_text if self._inner is not None else ""

    async def start(self) -> None:
        """Build the context and connect now, rather than on the first read."""
        if self._started:
            return
        self._started = True
        try:
            (
                self._pending,
                self._inner,
                self._counted,
                self._fold_wanted,
            ) = await self._conversation._call(
                self._new, tools=self._tools, params=self._params, call=self._call
            )
        except BaseException:
            self._done = True  # no reply began: nothing to store
            raise

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
        assert self._inner is not None
        completion = self._inner.completion
        if completion is None:
            return  # the call failed before anything arrived: nothing to store
        if completion.complete or self._on_incomplete == "store":
            self.reply = await self._conversation._finish(
                self._pending, completion, self._counted, self._fold_wanted
            )


# --- memory and conversations ------------------------------------------------------------


class AsyncMemory:
    """The asyncio twin of :class:`~conversation_memory.Memory` (same arguments).

    Opening the store does I/O, so it happens in ``async with
    AsyncMemory(...) as memory`` or ``memory = await AsyncMemory.open(...)``,
    not in the constructor (which only checks its arguments). ``client`` is an
    ``openai.AsyncOpenAI``; without one, it is built from ``OPENAI_API_KEY`` /
    ``OPENAI_BASE_URL`` on first use and closed by :meth:`aclose`. ``sleep``
    is an async sleep (for instant retry tests). ``summarizer`` may be sync or
    async; the default summarizes through the same async client.
    """

    def __init__(
        self,
        db: str | os.PathLike[str] | None = None,
        *,
        client: Any = None,
        model: str | None = None,
        strategy: Any = "truncate",
        summarizer: Any = None,
        summary_model: str | None = None,
        compaction: str = "after",
        on_incomplete: str = "store",
        retry: Any = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        upgrade: bool = False,
        create: bool = True,
        busy_timeout_ms: int = 30_000,
        env: Mapping[str, str] | None = None,
        echo: bool = False,
    ) -> None:
        check_modes(compaction=compaction, on_incomplete=on_incomplete)
        self._options: dict[str, Any] = {
            "db": db,
            "model": model,
            "strategy": strategy,
            "on_incomplete": on_incomplete,
            "upgrade": upgrade,
            "create": create,
            "busy_timeout_ms": busy_timeout_ms,
            "env": env,
            "echo": echo,
        }
        self.client = client
        self.summarizer = summarizer
        self.summary_model = summary_model
        self.compaction = compaction
        self.on_incomplete = on_incomplete
        self._retry = retry
        self._sleep = sleep
        self._env = env
        self._memory: Memory | None = None
        self._llm: AsyncLLM | None = None
        self._own_client: Any = None
        self._compactions: ThreadPoolExecutor | None = None
        self._closed = False

    @classmethod
    async def open(cls, db: str | os.PathLike[str] | None = None, **options: Any) -> AsyncMemory:
        """An open AsyncMemory: ``AsyncMemory(...)``, then the store opened in a thread."""
        memory = cls(db, **options)
        await memory._open()
        return memory

    async def _open(self) -> None:
        self._check_open(opening=True)
        if self._memory is None:
            # The sync turn code never compacts by itself: this shell does (see above).
            self._memory = await asyncio.to_thread(Memory, compaction="manual", **self._options)

    def _check_open(self, *, opening: bool = False) -> None:
        if self._closed:
            raise ConfigurationError("this AsyncMemory was closed; open a new one")
        if self._memory is None and not opening:
            raise ConfigurationError(
                "this AsyncMemory is not open: use `async with AsyncMemory(...) as memory` "
                "or `memory = await AsyncMemory.open(...)`"
            )

    @property
    def sync(self) -> Memory:
        """The wrapped sync :class:`Memory` (use it from a thread, not the event loop)."""
        self._check_open()
        assert self._memory is not None
        return self._memory

    @property
    def database(self) -> Database:
        return self.sync.database

    @property
    def model(self) -> str:
        return self.sync.model

    @property
    def strategy(self) -> Strategy:
        return self.sync.strategy

    @property
    def llm(self) -> AsyncLLM:
        """The retrying async model client (built on first use from ``client`` or the env)."""
        if self._llm is None:
            self._check_open(opening=True)
            from conversation_memory.llm import AsyncLLM, async_client_from_env

            client = self.client
            if client is None:
                client = self._own_client = async_client_from_env(self._env)
            self._llm = AsyncLLM(client, **llm_options(self._retry, self._sleep))
        return self._llm

    def summarizer_for(self, conversation: AsyncConversation) -> tuple[Any, str]:
        """The summarizer to use, and the model name recorded with its summaries."""
        model = self.summary_model or conversation.model
        if self.summarizer is not None:
            return self.summarizer, getattr(self.summarizer, "model", model)
        return AsyncModelSummarizer(self.llm, model=model), model

    async def _compact(self, conversation: AsyncConversation) -> Outcome:
        """Run :func:`compaction.compact` in the compaction pool (see the module docstring)."""
        summarizer, model = self.summarizer_for(conversation)
        self._check_open()
        loop = asyncio.get_running_loop()
        if inspect.iscoroutinefunction(summarizer.summarize):
            summarizer = _OnLoop(summarizer, loop)
        if self._compactions is None:
            self._compactions = ThreadPoolExecutor(
                max_workers=_COMPACTION_THREADS, thread_name_prefix="convmem-compaction"
            )
        run = functools.partial(
            compaction.compact, conversation.sync, summarizer, summarizer_model=model
        )
        return await loop.run_in_executor(self._compactions, contextvars.copy_context().run, run)

    async def aclose(self) -> None:
        """Wait for running compactions, close the store, and the client built here.

        A client passed in as ``client=`` is the caller's to close.
        """
        self._closed = True
        pool, self._compactions = self._compactions, None
        memory, self._memory = self._memory, None
        client, self._own_client = self._own_client, None
        self._llm = None
        try:
            if pool is not None:
                await asyncio.to_thread(pool.shutdown)
            if memory is not None:
                await asyncio.to_thread(memory.close)
        finally:
            if client is not None:
                await client.close()

    async def __aenter__(self) -> AsyncMemory:
        await self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def conversation(
        self,
        id: str | None = None,
        *,
        user: str | None = None,
        system: str | None = None,
        model: str | None = None,
        strategy: Any = None,
        budget: int | None = None,
        reserve: int | None = None,
        title: str | None = None,
        lazy: bool = False,
    ) -> AsyncConversation:
        """Create a conversation (``id=None``) or resume one of this user's (see
        ``Memory.conversation``; ``lazy=True`` stores a new one with its first message)."""
        found = await asyncio.to_thread(
            self.sync.conversation,
            id,
            user=user,
            system=system,
            model=model,
            strategy=strategy,
            budget=budget,
            reserve=reserve,
            title=title,
            lazy=lazy,
        )
        return AsyncConversation(self, found)

    async def conversations(
        self, *, user: str | None = None, all_users: bool = False, limit: int | None = None
    ) -> list[ConversationInfo]:
        """This user's conversations (or everyone's), newest activity first."""
        return await asyncio.to_thread(
            self.sync.conversations, user=user, all_users=all_users, limit=limit
        )

    async def erase_user(self, user: str) -> int:
        """Delete every conversation, message, summary and usage row of ``user``."""
        return await asyncio.to_thread(self.sync.erase_user, user)

    async def import_conversation(
        self, data: str | bytes | io.IOBase, *, user: str | None = None, new_id: bool = False
    ) -> AsyncConversation:
        """Load a conversation written by ``export()`` (see ``Memory.import_conversation``)."""
        found = await asyncio.to_thread(
            self.sync.import_conversation, data, user=user, new_id=new_id
        )
        return AsyncConversation(self, found)


_COMPACTION_THREADS = 4
"""Compactions running at once per AsyncMemory; more wait their turn."""


class AsyncConversation:
    """The asyncio twin of :class:`~conversation_memory.Conversation`."""

    def __init__(self, memory: AsyncMemory, conversation: Conversation) -> None:
        self._memory = memory
        self._conversation = conversation

    def __repr__(self) -> str:
        return f"<AsyncConversation {self.id} user={self.user!r} model={self.model!r}>"

    async def _run(self, method: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """A sync method of the wrapped conversation, in a worker thread."""
        self._memory._check_open()
        return await asyncio.to_thread(method, *args, **kwargs)

    @property
    def sync(self) -> Conversation:
        """The wrapped sync :class:`Conversation` (use it from a thread, not the event loop)."""
        return self._conversation

    @property
    def id(self) -> str:
        return self._conversation.id

    @property
    def user(self) -> str:
        return self._conversation.user

    @property
    def title(self) -> str | None:
        return self._conversation.title

    @property
    def system(self) -> str | None:
        return self._conversation.system

    @property
    def model(self) -> str:
        return self._conversation.model

    @property
    def strategy(self) -> Strategy:
        return self._conversation.strategy

    @property
    def counter(self) -> TokenCounter:
        return self._conversation.counter

    def budget(
        self, *, tools: int = 0, correction: Correction | None = None, reserve: int | None = None
    ) -> Budget:
        """The prompt budget for the next request (pure: no I/O)."""
        return self._conversation.budget(tools=tools, correction=correction, reserve=reserve)

    # -- the store -------------------------------------------------------------------

    async def append(
        self,
        message: Mapping[str, Any],
        *,
        pinned: bool = False,
        metadata: Mapping[str, Any] | None = None,
        complete: bool = True,
    ) -> StoredMessage:
        """Store one OpenAI-format message at the end of the conversation."""
        return await self._run(
            self._conversation.append,
            message,
            pinned=pinned,
            metadata=metadata,
            complete=complete,
        )

    async def extend(self, messages: Sequence[Mapping[str, Any]]) -> list[StoredMessage]:
        """Append several messages in one transaction: all of them or none."""
        return await self._run(self._conversation.extend, messages)

    async def context(self, *, tools: Sequence[Mapping[str, Any]] | None = None) -> Context:
        """The exact messages the next request would send, with a token report."""
        return await self._run(self._conversation.context, tools=tools)

    async def state(self) -> State:
        """What the strategy sees for the next request."""
        return await self._run(self._conversation.state)

    async def history(self) -> list[dict[str, Any]]:
        """Every stored message, oldest first, as OpenAI-format dicts."""
        return await self._run(self._conversation.history)

    async def entries(self) -> list[Entry]:
        """Every stored message with its position, tokens, time, flags and metadata."""
        return await self._run(self._conversation.entries)

    async def usage(self) -> UsageTotals:
        """Tokens, calls, latency and estimated cost of every model call of this conversation."""
        return await self._run(self._conversation.usage)

    async def correction(self) -> Correction:
        """The calibrated correction for this conversation's model (identity if none)."""
        return await self._run(self._conversation.correction)

    async def calibrate(self, *, counted: int, reported: int) -> Correction:
        """Record what the server reported for a prompt we counted; return the new correction."""
        return await self._run(self._conversation.calibrate, counted=counted, reported=reported)

    async def fork(self, at: int | None = None, *, title: str | None = None) -> AsyncConversation:
        """A new conversation sharing messages ``0..at`` (default: all) with this one."""
        child = await self._run(self._conversation.fork, at, title=title)
        return AsyncConversation(self._memory, child)

    async def delete(self) -> None:
        """Delete this conversation with its summaries and usage; forks keep their messages."""
        await self._run(self._conversation.delete)

    async def export(self) -> str:
        """JSONL, as ``Conversation.export()`` writes it."""
        return await self._run(self._conversation.export)

    # -- bring your own client -------------------------------------------------------

    async def prepare(
        self,
        message: Any = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        max_tokens: int | None = None,
    ) -> list[dict[str, Any]]:
        """The exact messages to send with your own client (``message`` is not stored yet)."""
        return await self._run(
            self._conversation.prepare, message, tools=tools, max_tokens=max_tokens
        )

    async def record(self, reply: Any) -> Reply:
        """Store the reply to the last :meth:`prepare` (a ChatCompletion, its dict, or text)."""
        prepared = self._conversation._prepared
        stored = await self._run(self._conversation.record, reply)
        await self._after_turn(prepared is not None and prepared.context.fold_through is not None)
        return stored

    # -- talking to the model --------------------------------------------------------

    async def send(
        self, message: Any, *, tools: Sequence[Mapping[str, Any]] | None = None, **params: Any
    ) -> Reply:
        """Send with the budgeted context; store the turn (see ``Conversation.send``)."""
        from conversation_memory.llm import check_params, check_tools

        conversation = self._conversation
        llm = self._memory.llm
        checked = check_params(params, model=conversation.model)
        tool_list = check_tools(tools) if tools else None

        async def call(context: Context) -> Completion:
            return await llm.complete(
                model=conversation.model, messages=context.messages, tools=tool_list, **checked
            )

        pending, completion, counted, fold_wanted = await self._call(
            message, tools=tool_list, params=checked, call=call
        )
        return await self._finish(pending, completion, counted, fold_wanted)

    def stream(
        self,
        message: Any,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        on_incomplete: str | None = None,
        **params: Any,
    ) -> AsyncTurnStream:
        """Like :meth:`send`, yielding text pieces as they arrive; stored once at the end.

        Parameters are checked now; the request is made when the stream is
        first read, entered, or awaited.
        """
        from conversation_memory.llm import check_params, check_tools

        conversation = self._conversation
        llm = self._memory.llm
        mode = chat.incomplete_mode(on_incomplete or self._memory.on_incomplete)
        checked = check_params(params, model=conversation.model)
        tool_list = check_tools(tools) if tools else None

        async def call(context: Context) -> AsyncReplyStream:
            inner = llm.stream(
                model=conversation.model, messages=context.messages, tools=tool_list, **checked
            )
            await inner.start()  # connects (with retries) so a context-length error surfaces here
            return inner

        return AsyncTurnStream(
            self, message, call, tools=tool_list, params=checked, on_incomplete=mode
        )

    async def compact(self) -> Outcome:
        """Fold old messages into a summary now, if the strategy asks for it."""
        return await self._memory._compact(self)

    async def _call(
        self,
        new: Any,
        *,
        tools: Sequence[Mapping[str, Any]] | None,
        params: Mapping[str, Any],
        call: Callable[[Context], Awaitable[T]],
    ) -> tuple[list[Pending], T, int, bool]:
        """Build the turn's context and call the model; re-fit once on a context-length error.

        Returns the new messages, the call's result, our count of the prompt,
        and whether the context asked for compaction afterwards.
        """
        conversation = self._conversation
        if self._memory.compaction == "before":
            await self._compact_quietly()
        pending, context, counted = await self._run(_turn_context, conversation, new, tools, params)
        try:
            return pending, await call(context), counted, context.fold_through is not None
        except ContextLengthExceeded as exc:
            correction = chat.refit_correction(conversation, exc, context, counted, tools)
            if correction is None:
                raise
            context, counted = await self._run(
                chat.turn_context,
                conversation,
                pending,
                tools=tools,
                params=params,
                correction=correction,
            )
            return pending, await call(context), counted, context.fold_through is not None

    async def _finish(
        self,
        pending: Sequence[Pending],
        completion: Completion,
        counted: int | None,
        fold_wanted: bool,
    ) -> Reply:
        """Store the turn (one transaction, with calibration) in a thread; then compact."""
        reply = await self._run(chat.finish_turn, self._conversation, pending, completion, counted)
        await self._after_turn(fold_wanted)
        return reply

    async def _after_turn(self, fold_wanted: bool) -> None:
        # As Conversation._after_turn (the wrapped Memory is "manual", so it is done here):
        # only when the turn's context asked for a fold, never failing the stored turn.
        if fold_wanted and self._memory.compaction == "after":
            await self._compact_quietly()

    async def _compact_quietly(self) -> None:
        if not isinstance(self.strategy, Summarizing):
            return
        try:
            await self.compact()
        except ConversationMemoryError as exc:  # e.g. no client to summarize with
            with suppress(ConversationMemoryError):
                await self._run(
                    compaction.record_failure,
                    self._conversation,
                    self._memory.summary_model or self.model,
                    str(exc),
                )
