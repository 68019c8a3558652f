"""What recalling costs per context: ``recall`` against ``truncate`` at 100,000 messages.

    python bench/bench_recall_cost.py            # 100,000 messages (about a minute)
    python bench/bench_recall_cost.py --quick    # 20,000 messages, fewer runs
    python bench/bench_recall_cost.py --postgres postgresql://postgres@127.0.0.1/test  # there

A SQLite file in a temporary folder holds one conversation of ``bench_engine``'s
generated messages (10-200 words each from a small vocabulary, so every word
is common), with a fact planted every 1,000 messages ("The vault code for
project zephyrN is ..."). Two handles on it build ``context()`` at a 4,000-token
budget, one with ``truncate`` and one with ``recall``, timed interleaved after
a warm-up; the figure is the difference of their medians (issue 11's target:
<= 5 ms at 100,000 messages). Twice: with the generated newest question (only
common words: the search finds nothing worth ranking) and after a question
about one planted fact (rare words: the search ranks, and the fact's turn is
recalled; checked). With ``--postgres`` the conversation is stored in a schema
of its own on that server (dropped afterwards), after ``ANALYZE``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import sqlalchemy as sa
from _measure import Row, interleaved, ms, print_table
from bench_engine import BUDGET, MODEL, USER, export_text, messages_for

from conversation_memory import Memory

FACT_EVERY = 1000


def planted(count: int) -> tuple[list[dict[str, str]], dict[int, str]]:
    messages = messages_for(2, count)
    facts = {}
    for n, position in enumerate(range(FACT_EVERY, count - 10, FACT_EVERY)):
        text = f"The vault code for project zephyr{n} is {4000 + n}, kept by the night guard."
        messages[position] = {"role": "user", "content": text}
        facts[n] = text
    return messages, facts


@contextmanager
def database(postgres: str | None) -> Iterator[str]:
    """A SQLite file in a temporary folder, or a fresh schema on ``postgres``."""
    if postgres is None:
        with tempfile.TemporaryDirectory() as folder:
            yield str(Path(folder) / "b.db")
        return
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(postgres.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        sep = "&" if "?" in postgres else "?"
        yield f"{postgres}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--postgres", default=None, help="a PostgreSQL URL to measure on")
    args = parser.parse_args(argv)
    size, runs = (20_000, 40) if args.quick else (100_000, 100)
    started = time.perf_counter()
    rows: list[Row] = []
    with database(args.postgres) as url, Memory(url) as memory:
        messages, facts = planted(size)
        memory.import_conversation(export_text("big", messages, "Answer briefly."))
        if args.postgres:
            with memory.database.write() as conn:
                conn.execute(sa.text("ANALYZE messages"))

        def handle(strategy: str):
            return memory.conversation(
                id="big", user=USER, budget=BUDGET, model=MODEL, strategy=strategy
            )

        truncate, recall = handle("truncate"), handle("recall")
        asked = len(facts) // 3
        question = {"role": "user", "content": f"What is project zephyr{asked}'s code?"}
        for label in ("generated question (common words)", f"question about fact {asked}"):
            if label.startswith("question about"):
                truncate.append(question)
            plain, recalling = interleaved(
                lambda _: truncate.context(), lambda _: recall.context(), runs, warmup=5
            )
            context = recall.context()
            extra = statistics.median(recalling) - statistics.median(plain)
            rows += [
                Row(f"{label}: context(), truncate", ms(statistics.median(plain))),
                Row(
                    f"{label}: context(), recall ({len(context.recalled)} turns recalled)",
                    ms(statistics.median(recalling)),
                ),
                Row(f"{label}: extra per context", ms(extra), "<= 5 ms", extra <= 0.005),
            ]
            if label.startswith("question about"):
                found = asked * FACT_EVERY + FACT_EVERY in context.report.retrieved
                rows.append(Row(f"{label}: its turn recalled", str(found), "True", found))
    return print_table(
        f"conversation_memory recall cost ({size:,} messages, budget {BUDGET:,}, "
        f"{'PostgreSQL' if args.postgres else 'SQLite file'}; "
        f"Python {sys.version.split()[0]})",
        rows,
        seconds=time.perf_counter() - started,
    )


if __name__ == "__main__":
    sys.exit(main())
