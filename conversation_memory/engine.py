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
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from conversation_memory import _config, calibration, chat, compaction
from conversation_memory.budget import Context, budget_for
from conversation_memory.errors import (
    AmbiguousReference,
    BudgetExceeded,
    ConfigurationError,
    ConversationMemoryError,
    ConversationNotFound,
    UserNotFound,
)
from conversation_memory.export import Parsed, read_export, write_export
from conversation_memory.messages import check_metadata, normalize, to_row
from conversation_memory.registry import ModelInfo, get_model, load_models
from conversation_memory.store.database import Database
from conversation_memory.store.log import ConversationLog
from conversation_memory.store.opening import Store, open_store
from conversation_memory.store.values import (
    ConversationInfo,
    ConversationRow,
    Entry,
    NewMessage,
    StoredMessage,
    UsageRecord,
    now,
)
from conversation_memory.strategies import Strategy, Summarizing, as_strategy
from conversation_memory.tokens import REPLY_PRIMING, TokenCounter, counter_for
from conversation_memory.types import Budget, Correction, Item, State, Summary

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


def _call(record: UsageRecord) -> Call:
    prompt = record.prompt_tokens
    prompt_tokens = prompt if prompt is not None else (record.counted_prompt_tokens or 0)
    completion = record.completion_tokens or 0
    try:
        cost = get_model(record.model).cost(prompt_tokens, completion)
    except ConfigurationError:
        cost = None
    assert record.created_at is not None
    return Call(
        kind=record.kind,
        model=record.model,
        position=record.position,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        latency_ms=record.latency_ms,
        finish_reason=record.finish_reason,
        error=record.error,
        created_at=record.created_at,
        cost=cost,
    )


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
        durability: str = "full",
        busy_timeout_ms: int = 30_000,
        env: Mapping[str, str] | None = None,
        echo: bool = False,
    ) -> None:
        models = _config.models_file(env)
        if models is not None:
            load_models(models)  # before any file is created: a bad models file changes nothing
        self._store: Store = open_store(
            db,
            create=create,
            upgrade=upgrade,
            durability=durability,
            busy_timeout_ms=busy_timeout_ms,
            env=env,
            echo=echo,
        )
        self._db = self._store.database
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
            row = self._store.catalogue.get(id, user_id)
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
        when = now()
        row = ConversationRow(
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
            self._store.catalogue.create(row)
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
        return self._store.catalogue.list(user_id, limit=limit)

    def count(self, *, user: str | None = None, all_users: bool = False) -> int:
        """How many conversations this user (or everyone) has."""
        user_id = None if all_users else _check_user(user)
        return self._store.catalogue.count(user_id)

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
        kind, rows = self._store.catalogue.find(ref, user_id, limit=AMBIGUOUS_LISTED + 1)
        if not rows:
            whose = "" if user_id is None else f" of user {user_id!r}"
            raise ConversationNotFound(
                f"no conversation{whose} has the id, id prefix or title {ref!r}; "
                "`convmem sessions` lists them",
                conversation_id=ref,
                user=user_id,
            )
        if kind == "prefix" and len(rows) > 1:
            candidates = rows[:AMBIGUOUS_LISTED]
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
        return rows[0]

    def erase_user(self, user: str) -> int:
        """Delete every conversation, message, summary and usage row of ``user``."""
        user_id = _check_user(user)
        erased = self._store.catalogue.erase_user(user_id)
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
        row = ConversationRow(
            id=conversation_id,
            user_id=user_id,
            title=header.get("title"),
            model=model_name,
            system=system,
            system_tokens=counter.count_message({"role": "system", "content": system})
            if system is not None
            else 0,
            counter=counter.name,
            settings=header.get("settings") or {},
            created_at=parsed.created_at,
            updated_at=parsed.updated_at,
            forked_from=None,
            fork_position=None,
            next_position=len(rows),
            message_count=len(rows),
            total_tokens=sum(row["tokens"] for row in rows),
        )
        return Conversation(self, self._store.catalogue.import_(row, rows))


class Conversation:
    """One conversation: append messages, build the context to send, fork, export."""

    def __init__(
        self,
        memory: Memory,
        row: ConversationRow,
        *,
        strategy: Strategy | None = None,
        unsaved: bool = False,
    ) -> None:
        self._memory = memory
        self._log: ConversationLog = memory._store.log(row, unsaved=unsaved)
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
        self._plain_limit = self.budget().limit
        self._prepared: Any = None
        self._last_correction: Correction | None = None

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
        self._log.model = model

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
    ) -> NewMessage:
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
        return NewMessage(message=normalized, row=row, pinned=pinned, complete=complete)

    def _commit(
        self,
        batch: Sequence[NewMessage],
        *,
        usage: UsageRecord | None = None,
        observed: tuple[int, int] | None = None,
    ) -> list[StoredMessage]:
        """Store ``batch``, its usage row and any calibration change in one transaction.

        ``observed`` is (our count, the server's count) of the turn's prompt.
        """
        learn = calibration.from_reply(self._info.correction, *observed) if observed else None
        committed = self._log.commit(batch, usage=usage, learn=learn)
        if committed.calibration is not None:
            self._last_correction = committed.calibration.correction
        return committed.stored

    def extend(self, messages: Sequence[Mapping[str, Any]]) -> list[StoredMessage]:
        """Append several messages in one transaction: all of them or none."""
        return self._commit([self._pending(message) for message in messages])

    # -- reading ---------------------------------------------------------------

    def _read_state(
        self,
        *,
        tools: int = 0,
        extra: Sequence[NewMessage] = (),
        reserve: int | None = None,
        correction: Correction | None = None,
    ) -> tuple[State, Budget]:
        """One read transaction: row and calibration, summary, pinned and a bounded tail.

        ``extra`` are messages of the turn in progress, not stored yet: they
        join the tail at the positions they would get. ``correction`` budgets this
        request instead of the stored one (which is still what a reply calibrates).
        """
        plan: dict[str, Any] = {}

        def tokens(head: Any) -> int:
            known = calibration.known(head.correction, self._info.correction)
            chosen = correction or known
            budget = self.budget(tools=tools, correction=chosen, reserve=reserve)
            plan.update(known=known, budget=budget)
            return int(budget.limit / max(chosen.factor, 1e-9)) + 1

        hierarchical = bool(getattr(self._strategy, "hierarchical", False))
        overlap = bool(getattr(self._strategy, "overlap", False))
        snap = self._log.read(tokens, cover=hierarchical, overlap=overlap)
        self._last_correction = plan["known"]
        budget = plan["budget"]
        head, summary, tail, pinned = snap.head, snap.summary, snap.tail, snap.pinned
        after = summary.end if summary is not None else -1
        start = tail[0].position if tail else head.next_position
        if extra:
            tail = [
                *tail,
                *(
                    Item(
                        position=head.next_position + n,
                        message=pending.message,
                        tokens=pending.tokens,
                        pinned=pending.pinned,
                    )
                    for n, pending in enumerate(extra)
                ),
            ]
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
            has_older=snap.has_older,
            older=max(0, start - (after + 1) - len(gap_pinned)),
            older_from=older_from,
            summaries=tuple(snap.cover),
        )
        return state, budget

    def state(self) -> State:
        """What the strategy sees for the next request."""
        return self._read_state()[0]

    def read_state(self) -> tuple[State, Budget]:
        """The state and budget the next request would be built from."""
        return self._read_state()

    @property
    def log(self) -> ConversationLog:
        return self._log

    def summary_cover(self) -> list[Summary]:
        """The stored summaries that together cover the summarized range, oldest first."""
        return self._log.summary_cover()

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
                self._log.record_usage(UsageRecord(kind="summary", model=model, error=str(exc)))

    def _known(self) -> Correction:
        """The stored calibration as last read, else the registry's initial correction
        for the model (identity for OpenAI models)."""
        return self._last_correction or self._info.correction

    def _learn(self, counted: int, reported: int) -> tuple[float, int]:
        """What one observation would make of :meth:`_known`, without storing anything."""
        new = calibration.learnt(self._known(), counted, reported)
        return new.factor, new.margin

    def usage(self) -> UsageTotals:
        """Tokens, calls, latency and estimated cost of every model call of this conversation."""
        return UsageTotals.of(self.calls())

    def calls(self) -> list[Call]:
        """Every model call of this conversation (turns and summaries), oldest first."""
        return [_call(record) for record in self._log.calls()]

    def history(self) -> list[dict[str, Any]]:
        """Every stored message, oldest first, as OpenAI-format dicts."""
        return self._log.history()

    def entries(self) -> list[Entry]:
        """Every stored message with its position, tokens, time, flags and metadata."""
        return self._log.entries()

    def __len__(self) -> int:
        return self._log.length()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.history())

    # -- calibration -------------------------------------------------------------

    def correction(self) -> Correction:
        """The calibrated correction for this conversation's model (the registry's
        initial one, identity for OpenAI models, until the server has reported counts)."""
        return calibration.known(self._log.correction(), self._info.correction)

    def calibrate(self, *, counted: int, reported: int) -> Correction:
        """Record what the server reported for a prompt we counted; return the new correction.

        See :func:`~conversation_memory.calibration.next_correction` for the rule.
        """
        _check_positive("counted", counted)
        _check_positive("reported", reported)
        learn = calibration.told(self._info.correction, counted, reported)
        learnt = self._log.commit([], learn=learn).calibration
        assert learnt is not None
        self._last_correction = learnt.correction
        return self._last_correction

    # -- fork, delete, export ----------------------------------------------------

    def fork(self, at: int | None = None, *, title: str | None = None) -> Conversation:
        """A new conversation sharing messages ``0..at`` (default: all) with this one.

        The shared messages are not copied; the fork points at this
        conversation and numbers its own messages from ``at + 1``.
        """
        child = self._log.fork(at, title=title)
        return Conversation(self._memory, child)

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
