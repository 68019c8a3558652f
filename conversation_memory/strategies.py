"""Strategies: which stored messages the next request carries.

A strategy is a plain object with a ``name`` and ``select(state, budget)``
returning a :class:`~conversation_memory.units.Selection`; a bare function
``(state, budget) -> Selection`` is accepted wherever a strategy is, and so is
a built-in's name (``"truncate"``, ``"window:8"``, ``"summary+recall"``: see
:mod:`~conversation_memory.strategy_names`). Strategies are pure: the same
state and budget give the same selection. Recalling earlier turns is a
wrapper of these (:mod:`~conversation_memory.recall`).

The built-ins share one rule, :func:`keep_newest`: the newest whole turns. A
*turn* is a user message with everything that answers it (replies, tool calls
and their results), up to the next user message. The system prompt and every
pinned message are always sent, and so is the newest turn; the summary comes
next, when it fits, and then older turns from the newest back, each whole or
not at all, stopping at the first that doesn't fit, so only the oldest end is
ever dropped. So the history sent after the system part (and after a summary)
begins with a question: strict chat templates of local models (llama.cpp,
vLLM and Ollama serving Mistral, Gemma, Llama) refuse anything else, and a
model shown an answer without its question is misled.

One turn can be larger than the whole budget: an agent's long tool loop. The
newest turn is then sent from its newest end, as many whole units (a tool
call with its results is one) as fit, without its question: the one case a
request starts mid-turn, and the alternative would be a conversation that can
never go on. Only when its newest unit alone (with the system prompt and the
pinned messages) can't fit does
:class:`~conversation_memory.errors.BudgetExceeded` say by how much. An older
turn larger than the budget is simply left out.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import ClassVar, Protocol, TypeAlias, runtime_checkable

from conversation_memory.budget import largest_fit, too_big
from conversation_memory.errors import BudgetExceeded, ConfigurationError
from conversation_memory.tokens import REPLY_PRIMING
from conversation_memory.types import Budget, Item, State, Summary
from conversation_memory.units import Selection, Unit, group_units

__all__ = [
    "TRUNCATE",
    "FunctionStrategy",
    "Hierarchical",
    "Strategy",
    "StrategyLike",
    "Summarize",
    "Summarizing",
    "Truncate",
    "Window",
    "keep_newest",
]


@runtime_checkable
class Strategy(Protocol):
    """Chooses what to send from a conversation's state."""

    @property
    def name(self) -> str:
        """Short name shown in reports and the lab."""
        ...

    def select(self, state: State, budget: Budget) -> Selection:
        """What to send next within ``budget``."""
        ...


@runtime_checkable
class Summarizing(Protocol):
    """An optional ability: a strategy that folds old turns into summaries.

    Its selections may carry ``fold_through``; compaction runs only for
    strategies with this ability, and sizes each summary by ``summary_cap``.
    """

    def summary_cap(self, budget: Budget) -> int:
        """The most tokens one summary may take."""
        ...


StrategyLike: TypeAlias = "Strategy | Callable[[State, Budget], Selection] | str"


def keep_newest(
    state: State, budget: Budget, *, turns: int | None = None, overlap: bool = False
) -> Selection:
    """System, pinned, the newest turn, summary, then as many older whole turns as fit.

    A turn too large for the budget is sent from its newest end if it is the newest
    (see the module docstring), else left out. With ``turns``, no turn older than
    the ``turns``-th newest user message is kept (pinned messages excepted). Tail
    items the summary covers are not sent (with ``overlap``, they may be): it stands
    in for them.
    """
    return _keep_newest(state, budget, turns=turns, overlap=overlap)[0]


def _keep_newest(
    state: State, budget: Budget, *, turns: int | None, overlap: bool
) -> tuple[Selection, list[Unit], Sequence[Item]]:
    """:func:`keep_newest`, with the units it grouped and the tail they came from."""
    summary = state.summary
    tail = state.tail
    if summary is not None and not overlap:
        tail = [item for item in tail if item.pinned or item.position > summary.end]
    head = group_units(state.pinned)
    units = group_units(tail)
    # ``fits(n)`` is ``bound >= n``: one comparison instead of a correction per unit.
    fits = partial(operator.ge, largest_fit(budget))

    # units[turn:] is the newest turn: from the newest user message on (the whole
    # tail when it has none); units[last:] its newest unit, which is always sent.
    backwards = range(len(units) - 1, -1, -1)
    turn = next((k for k in backwards if units[k].has_user), 0)
    last = next((k for k in backwards if units[k].items), len(units))

    system = state.system.tokens if state.system is not None else 0
    pinned = sum(unit.tokens for unit in head)
    pinned += sum(unit.tokens for unit in units[:last] if unit.pinned)
    newest = sum(unit.tokens for unit in units[last:])
    total = system + pinned + newest + REPLY_PRIMING
    if not fits(total):
        raise too_big(budget, system=system, pinned=pinned, newest=newest)

    def keep(k: int) -> bool:
        """Add units[k] to what is sent if it fits (pinned ones are counted already)."""
        nonlocal total
        if units[k].pinned:
            return True
        if not fits(total + units[k].tokens):
            return False
        total += units[k].tokens
        return True

    cut = last
    while cut > turn and keep(cut - 1):
        cut -= 1
    if summary is not None and fits(total + summary.tokens):
        total += summary.tokens
    else:
        summary = None
    if cut == turn:  # the newest turn fits whole: add older turns, whole ones only
        users = 1 if turn < len(units) and units[turn].has_user else 0
        while cut > 0 and (turns is None or users < turns) and keep(cut - 1):
            cut -= 1
            users += units[cut].has_user
        while cut < turn and not units[cut].has_user:
            cut += 1  # the walk stopped inside a turn: its question is gone, so are its replies

    items: list[Item] = [state.system] if state.system is not None else []
    for unit in head:
        items.extend(unit.items)
    dropped: list[Item] = []
    for unit in units[:cut]:
        if unit.pinned:
            items.extend(unit.items)
        elif unit.items:  # an orphan tool result (no items) is not left out to fit
            dropped.extend(unit.source)
    for unit in units[cut:]:
        items.extend(unit.items)
    selection = Selection(items=tuple(items), summary=summary, dropped=tuple(dropped))
    return selection, units, tail


@dataclass(frozen=True, slots=True)
class Truncate:
    """Send as much of the newest history as fits; use the singleton :data:`TRUNCATE`."""

    name: ClassVar[str] = "truncate"

    def select(self, state: State, budget: Budget) -> Selection:
        return keep_newest(state, budget)


TRUNCATE = Truncate()


@dataclass(frozen=True, slots=True)
class Window:
    """Like truncate, but at most the last ``turns`` turns (a turn starts at a user message)."""

    turns: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.turns, bool) or not isinstance(self.turns, int) or self.turns < 1:
            raise ConfigurationError(
                f"Window(turns=...) must be a whole number of turns, at least 1; "
                f"got {self.turns!r}",
                argument="turns",
            )

    @property
    def name(self) -> str:
        return f"window:{self.turns}"

    def select(self, state: State, budget: Budget) -> Selection:
        return keep_newest(state, budget, turns=self.turns)


@dataclass(frozen=True, slots=True)
class FunctionStrategy:
    """A bare ``(state, budget) -> Selection`` function used as a strategy."""

    function: Callable[[State, Budget], Selection]

    @property
    def name(self) -> str:
        return getattr(self.function, "__name__", type(self.function).__name__)

    def select(self, state: State, budget: Budget) -> Selection:
        return self.function(state, budget)


@dataclass(frozen=True, slots=True)
class Summarize:
    """Rolling summary: past a high-water mark, fold the oldest turns into the summary.

    Wraps another strategy (truncation by default), which still chooses what
    this request sends: folding happens in a compaction step, before or after
    the request, and the next requests send the new summary instead of the
    folded turns. When system + pinned + summary + the unfolded turns would
    pass ``high`` of the limit, the fold point is put where the turns left
    would take ``low`` of it, counting a full-size summary (``summary_tokens``).
    The summarizer sees only the previous summary and the newly folded turns,
    so each message is summarized about once.
    """

    high: float = 0.9
    low: float = 0.6
    summary_tokens: int | None = None
    """Cap on a summary's size; default: a quarter of the limit, at most 1,024."""
    inner: Strategy = field(default_factory=lambda: TRUNCATE)
    overlap: bool = True
    """Fill the room left beside the summary with the newest turns, even ones it
    already covers (with truncation as the inner strategy): the budget stays
    full between folds instead of sinking to ``low`` after each one."""

    def __post_init__(self) -> None:
        if not (0 < self.low < self.high <= 1):
            raise ConfigurationError(
                f"summary strategy needs 0 < low < high <= 1, got low={self.low}, high={self.high}",
                argument="high" if self.high > 1 else "low",
            )
        if self.summary_tokens is not None and (
            isinstance(self.summary_tokens, bool)
            or not isinstance(self.summary_tokens, int)
            or self.summary_tokens < 16
        ):
            raise ConfigurationError(
                f"summary_tokens must be a whole number >= 16, got {self.summary_tokens!r}",
                argument="summary_tokens",
            )

    @property
    def name(self) -> str:
        if (self.high, self.low) == (0.9, 0.6):
            return "summary"
        return f"summary:high={self.high:g},low={self.low:g}"

    def summary_cap(self, budget: Budget) -> int:
        if self.summary_tokens is not None:
            return self.summary_tokens
        return max(16, min(1024, budget.limit // 4))

    def select(self, state: State, budget: Budget) -> Selection:
        if self.overlap and isinstance(self.inner, Truncate):
            selection, units, tail = _keep_newest(state, budget, turns=None, overlap=True)
            fold = self._fold_point(state, budget, grouped=(tail, units))
        else:
            selection = self.inner.select(state, budget)
            fold = self.fold_point(state, budget)
        return replace(selection, fold_through=fold) if fold is not None else selection

    def fold_point(self, state: State, budget: Budget) -> int | None:
        """The last position to fold, or None while the unfolded turns stay under ``high``."""
        return self._fold_point(state, budget)

    def _fold_point(
        self,
        state: State,
        budget: Budget,
        grouped: tuple[Sequence[Item], list[Unit]] | None = None,
    ) -> int | None:
        """:meth:`fold_point`; ``grouped`` is ``state.tail`` with its units, if already known."""
        factor = max(budget.correction.factor, 1e-9)
        limit = (budget.limit - budget.correction.margin) / factor  # in our own tokens
        after = state.summary.end if state.summary is not None else -1
        tail = [item for item in state.tail if item.position > after]
        fixed = REPLY_PRIMING + (state.system.tokens if state.system is not None else 0)
        fixed += sum(item.tokens for item in state.pinned)
        fixed += sum(item.tokens for item in tail if item.pinned)
        summary = state.summary.tokens if state.summary is not None else 0
        loose = sum(item.tokens for item in tail if not item.pinned)
        if not state.has_older and fixed + summary + loose <= self.high * limit:
            return None
        room = self.low * limit - fixed - self.summary_cap(budget)
        units = _units_after(grouped, len(state.tail) - len(tail), after) if grouped else None
        if units is None:
            units = group_units(tail)
        newest = len(units)
        for k in range(len(units) - 1, -1, -1):
            if units[k].has_user:
                newest = k
                break
        kept = 0
        start = len(units)
        for k in range(len(units) - 1, -1, -1):
            tokens = 0 if units[k].pinned else units[k].tokens
            if k < newest and kept + tokens > room:
                break
            kept += tokens
            start = k
        while start < newest and not units[start].has_user:
            start += 1  # keep whole turns: what stays begins with a user message
        if (start == 0 and not state.has_older) or not tail:
            return None  # nothing older than what is kept, or no position to fold up to
        first_kept = units[start].source[0].position if start < len(units) else None
        fold = (first_kept - 1) if first_kept is not None else tail[-1].position
        return fold if fold > after else None


def _units_after(
    grouped: tuple[Sequence[Item], list[Unit]], covered: int, after: int
) -> list[Unit] | None:
    """``group_units`` of the tail past ``after``, taken from the units of the whole tail.

    ``covered`` tail items are at or before ``after``. When they are the first
    ones and end where a unit ends, grouping the rest gives the units that follow
    (grouping only looks forward); otherwise None, and the caller groups anew.
    """
    tail, units = grouped
    if covered == 0:
        return units
    if any(item.position > after for item in tail[:covered]):
        return None
    count = 0
    for k, unit in enumerate(units):
        if count == covered:
            return units[k:]
        count += len(unit.source)
    return [] if count == covered else None


@dataclass(frozen=True, slots=True)
class Hierarchical:
    """Summaries of summaries: recent periods in detail, older ones ever more condensed.

    Folding works like :class:`Summarize`, but each fold becomes a level-0
    summary of just the folded turns; once ``fanout`` summaries of one level
    follow each other, compaction merges them into one summary a level up.
    What is sent is the *cover* of the summarized range: the highest-level
    summaries for the oldest periods, then lower levels, each its own
    message, so the summary part stays bounded (about ``fanout`` per level)
    while recent periods keep their detail. When the cover doesn't fit beside
    what must be sent, its oldest summaries are left out first.
    """

    fanout: int = 4
    high: float = 0.9
    low: float = 0.6
    summary_tokens: int | None = None
    inner: Strategy = field(default_factory=lambda: TRUNCATE)

    hierarchical: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.fanout, bool) or not isinstance(self.fanout, int) or self.fanout < 2:
            raise ConfigurationError(
                f"fanout must be a whole number >= 2, got {self.fanout!r}", argument="fanout"
            )
        self._rolling()  # validates high, low and summary_tokens

    def _rolling(self) -> Summarize:
        return Summarize(
            high=self.high, low=self.low, summary_tokens=self.summary_tokens, inner=self.inner
        )

    @property
    def name(self) -> str:
        if (self.fanout, self.high, self.low) == (4, 0.9, 0.6):
            return "hierarchical"
        return f"hierarchical:fanout={self.fanout},high={self.high:g},low={self.low:g}"

    def summary_cap(self, budget: Budget) -> int:
        """Each summary's cap: the summary share of the budget over the cover's usual size."""
        if self.summary_tokens is not None:
            return self.summary_tokens
        return max(16, min(512, budget.limit // (4 * self.fanout)))

    def select(self, state: State, budget: Budget) -> Selection:
        cover = list(state.summaries or ((state.summary,) if state.summary else ()))
        end = cover[-1].end if cover else -1
        tail = [item for item in state.tail if item.pinned or item.position > end]
        bare = replace(state, summary=None, summaries=(), tail=tail)
        while True:
            # The calibration factor applies to the summaries too.
            room = math.ceil(sum(each.tokens for each in cover) * budget.correction.factor)
            try:
                selection = self.inner.select(bare, replace(budget, margin=budget.margin + room))
                break
            except BudgetExceeded:
                if not cover:
                    raise
                cover.pop(0)  # the oldest, most condensed period goes first
        fold = self._rolling().fold_point(
            replace(state, summary=_as_one(cover) if cover else None), budget
        )
        return replace(selection, summary=None, summaries=tuple(cover), fold_through=fold)


def _as_one(cover: list[Summary]) -> Summary:
    """The cover as one summary, for the fold arithmetic (range and total size)."""
    return Summary(
        start=cover[0].start,
        end=cover[-1].end,
        text="",
        tokens=sum(each.tokens for each in cover),
    )
