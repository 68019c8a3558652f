"""The recall strategies: earlier whole turns that match the new question, sent in one message.

Pure tests on hand-made states (naming, the query, the choice, the message and its
cost), then the engine over real SQLite and PostgreSQL: a fact said early is brought
back for a later question that shares its words, in the request the model gets,
with nothing stored; forks recall the history they share.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conversation_memory import (
    AsyncMemory,
    Memory,
    Recall,
    as_strategy,
    build,
    counter_for,
    explain,
)
from conversation_memory.errors import ConfigurationError, InvalidPayload
from conversation_memory.recall import query_text
from conversation_memory.retrieval import costed, recall_message
from conversation_memory.strategies import TRUNCATE, Hierarchical, Summarize, Summarizing
from conversation_memory.testing import ChatServer
from conversation_memory.types import Budget, Item, Recalled, State
from conversation_memory.units import Selection

COUNTER = counter_for("gpt-4o-mini")


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def reply(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


# -- names ----------------------------------------------------------------------------


def test_recall_is_named_and_wraps_any_built_in() -> None:
    assert as_strategy("recall") == Recall()
    assert as_strategy("recall").name == "recall"
    assert as_strategy("truncate+recall") == Recall()
    both = as_strategy("summary+recall")
    assert isinstance(both, Recall)
    assert both.base == Summarize()
    assert both.name == "summary+recall"
    tuned = as_strategy("summary:high=0.8,low=0.5+recall:share=0.3,k=6")
    assert tuned == Recall(base=Summarize(high=0.8, low=0.5), share=0.3, k=6)
    assert as_strategy(tuned.name) == tuned
    assert as_strategy("hierarchical+recall") == Recall(base=Hierarchical())
    assert as_strategy("window:3+recall").name == "window:3+recall"


@pytest.mark.parametrize(
    "name",
    ["recall:share=1", "recall:share=0", "recall:k=0", "recall:k=x", "recall:depth=2",
     "summary+window", "recall+recall", "nonsense+recall"],
)  # fmt: skip
def test_bad_recall_names_say_what_to_write(name: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        as_strategy(name)
    assert "strategy" in str(raised.value) or "Recall(" in str(raised.value)


@pytest.mark.parametrize(
    "options", [{"share": 1.5}, {"share": True}, {"k": 0}, {"k": 2.0}, {"base": Recall()}]
)
def test_recall_checks_its_arguments(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Recall(**options)


def test_a_summarizing_base_keeps_summarizing_through_the_wrapper() -> None:
    assert isinstance(Recall(base=Summarize()), Summarizing)
    assert not isinstance(Recall(), Summarizing)  # truncation folds nothing
    budget = Budget(window=4000)
    assert Recall(base=Summarize()).summary_cap(budget) == Summarize().summary_cap(budget)
    assert Recall(base=Hierarchical()).hierarchical is True
    assert getattr(Recall(), "hierarchical", False) is False


# -- the query --------------------------------------------------------------------------


def items(*messages: dict[str, Any], start: int = 0) -> list[Item]:
    return [Item(n, m, 10) for n, m in enumerate(messages, start=start)]


def test_the_query_is_the_new_questions_content_words() -> None:
    tail = items(
        user("What is the capital of Peru?"),
        reply("Lima."),
        user("Which river crosses Lima's old town centre?"),
    )
    # Longest first (long words tend to be the telling ones), at most eight.
    assert query_text(tail) == "crosses centre river lima town old"
    many = "Budgets, tokens, windows, caches, indexes, queries, strategies, summaries, turns"
    assert query_text(items(user(many))).split() == [
        "strategies", "summaries", "budgets", "windows", "indexes", "queries", "tokens", "caches"
    ]  # fmt: skip


def test_a_short_follow_up_also_searches_the_previous_question() -> None:
    tail = items(
        user("Compare the two offers from the plumber"),
        reply("The first is cheaper."),
        user("and what about the second one?"),
    )
    assert query_text(tail) == "second one compare plumber offers two"
    assert query_text(items(reply("hello"))) == ""


# -- the choice, on hand-made states ----------------------------------------------------


def turn(position: int, question: str, answer: str, score: float) -> tuple[float, list[Item]]:
    return score, items(user(question), reply(answer), start=position)


def recalling_state(*found: tuple[float, list[Item]], newest: int = 100) -> State:
    tail = items(*[m for n in range(5) for m in (user(f"q{n}"), reply(f"a{n}"))], start=newest)
    tail.append(Item(newest + 10, user("where is the spare key?"), 10))
    recalled, overhead = costed(found, newest + 11, COUNTER.count_text, COUNTER.count_message)
    return State(
        system=Item(-1, {"role": "system", "content": "s"}, 5),
        pinned=(),
        summary=None,
        tail=tail,
        has_older=True,
        recalled=recalled,
        recall_overhead=overhead,
    )


def test_the_best_turns_are_sent_oldest_first_after_the_system_part() -> None:
    state = recalling_state(
        turn(40, "the spare key?", "Under the blue pot.", 9.0),
        turn(12, "a key for the shed", "On the hook.", 5.0),
        turn(70, "keys and locks", "Ask the locksmith.", 1.0),
    )
    context = build(state, Budget(window=10_000), Recall(k=2))
    assert [(t.start, t.end) for t in context.recalled] == [(12, 13), (40, 41)]
    message = context.messages[1]
    assert message["role"] == "system"
    assert message["content"].startswith(
        "Earlier messages that may be relevant (messages 12\u201313, 40\u201341 of 111):\n\n"
        "[12 user] a key for the shed\n[13 assistant] On the hook.\n\n[40 user] the spare key?"
    )
    assert context.messages[2] == user("q0")  # then the tail, whole
    report = context.report
    assert report.retrieved == {12, 13, 40, 41}
    assert report.recall == state.recall_overhead + sum(t.tokens for t in context.recalled)
    assert COUNTER.count_message(message) <= report.recall
    assert report.total == 5 + 11 * 10 + report.recall + 3
    assert [(r.first, r.last, r.score) for r in report.recalled] == [(12, 13, 5.0), (40, 41, 9.0)]
    assert "recalled messages 12 to 13 (score 5, " in explain(context)
    assert "  recall    " in explain(context)


def test_recall_takes_its_share_and_the_base_gets_the_rest() -> None:
    long_answer = "word " * 300
    state = recalling_state(
        turn(40, "the spare key?", long_answer, 9.0), turn(12, "key", "hook", 1.0)
    )
    budget = Budget(window=150)
    context = build(state, budget, Recall())
    # The long turn is over the share; the short one fits, and the base fills the rest.
    assert [t.start for t in context.recalled] == [12]
    assert budget.fits(context.report.total)
    truncated = build(state, budget, TRUNCATE)
    assert len(context.items) < len(truncated.items)
    assert context.report.total <= budget.limit


def test_without_candidates_recall_is_its_base() -> None:
    state = recalling_state()
    budget = Budget(window=90)
    assert build(state, budget, Recall()).messages == build(state, budget, TRUNCATE).messages
    assert Recall().select(state, budget) == TRUNCATE.select(state, budget)


def test_turns_the_tail_sends_are_not_repeated() -> None:
    state = recalling_state(turn(104, "q2", "a2", 9.0), turn(30, "key?", "pot", 1.0))
    context = build(state, Budget(window=10_000), Recall())
    assert [t.start for t in context.recalled] == [30]
    assert 104 in {i.position for i in context.items}


def test_the_query_excludes_what_the_base_sends() -> None:
    state = recalling_state()
    query = Recall().recall_query(state, Budget(window=10_000))
    assert query is not None
    assert (query.before, query.limit) == (100, 4)  # the whole tail is sent
    assert query.text == "spare key q4"  # a short question: the previous one joins
    query = Recall().recall_query(state, Budget(window=70))
    assert query is not None
    assert query.before > 100


def test_assemble_refuses_recalled_turns_that_repeat_the_tail() -> None:
    state = recalling_state(turn(104, "q2", "a2", 9.0))
    chosen = TRUNCATE.select(state, Budget(window=10_000))

    def repeats(state: State, budget: Budget) -> Selection:
        from dataclasses import replace

        return replace(chosen, recalled=tuple(state.recalled))

    with pytest.raises(InvalidPayload, match="also sends as they are"):
        build(state, Budget(window=10_000), repeats)


def test_the_recall_message_counts_no_more_than_its_parts() -> None:
    found = [
        turn(n * 7, f"question {n} ünïcode 日本 " * n, "answer  \n" * n, n) for n in range(1, 9)
    ]
    recalled, overhead = costed(found, 1_240, COUNTER.count_text, COUNTER.count_message)
    for k in range(1, len(recalled) + 1):
        message = recall_message(recalled[:k], 1_240)
        assert COUNTER.count_message(message) <= overhead + sum(t.tokens for t in recalled[:k])
    assert recall_message(recalled[:1], 1_240)["content"].startswith(
        "Earlier messages that may be relevant (messages 7\u20138 of 1,240):"
    )
    assert isinstance(recalled[0], Recalled)


# -- the engine, over real databases ----------------------------------------------------

FACT = "The warehouse side door code is 4711 and its spare key hangs behind the fuse box."
QUESTION = "Where does the spare key for the warehouse side door hang?"


def filler(n: int) -> list[dict[str, Any]]:
    return [
        user(f"Shall we plan dinner number {n} with pasta, salad and bread?"),
        reply(f"Dinner {n}: pasta with a green salad and fresh bread sounds good."),
    ]


def history(turns: int, fact_at: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for n in range(turns):
        out += [user(FACT), reply("Noted.")] if n == fact_at else filler(n)
    return out


def test_a_fact_said_early_is_recalled_for_a_later_question(db_url: str) -> None:
    with Memory(db_url, model="gpt-4o-mini") as memory:
        chat = memory.conversation(system="Be brief.", strategy="recall", budget=600)
        chat.extend(history(150, fact_at=5))
        chat.append(user(QUESTION))
        stored = chat.entries()
        context = chat.context()
        assert [(t.start, t.end) for t in context.recalled] == [(10, 11)]
        assert context.messages[0] == {"role": "system", "content": "Be brief."}
        recalled = context.messages[1]
        assert recalled == {
            "role": "system",
            "content": "Earlier messages that may be relevant (messages 10\u201311 of 301):\n\n"
            f"[10 user] {FACT}\n[11 assistant] Noted.",
        }
        assert context.messages[2]["role"] == "user"
        assert context.messages[-1] == user(QUESTION)
        assert context.report.retrieved == {10, 11}
        assert context.report.total <= 600
        assert 10 not in {item.position for item in context.items}
        assert chat.entries() == stored  # the archive is only read
        assert chat.calls() == []
        # Truncation at the same budget has lost it.
        plain = memory.conversation(chat.id, strategy="truncate", budget=600).context()
        assert all("4711" not in str(m.get("content")) for m in plain.messages)


def test_the_model_gets_the_recalled_turn_and_nothing_more_is_stored(db_url: str) -> None:
    with (
        ChatServer(model="gpt-4o-mini", window=32_000) as server,
        server.client() as client,
        Memory(db_url, client=client, model="gpt-4o-mini") as memory,
    ):
        chat = memory.conversation(strategy="summary+recall", budget=700, system="Be brief.")
        chat.extend(history(100, fact_at=3))
        chat.send(QUESTION, max_tokens=50)
        sent = server.chat_requests[0].body["messages"]
        assert sent[1]["role"] == "system"
        assert sent[1]["content"].startswith("Earlier messages that may be relevant (messages 6")
        assert FACT in sent[1]["content"]
        assert sent[-1] == user(QUESTION)
        assert len(chat.entries()) == 202  # the question and its reply, no recall row
        assert chat.summary_cover()  # the summary was folded after the reply
        again = "And the code of that warehouse side door?"
        chat.send(again, max_tokens=50)
        sent = next(r for r in server.chat_requests if r.body["messages"][-1] == user(again))
        roles = [m["role"] for m in sent.body["messages"][:4]]
        assert roles == ["system", "system", "system", "user"]
        summary, recalled = sent.body["messages"][1:3]
        assert summary["content"].startswith("Summary of the earlier conversation")
        assert recalled["content"].startswith("Earlier messages that may be relevant (messages 6")
        assert [call.kind for call in chat.calls()].count("chat") == 2


def test_forks_recall_the_history_they_share(db_url: str) -> None:
    with Memory(db_url, model="gpt-4o-mini") as memory:
        parent = memory.conversation(strategy="recall", budget=500)
        parent.extend(history(60, fact_at=2))
        fork = parent.fork()
        parent.extend([user("The warehouse side door now has a new spare key hook."), reply("Ok.")])
        fork.extend(history(10, fact_at=99))
        fork.append(user(QUESTION))
        context = fork.context()
        assert [t.start for t in context.recalled] == [4]
        assert "new spare key hook" not in context.messages[1]["content"]


def test_async_conversations_recall_the_same_turns(tmp_path) -> None:
    path = tmp_path / "c.db"
    with Memory(path, model="gpt-4o-mini") as memory:
        chat = memory.conversation(strategy="recall", budget=600)
        chat.extend(history(80, fact_at=7))
        chat.append(user(QUESTION))
        expected = chat.context()

    async def main() -> Any:
        async with AsyncMemory(path, model="gpt-4o-mini") as memory:
            again = await memory.conversation(chat.id, strategy="recall", budget=600)
            return await again.context()

    context = asyncio.run(main())
    assert context.messages == expected.messages
    assert context.report == expected.report
    assert [t.start for t in context.recalled] == [14]


def test_convmem_context_shows_the_recalled_turns(tmp_path) -> None:
    from test_cli import run, run_json

    db = str(tmp_path / "cli.db")
    with Memory(db, model="gpt-4o-mini") as memory:
        chat = memory.conversation(strategy="recall", budget=600)
        chat.extend(history(150, fact_at=5))
        chat.append(user(QUESTION))
    shown = run_json("context", chat.id, "--db", db)
    parts, report = shown["parts"], shown["report"]
    assert [p["kind"] for p in parts[:2]] == ["recall", "message"]
    assert parts[0]["position"] == "10-11"
    assert parts[0]["tokens"] == report["recall"] > 0
    assert sum(p["tokens"] for p in parts) + report["priming"] == report["total"]
    assert len(shown["messages"]) == len(parts)
    [turn] = report["recalled"]
    assert (turn["first"], turn["last"]) == (10, 11)
    assert turn["score"] > 0
    assert turn["tokens"] > 0
    text = run("context", chat.id, "--db", db).stdout
    assert "recalled messages 10–11 (score" in text
    truncated = run_json("context", chat.id, "--db", db, "--strategy", "truncate")
    assert "recall" not in [p["kind"] for p in truncated["parts"]]
    assert truncated["report"]["recalled"] == []


def test_words_too_common_to_rank_recall_nothing(db_url: str, monkeypatch) -> None:
    from conversation_memory.store import search

    monkeypatch.setattr(search, "CANDIDATES", 5)  # "dinner" is then common
    with Memory(db_url, model="gpt-4o-mini") as memory:
        chat = memory.conversation(strategy="recall", budget=300)
        chat.extend(history(40, fact_at=2))
        chat.append(user("Which dinner again?"))
        assert chat.context().recalled == ()  # not the newest dinners, unranked
        with memory.database.read() as conn:
            segments = [(chat.id, None)]
            assert search.search_lineage(conn, segments, "dinner", before=50)  # newest first
            assert search.search_lineage(conn, segments, "dinner", ranked_only=True) == []
        chat.append(user("And the spare key of the warehouse door?"))
        assert [t.start for t in chat.context().recalled] == [4]


def test_a_tool_result_brings_back_its_whole_turn(db_url: str) -> None:
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "lookup", "arguments": '{"q":"x"}'},
    }
    with Memory(db_url, model="gpt-4o-mini") as memory:
        chat = memory.conversation(strategy="recall", budget=400)
        chat.extend(history(3, fact_at=99))
        chat.extend(
            [
                user("Please look it up."),
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "Depot gate combination: 2468."},
                reply("Found it."),
            ]
        )
        chat.extend(history(30, fact_at=99))
        chat.append(user("What was the depot gate combination again?"))
        context = chat.context()
        [turn] = context.recalled
        assert [i.position for i in turn.items] == [6, 7, 8, 9]
        assert context.messages[0]["content"].endswith(
            "[6 user] Please look it up.\n"
            '[7 assistant] lookup({"q":"x"})\n'
            "[8 tool] Depot gate combination: 2468.\n"
            "[9 assistant] Found it."
        )


def test_a_turn_longer_than_the_window_is_not_recalled(db_url: str) -> None:
    from conversation_memory.store.recall import WINDOW

    def long_turn(question: str, replies: int, fact: str) -> list[dict[str, Any]]:
        return [user(question), *(reply(f"Step {n}.") for n in range(replies)), reply(fact)]

    with Memory(db_url, model="gpt-4o-mini") as memory:
        chat = memory.conversation(strategy="recall:share=0.4,k=4", budget=1000)
        chat.extend(long_turn("First job.", WINDOW - 2, "The boiler pressure reads 1.8 bar."))
        chat.extend(long_turn("Second job.", WINDOW + 2, "The kettle descaler costs 7 euros."))
        chat.extend(history(30, fact_at=99))
        chat.append(user("What does the boiler pressure read?"))
        [turn] = chat.context().recalled
        assert (turn.start, turn.end) == (0, WINDOW - 1)
        chat.append(user("How much was that kettle descaler?"))
        assert chat.context().recalled == ()  # its question is too far back
