"""Compaction under SIGKILL, under concurrency, and with a failing summarizer.

Three promises of the design are checked end to end here:

* **A summary commits whole or not at all.** A child process compacts a
  conversation with a slow summarizer and is SIGKILLed at seeded random
  moments; after every kill the SQLite file is intact, every summary row is
  complete and extends the one before it, its usage row committed with it, the
  messages are byte-identical, the dead child's lease blocks others until it
  expires, and then a new compaction succeeds.
* **Concurrent compactions can't both win.** Ten compactions of one
  conversation at once (threads sharing a recording summarizer; forked
  processes summarizing through a real HTTP server) store one summary per
  range and make one summarizer request per range, on SQLite and PostgreSQL.
* **Failure never costs the user's turn, nor a byte of history.** Faults from
  :class:`~conversation_memory.testing.ChatServer` reach the real
  ``ModelSummarizer``/LLM stack; the stored history stays byte-identical, the
  failure is a usage row with its error, the turn is still answered, and a
  later compaction succeeds.

Children are forked from a parent that has loaded the library and holds no
database connection; the HTTP server starts only after the fork, so no child
inherits its threads.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import signal
import sqlite3
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
import sqlalchemy as sa

from conversation_memory import Memory, register_model
from conversation_memory import compaction as compaction_module
from conversation_memory.llm import RetryPolicy
from conversation_memory.state import read_state
from conversation_memory.store import leases
from conversation_memory.store.schema import compaction_leases
from conversation_memory.store.values import NewSummary, aware, now
from conversation_memory.strategies import Summarize
from conversation_memory.summarize import SummaryText
from conversation_memory.testing import ChatServer, Fault, RecordingSummarizer
from conversation_memory.testing.replies import is_summarization

MODEL = "compaction-test-model"
WINDOW = 1000
MAX_OUTPUT = 200
"""A prompt budget of 800 tokens: a few dozen messages overflow it."""
USER = "compaction"
API_KEY = "test-credential-for-the-local-server-0123456789"
"""Not a real key: a distinctive value, to check no error text or row repeats it."""

NAMES = ("Alice", "Bob", "Chidi", "Dana", "Émile", "Farah", "Goro", "Hana", "Ivan", "Jude")
WORDS = (
    *("the", "meeting", "moved", "to", "budget", "for", "project", "is", "about", "we"),
    *("should", "remember", "that", "prefers", "tea", "over", "coffee", "and", "東京"),
    *("naïve", "résumé", "deadline", "invoice", "train", "leaves", "at", "🙂", "window"),
)
TAG = re.compile(r"\[(\d+)\]")


SUMMARY_MODEL = "compaction-test-summarizer"
"""The summarizer's own model: the test server's real window (2x), so one fold
is one summarizer call. With the chat model's 1,000 tokens compaction would
split a fold into several calls (each still one request per range)."""


@pytest.fixture(scope="module", autouse=True)
def _model() -> None:
    register_model(MODEL, window=WINDOW, max_output=MAX_OUTPUT)
    register_model(SUMMARY_MODEL, window=2 * WINDOW, max_output=MAX_OUTPUT)
    # The recording summarizer has no window; give it one large enough.
    register_model("recording-summarizer", window=100_000, max_output=4_096)


def _message(position: int) -> dict[str, str]:
    """What sits at ``position``: a pure function of it, tagged ``[position]``."""
    rng = random.Random(position)
    role = "user" if position % 2 == 0 else "assistant"
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 30)))
    fact = f"{rng.choice(NAMES)} {rng.randint(1, 9999)}"
    return {"role": role, "content": f"[{position}] {fact} {words}"}


def _fill(conversation: Any, count: int) -> None:
    first = len(conversation)
    conversation.extend([_message(p) for p in range(first, first + count)])


def _folds(conversation: Any) -> int | None:
    """Where the strategy would fold now (None: nothing to fold)."""
    reading = conversation._run(read_state(conversation._setup))
    return conversation.strategy.select(reading.state, reading.budget).fold_through


def _sa_url(db: str) -> str:
    if "://" not in db:
        return f"sqlite:///{db}"
    return db.replace("postgresql://", "postgresql+psycopg://", 1)


def _query(db: str, sql: str, **params: Any) -> list[Any]:
    engine = sa.create_engine(_sa_url(db))
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params))
    finally:
        engine.dispose()


def _summaries(db: str, conversation_id: str) -> list[Any]:
    return _query(
        db,
        "SELECT id, start_position, end_position, level, text, tokens, strategy, model, "
        "prompt_version, based_on FROM summaries WHERE conversation_id = :id ORDER BY id",
        id=conversation_id,
    )


def _summary_usage(db: str, conversation_id: str) -> list[Any]:
    return _query(
        db,
        "SELECT position, prompt_tokens, error, model FROM usage "
        "WHERE conversation_id = :id AND kind = 'summary' ORDER BY id",
        id=conversation_id,
    )


def _check_summaries(db: str, conversation_id: str, message_count: int) -> list[Any]:
    """Every summary is whole and extends the one before it; each has its own usage row."""
    rows = _summaries(db, conversation_id)
    previous = None
    for row in rows:
        assert row.text, row
        assert row.text == row.text.strip(), row
        assert row.tokens > 0, row
        assert all((row.strategy, row.model, row.prompt_version)), row
        assert row.level == 0, row
        assert 0 <= row.start_position <= row.end_position < message_count, row
        if previous is None:
            assert row.start_position == 0, row
            assert row.based_on is None, row
        else:
            # A rolling summary covers everything from where the first one started.
            assert row.start_position == previous.start_position, (previous, row)
            assert row.end_position > previous.end_position, (previous, row)
            assert row.based_on == previous.id, (previous, row)
        previous = row
    stored = [u.position for u in _summary_usage(db, conversation_id) if u.error is None]
    # The usage row is written in the summary's own transaction: neither without the other.
    assert stored == [row.end_position for row in rows]
    return rows


def _lease(db: str, conversation_id: str) -> Any:
    engine = sa.create_engine(_sa_url(db))
    try:
        with engine.connect() as conn:
            return conn.execute(
                sa.select(compaction_leases).where(
                    compaction_leases.c.conversation_id == conversation_id
                )
            ).first()
    finally:
        engine.dispose()


def _expire_lease(memory: Memory, conversation_id: str) -> None:
    """What the passing of LEASE_SECONDS does to a dead holder's lease, without the wait."""
    with memory.database.write() as conn:
        conn.execute(
            sa.update(compaction_leases)
            .where(compaction_leases.c.conversation_id == conversation_id)
            .values(expires_at=now() - timedelta(seconds=1))
        )


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def _fork() -> multiprocessing.context.BaseContext:
    return multiprocessing.get_context("fork")


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="forks child processes")


# -- 1. SIGKILL during compaction ---------------------------------------------------------

KILLS = 24
SEED = 20240611
MAX_DELAY = 0.3
"""Seconds a compacting child lives before its SIGKILL, at most (uniform from 0)."""
CHUNK_TOKENS = 150
"""Small summarizer inputs, so one compaction stores several summaries in a row."""


class SlowSummarizer:
    """A :class:`RecordingSummarizer` that takes its time, like a model does."""

    def __init__(
        self, seconds: Callable[[], float], inner: RecordingSummarizer | None = None
    ) -> None:
        self.inner = inner or RecordingSummarizer()
        self.model = self.inner.model
        self.seconds = seconds

    def summarize(
        self, previous: str | None, messages: Sequence[Any], *, max_tokens: int
    ) -> SummaryText:
        time.sleep(self.seconds())
        return self.inner.summarize(previous, messages, max_tokens=max_tokens)


def _compactor(
    db: str, conversation_id: str, *, seed: int, chunked: bool, lease: float | None, ready: Any
) -> None:
    """Child: compact once with a slow summarizer, then wait for the kill."""
    errors = Path(f"{db}.child-error")
    try:
        if lease is not None:
            leases.LEASE_SECONDS = lease  # this child's leases only
        rng = random.Random(seed)
        slow = SlowSummarizer(lambda: rng.uniform(0.005, 0.06) if lease is None else 30.0)
        with Memory(
            db, model=MODEL, strategy="summary", summarizer=slow, compaction="manual"
        ) as memory:
            conversation = memory.conversation(id=conversation_id, user=USER)
            ready.set()
            if chunked:
                setup = conversation._setup
                conversation._run(compaction_module.compact(setup, chunk_tokens=CHUNK_TOKENS))
            else:
                conversation.compact()
            time.sleep(60)  # finished before the kill: wait for it
    except BaseException:
        errors.write_text(traceback.format_exc())
        raise


def _kill_during_compaction(
    db: Path, conversation_id: str, *, seed: int, chunked: bool, delay: float, lease=None
) -> None:
    ready = _fork().Event()
    child = _fork().Process(
        target=_compactor,
        args=(str(db), conversation_id),
        kwargs={"seed": seed, "chunked": chunked, "lease": lease, "ready": ready},
    )
    child.start()
    if not ready.wait(30):
        child.kill()
        child.join()
        pytest.fail(f"the compacting child never got ready: {_read(Path(f'{db}.child-error'))}")
    time.sleep(delay)
    os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
    child.join(30)
    assert child.exitcode == -signal.SIGKILL, (
        f"the child exited with {child.exitcode}: {_read(Path(f'{db}.child-error'))}"
    )


def _check_file(db: Path) -> None:
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        con.close()


def _open(db: Path, **options: Any) -> Memory:
    return Memory(str(db), model=MODEL, strategy="summary", compaction="manual", **options)


def _a_dead_holders_lease_expires_by_the_clock(
    db: Path, conversation_id: str, fast: RecordingSummarizer
) -> None:
    """A short real lease and a summarizer that never answers: the dead child's
    lease blocks compaction until it expires by the clock, with no help."""
    with _open(db, summarizer=fast) as memory:
        _fill(memory.conversation(id=conversation_id, user=USER), 30)
    _kill_during_compaction(db, conversation_id, seed=SEED, chunked=False, delay=0.3, lease=1.0)
    with _open(db, summarizer=fast) as memory:
        conversation = memory.conversation(id=conversation_id, user=USER)
        lease = _lease(str(db), conversation_id)
        assert lease is not None, "the killed child held the lease"
        assert conversation.compact().skipped is not None
        expires = aware(lease.expires_at)
        time.sleep(max(0.0, (expires - now()).total_seconds()) + 0.05)
        outcome = conversation.compact()
        assert outcome.summaries
        assert outcome.error is None
        message_count = len(conversation)
    _check_file(db)
    _check_summaries(str(db), conversation_id, message_count)


@needs_fork
@pytest.mark.slow
def test_sigkill_during_compaction_leaves_no_partial_summary(tmp_path: Path) -> None:
    db = tmp_path / "compact.db"
    fast = RecordingSummarizer()
    with _open(db, summarizer=fast) as memory:
        conversation_id = memory.conversation(user=USER).id
    rng = random.Random(SEED)
    leases_left = stored_by_children = 0
    for kill in range(KILLS):
        with _open(db, summarizer=fast) as memory:
            conversation = memory.conversation(id=conversation_id, user=USER)
            _fill(conversation, 30)  # ~900 tokens more: past the high-water mark
            assert _folds(conversation) is not None
            before = conversation.export()
            summaries_before = len(_summaries(str(db), conversation_id))
        _kill_during_compaction(
            db,
            conversation_id,
            seed=SEED + kill,
            chunked=kill % 2 == 0,
            delay=rng.uniform(0, MAX_DELAY),
        )
        _check_file(db)
        rows = _check_summaries(str(db), conversation_id, len(before.splitlines()) - 1)
        stored_by_children += len(rows) - summaries_before
        with _open(db, summarizer=fast) as memory:
            conversation = memory.conversation(id=conversation_id, user=USER)
            assert conversation.export() == before, "compaction touched a message"
            if _lease(str(db), conversation_id) is not None:
                leases_left += 1
                outcome = conversation.compact()
                # The dead child's lease holds until it expires (it is checked first).
                assert outcome.skipped == "another compaction of this conversation is running"
                assert outcome.summaries == ()
                _expire_lease(memory, conversation_id)
            outcome = conversation.compact()
            assert outcome.error is None, outcome
            assert _folds(conversation) is None, "the later compaction finished the fold"
            assert conversation.export() == before
        _check_summaries(str(db), conversation_id, len(before.splitlines()) - 1)
        lease = _lease(str(db), conversation_id)
        # Gone, or the expired one that no compaction needed to take over.
        assert lease is None or aware(lease.expires_at) < now()

    _a_dead_holders_lease_expires_by_the_clock(db, conversation_id, fast)

    # Most kills must land mid-compaction, or this proves little.
    assert leases_left >= KILLS // 2, f"only {leases_left} kills found a lease"
    print(
        f"\n{KILLS} kills: {leases_left} left a lease behind; the children stored "
        f"{stored_by_children} whole summaries before dying"
    )


def _dying_compactor(db: str, conversation_id: str, *, port: Any, go: Any) -> None:
    """Child: compact through the real summarizer over HTTP, and die in the call."""
    errors = Path(f"{db}.child-error")
    try:
        go.wait(60)  # the parent's server is up: its port is set
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port.value}/v1", api_key=API_KEY, max_retries=0
        )
        with Memory(
            db,
            client=client,
            model=MODEL,
            strategy="summary",
            compaction="manual",
            summary_model=SUMMARY_MODEL,
        ) as memory:
            memory.conversation(id=conversation_id, user=USER).compact()
        errors.write_text("the summarizer call returned; it should have hung until the kill")
    except BaseException:
        errors.write_text(traceback.format_exc())
        raise


@needs_fork
@pytest.mark.slow
def test_a_holder_killed_in_the_summarizer_call_blocks_compaction_for_seconds_only(
    tmp_path: Path,
) -> None:
    """kill -9 while the summarizer call is in flight: another process's compact()
    summarizes within seconds, not after a five-minute lease (a crash loop would
    otherwise never get a summary made)."""
    db = tmp_path / "crash-loop.db"
    with _open(db) as memory:
        conversation = memory.conversation(user=USER)
        _fill(conversation, 30)
        assert _folds(conversation) is not None
        conversation_id = conversation.id
    ctx = _fork()
    port, go = ctx.Value("i", 0), ctx.Event()
    child = ctx.Process(
        target=_dying_compactor, args=(str(db), conversation_id), kwargs={"port": port, "go": go}
    )
    child.start()  # before the server exists: the child inherits none of its threads
    try:
        with ChatServer(window=2 * WINDOW, model=MODEL, api_key=API_KEY) as server:
            server.fail(Fault.slow_first_byte(60))  # the summarizer never answers in time
            port.value = server.port
            go.set()
            deadline = time.monotonic() + 30
            while not any(is_summarization(r.body) for r in server.chat_requests):
                assert child.is_alive(), _read(Path(f"{db}.child-error"))
                assert time.monotonic() < deadline, "the child never called the summarizer"
                time.sleep(0.02)
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
            child.join(30)
            killed = time.monotonic()
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == -signal.SIGKILL
    assert _lease(str(db), conversation_id) is not None, "the dead child left its lease"

    with _open(db, summarizer=RecordingSummarizer()) as memory:
        conversation = memory.conversation(id=conversation_id, user=USER)
        outcome = conversation.compact()
        assert outcome.skipped == "another compaction of this conversation is running"
        while not outcome.summaries and time.monotonic() - killed < 20:
            time.sleep(0.1)
            outcome = conversation.compact()
        waited = time.monotonic() - killed
        assert outcome.summaries, f"still blocked by the dead holder's lease after {waited:.0f} s"
        assert outcome.error is None
        assert waited < 10
        assert _folds(conversation) is None
        _check_summaries(str(db), conversation_id, len(conversation))


# -- 2. concurrent compactions ---------------------------------------------------------------

WORKERS = 10
ROUNDS = 2
SLOW_SUMMARY = 0.8
"""Seconds a summarizer takes: far longer than the others need to arrive."""


def _new_ranges(db: str, conversation_id: str, known: int) -> list[tuple[int, int]]:
    """The (first, last) message positions each summary after the first ``known`` folded."""
    rows = _summaries(db, conversation_id)
    ranges = []
    for k in range(known, len(rows)):
        first = rows[k - 1].end_position + 1 if k else rows[k].start_position
        ranges.append((first, rows[k].end_position))
    return ranges


def _one_summary_per_range(db: str, conversation_id: str) -> None:
    duplicates = _query(
        db,
        "SELECT start_position, end_position, count(*) FROM summaries "
        "WHERE conversation_id = :id GROUP BY start_position, end_position, level "
        "HAVING count(*) > 1",
        id=conversation_id,
    )
    assert duplicates == []


def _run_threads(target: Callable[[int], Any], count: int) -> list[Any]:
    results: list[Any] = [None] * count
    failures: list[str] = []

    def run(n: int) -> None:
        try:
            results[n] = target(n)
        except BaseException:
            failures.append(traceback.format_exc())

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures[0]
    return results


@pytest.mark.slow
def test_concurrent_compactions_in_threads(db_url: str) -> None:
    recorder = RecordingSummarizer()
    shared = SlowSummarizer(lambda: SLOW_SUMMARY, recorder)
    memories = [
        Memory(db_url, model=MODEL, strategy="summary", summarizer=shared, compaction="manual")
        for _ in range(WORKERS)
    ]
    try:
        conversation_id = memories[0].conversation(user=USER).id
        conversations = [m.conversation(id=conversation_id, user=USER) for m in memories]
        barrier = threading.Barrier(WORKERS)

        def compact(n: int) -> Any:
            barrier.wait(30)
            return conversations[n].compact()

        for _ in range(ROUNDS):
            _fill(conversations[0], 30)
            known = len(_summaries(db_url, conversation_id))
            calls = len(recorder.calls)
            outcomes = _run_threads(compact, WORKERS)
            ranges = _new_ranges(db_url, conversation_id, known)
            assert len(ranges) == 1, outcomes
            assert sum(len(o.summaries) for o in outcomes) == 1
            assert all(o.error is None for o in outcomes)
            made = recorder.calls[calls:]
            assert len(made) == 1, "one summarizer call per range"
            positions = [int(TAG.match(m["content"])[1]) for m in made[0].messages]
            assert (positions[0], positions[-1]) == ranges[0]
            assert _folds(conversations[0]) is None
        _one_summary_per_range(db_url, conversation_id)
        _check_summaries(db_url, conversation_id, len(conversations[0]))
    finally:
        for memory in memories:
            memory.close()


def _compacting_worker(db: str, conversation_id: str, *, port: Any, barrier: Any, out: str) -> None:
    """Child: compact once per round, through the ModelSummarizer over HTTP."""
    try:
        barrier.wait(60)  # the parent has started the server
        import openai

        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port.value}/v1", api_key=API_KEY, max_retries=0
        )
        results = []
        with Memory(
            db,
            client=client,
            model=MODEL,
            strategy="summary",
            compaction="manual",
            summary_model=SUMMARY_MODEL,
        ) as memory:
            conversation = memory.conversation(id=conversation_id, user=USER)
            for _ in range(ROUNDS):
                barrier.wait(60)  # the parent has added this round's messages
                outcome = conversation.compact()
                results.append(
                    {
                        "summaries": [[s.start, s.end] for s in outcome.summaries],
                        "skipped": outcome.skipped,
                        "error": outcome.error,
                    }
                )
                barrier.wait(60)
        client.close()
        Path(out).write_text(json.dumps(results))
    except BaseException:
        Path(f"{out}.error").write_text(traceback.format_exc())
        raise


@needs_fork
@pytest.mark.slow
def test_concurrent_compactions_in_processes(db_url: str, tmp_path: Path) -> None:
    with Memory(db_url, model=MODEL) as memory:
        conversation_id = memory.conversation(user=USER, strategy="summary").id
    ctx = _fork()
    port = ctx.Value("i", 0)
    barrier = ctx.Barrier(WORKERS + 1)
    outputs = [tmp_path / f"worker-{n}.json" for n in range(WORKERS)]
    workers = [
        ctx.Process(
            target=_compacting_worker,
            args=(db_url, conversation_id),
            kwargs={"port": port, "barrier": barrier, "out": str(outputs[n])},
        )
        for n in range(WORKERS)
    ]
    for worker in workers:
        worker.start()  # before the server exists: no child inherits its threads
    try:
        with (
            # Twice the registered window: a 30-message fold plus the summarizer's
            # prompt is more than 1,000 tokens (see the outage test below).
            ChatServer(window=2 * WINDOW, model=MODEL, api_key=API_KEY) as server,
            Memory(db_url, model=MODEL, strategy="summary", summary_model=SUMMARY_MODEL) as memory,
        ):
            port.value = server.port
            barrier.wait(60)
            conversation = memory.conversation(id=conversation_id, user=USER)
            for _ in range(ROUNDS):
                _fill(conversation, 30)
                known = len(_summaries(db_url, conversation_id))
                server.reset()
                server.fail(Fault.slow_first_byte(SLOW_SUMMARY), times=WORKERS)
                barrier.wait(60)  # go
                barrier.wait(120)  # all done
                requests = [r for r in server.chat_requests if is_summarization(r.body)]
                ranges = _new_ranges(db_url, conversation_id, known)
                assert len(ranges) == 1
                assert len(requests) == 1, (
                    f"{len(requests)} summarizer requests for one range: {ranges}"
                )
                positions = [
                    int(p) for p in TAG.findall(requests[0].body["messages"][1]["content"])
                ]
                assert (positions[0], positions[-1]) == ranges[0]
                assert _folds(conversation) is None
            assert server.errors == []
            assert server.rejections == []
    finally:
        for worker in workers:
            worker.join(60)
            if worker.is_alive():
                worker.kill()
                worker.join()
    failed = {n: (w.exitcode, _read(Path(f"{outputs[n]}.error"))) for n, w in enumerate(workers)}
    assert all(code == 0 for code, _ in failed.values()), failed
    results = [json.loads(path.read_text()) for path in outputs]
    for r in range(ROUNDS):
        winners = [w[r] for w in results if w[r]["summaries"]]
        assert len(winners) == 1, [w[r] for w in results]
        assert all(w[r]["error"] is None for w in results)
    _one_summary_per_range(db_url, conversation_id)
    _check_summaries(db_url, conversation_id, ROUNDS * 30)


def test_two_summaries_built_on_the_same_one_cannot_both_be_stored(db_url: str) -> None:
    """The lease keeps compactions apart only while its holder renews it in time; the
    store alone must let one summary, not several, extend the one they were built on."""
    with Memory(db_url, model=MODEL, strategy="summary", compaction="manual") as memory:
        conversation = memory.conversation(user=USER)
        _fill(conversation, 30)
        barrier = threading.Barrier(WORKERS)

        def store(n: int) -> Any:
            barrier.wait(30)
            return conversation._log.store_summary(
                NewSummary(
                    start=0,
                    end=10 + n,  # each race entrant folded a different range
                    text=f"summary {n}",
                    tokens=10,
                    strategy="summary",
                    model="m",
                    prompt_version="v",
                    based_on=None,  # each was built on there being no summary yet
                )
            )

        stored = [each for each in _run_threads(store, WORKERS) if each is not None]
        assert len(stored) == 1, stored
        assert len(_summaries(db_url, conversation.id)) == 1


class Gate:
    """The summary strategy, holding one named thread inside ``select`` until released.

    ``compact`` reads the state and asks the strategy for the fold point before
    it takes the lease; the gate parks a compaction right there, as a slow
    scheduler or a GC pause would.
    """

    name = "summary"

    def __init__(self) -> None:
        self.inner = Summarize()
        self.parked = threading.Event()
        self.release = threading.Event()
        self.park: set[str] = set()

    def summary_cap(self, budget: Any) -> int:
        return self.inner.summary_cap(budget)

    def fold_point(self, state: Any, budget: Any) -> int | None:
        return self.inner.fold_point(state, budget)

    def select(self, state: Any, budget: Any) -> Any:
        selection = self.inner.select(state, budget)
        if threading.current_thread().name in self.park:
            self.parked.set()
            self.release.wait(30)
        return selection


def test_a_late_compaction_does_not_summarize_a_range_again(db_url: str) -> None:
    recorder = RecordingSummarizer()
    gate = Gate()
    with Memory(
        db_url, model=MODEL, strategy=gate, summarizer=recorder, compaction="manual"
    ) as memory:
        conversation = memory.conversation(user=USER)
        _fill(conversation, 60)
        late = memory.conversation(id=conversation.id, user=USER, strategy=gate)
        gate.park.add("late")
        result: list[Any] = []
        thread = threading.Thread(target=lambda: result.append(late.compact()), name="late")
        thread.start()
        assert gate.parked.wait(10)
        # "late" holds the lease while it decides: the other compaction skips...
        other = conversation.compact()
        assert other.skipped == "another compaction of this conversation is running"
        gate.release.set()
        thread.join(30)
        assert result[0].summaries  # ...and the range is summarized once, by "late"
        assert conversation.compact().skipped == "nothing to fold"
        _one_summary_per_range(db_url, conversation.id)
        assert len(recorder.calls) == len(result[0].summaries), "a range summarized twice"


# -- 3. a failing summarizer changes nothing -----------------------------------------------


def _summary_reply(text: str) -> Callable[[dict[str, Any]], str | None]:
    """A server reply: ``text`` for summarization requests, the default for chat."""
    return lambda body: text if is_summarization(body) else None


FAULTS: dict[str, tuple[Callable[[ChatServer], None], int]] = {
    # name: (how the server fails the summarizer's requests, requests the call makes)
    "500 until retries run out": (lambda s: s.fail(Fault.status(500), times=3), 3),
    "401": (lambda s: s.fail(Fault.status(401)), 1),
    "malformed JSON": (lambda s: s.fail(Fault.malformed_json()), 1),
    "HTML instead of JSON": (lambda s: s.fail(Fault.not_json()), 1),
    "empty reply": (lambda s: setattr(s, "reply", _summary_reply("")), 1),
    "refusal": (
        lambda s: setattr(s, "reply", _summary_reply("I'm sorry, but I can't help with that.")),
        1,
    ),
}


@pytest.fixture
def server() -> Iterator[ChatServer]:
    """The model's real window is twice what we registered: see the backlog test below."""
    with ChatServer(window=2 * WINDOW, model=MODEL, api_key=API_KEY) as server:
        yield server


def _no_sleep(_seconds: float) -> None:
    return None


def _message_lines(export: str) -> list[str]:
    return export.splitlines()[1:]


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_failed_summarization_changes_no_stored_byte(
    fault: str, server: ChatServer, tmp_path: Path
) -> None:
    db = str(tmp_path / "faults.db")
    inject, attempts = FAULTS[fault]
    with (
        server.client() as client,
        Memory(
            db,
            client=client,
            model=MODEL,
            strategy="summary",
            summarizer=None,  # the ModelSummarizer, over the same server
            retry=RetryPolicy(attempts=3),
            sleep=_no_sleep,
        ) as memory,
    ):
        conversation = memory.conversation(user=USER, system="Be brief.")
        _fill(conversation, 30)
        assert _folds(conversation) is not None
        before = conversation.export()

        # compact() by hand: nothing stored but the failure.
        inject(server)
        outcome = conversation.compact()
        assert outcome.error, outcome
        assert outcome.summaries == ()
        assert conversation.export() == before, "byte for byte"
        assert _summaries(db, conversation.id) == []
        (failure,) = _summary_usage(db, conversation.id)
        assert failure.error
        assert failure.model == MODEL
        assert failure.prompt_tokens is None
        assert API_KEY not in failure.error
        requests = server.chat_requests
        assert len(requests) == attempts
        assert all(is_summarization(r.body) for r in requests)

        # A turn whose compaction fails is still answered and stored whole.
        server.reset()
        server.fail(Fault.slow_first_byte(0))  # the chat request goes through untouched
        inject(server)
        reply = conversation.send("[30] One more question, please.", max_tokens=50)
        assert reply.complete
        assert reply.text.startswith("Reply #1")
        after = conversation.export()
        assert _message_lines(after)[:-2] == _message_lines(before)
        assert len(_message_lines(after)) == len(_message_lines(before)) + 2
        assert _summaries(db, conversation.id) == []
        failures = [u for u in _summary_usage(db, conversation.id) if u.error]
        assert len(failures) == 2
        assert len([r for r in server.chat_requests if is_summarization(r.body)]) == attempts

        # Compaction is tried again later, and then it works.
        server.reset()
        server.reply = None
        outcome = conversation.compact()
        assert outcome.summaries
        assert outcome.error is None
        assert conversation.export() == after
        _check_summaries(db, conversation.id, len(conversation))


def test_compaction_recovers_after_a_summarizer_outage(tmp_path: Path) -> None:
    with (
        ChatServer(window=WINDOW, model=MODEL) as server,
        server.client() as client,
        Memory(
            str(tmp_path / "outage.db"),
            client=client,
            model=MODEL,
            strategy="summary",
            retry=RetryPolicy(attempts=3),
            sleep=_no_sleep,
        ) as memory,
    ):
        conversation = memory.conversation(user=USER)
        server.reply = _summary_reply("")  # the summarizer is down: empty summaries
        for turn in range(20):
            conversation.send(_message(2 * turn)["content"], max_tokens=50)
        assert conversation.usage().failed >= 5
        server.reply = None  # ...and back
        server.reset()
        conversation.send(_message(40)["content"], max_tokens=50)
        summaries = [r for r in server.chat_requests if is_summarization(r.body)]
        assert summaries, "the turn tried to compact"
        assert [r.status for r in summaries] == [200] * len(summaries)
        assert _summaries(str(tmp_path / "outage.db"), conversation.id)


def test_a_summary_that_quotes_a_refusal_is_stored_a_refusal_is_not(tmp_path) -> None:
    """Compaction gives the refusal check what was summarized: a summary opening with a
    line somebody said is stored; the same words from the summarizer alone are not."""
    quoted = "I can't help you move on Saturday, Bob told Alice, who hired movers instead."
    summarizer = RecordingSummarizer()
    with Memory(
        tmp_path / "c.db", model=MODEL, summarizer=summarizer, compaction="manual"
    ) as memory:
        said = memory.conversation(strategy="summary")
        said.append({"role": "user", "content": "Bob: I can't help you move on Saturday."})
        _fill(said, 80)
        summarizer.replies = [quoted]
        assert said.compact().summaries
        silent = memory.conversation(strategy="summary")
        _fill(silent, 81)
        summarizer.replies = [quoted]
        outcome = silent.compact()
        assert not outcome.summaries
        assert "refused" in (outcome.error or "")
