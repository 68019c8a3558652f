"""Memory and Conversation: the thin layer that ties the store to the budget code.

A :class:`Memory` is one open database. ``memory.conversation(...)`` creates or
resumes a :class:`Conversation`, scoped by user: another user's conversation
id behaves exactly like one that doesn't exist. A conversation created with
``lazy=True`` has no row until its first write, which inserts the row in the
same transaction as the first message, so an abandoned or failed start leaves
nothing behind.

One append is one write transaction: the message is checked and its tokens
counted *before* the transaction starts (so the write lock is held for two
short statements), and a failure leaves nothing behind. Building the context
reads the conversation row, the newest summary, pinned messages and a tail
just long enough to cover the budget, then hands them to the pure strategy
and budget code.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from conversation_memory import _config, chat, compaction
from conversation_memory.budget import Context, budget_for
from conversation_memory.errors import (
    AmbiguousReference,
    BudgetExceeded,
    ConfigurationError,
    ConversationExists,
    ConversationMemoryError,
    ConversationNotFound,
    InvalidMessage,
    UserNotFound,
)
from conversation_memory.export import Parsed, read_export, write_export
from conversation_memory.messages import check_metadata, dumps, normalize, to_row
from conversation_memory.registry import ModelInfo, get_model, load_models
from conversation_memory.store import migrate, repository
from conversation_memory.store.database import (
    Database,
    Snapshot,
    create_sqlite_file,
    inspect_sqlite_file,
    make_engine,
    missing_database,
    parse_target,
)
from conversation_memory.store.schema import VERSION_TABLE
from conversation_memory.strategies import Strategy, Summarizing, as_strategy
from conversation_memory.tokens import REPLY_PRIMING, TokenCounter, counter_for
from conversation_memory.types import (
    MAX_FACTOR,
    MIN_FACTOR,
    Budget,
    Correction,
    Item,
    State,
    Summary,
)

DEFAULT_USER = "default"
COMPACTION_CHOICES = ("after", "before", "manual")
"""When to fold old turns into summaries: after each reply (off the response
path), before each request (so the request already carries the new summary),
or only when ``compact()`` is called."""

AMBIGUOUS_LISTED = 10
"""Candidates an ambiguous id prefix lists (``Memory.find``)."""


def _check_user(user: Any) -> str:
    if user is None:
        return DEFAULT_USER
    if not isinstance(user, str) or not user or len(user) > 255:
        raise ConfigurationError(
            f"user must be a non-empty string of at most 255 characters, got {user!r}"
        )
    if "\x00" in user:
        raise ConfigurationError("user must not contain NUL characters")
    return user


def _check_positive(name: str, value: Any, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigurationError(
            f"{name} must be an integer >= {low}, got {value!r}", argument=name
        )
    return value


@dataclass(frozen=True, slots=True)
class ConversationInfo:
    """One line of ``Memory.conversations()``."""

    id: str
    user: str
    title: str | None
    model: str
    message_count: int
    tokens: int
    created_at: datetime
    updated_at: datetime
    """Last activity."""
    forked_from: str | None


def _conversation_info(row: Any) -> ConversationInfo:
    """A row of ``repository.LISTING_COLUMNS``."""
    id_, user, title, model, count, tokens, created, updated, parent = row
    return ConversationInfo(
        id=id_,
        user=user,
        title=title,
        model=model,
        message_count=count,
        tokens=tokens,
        created_at=repository.aware(created),
        updated_at=repository.aware(updated),
        forked_from=parent,
    )


@dataclass(frozen=True, slots=True)
class Pending:
    """A checked, counted message waiting for its transaction."""

    row: dict[str, Any]
    message: dict[str, Any]
    pinned: bool = False
    complete: bool = True


USAGE_DEFAULTS: dict[str, Any] = {
    "kind": "chat",
    "model": "",
    "prompt_tokens": None,
    "completion_tokens": None,
    "counted_prompt_tokens": None,
    "latency_ms": None,
    "finish_reason": None,
    "request_id": None,
    "error": None,
}


def check_modes(*, compaction: Any, on_incomplete: Any) -> None:
    """Check the ``compaction`` and ``on_incomplete`` settings of a memory."""
    if compaction not in COMPACTION_CHOICES:
        raise ConfigurationError(
            f"compaction must be one of {COMPACTION_CHOICES}, got {compaction!r}",
            argument="compaction",
        )
    chat.incomplete_mode(on_incomplete)


def llm_options(retry: Any, sleep: Any) -> dict[str, Any]:
    """The retry policy and sleep a Memory was given, as LLM/AsyncLLM keywords."""
    options: dict[str, Any] = {}
    if retry is not None:
        options["retry"] = retry
    if sleep is not None:
        options["sleep"] = sleep
    return options


SPREAD = 2.0
"""How far apart the ratios (server's count to ours) of one conversation's prompts
plausibly lie. A correction more than this above an exact count is not a memory of
an earlier, denser prompt but stale or wrong, and the count replaces it."""


def next_correction(factor: float | None, counted: int, reported: int) -> tuple[float, int]:
    """The calibration after one observation: (factor, margin).

    The factor follows the observed ratio (an exponential average that never
    drops below the newest ratio, so one surprise is never averaged away); a
    server that disagrees with us at all also gets a margin. A factor more than
    :data:`SPREAD` times the observed ratio is replaced by it: one reply's exact
    count is enough to undo a wrong correction.
    """
    ratio = min(max(reported / counted, MIN_FACTOR), MAX_FACTOR)
    if factor is None or factor > SPREAD * ratio:
        new = ratio
    else:
        new = max(ratio, 0.7 * factor + 0.3 * ratio)
    exact = reported == counted and new == 1.0
    # The ratio differs between the messages of one prompt, so the margin grows
    # with the prompt: 16 tokens plus 2% of what the server counted.
    return new, 0 if exact else 16 + reported // 50


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """What a conversation's model calls cost so far."""

    calls: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    summary_calls: int
    latency_ms: float
    cost: float | None
    """Estimated USD from the registry's list prices (None if a model has no price)."""

    @classmethod
    def of(cls, calls: Sequence[Call]) -> UsageTotals:
        cost: float | None = 0.0
        for call in calls:
            cost = None if cost is None or call.cost is None else cost + call.cost
        return cls(
            calls=len(calls),
            failed=sum(call.error is not None for call in calls),
            prompt_tokens=sum(call.prompt_tokens for call in calls),
            completion_tokens=sum(call.completion_tokens for call in calls),
            summary_calls=sum(call.kind == "summary" for call in calls),
            latency_ms=sum(call.latency_ms or 0.0 for call in calls),
            cost=cost,
        )


@dataclass(frozen=True, slots=True)
class Call:
    """One model call of a conversation, as its usage row recorded it."""

    kind: str
    """``chat`` for a turn, ``summary`` for a compaction."""
    model: str
    position: int | None
    """Position of the reply it stored (chat calls that stored one)."""
    prompt_tokens: int
    """As the server reported it, else as we counted it."""
    completion_tokens: int
    latency_ms: float | None
    finish_reason: str | None
    error: str | None
    created_at: datetime
    cost: float | None
    """Estimated USD from the registry's list prices (None if the model has no price)."""


def _call(row: Any) -> Call:
    kind, model, position, prompt, completion, counted, ms, finish, error, when = row
    prompt_tokens = prompt if prompt is not None else (counted or 0)
    try:
        cost = get_model(model).cost(prompt_tokens, completion or 0)
    except ConfigurationError:
        cost = None
    return Call(
        kind=kind,
        model=model,
        position=position,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion or 0,
        latency_ms=ms,
        finish_reason=finish,
        error=error,
        created_at=repository.aware(when),
        cost=cost,
    )


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """What ``append`` stored: where, and how many tokens it counts for."""

    position: int
    tokens: int


class Memory:
    """A conversation store on SQLite (default) or PostgreSQL.

    ``db`` is a file path, ``:memory:``, or a SQLAlchemy URL
    (``postgresql://user@host/dbname``); by default one file in the user data
    folder (``CONVMEM_DB`` overrides). A new database is created at the
    current schema; an older one raises :class:`SchemaOutdated` unless
    ``upgrade=True``. With ``create=False`` a database that does not exist
    yet (no file, or no tables of ours) raises :class:`StoreError` and
    nothing is created: what a tool that only reads wants. The models listed
    in the file ``CONVMEM_MODELS`` names are registered first (see
    :func:`~conversation_memory.load_models`).
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
        sleep: Any = None,
        upgrade: bool = False,
        create: bool = True,
        busy_timeout_ms: int = 30_000,
        env: Mapping[str, str] | None = None,
        echo: bool = False,
    ) -> None:
        models = _config.models_file(env)
        if models is not None:
            load_models(models)  # before any file is created: a bad models file changes nothing
        target = parse_target(_config.default_db_path(env) if db is None else db)
        created = False
        found: Snapshot | None = None
        if target.path is not None:
            found = inspect_sqlite_file(target.path, VERSION_TABLE)
            created = found is None
            if created and not create:
                raise missing_database(target)
        self._db = Database(target, make_engine(target, busy_timeout_ms=busy_timeout_ms, echo=echo))
        try:
            with self._db.errors():
                if found is not None:
                    # Refuse a file that isn't ours before a connection rewrites it.
                    migrate.preflight(self._db, found, upgrade=upgrade)
                elif target.path is not None:
                    create_sqlite_file(target.path)
                migrate.ensure_schema(self._db, upgrade=upgrade, found=found, create=create)
        except BaseException:
            self._db.dispose()
            if created and target.path is not None:
                # Only a file this call created is removed; never a caller's.
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{target.path}{suffix}").unlink(missing_ok=True)
            raise
        check_modes(compaction=compaction, on_incomplete=on_incomplete)
        self.client = client
        self.model = model or _config.default_model(env)
        get_model(self.model)
        self.strategy = as_strategy(strategy)
        self.summarizer = summarizer
        self.summary_model = summary_model
        self.compaction = compaction
        self.on_incomplete = on_incomplete
        self._env = env
        self._retry = retry
        self._sleep = sleep
        self._llm: Any = None
        self._hot = repository.HotPath(self._db.dialect)

    @property
    def database(self) -> Database:
        return self._db

    @property
    def llm(self) -> Any:
        """The retrying model client (built on first use from ``client`` or the environment)."""
        if self._llm is None:
            from conversation_memory.llm import LLM, client_from_env

            client = self.client if self.client is not None else client_from_env(self._env)
            self._llm = LLM(client, **llm_options(self._retry, self._sleep))
        return self._llm

    def summarizer_for(self, conversation: Conversation) -> tuple[Any, str]:
        """The summarizer to use, and the model name recorded with its summaries."""
        model = self.summary_model or conversation.model
        if self.summarizer is not None:
            return self.summarizer, getattr(self.summarizer, "model", model)
        from conversation_memory.summarize import ModelSummarizer

        return ModelSummarizer(self.llm, model=model), model

    def close(self) -> None:
        self._db.dispose()

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- conversations ---------------------------------------------------------

    def conversation(
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
    ) -> Conversation:
        """Create a conversation (``id=None``) or resume one of this user's.

        ``lazy=True`` stores a new conversation with its first message (or
        turn) instead of now: until then it reads as empty, is not listed,
        and its id is not found elsewhere. A chat front end wants that: a
        first call that fails, or a user who says nothing, leaves no empty
        conversation behind. Create it eagerly (the default) to hand its id
        to other processes before anything is said.
        """
        user_id = _check_user(user)
        if not isinstance(lazy, bool):
            raise ConfigurationError(f"lazy must be True or False, got {lazy!r}")
        if budget is not None:
            _check_positive("budget", budget)
        if reserve is not None:
            _check_positive("reserve", reserve, allow_zero=True)
        if title is not None and not isinstance(title, str):
            raise ConfigurationError(f"title must be a string, got {type(title).__name__}")
        chosen = as_strategy(strategy) if strategy is not None else None
        if id is not None:
            if not isinstance(id, str):
                raise ConfigurationError(f"id must be a string, got {type(id).__name__}")
            if lazy:
                raise ConfigurationError(
                    "lazy=True is for a new conversation; an existing one is resumed by id"
                )
            with self._db.read() as conn:
                row = repository.get_conversation(conn, id, user_id)
            if row is None:
                raise ConversationNotFound(
                    f"no conversation {id!r} for user {user_id!r}; list them with "
                    "memory.conversations(user=...)",
                    conversation_id=id,
                    user=user_id,
                )
            conversation = Conversation(self, row, strategy=chosen)
            if system is not None and system != row.system:
                raise ConfigurationError(
                    f"conversation {id!r} already has a system prompt; fork it to start "
                    "from a different one",
                    conversation_id=id,
                )
            if model is not None and model != row.model:
                conversation._use_model(model)
            conversation._override(strategy=chosen, budget=budget, reserve=reserve)
            return conversation
        model_name = model or self.model
        get_model(model_name)
        counter = counter_for(model_name)
        system_tokens = 0
        if system is not None:
            normalize({"role": "system", "content": system})
            system_tokens = counter.count_message({"role": "system", "content": system})
        settings: dict[str, Any] = {"strategy": (chosen or self.strategy).name}
        if budget is not None:
            settings["budget"] = budget
        if reserve is not None:
            settings["reserve"] = reserve
        when = repository.now()
        row = repository.ConversationRow(
            id=uuid.uuid4().hex,
            user_id=user_id,
            title=title,
            model=model_name,
            system=system,
            system_tokens=system_tokens,
            counter=counter.name,
            settings=settings,
            created_at=when,
            updated_at=when,
            forked_from=None,
            fork_position=None,
            next_position=0,
            message_count=0,
            total_tokens=0,
        )
        if not lazy:
            with self._db.write() as conn:
                repository.insert_conversation(conn, {**asdict(row), "settings": dumps(settings)})
        # Lazy: the first turn's own transaction inserts the row (Conversation._commit).
        conversation = Conversation(self, row, strategy=chosen, unsaved=lazy)
        conversation._override(strategy=None, budget=None, reserve=None)
        return conversation

    def conversations(
        self, *, user: str | None = None, all_users: bool = False, limit: int | None = None
    ) -> list[ConversationInfo]:
        """This user's conversations (or everyone's), newest activity first."""
        user_id = None if all_users else _check_user(user)
        if limit is not None:
            _check_positive("limit", limit)
        with self._db.read() as conn:
            rows = repository.list_conversations(conn, user_id, limit=limit)
        return [_conversation_info(row) for row in rows]

    def count(self, *, user: str | None = None, all_users: bool = False) -> int:
        """How many conversations this user (or everyone) has."""
        user_id = None if all_users else _check_user(user)
        with self._db.read() as conn:
            return repository.count_conversations(conn, user_id)

    def find(self, ref: str, *, user: str | None = None) -> ConversationInfo:
        """The conversation ``ref`` names: an id, a title, or a unique id prefix.

        An exact id wins over a title, and a title over a prefix; a title shared
        by several conversations means the most recently active one. A prefix
        that several ids start with raises ``AmbiguousReference`` listing them.
        ``user=None`` looks across every user (what a command-line tool on its
        own database wants).
        """
        if not isinstance(ref, str) or not ref:
            raise ConfigurationError(f"a conversation id or title is needed, got {ref!r}")
        user_id = None if user is None else _check_user(user)
        with self._db.read() as conn:
            kind, rows = repository.find_conversations(
                conn, ref, user_id, limit=AMBIGUOUS_LISTED + 1
            )
        if not rows:
            whose = "" if user_id is None else f" of user {user_id!r}"
            raise ConversationNotFound(
                f"no conversation{whose} has the id, id prefix or title {ref!r}; "
                "`convmem sessions` lists them",
                conversation_id=ref,
                user=user_id,
            )
        if kind == "prefix" and len(rows) > 1:
            candidates = [_conversation_info(row) for row in rows[:AMBIGUOUS_LISTED]]
            width = 12  # what `convmem sessions` shows, longer only if that is not enough
            while len({c.id[:width] for c in candidates}) < len(candidates):
                width += 1
            listed = "; ".join(
                f"{c.id[:width]} {c.title or 'untitled'!r} (user {c.user})" for c in candidates
            )
            more = "; and more" if len(rows) > AMBIGUOUS_LISTED else ""
            raise AmbiguousReference(
                f"{ref!r} is the start of several conversation ids: {listed}{more}; "
                "give more of the id",
                conversation_id=ref,
                user=user_id,
                candidates=candidates,
            )
        return _conversation_info(rows[0])

    def erase_user(self, user: str) -> int:
        """Delete every conversation, message, summary and usage row of ``user``."""
        user_id = _check_user(user)
        with self._db.write() as conn:
            erased = repository.erase_user(conn, user_id)
        if not erased:
            raise UserNotFound(f"no data is stored for user {user_id!r}", user=user_id)
        return erased

    # -- import ----------------------------------------------------------------

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
        parsed = data if isinstance(data, Parsed) else read_export(data)
        header = parsed.header
        user_id = _check_user(user if user is not None else header.get("user"))
        conversation_id = uuid.uuid4().hex if new_id else header["id"]
        model_name = header.get("model") or self.model
        get_model(model_name)
        counter = counter_for(model_name)
        system = header.get("system")
        rows = [
            {
                "conversation_id": conversation_id,
                "position": position,
                **to_row(line.message),
                "tokens": counter.count_message(line.message),
                "created_at": line.created_at,
                "meta": line.metadata,
                "complete": line.complete,
                "pinned": line.pinned,
            }
            for position, line in enumerate(parsed.lines)
        ]
        settings = header.get("settings") or {}
        with self._db.write() as conn:
            if repository.conversation_exists(conn, conversation_id):
                raise ConversationExists(
                    f"conversation {conversation_id!r} already exists; delete it first, or "
                    "import a copy with a fresh id (new_id=True; `convmem import --new-id`)",
                    conversation_id=conversation_id,
                )
            repository.insert_conversation(
                conn,
                {
                    "id": conversation_id,
                    "user_id": user_id,
                    "title": header.get("title"),
                    "model": model_name,
                    "system": system,
                    "system_tokens": counter.count_message({"role": "system", "content": system})
                    if system is not None
                    else 0,
                    "counter": counter.name,
                    "settings": dumps(settings),
                    "created_at": parsed.created_at,
                    "updated_at": parsed.updated_at,
                    "next_position": len(rows),
                    "message_count": len(rows),
                    "total_tokens": sum(row["tokens"] for row in rows),
                },
            )
            if rows:
                repository.insert_messages(conn, rows)
            row = repository.get_conversation(conn, conversation_id, user_id)
        assert row is not None
        return Conversation(self, row)


class Conversation:
    """One conversation: append messages, build the context to send, fork, export."""

    def __init__(
        self,
        memory: Memory,
        row: repository.ConversationRow,
        *,
        strategy: Strategy | None = None,
        unsaved: bool = False,
    ) -> None:
        self._memory = memory
        self._db = memory.database
        self._row = row
        self.id = row.id
        self.user = row.user_id
        self.title = row.title
        self.system = row.system
        self.model = row.model
        self._info: ModelInfo = get_model(row.model)
        self._counter: TokenCounter = counter_for(row.model)
        self._strategy: Strategy = strategy or self._stored_strategy(row.settings.get("strategy"))
        self._budget_cap: int | None = row.settings.get("budget")
        self._reserve: int | None = row.settings.get("reserve")
        self._segments: tuple[tuple[str, int | None], list[repository.Segment]] | None = None
        self._plain_limit = self.budget().limit
        self._prepared: Any = None
        self._last_correction: Correction | None = None
        self._unsaved = unsaved
        """The row is still to be inserted, by the first write (see ``_commit``)."""
        self._unsaved_calibration: dict[str, Any] | None = None
        """A calibration learnt before the row existed; written with the first turn."""

    def _stored_strategy(self, name: str | None) -> Strategy:
        """The strategy saved at creation: a built-in by name, or the Memory's own."""
        default = self._memory.strategy
        if name is None or name == default.name:
            return default
        try:
            return as_strategy(name)
        except ConfigurationError:
            raise ConfigurationError(
                f"conversation {self.id!r} was created with strategy {name!r}, which is not "
                "built in; pass it again: memory.conversation(id, strategy=...)",
                conversation_id=self.id,
            ) from None

    def __repr__(self) -> str:
        return f"<Conversation {self.id} user={self.user!r} model={self.model!r}>"

    def _use_model(self, model: str) -> None:
        info = get_model(model)
        counter = counter_for(model)
        if counter.name != self._row.counter:
            raise ConfigurationError(
                f"conversation {self.id!r} counts tokens with {self._row.counter}, but "
                f"{model!r} uses {counter.name}; stored counts would be wrong. Fork it or "
                "start a new conversation for that model.",
                conversation_id=self.id,
                model=model,
            )
        self.model, self._info, self._counter = model, info, counter

    def _override(self, *, strategy: Strategy | None, budget: int | None, reserve: int | None):
        if strategy is not None:
            self._strategy = strategy
        if budget is not None:
            self._budget_cap = budget
        if reserve is not None:
            self._reserve = reserve
        # Fails now, not at the first turn, if they can't work; append checks
        # every message against this plain budget (no tools, no calibration).
        self._plain_limit = self.budget().limit

    @property
    def strategy(self) -> Strategy:
        return self._strategy

    @property
    def counter(self) -> TokenCounter:
        return self._counter

    def budget(
        self, *, tools: int = 0, correction: Correction | None = None, reserve: int | None = None
    ) -> Budget:
        """The prompt budget for the next request (``reserve``: this request's max_tokens)."""
        result = replace(
            budget_for(
                self.model,
                reserve=reserve if reserve is not None else self._reserve,
                tools=tools,
                cap=self._budget_cap,
            ),
            correction=correction or Correction(),
        )
        if result.limit <= REPLY_PRIMING:
            raise ConfigurationError(
                f"the prompt budget is {result.limit} tokens (window {result.window}, reply "
                f"reserve {result.reserve}, tools {tools}, cap {self._budget_cap}); lower the "
                "reserve or raise the budget",
                conversation_id=self.id,
            )
        return result

    # -- writing ---------------------------------------------------------------

    def append(
        self,
        message: Mapping[str, Any],
        *,
        pinned: bool = False,
        metadata: Mapping[str, Any] | None = None,
        complete: bool = True,
    ) -> StoredMessage:
        """Store one OpenAI-format message at the end of the conversation."""
        pending = self._pending(message, pinned=pinned, metadata=metadata, complete=complete)
        return self._commit([pending])[0]

    def _pending(
        self,
        message: Mapping[str, Any],
        *,
        pinned: bool = False,
        metadata: Mapping[str, Any] | None = None,
        complete: bool = True,
        check: bool = True,
    ) -> Pending:
        """Check and count a message before any transaction starts.

        ``check=False`` skips the size check: a model's reply is stored
        whatever its size (it was already paid for).
        """
        normalized = normalize(message)
        meta = check_metadata(metadata)
        tokens = self._counter.count_message(normalized)
        limit = self._plain_limit
        if check and tokens + REPLY_PRIMING + self._row.system_tokens > limit:
            raise BudgetExceeded(
                f"this message alone is {tokens} tokens; with the system prompt "
                f"({self._row.system_tokens}) it cannot fit the prompt budget of {limit} "
                "tokens. Split it, shorten it, or raise the budget.",
                conversation_id=self.id,
                tokens=tokens,
                limit=limit,
            )
        row = {**to_row(normalized), "tokens": tokens, "meta": meta}
        return Pending(row=row, message=normalized, pinned=pinned, complete=complete)

    def _commit(
        self,
        batch: Sequence[Pending],
        *,
        usage: Mapping[str, Any] | None = None,
        observed: tuple[int, int] | None = None,
    ) -> list[StoredMessage]:
        """Store ``batch``, its usage row and any calibration change in one transaction.

        ``observed`` is (our count, the server's count) of the turn's prompt. A new
        conversation's row is inserted here too, so it exists only with its first turn.
        """
        if self._unsaved and not batch:
            return []  # nothing to store, so no row either
        calibration = self._calibration_change(*observed) if observed else None
        if calibration is None and self._unsaved:
            calibration = self._unsaved_calibration
        when = repository.now()
        hot = self._memory._hot
        stamp = hot.stamp(when)
        stored: list[StoredMessage] = []
        with self._db.cursor(write=True) as cur:
            if self._unsaved:
                row = self._row
                hot.create(
                    cur,
                    {
                        "id": row.id,
                        "user_id": row.user_id,
                        "title": row.title,
                        "model": row.model,
                        "system": row.system,
                        "system_tokens": row.system_tokens,
                        "counter": row.counter,
                        "settings": dumps(row.settings),
                        "now": stamp,
                    },
                )
            segments: list[repository.Segment] | None = None
            total = sum(pending.row["tokens"] for pending in batch)
            first = hot.claim(cur, self.id, self.user, total, stamp, count=len(batch))
            if first is None:
                raise ConversationNotFound(
                    f"conversation {self.id!r} no longer exists (deleted?)",
                    conversation_id=self.id,
                )
            for position, pending in enumerate(batch, start=first):
                tokens = pending.row["tokens"]
                if pending.message["role"] == "tool":
                    if segments is None:
                        head = hot.head(cur, self.id, self.user, self.model)
                        assert head is not None
                        segments = self._segments_of(head, cur)
                    self._check_answer(hot.pending_calls(cur, segments, position), pending)
                row = dict(pending.row)
                row.update(
                    conversation_id=self.id,
                    position=position,
                    created_at=stamp,
                    pinned=pending.pinned,
                    complete=pending.complete,
                )
                hot.insert(cur, row)
                stored.append(StoredMessage(position=position, tokens=tokens))
            if usage is not None:
                hot.insert_usage(
                    cur,
                    {
                        **USAGE_DEFAULTS,
                        **usage,
                        "conversation_id": self.id,
                        "position": stored[-1].position if stored else None,
                        "created_at": stamp,
                    },
                )
            if calibration is not None:
                hot.upsert_calibration(
                    cur,
                    {
                        **calibration,
                        "conversation_id": self.id,
                        "model": self.model,
                        "updated_at": stamp,
                    },
                )
        self._unsaved, self._unsaved_calibration = False, None
        if calibration is not None:
            self._last_correction = Correction(calibration["factor"], calibration["margin"])
        return stored

    def _check_answer(self, open_calls: set[str] | None, pending: Pending) -> None:
        call_id = pending.message["tool_call_id"]
        if open_calls is not None and call_id in open_calls:
            return
        raise InvalidMessage(
            f"tool message answers call {call_id!r}, but "
            + (
                "the messages before it have no tool call waiting for an answer"
                if not open_calls
                else f"the open calls are {sorted(open_calls)}"
            )
            + "; append the assistant message with that tool_call first",
            field="tool_call_id",
            conversation_id=self.id,
        )

    def extend(self, messages: Sequence[Mapping[str, Any]]) -> list[StoredMessage]:
        """Append several messages in one transaction: all of them or none."""
        return self._commit([self._pending(message) for message in messages])

    # -- reading ---------------------------------------------------------------

    def _segments_of(self, head: repository.Head, cur: Any) -> list[repository.Segment]:
        """This conversation's lineage, cached until its fork pointer changes."""
        if head.forked_from is None:
            return [(self.id, None)]
        key = (head.forked_from, head.fork_position)
        if self._segments is None or self._segments[0] != key:
            self._segments = (key, self._memory._hot.lineage(cur, self.id, head))
        return self._segments[1]

    def _lineage(self, conn: Any) -> list[repository.Segment]:
        """The lineage for the Core (non hot-path) reads of :meth:`_fresh_row`'s row."""
        return repository.lineage(conn, self._row)

    def _head(self, cur: Any) -> repository.Head:
        """The hot path's view of the row (an empty one while it is still unsaved)."""
        head = self._memory._hot.head(cur, self.id, self.user, self.model)
        if head is not None:
            return head
        if not self._unsaved:
            raise ConversationNotFound(
                f"conversation {self.id!r} no longer exists (deleted?)",
                conversation_id=self.id,
            )
        learnt = self._unsaved_calibration or {}
        return repository.Head(
            system=self._row.system,
            system_tokens=self._row.system_tokens,
            forked_from=None,
            fork_position=None,
            next_position=0,
            message_count=0,
            total_tokens=0,
            factor=learnt.get("factor"),
            margin=learnt.get("margin"),
        )

    def _fresh_row(self, conn: Any) -> repository.ConversationRow:
        row = repository.get_conversation(conn, self.id, self.user)
        if row is None and self._unsaved:
            return self._row  # reads as an empty conversation until its first write
        if row is None:
            raise ConversationNotFound(
                f"conversation {self.id!r} no longer exists (deleted?)", conversation_id=self.id
            )
        self._row = row
        return row

    def _read_state(
        self,
        *,
        tools: int = 0,
        extra: Sequence[Pending] = (),
        reserve: int | None = None,
        correction: Correction | None = None,
    ) -> tuple[State, Budget]:
        """One read transaction: row and calibration, summary, pinned and a bounded tail.

        ``extra`` are messages of the turn in progress, not stored yet: they
        join the tail at the positions they would get. ``correction`` budgets this
        request instead of the stored one (which is still what a reply calibrates).
        """
        hot = self._memory._hot
        with self._db.cursor(write=False) as cur:
            head = self._head(cur)
            self._last_correction = (
                Correction(factor=head.factor, margin=head.margin or 0)
                if head.factor is not None
                # Nothing learnt yet: the registry's expected gap for this model (identity
                # for OpenAI models; e.g. 1.25 for the local model's own tokenizer).
                else self._info.correction
            )
            correction = correction or self._last_correction
            budget = self.budget(tools=tools, correction=correction, reserve=reserve)
            segments = self._segments_of(head, cur)
            cover: list[Summary] = []
            if getattr(self._strategy, "hierarchical", False):
                cover = hot.summary_cover(cur, segments)
                summary = cover[-1] if cover else None
            else:
                summary = hot.newest_summary(cur, segments)
            after = summary.end if summary is not None else -1
            # Read until the tail alone would overflow: anything older can't fit.
            # A strategy that re-sends covered turns beside the summary reads past it.
            need = int(budget.limit / max(correction.factor, 1e-9)) + 1
            read_after = -1 if getattr(self._strategy, "overlap", False) else after
            tail, has_older = hot.tail(
                cur, segments, tokens=need, after=read_after, first_page=head.page_for(need)
            )
            has_older = has_older and (not tail or tail[0].position > after + 1)
            if extra:
                tail = [
                    *tail,
                    *(
                        Item(
                            position=head.next_position + n,
                            message=pending.message,
                            tokens=pending.row["tokens"],
                            pinned=pending.pinned,
                        )
                        for n, pending in enumerate(extra)
                    ),
                ]
            start = tail[0].position if tail else head.next_position
            pinned = hot.pinned_before(cur, segments, start)
        system = None
        if head.system is not None:
            system = Item(
                position=-1,
                message={"role": "system", "content": head.system},
                tokens=head.system_tokens,
            )
        gap_pinned = [item.position for item in pinned if item.position > after]
        older_from = after + 1
        for position in gap_pinned:  # sorted: skip pinned ones at the very start
            if position == older_from:
                older_from += 1
        state = State(
            system=system,
            pinned=pinned,
            summary=summary,
            tail=tail,
            has_older=has_older,
            older=max(0, start - (after + 1) - len(gap_pinned)),
            older_from=older_from,
            summaries=tuple(cover),
        )
        return state, budget

    def state(self) -> State:
        """What the strategy sees for the next request."""
        return self._read_state()[0]

    def read_state(self) -> tuple[State, Budget]:
        """The state and budget the next request would be built from."""
        return self._read_state()

    @property
    def database(self) -> Database:
        return self._db

    @property
    def hot(self) -> repository.HotPath:
        return self._memory._hot

    def segments(self) -> list[repository.Segment]:
        """This conversation's lineage: itself, then the conversations it was forked from."""
        with self._db.read() as conn:
            self._fresh_row(conn)
            return self._lineage(conn)

    def summary_cover(self) -> list[Summary]:
        """The stored summaries that together cover the summarized range, oldest first."""
        hot = self._memory._hot
        with self._db.cursor(write=False) as cur:
            head = self._head(cur)
            return hot.summary_cover(cur, self._segments_of(head, cur))

    def entries_between(self, first: int, last: int) -> list[repository.Entry]:
        """Stored messages at positions ``first..last``, oldest first."""
        with self._db.read() as conn:
            self._fresh_row(conn)
            return list(repository.entries(conn, self._lineage(conn), first=first, last=last))

    def context(self, *, tools: Sequence[Mapping[str, Any]] | None = None) -> Context:
        """The exact messages the next request would send, with a token report."""
        return chat.turn_context(self, (), tools=tools, params={})[0]

    # -- talking to the model ------------------------------------------------------

    def send(
        self, message: Any, *, tools: Sequence[Mapping[str, Any]] | None = None, **params: Any
    ) -> chat.Reply:
        """Send text (or a message, or messages) with the budgeted context; store the turn.

        ``params`` are Chat Completions parameters (temperature, max_tokens,
        ...), checked before any request. The new message(s), the reply and
        its usage are stored together once the reply is in; a failed call
        stores nothing.
        """
        return chat.send(self, message, tools=tools, **params)

    def stream(
        self,
        message: Any,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        on_incomplete: str | None = None,
        **params: Any,
    ) -> chat.TurnStream:
        """Like :meth:`send`, yielding text pieces as they arrive; stored once at the end."""
        return chat.stream(self, message, tools=tools, on_incomplete=on_incomplete, **params)

    def prepare(
        self,
        message: Any = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        max_tokens: int | None = None,
    ) -> list[dict[str, Any]]:
        """The exact messages to send with your own client (``message`` is not stored yet)."""
        return chat.prepare(self, message, tools=tools, max_tokens=max_tokens)

    @property
    def prepared(self) -> Context | None:
        """The context the last :meth:`prepare` returned, with its token report (the
        count the budget used), until :meth:`record` stores the turn."""
        return self._prepared.context if self._prepared is not None else None

    def record(self, reply: Any) -> chat.Reply:
        """Store the reply to the last :meth:`prepare` (a ChatCompletion, its dict, or text)."""
        return chat.record(self, reply)

    def compact(self) -> compaction.Outcome:
        """Fold old messages into a summary now, if the strategy asks for it."""
        summarizer, model = self._memory.summarizer_for(self)
        return compaction.compact(self, summarizer, summarizer_model=model)

    def _before_turn(self) -> None:
        """Compact before building a request (compaction="before")."""
        if self._memory.compaction == "before" and isinstance(self._strategy, Summarizing):
            self._compact_quietly()

    def _after_turn(self, fold_wanted: bool) -> None:
        """Compact after a turn whose context asked for a fold (compaction="after")."""
        if (
            fold_wanted
            and self._memory.compaction == "after"
            and isinstance(self._strategy, Summarizing)
        ):
            self._compact_quietly()

    def _compact_quietly(self) -> None:
        """Compaction around a turn never fails the turn: errors become usage rows."""
        try:
            self.compact()
        except ConversationMemoryError as exc:  # e.g. no client to summarize with
            with suppress(ConversationMemoryError):
                model = self._memory.summary_model or self.model
                compaction.record_failure(self, model, str(exc))

    def _calibration_change(self, counted: int, reported: int) -> dict[str, Any] | None:
        """The calibration row to write for one observation, or None if nothing moves.

        Written in the turn's own transaction, and only when the correction
        moves by more than 2% or its margin changes: an extra write per turn
        would cost an extra fsync per turn.
        """
        if counted <= 0 or reported <= 0:
            return None
        known = self._known()
        if known == Correction() and reported == counted:
            return None  # agrees with us and nothing learnt yet: nothing to write
        factor, margin = self._learn(counted, reported)
        moved = known == Correction() or abs(factor - known.factor) > 0.02 * known.factor
        if not moved and margin == known.margin:
            return None
        return {
            "factor": factor,
            "margin": margin,
            "last_counted": counted,
            "last_reported": reported,
        }

    def _known(self) -> Correction:
        """The stored calibration as last read, else the registry's initial correction
        for the model (identity for OpenAI models)."""
        return self._last_correction or self._info.correction

    def _learn(self, counted: int, reported: int) -> tuple[float, int]:
        """:func:`next_correction` from :meth:`_known`, without storing anything."""
        known = self._known()
        return next_correction(known.factor if known != Correction() else None, counted, reported)

    def usage(self) -> UsageTotals:
        """Tokens, calls, latency and estimated cost of every model call of this conversation."""
        return UsageTotals.of(self.calls())

    def calls(self) -> list[Call]:
        """Every model call of this conversation (turns and summaries), oldest first."""
        with self._db.read() as conn:
            self._fresh_row(conn)
            return [_call(row) for row in repository.usage_calls(conn, self.id)]

    def history(self) -> list[dict[str, Any]]:
        """Every stored message, oldest first, as OpenAI-format dicts."""
        return [entry.message for entry in self.entries()]

    def entries(self) -> list[repository.Entry]:
        """Every stored message with its position, tokens, time, flags and metadata."""
        with self._db.read() as conn:
            self._fresh_row(conn)
            return list(repository.entries(conn, self._lineage(conn)))

    def __len__(self) -> int:
        with self._db.read() as conn:
            return self._fresh_row(conn).next_position

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.history())

    # -- calibration -------------------------------------------------------------

    def correction(self) -> Correction:
        """The calibrated correction for this conversation's model (the registry's
        initial one, identity for OpenAI models, until the server has reported counts)."""
        if self._unsaved and self._unsaved_calibration is not None:
            learnt = self._unsaved_calibration
            return Correction(factor=learnt["factor"], margin=learnt["margin"])
        with self._db.read() as conn:
            found = repository.get_calibration(conn, self.id, self.model)
        if found is None:
            return self._info.correction
        return Correction(factor=found.factor, margin=found.margin)

    def calibrate(self, *, counted: int, reported: int) -> Correction:
        """Record what the server reported for a prompt we counted; return the new correction.

        See :func:`next_correction` for the rule.
        """
        _check_positive("counted", counted)
        _check_positive("reported", reported)
        # The same prior a turn uses: what was learnt, else the registry's initial guess.
        initial = self._info.correction
        guess = initial.factor if initial != Correction() else None
        if self._unsaved:
            # No row to hang a calibration on yet: kept here, written with the first turn.
            learnt = self._unsaved_calibration
            factor, margin = next_correction(
                learnt["factor"] if learnt else guess, counted, reported
            )
            self._unsaved_calibration = {
                "factor": factor,
                "margin": margin,
                "last_counted": counted,
                "last_reported": reported,
            }
            self._last_correction = Correction(factor=factor, margin=margin)
            return self._last_correction
        with self._db.write() as conn:
            found = repository.get_calibration(conn, self.id, self.model)
            prior = found.factor if found is not None else guess
            factor, margin = next_correction(prior, counted, reported)
            samples = found.samples + 1 if found is not None else 1
            repository.put_calibration(
                conn,
                {
                    "conversation_id": self.id,
                    "model": self.model,
                    "factor": factor,
                    "margin": margin,
                    "samples": samples,
                    "last_counted": counted,
                    "last_reported": reported,
                    "updated_at": repository.now(),
                },
                exists=found is not None,
            )
        self._last_correction = Correction(factor=factor, margin=margin)
        return self._last_correction

    # -- fork, delete, export ----------------------------------------------------

    def fork(self, at: int | None = None, *, title: str | None = None) -> Conversation:
        """A new conversation sharing messages ``0..at`` (default: all) with this one.

        The shared messages are not copied; the fork points at this
        conversation and numbers its own messages from ``at + 1``.
        """
        with self._db.write() as conn:
            row = self._fresh_row(conn)
            last = row.next_position - 1
            if at is None:
                at = last
            if isinstance(at, bool) or not isinstance(at, int) or not -1 <= at <= last:
                raise ConfigurationError(
                    f"at must be a position from -1 to {last} (the last message), got {at!r}",
                    conversation_id=self.id,
                )
            segments: list[repository.Segment] = [
                (cid, at if upto is None else min(upto, at)) for cid, upto in self._lineage(conn)
            ]
            count, tokens = repository.prefix_totals(conn, segments) if at >= 0 else (0, 0)
            when = repository.now()
            new_id = uuid.uuid4().hex
            repository.insert_conversation(
                conn,
                {
                    "id": new_id,
                    "user_id": row.user_id,
                    "title": title if title is not None else row.title,
                    "model": row.model,
                    "system": row.system,
                    "system_tokens": row.system_tokens,
                    "counter": row.counter,
                    "settings": dumps(row.settings),
                    "created_at": when,
                    "updated_at": when,
                    "forked_from": self.id if at >= 0 else None,
                    "fork_position": at if at >= 0 else None,
                    "next_position": at + 1,
                    "message_count": count,
                    "total_tokens": tokens,
                },
            )
            child = repository.get_conversation(conn, new_id, row.user_id)
        assert child is not None
        return Conversation(self._memory, child)

    def delete(self) -> None:
        """Delete this conversation with its summaries and usage; forks keep their messages."""
        with self._db.write() as conn:
            row = self._fresh_row(conn)
            repository.detach_forks(conn, row)
            repository.delete_conversation(conn, row.id)
        self._unsaved = False  # a new one deleted before its first turn stays deleted

    def export(self) -> str:
        """JSONL: a header line with the conversation's metadata, then one message per line.

        Each message line is the OpenAI-format message plus a ``convmem``
        object (creation time, and pinned/complete/metadata when set).
        ``Memory.import_conversation`` reads it back; exporting again gives the
        same bytes. A fork is exported whole (shared messages included).
        """
        with self._db.read() as conn:
            row = self._fresh_row(conn)
            entries = list(repository.entries(conn, self._lineage(conn)))
        return write_export(row, entries)
