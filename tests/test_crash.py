"""SIGKILL at random moments never corrupts or half-writes the log.

A child process appends turns (a user message, then the assistant's reply,
each stored by the library) to a real SQLite file in a loop; the parent kills
it with SIGKILL after a seeded random delay, checks the file, and starts a new
child, which resumes where the log ends. The content of every position is a
pure function of the position, so the parent can check each stored message
byte for byte against what the child wrote.

What this proves today, where one append is one transaction (with the default
``durability="full"`` and with ``"normal"``, whose promise is exactly this: a
stored turn survives a crash of the process): the file stays
intact, positions stay gap-free, every message is whole, every append the
child saw succeed survived, and the conversation row's running totals always
match the messages. A kill between the two appends of a turn leaves the
user message without its reply (the child then completes the turn on
restart); the test counts those half turns. Turn atomicity itself needs the
multi-message turn transaction that is not in the API yet; the second test
proves the mechanism it will rest on: a many-message write
(``Memory.import_conversation``, one transaction) is all or nothing under
SIGKILL.

The search index is written by the same transactions: after every kill it
agrees with the messages (FTS5's integrity check), the message in flight
when the child died is indexed exactly when it is stored, and at the end
each stored message is found by the word only it holds.

The children are forked from a parent that has already loaded the library
and the tokenizer, so 50 restarts cost milliseconds rather than seconds; the
parent holds no database connection when it forks.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sqlite3
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from test_search import found_by_words, index_agrees

from conversation_memory.engine import Memory
from conversation_memory.messages import dumps
from conversation_memory.tokens import counter_for

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork"), reason="forks children and kills them with SIGKILL"
)

MODEL = "gpt-4o-mini"
USER = "crash"
KILLS = 50
SEED = 20240607
MAX_DELAY = 0.25
"""Seconds a child runs before it is killed, at most (uniform from 0)."""
MAX_MESSAGES = 100_000
"""A safety stop; the children never get near it."""

WORDS = (
    *("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while"),
    *("an", "assistant", "explains", "why", "context", "windows", "fill", "up"),
    *("résumé", "naïve", "東京", "Ωmega", "emoji", "🙂", "tokens", "budget"),
)


def _message(position: int) -> dict[str, str]:
    """What the child writes at ``position``: turn ``position // 2``, user then assistant."""
    turn, reply = divmod(position, 2)
    rng = random.Random(position)
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 200)))
    role = "assistant" if reply else "user"
    return {"role": role, "content": f"[turn {turn} {role} {_tag(position)}] {words}"}


def _tag(position: int) -> str:
    """The word only the message at ``position`` holds (for the search index's check)."""
    return f"p{position}"


def _ctx() -> multiprocessing.context.BaseContext:
    return multiprocessing.get_context("fork")


def _writer(
    db: str, conversation_id: str, ready: object, acks: str, errors: str, *, durability: str
) -> None:
    """Child: resume the conversation and append turns until killed."""
    try:
        with Memory(db, durability=durability) as memory:
            conversation = memory.conversation(id=conversation_id, user=USER)
            position = len(conversation)
            fd = os.open(acks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            # "r": where this child resumed (odd: a turn was cut in half).
            os.write(fd, f"r {position}\n".encode())
            ready.set()  # type: ignore[attr-defined]
            while position < MAX_MESSAGES:
                stored = conversation.append(_message(position))
                if stored.position != position:
                    raise AssertionError(f"appended at {stored.position}, expected {position}")
                # "a": append() returned, so this message is committed.
                os.write(fd, f"a {position}\n".encode())
                position += 1
    except BaseException:
        Path(errors).write_text(traceback.format_exc())
        raise


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def _check_file(path: Path, conversation_ids: list[str] | None = None) -> None:
    """The file is intact and every conversation's totals match its messages."""
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
        rows = con.execute(
            "SELECT c.id, c.next_position, c.message_count, c.total_tokens, "
            "count(m.id), coalesce(sum(m.tokens), 0), coalesce(max(m.position), -1) "
            "FROM conversations c LEFT JOIN messages m ON m.conversation_id = c.id "
            "GROUP BY c.id"
        ).fetchall()
    finally:
        con.close()
    for cid, next_position, count, tokens, real_count, real_tokens, last in rows:
        if conversation_ids is not None:
            assert cid in conversation_ids
        # Gap-free: n messages at positions 0..n-1 (positions are unique).
        assert real_count == last + 1 == next_position == count, cid
        assert tokens == real_tokens, cid


def _check_index(path: Path, conversation_id: str) -> None:
    """The index agrees with the messages; the newest stored message is found, and the
    one a killed child was writing next is found only if it was stored (then the newest)."""
    with Memory(str(path)) as memory:  # closed again: the parent forks holding nothing
        index_agrees(memory)
        conversation = memory.conversation(conversation_id, user=USER)
        last = len(conversation) - 1
        assert [hit.position for hit in conversation.search(_tag(last + 1))] == []
        if last >= 0:
            assert [hit.position for hit in conversation.search(_tag(last))] == [last]


Starter = Callable[[Any], multiprocessing.process.BaseProcess]


def _kill_loop_once(rng: random.Random, start: Starter, errors: Path) -> None:
    """Start a child, wait until it is ready, SIGKILL it after a seeded random delay."""
    ready = _ctx().Event()
    process = start(ready)
    process.start()
    if not ready.wait(30):
        process.kill()
        process.join()
        pytest.fail(f"the child never got ready: {_read(errors)}")
    time.sleep(rng.uniform(0, MAX_DELAY))
    os.kill(process.pid, signal.SIGKILL)
    process.join(30)
    assert process.exitcode == -signal.SIGKILL, (
        f"the child exited with {process.exitcode} before the kill: {_read(errors)}"
    )


@pytest.mark.slow
@pytest.mark.parametrize("durability", ["full", "normal"])
def test_sigkill_during_appends_loses_and_corrupts_nothing(tmp_path: Path, durability: str) -> None:
    db = tmp_path / "crash.db"
    acks = tmp_path / "acks.txt"
    errors = tmp_path / "child-error.txt"
    with Memory(str(db)) as memory:
        conversation_id = memory.conversation(user=USER, model=MODEL).id
    counter = counter_for(MODEL)
    counter.count_message(_message(0))  # load the tokenizer before forking

    def start(ready: object) -> multiprocessing.process.BaseProcess:
        return _ctx().Process(
            target=_writer,
            args=(str(db), conversation_id, ready, str(acks), str(errors)),
            kwargs={"durability": durability},
        )

    rng = random.Random(SEED)
    started = time.monotonic()
    for _ in range(KILLS):
        _kill_loop_once(rng, start, errors)
        _check_file(db, [conversation_id])
        _check_index(db, conversation_id)
    elapsed = time.monotonic() - started

    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        stored = con.execute(
            "SELECT position, role, content, tokens, complete FROM messages "
            "WHERE conversation_id = ? ORDER BY position",
            (conversation_id,),
        ).fetchall()
        next_position, count, total = con.execute(
            "SELECT next_position, message_count, total_tokens FROM conversations WHERE id = ?",
            (conversation_id,),
        ).fetchone()
    finally:
        con.close()

    assert len(stored) > KILLS, "the children wrote almost nothing; the test proves little"
    assert [row[0] for row in stored] == list(range(len(stored)))
    for position, role, content, tokens, complete in stored:
        expected = _message(position)
        assert (role, content) == (expected["role"], expected["content"]), position
        assert tokens == counter.count_message(expected), position
        assert complete
    assert next_position == count == len(stored)
    assert total == sum(row[3] for row in stored)
    with Memory(str(db)) as memory:
        conversation = memory.conversation(conversation_id, user=USER)
        found_by_words(
            conversation, {_tag(position): {position} for position in range(len(stored))}
        )

    log = [line.split() for line in acks.read_text().splitlines()]
    acked = [int(value) for kind, value in log if kind == "a"]
    resumes = [int(value) for kind, value in log if kind == "r"]
    # Every append the child saw succeed survived its death.
    assert acked
    assert max(acked) < len(stored)
    assert sorted(set(acked)) == acked
    # At most the one message in flight at the kill can be stored but unacknowledged.
    assert len(stored) - len(acked) <= KILLS
    assert len(resumes) == KILLS
    half_turns = sum(position % 2 for position in resumes[1:])
    print(
        f"\n{KILLS} kills in {elapsed:.1f} s; {len(stored)} messages stored; "
        f"{len(stored) - len(acked)} committed but killed before the child heard back; "
        f"{half_turns} restarts found a turn cut in half (one transaction per message)"
    )


# -- many messages in one transaction -------------------------------------------


def _export(index: int) -> str:
    """A deterministic export of 2..40 messages (the same text for the same index)."""
    when = datetime(2024, 1, 1, tzinfo=UTC).isoformat()
    header = {
        "convmem": 1,
        "type": "conversation",
        "id": f"import-{index:05d}",
        "user": USER,
        "title": None,
        "model": MODEL,
        "system": None,
        "settings": {},
        "created_at": when,
        "updated_at": when,
    }
    size = random.Random(index).randint(2, 40)
    lines = [dumps(header)]
    lines += [dumps({**_message(p), "convmem": {"created_at": when}}) for p in range(size)]
    return "\n".join(lines) + "\n"


def _importer(db: str, ready: object, errors: str) -> None:
    """Child: import conversation after conversation until killed."""
    try:
        with Memory(db) as memory:
            index = len(memory.conversations(user=USER))
            ready.set()  # type: ignore[attr-defined]
            while index < MAX_MESSAGES:
                memory.import_conversation(_export(index))
                index += 1
    except BaseException:
        Path(errors).write_text(traceback.format_exc())
        raise


@pytest.mark.slow
def test_sigkill_during_multi_message_writes_is_all_or_nothing(tmp_path: Path) -> None:
    db = tmp_path / "imports.db"
    errors = tmp_path / "child-error.txt"
    Memory(str(db)).close()
    counter_for(MODEL).count_text("load the tokenizer before forking")

    def start(ready: object) -> multiprocessing.process.BaseProcess:
        return _ctx().Process(target=_importer, args=(str(db), ready, str(errors)))

    rng = random.Random(SEED + 1)
    for _ in range(KILLS):
        _kill_loop_once(rng, start, errors)
        _check_file(db)
    with Memory(str(db)) as memory:
        index_agrees(memory)  # no half-imported conversation left anything in the index

    con = sqlite3.connect(db)
    try:
        ids = [row[0] for row in con.execute("SELECT id FROM conversations ORDER BY id")]
        assert ids == [f"import-{index:05d}" for index in range(len(ids))]
        assert len(ids) > KILLS
        for index, cid in enumerate(ids):
            stored = con.execute(
                "SELECT role, content FROM messages WHERE conversation_id = ? ORDER BY position",
                (cid,),
            ).fetchall()
            size = random.Random(index).randint(2, 40)
            expected = [(_message(p)["role"], _message(p)["content"]) for p in range(size)]
            assert stored == expected, cid
    finally:
        con.close()
