"""Fitting a conversation into a budget: run a strategy, and assemble what it chose.

:func:`build` is the step every request goes through: a strategy (an object,
a function or a built-in's name, :func:`~conversation_memory.strategy_names.as_strategy`)
reads a :class:`~conversation_memory.types.State` and returns a
:class:`~conversation_memory.units.Selection`, and
:func:`~conversation_memory.budget.assemble` turns that into the checked
request with its report. :func:`fit` does the same for a plain list of
messages, with the truncate strategy, for callers who keep their own history.

This module sits above both the strategies and the budget code, so neither of
those needs the other: strategies choose within the budget's limits, and the
budget code assembles a selection without knowing who made it. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from conversation_memory.budget import Context, assemble, budget_for
from conversation_memory.errors import ConfigurationError, InvalidPayload
from conversation_memory.messages import check_message
from conversation_memory.registry import default_registry
from conversation_memory.strategies import TRUNCATE, StrategyLike
from conversation_memory.strategy_names import as_strategy
from conversation_memory.tokens import TokenCounter, counter_for
from conversation_memory.types import Budget, Item, Message, State
from conversation_memory.units import Selection

__all__ = ["build", "fit"]


def build(state: State, budget: Budget, strategy: StrategyLike = "truncate") -> Context:
    """Run ``strategy`` on ``state`` and assemble, check and report the next request.

    Raises :class:`~conversation_memory.errors.BudgetExceeded` when the system
    prompt, pinned messages and newest message cannot fit, and
    :class:`~conversation_memory.errors.InvalidPayload` when the strategy's
    choice breaks the API's rules.
    """
    chosen = as_strategy(strategy)
    selection = chosen.select(state, budget)
    if not isinstance(selection, Selection):
        raise ConfigurationError(
            f"strategy {chosen.name!r} returned {type(selection).__name__}, not a Selection",
            strategy=chosen.name,
        )
    return assemble(state, budget, selection, strategy=chosen.name)


def fit(
    messages: Sequence[Message],
    *,
    model: str = "gpt-4o",
    budget: int | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    counter: TokenCounter | None = None,
) -> list[dict[str, Any]]:
    """The newest part of ``messages`` that fits: leading system messages kept, oldest turns
    dropped whole.

    ``budget`` caps the prompt tokens (default: the model's window minus its reply
    reserve; a model missing from the registry then needs ``budget=``). ``counter``
    is a :class:`~conversation_memory.tokens.TokenCounter` (default: the model's).
    Raises :class:`~conversation_memory.errors.BudgetExceeded` when the system
    messages and the newest turn alone don't fit, and
    :class:`~conversation_memory.errors.InvalidMessage` when a message breaks the
    chat format (each is checked, sent or not).
    """
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
        raise ConfigurationError(
            f"budget must be a number of prompt tokens, got {budget!r}", argument="budget"
        )
    if counter is None:
        counter = counter_for(model)  # raises UnknownModel, which says to pass counter=
    tool_tokens = counter.count_tools(tools) if tools else 0
    if model in default_registry:
        limits = budget_for(model, tools=tool_tokens, cap=budget)
    elif budget is not None:
        limits = Budget(window=budget + tool_tokens, tools=tool_tokens, cap=budget)
    else:
        limits = budget_for(model)  # raises UnknownModel, which says to pass budget=
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise InvalidPayload(f"messages must be a list of dicts, got {type(messages).__name__}")
    items = []
    lead = 0
    for position, message in enumerate(messages):
        role = check_message(message, index=position)
        if role in ("system", "developer") and lead == position:
            lead += 1
        tokens = counter.count_message(message)
        items.append(
            Item(position=position, message=message, tokens=tokens, pinned=0 < position < lead)
        )
    state = State(
        system=items[0] if lead else None,
        pinned=items[1:lead],
        summary=None,
        tail=items[lead:],
    )
    return build(state, limits, TRUNCATE).messages
