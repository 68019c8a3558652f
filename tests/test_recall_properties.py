"""Hypothesis: every context a recall strategy builds obeys the budget and turn rules.

The states and budgets of ``test_properties`` (system prompts, pinned messages,
broken tool calls, a summary, budgets from tiny to large), with candidate turns
as a search would bring them back: whole turns of the history older than the
tail, and some of the tail itself (which must not be repeated), with any scores,
counted by the real tokenizer. For each, the context is refused exactly when
the base strategy refuses it, or it is never over the budget, repeats nothing,
sends whole turns oldest first in one message after the summaries and before the
tail, and is a valid request.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_properties import attempt, budgets_for, live_tail, messages, states

from conversation_memory.budget import summary_message
from conversation_memory.errors import BudgetExceeded, InvalidPayload
from conversation_memory.fitting import build
from conversation_memory.messages import validate
from conversation_memory.recall import Recall
from conversation_memory.retrieval import costed, recall_message
from conversation_memory.strategies import TRUNCATE, Summarize, Window
from conversation_memory.tokens import REPLY_PRIMING, counter_for
from conversation_memory.types import Budget, Item, State

COUNTER = counter_for("gpt-4o-mini")


def turns_of(items: list[Item]) -> list[tuple[Item, ...]]:
    """Whole turns: from each user message up to the next one."""
    turns: list[list[Item]] = []
    for item in items:
        if item.message["role"] == "user":
            turns.append([item])
        elif turns:
            turns[-1].append(item)
    return [tuple(turn) for turn in turns]


SHIFT = 500
"""The state's messages move this far on, to leave an older stretch for candidates."""


def shifted(state: State) -> State:
    def move(item: Item) -> Item:
        return item if item is state.system else replace(item, position=item.position + SHIFT)

    summary = state.summary
    if summary is not None:
        summary = replace(summary, start=summary.start + SHIFT, end=summary.end + SHIFT)
    return replace(
        state,
        pinned=[move(i) for i in state.pinned],
        tail=[move(i) for i in state.tail],
        summary=summary,
    )


@st.composite
def recalling_cases(draw: st.DrawFn) -> tuple[State, Budget]:
    state = shifted(draw(states()))
    older = [
        Item(1 + n, message, draw(st.integers(1, 60)))
        for n, (message, _) in enumerate(draw(messages()))
    ]
    pool = turns_of(older) + turns_of(list(state.tail))
    distinct = st.lists(
        st.sampled_from(pool or [()]), min_size=1, max_size=6, unique_by=lambda t: t[0].position
    )
    chosen = draw(distinct) if pool else []
    scores = draw(st.lists(st.floats(0.01, 50), min_size=len(chosen), max_size=len(chosen)))
    found = sorted(zip(scores, chosen, strict=True), key=lambda pair: -pair[0])
    of = (state.tail[-1].position + 1) if state.tail else 1
    recalled, overhead = costed(found, of, COUNTER.count_text, COUNTER.count_message)
    state = replace(state, recalled=recalled, recall_overhead=overhead)
    return state, draw(budgets_for(state))


bases = st.sampled_from([TRUNCATE, Window(turns=2), Summarize()])


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=recalling_cases(), base=bases, share=st.sampled_from([0.1, 0.25, 0.5]))
def test_recalled_contexts_obey_the_rules(
    case: tuple[State, Budget], base: Any, share: float
) -> None:
    state, budget = case
    strategy = Recall(base=base, share=share, k=3)
    context = attempt(lambda: build(state, budget, strategy))
    plain = attempt(lambda: build(replace(state, recalled=()), budget, base))
    if isinstance(context, BudgetExceeded | InvalidPayload):
        assert type(plain) is type(context)  # refused exactly when the base is
        return
    assert not isinstance(plain, BudgetExceeded | InvalidPayload)
    event(f"recalled turns: {len(context.recalled)} of {len(state.recalled)}")
    report = context.report
    # Never over the budget, and the recall message costs no more than it was counted for.
    assert budget.fits(report.total)
    summaries = sum(each.tokens for each in context.summaries)
    assert report.total == (
        sum(i.tokens for i in context.items) + summaries + report.recall + REPLY_PRIMING
    )
    assert len(context.recalled) <= 3
    if not context.recalled:
        assert report.recall == 0
        assert all(m["content"] is None or not str(m["content"]).startswith("Earlier messages")
                   for m in context.messages)  # fmt: skip
        return
    message = recall_message(context.recalled, state.tail[-1].position + 1)
    assert COUNTER.count_message(message) <= report.recall
    # Whole turns of the candidates, oldest first, apart, none of them sent raw.
    sent = {i.position for i in context.items}
    candidates = [turn.items for turn in state.recalled]
    previous = -1
    for turn in context.recalled:
        assert turn.items in candidates
        assert turn.items[0].message["role"] == "user"
        assert turn.start > previous
        previous = turn.end
        assert not sent & {i.position for i in turn.items}
    # One message, after the system part and the summaries, before the tail.
    at = context.summary_index + len(context.summaries)
    assert context.messages[at] == message
    for each, summary in zip(
        context.messages[context.summary_index : at], context.summaries, strict=True
    ):
        assert each == summary_message(summary)
    tail_start = state.tail[0].position
    assert all(i.position < tail_start for i in context.items[: context.summary_index])
    assert all(i.position >= tail_start for i in context.items[context.summary_index :])
    validate(context.messages)  # (assemble checked the turn rule, counting this message)
    assert report.retrieved == {i.position for t in context.recalled for i in t.items}
    live = {i.position for i in live_tail(state)}
    assert not (report.retrieved & sent & live)
