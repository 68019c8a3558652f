"""What the sync and async memories and conversations share: everything but I/O.

httpx's shape: its ``BaseClient`` builds requests and ``Client`` /
``AsyncClient`` only send them. Here :class:`BaseMemory` checks the settings,
builds a new conversation's row, works out how a stored one resumes, reads an
import and says what a reference names; :class:`BaseConversation` holds one
conversation's :class:`~conversation_memory.state.Setup` and log and answers
what needs no database. The drivers only do the I/O: ``engine.Memory`` and
``engine.Conversation`` in the calling thread, ``aio.AsyncMemory`` and
``aio.AsyncConversation`` on the event loop (the store in worker threads).
"""

from __future__ import annotations

import inspect
import io
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conversation_memory import _config
from conversation_memory.budget import Context
from conversation_memory.embeddings import Embeddings, as_embeddings
from conversation_memory.errors import (
    AmbiguousReference,
    ConfigurationError,
    ConversationNotFound,
    ImportFormatError,
)
from conversation_memory.export import Parsed, read_export
from conversation_memory.messages import normalize, to_row
from conversation_memory.registry import get_model, load_models
from conversation_memory.state import COMPACTION_CHOICES, Setup
from conversation_memory.store.opening import check_durability
from conversation_memory.store.schema import KEY_LENGTH
from conversation_memory.store.search import check_limit
from conversation_memory.store.values import ConversationInfo, ConversationRow, SearchHit, now
from conversation_memory.strategies import Strategy, StrategyLike
from conversation_memory.strategy_names import as_strategy
from conversation_memory.summarize import AsyncSummarizer, Summarizer
from conversation_memory.tokens import TokenCounter, counter_for
from conversation_memory.turns import Prepared, incomplete_mode
from conversation_memory.types import Budget, Correction

if TYPE_CHECKING:
    import openai

    from conversation_memory.llm import RetryPolicy
    from conversation_memory.store.log import ConversationLog

DEFAULT_USER = "default"
AMBIGUOUS_LISTED = 10
"""Candidates an ambiguous id prefix lists (``Memory.find``)."""


def check_user(user: Any) -> str:
    if user is None:
        return DEFAULT_USER
    if not isinstance(user, str) or not user or len(user) > 255:
        raise ConfigurationError(
            f"user must be a non-empty string of at most 255 characters, got {user!r}"
        )
    if "\x00" in user:
        raise ConfigurationError("user must not contain NUL characters")
    return user


def check_key(key: Any) -> str:
    """The application's key for a conversation, checked: a non-empty string of at
    most ``KEY_LENGTH`` (255) characters without control characters."""
    if not isinstance(key, str) or not key or len(key) > KEY_LENGTH:
        raise ConfigurationError(
            f"key must be a non-empty string of at most {KEY_LENGTH} characters, got {key!r:.80}",
            argument="key",
        )
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in key):
        raise ConfigurationError(
            f"key must not contain control characters (newlines, tabs, NUL), got {key!r:.80}",
            argument="key",
        )
    return key


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigurationError(
            f"{name} must be an integer >= {low}, got {value!r}", argument=name
        )
    return value


def check_search(text: Any, limit: Any) -> None:
    """A search's text and limit, checked before anything is read."""
    if not isinstance(text, str):
        raise ConfigurationError(
            f"text must be a string (the words to search for), got {type(text).__name__}",
            argument="text",
        )
    check_limit(limit)


@dataclass(frozen=True, slots=True)
class Request:
    """A checked ``memory.conversation(...)`` call."""

    id: str | None
    user: str
    system: str | None
    model: str | None
    strategy: Strategy | None
    budget: int | None
    reserve: int | None
    title: str | None
    lazy: bool
    key: str | None = None
    """The application's name for the conversation: resume it, or create it."""
    create: bool = True
    """With ``key``: create the conversation if the user has none with that key."""


class BaseMemory:
    """The settings of a memory, and what it decides without the database."""

    def __init__(
        self,
        *,
        client: openai.OpenAI | openai.AsyncOpenAI | None,
        model: str | None,
        strategy: StrategyLike,
        summarizer: Summarizer | AsyncSummarizer | None,
        summary_model: str | None,
        compaction: str,
        on_incomplete: str,
        retry: RetryPolicy | None,
        sleep: Callable[[float], Any] | None,
        durability: str,
        env: Mapping[str, str] | None,
        embeddings: Embeddings | str | None = None,
    ) -> None:
        if compaction not in COMPACTION_CHOICES:
            raise ConfigurationError(
                f"compaction must be one of {COMPACTION_CHOICES}, got {compaction!r}",
                argument="compaction",
            )
        incomplete_mode(on_incomplete)
        check_durability(durability)
        self.client = client
        """The model client (None: one is built from ``OPENAI_API_KEY`` /
        ``OPENAI_BASE_URL`` on first use)."""
        self.model: str = model or _config.default_model(env)
        self.strategy: Strategy = as_strategy(strategy)
        self.summarizer = summarizer
        self.summary_model = summary_model
        self.compaction = compaction
        self.on_incomplete = on_incomplete
        self.embeddings = as_embeddings(embeddings)
        """How stored messages are embedded for semantic recall (None: they are not)."""
        self._env = env
        self._retry = retry
        self._sleep = sleep

    def _llm_options(self) -> dict[str, Any]:
        """The retry policy and sleep given, as ``LLM`` / ``AsyncLLM`` keywords."""
        options: dict[str, Any] = {}
        if self._retry is not None:
            options["retry"] = self._retry
        if self._sleep is not None:
            options["sleep"] = self._sleep
        return options

    def _embeddings_client(self, *, is_async: bool) -> Any:
        """The client ``embeddings`` names, else the memory's own (None: build one)."""
        assert self.embeddings is not None
        client = self.embeddings.client if self.embeddings.client is not None else self.client
        if client is None:
            return None
        create = getattr(getattr(client, "embeddings", None), "create", None)
        if create is None or inspect.iscoroutinefunction(create) != is_async:
            wanted = "openai.AsyncOpenAI" if is_async else "openai.OpenAI"
            raise ConfigurationError(
                f"the embeddings client must be an {wanted} (or compatible) for this memory, "
                f"got {type(client).__name__}; pass Embeddings(model, client=...)",
                argument="embeddings",
            )
        return client

    def _load_models(self) -> None:
        """Register the ``CONVMEM_MODELS`` file's models, then check the default model.

        Before any file is created: a bad models file changes nothing.
        """
        models = _config.models_file(self._env)
        if models is not None:
            load_models(models)
        get_model(self.model)

    def _summarizer_model(self, conversation_model: str) -> str:
        """The model a conversation's summaries are recorded as made by."""
        model = self.summary_model or conversation_model
        return str(getattr(self.summarizer, "model", model)) if self.summarizer else model

    # -- conversations ----------------------------------------------------------------

    def _request(
        self,
        id: str | None,
        *,
        user: str | None,
        system: str | None,
        model: str | None,
        strategy: StrategyLike | None,
        budget: int | None,
        reserve: int | None,
        title: str | None,
        lazy: bool,
        key: str | None = None,
        create: bool = True,
    ) -> Request:
        user_id = check_user(user)
        if not isinstance(lazy, bool):
            raise ConfigurationError(f"lazy must be True or False, got {lazy!r}")
        if not isinstance(create, bool):
            raise ConfigurationError(f"create must be True or False, got {create!r}")
        if key is not None:
            check_key(key)
            if id is not None:
                raise ConfigurationError(
                    "give a conversation's id or its key, not both: memory.conversation(id) "
                    "resumes by id, memory.conversation(key=...) resumes or creates by key",
                    argument="key",
                )
        elif not create:
            raise ConfigurationError(
                "create=False applies to a key: memory.conversation(key=..., create=False) "
                "resumes the conversation with that key and never creates one",
                argument="create",
            )
        if budget is not None:
            check_positive("budget", budget)
        if reserve is not None:
            check_positive("reserve", reserve, allow_zero=True)
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
        return Request(
            id, user_id, system, model, chosen, budget, reserve, title, lazy, key, create
        )

    def _keyed(
        self, request: Request, row: ConversationRow | None
    ) -> tuple[ConversationRow, Setup, bool]:
        """What a request with a key opens, given the user's conversation with that key
        (None: none yet): ``(row, setup, new)``; ``new`` rows are still to be stored.

        A stored one resumes as by id (the settings given must agree with it); a
        new one is created with them, unless ``create=False``.
        """
        if row is not None:
            return row, self._resumed(request, row), False
        if not request.create:
            raise ConversationNotFound(
                f"user {request.user!r} has no conversation with key {request.key!r}; "
                "pass create=True to create it, or list them with "
                "memory.conversations(user=...)",
                conversation_id=None,
                user=request.user,
                key=request.key,
            )
        row, setup = self._created(request)
        return row, setup, True

    def _resumed(self, request: Request, row: ConversationRow | None) -> Setup:
        """How the stored conversation ``row`` (None: not found) resumes for ``request``."""
        if row is None:
            raise ConversationNotFound(
                f"no conversation {request.id!r} for user {request.user!r}; list them with "
                "memory.conversations(user=...)",
                conversation_id=request.id,
                user=request.user,
            )
        strategy = request.strategy or self._stored_strategy(row)
        if request.system is not None and request.system != row.system:
            raise ConfigurationError(
                f"conversation {row.id!r} already has a system prompt; fork it to start "
                "from a different one",
                conversation_id=row.id,
            )
        model = row.model
        if request.model is not None and request.model != row.model:
            get_model(request.model)
            counter = counter_for(request.model)
            if counter.name != row.counter:
                raise ConfigurationError(
                    f"conversation {row.id!r} counts tokens with {row.counter}, but "
                    f"{request.model!r} uses {counter.name}; stored counts would be wrong. "
                    "Fork it or start a new conversation for that model.",
                    conversation_id=row.id,
                    model=request.model,
                )
            model = request.model
        return self._setup(
            row, strategy=strategy, model=model, budget=request.budget, reserve=request.reserve
        )

    def _stored_strategy(self, row: ConversationRow) -> Strategy:
        """The strategy saved at creation: a built-in by name, or the memory's own."""
        name = row.settings.get("strategy")
        default = self.strategy
        if name is None or name == default.name:
            return default
        try:
            return as_strategy(name)
        except ConfigurationError:
            raise ConfigurationError(
                f"conversation {row.id!r} was created with strategy {name!r}, which is not "
                "built in; pass it again: memory.conversation(id, strategy=...)",
                conversation_id=row.id,
            ) from None

    def _setup(
        self,
        row: ConversationRow,
        *,
        strategy: Strategy | None = None,
        model: str | None = None,
        budget: int | None = None,
        reserve: int | None = None,
    ) -> Setup:
        chosen = model or row.model
        return Setup.of(
            conversation_id=row.id,
            model=chosen,
            strategy=strategy or self._stored_strategy(row),
            cap=budget if budget is not None else row.settings.get("budget"),
            reserve=reserve if reserve is not None else row.settings.get("reserve"),
            system_tokens=row.system_tokens,
            summarizer_model=self._summarizer_model(chosen),
            compaction=self.compaction,
            on_incomplete=self.on_incomplete,
            embeddings_model=self.embeddings.model if self.embeddings else None,
            min_similarity=self.embeddings.min_similarity if self.embeddings else 0.0,
        )

    def _created(self, request: Request) -> tuple[ConversationRow, Setup]:
        """A new conversation's row (not stored yet) and setup."""
        model = request.model or self.model
        get_model(model)
        counter = counter_for(model)
        system, system_tokens = request.system, 0
        if system is not None:
            normalize({"role": "system", "content": system})
            system_tokens = counter.count_message({"role": "system", "content": system})
        strategy = request.strategy or self.strategy
        settings: dict[str, Any] = {"strategy": strategy.name}
        if request.budget is not None:
            settings["budget"] = request.budget
        if request.reserve is not None:
            settings["reserve"] = request.reserve
        when = now()
        row = ConversationRow(
            id=uuid.uuid4().hex,
            user_id=request.user,
            title=request.title,
            model=model,
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
            key=request.key,
        )
        return row, self._setup(row, strategy=strategy)

    def _listing_user(self, user: str | None, all_users: bool) -> str | None:
        return None if all_users else check_user(user)

    def _search_user(self, text: Any, user: str | None, all_users: Any, limit: Any) -> str | None:
        """Check ``search``'s arguments; the user to search (None: everyone)."""
        check_search(text, limit)
        if not isinstance(all_users, bool):
            raise ConfigurationError(f"all_users must be True or False, got {all_users!r}")
        if all_users and user is not None:
            raise ConfigurationError(
                f"search either user {user!r}'s conversations or all users' "
                "(all_users=True), not both"
            )
        return self._listing_user(user, all_users)

    def _reference(self, ref: str, user: str | None) -> str | None:
        """Check ``find``'s arguments; the user to look under (None: everyone)."""
        if not isinstance(ref, str) or not ref:
            raise ConfigurationError(f"a conversation id or title is needed, got {ref!r}")
        return None if user is None else check_user(user)

    def _found(
        self, ref: str, user: str | None, kind: str, rows: list[ConversationInfo]
    ) -> ConversationInfo:
        """What ``find`` returns of the catalogue's answer, or the error it raises."""
        if not rows:
            whose = "" if user is None else f" of user {user!r}"
            raise ConversationNotFound(
                f"no conversation{whose} has the id, id prefix, key or title {ref!r}; "
                "`convmem sessions` lists them",
                conversation_id=ref,
                user=user,
            )
        if kind == "key" and len(rows) > 1:
            listed = "; ".join(f"{c.id[:12]} (user {c.user})" for c in rows[:AMBIGUOUS_LISTED])
            raise AmbiguousReference(
                f"several users have a conversation with key {ref!r}: {listed}; "
                "say whose (user=...; --user)",
                conversation_id=ref,
                user=user,
                candidates=rows[:AMBIGUOUS_LISTED],
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
                user=user,
                candidates=candidates,
            )
        return rows[0]

    def _imported(
        self,
        data: str | bytes | io.IOBase | Parsed,
        *,
        user: str | None,
        new_id: bool,
    ) -> tuple[ConversationRow, list[dict[str, Any]]]:
        """The row and message rows of an export, every line checked."""
        parsed = data if isinstance(data, Parsed) else read_export(data)
        header = parsed.header
        user_id = check_user(user if user is not None else header.get("user"))
        model = header.get("model") or self.model
        get_model(model)
        counter = counter_for(model)
        system = header.get("system")
        key = header.get("key")
        if key is not None:
            try:
                check_key(key)
            except ConfigurationError as exc:
                raise ImportFormatError(f"line 1: the header's {exc}", line=1) from None
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
            id=uuid.uuid4().hex if new_id else header["id"],
            user_id=user_id,
            title=header.get("title"),
            model=model,
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
            key=key,
        )
        return row, rows


class BaseConversation:
    """One open conversation: its setup, its log, and what needs no database."""

    def __init__(self, row: ConversationRow, setup: Setup, log: ConversationLog) -> None:
        self._setup = setup
        self._log = log
        self._prepared: Prepared | None = None
        self.user = row.user_id
        self.key = row.key
        """The application's name for it (``memory.conversation(key=...)``), or None."""
        self.title = row.title
        self.system = row.system
        self.model = setup.model
        """The model its requests name (the stored one unless resumed with another)."""

    @property
    def id(self) -> str:
        """Its id. A lazy keyed conversation that another process created first takes
        that one's id with its first turn (which is stored there)."""
        return self._log.id

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} user={self.user!r} model={self.model!r}>"

    @property
    def strategy(self) -> Strategy:
        return self._setup.strategy

    @property
    def counter(self) -> TokenCounter:
        return self._setup.counter

    def budget(
        self, *, tools: int = 0, correction: Correction | None = None, reserve: int | None = None
    ) -> Budget:
        """The prompt budget for the next request (``reserve``: this request's max_tokens)."""
        return self._setup.budget(tools=tools, correction=correction, reserve=reserve)

    @property
    def prepared(self) -> Context | None:
        """The context the last ``prepare`` returned, with its token report (the count the
        budget used), until ``record`` stores the turn."""
        return self._prepared.context if self._prepared is not None else None

    def _messages(self, messages: Sequence[Mapping[str, Any]]) -> list[Any]:
        """``extend``'s messages, checked and counted."""
        return [self._setup.message(message) for message in messages]

    def _hits(self, hits: list[SearchHit] | None) -> list[SearchHit]:
        """``search``'s answer, given the catalogue's (None: the conversation is not stored)."""
        if hits is not None:
            return hits
        if not self._log.stored:
            return []  # lazy, and nothing stored yet
        raise ConversationNotFound(
            f"conversation {self.id!r} no longer exists (deleted?)", conversation_id=self.id
        )

    def _incomplete(self, on_incomplete: str | None) -> str:
        return incomplete_mode(on_incomplete or self._setup.on_incomplete)


__all__ = [
    "AMBIGUOUS_LISTED",
    "DEFAULT_USER",
    "BaseConversation",
    "BaseMemory",
    "Request",
    "check_key",
]
