"""The plain values that flow between the store, the budget code and strategies.

The store turns rows into these; strategies and the budget code see nothing
else, so they stay pure (no I/O) and the sync and async engines share them.
Messages are OpenAI chat-format dicts throughout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from conversation_memory.errors import ConfigurationError

Message = Mapping[str, Any]
"""An OpenAI chat-format message: ``{"role": ..., "content": ...}`` and friends."""


@dataclass(frozen=True, slots=True, init=False)
class Item:
    """One stored message as the budget sees it."""

    position: int
    """Place in the conversation, 0-based, gap-free."""
    message: Message
    tokens: int
    """Counted once when stored, with the per-message overhead included."""
    pinned: bool = False
    """Pinned messages are always sent, like the system prompt."""
    complete: bool = True
    """False for a reply that was cut off (e.g. an abandoned stream)."""

    def __init__(
        self,
        position: int,
        message: Message,
        tokens: int,
        pinned: bool = False,
        complete: bool = True,
    ) -> None:
        # Frozen all the same: the fields are set through their slots' own
        # descriptors. The store makes an item of every message it reads for a
        # request, and the generated frozen __init__ (object.__setattr__ per
        # field) took 1.6 times as long.
        _set_position(self, position)
        _set_message(self, message)
        _set_tokens(self, tokens)
        _set_pinned(self, pinned)
        _set_complete(self, complete)


_set_position, _set_message, _set_tokens, _set_pinned, _set_complete = (
    vars(Item)[name].__set__ for name in ("position", "message", "tokens", "pinned", "complete")
)


@dataclass(frozen=True, slots=True)
class Summary:
    """A stored summary of positions ``start..end`` (inclusive)."""

    start: int
    end: int
    text: str
    tokens: int
    """Tokens of the summary message as sent (overhead included)."""
    level: int = 0
    id: int | None = None


MIN_FACTOR = 1e-3
MAX_FACTOR = 1e3
"""The range of a correction factor: the ratio of two counts of the same prompt. Outside
it a tokenizer is not merely different but broken; inside it the largest prompt that
fits (``budget.largest_fit``) is an ordinary integer."""


@dataclass(frozen=True, slots=True)
class Correction:
    """How far a server's own token count runs from ours: ``ours * factor + margin``."""

    factor: float = 1.0
    margin: int = 0

    def __post_init__(self) -> None:
        factor, margin = self.factor, self.margin
        if (
            isinstance(factor, bool)
            or not isinstance(factor, int | float)
            or not MIN_FACTOR <= factor <= MAX_FACTOR  # NaN fails this too
            or isinstance(margin, bool)
            or not isinstance(margin, int)
            or margin < 0
        ):
            raise ConfigurationError(
                f"a correction needs a factor from {MIN_FACTOR} to {MAX_FACTOR:.0f} and a whole "
                f"margin >= 0 tokens, got Correction(factor={factor!r}, margin={margin!r})",
                argument="correction",
            )

    def apply(self, counted: int) -> int:
        return int(-(-counted * self.factor // 1)) + self.margin


@dataclass(frozen=True, slots=True)
class Budget:
    """Prompt budget: what may be sent is ``window - reserve - tools - margin``."""

    window: int
    """The model's context window in tokens."""
    reserve: int = 0
    """Tokens kept free for the reply (max_tokens)."""
    tools: int = 0
    """Tokens taken by tool definitions sent with the request."""
    margin: int = 0
    """Extra safety margin (or room a strategy keeps for itself), taken off the
    window and the cap alike."""
    cap: int | None = None
    """A caller's own cap on prompt tokens (``budget=``), tool definitions included."""
    correction: Correction = field(default_factory=Correction)
    """Calibration against the server's reported counts."""

    @property
    def limit(self) -> int:
        """Prompt tokens allowed, as the server counts them (messages + priming)."""
        limit = self.window - self.reserve - self.tools - self.margin
        if self.cap is not None:
            # The margin applies under a cap too: hierarchical summaries reserve their
            # room through it, and a cap that ignored it let them overrun the cap.
            limit = min(limit, self.cap - self.tools - self.margin)
        return limit

    def fits(self, counted: int) -> bool:
        """Whether ``counted`` of our tokens stays within the limit after correction."""
        return self.correction.apply(counted) <= self.limit


@dataclass(frozen=True, slots=True)
class Recalled:
    """An earlier turn a search brought back: a candidate for the recall message.

    A *turn* is a user message with everything that answered it (replies, tool
    calls with their results), so what is recalled is never half a question.
    """

    items: tuple[Item, ...]
    """The whole turn, oldest first."""
    score: float
    """How well it matched the query: higher is better; compares candidates of one read."""
    tokens: int = 0
    """Tokens it adds to the recall message (its text, and its range in the header):
    counted when read, an upper bound."""
    text: str = ""
    """The turn as the recall message shows it."""

    @property
    def start(self) -> int:
        return self.items[0].position

    @property
    def end(self) -> int:
        return self.items[-1].position


@dataclass(frozen=True, slots=True)
class RecallQuery:
    """What a recalling strategy asks the store to search for while it reads a state."""

    text: str
    """The words to look for."""
    before: int
    """Search only positions below this one: what is newer is sent as it is."""
    limit: int
    """At most this many turns."""
    vector: bytes | None = None
    """The new question embedded (float32 bytes), when the memory has embeddings and
    the endpoint answered: the messages nearest it are found too, fused with the
    words' ranking. None: by words alone."""
    model: str | None = None
    """The embeddings model ``vector`` is of (the stored vectors it is compared with)."""
    min_similarity: float = 0.0
    """Messages this similar to ``vector`` or less are not found by it."""


@dataclass(frozen=True, slots=True)
class State:
    """What a strategy gets: the conversation as far as the store read it.

    ``tail`` holds the newest messages in order; the store reads back from the
    end until at least the budget is covered (or the summary/start is reached),
    so anything older than ``tail`` could not fit anyway. ``pinned`` are pinned
    messages older than ``tail``.
    """

    system: Item | None
    pinned: Sequence[Item]
    summary: Summary | None
    tail: Sequence[Item]
    has_older: bool = False
    """True when messages older than ``tail`` (and not covered by ``summary``) exist."""
    summaries: Sequence[Summary] = ()
    """For hierarchical summaries: the cover of the summarized range, oldest first
    (highest levels for the oldest periods); ``summary`` is then its last element."""
    older: int = 0
    """How many of those there are, pinned ones excepted (they were not read)."""
    older_from: int = 0
    """Position of the oldest of them (just after the summary, or 0)."""
    recalled: Sequence[Recalled] = ()
    """Earlier turns found for a recalling strategy, best match first (empty otherwise)."""
    recall_overhead: int = 0
    """Tokens of the recall message around its turns (role, header), when there are any."""
