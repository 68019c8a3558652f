"""The message rules in a request, unit repair, build/explain and the plain-list ``fit``."""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from dataclasses import FrozenInstanceError, replace
from typing import Any

import pytest

from conversation_memory.budget import Context, explain, summary_message
from conversation_memory.errors import (
    BudgetExceeded,
    ConfigurationError,
    InvalidMessage,
    InvalidPayload,
    UnknownModel,
)
from conversation_memory.fitting import build, fit
from conversation_memory.messages import normalize, validate
from conversation_memory.types import Budget, Correction, Item, State, Summary
from conversation_memory.units import Selection, group_units


def call(call_id: str, name: str = "lookup") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}


def calls(*ids: str, content: str | None = None) -> dict[str, Any]:
    return {"role": "assistant", "content": content, "tool_calls": [call(i) for i in ids]}


def result(call_id: str, content: str = "42") -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def user(text: str = "hi") -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str = "hello") -> dict[str, Any]:
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "You are terse."}


class CharCounter:
    """A tokenizer-free counter: 3 per message plus one token per 4 characters of content."""

    name = "chars"

    def count_text(self, text: str) -> int:
        return -(-len(text) // 4)

    def count_message(self, message: Mapping[str, Any]) -> int:
        content = message.get("content")
        text = content if isinstance(content, str) else repr(content or "")
        return 3 + self.count_text(text) + 5 * len(message.get("tool_calls") or ())

    def count_tools(self, tools: Sequence[Mapping[str, Any]] | None) -> int:
        return 10 * len(tools or ())


def items(*messages: Mapping[str, Any], tokens: int = 10, pinned: Sequence[int] = ()) -> list[Item]:
    return [
        Item(position=p, message=m, tokens=tokens, pinned=p in pinned)
        for p, m in enumerate(messages)
    ]


def test_an_item_is_a_frozen_value_whichever_way_it_is_made() -> None:
    """Item's own __init__ (faster than the generated one) keeps it a frozen dataclass."""
    message = {"role": "user", "content": "hi"}
    made = Item(3, message, 7)
    assert made == Item(position=3, message=message, tokens=7, pinned=False, complete=True)
    assert (made.pinned, made.complete) == (False, True)
    with pytest.raises(FrozenInstanceError):
        made.tokens = 8  # type: ignore[misc]
    assert replace(made, pinned=True) == Item(3, message, 7, True)
    assert pickle.loads(pickle.dumps(made)) == made
    assert repr(made) == (
        "Item(position=3, message={'role': 'user', 'content': 'hi'}, tokens=7, pinned=False, "
        "complete=True)"
    )


# --- validate -------------------------------------------------------------------------


def test_valid_payloads_pass() -> None:
    validate([SYSTEM, user()])
    validate([user(), calls("a", "b"), result("b"), result("a"), assistant()])
    validate([user(), calls("a", content="Let me look."), result("a")])
    validate(
        [
            {"role": "developer", "content": [{"type": "text", "text": "rules"}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                ],
                "name": "ann",
            },
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
        ]
    )


@pytest.mark.parametrize(
    ("messages", "index", "field", "words"),
    [
        ([{"role": "bot", "content": "x"}], 0, "role", "'bot'"),
        ([{"role": "user"}], 0, "content", "missing"),
        ([{"role": "assistant", "content": None}], 0, "content", "tool_calls"),
        ([{"role": "user", "content": 3}], 0, "content", "int"),
        ([{"role": "user", "content": []}], 0, "content", "empty"),
        (
            [{"role": "system", "content": [{"type": "image_url", "image_url": {}}]}],
            0,
            "content[0]",
            "'image_url'",
        ),
        ([{"role": "user", "content": [{"type": "text", "text": 1}]}], 0, "content[0].text", ""),
        ([user(), {"role": "user", "content": "x", "name": 5}], 1, "name", "string"),
        ([{"role": "user", "content": "x", "tool_calls": [call("a")]}], 0, "tool_calls", "user"),
        ([user(), {"role": "assistant", "content": "x", "tool_calls": []}], 1, "tool_calls", ""),
        ([user(), calls("a", "a"), result("a")], 1, "tool_calls[1].id", "repeats 'a'"),
        (
            [user(), {"role": "assistant", "content": None, "tool_calls": [{"id": "a"}]}],
            1,
            "tool_calls[0]",
            "function",
        ),
        ([user(), {"role": "tool", "content": "x"}], 1, "tool_call_id", "must name"),
    ],
)
def test_each_rule_of_one_message_names_index_and_field(
    messages: list[dict[str, Any]], index: int, field: str, words: str
) -> None:
    with pytest.raises(InvalidMessage) as info:
        validate(messages)
    assert info.value.index == index
    assert info.value.field == field
    assert str(info.value).startswith(f"message {index}: {field} ")
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("messages", "index", "field", "words"),
    [
        ([user(), result("a")], 1, "tool_call_id", "must follow"),
        ([result("a")], 0, "tool_call_id", "must follow"),
        ([user(), calls("a"), result("b")], 2, "tool_call_id", "answers no call"),
        ([user(), calls("a", "b"), result("a"), result("a")], 3, "tool_call_id", "already"),
        ([user(), calls("a"), user(), result("a")], 2, "role", "not answered"),
        ([user(), calls("a", "b"), result("a")], 1, "tool_calls", "['b']"),
        ([user(), calls("a"), result("a"), result("a")], 3, "tool_call_id", "already"),
    ],
)
def test_each_rule_between_messages_names_index_and_field(
    messages: list[dict[str, Any]], index: int, field: str, words: str
) -> None:
    with pytest.raises(InvalidPayload) as info:
        validate(messages)
    assert info.value.index == index
    assert info.value.field == field
    assert str(info.value).startswith(f"message {index}: {field} ")
    assert words in str(info.value)


def test_the_validator_and_the_normalizer_apply_the_same_rules_of_one_message() -> None:
    """One set of rules: what the validator refuses in a request, the store refuses as
    input, with the same error and the same words."""
    for message in [
        {"role": "bot", "content": "x"},
        {"role": "user", "content": [{"type": "refusal", "refusal": "no"}]},
        {"role": "user", "content": "x", "name": "has spaces"},
        {"role": "tool", "content": "x", "tool_call_id": "a", "name": "lookup"},
        {"role": "user", "content": "x", "tool_call_id": "a"},
        {"role": "user", "content": [{"type": "image_url", "image_url": "https://x/y.png"}]},
        {"role": "user", "content": [{"type": ["text"], "text": "x"}]},
        "hello",
    ]:
        with pytest.raises(InvalidMessage) as refused:
            normalize(message, index=0)
        with pytest.raises(InvalidMessage) as invalid:
            validate([message])
        assert str(invalid.value) == str(refused.value)


def test_a_history_that_starts_mid_turn_is_refused() -> None:
    """After the system part, the history begins with a question, never with its answer."""
    summary = {"role": "system", "content": "Summary of the earlier conversation: ..."}
    validate([SYSTEM, summary, user(), assistant()], history=1)
    validate([SYSTEM, user("pinned"), user(), assistant()], history=2)
    validate([assistant()])  # without ``history``: the API's own rules only
    for payload, history in [
        ([SYSTEM, assistant(), user()], 1),
        ([SYSTEM, summary, calls("a"), result("a"), user()], 1),
        ([assistant(), user()], 0),
    ]:
        with pytest.raises(InvalidPayload, match="without the question it answers") as info:
            validate(payload, history=history)
        assert info.value.field == "role"
        assert payload[info.value.index]["role"] == "assistant"
    # No question at all: the newest turn alone was over the budget, sent from its middle.
    validate([SYSTEM, calls("a"), result("a")], history=1)


def test_build_refuses_a_strategy_that_starts_mid_turn() -> None:
    history = items(SYSTEM, user(), assistant(), user("again"))
    state = State(system=history[0], pinned=(), summary=None, tail=history[1:])

    def answers_first(state: State, budget: Budget) -> Selection:
        return Selection(items=(state.system, *state.tail[1:]), summary=None, dropped=())

    with pytest.raises(InvalidPayload, match="without the question"):
        build(state, Budget(window=500), answers_first)
    # A pinned answer is part of what is always sent, not of the history.
    answer = replace(history[2], pinned=True)
    pinned = State(system=history[0], pinned=(answer,), summary=None, tail=[history[3]])
    roles = [m["role"] for m in build(pinned, Budget(window=500)).messages]
    assert roles == ["system", "assistant", "user"]


def test_empty_and_non_list_payloads_are_refused() -> None:
    with pytest.raises(InvalidPayload, match="empty"):
        validate([])
    with pytest.raises(InvalidPayload, match="list"):
        validate({"role": "user", "content": "x"})  # type: ignore[arg-type]
    with pytest.raises(InvalidMessage, match="message 1: is a str"):
        validate([user(), "hello"])  # type: ignore[list-item]


def test_tool_results_of_a_later_call_cannot_answer_an_earlier_one() -> None:
    with pytest.raises(InvalidPayload, match="answers no call of the assistant message 3"):
        validate([user(), calls("a"), result("a"), calls("b"), result("a")])


# --- units and repair -----------------------------------------------------------------


def test_answered_unit_is_one_unit_unchanged() -> None:
    history = items(user(), calls("a", "b"), result("b"), result("a"), assistant())
    units = group_units(history)
    assert [len(u.source) for u in units] == [1, 3, 1]
    assert units[1].items == tuple(history[1:4])
    assert units[1].repaired == ()
    assert units[1].tokens == 30
    assert units[0].has_user
    assert not units[1].has_user


def test_unanswered_calls_are_taken_out() -> None:
    history = items(user(), calls("a", "b", "c"), result("c"), user("next"))
    unit = group_units(history)[1]
    assert unit.repaired == (1,)
    sent = unit.items[0].message
    assert [c["id"] for c in sent["tool_calls"]] == ["c"]
    assert history[1].message["tool_calls"][0]["id"] == "a"  # the stored one is untouched
    assert unit.items[0].tokens == 10  # stored count kept: an upper bound
    validate([m.message for m in (history[0], *unit.items, history[3])])


def test_unanswered_call_with_text_keeps_the_text() -> None:
    unit = group_units(items(calls("a", content="Checking."), user()))[0]
    assert unit.items[0].message == {"role": "assistant", "content": "Checking."}
    assert unit.repaired == (0,)


def test_unanswered_call_without_text_leaves_the_message_out() -> None:
    units = group_units(items(user(), calls("a"), user("are you there?")))
    assert units[1].items == ()
    assert units[1].tokens == 0
    assert units[1].repaired == (1,)


def test_orphans_and_duplicate_answers_are_not_sent() -> None:
    history = items(result("x"), user(), calls("a"), result("a"), result("a"), result("z"))
    units = group_units(history)
    assert [u.items for u in units] == [(), (history[1],), tuple(history[2:4])]
    assert [len(u.source) for u in units] == [1, 1, 4]
    assert sum(len(u.source) for u in units) == len(history)


def test_empty_tool_calls_are_removed() -> None:
    message = {"role": "assistant", "content": "done", "tool_calls": []}
    unit = group_units(items(message))[0]
    assert unit.items[0].message == {"role": "assistant", "content": "done"}


def test_pinning_one_member_pins_the_unit() -> None:
    units = group_units(items(calls("a"), result("a"), pinned=[1]))
    assert units[0].pinned


# --- summary message, build, explain --------------------------------------------------


def test_summary_message_is_a_separate_marked_system_message() -> None:
    message = summary_message(Summary(start=1, end=9, text="They met.", tokens=12))
    assert message["role"] == "system"
    assert message["content"].startswith("Summary of the earlier conversation (messages 1 to 9):")
    assert message["content"].endswith("\nThey met.")


def state_with_summary() -> State:
    history = items(
        SYSTEM,
        user("remember 7"),
        assistant("ok"),
        user("a"),
        assistant("b"),
        user("c"),
        calls("q", "r"),
        result("q"),
        user("d"),
        pinned=[1],
    )
    return State(
        system=history[0],
        pinned=[history[1]],
        summary=Summary(start=2, end=3, text="they chatted", tokens=20),
        tail=history[4:],
    )


def test_build_places_summary_after_pinned_and_before_tail() -> None:
    context = build(state_with_summary(), Budget(window=200, reserve=50), "truncate")
    assert isinstance(context, Context)
    roles = [m["role"] for m in context.messages]
    # The summary ends at a question (3): its answer (4) is not sent without it.
    assert roles == ["system", "user", "system", "user", "assistant", "tool", "user"]
    assert context.messages[0] == SYSTEM
    assert context.messages[2]["content"].startswith("Summary of the earlier conversation")
    assert context.messages[4]["tool_calls"] == [call("q")]
    report = context.report
    assert (report.system, report.pinned, report.summary, report.messages) == (10, 10, 20, 40)
    assert (report.priming, report.total, report.limit) == (3, 83, 150)
    assert report.utilization == pytest.approx(83 / 150)
    assert report.repaired == (6,)
    assert (report.dropped, report.first_dropped, report.last_dropped) == (1, 4, 4)
    assert report.sent == 7
    assert report.strategy == "truncate"


def test_build_report_counts_drops_and_explain_says_so() -> None:
    context = build(state_with_summary(), Budget(window=90, tools=7), "truncate")
    report = context.report
    assert report.total <= report.limit == 83
    assert report.dropped == 1
    assert (report.first_dropped, report.last_dropped) == (4, 4)
    assert report.prompt == report.total + 7
    text = explain(context)
    assert text.splitlines()[0].startswith(f"strategy truncate: {report.total} of 83 prompt tokens")
    assert "dropped the oldest 1 message (positions 4 to 4)" in text
    assert "tools" in text
    assert "repaired unanswered tool calls at positions 6" in text


def test_explain_mentions_calibration_and_a_summary_left_out() -> None:
    state = state_with_summary()
    budget = Budget(window=60, correction=Correction(factor=1.1, margin=2))
    context = build(state, budget, "truncate")
    assert context.summary is None
    assert context.report.summary_omitted
    assert context.report.corrected == budget.correction.apply(context.report.total)
    assert budget.fits(context.report.total)
    text = explain(context)
    assert "left out: no room" in text
    assert "corrected" in text


def test_build_reports_orphans_and_covered_messages() -> None:
    history = items(
        SYSTEM, user(), assistant(), user(), calls("a"), result("a"), result("a"), user("x")
    )
    state = State(
        system=history[0],
        pinned=(),
        summary=Summary(start=1, end=2, text="s", tokens=5),
        tail=history[1:],
    )
    context = build(state, Budget(window=500), "truncate")
    assert context.report.orphaned == (6,)
    assert context.report.covered == 2
    assert "without their call at positions 6" in explain(context)
    assert "2 messages represented by the summary instead of sent" in explain(context)


def test_build_raises_when_system_pinned_and_newest_cannot_fit() -> None:
    history = items(SYSTEM, user("old"), assistant(), user("new"), pinned=[1], tokens=30)
    state = State(system=history[0], pinned=[history[1]], summary=None, tail=history[2:])
    with pytest.raises(BudgetExceeded) as info:
        build(state, Budget(window=100, reserve=20), "truncate")
    error = info.value
    assert (error.system, error.pinned, error.newest, error.needed, error.limit) == (
        30,
        30,
        30,
        93,
        80,
    )
    assert "window 100 - reserve 20" in str(error)
    assert "bigger budget" in str(error)
    assert "shorter system prompt" in str(error)


def test_build_checks_what_a_custom_strategy_returns() -> None:
    history = items(SYSTEM, user(), assistant(), user())
    state = State(system=history[0], pinned=(), summary=None, tail=history[1:])

    def everything(state: State, budget: Budget) -> Selection:
        return Selection(items=tuple(history), summary=None, dropped=())

    def backwards(state: State, budget: Budget) -> Selection:
        return Selection(items=(history[0], history[3], history[1]), summary=None, dropped=())

    def no_system(state: State, budget: Budget) -> Selection:
        return Selection(items=(history[3],), summary=None, dropped=())

    def broken(state: State, budget: Budget) -> Selection:
        return Selection(items=(history[0], Item(9, result("a"), 1)), summary=None, dropped=())

    assert build(state, Budget(window=100), everything).report.strategy == "everything"
    with pytest.raises(BudgetExceeded, match="strategy 'everything' chose 43 prompt tokens"):
        build(state, Budget(window=40), everything)
    with pytest.raises(InvalidPayload, match="order"):
        build(state, Budget(window=100), backwards)
    with pytest.raises(InvalidPayload, match="system prompt"):
        build(state, Budget(window=100), no_system)
    with pytest.raises(InvalidPayload, match="message 1: tool_call_id"):
        build(state, Budget(window=100), broken)
    with pytest.raises(ConfigurationError, match="not a Selection"):
        build(state, Budget(window=100), lambda s, b: [])


def test_build_without_tail_puts_summary_last() -> None:
    system = Item(0, SYSTEM, 5)
    summary = Summary(start=1, end=4, text="all of it", tokens=9)
    context = build(State(system=system, pinned=(), summary=summary, tail=()), Budget(100))
    assert [m["role"] for m in context.messages] == ["system", "system"]
    assert context.report.total == 17


def test_build_returns_copies_of_the_stored_messages() -> None:
    history = items(SYSTEM, user())
    context = build(State(history[0], (), None, history[1:]), Budget(100))
    context.messages[1]["content"] = "changed"
    assert history[1].message["content"] == "hi"


# --- fit ------------------------------------------------------------------------------


def test_fit_keeps_system_and_drops_oldest_turns() -> None:
    messages = [SYSTEM, {"role": "developer", "content": "be kind"}]
    for n in range(10):
        messages += [user(f"question {n} " * 5), assistant(f"answer {n} " * 5)]
    messages.append(user("last"))
    counter = CharCounter()
    kept = fit(messages, budget=100, counter=counter)
    assert kept[:2] == messages[:2]
    assert kept[-1] == messages[-1]
    assert kept == messages[:2] + messages[len(messages) - len(kept) + 2 :]
    assert sum(counter.count_message(m) for m in kept) + 3 <= 100
    assert fit(messages, budget=10_000, counter=counter) == messages


def test_fit_counts_tools_against_the_budget() -> None:
    messages = [SYSTEM] + [user("x" * 40), assistant("y" * 40)] * 5 + [user("z")]
    counter = CharCounter()
    without = fit(messages, model="my-local-model", budget=120, counter=counter)
    with_tools = fit(
        messages, model="my-local-model", budget=120, tools=[{}, {}, {}], counter=counter
    )
    assert len(with_tools) <= len(without)
    assert with_tools[-1] == messages[-1]


def test_fit_uses_the_model_window_by_default() -> None:
    messages = [SYSTEM, user("hello")]
    assert fit(messages, model="gpt-4o", counter=CharCounter()) == messages
    huge = [SYSTEM, user("x" * 4 * 200_000)]
    with pytest.raises(BudgetExceeded, match="window 128000 - reserve 4096"):
        fit(huge, model="gpt-4o", counter=CharCounter())


def test_fit_raises_when_impossible() -> None:
    with pytest.raises(BudgetExceeded, match="need 29 prompt tokens"):
        fit(
            [{"role": "system", "content": "s" * 40}, user("u" * 40)],
            budget=20,
            counter=CharCounter(),
        )


def test_fit_repairs_and_validates() -> None:
    messages = [user("q"), calls("a", "b"), result("a"), user("well?")]
    kept = fit(messages, budget=1000, counter=CharCounter())
    assert kept[1]["tool_calls"] == [call("a")]
    with pytest.raises(InvalidMessage, match="role"):
        fit([{"role": "robot", "content": "x"}], budget=1000, counter=CharCounter())
    # Every message given is checked, also one too old to be sent.
    with pytest.raises(InvalidMessage, match="message 0: role"):
        fit([{"role": "robot", "content": "x" * 400}, user()], budget=20, counter=CharCounter())


def test_fit_argument_errors() -> None:
    with pytest.raises(UnknownModel):
        fit([user()], model="my-local-model", counter=CharCounter())
    with pytest.raises(ConfigurationError, match="budget"):
        fit([user()], budget="100", counter=CharCounter())  # type: ignore[arg-type]
    with pytest.raises(InvalidPayload, match="list"):
        fit("hello", budget=100, counter=CharCounter())  # type: ignore[arg-type]


def test_a_system_prompt_kept_apart_from_the_messages_comes_first() -> None:
    system = Item(-1, SYSTEM, 5)  # the engine stores it outside the message positions
    history = items(user(), assistant(), user("again"), assistant(), user("more"))
    context = build(State(system, (), Summary(0, 1, "s", 4), history[2:]), Budget(100))
    assert [m["role"] for m in context.messages] == [
        "system",
        "system",
        "user",
        "assistant",
        "user",
    ]
    assert context.report.system == 5


def test_the_margin_applies_under_a_cap_too():
    """Hierarchical summaries reserve their room through the margin; with a tight cap the
    margin used to be ignored and the strategy chose more than the cap (found by the lab)."""
    from conversation_memory.types import Budget

    assert Budget(window=128_000, reserve=4096, margin=190, cap=600).limit == 410
    assert Budget(window=1000, reserve=200, margin=50, cap=5000).limit == 750
    assert Budget(window=1000, reserve=200, tools=30, margin=50, cap=600).limit == 520
