"""The library surface on real databases: append, history, scoping, fork, delete, export."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from conversation_memory import (
    BudgetExceeded,
    ConfigurationError,
    ConversationExists,
    ConversationNotFound,
    ImportFormatError,
    InvalidMessage,
    Memory,
    UserNotFound,
)

WEATHER_CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
        },
        {
            "id": "call_2",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Bergen"}'},
        },
    ],
}


@pytest.fixture
def memory(db_url):
    with Memory(db_url) as memory:
        yield memory


def count_rows(memory: Memory, table: str) -> int:
    with memory.database.engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()


def test_append_and_history_round_trip(memory):
    conv = memory.conversation(system="Be brief.", title="trip")
    sent = [
        {"role": "user", "content": "Weather in Oslo and Bergen? ☔ ünïcødé 🚀"},
        WEATHER_CALL,
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
        {"role": "tool", "tool_call_id": "call_1", "content": "snow"},
        {"role": "assistant", "content": "Snow in Oslo, rain in Bergen."},
        {
            "role": "user",
            "name": "alice",
            "content": [
                {"type": "text", "text": "and this?"},
                {"type": "image_url", "image_url": {"url": "https://x.invalid/a.png"}},
            ],
        },
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "text with <|endoftext|> inside"},
    ]
    stored = [conv.append(m) for m in sent]
    assert [s.position for s in stored] == list(range(len(sent)))
    assert all(s.tokens > 3 for s in stored)
    assert conv.history() == sent
    again = memory.conversation(conv.id)
    assert again.history() == sent
    assert again.system == "Be brief."
    info = memory.conversations()[0]
    assert (info.id, info.message_count, info.tokens) == (
        conv.id,
        len(sent),
        sum(s.tokens for s in stored),
    )


def test_context_is_the_system_prompt_plus_the_newest_turns(memory):
    conv = memory.conversation(system="sys", budget=200, model="gpt-4o-mini")
    for n in range(50):
        conv.append({"role": "user", "content": f"question {n} " + "word " * 10})
        conv.append({"role": "assistant", "content": f"answer {n}"})
    context = conv.context()
    assert context.messages[0] == {"role": "system", "content": "sys"}
    assert context.messages[-1] == {"role": "assistant", "content": "answer 49"}
    assert context.report.total <= 200
    assert context.report.total == sum(i.tokens for i in context.items) + 3
    assert 0 < len(context.messages) < 101


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"role": "wizard", "content": "hi"}, "role"),
        ({"role": "user", "content": 42}, "content"),
        ({"role": "user"}, "content"),
        ({"role": "user", "content": "a\x00b"}, "NUL"),
        ({"role": "user", "content": "lone \ud800 surrogate"}, "surrogate"),
        ({"role": "user", "content": "hi", "colour": "blue"}, "colour"),
        ({"role": "user", "content": "hi", "name": "has spaces"}, "name"),
        ({"role": "tool", "content": "x"}, "tool_call_id"),
        ({"role": "user", "content": [{"type": "video", "video": 1}]}, "type"),
        ({"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}, "function"),
        ("just a string", "dict"),
    ],
)
def test_bad_messages_are_refused_and_nothing_is_written(memory, message, field):
    conv = memory.conversation()
    conv.append({"role": "user", "content": "first"})
    with pytest.raises(InvalidMessage, match=field):
        conv.append(message)
    assert conv.history() == [{"role": "user", "content": "first"}]
    assert count_rows(memory, "messages") == 1
    assert memory.conversations()[0].message_count == 1


def test_tool_result_must_answer_an_open_call(memory):
    conv = memory.conversation()
    conv.append({"role": "user", "content": "hi"})
    with pytest.raises(InvalidMessage, match="no tool call waiting"):
        conv.append({"role": "tool", "tool_call_id": "call_1", "content": "x"})
    conv.append(WEATHER_CALL)
    with pytest.raises(InvalidMessage, match="open calls are"):
        conv.append({"role": "tool", "tool_call_id": "call_9", "content": "x"})
    conv.append({"role": "tool", "tool_call_id": "call_1", "content": "x"})
    with pytest.raises(InvalidMessage, match="call_2"):  # call_1 is answered already
        conv.append({"role": "tool", "tool_call_id": "call_1", "content": "again"})
    assert len(conv) == 3
    assert count_rows(memory, "messages") == 3


def test_a_message_bigger_than_the_budget_is_refused(memory):
    conv = memory.conversation(budget=50)
    with pytest.raises(BudgetExceeded, match="cannot fit"):
        conv.append({"role": "user", "content": "word " * 200})
    assert len(conv) == 0


def test_nul_and_surrogates_same_decision_on_both_backends(memory):
    """What is accepted (every other code point) round-trips exactly."""
    conv = memory.conversation()
    text = "".join(chr(c) for c in range(1, 0xD800, 97)) + "\U0010ffff\x7f\ufeff"
    conv.append({"role": "user", "content": text})
    assert conv.history()[0]["content"] == text


def test_users_cannot_see_each_others_conversations(memory):
    alice = memory.conversation(user="alice")
    alice.append({"role": "user", "content": "secret"})
    with pytest.raises(ConversationNotFound) as excinfo:
        memory.conversation(alice.id, user="bob")
    with pytest.raises(ConversationNotFound) as missing:
        memory.conversation("no-such-id", user="bob")
    assert type(excinfo.value) is type(missing.value)
    assert str(excinfo.value).replace(alice.id, "X") == str(missing.value).replace(
        "no-such-id", "X"
    )
    assert memory.conversations(user="bob") == []
    assert [c.id for c in memory.conversations(user="alice")] == [alice.id]
    assert isinstance(excinfo.value, LookupError)


def test_conversations_are_listed_newest_activity_first(memory):
    first = memory.conversation(title="first")
    memory.conversation(title="second")
    first.append({"role": "user", "content": "bump"})
    assert [c.title for c in memory.conversations()] == ["first", "second"]
    assert [c.title for c in memory.conversations(limit=1)] == ["first"]


def test_fork_shares_the_prefix_without_copying(memory):
    conv = memory.conversation(system="s")
    for n in range(6):
        conv.append({"role": "user" if n % 2 == 0 else "assistant", "content": f"m{n}"})
    fork = conv.fork(at=3)
    assert fork.history() == conv.history()[:4]
    assert count_rows(memory, "messages") == 6  # nothing copied
    fork.append({"role": "user", "content": "branch"})
    assert fork.history()[-1]["content"] == "branch"
    assert len(conv.history()) == 6
    grandchild = fork.fork()
    assert grandchild.history() == fork.history()
    info = {c.id: c for c in memory.conversations()}
    assert info[fork.id].message_count == 5
    assert info[fork.id].tokens == sum(e.tokens for e in fork.entries())
    assert fork.context().messages[-1] == {"role": "user", "content": "branch"}
    early = fork.fork(at=1)  # inside the part the fork shares with its parent
    assert early.history() == conv.history()[:2]
    info = {c.id: c for c in memory.conversations()}
    assert (info[early.id].message_count, info[early.id].tokens) == (
        2,
        sum(e.tokens for e in conv.entries()[:2]),
    )
    fork.delete()  # early keeps what it shared with fork, which came from conv
    assert memory.conversation(early.id).history() == conv.history()[:2]
    with pytest.raises(ConfigurationError, match="position"):
        conv.fork(at=99)


def test_deleting_a_parent_keeps_its_forks_whole(memory):
    conv = memory.conversation()
    for n in range(4):
        conv.append({"role": "user", "content": f"m{n}"})
    fork = conv.fork(at=1)
    fork.append({"role": "user", "content": "own"})
    grandchild = fork.fork()
    expected_fork, expected_grand = fork.history(), grandchild.history()
    conv.delete()
    assert memory.conversation(fork.id).history() == expected_fork
    assert memory.conversation(grandchild.id).history() == expected_grand
    with pytest.raises(ConversationNotFound):
        memory.conversation(conv.id)
    fork.delete()
    assert memory.conversation(grandchild.id).history() == expected_grand


def test_erase_user_removes_everything_derived(memory):
    alice = memory.conversation(user="alice")
    alice.append({"role": "user", "content": "hi"})
    alice.fork().append({"role": "user", "content": "fork"})
    alice.calibrate(counted=100, reported=120)
    bob = memory.conversation(user="bob")
    bob.append({"role": "user", "content": "bob's"})
    assert memory.erase_user("alice") == 2
    assert memory.conversations(user="alice") == []
    assert count_rows(memory, "messages") == 1
    assert count_rows(memory, "calibrations") == 0
    assert bob.history() == [{"role": "user", "content": "bob's"}]
    with pytest.raises(UserNotFound):
        memory.erase_user("alice")


def test_export_import_round_trips_byte_identically(db_url, tmp_path):
    with Memory(db_url) as memory:
        conv = memory.conversation(user="u1", system="sys ✓", title="t")
        conv.append({"role": "user", "content": "hello\nworld \U0001f600"}, pinned=True)
        conv.append(WEATHER_CALL)
        conv.append({"role": "tool", "tool_call_id": "call_1", "content": "1"})
        conv.append({"role": "tool", "tool_call_id": "call_2", "content": "2"})
        conv.append({"role": "assistant", "content": "done"}, metadata={"k": [1, "ü"]})
        exported = conv.export()
        history = conv.history()
    lines = exported.splitlines()
    assert json.loads(lines[0])["id"] == conv.id
    assert len(lines) == 6
    with Memory(tmp_path / "other.db") as other:
        imported = other.import_conversation(exported)
        assert imported.export() == exported
        assert imported.history() == history
        with pytest.raises(ConversationExists):
            other.import_conversation(exported)
        copy = other.import_conversation(exported.encode(), new_id=True)
        assert copy.id != conv.id
        assert copy.history() == imported.history()


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("", "line 1"),
        ("not json\n", "line 1"),
        ('{"convmem": 1, "type": "conversation"}\n', "line 1"),
        (
            '{"convmem": 1, "type": "conversation", "id": "x", "created_at": '
            '"2026-01-01T00:00:00+00:00", "updated_at": "2026-01-01T00:00:00+00:00"}\n'
            '{"role": "user", "content": "ok", "convmem": {"created_at": '
            '"2026-01-01T00:00:00+00:00"}}\n{"role": "bogus", "content": "x"}\n',
            "line 3",
        ),
    ],
)
def test_malformed_imports_name_the_line_and_write_nothing(memory, text, line):
    with pytest.raises(ImportFormatError, match=line):
        memory.import_conversation(text)
    assert count_rows(memory, "conversations") == 0


def test_bad_arguments_are_configuration_errors(memory):
    with pytest.raises(ConfigurationError, match="budget"):
        memory.conversation(budget=0)
    with pytest.raises(ConfigurationError, match="user"):
        memory.conversation(user="")
    with pytest.raises(ConfigurationError, match="strategy"):
        memory.conversation(strategy="no-such-strategy")
    with pytest.raises(LookupError, match="register_model"):
        memory.conversation(model="my-own-model")


def test_threads_share_one_memory(db_url):
    """Each thread gets its own connection; appends from all of them stay gap-free."""
    import threading

    with Memory(db_url) as memory:
        conv = memory.conversation()
        errors: list[BaseException] = []

        def worker(n: int) -> None:
            try:
                mine = memory.conversation(conv.id)
                for i in range(50):
                    mine.append({"role": "user", "content": f"thread {n} message {i}"})
                    mine.context()
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        entries = conv.entries()
        assert [e.position for e in entries] == list(range(200))
        for n in range(4):
            mine = [
                e.message["content"]
                for e in entries
                if e.message["content"].startswith(f"thread {n} ")
            ]
            assert mine == [f"thread {n} message {i}" for i in range(50)]


def test_calibration_is_stored_and_applied(memory):
    """A server that counts 25% more than we do: the budget shrinks to keep it inside."""
    conv = memory.conversation(budget=300)
    for n in range(60):
        conv.append({"role": "user" if n % 2 == 0 else "assistant", "content": f"message {n}"})
    before = conv.context().report
    assert before.corrected == before.total
    correction = conv.calibrate(counted=400, reported=500)
    assert correction.factor == pytest.approx(1.25)
    assert correction.margin > 0
    after = conv.context().report
    assert after.corrected <= after.limit == 300
    assert after.total < before.total
    assert memory.conversation(conv.id).correction() == correction
    with pytest.raises(ConfigurationError, match="reported"):
        conv.calibrate(counted=10, reported=0)


def test_calibration_starts_from_the_registry_prior():
    """Both ways of learning (a turn's usage, or calibrate()) blend with the model's
    initial correction rather than starting from identity."""
    from conversation_memory import Correction, Memory, register_model

    register_model("prior-model", window=4096, max_output=512, correction=Correction(1.3, 8))
    with Memory(":memory:") as memory:
        chat = memory.conversation(model="prior-model")
        assert chat.correction() == Correction(1.3, 8)
        learnt = chat.calibrate(counted=100, reported=100)
    assert learnt.factor == pytest.approx(0.7 * 1.3 + 0.3 * 1.0)
