"""Hypothesis: every context the built-in strategies build obeys the budget rules.

Histories have system prompts, pinned messages, parallel tool calls answered in
any order (or never: a crash, a user who typed first), ``content=None`` on
tool-calling assistants, orphan and duplicate tool results, unicode, empty and
huge messages, a summary, and budgets from tiny to large. For each, the context
is either built and checked against every rule, or refused with
``BudgetExceeded`` because what must be sent can't fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conversation_memory.budget import Context, largest_fit, summary_message
from conversation_memory.errors import (
    BudgetExceeded,
    ConfigurationError,
    InvalidMessage,
    InvalidPayload,
)
from conversation_memory.fitting import build, fit
from conversation_memory.messages import validate
from conversation_memory.strategies import TRUNCATE, Hierarchical, Strategy, Summarize, Window
from conversation_memory.tokens import REPLY_PRIMING
from conversation_memory.types import (
    MAX_FACTOR,
    MIN_FACTOR,
    Budget,
    Correction,
    Item,
    State,
    Summary,
)
from conversation_memory.units import Selection

T = TypeVar("T")

SAMPLES = [
    "",
    "hi",
    "héllo wörld",
    "日本語のテキスト",
    "🙂👍🏽" * 3,
    "a\nb\tc",
    "e\u0301\u200d",
    "שלום",
    "x" * 5000,
]
texts = st.sampled_from(SAMPLES)  # one draw each: generation dominates the run time
any_texts = texts | st.text(max_size=20)
token_counts = st.integers(1, 105).map(lambda n: n if n <= 100 else (n - 100) * 600)
"""Mostly small counts, sometimes huge messages (up to 3,000 tokens)."""


@st.composite
def messages(
    draw: st.DrawFn, text: st.SearchStrategy[str] = texts
) -> list[tuple[dict[str, Any], bool]]:
    """A history as (message, pinned) pairs, without the system prompt."""
    out: list[tuple[dict[str, Any], bool]] = []
    calls_made = 0
    pin = st.integers(0, 9).map(lambda n: n == 0)
    for kind in draw(st.lists(st.sampled_from("uuuaattos"), min_size=1, max_size=20)):
        if kind == "u":
            out.append(({"role": "user", "content": draw(text)}, draw(pin)))
        elif kind == "a":
            out.append(({"role": "assistant", "content": draw(text)}, draw(pin)))
        elif kind == "s":
            out.append(({"role": "system", "content": draw(text)}, draw(pin)))
        elif kind == "o":  # an orphan result: its call is nowhere
            calls_made += 1
            out.append(
                ({"role": "tool", "tool_call_id": f"lost{calls_made}", "content": "r"}, False)
            )
        else:
            ids = [f"call{calls_made + n}" for n in range(draw(st.integers(1, 3)))]
            calls_made += len(ids)
            content = draw(st.none() | text)
            call = {
                "role": "assistant",
                "content": content,
                "tool_calls": [
                    {"id": i, "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    for i in ids
                ],
            }
            out.append((call, draw(pin)))
            # answered in any order, some perhaps never, some perhaps twice
            answered = draw(st.lists(st.sampled_from(ids), max_size=len(ids) + 1))
            if draw(st.integers(0, 3)) > 0:
                answered = list(dict.fromkeys(answered)) or ids
            for i in answered:
                out.append(({"role": "tool", "tool_call_id": i, "content": draw(text)}, draw(pin)))
    return out


@st.composite
def states(draw: st.DrawFn) -> State:
    system = None
    if draw(st.booleans()):  # stored as message 0, or apart from the messages (-1)
        position = draw(st.sampled_from([0, -1]))
        system = Item(position, {"role": "system", "content": draw(texts)}, draw(token_counts))
    offset = 1 if system is not None and system.position == 0 else 0
    history = [
        Item(n + offset, message, draw(token_counts), pinned=pinned)
        for n, (message, pinned) in enumerate(draw(messages()))
    ]
    start = draw(st.just(0) | st.integers(0, len(history)))  # the tail may start mid-unit
    older = history[:start]
    summary = None
    if older and draw(st.booleans()):
        end = draw(st.integers(older[0].position, older[-1].position))
        summary = Summary(older[0].position, end, draw(texts), draw(token_counts))
    return State(
        system=system,
        pinned=[item for item in older if item.pinned],
        summary=summary,
        tail=history[start:],
        has_older=bool(older),
    )


corrections = st.builds(
    Correction, factor=st.sampled_from([1.0, 1.0, 0.9, 1.25]), margin=st.integers(0, 20)
)


@st.composite
def budgets_for(draw: st.DrawFn, state: State) -> Budget:
    """Budgets from tiny to large, most of them around the size of the history."""
    size = sum(i.tokens for i in (*state.pinned, *state.tail)) + REPLY_PRIMING
    size += (state.system.tokens if state.system else 0) + 50
    window = draw(st.integers(size // 3, size) | st.integers(1, size) | st.integers(1, 200_000))
    return Budget(
        window=window + 100,
        reserve=draw(st.integers(0, 100)),
        tools=draw(st.integers(0, 20)),
        margin=draw(st.integers(0, 10)),
        cap=draw(st.none() | st.none() | st.integers(1, 5000)),
        correction=draw(corrections),
    )


@st.composite
def cases(draw: st.DrawFn) -> tuple[State, Budget]:
    state = draw(states())
    return state, draw(budgets_for(state))


strategies = st.just(TRUNCATE) | st.builds(Window, turns=st.integers(1, 4))


def units_of(items: Sequence[Item]) -> list[list[Item]]:
    """An assistant message with tool_calls and the tool messages right after it; else one each."""
    units: list[list[Item]] = []
    for item in items:
        role = item.message["role"]
        if role == "tool" and units and units[-1][0].message.get("tool_calls") is not None:
            units[-1].append(item)
        else:
            units.append([item])
    return units


def attempt(run: Callable[[], T]) -> T | BudgetExceeded | InvalidPayload:
    try:
        return run()
    except (BudgetExceeded, InvalidPayload) as error:
        return error


def live_tail(state: State) -> list[Item]:
    """Tail items the summary does not stand in for."""
    end = state.summary.end if state.summary else -1
    return [i for i in state.tail if i.pinned or i.position > end]


def check_refusal(error: BudgetExceeded, state: State, budget: Budget) -> None:
    assert error.needed > error.limit == budget.limit
    assert error.needed == budget.correction.apply(
        error.system + error.pinned + error.newest + REPLY_PRIMING
    )
    assert error.system == (state.system.tokens if state.system else 0)
    tail = live_tail(state)
    if tail and tail[-1].message["role"] == "user":
        assert error.newest >= tail[-1].tokens


def check_budget_and_order(context: Context, state: State, budget: Budget) -> None:
    sent, messages = context.items, context.messages
    validate(messages)
    total = sum(i.tokens for i in sent) + REPLY_PRIMING
    total += context.summary.tokens if context.summary else 0
    assert context.report.total == total
    assert budget.fits(total)
    assert context.report.sent == len(messages) == len(sent) + (context.summary is not None)
    where = [i.position for i in sent]
    assert where == sorted(set(where))
    if state.system is not None:
        assert sent[0] is state.system
        assert messages[0] == state.system.message
    if context.summary is not None:
        at = messages.index(summary_message(context.summary))
        tail_start = state.tail[0].position if state.tail else float("inf")
        assert all(i.position < tail_start for i in sent[:at])
        assert all(i.position >= tail_start for i in sent[at:])
    elif state.summary is not None:
        assert context.report.summary_omitted
        assert not budget.fits(total + state.summary.tokens)


def check_kept(context: Context, state: State, budget: Budget) -> None:
    by_position = {i.position: i for i in context.items}
    for item in (*state.pinned, *live_tail(state)):
        if item.pinned and item.message["role"] in ("user", "system", "developer"):
            assert by_position[item.position].message == item.message
        if item.pinned and item.message["role"] == "assistant" and item.message["content"]:
            assert item.position in by_position
    users = [i for i in live_tail(state) if i.message["role"] == "user"]
    if users and users[-1].position not in by_position:
        check_newest_turn_over_budget(context, live_tail(state), users[-1].position, budget)


def check_newest_turn_over_budget(
    context: Context, tail: Sequence[Item], question: int, budget: Budget | None
) -> None:
    """The newest turn (from ``question`` on) is sent only in part: the rest can't fit."""
    event("the newest turn is over the budget: sent from its middle")
    if budget is None:
        return
    sent = {i.position for i in context.items}
    missing = sum(i.tokens for i in tail if i.position >= question and i.position not in sent)
    assert not budget.fits(context.report.total + missing)


def check_whole_turns(
    context: Context, state: State, budget: Budget | None, tail: Sequence[Item] | None = None
) -> None:
    """No reply is sent without the user message it answers (its question), so the history
    after the system part, the summary and pinned messages begins with a user message.

    The one exception: the newest turn alone is over the budget. Then its newest part is
    sent without its question. Pinned units are sent whatever they answer.
    """
    tail = live_tail(state) if tail is None else tail
    sent = {i.position for i in context.items}
    pinned = {i.position for unit in units_of(tail) if any(u.pinned for u in unit) for i in unit}
    users = [i.position for i in tail if i.message["role"] == "user"]
    question: int | None = None  # the user message the items that follow answer
    for item in tail:
        role = item.message["role"]
        if role == "user":
            question = item.position
            continue
        if item.position not in sent or item.position in pinned or role == "system":
            continue
        if question in sent or not users:
            continue
        assert item.position > users[-1], f"position {item.position} went without its question"
        check_newest_turn_over_budget(context, tail, users[-1], budget)


def check_left_out(context: Context, state: State) -> None:
    """Every message read or summarized and not sent is counted once: covered when a
    summary sent represents it, else dropped (or reported as orphaned or repaired)."""
    r = context.report
    sent = {i.position for i in context.items if i is not state.system}
    cover = context.summaries or ((context.summary,) if context.summary else ())
    represented = set(range(cover[0].start, cover[-1].end + 1)) if cover else set()
    summarized = set(range(state.summary.start, state.summary.end + 1)) if state.summary else set()
    known = {i.position for i in (*state.pinned, *state.tail)} | summarized
    if state.system is not None:
        known.discard(state.system.position)
    left = known - sent
    pinned = {i.position for i in (*state.pinned, *state.tail) if i.pinned}
    covered = (left - pinned) & represented
    assert r.covered == len(covered)
    dropped = left - covered - set(r.orphaned) - set(r.repaired)
    assert r.dropped == len(dropped)
    if dropped:
        assert r.first_dropped is not None
        assert r.first_dropped <= min(dropped)
        assert r.last_dropped is not None
        assert r.last_dropped >= max(dropped)
    assert r.overlap == len((sent - pinned) & represented)


def check_dropped(selection: Selection, state: State, strategy: Strategy) -> None:
    sent = {i.position for i in selection.items}
    dropped = [i.position for i in selection.dropped]
    assert dropped == sorted(set(dropped))
    assert not sent & set(dropped)
    seen_kept = False
    for unit in units_of(live_tail(state)):
        members = {i.position for i in unit}
        kept = bool(members & sent)
        gone = bool(members & set(dropped))
        assert not (kept and gone)
        if gone:
            assert members <= set(dropped)
            assert not any(i.pinned for i in unit)
            assert not seen_kept, "a newer unit was kept while an older one was dropped"
        seen_kept = seen_kept or (kept and not any(i.pinned for i in unit))
        for item in unit[1:]:  # a tool result is never sent without its call
            assert item.position not in sent or unit[0].position in sent
    if isinstance(strategy, Window) and state.tail:
        users = [
            i
            for i in selection.items
            if i.message["role"] == "user" and not i.pinned and i.position >= state.tail[0].position
        ]
        assert len(users) <= strategy.turns


def sendable(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether some message is sure to be sendable (else the payload may be empty)."""
    return any(
        m["role"] in ("user", "system")
        or (m["role"] == "assistant" and (m["content"] or "tool_calls" not in m))
        for m in messages
    )


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), strategy=strategies)
def test_every_context_obeys_the_rules(case: tuple[State, Budget], strategy: Strategy) -> None:
    state, budget = case
    context = attempt(lambda: build(state, budget, strategy))
    if isinstance(context, InvalidPayload):
        assert "empty" in str(context)
        assert state.system is None
        assert not sendable([i.message for i in (*state.pinned, *live_tail(state))])
        return
    if isinstance(context, BudgetExceeded):
        event("refused: must-send part over budget")
        check_refusal(context, state, budget)
        return
    report = context.report
    event(f"dropped: {'some' if report.dropped else 'none'}")
    event(f"repaired or orphaned: {bool(report.repaired or report.orphaned)}")
    event(f"summary: {'sent' if context.summary else 'omitted' if state.summary else 'none'}")
    check_budget_and_order(context, state, budget)
    check_kept(context, state, budget)
    check_whole_turns(context, state, budget)
    selection = strategy.select(state, budget)  # pure: the same choice build made
    assert selection.items == context.items
    check_left_out(context, state)
    check_dropped(selection, state, strategy)


class WordCounter:
    """Tokens as the test sees them: 3 per message plus one per started 3 characters."""

    name = "words"

    def count_text(self, text: str) -> int:
        return -(-len(text) // 3)

    def count_message(self, message: Mapping[str, Any]) -> int:
        content = message.get("content")
        return 3 + self.count_text(content if isinstance(content, str) else "")

    def count_tools(self, tools: Sequence[Mapping[str, Any]] | None) -> int:
        return 5 * len(tools or ())


@settings(max_examples=200, deadline=None)
@given(
    history=messages(any_texts),
    system=st.none() | any_texts,
    budget=st.integers(1, 400),
    tools=st.integers(0, 3),
)
def test_fit_keeps_within_budget_and_order(
    history: list[tuple[dict[str, Any], bool]], system: str | None, budget: int, tools: int
) -> None:
    counter = WordCounter()
    plain = [m for m, _ in history]
    if system is not None:
        plain.insert(0, {"role": "system", "content": system})
    if not plain:
        return
    kept = attempt(
        lambda: fit(
            plain, model="not-registered", budget=budget, tools=[{}] * tools, counter=counter
        )
    )
    if isinstance(kept, InvalidPayload):
        assert "empty" in str(kept)
        assert not sendable(plain)
        return
    if isinstance(kept, BudgetExceeded):
        assert kept.needed > kept.limit
        return
    validate(kept)
    assert sum(counter.count_message(m) for m in kept) + REPLY_PRIMING <= budget
    if system is not None:
        assert kept[0] == plain[0]
    users = [n for n, m in enumerate(plain) if m["role"] == "user"]
    if users and not any(m == plain[users[-1]] for m in kept):
        # Only when the newest turn can't fit whole is it sent in part, without its question.
        lead = next((n for n, m in enumerate(plain) if m["role"] != "system"), len(plain))
        turn = plain[:lead] + plain[users[-1] :]
        assert sum(map(counter.count_message, turn)) + REPLY_PRIMING > budget - 5 * tools


# --- the shortcuts of the selection code agree with the long way -----------------------


@settings(max_examples=500, deadline=None)
@given(history=messages(any_texts), broken=st.integers(0, 5))
def test_validate_treats_plain_dicts_like_any_mapping(
    history: list[tuple[dict[str, Any], bool]], broken: int
) -> None:
    # Plain dicts take a shortcut through the validator; other mappings never do.
    payload = [dict(m) for m, _ in history]
    if broken < len(payload):  # sometimes a message no API accepts
        payload[broken] = {**payload[broken], "name": 5}

    def verdict(messages: Sequence[Mapping[str, Any]]) -> str:
        try:
            validate(messages)
        except (InvalidMessage, InvalidPayload) as exc:
            return f"{type(exc).__name__}: {exc}"
        return "valid"

    assert verdict(payload) == verdict([MappingProxyType(m) for m in payload])


@settings(max_examples=500, deadline=None)
@given(
    limit=st.integers(-50, 10**9),
    factor=st.floats(MIN_FACTOR, MAX_FACTOR)
    | st.sampled_from([1.0, 0.9, 1.25, 1 / 3, 0.1 + 0.2, MIN_FACTOR, MAX_FACTOR]),
    margin=st.integers(0, 10**6),
    probes=st.lists(st.integers(0, 2**62), max_size=5),
)
def test_largest_fit_is_where_fits_turns_false(
    limit: int, factor: float, margin: int, probes: list[int]
) -> None:
    budget = Budget(window=limit, correction=Correction(factor=factor, margin=margin))
    bound = largest_fit(budget)
    for count in (0, 1, bound - 1, bound, bound + 1, *probes):
        if 0 <= count <= 2**62:
            assert budget.fits(count) == (count <= bound), count


@pytest.mark.parametrize("factor", [0.0, -1.0, math.inf, math.nan, 5e-324, 1e300, True])
def test_odd_correction_factors_are_refused(factor: float) -> None:
    """A subnormal factor used to overflow the bound (OverflowError while building a
    context); the Correction itself now refuses what no tokenizer pair can produce."""
    with pytest.raises(ConfigurationError, match="factor"):
        Correction(factor=factor)


@st.composite
def summarized_states(draw: st.DrawFn) -> State:
    """A state whose summary may reach into the tail (what a strategy that overlaps reads)."""
    state = draw(states())
    if not state.tail or not draw(st.booleans()):
        return state
    first = state.pinned[0].position if state.pinned else state.tail[0].position
    end = draw(st.integers(first, state.tail[-1].position))
    summary = Summary(first, end, draw(texts), draw(token_counts))
    return replace(state, summary=summary)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=summarized_states(), data=st.data())
def test_summarize_folds_where_fold_point_says(state: State, data: st.DataObject) -> None:
    # select() reuses the units it grouped for the fold; fold_point() groups anew.
    budget = data.draw(budgets_for(state))
    strategy = Summarize(high=0.5, low=0.3, summary_tokens=16)
    selection = attempt(lambda: strategy.select(state, budget))
    if isinstance(selection, BudgetExceeded):
        return
    assert isinstance(selection, Selection)
    assert selection.fold_through == strategy.fold_point(state, budget)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    state=summarized_states(),
    data=st.data(),
    strategy=st.sampled_from(
        [
            Summarize(high=0.5, low=0.3, summary_tokens=16),
            Summarize(overlap=False),
            Hierarchical(fanout=2, summary_tokens=16),
        ]
    ),
)
def test_after_a_summary_the_raw_tail_starts_with_a_question(
    state: State, data: st.DataObject, strategy: Strategy
) -> None:
    context = attempt(lambda: build(state, data.draw(budgets_for(state)), strategy))
    if isinstance(context, InvalidPayload):
        assert "empty" in str(context)
        return
    if isinstance(context, BudgetExceeded):
        return
    event(f"summary sent: {context.summary is not None}")
    # Summarize re-sends covered turns beside the summary (overlap); the others send
    # only what follows it. (Hierarchical reserves the summaries' room through the
    # margin, so the budget check of a turn sent in part is left to the test above.)
    tail = state.tail if getattr(strategy, "overlap", False) else live_tail(state)
    check_whole_turns(context, state, None, tail)
    check_left_out(context, state)
