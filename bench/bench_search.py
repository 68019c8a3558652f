"""Search benchmarks: how fast the store finds messages, and what keeping the
index costs an append.

    python bench/bench_search.py            # full run (about 3-4 minutes, mostly filling)
    python bench/bench_search.py --quick    # a smoke run: 10x smaller store, fewer queries

One SQLite file in a temporary folder, opened by the library (WAL,
synchronous=FULL). It holds a 100,000-message conversation (user "solo") and
10,000 conversations of 10 messages each of another user ("many"): 200,000
messages, so each search runs against an index twice the size of what it
searches. Everything is loaded through ``Memory.import_conversation`` (the
index is filled by the database's own triggers, as for any write).

Message text is generated deterministically: 10-120 words drawn with a Zipf
law (exponent 1) from 150 common English words followed by 20,000 made-up
ones, so that, as in real chat, a few words are in nearly every message and
most are rare.

Figures and targets:

1. **Search latency.** 200 varied queries (one rare word; two to six words
   mixing rare and common ones; questions made mostly of common words; only
   common words; words stored nowhere; operator-looking text), each timed
   once after a warm-up, through the public API as a caller pays for it (one
   read transaction: the lineage, the index, the rows): ``Conversation.search``
   over the 100,000-message conversation and ``Memory.search`` over the 10,000
   conversations, ``limit=10``. Median and p95 of the wall time: target
   <= 20 ms each. The searching thread's CPU time (``time.thread_time``) is
   shown beside it: it leaves out waiting for the two cores when other work
   shares the machine, so it holds still when the wall time does not.
2. **Append throughput with the index.** Two files in the same folder, both
   made by the library with the same 2,000-message history; in one the
   index's triggers are dropped. One message per transaction through
   ``Conversation.append``, the two sides alternating (A, B, A, B, ...):
   messages per second and the ratio (target >= 80%). Each commit waits for
   an fsync (``synchronous=FULL``), which the index does not change much;
   the appending thread's CPU time per append shows what the index's work
   itself costs.

``--postgres URL`` runs figure 1 again on PostgreSQL, for information.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from _measure import Row, alternating, ms, print_table
from bench_engine import export_text

from conversation_memory import Memory, SearchHit
from conversation_memory.store import search

MODEL = "gpt-4o-mini"
COMMON = [
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "it",
    "you",
    "that",
    "he",
    "was",
    "for",
    "on",
    "are",
    "with",
    "as",
    "I",
    "his",
    "they",
    "be",
    "at",
    "one",
    "have",
    "this",
    "from",
    "or",
    "had",
    "by",
    "what",
    "some",
    "we",
    "can",
    "out",
    "other",
    "were",
    "all",
    "there",
    "when",
    "up",
    "use",
    "your",
    "how",
    "said",
    "an",
    "each",
    "she",
    "which",
    "do",
    "their",
    "time",
    "if",
    "will",
    "way",
    "about",
    "many",
    "then",
    "them",
    "would",
    "like",
    "so",
    "these",
    "her",
    "long",
    "make",
    "thing",
    "see",
    "him",
    "two",
    "has",
    "look",
    "more",
    "day",
    "could",
    "go",
    "come",
    "did",
    "number",
    "no",
    "most",
    "people",
    "my",
    "over",
    "know",
    "than",
    "call",
    "first",
    "who",
    "may",
    "down",
    "been",
    "now",
    "find",
    "any",
    "new",
    "work",
    "part",
    "take",
    "get",
    "place",
    "made",
    "where",
    "after",
    "back",
    "little",
    "only",
    "man",
    "year",
    "came",
    "show",
    "every",
    "good",
    "me",
    "give",
    "our",
    "under",
    "name",
    "very",
    "through",
    "just",
    "form",
    "great",
    "think",
    "say",
    "help",
    "low",
    "line",
    "turn",
    "much",
    "mean",
    "before",
    "move",
    "right",
    "old",
    "too",
    "same",
    "tell",
    "does",
    "set",
    "three",
    "want",
    "well",
    "also",
    "play",
    "small",
    "end",
    "put",
    "home",
    "read",
    "hand",
    "large",
    "even",
    "here",
]
_SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ne",
    "ru",
    "ta",
    "shi",
    "po",
    "ve",
    "da",
    "zu",
    "gri",
    "fen",
    "tor",
    "bal",
    "quin",
    "sel",
    "mar",
    "dro",
    "pix",
]


def vocabulary(rng: random.Random, size: int) -> list[str]:
    made: set[str] = set()
    while len(made) < size:
        made.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))))
    return COMMON + sorted(made)


class Corpus:
    """Zipf-distributed words over a fixed vocabulary; deterministic from the seed."""

    def __init__(self, seed: int, size: int = 20_000) -> None:
        self.rng = random.Random(seed)
        self.words = vocabulary(self.rng, size)
        weights, total = [], 0.0
        for rank in range(len(self.words)):
            total += 1.0 / (rank + 1)
            weights.append(total)
        self.cumulative = weights

    def draw(self, count: int) -> list[str]:
        return self.rng.choices(self.words, cum_weights=self.cumulative, k=count)

    def message(self, position: int) -> dict[str, str]:
        role = "user" if position % 2 == 0 else "assistant"
        return {"role": role, "content": " ".join(self.draw(self.rng.randint(10, 120)))}

    def messages(self, count: int) -> list[dict[str, str]]:
        return [self.message(position) for position in range(count)]

    def rare(self) -> str:
        return self.rng.choice(self.words[len(COMMON) + 2000 :])

    def queries(self, count: int) -> list[str]:
        """Varied queries, the kinds in a fixed rotation."""
        rng = self.rng
        kinds: list[Callable[[], str]] = [
            self.rare,
            lambda: " ".join(self.draw(rng.randint(2, 6))),
            lambda: f"{rng.choice(self.words[len(COMMON) :])} {self.rare()}",
            lambda: f"what did {rng.choice(COMMON)} say about the {self.rare()} {self.rare()}?",
            lambda: "what is the " + " ".join(rng.sample(COMMON[:40], 3)),
            lambda: " ".join(rng.sample(COMMON, 8)),
            lambda: "zzqx" + str(rng.randint(0, 10**6)) + " nowhere" + str(rng.randint(0, 99)),
            lambda: f'"{self.rare()}" OR ({self.rare()} AND NOT -{rng.choice(COMMON)}*',
        ]
        return [kinds[n % len(kinds)]() for n in range(count)]


def fill(memory: Memory, corpus: Corpus, *, long: int, conversations: int, each: int) -> Row:
    started = time.perf_counter()
    memory.import_conversation(export_text("solo", corpus.messages(long), None), user="solo")
    for n in range(conversations):
        if n % 1000 == 0:
            print(f"  {n:,} of {conversations:,} conversations ...", file=sys.stderr)
        memory.import_conversation(
            export_text(f"many-{n}", corpus.messages(each), None), user="many"
        )
    seconds = time.perf_counter() - started
    total = long + conversations * each
    return Row(f"fill {total:,} messages (imports, index by trigger)", f"{seconds:.0f} s")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def bench_search(memory: Memory, corpus: Corpus, runs: int, *, long: int, users: int) -> list[Row]:
    solo = memory.conversation("solo", user="solo")
    queries = corpus.queries(runs)

    def in_conversation(i: int) -> list[SearchHit]:
        return solo.search(queries[i % runs], limit=10)

    def across_user(i: int) -> list[SearchHit]:
        return memory.search(queries[i % runs], user="many", limit=10)

    found = sum(bool(in_conversation(i)) for i in range(runs))
    one, many = alternating((in_conversation, across_user), runs, warmup=20)
    rows = [Row("queries with hits in the long conversation", f"{found} of {runs}")]
    for label, timing in (
        (f"{long:,}-message conversation", one),
        (f"{users:,} conversations of a user", many),
    ):
        median, p95 = statistics.median(timing.wall), percentile(timing.wall, 0.95)
        rows += [
            Row(f"search, {label}: median", ms(median), "<= 20 ms", median <= 0.020),
            Row(f"search, {label}: p95", ms(p95), "<= 20 ms", p95 <= 0.020),
            Row("  max", ms(max(timing.wall))),
            Row(
                "  CPU time of the searching thread: median, p95",
                f"{ms(statistics.median(timing.cpu))}, {ms(percentile(timing.cpu, 0.95))}",
                "(info)",
            ),
        ]
    return rows


TRIGGERS = (
    "messages_fts_insert",
    "messages_fts_delete",
    "messages_fts_update_out",
    "messages_fts_update_in",
)


def bench_append(folder: Path, corpus: Corpus, runs: int) -> list[Row]:
    history = corpus.messages(2_000)
    payload = corpus.messages(runs + 20)
    paths = folder / "indexed.db", folder / "plain.db"
    for path in paths:
        with Memory(path, model=MODEL) as memory:
            memory.import_conversation(export_text("log", history, None), user="solo")
    con = sqlite3.connect(paths[1])
    for trigger in TRIGGERS:
        con.execute(f"DROP TRIGGER {trigger}")
    con.commit()
    con.close()
    with Memory(paths[0], model=MODEL) as indexed, Memory(paths[1], model=MODEL) as plain:
        with_index = indexed.conversation("log", user="solo")
        without = plain.conversation("log", user="solo")
        timed_with, timed_without = alternating(
            (lambda i: with_index.append(payload[i]), lambda i: without.append(payload[i])),
            runs,
            warmup=20,
        )
        with indexed.database.read() as conn:
            assert search.search_lineage(conn, [("log", None)], payload[-1]["content"])
    rate_with = len(timed_with.wall) / sum(timed_with.wall)
    rate_without = len(timed_without.wall) / sum(timed_without.wall)
    share = rate_with / rate_without
    cpu_with, cpu_without = statistics.median(timed_with.cpu), statistics.median(timed_without.cpu)
    return [
        Row("append with the index", f"{rate_with:,.0f} msg/s"),
        Row("append without it (triggers dropped)", f"{rate_without:,.0f} msg/s"),
        Row("  with / without", f"{share:.0%}", ">= 80%", share >= 0.8),
        Row(
            "  CPU time per append, with / without (medians)",
            f"{ms(cpu_with)} / {ms(cpu_without)}",
            "(info)",
        ),
    ]


@contextmanager
def postgres_schema(url: str) -> Iterator[str]:
    """A fresh schema on the server for the run, dropped afterwards: the URL that uses it."""
    import sqlalchemy as sa

    schema = f"convmem_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{url}{'&' if '?' in url else '?'}options={quote(f'-csearch_path={schema}')}"
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


def on_postgres(url: str, corpus: Corpus, runs: int, *, long: int, users: int) -> list[Row]:
    """The search figures again, on PostgreSQL: for information (the targets are SQLite's)."""
    with postgres_schema(url) as schema_url, Memory(schema_url, model=MODEL) as memory:
        filled = fill(memory, corpus, long=long, conversations=users, each=10)
        # What autovacuum does for a store that grew this way; the planner's
        # estimates (and so the plans) depend on it.
        with memory.database.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE conversations")
            conn.exec_driver_sql("ANALYZE messages")
        print("searching on PostgreSQL ...", file=sys.stderr)
        rows = [filled, *bench_search(memory, corpus, runs, long=long, users=users)]
    return [
        Row(f"PostgreSQL: {row.name}", row.value, "(info)" if row.target else "") for row in rows
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10x smaller store, fewer runs")
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="also run the search figures on this PostgreSQL database, in a schema of "
        "their own that is dropped afterwards (about 5 more minutes)",
    )
    args = parser.parse_args(argv)
    long, users = (10_000, 1_000) if args.quick else (100_000, 10_000)
    runs = 60 if args.quick else 200
    started = time.perf_counter()
    corpus = Corpus(seed=1)
    with tempfile.TemporaryDirectory(prefix="convmem-bench-") as folder:
        print("appends ...", file=sys.stderr)
        rows = bench_append(Path(folder), corpus, 100 if args.quick else 600)
        print(f"filling {long:,} + {users:,} x 10 messages ...", file=sys.stderr)
        with Memory(Path(folder) / "search.db", model=MODEL) as memory:
            rows.insert(0, fill(memory, corpus, long=long, conversations=users, each=10))
            print("searching ...", file=sys.stderr)
            rows[1:1] = bench_search(memory, corpus, runs, long=long, users=users)
    if args.postgres:
        print(f"filling PostgreSQL with {long:,} + {users:,} x 10 messages ...", file=sys.stderr)
        rows += on_postgres(args.postgres, Corpus(seed=1), runs, long=long, users=users)
    return print_table(
        f"conversation_memory search bench ({'quick' if args.quick else 'full'}; "
        f"{runs} queries; SQLite {sqlite3.sqlite_version}; Python {sys.version.split()[0]})",
        rows,
        seconds=time.perf_counter() - started,
    )


if __name__ == "__main__":
    sys.exit(main())
