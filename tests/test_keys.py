"""Conversations keyed by the application: ``memory.conversation(key=..., user=...)``.

The key is the application's own name for a conversation (a chat id, a
ticket number), unique per user, stored in its own indexed column (migration
0005). With a key, ``conversation`` resumes that user's conversation or
creates it, atomically: processes racing on one new key end with one
conversation holding every append.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import time
import traceback
from pathlib import Path

import pytest
import sqlalchemy as sa

from conversation_memory import ConfigurationError, ConversationNotFound
from conversation_memory.aio import AsyncMemory
from conversation_memory.engine import Memory
from conversation_memory.store import migrate
from conversation_memory.tokens import counter_for

RACERS = 8
PER_RACER = 10
RACE_KEY = "telegram:12345"
RACE_TIMEOUT = 120.0


def _key_columns(db) -> set[str]:
    return {c["name"] for c in sa.inspect(db.engine).get_columns("conversations")}


def test_migration_0005_goes_down_and_up_again(db_url):
    from alembic import command

    with Memory(db_url) as memory:
        db = memory.database
        with db.engine.begin() as conn:
            command.downgrade(migrate.alembic_config(conn), "0004")
        assert "key" not in _key_columns(db)
        assert migrate.upgrade(db) == "0005"
        assert "key" in _key_columns(db)
        indexes = {i["name"]: i for i in sa.inspect(db.engine).get_indexes("conversations")}
        assert indexes["ix_conversations_user_key"]["unique"]
        assert migrate.check(db) == []


def _user(n: int) -> dict[str, str]:
    return {"role": "user", "content": f"message {n}"}


def test_a_key_creates_then_resumes_the_same_conversation(db_url):
    with Memory(db_url) as memory:
        chat = memory.conversation(key="telegram:12345", user="ann", system="Be brief.")
        assert chat.key == "telegram:12345"
        chat.append(_user(0))
        again = memory.conversation(key="telegram:12345", user="ann")
        assert again.id == chat.id
        assert again.system == "Be brief."
        again.append(_user(1))
        assert [m["content"] for m in chat.history()] == ["message 0", "message 1"]
        [listed] = memory.conversations(user="ann")
        assert (listed.id, listed.key) == (chat.id, "telegram:12345")


def test_a_key_is_per_user_and_conversations_without_one_never_collide(db_url):
    with Memory(db_url) as memory:
        ann = memory.conversation(key="chat-1", user="ann")
        bob = memory.conversation(key="chat-1", user="bob")
        assert ann.id != bob.id
        plain = [memory.conversation(user="ann") for _ in range(3)]
        assert len({c.id for c in plain}) == 3
        assert all(c.key is None for c in plain)
        assert memory.count(user="ann") == 4


def test_create_false_raises_for_a_missing_key_and_says_how_to_create_it(db_url):
    with Memory(db_url) as memory:
        with pytest.raises(ConversationNotFound, match="create=True"):
            memory.conversation(key="nope", user="ann", create=False)
        assert memory.count(user="ann") == 0
        made = memory.conversation(key="nope", user="ann")
        assert memory.conversation(key="nope", user="ann", create=False).id == made.id


@pytest.mark.parametrize(
    ("arguments", "wrong"),
    [
        ({"key": ""}, "non-empty string"),
        ({"key": 12345}, "non-empty string"),
        ({"key": "k" * 256}, "at most 255"),
        ({"key": "line\nbreak"}, "control characters"),
        ({"key": "nul\x00"}, "control characters"),
        ({"key": "k", "create": "yes"}, "create must be True or False"),
        ({"create": False}, "create=False applies to a key"),
    ],
)
def test_bad_keys_are_refused_with_what_to_do(tmp_path, arguments, wrong):
    with Memory(tmp_path / "c.db") as memory:
        with pytest.raises(ConfigurationError, match=wrong):
            memory.conversation(**arguments)
        assert memory.count(all_users=True) == 0
        assert memory.conversation(key="k" * 255).key == "k" * 255


def test_id_and_key_together_are_ambiguous(tmp_path):
    with Memory(tmp_path / "c.db") as memory:
        chat = memory.conversation(key="a")
        with pytest.raises(ConfigurationError, match="not both"):
            memory.conversation(chat.id, key="a")


def test_a_resumed_key_takes_settings_as_resuming_by_id_does(tmp_path):
    with Memory(tmp_path / "c.db") as memory:
        memory.conversation(key="a", system="Be brief.", strategy="window:4")
        with pytest.raises(ConfigurationError, match="already has a system prompt"):
            memory.conversation(key="a", system="Be verbose.")
        assert memory.conversation(key="a").strategy.name == "window:4"
        assert memory.conversation(key="a", strategy="window:8").strategy.name == "window:8"


def test_a_lazy_keyed_conversation_is_stored_with_its_first_message(db_url):
    with Memory(db_url) as memory:
        chat = memory.conversation(key="lazy", user="ann", lazy=True)
        assert memory.conversations(user="ann") == []
        with pytest.raises(ConversationNotFound):
            memory.conversation(key="lazy", user="ann", create=False)
        chat.append(_user(0))
        resumed = memory.conversation(key="lazy", user="ann", create=False)
        assert resumed.id == chat.id
        assert resumed.history() == [_user(0)]


def test_two_lazy_creators_of_one_key_end_in_one_conversation(db_url):
    with Memory(db_url) as first_memory, Memory(db_url) as second_memory:
        first = first_memory.conversation(key="k", user="ann", lazy=True)
        second = second_memory.conversation(key="k", user="ann", lazy=True)
        assert first.id != second.id  # neither is stored yet
        first.append(_user(0))
        second.append(_user(1))
        assert second.id == first.id  # the second took the conversation the first stored
        [listed] = first_memory.conversations(user="ann")
        assert listed.id == first.id
        assert listed.message_count == 2
        assert [m["content"] for m in second.history()] == ["message 0", "message 1"]


def test_async_keys_create_and_resume(db_url):
    async def main():
        async with AsyncMemory(db_url) as memory:
            chat = await memory.conversation(key="telegram:1", user="ann")
            await chat.append(_user(0))
            again = await memory.conversation(key="telegram:1", user="ann", create=False)
            assert again.id == chat.id
            assert again.key == "telegram:1"
            with pytest.raises(ConversationNotFound, match="create=True"):
                await memory.conversation(key="other", user="ann", create=False)
            lazy = await memory.conversation(key="lazy", user="ann", lazy=True)
            assert [c.key for c in await memory.conversations(user="ann")] == ["telegram:1"]
            await lazy.append(_user(1))
            assert {c.key for c in await memory.conversations(user="ann")} == {
                "telegram:1",
                "lazy",
            }

    asyncio.run(main())


# -- processes racing on one new key -------------------------------------------------


def _race_worker(db: str, worker: int, barrier: object, out: str) -> None:
    """Child process: at the barrier, get-or-create the key and append PER_RACER
    messages; odd workers create lazily (the row comes with their first append)."""
    try:
        with Memory(db, model="gpt-4o-mini") as memory:
            barrier.wait(RACE_TIMEOUT)  # type: ignore[attr-defined]
            chat = memory.conversation(key=RACE_KEY, user="ann", lazy=worker % 2 == 1)
            positions = [chat.append(_user(worker * 100 + n)).position for n in range(PER_RACER)]
        Path(out).write_text(json.dumps({"id": chat.id, "positions": positions}))
    except BaseException:
        Path(f"{out}.error").write_text(traceback.format_exc())
        raise


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks child processes")
def test_processes_racing_on_one_new_key_end_in_one_conversation(db_url, tmp_path):
    # fork, not spawn: each process still has its own engine and connections (the
    # parent holds none), without paying for an interpreter's start-up eight times.
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(RACERS)
    outputs = [tmp_path / f"racer-{n}.json" for n in range(RACERS)]
    with Memory(db_url):
        pass  # the schema, created before the race
    counter_for("gpt-4o-mini").count_text("load the tokenizer before forking")
    processes = [
        ctx.Process(target=_race_worker, args=(db_url, n, barrier, str(outputs[n])))
        for n in range(RACERS)
    ]
    started = time.monotonic()
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join(max(1.0, RACE_TIMEOUT - (time.monotonic() - started)))
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
    errors = [p.read_text() for p in (Path(f"{o}.error") for o in outputs) if p.exists()]
    assert not errors, errors
    assert all(p.exitcode == 0 for p in processes)

    results = [json.loads(o.read_text()) for o in outputs]
    with Memory(db_url) as memory:
        [listed] = memory.conversations(user="ann")
        chat = memory.conversation(key=RACE_KEY, user="ann", create=False)
        history = [m["content"] for m in chat.history()]
    assert listed.key == RACE_KEY
    assert {r["id"] for r in results} == {listed.id}
    assert listed.message_count == RACERS * PER_RACER
    assert sorted(p for r in results for p in r["positions"]) == list(range(RACERS * PER_RACER))
    for worker, result in enumerate(results):
        mine = [f"message {worker * 100 + n}" for n in range(PER_RACER)]
        assert [history[p] for p in result["positions"]] == mine


# -- the command line, export and import ---------------------------------------------


def test_sessions_and_show_give_the_key(tmp_path):
    from test_cli import run, run_json

    db = str(tmp_path / "c.db")
    with Memory(db) as memory:
        memory.conversation(key="telegram:[12345]", user="ann", title="keyed").append(_user(0))
        memory.conversation(user="ann", title="plain").append(_user(1))
    listed = {row["title"]: row["key"] for row in run_json("sessions", "--db", db)}
    assert listed == {"keyed": "telegram:[12345]", "plain": None}
    table = run("sessions", "--db", db).stdout
    assert "key" in table.splitlines()[2]
    assert "telegram:[12345]" in table  # as text, not rich markup
    assert run_json("show", "keyed", "--db", db)["conversation"]["key"] == "telegram:[12345]"
    assert "key telegram:[12345]" in run("show", "keyed", "--db", db).stdout
    assert "key" not in run("show", "plain", "--db", db).stdout.splitlines()[0]


def test_sessions_of_an_application_without_keys_have_no_key_column(tmp_path):
    from test_cli import run

    db = str(tmp_path / "c.db")
    with Memory(db) as memory:
        memory.conversation(user="ann", title="plain").append(_user(1))
    assert "key" not in run("sessions", "--db", db).stdout


def test_export_carries_the_key_and_import_restores_it_or_refuses_a_clash(db_url):
    from conversation_memory import ConversationExists, ImportFormatError

    with Memory(db_url) as memory:
        chat = memory.conversation(key="ticket-7", user="ann", title="t")
        chat.append(_user(0))
        exported = chat.export()
        assert json.loads(exported.splitlines()[0])["key"] == "ticket-7"
        plain = memory.conversation(user="ann")
        plain.append(_user(1))
        assert "key" not in json.loads(plain.export().splitlines()[0])

        with pytest.raises(ConversationExists, match="already has a conversation with key"):
            memory.import_conversation(exported, new_id=True)
        assert memory.count(user="ann") == 2
        bob = memory.import_conversation(exported, user="bob", new_id=True)
        assert bob.key == "ticket-7"
        again = memory.conversation(key="ticket-7", user="bob", create=False)
        assert again.id == bob.id
        assert again.export().splitlines()[1:] == exported.splitlines()[1:]
        assert json.loads(again.export().splitlines()[0])["key"] == "ticket-7"

        bad = exported.replace('"key":"ticket-7"', '"key":"two\\nlines"')
        with pytest.raises(ImportFormatError, match="line 1: the header's key"):
            memory.import_conversation(bad, user="carol")
        assert memory.count(user="carol") == 0


def test_find_and_the_command_line_take_a_key_as_a_reference(tmp_path):
    from test_cli import run, run_json

    from conversation_memory import AmbiguousReference

    db = str(tmp_path / "c.db")
    with Memory(db) as memory:
        ann = memory.conversation(key="chat-1", user="ann", title="ann's")
        ann.append(_user(0))
        memory.conversation(title="chat-1").append(_user(1))  # a title: the key wins
        assert memory.find("chat-1").id == ann.id
        bob = memory.conversation(key="chat-1", user="bob")
        assert memory.find("chat-1", user="bob").id == bob.id
        with pytest.raises(AmbiguousReference, match=r"several users .* key 'chat-1'"):
            memory.find("chat-1")
    assert run_json("show", "chat-1", "--user", "ann", "--db", db)["conversation"]["id"] == ann.id
    refused = run("show", "chat-1", "--db", db, check=False)
    assert refused.returncode != 0
    assert "--user" in refused.stderr
