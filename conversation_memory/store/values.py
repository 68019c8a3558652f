"""The plain values the store hands out and takes in: never a database row.

The conversation log (``store.log``) and the catalogue (``store.catalogue``)
read rows and give back these frozen values, and take these values to
write; the code above the store (turns, compaction, the drivers) never sees
a cursor, a SQLAlchemy row or a column name. Messages themselves travel as
:class:`~conversation_memory.types.Item` and summaries as
:class:`~conversation_memory.types.Summary`, the values the pure budget and
strategy code reads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from conversation_memory.types import Correction, Item, Summary

Segment = tuple[str, int | None]
"""A conversation id and the last position read from it (None: its own end).
A fork's lineage is a list of segments from itself back to the root."""


def now() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime) -> datetime:
    """SQLite hands datetimes back without a zone; they were stored as UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class ConversationRow:
    """Everything the store keeps on a conversation itself (not its messages)."""

    id: str
    user_id: str
    title: str | None
    model: str
    system: str | None
    system_tokens: int
    counter: str
    """The token counter its stored counts were made with."""
    settings: dict[str, Any]
    """Strategy name, budget and reserve it was created with."""
    created_at: datetime
    updated_at: datetime
    forked_from: str | None
    fork_position: int | None
    next_position: int
    message_count: int
    total_tokens: int
    key: str | None = None
    """The application's own name for it, unique per user (None: it has none)."""


@dataclass(frozen=True, slots=True)
class Head:
    """What a turn needs of the conversation row, with its stored calibration."""

    system: str | None
    system_tokens: int
    forked_from: str | None
    fork_position: int | None
    next_position: int
    message_count: int
    total_tokens: int
    factor: float | None
    margin: int | None
    updated_at: Any = None
    """As the backend stores it: with the counts, what says whether the conversation
    changed since it was last read (see ``store.tailcache``)."""

    @property
    def correction(self) -> Correction | None:
        """The stored calibration (None: nothing learnt yet)."""
        if self.factor is None:
            return None
        return Correction(factor=self.factor, margin=self.margin or 0)

    def page_for(self, tokens: int) -> int:
        """Rows likely to hold ``tokens``, from the average message size, with slack."""
        if self.message_count == 0:
            return 16
        average = max(self.total_tokens / self.message_count, 1.0)
        return min(int(tokens / average * 1.1) + 4, 4096)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one read transaction saw of a conversation (``ConversationLog.read``)."""

    head: Head
    summary: Summary | None
    """The newest summary (the cover's last one when the cover was read)."""
    cover: list[Summary]
    tail: list[Item]
    """The newest messages, oldest first."""
    has_older: bool
    """Whether messages older than ``tail`` and not covered by ``summary`` exist."""
    pinned: list[Item]
    """Pinned messages older than ``tail``."""
    recalled: tuple[tuple[float, tuple[Item, ...]], ...] = ()
    """Earlier whole turns a recalling strategy's search found, best first, each with
    its score (``store.recall``)."""


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A checked, counted message waiting for its transaction."""

    message: dict[str, Any]
    """The normalized OpenAI message."""
    row: dict[str, Any]
    """Its stored columns (``messages.to_row``) with ``tokens`` and ``meta``."""
    pinned: bool = False
    complete: bool = True

    @property
    def tokens(self) -> int:
        return int(self.row["tokens"])


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """What ``append`` stored: where, and how many tokens it counts for."""

    position: int
    tokens: int


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored message with everything the store keeps about it."""

    position: int
    message: dict[str, Any]
    tokens: int
    created_at: datetime
    pinned: bool
    complete: bool
    metadata: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One model call as its usage row keeps it."""

    kind: str
    """``chat`` for a turn, ``summary`` for a compaction."""
    model: str
    prompt_tokens: int | None = None
    """As the server reported it (None: it reported nothing)."""
    completion_tokens: int | None = None
    counted_prompt_tokens: int | None = None
    """The prompt as we counted it."""
    latency_ms: float | None = None
    finish_reason: str | None = None
    request_id: str | None = None
    error: str | None = None
    position: int | None = None
    """The message it stored last (a chat reply, the end of a summary); set by the store."""
    created_at: datetime | None = None
    """Set by the store."""


@dataclass(frozen=True, slots=True)
class Calibration:
    """A calibration to store: the correction learnt and the observation it came from."""

    factor: float
    margin: int
    last_counted: int
    last_reported: int
    samples: int = 1
    """Observations it adds to the stored count."""

    @property
    def correction(self) -> Correction:
        return Correction(factor=self.factor, margin=self.margin)

    def following(self, earlier: Calibration | None) -> Calibration:
        """This calibration, counting the observations of ``earlier`` too (one kept
        before the conversation's row existed)."""
        if earlier is None:
            return self
        return replace(self, samples=self.samples + earlier.samples)


@dataclass(frozen=True, slots=True)
class Committed:
    """What one turn's transaction stored."""

    stored: list[StoredMessage]
    calibration: Calibration | None
    """The calibration it wrote, if any."""


@dataclass(frozen=True, slots=True)
class NewSummary:
    """A summary to store, with the provenance kept beside it."""

    start: int
    end: int
    text: str
    tokens: int
    strategy: str
    model: str
    prompt_version: str
    level: int = 0
    based_on: int | None = None
    """The summary it extends (level 0: it must still be the newest)."""
    usage: UsageRecord | None = None
    """The summarizer call, stored in the same transaction."""


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
    key: str | None = None
    """The application's own name for it (``memory.conversation(key=...)``)."""


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One stored message a search found (``Conversation.search``, ``Memory.search``)."""

    conversation_id: str
    """The conversation that stores the message: for history a fork shares, its parent."""
    title: str | None
    """That conversation's title."""
    position: int
    role: str
    message: dict[str, Any]
    """The message as stored, in the OpenAI format (as ``history()`` returns it)."""
    text: str
    """What was searched in it: its content or text parts, and its tool calls as
    ``name(arguments)``, one per line."""
    created_at: datetime
    score: float
    """Higher is better. It compares the hits of one search only; 0 when every
    word was too common to rank by (then the newest messages come first)."""
    snippet: str
    """Up to a dozen words around the matches, each matched word as ``**word**``,
    ``…`` where text was cut."""


__all__ = [
    "Calibration",
    "Committed",
    "ConversationInfo",
    "ConversationRow",
    "Entry",
    "Head",
    "NewMessage",
    "NewSummary",
    "SearchHit",
    "Segment",
    "Snapshot",
    "StoredMessage",
    "UsageRecord",
    "aware",
    "now",
]
