"""The built-in strategies and how strategies are named, wrapped and resolved."""

from __future__ import annotations

from typing import Any

import pytest

from conversation_memory.budget import explain
from conversation_memory.errors import BudgetExceeded, ConfigurationError
from conversation_memory.fitting import build
from conversation_memory.strategies import (
    TRUNCATE,
    FunctionStrategy,
    Strategy,
    Truncate,
    Window,
    keep_newest,
)
from conversation_memory.strategy_names import as_strategy
from conversation_memory.types import Budget, Correction, Item, State, Summary
from conversation_memory.units import Selection

SYSTEM = {"role": "system", "content": "sys"}


def call(call_id: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": "f", "arguments": "{}"}}


def msg(role: str, text: str = "x") -> dict[str, Any]:
    return {"role": role, "content": text}


def calls(*ids: str) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [call(i) for i in ids]}


def result(call_id: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": "r"}


def state(*messages: dict[str, Any], pinned: tuple[int, ...] = (), tokens: int = 10) -> State:
    """A state whose whole history (after the system prompt at 0) is the tail."""
    history = [Item(0, SYSTEM, 5)] + [
        Item(p, m, tokens, pinned=p in pinned) for p, m in enumerate(messages, start=1)
    ]
    return State(system=history[0], pinned=(), summary=None, tail=history[1:])


def positions(selection: Selection) -> list[int]:
    return [item.position for item in selection.items]


def conversation(turns: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for n in range(turns):
        out += [msg("user", f"q{n}"), msg("assistant", f"a{n}")]
    return out


# --- resolving strategies -------------------------------------------------------------


def test_names_resolve_to_built_ins() -> None:
    assert as_strategy("truncate") is TRUNCATE
    assert as_strategy(" Truncate ") is TRUNCATE
    assert as_strategy("window") == Window()
    assert as_strategy("window:8") == Window(turns=8)
    assert as_strategy("window:8").name == "window:8"
    assert TRUNCATE.name == "truncate"
    assert Truncate() == TRUNCATE
    assert as_strategy(TRUNCATE) is TRUNCATE


@pytest.mark.parametrize(
    "name", ["summarise", "window:0", "window:-1", "window:x", "truncate:3", ""]
)
def test_unknown_names_list_the_choices(name: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        as_strategy(name)
    assert "window" in str(info.value).lower()


def test_window_needs_a_positive_whole_number() -> None:
    for bad in (0, -2, True, 2.5, "3"):
        with pytest.raises(ConfigurationError, match="at least 1"):
            Window(turns=bad)  # type: ignore[arg-type]


def test_functions_become_strategies_named_after_them() -> None:
    def newest_only(state: State, budget: Budget) -> Selection:
        return keep_newest(state, budget, turns=1)

    strategy = as_strategy(newest_only)
    assert isinstance(strategy, FunctionStrategy)
    assert isinstance(strategy, Strategy)
    assert strategy.name == "newest_only"
    context = build(state(*conversation(3), msg("user")), Budget(window=1000), newest_only)
    assert context.report.strategy == "newest_only"
    assert len(context.messages) == 2


def test_objects_with_select_are_used_as_they_are() -> None:
    class Mine:
        name = "mine"

        def select(self, state: State, budget: Budget) -> Selection:
            return TRUNCATE.select(state, budget)

    mine = Mine()
    assert as_strategy(mine) is mine


@pytest.mark.parametrize("bad", [3, None, Truncate, object()])
def test_other_things_are_refused(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="strategy must be"):
        as_strategy(bad)


# --- truncate -------------------------------------------------------------------------


def test_everything_is_sent_when_it_fits() -> None:
    s = state(*conversation(3), msg("user"))
    selection = TRUNCATE.select(s, Budget(window=1000))
    assert positions(selection) == list(range(8))
    assert selection.dropped == ()
    assert selection.fold_through is None


def test_oldest_whole_turns_are_dropped_first() -> None:
    s = state(msg("user"), calls("a", "b"), result("a"), result("b"), msg("assistant"), msg("user"))
    # system 5 + priming 3 + newest 10 = 18; the older turn (1 to 5) needs 50 more.
    selection = TRUNCATE.select(s, Budget(window=67))
    assert positions(selection) == [0, 6]  # its replies fit, but not without its question
    assert [i.position for i in selection.dropped] == [1, 2, 3, 4, 5]
    selection = TRUNCATE.select(s, Budget(window=68))
    assert positions(selection) == [0, 1, 2, 3, 4, 5, 6]


def test_a_turn_is_kept_whole_or_not_at_all() -> None:
    """The replies of a turn whose question no longer fits are not sent: a context never
    starts with an answer (strict chat templates refuse it, and it misleads the model)."""
    s = state(*conversation(3), msg("user"))
    for window in range(18, 90):
        selection = TRUNCATE.select(s, Budget(window=window))
        history = [i.message["role"] for i in selection.items[1:]]
        assert history[0] == "user", (window, history)
        assert len(history) % 2 == 1  # whole question-and-answer turns, then the new question


def test_a_big_unit_stops_the_walk_back_nothing_older_is_kept() -> None:
    s = state(msg("user"), msg("assistant"), msg("user"), msg("assistant"), msg("user"))
    big = State(
        system=s.system,
        pinned=(),
        summary=None,
        tail=[*s.tail[:3], Item(4, msg("assistant"), 100), s.tail[4]],
    )
    selection = TRUNCATE.select(big, Budget(window=60))
    assert positions(selection) == [0, 5]


def test_newest_turn_is_kept_whole_or_else_its_newest_part() -> None:
    s = state(msg("user"), msg("assistant"), msg("user"), calls("a"), result("a"))
    selection = TRUNCATE.select(s, Budget(window=38))
    assert positions(selection) == [0, 3, 4, 5]
    # Larger than the budget, the newest turn (an agent's tool loop) goes on from its
    # newest whole units: without its question, the one case a context starts mid-turn.
    selection = TRUNCATE.select(s, Budget(window=37))
    assert positions(selection) == [0, 4, 5]
    context = build(s, Budget(window=37))  # the validator allows it, and the report says so
    assert context.report.partial_turn == 3
    assert "the newest turn (from position 3) is larger than the budget" in explain(context)
    assert build(s, Budget(window=38)).report.partial_turn is None
    with pytest.raises(BudgetExceeded) as info:
        TRUNCATE.select(s, Budget(window=27))
    assert info.value.newest == 20  # the call with its result: never split


def test_without_a_user_message_the_newest_unit_is_kept() -> None:
    s = state(msg("assistant"), calls("a"), result("a"))
    assert positions(TRUNCATE.select(s, Budget(window=28))) == [0, 2, 3]


def test_pinned_tail_messages_keep_their_place() -> None:
    s = state(*conversation(4), msg("user"), pinned=(2,))
    selection = TRUNCATE.select(s, Budget(window=38))
    assert positions(selection) == [0, 2, 9]  # 8 would fit, but not its question (7)
    assert [i.position for i in selection.dropped] == [1, 3, 4, 5, 6, 7, 8]
    assert positions(TRUNCATE.select(s, Budget(window=48))) == [0, 2, 7, 8, 9]


def test_pinned_older_messages_come_before_the_summary_and_are_repaired() -> None:
    old = [Item(1, msg("user", "remember"), 10, pinned=True), Item(3, calls("a"), 10, pinned=True)]
    tail = [Item(p, m, 10) for p, m in enumerate([result("a"), msg("user")], start=4)]
    s = State(
        system=Item(0, SYSTEM, 5),
        pinned=old,
        summary=Summary(1, 3, "earlier", 7),
        tail=tail,
    )
    context = build(s, Budget(window=1000), TRUNCATE)
    assert [m["role"] for m in context.messages] == ["system", "user", "system", "user"]
    assert context.report.repaired == (3,)
    assert context.report.orphaned == (4,)


def test_summary_is_sent_when_it_fits_and_left_out_when_not() -> None:
    base = state(*conversation(2), msg("user"))
    s = State(base.system, (), Summary(0, 0, "before", 25), base.tail)
    assert TRUNCATE.select(s, Budget(window=43)).summary is not None
    assert positions(TRUNCATE.select(s, Budget(window=43))) == [0, 5]
    selection = TRUNCATE.select(s, Budget(window=42))
    assert selection.summary is None
    assert positions(selection) == [0, 3, 4, 5]  # the room it left takes an older turn


def test_tail_items_the_summary_covers_are_not_sent() -> None:
    base = state(*conversation(3), msg("user"), pinned=(2,))
    s = State(base.system, (), Summary(1, 4, "covered", 8), base.tail)
    selection = TRUNCATE.select(s, Budget(window=1000))
    assert positions(selection) == [0, 2, 5, 6, 7]
    assert selection.dropped == ()


def test_the_correction_is_applied() -> None:
    s = state(*conversation(5), msg("user"))
    plain = TRUNCATE.select(s, Budget(window=100))
    corrected = TRUNCATE.select(s, Budget(window=100, correction=Correction(factor=1.5)))
    assert len(corrected.items) < len(plain.items)


def test_tail_starting_with_orphan_results_drops_them() -> None:
    s = state(result("old"), result("older"), msg("user"), msg("assistant"), msg("user"))
    selection = TRUNCATE.select(s, Budget(window=1000))
    assert positions(selection) == [0, 3, 4, 5]
    context = build(s, Budget(window=1000))
    assert context.report.orphaned == (1, 2)


# --- window ---------------------------------------------------------------------------


def test_window_keeps_at_most_n_turns() -> None:
    s = state(*conversation(5), msg("user"))
    assert positions(Window(turns=1).select(s, Budget(window=1000))) == [0, 11]
    assert positions(Window(turns=3).select(s, Budget(window=1000))) == [0, 7, 8, 9, 10, 11]
    assert len(Window(turns=50).select(s, Budget(window=1000)).items) == 12


def test_window_still_respects_the_budget() -> None:
    s = state(*conversation(5), msg("user"))
    assert positions(Window(turns=3).select(s, Budget(window=47))) == [0, 9, 10, 11]


def test_window_counts_turns_through_tool_calls_and_keeps_pinned() -> None:
    s = state(
        msg("user"),  # 1, pinned
        msg("assistant"),
        msg("user"),  # 3
        calls("a"),
        result("a"),
        msg("assistant"),
        msg("user"),  # 7
        pinned=(1,),
    )
    assert positions(Window(turns=2).select(s, Budget(window=1000))) == [0, 1, 3, 4, 5, 6, 7]
    assert positions(Window(turns=1).select(s, Budget(window=1000))) == [0, 1, 7]


def test_strategies_are_pure() -> None:
    s = state(*conversation(6), msg("user"))
    budget = Budget(window=70)
    assert TRUNCATE.select(s, budget) == TRUNCATE.select(s, budget)
    assert Window(turns=2).select(s, budget) == Window(turns=2).select(s, budget)
