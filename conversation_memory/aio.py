"""AsyncMemory and AsyncConversation: the asyncio drivers of the same turns.

The async API behaves exactly like :class:`~conversation_memory.Memory` and
:class:`~conversation_memory.Conversation`, and shares their code instead of
copying it: what needs no I/O is in ``base``, a turn and a compaction are the
same flows of steps (``turns``, ``compaction``), and only the driving differs
(:meth:`AsyncConversation._run`):

- **The store stays sync.** SQLite and PostgreSQL are reached through their
  sync drivers. A log step is one short transaction (about 0.5 ms), run in a
  worker thread (``asyncio.to_thread``) so the event loop never waits on the
  database. A turn takes two: the snapshot read and the commit.
- **Model calls are async.** A model call goes through
  :class:`~conversation_memory.llm.AsyncLLM` (``client=`` an ``AsyncOpenAI``,
  or one built from the environment and closed by :meth:`AsyncMemory.aclose`).
- **So is the summarizer.** An async summarizer (``async def summarize``,
  like the default :class:`~conversation_memory.summarize.AsyncModelSummarizer`
  over the same client) is awaited on the loop; a sync one (such as
  ``RecordingSummarizer``) runs in a worker thread. Compaction holds its lease
  meanwhile, renewed by a thread of the store's.

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
import inspect
import io
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from conversation_memory import calibration, compaction, turns
from conversation_memory.base import (
    AMBIGUOUS_LISTED,
    BaseConversation,
    BaseMemory,
    check_positive,
    check_search,
    check_user,
)
from conversation_memory.budget import Context
from conversation_memory.embeddings import AsyncEmbedder, Embeddings
from conversation_memory.errors import ConfigurationError, UserNotFound
from conversation_memory.export import Parsed, write_export
from conversation_memory.state import Setup, read_state
from conversation_memory.steps import CallModel, Embed, Flow, Summarize, UseLog
from conversation_memory.store.database import Database
from conversation_memory.store.opening import Store, open_store
from conversation_memory.store.values import (
    ConversationInfo,
    ConversationRow,
    Entry,
    SearchHit,
    StoredMessage,
)
from conversation_memory.strategies import StrategyLike
from conversation_memory.streams import AsyncTurnStream
from conversation_memory.summarize import AsyncSummarizer, Summarizer, SummaryText
from conversation_memory.turns import Reply
from conversation_memory.types import Correction, State, Summary
from conversation_memory.usage import Call, UsageTotals, call_of

if TYPE_CHECKING:
    import openai

    from conversation_memory.llm import AsyncLLM, AsyncReplyStream, Completion, RetryPolicy
    from conversation_memory.store.log import ConversationLog

__all__ = ["AsyncConversation", "AsyncMemory"]

T = TypeVar("T")


class AsyncMemory(BaseMemory):
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
        client: openai.AsyncOpenAI | None = None,
        model: str | None = None,
        strategy: StrategyLike = "truncate",
        summarizer: Summarizer | AsyncSummarizer | None = None,
        summary_model: str | None = None,
        compaction: str = "after",
        on_incomplete: str = "store",
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        upgrade: bool = False,
        create: bool = True,
        durability: str = "full",
        busy_timeout_ms: int = 30_000,
        env: Mapping[str, str] | None = None,
        echo: bool = False,
        embeddings: Embeddings | str | None = None,
    ) -> None:
        super().__init__(
            client=client,
            model=model,
            strategy=strategy,
            summarizer=summarizer,
            summary_model=summary_model,
            compaction=compaction,
            on_incomplete=on_incomplete,
            retry=retry,
            sleep=sleep,
            durability=durability,
            env=env,
            embeddings=embeddings,
        )
        self._db = db
        self._opening: dict[str, Any] = {
            "create": create,
            "upgrade": upgrade,
            "durability": durability,
            "busy_timeout_ms": busy_timeout_ms,
            "env": env,
            "echo": echo,
        }
        self._store: Store | None = None
        self._llm: AsyncLLM | None = None
        self._own_client: openai.AsyncOpenAI | None = None
        self._embedder: AsyncEmbedder | None = None
        self._own_embeddings_client: openai.AsyncOpenAI | None = None
        self._closed = False

    @classmethod
    async def open(cls, db: str | os.PathLike[str] | None = None, **options: Any) -> AsyncMemory:
        """An open AsyncMemory: ``AsyncMemory(...)``, then the store opened in a thread."""
        memory = cls(db, **options)
        await memory._open()
        return memory

    async def _open(self) -> None:
        self._check_open(opening=True)
        if self._store is None:
            # Before the store is opened: a bad setting leaves no file behind.
            client = self._embeddings_client_or_env() if self.embeddings else None
            self._store = store = await asyncio.to_thread(self._open_store)
            if self.embeddings is not None:
                self._embedder = AsyncEmbedder(
                    self.embeddings,
                    client,
                    store.vectors,
                    inline=store.database.in_process,
                    in_thread=self._in_thread,
                )

    def _embeddings_client_or_env(self) -> openai.AsyncOpenAI:
        client = self._embeddings_client(is_async=True)
        if client is None and self._own_embeddings_client is None:
            from conversation_memory.llm import async_client_from_env

            self._own_embeddings_client = async_client_from_env(self._env)
        return client or self._own_embeddings_client  # type: ignore[no-any-return]

    def _open_store(self) -> Store:
        self._load_models()
        return open_store(self._db, **self._opening)

    def _check_open(self, *, opening: bool = False) -> Store:
        if self._closed:
            raise ConfigurationError("this AsyncMemory was closed; open a new one")
        if self._store is None and not opening:
            raise ConfigurationError(
                "this AsyncMemory is not open: use `async with AsyncMemory(...) as memory` "
                "or `memory = await AsyncMemory.open(...)`"
            )
        return self._store  # type: ignore[return-value]

    async def _in_thread(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """A store call in a worker thread, once the store is known to be open."""
        self._check_open()
        return await asyncio.to_thread(function, *args, **kwargs)

    @property
    def database(self) -> Database:
        """The open database (its SQLAlchemy engine is ``database.engine``): for
        inspection, tests and ``store.migrate``."""
        return self._check_open().database

    @property
    def llm(self) -> AsyncLLM:
        """The retrying async model client (built on first use from ``client`` or the env)."""
        if self._llm is None:
            self._check_open(opening=True)
            from conversation_memory.llm import AsyncLLM, async_client_from_env

            client = self.client
            if client is None:
                client = self._own_client = async_client_from_env(self._env)
            self._llm = AsyncLLM(client, **self._llm_options())
        return self._llm

    async def aclose(self) -> None:
        """Close the store, and the client built here (a ``client=`` is the caller's)."""
        self._closed = True
        embedder, self._embedder = self._embedder, None
        if embedder is not None:
            await embedder.aclose()
        own, self._own_embeddings_client = self._own_embeddings_client, None
        if own is not None:
            await own.close()
        store, self._store = self._store, None
        client, self._own_client = self._own_client, None
        self._llm = None
        try:
            if store is not None:
                await asyncio.to_thread(store.close)
        finally:
            if client is not None:
                await client.close()

    async def close(self) -> None:
        """:meth:`aclose` (``Memory.close``'s name; ``contextlib.aclosing`` wants ``aclose``)."""
        await self.aclose()

    async def __aenter__(self) -> AsyncMemory:
        await self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the steps of a flow that are not the log's -----------------------------------

    async def _call(self, step: CallModel) -> Completion | AsyncReplyStream:
        if step.stream:
            inner = self.llm.stream(
                model=step.model, messages=step.messages, tools=step.tools, **step.params
            )
            await inner.start()  # connects (with retries) so a context-length error is here
            return inner
        return await self.llm.complete(
            model=step.model, messages=step.messages, tools=step.tools, **step.params
        )

    async def _embed(self, step: Embed) -> bytes:
        assert self._embedder is not None  # a flow embeds only with embeddings
        return await self._embedder.embed_question(step.text)

    async def _summarize(self, setup: Setup, step: Summarize) -> SummaryText:
        summarizer: Summarizer | AsyncSummarizer | None = self.summarizer
        if summarizer is None:
            from conversation_memory.summarize import AsyncModelSummarizer

            summarizer = AsyncModelSummarizer(self.llm, model=setup.summarizer_model)
        if inspect.iscoroutinefunction(summarizer.summarize):
            return await summarizer.summarize(  # type: ignore[no-any-return]
                step.previous, step.messages, max_tokens=step.max_tokens
            )
        return await asyncio.to_thread(  # type: ignore[no-any-return]
            summarizer.summarize, step.previous, step.messages, max_tokens=step.max_tokens
        )

    # -- conversations ----------------------------------------------------------------

    async def conversation(
        self,
        id: str | None = None,
        *,
        user: str | None = None,
        system: str | None = None,
        model: str | None = None,
        strategy: StrategyLike | None = None,
        budget: int | None = None,
        reserve: int | None = None,
        title: str | None = None,
        lazy: bool = False,
        key: str | None = None,
        create: bool = True,
    ) -> AsyncConversation:
        """Create a conversation (``id=None``) or resume one of this user's (see
        ``Memory.conversation``; ``lazy=True`` stores a new one with its first message,
        ``key=`` resumes or creates the user's conversation with that key)."""
        store = self._check_open()
        request = self._request(
            id,
            user=user,
            system=system,
            model=model,
            strategy=strategy,
            budget=budget,
            reserve=reserve,
            title=title,
            lazy=lazy,
            key=key,
            create=create,
        )
        if request.key is not None:
            row, setup, new = self._keyed(
                request, await self._in_thread(store.catalogue.by_key, request.user, request.key)
            )
            if new and not lazy:
                stored = await self._in_thread(store.catalogue.create_keyed, row)
                if stored.id != row.id:  # another process created it first
                    row, setup = stored, self._resumed(request, stored)
            return self._opened(row, setup, unsaved=new and lazy)
        if request.id is not None:
            row = await self._in_thread(store.catalogue.get, request.id, request.user)
            return self._opened(row, self._resumed(request, row))  # type: ignore[arg-type]
        row, setup = self._created(request)
        if not lazy:
            await self._in_thread(store.catalogue.create, row)
        return self._opened(row, setup, unsaved=lazy)

    def _opened(
        self, row: ConversationRow, setup: Setup, *, unsaved: bool = False
    ) -> AsyncConversation:
        log = self._check_open().log(row, model=setup.model, unsaved=unsaved)
        return AsyncConversation(self, row, setup, log)

    async def conversations(
        self, *, user: str | None = None, all_users: bool = False, limit: int | None = None
    ) -> list[ConversationInfo]:
        """This user's conversations (or everyone's), newest activity first."""
        user_id = self._listing_user(user, all_users)
        if limit is not None:
            check_positive("limit", limit)
        return await self._in_thread(self._check_open().catalogue.list, user_id, limit=limit)

    async def count(self, *, user: str | None = None, all_users: bool = False) -> int:
        """How many conversations this user (or everyone) has."""
        user_id = self._listing_user(user, all_users)
        return await self._in_thread(self._check_open().catalogue.count, user_id)

    async def find(self, ref: str, *, user: str | None = None) -> ConversationInfo:
        """The conversation ``ref`` names: an id, a key, a title, or a unique id prefix (see
        ``Memory.find``)."""
        user_id = self._reference(ref, user)
        kind, rows = await self._in_thread(
            self._check_open().catalogue.find, ref, user_id, limit=AMBIGUOUS_LISTED + 1
        )
        return self._found(ref, user_id, kind, rows)

    async def search(
        self, text: str, *, user: str | None = None, all_users: bool = False, limit: int = 10
    ) -> list[SearchHit]:
        """The stored messages that best match ``text``, across a user's conversations
        (see ``Memory.search``)."""
        user_id = self._search_user(text, user, all_users, limit)
        catalogue = self._check_open().catalogue
        return await self._in_thread(catalogue.search, text, user=user_id, limit=limit)

    async def erase_user(self, user: str) -> int:
        """Delete every conversation, message, summary and usage row of ``user``."""
        user_id = check_user(user)
        erased = await self._in_thread(self._check_open().catalogue.erase_user, user_id)
        if not erased:
            raise UserNotFound(f"no data is stored for user {user_id!r}", user=user_id)
        return erased

    async def import_conversation(
        self,
        data: str | bytes | io.IOBase | Parsed,
        *,
        user: str | None = None,
        new_id: bool = False,
    ) -> AsyncConversation:
        """Load a conversation written by ``export()`` (see ``Memory.import_conversation``)."""
        row, rows = self._imported(data, user=user, new_id=new_id)
        stored = await self._in_thread(self._check_open().catalogue.import_, row, rows)
        conversation = self._opened(stored, self._setup(stored))
        await conversation._stored()
        return conversation


class AsyncConversation(BaseConversation):
    """The asyncio twin of :class:`~conversation_memory.Conversation`."""

    def __init__(
        self, memory: AsyncMemory, row: ConversationRow, setup: Setup, log: ConversationLog
    ) -> None:
        super().__init__(row, setup, log)
        self._memory = memory

    async def _run(self, flow: Flow[T], *, stores: bool = True) -> T:
        """Drive ``flow`` to its end on the event loop (see ``steps``): log steps in a
        worker thread, model and async summarizer calls awaited here. ``stores``: the
        flow may store messages (then they are handed to the embedder)."""
        memory, log, setup = self._memory, self._log, self._setup
        value: Any = None
        failed = False
        while True:
            try:
                step = flow.throw(value) if failed else flow.send(value)
            except StopIteration as done:
                if stores:
                    await self._stored()
                return done.value  # type: ignore[no-any-return]
            try:
                if isinstance(step, UseLog):
                    value = await memory._in_thread(step.run, log)
                elif isinstance(step, CallModel):
                    value = await memory._call(step)
                elif isinstance(step, Embed):
                    value = await memory._embed(step)
                else:
                    value = await memory._summarize(setup, step)
                failed = False
            except BaseException as exc:  # handed to the flow, which decides
                value, failed = exc, True

    async def _store(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        return await self._memory._in_thread(function, *args, **kwargs)

    # -- writing ---------------------------------------------------------------------

    async def append(
        self,
        message: Mapping[str, Any],
        *,
        pinned: bool = False,
        metadata: Mapping[str, Any] | None = None,
        complete: bool = True,
    ) -> StoredMessage:
        """Store one OpenAI-format message at the end of the conversation."""
        pending = self._setup.message(message, pinned=pinned, metadata=metadata, complete=complete)
        stored = (await self._store(self._log.commit, [pending])).stored[0]
        await self._stored()
        return stored

    async def extend(self, messages: Sequence[Mapping[str, Any]]) -> list[StoredMessage]:
        """Append several messages in one transaction: all of them or none."""
        stored = (await self._store(self._log.commit, self._messages(messages))).stored
        await self._stored()
        return stored

    async def _stored(self) -> None:
        """Something may have been stored: have it embedded, off this call's path."""
        embedder = self._memory._embedder
        if embedder is not None:
            await embedder.stored(self._log)

    async def embed_pending(self) -> int:
        """Embed every stored message lacking a vector; how many (see ``Conversation``)."""
        embedder = self._memory._embedder
        if embedder is None:
            raise ConfigurationError(
                "this memory has no embeddings setting; open it with "
                "AsyncMemory(..., embeddings='<embedding model>')",
                argument="embeddings",
            )
        return await embedder.embed_pending(self._log)

    # -- reading ---------------------------------------------------------------------

    async def state(self) -> State:
        """What the strategy sees for the next request."""
        return (await self._run(read_state(self._setup), stores=False)).state

    async def context(self, *, tools: Sequence[Mapping[str, Any]] | None = None) -> Context:
        """The exact messages the next request would send, with a token report."""
        return (await self._run(turns.context(self._setup, (), tools=tools), stores=False)).context

    async def summary_cover(self) -> list[Summary]:
        """The stored summaries that together cover the summarized range, oldest first."""
        return await self._store(self._log.summary_cover)

    async def history(self) -> list[dict[str, Any]]:
        """Every stored message, oldest first, as OpenAI-format dicts."""
        return await self._store(self._log.history)

    async def entries(self) -> list[Entry]:
        """Every stored message with its position, tokens, time, flags and metadata."""
        return await self._store(self._log.entries)

    async def search(self, text: str, *, limit: int = 10) -> list[SearchHit]:
        """The stored messages of this conversation (and the history it shares) that
        best match ``text`` (see ``Conversation.search``)."""
        check_search(text, limit)
        search = self._memory._check_open().catalogue.search_conversation
        return self._hits(await self._store(search, self.id, text, user=self.user, limit=limit))

    async def usage(self) -> UsageTotals:
        """Tokens, calls, latency and estimated cost of every model call of this conversation."""
        return UsageTotals.of(await self.calls())

    async def calls(self) -> list[Call]:
        """Every model call of this conversation (turns and summaries), oldest first."""
        return [call_of(record) for record in await self._store(self._log.calls)]

    # -- talking to the model ----------------------------------------------------------

    async def send(
        self, message: Any, *, tools: Sequence[Mapping[str, Any]] | None = None, **params: Any
    ) -> Reply:
        """Send with the budgeted context; store the turn (see ``Conversation.send``)."""
        checked, tool_list = turns.checked(self._setup, params, tools)
        return await self._run(turns.send(self._setup, message, tools=tool_list, params=checked))

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
        mode = self._incomplete(on_incomplete)
        checked, tool_list = turns.checked(self._setup, params, tools)
        flow = turns.start_stream(self._setup, message, tools=tool_list, params=checked)
        return AsyncTurnStream(self, flow, on_incomplete=mode)

    async def prepare(
        self,
        message: Any = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        max_tokens: int | None = None,
    ) -> list[dict[str, Any]]:
        """The exact messages to send with your own client (``message`` is not stored yet)."""
        flow = turns.prepare(self._setup, message, tools=tools, max_tokens=max_tokens)
        self._prepared = await self._run(flow, stores=False)
        return self._prepared.context.messages

    async def record(self, reply: Any) -> Reply:
        """Store the reply to the last :meth:`prepare` (a ChatCompletion, its dict, or text)."""
        stored = await self._run(turns.record(self._setup, self._prepared, reply))
        self._prepared = None
        return stored

    async def compact(self) -> compaction.Outcome:
        """Fold old messages into a summary now, if the strategy asks for it."""
        return await self._run(compaction.compact(self._setup), stores=False)

    # -- calibration ---------------------------------------------------------------------

    async def correction(self) -> Correction:
        """The calibrated correction for this conversation's model (identity if none)."""
        return self._setup.known(await self._store(self._log.correction))

    async def calibrate(self, *, counted: int, reported: int) -> Correction:
        """Record what the server reported for a prompt we counted; return the new correction."""
        check_positive("counted", counted)
        check_positive("reported", reported)
        learn = calibration.told(self._setup.info.correction, counted, reported)
        learnt = (await self._store(self._log.commit, [], learn=learn)).calibration
        assert learnt is not None
        return learnt.correction

    # -- fork, delete, export ----------------------------------------------------------

    async def fork(self, at: int | None = None, *, title: str | None = None) -> AsyncConversation:
        """A new conversation sharing messages ``0..at`` (default: all) with this one."""
        child = await self._store(self._log.fork, at, title=title)
        return self._memory._opened(child, self._memory._setup(child))

    async def delete(self) -> None:
        """Delete this conversation with its summaries and usage; forks keep their messages."""
        await self._store(self._log.delete)

    async def export(self) -> str:
        """JSONL, as ``Conversation.export()`` writes it."""
        return write_export(*await self._store(self._log.export))
