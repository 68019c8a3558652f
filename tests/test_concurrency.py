"""Many processes appending to one conversation lose nothing.

Eight separate processes (started with "spawn", so each has its own
interpreter, engine and connection pool) resume the same conversation and
append 300 messages each as fast as they can, all released at the same
moment. Afterwards the log must hold exactly 2,400 messages at positions
0..2399, every worker's messages in the order it wrote them, and the
conversation row's running totals must equal what the messages add up to.
On SQLite this exercises BEGIN IMMEDIATE + busy_timeout; on PostgreSQL the
row lock taken by the position claim. The search index, written by the same
transactions, must agree with the messages, and find each one by the word
only it holds.

Whole turns race too: eight processes ``send`` on one conversation through a
real HTTP server, so each turn's context is read while the others commit. A
read that saw a commit half (the row before it, the tail after it) would put
two messages at one position and fail the turn; every turn must succeed, land
whole and leave the log gap-free.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import traceback
from pathlib import Path
from typing import Any

import openai
import pytest
import sqlalchemy as sa
from test_search import found_by_words, index_agrees

from conversation_memory.engine import Memory
from conversation_memory.testing import ChatServer
from conversation_memory.tokens import counter_for

WORKERS = 8
PER_WORKER = 300
USER = "concurrency"
START_TIMEOUT = 60.0
RUN_TIMEOUT = 120.0


def _tag(worker: int, index: int) -> str:
    """The word only this message holds (for the search index's check)."""
    return f"w{worker}m{index}"


def _content(worker: int, index: int) -> str:
    # Lengths vary so that token counts (and the total) differ per message.
    return f"worker {worker} message {index} {_tag(worker, index)} " + "lorem ipsum " * (
        (worker * 7 + index) % 13
    )


def _append_worker(db: str, conversation_id: str, worker: int, barrier: object, out: str) -> None:
    """Child process: resume the conversation and append PER_WORKER messages."""
    try:
        with Memory(db) as memory:
            conversation = memory.conversation(id=conversation_id, user=USER)
            # Warm up the token counter before the race so workers really overlap.
            conversation.counter.count_text("warm up")
            barrier.wait(START_TIMEOUT)  # type: ignore[attr-defined]
            stored = []
            for index in range(PER_WORKER):
                result = conversation.append({"role": "user", "content": _content(worker, index)})
                stored.append([index, result.position, result.tokens])
    except BaseException:
        # The parent reports this; a child's stderr is easy to lose under pytest.
        Path(f"{out}.error").write_text(traceback.format_exc())
        raise
    Path(out).write_text(json.dumps(stored))


def _error(out: Path) -> str | None:
    path = Path(f"{out}.error")
    return path.read_text() if path.exists() else None


def _sa_url(db: str) -> str:
    if "://" not in db:
        return f"sqlite:///{db}"
    return db.replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.mark.slow
def test_parallel_appends_lose_nothing(db_url: str, tmp_path: Path) -> None:
    with Memory(db_url) as memory:
        conversation_id = memory.conversation(user=USER, model="gpt-4o-mini").id

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    outputs = [tmp_path / f"worker-{n}.json" for n in range(WORKERS)]
    processes = [
        ctx.Process(
            target=_append_worker,
            args=(db_url, conversation_id, n, barrier, str(outputs[n])),
            name=f"appender-{n}",
        )
        for n in range(WORKERS)
    ]
    started = time.monotonic()
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join(max(1.0, START_TIMEOUT + RUN_TIMEOUT - (time.monotonic() - started)))
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
    elapsed = time.monotonic() - started
    failed = {
        p.name: (p.exitcode, _error(outputs[n])) for n, p in enumerate(processes) if p.exitcode
    }
    assert not failed, f"workers failed (exit code, traceback): {failed}"
    backend = "postgresql" if db_url.startswith("postgresql") else "sqlite"
    print(f"\n{WORKERS} x {PER_WORKER} appends on {backend}: {elapsed:.1f} s")

    engine = sa.create_engine(_sa_url(db_url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT position, content, tokens FROM messages "
                    "WHERE conversation_id = :id ORDER BY position"
                ),
                {"id": conversation_id},
            ).all()
            totals = conn.execute(
                sa.text(
                    "SELECT next_position, message_count, total_tokens FROM conversations "
                    "WHERE id = :id"
                ),
                {"id": conversation_id},
            ).one()
            others = conn.execute(
                sa.text("SELECT count(*) FROM messages WHERE conversation_id <> :id"),
                {"id": conversation_id},
            ).scalar_one()
    finally:
        engine.dispose()

    total = WORKERS * PER_WORKER
    assert len(rows) == total
    assert [row.position for row in rows] == list(range(total))
    assert others == 0

    # The running totals on the conversation row match the log.
    assert totals.next_position == total
    assert totals.message_count == total
    assert totals.total_tokens == sum(row.tokens for row in rows)

    by_position = {row.position: row for row in rows}
    for worker, path in enumerate(outputs):
        stored = json.loads(path.read_text())
        assert [index for index, _, _ in stored] == list(range(PER_WORKER))
        positions = [position for _, position, _ in stored]
        # Each worker's messages are in the order it wrote them...
        assert positions == sorted(positions), f"worker {worker} out of order"
        for index, position, tokens in stored:
            # ...and each sits where append() said it did, whole.
            row = by_position[position]
            assert row.content == _content(worker, index)
            assert row.tokens == tokens
    # Every position was handed out exactly once across all workers.
    claimed = sorted(p for path in outputs for _, p, _ in json.loads(path.read_text()))
    assert claimed == list(range(total))

    # The index holds every message, once, and finds each one where it is.
    tags = {
        _tag(worker, index): {position}
        for worker, path in enumerate(outputs)
        for index, position, _ in json.loads(path.read_text())
    }
    with Memory(db_url) as memory:
        index_agrees(memory)
        found_by_words(memory.conversation(conversation_id, user=USER), tags)


# -- whole turns from many processes -------------------------------------------------

TURNS = 8
"""Turns per process; the race shows within the first few."""
TURN_MODEL = "gpt-4o-mini"


def _sender(
    db: str, conversation_id: str, worker: int, *, port: Any, barrier: Any, out: str
) -> None:
    """Child (forked before the server started): send TURNS turns on one conversation."""
    try:
        barrier.wait(START_TIMEOUT)  # the parent's server is up: its port is set
        with (
            openai.OpenAI(
                base_url=f"http://127.0.0.1:{port.value}/v1", api_key="test-key", max_retries=0
            ) as client,
            Memory(db, client=client, model=TURN_MODEL) as memory,
        ):
            conversation = memory.conversation(id=conversation_id, user=USER)
            sent = []
            for turn in range(TURNS):
                reply = conversation.send(
                    f"worker {worker} turn {turn} w{worker}t{turn}", max_tokens=20
                )
                sent.append(reply.text)
    except BaseException:
        Path(f"{out}.error").write_text(traceback.format_exc())
        raise
    Path(out).write_text(json.dumps(sent))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks child processes")
def test_parallel_turns_on_one_conversation_all_succeed(db_url: str, tmp_path: Path) -> None:
    with Memory(db_url, model=TURN_MODEL) as memory:
        # A small budget: every context is cut from the tail the others are writing.
        conversation_id = memory.conversation(user=USER, budget=300).id
    counter_for(TURN_MODEL).count_text("load the tokenizer before forking")
    ctx = multiprocessing.get_context("fork")
    port = ctx.Value("i", 0)
    barrier = ctx.Barrier(WORKERS + 1)
    outputs = [tmp_path / f"sender-{n}.json" for n in range(WORKERS)]
    processes = [
        ctx.Process(
            target=_sender,
            args=(db_url, conversation_id, n),
            kwargs={"port": port, "barrier": barrier, "out": str(outputs[n])},
            name=f"sender-{n}",
        )
        for n in range(WORKERS)
    ]
    for process in processes:
        process.start()  # before the server exists: no child inherits its threads
    try:
        with ChatServer(model=TURN_MODEL, window=128_000) as server:
            port.value = server.port
            barrier.wait(START_TIMEOUT)
            for process in processes:
                process.join(RUN_TIMEOUT)
            assert server.errors == []
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
    failed = {
        p.name: (p.exitcode, _error(outputs[n])) for n, p in enumerate(processes) if p.exitcode
    }
    assert not failed, f"workers failed (exit code, traceback): {failed}"

    engine = sa.create_engine(_sa_url(db_url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT position, role, content FROM messages "
                    "WHERE conversation_id = :id ORDER BY position"
                ),
                {"id": conversation_id},
            ).all()
    finally:
        engine.dispose()
    assert [row.position for row in rows] == list(range(2 * WORKERS * TURNS))
    # Every turn is whole: each question is followed by the reply it got.
    replies = {row.content for row in rows if row.role == "assistant"}
    for worker, path in enumerate(outputs):
        assert set(json.loads(path.read_text())) <= replies
        asked = [row.position for row in rows if row.content.startswith(f"worker {worker} ")]
        assert len(asked) == TURNS
        assert all(rows[p + 1].role == "assistant" for p in asked)
    # The index agrees with the log, and finds every question where it landed (and
    # the reply, which quotes it).
    with Memory(db_url) as memory:
        index_agrees(memory)
        found_by_words(
            memory.conversation(conversation_id, user=USER),
            {
                row.content.split()[-1]: {p, p + 1}
                for p, row in enumerate(rows)
                if row.role == "user"
            },
        )
