"""Turns with a real model server: send, stream, prepare/record, compaction.

Everything goes through the real ``openai`` SDK over HTTP to
``conversation_memory.testing.ChatServer``, whose tokenizer is not tiktoken's.
"""

from __future__ import annotations

import itertools
import json

import pytest
import sqlalchemy as sa

from conversation_memory import (
    AuthenticationFailed,
    ConfigurationError,
    ContextLengthExceeded,
    Memory,
    ServerError,
    register_model,
)
from conversation_memory.llm import RetryPolicy
from conversation_memory.testing import ChatServer, Fault, RecordingSummarizer, refusals

MODEL = "test-model"
SUMMARY_HEADER = "Summary of the earlier conversation"


@pytest.fixture(scope="module", autouse=True)
def _test_model():
    register_model(MODEL, window=1000, max_output=200)


@pytest.fixture
def server():
    with ChatServer(window=1000, model=MODEL) as server:
        clients = []
        make = server.client

        def client(**options):
            clients.append(make(**options))
            return clients[-1]

        server.client = client  # every SDK client a test opens is closed after it
        yield server
        for each in clients:
            each.close()


def no_sleep(_seconds: float) -> None:
    return None


def open_memory(path, server, **options) -> Memory:
    return Memory(
        path,
        client=server.client(),
        model=MODEL,
        sleep=no_sleep,
        retry=RetryPolicy(attempts=3),
        **options,
    )


def rows(memory: Memory, table: str) -> list:
    with memory.database.engine.connect() as conn:
        return list(conn.execute(sa.text(f"SELECT * FROM {table}")))


def test_send_stores_the_turn_and_its_usage(tmp_path, server):
    with open_memory(tmp_path / "c.db", server) as memory:
        chat = memory.conversation(system="Be brief.")
        reply = chat.send("Hello there", max_tokens=50)
        assert reply.text.startswith("Reply #1")
        assert reply.complete
        assert reply.finish_reason == "stop"
        sent_messages = server.chat_requests[0].body["messages"]
        assert reply.usage.prompt_tokens == server.count_tokens(sent_messages)
        assert chat.history() == [
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": reply.text},
        ]
        sent = server.chat_requests[0].body
        assert sent["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there"},
        ]
        assert sent["max_tokens"] == 50
        (usage,) = rows(memory, "usage")
        assert usage.kind == "chat"
        assert usage.prompt_tokens == reply.usage.prompt_tokens
        totals = chat.usage()
        assert totals.calls == 1
        assert totals.completion_tokens == reply.usage.completion_tokens


def test_a_failed_call_stores_nothing(tmp_path, server):
    with open_memory(tmp_path / "c.db", server) as memory:
        chat = memory.conversation()
        chat.send("first")
        server.fail(Fault.status(500), times=3)
        with pytest.raises(ServerError):
            chat.send("second")
        assert len(server.chat_requests) == 4  # 1 + 3 attempts, never more
        assert chat.history()[0]["content"] == "first"
        assert len(chat.history()) == 2
        server.fail(Fault.status(401))
        with pytest.raises(AuthenticationFailed, match="OPENAI_API_KEY"):
            chat.send("third")
        assert len(chat.history()) == 2


def test_params_are_checked_before_any_request(tmp_path, server):
    with open_memory(tmp_path / "c.db", server) as memory:
        chat = memory.conversation()
        with pytest.raises(ConfigurationError, match="temperature"):
            chat.send("hi", temperature=3)
        with pytest.raises(ConfigurationError, match="max_tokens"):
            chat.send("hi", max_tokens=10_000)
        assert server.chat_requests == []
        assert chat.history() == []


def test_stream_stores_the_reply_once_at_the_end(tmp_path, server):
    with open_memory(tmp_path / "c.db", server) as memory:
        chat = memory.conversation()
        stream = chat.stream("Tell me a story")
        pieces = list(stream)
        assert len(pieces) > 1
        assert stream.reply is not None
        assert stream.reply.complete
        assert chat.history()[-1] == {"role": "assistant", "content": "".join(pieces)}
        assert rows(memory, "messages")[-1].complete


def test_a_cut_stream_is_stored_as_incomplete(tmp_path, server):
    with open_memory(tmp_path / "c.db", server) as memory:
        chat = memory.conversation()
        server.fail(Fault.cut_stream(after_chunks=2))
        pieces = list(chat.stream("Tell me a story"))
        entries = chat.entries()
        assert [e.message["role"] for e in entries] == ["user", "assistant"]
        assert entries[-1].message["content"] == "".join(pieces)
        assert entries[-1].complete is False


def test_a_reply_cut_at_max_tokens_is_marked_in_its_metadata(tmp_path, server):
    with open_memory(tmp_path / "c.db", server) as memory:
        chat = memory.conversation()
        assert chat.send("Tell me everything.", max_tokens=3).finish_reason == "length"
        with chat.stream("And again.", max_tokens=3) as stream:
            list(stream)
        assert stream.reply is not None
        assert stream.reply.finish_reason == "length"
        chat.send("Short?", max_tokens=100)  # ended on its own: no mark
        replies = [e for e in chat.entries() if e.message["role"] == "assistant"]
        assert [e.metadata for e in replies] == [{"finish_reason": "length"}] * 2 + [None]
        assert all(e.complete for e in replies), "received whole, only cut by the limit"
        assert chat.export().count('"metadata":{"finish_reason":"length"}') == 2


def test_an_abandoned_stream_is_stored_once_as_incomplete_or_dropped(tmp_path, server):
    with open_memory(tmp_path / "c.db", server) as memory:
        chat = memory.conversation()
        with chat.stream("Tell me a story") as stream:
            for _piece in stream:
                break
        assert [e.complete for e in chat.entries()] == [True, False]
        dropped = memory.conversation()
        with dropped.stream("again", on_incomplete="drop") as stream:
            next(iter(stream))
        assert dropped.history() == []


def test_bring_your_own_client_tool_loop(tmp_path, server):
    call = {"name": "weather", "arguments": json.dumps({"city": "Oslo"})}
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    with open_memory(tmp_path / "c.db", server) as memory:
        chat = memory.conversation()
        client = server.client()
        server_reply = {"tool_calls": [call]}
        server.reply = server_reply
        messages = chat.prepare("Weather in Oslo?", tools=tools)
        completion = client.chat.completions.create(model=MODEL, messages=messages, tools=tools)
        recorded = chat.record(completion)
        assert recorded.tool_calls
        call_id = recorded.tool_calls[0]["id"]
        server.reply = None
        messages = chat.prepare({"role": "tool", "tool_call_id": call_id, "content": "-3C"})
        assert messages[-1]["role"] == "tool"
        completion = client.chat.completions.create(model=MODEL, messages=messages)
        chat.record(completion.model_dump())
        roles = [m["role"] for m in chat.history()]
        assert roles == ["user", "assistant", "tool", "assistant"]
        assert server.rejections == []


def test_long_conversation_stays_inside_a_small_window(tmp_path, server):
    """300 turns, 1,000-token window, a tokenizer that isn't ours: every request fits."""
    with open_memory(tmp_path / "c.db", server, strategy="summary") as memory:
        chat = memory.conversation(system="You are a helpful assistant.")
        for turn in range(300):
            chat.send(f"Turn {turn}: my favourite number today is {turn * 7}.", max_tokens=60)
        assert server.rejections == []
        statuses = {r.status for r in server.chat_requests}
        assert statuses <= {200, 400}
        chats = [r for r in server.chat_requests if r.status == 200]
        assert any(SUMMARY_HEADER in json.dumps(r.body["messages"]) for r in chats[-10:]), (
            "the summary is sent"
        )
        assert len(chat.history()) == 600
        assert rows(memory, "summaries")
        overflows = [r for r in server.chat_requests if r.status == 400]
        assert len(overflows) <= 3, "calibration learns the server's tokenizer quickly"


def test_failed_summarization_answers_with_truncation_and_changes_nothing(tmp_path, server):
    summarizer = RecordingSummarizer()
    with open_memory(
        tmp_path / "c.db", server, strategy="summary", summarizer=summarizer
    ) as memory:
        chat = memory.conversation()
        summarizer.fail_next(1000)
        for turn in range(60):
            chat.send(f"message number {turn} " + "word " * 20, max_tokens=30)
        assert rows(memory, "summaries") == []
        failures = [u for u in rows(memory, "usage") if u.kind == "summary"]
        assert failures
        assert all(u.error for u in failures)
        assert len(chat.history()) == 120  # every turn answered (by truncation)
        before = chat.export()
        outcome = chat.compact()
        assert outcome.error
        assert chat.export() == before  # byte for byte
        summarizer.recover()  # the next turn compacts
        chat.send("one more", max_tokens=30)
        assert rows(memory, "summaries")
        assert len(chat.history()) == 122


def test_refused_summaries_are_never_stored(tmp_path, server):
    summarizer = RecordingSummarizer(replies=["", "   ", "I'm sorry, I can't help with that."])
    with open_memory(
        tmp_path / "c.db", server, strategy="summary", summarizer=summarizer
    ) as memory:
        chat = memory.conversation()
        for turn in range(40):
            chat.send(f"message number {turn} " + "word " * 20, max_tokens=30)
        texts = [s.text for s in rows(memory, "summaries")]
        assert all(text.strip() and not text.startswith("I'm sorry") for text in texts)


def test_hierarchical_summaries_stay_bounded_with_detail_for_recent_periods(tmp_path, server):
    summarizer = RecordingSummarizer(words_per_message=4)
    with open_memory(
        tmp_path / "c.db",
        server,
        strategy="hierarchical:fanout=3",
        summarizer=summarizer,
    ) as memory:
        chat = memory.conversation(system="You are terse.")
        for turn in range(150):
            chat.send(f"Turn {turn}: remember the code word K{turn}.", max_tokens=40)
        assert server.rejections == []
        stored = rows(memory, "summaries")
        levels = {row.level for row in stored}
        assert {0, 1} <= levels, levels
        context = chat.context()
        cover = context.summaries
        assert len(cover) >= 2
        assert [s.level for s in cover] == sorted((s.level for s in cover), reverse=True)
        assert all(a.end + 1 == b.start for a, b in itertools.pairwise(cover))
        assert cover[0].start == 0
        assert len(cover) <= 3 * (max(levels) + 1)
        sent = [m["content"] for m in context.messages if m["role"] == "system"]
        assert sum(SUMMARY_HEADER in text for text in sent) == len(cover)
        assert context.report.total <= context.report.limit
        assert len(chat.history()) == 300
        # merges summarize summaries, not the transcript again
        merges = [c for c in summarizer.calls if all(m["role"] == "system" for m in c.messages)]
        assert merges


def test_tool_loop_through_send(tmp_path, server):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    with open_memory(tmp_path / "c.db", server) as memory:
        chat = memory.conversation()
        server.reply = {"tool_calls": [{"name": "weather", "arguments": '{"city": "Oslo"}'}]}
        first = chat.send("Weather in Oslo?", tools=tools)
        assert first.finish_reason == "tool_calls"
        (call,) = first.tool_calls
        server.reply = None
        final = chat.send(
            [{"role": "tool", "tool_call_id": call["id"], "content": "-3C, snow"}], tools=tools
        )
        assert final.text
        assert [m["role"] for m in chat.history()] == ["user", "assistant", "tool", "assistant"]
        assert server.chat_requests[-1].body["messages"][-1]["role"] == "tool"
        assert server.rejections == []


def test_compaction_before_the_request(tmp_path, server):
    summarizer = RecordingSummarizer()
    with open_memory(
        tmp_path / "c.db", server, strategy="summary", summarizer=summarizer, compaction="before"
    ) as memory:
        chat = memory.conversation()
        for turn in range(40):
            chat.send(f"message number {turn} " + "word " * 20, max_tokens=30)
        assert summarizer.calls
        assert rows(memory, "summaries")
        last = json.dumps(server.chat_requests[-1].body["messages"])
        assert SUMMARY_HEADER in last


def test_no_transaction_is_open_during_a_model_call(tmp_path, server):
    """While the model (chat or summarizer) works, another writer gets the database at once."""
    import sqlite3

    path = tmp_path / "c.db"
    free: list[bool] = []

    def write_now() -> None:
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # fails at once if a write lock is held
            other.execute("ROLLBACK")
            free.append(True)
        except sqlite3.OperationalError:
            free.append(False)
        finally:
            other.close()

    def reply(body):  # returns None: the server's default reply or summary
        write_now()

    server.reply = reply
    with open_memory(path, server, strategy="summary") as memory:
        chat = memory.conversation()
        for turn in range(30):
            chat.send(f"message number {turn} " + "word " * 20, max_tokens=30)
        assert rows(memory, "summaries"), "the summarizer was called too"
    assert free
    assert all(free)


# -- calibration against what a server claims ------------------------------------------


def bogus_overflow() -> Fault:
    """A 400 that claims 90,000 prompt tokens whatever was sent (a confused proxy)."""
    return Fault.status(400, body=refusals.openai_context_body(1500, 90000, 0))


TURNS = [f"Question {n}: what do {n} apples and {n} pears make together?" for n in range(6)]


def test_a_bogus_context_length_error_does_not_stick(tmp_path, server):
    """The claim is bounded by what the prompt could have been, the retry goes out, and
    the replies' usage decides the correction: it ends where an undisturbed twin's does."""
    with open_memory(tmp_path / "c.db", server) as memory:
        chat, twin = memory.conversation(), memory.conversation()
        server.fail(bogus_overflow())
        for text in TURNS:
            assert chat.send(text, max_tokens=20).complete
            twin.send(text, max_tokens=20)
        assert [r.status for r in server.chat_requests].count(400) == 1
        assert len(chat.history()) == 2 * len(TURNS)
        learnt, expected = chat.correction(), twin.correction()
    assert expected.factor == pytest.approx(1, abs=0.5)  # the server's tokenizer is not ours
    assert learnt.factor == pytest.approx(expected.factor, rel=0.05)


def test_a_retry_that_also_fails_leaves_the_correction_as_it_was(tmp_path, server):
    with open_memory(tmp_path / "c.db", server) as memory:
        chat = memory.conversation()
        chat.send(TURNS[0], max_tokens=20)
        before = chat.correction()
        server.fail(bogus_overflow(), times=2)
        with pytest.raises(ContextLengthExceeded):
            chat.send(TURNS[1], max_tokens=20)
        assert chat.correction() == before
        assert len(chat.history()) == 2  # the failed turn stored nothing
        assert chat.send(TURNS[1], max_tokens=20).complete


def test_a_conversation_recovers_from_any_stored_correction(tmp_path, server):
    """Even a correction that leaves no room at all (one a bogus claim stored before)
    lets the next request go out, and that reply's usage replaces it."""
    with open_memory(tmp_path / "c.db", server) as memory:
        chat, twin = memory.conversation(), memory.conversation()
        for each in (chat, twin):
            each.send(TURNS[0], max_tokens=20)
        assert chat.calibrate(counted=13, reported=90000).factor == 1000
        assert chat.context().messages[-1]["content"]  # a preview, not an error
        for text in TURNS[1:3]:
            assert chat.send(text, max_tokens=20).complete
            twin.send(text, max_tokens=20)
        assert chat.correction().factor == pytest.approx(twin.correction().factor, rel=0.05)
