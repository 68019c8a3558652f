"""Memory and Conversation: the sync drivers.

A :class:`Memory` is one open database. ``memory.conversation(...)`` creates or
resumes a :class:`Conversation`, scoped by user: another user's conversation
id behaves exactly like one that doesn't exist. A conversation created with
``lazy=True`` has no row until its first write, which inserts the row in the
same transaction as the first message, so an abandoned or failed start leaves
nothing behind.

Everything these classes decide without I/O lives in ``base`` (shared with
the async twins in ``aio``); a turn and a compaction are flows of steps
(``turns``, ``compaction``), which :meth:`Conversation._run` drives in the
calling thread: a log step is a transaction of the conversation log, a model
call goes through the retrying ``LLM``, a summarizer call through the
memory's summarizer. One append is one write transaction: the message is
checked and counted before it starts, so the write lock is held for a few
short statements, and a failure leaves nothing behind.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from conversation_memory.embeddings import Embedder, Embeddings
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
from conversation_memory.streams import TurnStream
from conversation_memory.summarize import Summarizer, SummaryText
from conversation_memory.turns import Reply
from conversation_memory.types import Correction, State, Summary
from conversation_memory.usage import Call, UsageTotals, call_of

if TYPE_CHECKING:
    import openai

    from conversation_memory.llm import LLM, Completion, ReplyStream, RetryPolicy
    from conversation_memory.store.log import ConversationLog

T = TypeVar("T")


class Memory(BaseMemory):
    """A conversation store on SQLite (default) or PostgreSQL.

    ``db`` is a file path, ``:memory:``, or a SQLAlchemy URL
    (``postgresql://user@host/dbname``); by default one file in the user data
    folder (``CONVMEM_DB`` overrides). A new database is created at the
    current schema; an older one raises :class:`SchemaOutdated` unless
    ``upgrade=True``. With ``create=False`` a database that does not exist
    yet (no file, or no tables of ours) raises :class:`StoreError` and
    nothing is created: what a tool that only reads wants. The models listed
    in the file ``CONVMEM_MODELS`` names are registered first (see
    :func:`~conversation_memory.load_models`). ``durability="normal"``
    (SQLite files) syncs the disk at checkpoints instead of every commit: a
    stored turn survives a crash of the process, not a power cut.
    ``embeddings`` (a model name or :class:`~conversation_memory.Embeddings`)
    embeds stored messages for semantic recall, in a background thread (see
    ``conversation_memory.embeddings``); it needs numpy.
    """

    def __init__(
        self,
        db: str | os.PathLike[str] | None = None,
        *,
        client: openai.OpenAI | None = None,
        model: str | None = None,
        strategy: StrategyLike = "truncate",
        summarizer: Summarizer | None = None,
        summary_model: str | None = None,
        compaction: str = "after",
        on_incomplete: str = "store",
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] | None = None,
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
        self._load_models()
        # Before the store is opened: a bad setting leaves no file behind.
        embeddings_client = self._embeddings_client_or_env() if self.embeddings else None
        self._store: Store = open_store(
            db,
            create=create,
            upgrade=upgrade,
            durability=durability,
            busy_timeout_ms=busy_timeout_ms,
            env=env,
            echo=echo,
        )
        self._llm: LLM | None = None
        self._embedder: Embedder | None = None
        if self.embeddings is not None:
            self._embedder = Embedder(
                self.embeddings,
                embeddings_client,
                self._store.vectors,
                inline=self._store.database.in_process,
            )

    @property
    def database(self) -> Database:
        """The open database (its SQLAlchemy engine is ``database.engine``): for
        inspection, tests and ``store.migrate``."""
        return self._store.database

    @property
    def llm(self) -> LLM:
        """The retrying model client (built on first use from ``client`` or the environment)."""
        if self._llm is None:
            from conversation_memory.llm import LLM, client_from_env

            client = self.client if self.client is not None else client_from_env(self._env)
            self._llm = LLM(client, **self._llm_options())
        return self._llm

    def _embeddings_client_or_env(self) -> openai.OpenAI:
        client = self._embeddings_client(is_async=False)
        if client is None:
            from conversation_memory.llm import client_from_env

            client = client_from_env(self._env)
        return client  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._embedder is not None:
            self._embedder.close()
        self._store.close()

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the steps of a flow that are not the log's -----------------------------------

    def _call(self, step: CallModel) -> Completion | ReplyStream:
        if step.stream:
            inner = self.llm.stream(
                model=step.model, messages=step.messages, tools=step.tools, **step.params
            )
            inner.start()  # connects (with retries) so a context-length error surfaces here
            return inner
        return self.llm.complete(
            model=step.model, messages=step.messages, tools=step.tools, **step.params
        )

    def _embed(self, step: Embed) -> bytes:
        assert self._embedder is not None  # a flow embeds only with embeddings
        return self._embedder.embed_question(step.text)

    def _summarize(self, setup: Setup, step: Summarize) -> SummaryText:
        summarizer = self.summarizer
        if summarizer is None:
            from conversation_memory.summarize import ModelSummarizer

            summarizer = ModelSummarizer(self.llm, model=setup.summarizer_model)
        return summarizer.summarize(step.previous, step.messages, max_tokens=step.max_tokens)

    # -- conversations ----------------------------------------------------------------

    def conversation(
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
    ) -> Conversation:
        """Create a conversation (``id=None``) or resume one of this user's.

        ``lazy=True`` stores a new conversation with its first message (or
        turn) instead of now: until then it reads as empty, is not listed,
        and its id is not found elsewhere. A chat front end wants that: a
        first call that fails, or a user who says nothing, leaves no empty
        conversation behind. Create it eagerly (the default) to hand its id
        to other processes before anything is said.

        ``key`` is the application's own name for the conversation (a chat
        id such as ``"telegram:12345"``; at most 255 characters, no control
        characters), unique per user: the user's conversation with that key
        is resumed, or created if there is none (``create=False``: raise
        :class:`ConversationNotFound` instead). Creation is atomic: processes
        racing on one new key end with one conversation. A resumed one takes
        the settings given as resuming by id does; with ``lazy=True`` a new one
        is stored with its first turn. Give ``id`` or ``key``, not both.
        """
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
                request, self._store.catalogue.by_key(request.user, request.key)
            )
            if new and not lazy:
                stored = self._store.catalogue.create_keyed(row)
                if stored.id != row.id:  # another process created it first
                    row, setup = stored, self._resumed(request, stored)
            return self._open(row, setup, unsaved=new and lazy)
        if request.id is not None:
            row = self._store.catalogue.get(request.id, request.user)
            return self._open(row, self._resumed(request, row))  # type: ignore[arg-type]
        row, setup = self._created(request)
        if not lazy:
            self._store.catalogue.create(row)
        # Lazy: the first turn's own transaction inserts the row (ConversationLog.commit).
        return self._open(row, setup, unsaved=lazy)

    def _open(self, row: ConversationRow, setup: Setup, *, unsaved: bool = False) -> Conversation:
        return Conversation(
            self, row, setup, self._store.log(row, model=setup.model, unsaved=unsaved)
        )

    def conversations(
        self, *, user: str | None = None, all_users: bool = False, limit: int | None = None
    ) -> list[ConversationInfo]:
        """This user's conversations (or everyone's), newest activity first."""
        user_id = self._listing_user(user, all_users)
        if limit is not None:
            check_positive("limit", limit)
        return self._store.catalogue.list(user_id, limit=limit)

    def count(self, *, user: str | None = None, all_users: bool = False) -> int:
        """How many conversations this user (or everyone) has."""
        return self._store.catalogue.count(self._listing_user(user, all_users))

    def find(self, ref: str, *, user: str | None = None) -> ConversationInfo:
        """The conversation ``ref`` names: an id, a key, a title, or a unique id prefix.

        An exact id wins over a key, a key over a title, and a title over a
        prefix; a title shared by several conversations means the most recently
        active one. A prefix that several ids start with, or a key several
        users gave (with ``user=None``), raises ``AmbiguousReference`` listing them.
        ``user=None`` looks across every user (what a command-line tool on its
        own database wants).
        """
        user_id = self._reference(ref, user)
        kind, rows = self._store.catalogue.find(ref, user_id, limit=AMBIGUOUS_LISTED + 1)
        return self._found(ref, user_id, kind, rows)

    def search(
        self, text: str, *, user: str | None = None, all_users: bool = False, limit: int = 10
    ) -> list[SearchHit]:
        """The stored messages that best match ``text``, across a user's conversations.

        ``user`` is whose conversations are searched, as in :meth:`conversations`:
        None is the default user (the one ``conversation()`` stores under
        without ``user=``); ``all_users=True`` searches everyone's (and is refused
        together with ``user``). An unknown user has no hits. A message a fork
        shares with its parent is stored once and found once, under the parent.

        ``text`` is words, not a query language: each word is matched as written
        (any case; quotes, ``*``, ``-``, ``OR``, ``NEAR``, ``name:`` are just
        characters). A message matches when it holds any of the words; those
        holding more of them, and rarer ones, come first (equal scores: newest
        first). Text without a word (empty, blank, only punctuation) finds
        nothing. At most ``limit`` hits, 1 to 1,000, best first; README
        "Searching the archive" has the details.
        """
        user_id = self._search_user(text, user, all_users, limit)
        return self._store.catalogue.search(text, user=user_id, limit=limit)

    def erase_user(self, user: str) -> int:
        """Delete every conversation, message, summary and usage row of ``user``."""
        user_id = check_user(user)
        erased = self._store.catalogue.erase_user(user_id)
        if not erased:
            raise UserNotFound(f"no data is stored for user {user_id!r}", user=user_id)
        return erased

    def import_conversation(
        self,
        data: str | bytes | io.IOBase | Parsed,
        *,
        user: str | None = None,
        new_id: bool = False,
    ) -> Conversation:
        """Load a conversation written by ``Conversation.export()``.

        The conversation keeps its id (``new_id=True`` draws a fresh one) and
        its owner unless ``user`` is given. Nothing is written unless every
        line is valid. ``data`` may also be what ``export.read_export`` made of
        it (to check a file before opening, and so creating, a database).
        """
        row, rows = self._imported(data, user=user, new_id=new_id)
        stored = self._store.catalogue.import_(row, rows)
        conversation = self._open(stored, self._setup(stored))
        conversation._stored()
        return conversation


class Conversation(BaseConversation):
    """One conversation: append messages, build the context to send, talk to the model,
    fork, export."""

    def __init__(
        self, memory: Memory, row: ConversationRow, setup: Setup, log: ConversationLog
    ) -> None:
        super().__init__(row, setup, log)
        self._memory = memory

    def _run(self, flow: Flow[T], *, stores: bool = True) -> T:
        """Drive ``flow`` to its end in this thread (see ``steps``). ``stores``: the flow
        may store messages (then they are handed to the embedder)."""
        memory, log, setup = self._memory, self._log, self._setup
        value: Any = None
        failed = False
        while True:
            try:
                step = flow.throw(value) if failed else flow.send(value)
            except StopIteration as done:
                if stores:
                    self._stored()
                return done.value  # type: ignore[no-any-return]
            try:
                if isinstance(step, UseLog):
                    value = step.run(log)
                elif isinstance(step, CallModel):
                    value = memory._call(step)
                elif isinstance(step, Embed):
                    value = memory._embed(step)
                else:
                    value = memory._summarize(setup, step)
                failed = False
            except BaseException as exc:  # handed to the flow, which decides
                value, failed = exc, True

    # -- writing ---------------------------------------------------------------------

    def append(
        self,
        message: Mapping[str, Any],
        *,
        pinned: bool = False,
        metadata: Mapping[str, Any] | None = None,
        complete: bool = True,
    ) -> StoredMessage:
        """Store one OpenAI-format message at the end of the conversation."""
        pending = self._setup.message(message, pinned=pinned, metadata=metadata, complete=complete)
        stored = self._log.commit([pending]).stored[0]
        self._stored()
        return stored

    def extend(self, messages: Sequence[Mapping[str, Any]]) -> list[StoredMessage]:
        """Append several messages in one transaction: all of them or none."""
        stored = self._log.commit(self._messages(messages)).stored
        self._stored()
        return stored

    def _stored(self) -> None:
        """Something may have been stored: have it embedded, off this call's path."""
        embedder = self._memory._embedder
        if embedder is not None:
            embedder.stored(self._log)

    def embed_pending(self) -> int:
        """Embed every stored message of this conversation (shared history included)
        that lacks a vector; return how many were embedded.

        For batch jobs and tests: with ``Memory(embeddings=...)`` stored turns are
        embedded in the background anyway, and what a failed endpoint left out is
        taken up by the next run. Raises ``ConfigurationError`` without an
        ``embeddings`` setting, and the endpoint's ``ModelError`` when it fails
        (the batches stored before it stay stored).
        """
        embedder = self._memory._embedder
        if embedder is None:
            raise ConfigurationError(
                "this memory has no embeddings setting; open it with "
                "Memory(..., embeddings='<embedding model>')",
                argument="embeddings",
            )
        return embedder.embed_pending(self._log)

    # -- reading ---------------------------------------------------------------------

    def state(self) -> State:
        """What the strategy sees for the next request."""
        return self._run(read_state(self._setup), stores=False).state

    def context(self, *, tools: Sequence[Mapping[str, Any]] | None = None) -> Context:
        """The exact messages the next request would send, with a token report."""
        return self._run(turns.context(self._setup, (), tools=tools), stores=False).context

    def summary_cover(self) -> list[Summary]:
        """The stored summaries that together cover the summarized range, oldest first."""
        return self._log.summary_cover()

    def history(self) -> list[dict[str, Any]]:
        """Every stored message, oldest first, as OpenAI-format dicts."""
        return self._log.history()

    def entries(self) -> list[Entry]:
        """Every stored message with its position, tokens, time, flags and metadata."""
        return self._log.entries()

    def search(self, text: str, *, limit: int = 10) -> list[SearchHit]:
        """The stored messages of this conversation that best match ``text``, best first.

        A fork searches its own messages and the history it shares, up to the
        fork point; not what its parent said after it. Words match as in
        :meth:`Memory.search`.
        """
        check_search(text, limit)
        search = self._memory._store.catalogue.search_conversation
        return self._hits(search(self.id, text, user=self.user, limit=limit))

    def __len__(self) -> int:
        return self._log.length()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.history())

    def usage(self) -> UsageTotals:
        """Tokens, calls, latency and estimated cost of every model call of this conversation."""
        return UsageTotals.of(self.calls())

    def calls(self) -> list[Call]:
        """Every model call of this conversation (turns and summaries), oldest first."""
        return [call_of(record) for record in self._log.calls()]

    # -- talking to the model ----------------------------------------------------------

    def send(
        self, message: Any, *, tools: Sequence[Mapping[str, Any]] | None = None, **params: Any
    ) -> Reply:
        """Send text (or a message, or messages) with the budgeted context; store the turn.

        ``params`` are Chat Completions parameters (temperature, max_tokens,
        ...), checked before any request. The new message(s), the reply and
        its usage are stored together once the reply is in; a failed call
        stores nothing.
        """
        checked, tool_list = turns.checked(self._setup, params, tools)
        return self._run(turns.send(self._setup, message, tools=tool_list, params=checked))

    def stream(
        self,
        message: Any,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        on_incomplete: str | None = None,
        **params: Any,
    ) -> TurnStream:
        """Like :meth:`send`, yielding text pieces as they arrive; stored once at the end."""
        mode = self._incomplete(on_incomplete)
        checked, tool_list = turns.checked(self._setup, params, tools)
        called = self._run(
            turns.start_stream(self._setup, message, tools=tool_list, params=checked)
        )
        return TurnStream(self, called, on_incomplete=mode)

    def prepare(
        self,
        message: Any = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        max_tokens: int | None = None,
    ) -> list[dict[str, Any]]:
        """The exact messages to send with your own client (``message`` is not stored yet)."""
        flow = turns.prepare(self._setup, message, tools=tools, max_tokens=max_tokens)
        self._prepared = self._run(flow, stores=False)
        return self._prepared.context.messages

    def record(self, reply: Any) -> Reply:
        """Store the reply to the last :meth:`prepare` (a ChatCompletion, its dict, or text)."""
        stored = self._run(turns.record(self._setup, self._prepared, reply))
        self._prepared = None
        return stored

    def compact(self) -> compaction.Outcome:
        """Fold old messages into a summary now, if the strategy asks for it."""
        return self._run(compaction.compact(self._setup), stores=False)

    # -- calibration ---------------------------------------------------------------------

    def correction(self) -> Correction:
        """The calibrated correction for this conversation's model (the registry's
        initial one, identity for OpenAI models, until the server has reported counts)."""
        return self._setup.known(self._log.correction())

    def calibrate(self, *, counted: int, reported: int) -> Correction:
        """Record what the server reported for a prompt we counted; return the new correction.

        See :func:`~conversation_memory.calibration.next_correction` for the rule.
        """
        check_positive("counted", counted)
        check_positive("reported", reported)
        learn = calibration.told(self._setup.info.correction, counted, reported)
        learnt = self._log.commit([], learn=learn).calibration
        assert learnt is not None
        return learnt.correction

    # -- fork, delete, export ----------------------------------------------------------

    def fork(self, at: int | None = None, *, title: str | None = None) -> Conversation:
        """A new conversation sharing messages ``0..at`` (default: all) with this one.

        The shared messages are not copied; the fork points at this
        conversation and numbers its own messages from ``at + 1``.
        """
        child = self._log.fork(at, title=title)
        return self._memory._open(child, self._memory._setup(child))

    def delete(self) -> None:
        """Delete this conversation with its summaries and usage; forks keep their messages."""
        self._log.delete()

    def export(self) -> str:
        """JSONL: a header line with the conversation's metadata, then one message per line.

        Each message line is the OpenAI-format message plus a ``convmem``
        object (creation time, and pinned/complete/metadata when set).
        ``Memory.import_conversation`` reads it back; exporting again gives the
        same bytes. A fork is exported whole (shared messages included).
        """
        return write_export(*self._log.export())


__all__ = ["Conversation", "Memory"]
