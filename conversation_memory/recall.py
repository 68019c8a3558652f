"""Recall: bring back the earlier turns that match the new question.

:class:`Recall` wraps another strategy (truncation by default; a rolling
summary in ``summary+recall``). Before each request it asks, through
:meth:`Recall.recall_query`, for a search of the history the request will not
send as it is: the new user message's words (and, for a short follow-up such
as "and what about the second one?", the previous user message's too). The
store runs that search in the same snapshot read as the rest of the state and
brings back the best-matching whole turns (``State.recalled``); nothing is
stored, the archive is only read. When the memory has embeddings, the engine
embeds :func:`vector_text` first and the store fuses the messages nearest that
vector with the words' hits, so a turn is found by meaning too.

:meth:`Recall.select` lets the wrapped strategy choose within ``1 - share``
of the budget, then fills what is left with the best candidates, whole turns
only, none of whose messages the request already sends, never over the
budget. They are sent as one message after the summary and before the newest
turns, oldest first (:mod:`~conversation_memory.retrieval`). Pure: no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from conversation_memory.budget import largest_fit
from conversation_memory.errors import BudgetExceeded, ConfigurationError
from conversation_memory.strategies import TRUNCATE, Strategy
from conversation_memory.tokens import REPLY_PRIMING
from conversation_memory.types import Budget, Item, Recalled, RecallQuery, State
from conversation_memory.units import Selection

__all__ = ["STOP_WORDS", "Recall", "query_text", "vector_text"]

_COMMON = """a about above after again all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each else few
    for from further had has have having he her here hers him his how i if in into is it
    its itself just let me more most my myself no nor not now of off on once only or other
    our ours out over own please same she should so some such tell than that the their them
    then there these they this those through to too under until up very was we were what
    when where which while who whom why will with would you your yours yes ok okay thanks
    thank know think said say"""
STOP_WORDS = frozenset(_COMMON.split())
"""Words too common to say what a message is about; left out of a query."""
FOLLOW_UP = 3
"""A user message with fewer content words than this is a follow-up: the previous
user message's words join the query."""
MAX_QUERY_WORDS = 8
_WORD = re.compile(r"\w+", re.UNICODE)
_DELEGATED = frozenset({"summary_cap", "hierarchical", "overlap"})


def _words(message: Mapping[str, Any]) -> list[str]:
    content = message.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, Sequence):
        text = " ".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        )
    else:
        return []
    return [w for w in _WORD.findall(text.casefold()) if w not in STOP_WORDS and len(w) > 1]


def query_text(tail: Sequence[Item]) -> str:
    """The words to search for: the newest user message's content words, and the previous
    user message's when the newest is a short follow-up (empty: nothing to search for).

    At most :data:`MAX_QUERY_WORDS`, the newest message's first and, within each
    message, the longest (long words tend to be the rare, telling ones; each word
    costs the search a probe of the index).
    """
    words: list[str] = []
    asked = 0
    for item in reversed(tail):
        if item.message.get("role") != "user":
            continue
        found = sorted(dict.fromkeys(_words(item.message)), key=len, reverse=True)
        words += [word for word in found if word not in words]
        asked += 1
        if asked == 2 or len(words) >= FOLLOW_UP:
            break
    return " ".join(words[:MAX_QUERY_WORDS])


def vector_text(new: Sequence[Mapping[str, Any]]) -> str:
    """The text to embed for a turn's new messages (empty: none to embed): their
    query's words, as :func:`query_text` takes them from the newest user message.

    The engine embeds it before the snapshot read (a network call never runs inside
    a transaction), so it sees only the new messages: a short follow-up's vector is
    of its own words; the previous question's words join the words' search only.
    """
    items = [Item(position=n, message=message, tokens=0) for n, message in enumerate(new)]
    return query_text(items)


@dataclass(frozen=True)
class Recall:
    """Another strategy, plus the earlier turns that match the new question.

    ``base`` chooses within ``1 - share`` of the budget; the best of at most
    ``k`` recalled turns fill the rest. A strategy that recalls has
    :meth:`recall_query`, which the engine calls while it reads the state.
    """

    base: Strategy = field(default_factory=lambda: TRUNCATE)
    share: float = 0.25
    """The part of the budget kept for recalled turns (what the base leaves unused
    is theirs too)."""
    k: int = 4
    """The most turns recalled per request."""

    def __post_init__(self) -> None:
        share, k = self.share, self.k
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share < 1:
            raise ConfigurationError(
                f"Recall(share=...) is the part of the budget for recalled turns, more than 0 "
                f"and less than 1 (e.g. 0.25); got {share!r}",
                argument="share",
            )
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 50:
            raise ConfigurationError(
                f"Recall(k=...) is the most turns recalled, a whole number from 1 to 50; got {k!r}",
                argument="k",
            )
        if isinstance(self.base, Recall) or not (
            callable(getattr(self.base, "select", None))
            and isinstance(getattr(self.base, "name", None), str)
        ):
            raise ConfigurationError(
                f"Recall(base=...) must be a strategy (name and select) that does not recall "
                f"itself; got {self.base!r}",
                argument="base",
            )

    def __getattr__(self, name: str) -> Any:
        # A summarizing base stays one: compaction and the read see its summary_cap,
        # overlap and hierarchy through this wrapper (absent when the base lacks them).
        if name in _DELEGATED:
            return getattr(object.__getattribute__(self, "base"), name)
        raise AttributeError(name)

    @property
    def name(self) -> str:
        base = self.base.name
        name = "recall" if base == TRUNCATE.name else f"{base}+recall"
        if (self.share, self.k) != (0.25, 4):
            name += f":share={self.share:g},k={self.k}"
        return name

    def _base_budget(self, budget: Budget) -> Budget:
        return replace(budget, margin=budget.margin + int(budget.limit * self.share))

    def recall_query(self, state: State, budget: Budget) -> RecallQuery | None:
        """What to search for: the query's words, below what the base sends as it is."""
        text = query_text(state.tail)
        if not text or not state.tail:
            return None
        try:
            selection = self.base.select(state, self._base_budget(budget))
        except BudgetExceeded:
            return None  # the must-send part needs the whole budget: nothing is recalled
        start = state.tail[0].position
        kept = [i.position for i in selection.items if i.position >= start and not i.pinned]
        before = min(kept, default=state.tail[-1].position + 1)
        return RecallQuery(text=text, before=before, limit=self.k) if before > 0 else None

    def select(self, state: State, budget: Budget) -> Selection:
        """The base's choice within ``1 - share``, the best recalled turns in the rest;
        then the base again, given all the room the chosen turns leave."""
        try:
            first = self.base.select(state, self._base_budget(budget))
        except BudgetExceeded:
            return self.base.select(state, budget)
        chosen = self._choose(state, budget, first)
        if not chosen:
            return self.base.select(state, budget)
        recall = state.recall_overhead + sum(turn.tokens for turn in chosen)
        # In our own tokens: the base's margin is in the server's, so apply the factor.
        room = replace(budget, margin=budget.margin + math.ceil(recall * budget.correction.factor))
        try:
            selection = self.base.select(state, room)
        except BudgetExceeded:
            selection = first  # it fit beside the chosen turns
        sent = {item.position for item in selection.items}
        kept = tuple(t for t in chosen if not any(i.position in sent for i in t.items))
        return replace(selection, recalled=kept) if kept else selection

    def _choose(self, state: State, budget: Budget, selection: Selection) -> list[Recalled]:
        """The best recalled turns, oldest first, that fit beside ``selection`` and repeat
        none of its messages (none without a tail sent: they stand before it)."""
        start = state.tail[0].position if state.tail else None
        if not state.recalled or not any(
            start is not None and i.position >= start for i in selection.items
        ):
            return []
        summaries = selection.summaries or (
            (selection.summary,) if selection.summary is not None else ()
        )
        used = sum(item.tokens for item in selection.items) + REPLY_PRIMING
        used += sum(each.tokens for each in summaries)
        room = largest_fit(budget) - used - state.recall_overhead
        taken = {item.position for item in selection.items}
        chosen: list[Recalled] = []
        for turn in sorted(state.recalled, key=lambda each: -each.score):
            if len(chosen) == self.k:
                break
            if turn.tokens > room or any(item.position in taken for item in turn.items):
                continue
            room -= turn.tokens
            taken.update(item.position for item in turn.items)
            chosen.append(turn)
        return sorted(chosen, key=lambda each: each.start)
