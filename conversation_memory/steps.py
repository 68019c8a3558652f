"""The steps a turn or a compaction asks its driver to take, and the log they reach.

A turn (``turns``) and a compaction (``compaction``) are written once, as
generators without I/O: each yields a step, the driver takes it and sends
the result back (or throws the error in at the ``yield``), until the flow
returns its value. Two drivers run every flow: ``Conversation`` in the
calling thread, ``AsyncConversation`` on the event loop (the shape of httpx's
``auth_flow`` driven by ``sync_auth_flow`` and ``async_auth_flow``). There are
four kinds of step:

- :class:`UseLog`: one transaction of the conversation log (the sync driver
  runs it inline, the async one in a worker thread);
- :class:`CallModel`: the chat model call (``LLM`` or ``AsyncLLM``);
- :class:`Summarize`: the summarizer call (a sync summarizer, or an
  ``async def summarize`` awaited on the loop);
- :class:`Embed`: the new question embedded for recall, before the snapshot
  read (the memory's embeddings endpoint).

The log is reached only through the narrow protocols below, never through
the conversation object: a flow can read a snapshot, commit a turn, store a
summary and take or drop a lease, and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeAlias, TypeVar

if TYPE_CHECKING:
    from conversation_memory.store.leases import Lease
    from conversation_memory.store.log import Learn
    from conversation_memory.store.values import (
        Committed,
        Entry,
        Head,
        NewMessage,
        NewSummary,
        Snapshot,
        UsageRecord,
    )
    from conversation_memory.types import Message, RecallQuery, Summary

T = TypeVar("T")
L = TypeVar("L")


class SnapshotLog(Protocol):
    """Reads a conversation's state in one snapshot."""

    def read(
        self,
        tokens: Callable[[Head], int],
        *,
        cover: bool = False,
        overlap: bool = False,
        recall: Callable[[Snapshot], RecallQuery | None] | None = None,
    ) -> Snapshot: ...


class TurnLog(SnapshotLog, Protocol):
    """What a turn needs of the log: read a snapshot, commit a turn."""

    def commit(
        self,
        batch: Sequence[NewMessage],
        *,
        usage: UsageRecord | None = None,
        learn: Learn | None = None,
    ) -> Committed: ...


class SummaryLog(SnapshotLog, Protocol):
    """What compaction needs of the log: read what to fold, store a summary, record a
    failure, and hold the compaction lease meanwhile."""

    @property
    def stored(self) -> bool:
        """Whether the conversation's row exists yet (a lazy one has none before its
        first turn, so nothing to fold)."""
        ...

    def entries(self, first: int = 0, last: int | None = None) -> list[Entry]: ...

    def summary_cover(self) -> list[Summary]: ...

    def store_summary(self, new: NewSummary) -> Summary | None: ...

    def record_usage(self, usage: UsageRecord) -> None: ...

    def take_lease(self, level: int) -> Lease | None: ...

    def drop_lease(self, lease: Lease) -> None: ...


@dataclass(frozen=True, slots=True)
class UseLog(Generic[L, T]):
    """One transaction of the conversation log; its result is sent back."""

    run: Callable[[L], T]


@dataclass(frozen=True, slots=True)
class CallModel:
    """A chat model call; a ``stream`` is sent back started (connected, so that the
    errors that come before the reply, a context-length error among them, come here)."""

    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    stream: bool = False


@dataclass(frozen=True, slots=True)
class Summarize:
    """A summarizer call: ``previous`` (None at first) followed by ``messages``."""

    previous: str | None
    messages: Sequence[Message]
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Embed:
    """The memory's embeddings model called on ``text``; its vector (float32 bytes) is
    sent back, or its failure thrown in."""

    text: str


Step: TypeAlias = "UseLog[Any, Any] | CallModel | Summarize | Embed"
Flow: TypeAlias = Generator[Step, Any, T]


__all__ = [
    "CallModel",
    "Embed",
    "Flow",
    "SnapshotLog",
    "Step",
    "Summarize",
    "SummaryLog",
    "TurnLog",
    "UseLog",
]
