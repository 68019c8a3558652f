"""Vector scan benchmark: how fast semantic recall finds the nearest messages.

    python bench/bench_vectors.py                    # 100,000 messages, 64 dimensions
    python bench/bench_vectors.py --dimensions 384   # the size of all-MiniLM-L6-v2's vectors
    python bench/bench_vectors.py --quick            # 10,000 messages (a smoke run)

One SQLite file in a temporary folder, opened by the library (WAL,
synchronous=FULL), holding one conversation of ``--messages`` messages
(imported through ``Memory.import_conversation``) and a random unit vector for
each (``VectorStore.save``, 5,000 per transaction). No model is called: the
scan's cost does not depend on where the vectors came from.

Figures:

1. **First scan**: a read transaction plus ``VectorStore.nearest`` (limit 10)
   on a fresh ``VectorStore``, which reads every vector of the conversation
   into its matrix. For information (it happens once per conversation and
   process).
2. **Scan**: the same call again, 200 times with a different query each:
   the matrix is kept, and only rows stored since are read (none here).
   Median and p95 wall time: target <= 20 ms.
3. **Scan after a turn**: two new vectors stored before each of 100 scans
   (what a turn adds), so each scan reads those two rows too. Median and p95:
   target <= 20 ms.
4. **Fused search**: ``fused_search`` (full-text hits for a two-word query
   and the vector scan, fused by reciprocal rank), 100 queries; median. For
   information: the full-text half is ``bench_search.py``'s subject.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from _measure import Row, ms, print_table
from bench_engine import export_text

from conversation_memory import Memory
from conversation_memory.store.vectors import NewVector, VectorStore, fused_search

MODEL = "bench-embedding"
SAVE_BATCH = 5_000


def unit_vectors(rng: np.random.Generator, count: int, dimensions: int) -> np.ndarray:
    vectors = rng.standard_normal((count, dimensions), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def fill(memory: Memory, messages: int, dimensions: int, rng: np.random.Generator) -> str:
    words = [f"w{n}" for n in range(5_000)]
    texts = [
        {
            "role": "user" if n % 2 == 0 else "assistant",
            "content": " ".join(rng.choice(words, size=12)),
        }
        for n in range(messages)
    ]
    conversation_id = uuid.uuid4().hex
    memory.import_conversation(export_text(conversation_id, texts, None))
    store = memory._store.vectors
    for start in range(0, messages, SAVE_BATCH):
        block = unit_vectors(rng, min(SAVE_BATCH, messages - start), dimensions)
        store.save(
            MODEL,
            [
                NewVector(conversation_id, start + n, vector.astype("<f4").tobytes())
                for n, vector in enumerate(block)
            ],
        )
    return conversation_id


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--dimensions", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="10,000 messages")
    args = parser.parse_args()
    messages = 10_000 if args.quick else args.messages
    rng = np.random.default_rng(7)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder, Memory(Path(folder) / "bench.db") as memory:
        filling = time.perf_counter()
        conversation_id = fill(memory, messages, args.dimensions, rng)
        print(f"filled {messages:,} messages and vectors in {time.perf_counter() - filling:.0f} s")
        segments = [(conversation_id, None)]
        database = memory.database
        store = VectorStore(database)

        def scan(query: np.ndarray) -> None:
            with database.read() as conn:
                found = store.nearest(conn, segments, MODEL, query, limit=10)
            assert len(found) == 10

        first = timed(lambda: scan(unit_vectors(rng, 1, args.dimensions)[0]))
        queries = unit_vectors(rng, 200, args.dimensions)
        warm = [timed(lambda q=q: scan(q)) for q in queries]

        after_turn = []
        for n in range(100):
            new = unit_vectors(rng, 2, args.dimensions)
            chat = memory.conversation(id=conversation_id, user="bench")
            stored = chat.extend(
                [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
            )
            store.save(
                MODEL,
                [
                    NewVector(conversation_id, s.position, v.astype("<f4").tobytes())
                    for s, v in zip(stored, new, strict=True)
                ],
            )
            after_turn.append(timed(lambda q=queries[n]: scan(q)))

        def fused(query: np.ndarray, n: int) -> None:
            with database.read() as conn:
                fused_search(
                    conn, store, segments, f"w{n} w{n + 1}", model=MODEL, query=query, limit=10
                )

        fused_times = [timed(lambda q=q, n=n: fused(q, n)) for n, q in enumerate(queries[:100])]

    def p95(values: list[float]) -> float:
        return statistics.quantiles(values, n=20)[-1]

    target = 0.020
    title = f"vector scan: {messages:,} messages x {args.dimensions} dimensions (SQLite)"
    rows = [
        Row("first scan (reads every vector)", ms(first)),
        Row(
            "scan, median",
            ms(statistics.median(warm)),
            "<= 20 ms",
            statistics.median(warm) <= target,
        ),
        Row("scan, p95", ms(p95(warm)), "<= 20 ms", p95(warm) <= target),
        Row(
            "scan after a turn, median",
            ms(statistics.median(after_turn)),
            "<= 20 ms",
            statistics.median(after_turn) <= target,
        ),
        Row("scan after a turn, p95", ms(p95(after_turn)), "<= 20 ms", p95(after_turn) <= target),
        Row("fused search (words + vectors), median", ms(statistics.median(fused_times))),
    ]
    return print_table(title, rows, seconds=time.perf_counter() - began)


if __name__ == "__main__":
    sys.exit(main())
