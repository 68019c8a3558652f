"""Engine benchmarks: is a turn's cost independent of history length, and how
close is the library to raw sqlite3?

    python bench/bench_engine.py            # full run (about 2 minutes)
    python bench/bench_engine.py --quick    # a smoke run: smaller history, fewer runs

Everything runs on SQLite files in a temporary folder, opened by the library
(WAL, synchronous=FULL, foreign_keys, busy_timeout) and, for the raw
baselines, by plain ``sqlite3`` with the same pragmas, on the same disk, with
the same message texts. Messages are generated deterministically (10-200
words each, alternating user/assistant) and counted by the library's counter.
Each timed pair is measured interleaved (A, B, A, B, ...) after a warm-up, so
drift in the machine hits both sides alike.

Figures and targets (docs/architecture.md, "Cost independent of history length"):

1. ``context()`` with a 4,000-token budget on a 100-message and on a
   100,000-message conversation; medians and their ratio (target <= 1.5x).
2. A whole turn (append the user message, build the context, append the
   reply) on a 2,000-turn conversation, against raw sqlite3 doing the same two
   inserts (each in its own ``BEGIN IMMEDIATE`` transaction, as the library
   does) plus a newest-first read of as many tail rows as the library's
   context sends; medians and the ratio (target <= 1.5x). The same turn at
   500, 1,000, 2,000 and 4,000 turns of history: the fitted growth of its
   main-thread CPU time per 1,000 turns, as a share of its time at 500 (the
   growth slope, target <= 0.05; CPU time, because a commit's disk sync does
   not depend on the history and only adds noise).
3. Appending one message in its own transaction against the same raw insert,
   at ``synchronous=FULL``: messages per second and the ratio (target >=
   75%). The raw side inserts a token count computed beforehand; the library
   counts the message itself (tiktoken), as it must.
4. The same at ``Memory(durability="normal")`` against raw sqlite3 at
   ``synchronous=NORMAL`` (target >= 50%): without a disk sync per commit,
   what is left is the library's own work. Both appends also time the raw
   insert on a file without the full-text index's triggers (information):
   the index is kept in each insert's transaction, on both sides of the ratio.
5. Loading a 10,000-message history (``history()``) against raw sqlite3
   reading the same columns of the same rows, oldest first, into the same
   message dicts; medians and the ratio (target <= 1.5x).
6. Peak Python memory (tracemalloc) while building the context of the 100k
   versus the 100-message conversation; the difference (target <= 50 MB).
   tracemalloc sees Python allocations only, not SQLite's page cache.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _measure import Row, Timings, alternating, interleaved, ms, print_table

from conversation_memory import Conversation, Memory
from conversation_memory.messages import dumps

MODEL = "gpt-4o-mini"
BUDGET = 4000
USER = "bench"
SYSTEM = "You are a helpful assistant. Answer briefly and precisely."
WHEN = datetime(2024, 1, 1, tzinfo=UTC).isoformat()

_WORDS = """
the of and to a in is it you that he was for on are with as I his they be at one
have this from or had by hot word but what some we can out other were all there
when up use your how said an each she which do their time if will way about many
then them write would like so these her long make thing see him two has look more
day could go come did number sound no most people my over know water than call
first who may down side been now find any new work part take get place made live
where after back little only round man year came show every good me give our under
name very through just form sentence great think say help low line differ turn
cause much mean before move right boy old too same tell does set three want air well
also play small end put home read hand port large spell add even land here must big
high such follow act why ask men change went light kind off need house picture try
us again animal point mother world near build self earth father database context
window token budget summary message conversation assistant model request latency
retry transaction index query function return value error timeout server client
def class import async await lambda yield None True False self.items dict[str, Any]
SELECT * FROM messages WHERE position > 42 ORDER BY position DESC LIMIT 32;
https://example.com/docs?page=3 2024-06-07 12:34:56 3.14159 1,000,000 #42 @user
café naïve résumé 東京 München Ωmega 🙂 👍 — “quoted” ‘text’ … (parenthetical) [1]
"""
VOCABULARY = tuple(_WORDS.split())


def make_message(rng: random.Random, position: int) -> dict[str, str]:
    role = "user" if position % 2 == 0 else "assistant"
    words = rng.choices(VOCABULARY, k=rng.randint(10, 200))
    return {"role": role, "content": " ".join(words)}


def messages_for(seed: int, count: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [make_message(rng, position) for position in range(count)]


def export_text(conversation_id: str, messages: list[dict[str, str]], system: str | None) -> str:
    """A JSONL export, as ``Conversation.export()`` writes it, for ``import_conversation``."""
    header = {
        "convmem": 1,
        "type": "conversation",
        "id": conversation_id,
        "user": USER,
        "title": None,
        "model": MODEL,
        "system": system,
        "settings": {},
        "created_at": WHEN,
        "updated_at": WHEN,
    }
    extra = {"convmem": {"created_at": WHEN}}
    return "\n".join([dumps(header), *(dumps({**m, **extra}) for m in messages)]) + "\n"


def load(memory: Memory, conversation_id: str, messages: list[dict[str, str]], system: str | None):
    memory.import_conversation(export_text(conversation_id, messages, system))
    return memory.conversation(id=conversation_id, user=USER, budget=BUDGET, model=MODEL)


# -- raw sqlite3 baseline ----------------------------------------------------------


def raw_connection(path: Path, synchronous: str = "FULL") -> sqlite3.Connection:
    """The library's pragmas, on a plain sqlite3 connection with explicit transactions."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA busy_timeout = 30000")
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA foreign_keys = ON")
    con.execute(f"PRAGMA synchronous = {synchronous}")
    return con


class RawLog:
    """Appends and tail reads on the library's own tables, with hand-written SQL."""

    INSERT = (
        "INSERT INTO messages (conversation_id, position, role, content, tokens, created_at,"
        " complete, pinned) VALUES (?, ?, ?, ?, ?, ?, 1, 0)"
    )
    TAIL = (
        "SELECT position, role, content, parts, name, tool_calls, tool_call_id, tokens,"
        " pinned, complete FROM messages WHERE conversation_id = ?"
        " ORDER BY position DESC LIMIT ?"
    )

    def __init__(self, con: sqlite3.Connection, conversation_id: str) -> None:
        self.con = con
        self.id = conversation_id
        (count,) = con.execute(
            "SELECT count(*) FROM messages WHERE conversation_id = ?", (conversation_id,)
        ).fetchone()
        self.next = count

    def append(self, message: dict[str, str], tokens: int) -> None:
        con = self.con
        con.execute("BEGIN IMMEDIATE")
        try:
            con.execute(
                self.INSERT,
                (
                    self.id,
                    self.next,
                    message["role"],
                    message["content"],
                    tokens,
                    # What SQLAlchemy's SQLite DateTime stores: naive UTC text.
                    str(datetime.now(UTC).replace(tzinfo=None)),
                ),
            )
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
        self.next += 1

    HISTORY = (
        "SELECT role, content, parts, name, tool_calls, tool_call_id FROM messages"
        " WHERE conversation_id = ? ORDER BY position"
    )

    def history(self) -> list[dict[str, Any]]:
        """Every message, oldest first, as the plain dicts a chat app sends back."""
        con = self.con
        con.execute("BEGIN")
        try:
            rows = con.execute(self.HISTORY, (self.id,)).fetchall()
        finally:
            con.execute("COMMIT")
        return [{"role": row[0], "content": row[1]} for row in rows]

    def tail(self, n: int) -> list[Any]:
        con = self.con
        con.execute("BEGIN")
        try:
            rows = con.execute(self.TAIL, (self.id, n)).fetchall()
        finally:
            con.execute("COMMIT")
        rows.reverse()
        return rows


# -- measuring ------------------------------------------------------------------------


def peak_mb(conversation: Conversation) -> float:
    """Peak Python memory allocated while building one context, in MB."""
    conversation.context()  # warm: nothing first-use-only in the figure
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        context = conversation.context()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del context
    return (peak - base) / 1e6


@dataclass
class Setup:
    memory: Memory
    path: Path
    raw_memory: Memory
    """The baseline's own file (same folder, same schema), so neither side's writes
    flush the other's page cache between runs."""
    raw_path: Path
    folder: Path
    system: str | None
    big_size: int
    runs: int
    append_runs: int
    turns: int = 2_000
    growth: tuple[int, ...] = (500, 1_000, 2_000, 4_000)
    history_size: int = 10_000

    def count(self, messages: list[dict[str, str]]) -> list[int]:
        counter = self.memory.conversation(user=USER, model=MODEL).counter
        return [counter.count_message(m) for m in messages]


def bench_context(setup: Setup) -> tuple[list[Row], Conversation, Conversation]:
    """1. ``context()`` on a 100-message and on a long conversation."""
    rows = []
    small = load(setup.memory, "small-100", messages_for(1, 100), setup.system)
    fill = time.perf_counter()
    big = load(setup.memory, "big", messages_for(2, setup.big_size), setup.system)
    fill = time.perf_counter() - fill
    rows.append(Row(f"import {setup.big_size:,} messages (one transaction)", f"{fill:.1f} s"))
    small_times, big_times = interleaved(
        lambda _: small.context(), lambda _: big.context(), setup.runs, warmup=5
    )
    for conversation, times, size in ((small, small_times, 100), (big, big_times, setup.big_size)):
        report = conversation.context().report
        if report.total > BUDGET:
            raise AssertionError(f"context of {size} messages is over budget: {report}")
        rows.append(
            Row(
                f"context(), {size:,} msgs ({report.sent} sent, {report.total} tok)",
                ms(statistics.median(times)),
            )
        )
    ratio = statistics.median(big_times) / statistics.median(small_times)
    rows.append(Row("  ratio long / 100", f"{ratio:.2f}x", "<= 1.5x", ratio <= 1.5))
    return rows, small, big


def timed_turns(setup: Setup, turns: int, seed: int) -> tuple[Timings, Timings, int]:
    """A whole turn on a ``turns``-turn conversation, library and raw sqlite3 alternately."""
    history = messages_for(3, 2 * turns)
    lib = load(setup.memory, f"turns-lib-{turns}", history, setup.system)
    load(setup.raw_memory, f"turns-raw-{turns}", history, setup.system)
    con = raw_connection(setup.raw_path)
    raw = RawLog(con, f"turns-raw-{turns}")
    new = messages_for(seed, 2 * (setup.runs + 10))
    tokens = setup.count(new)
    tail_rows = lib.context().report.sent

    def lib_turn(i: int) -> None:
        lib.append(new[2 * i])
        lib.context()
        lib.append(new[2 * i + 1])

    def raw_turn(i: int) -> None:
        raw.append(new[2 * i], tokens[2 * i])
        raw.tail(tail_rows)
        raw.append(new[2 * i + 1], tokens[2 * i + 1])

    try:
        lib_times, raw_times = alternating((lib_turn, raw_turn), setup.runs, warmup=5)
    finally:
        con.close()
    return lib_times, raw_times, tail_rows


def bench_turn(setup: Setup) -> list[Row]:
    """2. A whole turn on a 2,000-turn conversation: library vs raw sqlite3; its growth."""
    median = statistics.median
    cpu: dict[int, float] = {}
    rows: list[Row] = []
    for turns in sorted({*setup.growth, setup.turns}):
        lib, raw, tail_rows = timed_turns(setup, turns, seed=4 + turns)
        cpu[turns] = median(lib.cpu)
        if turns == setup.turns:
            m_lib, m_raw = median(lib.wall), median(raw.wall)
            ratio = m_lib / m_raw
            rows += [
                Row(f"turn, library ({turns:,} turns, {tail_rows} tail rows)", ms(m_lib)),
                Row("turn, raw sqlite3 (2 inserts + tail read)", ms(m_raw)),
                Row("  ratio library / raw", f"{ratio:.2f}x", "<= 1.5x", ratio <= 1.5),
            ]
    sizes = sorted(cpu)
    xs = [size / 1000 for size in sizes]
    ys = [cpu[size] for size in sizes]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    growth = slope / cpu[sizes[0]]
    shown = ", ".join(f"{size:,}: {ms(cpu[size])}" for size in sizes)
    rows += [
        Row(f"  turn CPU time by history ({shown})", "", "(info)"),
        Row(
            "  growth slope (per 1,000 turns, share of time)",
            f"{growth:+.3f}",
            "<= 0.05",
            growth <= 0.05,
        ),
    ]
    return rows


def bench_append(setup: Setup, durability: str = "full") -> list[Row]:
    """3./4. One message per transaction: throughput, library vs raw sqlite3.

    A third file, its search index's triggers dropped, shows what the same raw
    insert costs without the index (information: the library keeps the index in
    the insert's transaction, and the raw side of the ratio pays for it too).
    """
    synchronous = {"full": "FULL", "normal": "NORMAL"}[durability]
    lib_path = setup.folder / f"append-{durability}.db"
    raw_path = setup.folder / f"append-{durability}-raw.db"
    bare_path = setup.folder / f"append-{durability}-unindexed.db"
    raw_ids = []
    for path in (raw_path, bare_path):
        with Memory(path, model=MODEL) as raw_memory:  # the same schema for the raw sides
            raw_ids.append(raw_memory.conversation(user=USER, model=MODEL).id)
    with raw_connection(bare_path) as con:
        for (name,) in con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'messages'"
        ).fetchall():
            con.execute(f"DROP TRIGGER {name}")
    con.close()
    with Memory(lib_path, model=MODEL, durability=durability) as memory:
        lib = memory.conversation(user=USER, model=MODEL)
        cons = [raw_connection(path, synchronous) for path in (raw_path, bare_path)]
        raw, bare = (RawLog(con, raw_id) for con, raw_id in zip(cons, raw_ids, strict=True))
        payload = messages_for(5, setup.append_runs + 20)
        tokens = setup.count(payload)
        try:
            lib_times, raw_times, bare_times = (
                timing.wall
                for timing in alternating(
                    (
                        lambda i: lib.append(payload[i]),
                        lambda i: raw.append(payload[i], tokens[i]),
                        lambda i: bare.append(payload[i], tokens[i]),
                    ),
                    setup.append_runs,
                    warmup=20,
                )
            )
        finally:
            for con in cons:
                con.close()
    lib_rate, raw_rate = len(lib_times) / sum(lib_times), len(raw_times) / sum(raw_times)
    bare_rate = len(bare_times) / sum(bare_times)
    share = lib_rate / raw_rate
    target = 0.75 if durability == "full" else 0.5
    return [
        Row(f"append, library (synchronous={synchronous})", f"{lib_rate:,.0f} msg/s"),
        Row("append, raw sqlite3 (same insert, own transaction)", f"{raw_rate:,.0f} msg/s"),
        Row("  library / raw", f"{share:.0%}", f">= {target:.0%}", share >= target),
        Row(
            "  raw sqlite3 without the search index's triggers",
            f"{bare_rate:,.0f} msg/s",
            "(info)",
        ),
    ]


def bench_history(setup: Setup) -> list[Row]:
    """5. Loading a whole history: ``history()`` against raw sqlite3."""
    size = setup.history_size
    history = messages_for(6, size)
    lib = load(setup.memory, "history-lib", history, setup.system)
    load(setup.raw_memory, "history-raw", history, setup.system)
    con = raw_connection(setup.raw_path)
    raw = RawLog(con, "history-raw")
    try:
        if lib.history() != raw.history():
            raise AssertionError("the two sides read different histories")
        lib_times, raw_times = interleaved(
            lambda _: lib.history(), lambda _: raw.history(), max(10, setup.runs // 3), warmup=3
        )
    finally:
        con.close()
    m_lib, m_raw = statistics.median(lib_times), statistics.median(raw_times)
    ratio = m_lib / m_raw
    return [
        Row(f"history(), {size:,} msgs, library", ms(m_lib)),
        Row("history, raw sqlite3 (same rows, same dicts)", ms(m_raw)),
        Row("  ratio library / raw", f"{ratio:.2f}x", "<= 1.5x", ratio <= 1.5),
    ]


def bench_memory(small: Conversation, big: Conversation, big_size: int) -> list[Row]:
    """6. Peak Python memory while building a context."""
    small_peak, big_peak = peak_mb(small), peak_mb(big)
    diff = big_peak - small_peak
    return [
        Row("peak memory, context() of 100 msgs", f"{small_peak:.2f} MB"),
        Row(f"peak memory, context() of {big_size:,} msgs", f"{big_peak:.2f} MB"),
        Row("  difference", f"{diff:.2f} MB", "<= 50 MB", diff <= 50),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small history, few runs (smoke)")
    parser.add_argument(
        "--system",
        default=SYSTEM,
        help="system prompt of the benchmarked conversations ('' for none)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="convmem-bench-") as folder:
        path = Path(folder) / "bench.db"
        raw_path = Path(folder) / "baseline.db"
        with Memory(str(path), model=MODEL) as memory, Memory(raw_path, model=MODEL) as raw:
            setup = Setup(
                memory=memory,
                path=path,
                raw_memory=raw,
                raw_path=raw_path,
                folder=Path(folder),
                system=args.system or None,
                big_size=20_000 if args.quick else 100_000,
                runs=15 if args.quick else 60,
                append_runs=100 if args.quick else 600,
            )
            print(f"filling 100 + {setup.big_size:,} messages ...", file=sys.stderr)
            rows, small, big = bench_context(setup)
            print("turns ...", file=sys.stderr)
            rows += bench_turn(setup)
            print("appends ...", file=sys.stderr)
            rows += bench_append(setup, "full")
            rows += bench_append(setup, "normal")
            print("history ...", file=sys.stderr)
            rows += bench_history(setup)
            rows += bench_memory(small, big, setup.big_size)
    return print_table(
        f"conversation_memory engine bench ({'quick' if args.quick else 'full'}; "
        f"medians of {setup.runs} runs; SQLite {sqlite3.sqlite_version}; Python "
        f"{sys.version.split()[0]})",
        rows,
        seconds=time.perf_counter() - started,
    )


if __name__ == "__main__":
    sys.exit(main())
