"""Strategies: which stored messages the next request carries.

A strategy is a plain object with a ``name`` and ``select(state, budget)``
returning a :class:`~conversation_memory.budget.Selection`; a bare function
``(state, budget) -> Selection`` is accepted wherever a strategy is, and so is
a built-in's name (``"truncate"``, ``"window:8"``). Strategies are pure: the
same state and budget give the same selection.

The built-ins share one rule, :func:`keep_newest`. The system prompt, every
pinned message and the newest turn (from the newest user message on) are
always sent; if they can't fit, :class:`~conversation_memory.errors.BudgetExceeded`
says by how much. The summary comes next, when it fits, and then whole units
of the tail from the newest back, stopping at the first that doesn't fit, so
only the oldest end is ever dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeAlias, runtime_checkable

from conversation_memory.budget import Selection, group_units, too_big
from conversation_memory.errors import ConfigurationError
from conversation_memory.tokens import REPLY_PRIMING
from conversation_memory.types import Budget, Item, State

__all__ = [
    "TRUNCATE",
    "FunctionStrategy",
    "Strategy",
    "StrategyLike",
    "Truncate",
    "Window",
    "as_strategy",
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


StrategyLike: TypeAlias = "Strategy | Callable[[State, Budget], Selection] | str"


def keep_newest(state: State, budget: Budget, *, turns: int | None = None) -> Selection:
    """System, pinned, newest turn, summary, then as many newer whole units as fit.

    With ``turns``, no unit older than the ``turns``-th newest user message is kept
    (pinned ones excepted). Tail items the summary covers are not sent: it stands
    in for them.
    """
    summary = state.summary
    tail = state.tail
    if summary is not None:
        tail = [item for item in tail if item.pinned or item.position > summary.end]
    head = group_units(state.pinned)
    units = group_units(tail)

    start = len(units)  # units[start:] is the newest turn, always sent
    for k in range(len(units) - 1, -1, -1):
        if units[k].has_user:
            start = k
            break
    else:
        for k in range(len(units) - 1, -1, -1):
            if units[k].items:
                start = k
                break

    system = state.system.tokens if state.system is not None else 0
    pinned = sum(unit.tokens for unit in head)
    pinned += sum(unit.tokens for unit in units[:start] if unit.pinned)
    newest = sum(unit.tokens for unit in units[start:])
    total = system + pinned + newest + REPLY_PRIMING
    if not budget.fits(total):
        raise too_big(budget, system=system, pinned=pinned, newest=newest)
    if summary is not None and budget.fits(total + summary.tokens):
        total += summary.tokens
    else:
        summary = None

    users = 1 if start < len(units) and units[start].has_user else 0
    cut = start
    for k in range(start - 1, -1, -1):
        unit = units[k]
        if turns is not None and users >= turns:
            break
        if not unit.pinned:
            if not budget.fits(total + unit.tokens):
                break
            total += unit.tokens
        cut = k
        users += unit.has_user

    items: list[Item] = [state.system] if state.system is not None else []
    for unit in head:
        items.extend(unit.items)
    dropped: list[Item] = []
    for unit in units[:cut]:
        if unit.pinned:
            items.extend(unit.items)
        else:
            dropped.extend(unit.source)
    for unit in units[cut:]:
        items.extend(unit.items)
    return Selection(items=tuple(items), summary=summary, dropped=tuple(dropped))


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


_CHOICES = "'truncate', 'window' or 'window:N' (N turns, at least 1)"


def _by_name(text: str) -> Strategy:
    key, colon, argument = text.strip().lower().partition(":")
    argument = argument.strip()
    if key == "truncate" and not colon:
        return TRUNCATE
    if key == "window":
        if not colon:
            return Window()
        if argument.isdigit():
            return Window(turns=int(argument))
    raise ConfigurationError(
        f"unknown strategy {text!r}; choose {_CHOICES}, or pass a strategy object "
        "or a function (state, budget) -> Selection",
        argument="strategy",
        choices=("truncate", "window", "window:N"),
    )


def as_strategy(strategy: StrategyLike) -> Strategy:
    """A :class:`Strategy` from a strategy object, a function, or a built-in's name."""
    if isinstance(strategy, str):
        return _by_name(strategy)
    if not isinstance(strategy, type):
        if callable(getattr(strategy, "select", None)) and isinstance(
            getattr(strategy, "name", None), str
        ):
            return strategy  # type: ignore[return-value]
        if callable(strategy):
            return FunctionStrategy(strategy)
    raise ConfigurationError(
        f"strategy must be a strategy object (name and select(state, budget)), a function "
        f"(state, budget) -> Selection, or one of {_CHOICES}; got {strategy!r}",
        argument="strategy",
    )
