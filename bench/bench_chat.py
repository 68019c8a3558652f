"""Chat benchmarks against a real local HTTP server: what summarizing costs, what the
engine adds to a model call, and how full the budget is kept.

    python bench/bench_chat.py            # full run (2,000 turns; about 1-2 minutes)
    python bench/bench_chat.py --quick    # a smoke run: 300 + 200 turns, the same 60 timing runs

Everything talks to :class:`conversation_memory.testing.ChatServer` (real HTTP on
127.0.0.1, through the real ``openai`` SDK) posing as a model with an 8,000-token
window and 1,024 output tokens (see ``MAX_OUTPUT`` for why not 500), registered
under the same numbers; each conversation caps its prompt at ``budget=4000``
and chat turns ask for ``max_tokens=200``. The server counts tokens with
its own tokenizer (utf-8 bytes / 3), not tiktoken's, so the engine calibrates
from the ``usage.prompt_tokens`` it reports, as it would against any
non-OpenAI server. Summaries come from the server's deterministic summarizer
through the library's ``ModelSummarizer``: real requests, real usage rows.

Figures and targets:

1. **Summarizer input.** A scripted 2,000-turn conversation (user messages and
   replies of 10-60 words), strategy ``summary``, compaction after each turn.
   Total summarizer prompt tokens (the server's ``usage.prompt_tokens`` of the
   usage rows ``kind='summary'``) over the conversation's own message tokens
   (the same server tokenizer, per message, as the server counts them in a
   prompt): target <= 1.3x. Summarizer calls per turn: target <= 1 per 10.
2. **Budget use.** Over the turns sent once the history no longer fits the
   budget: mean of the prompt as the server counted it over the 4,000 limit
   (target >= 90%), and of our own count (the context report's ``total``)
   over the limit; requests over the window (server 400s, strict-mode
   rejections): target 0. The run is repeated briefly with a tighter
   high/low pair and a summary cap near the summaries' real size, to show what
   moves the figure: after a fold the strategy keeps only ``low`` of the limit
   minus a full-size summary's room, and never re-sends folded turns, so what
   is sent saws between about 40% and ``high``.
3. **Engine overhead per turn.** A 10,000-message history loaded with
   ``Memory.import_conversation``, ``compaction="manual"`` (no summarizer in the
   timed path); ``conv.send(text)`` against ``client.chat.completions.create``
   with the very request body the engine sent for that turn, same client,
   same server, interleaved after a warm-up: median(send) - median(bare),
   target <= 1 ms. The engine's figure includes building the context from
   the database and committing the turn (user message, reply and usage row in
   one ``synchronous=FULL`` SQLite transaction). The server keeps the newest
   request body for the bare call, so neither timed call fetches it (the
   turn used to copy the server's request log inside its timing).

   Three figures explain it without changing it. A ``synchronous=FULL`` commit
   in WAL mode waits for one fdatasync of the WAL, which the engine cannot do
   without; how long one takes on this disk is timed in the same rounds (a
   4 KiB page rewritten and synced in the same folder), and the overhead is
   shown again without it. The main thread's CPU time (``time.thread_time``)
   of send minus that of the bare call is the engine's own work, free of
   waits, so it holds still on a busy machine. And the same conversation,
   imported into a second store whose full-text index triggers are dropped,
   is sent to in the same rounds: its overhead (wall and CPU) shows what
   keeping the search index in the turn's transaction adds.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from _measure import Row, alternating, ms, print_table

from conversation_memory import Memory, register_model
from conversation_memory.messages import dumps
from conversation_memory.testing import ChatServer, replies, tokenizer

MODEL = "bench-chat-model"
WINDOW = 8000
MAX_OUTPUT = 1024
"""Not 500: the summary strategy's default cap on a 4,000 budget is 1,000 tokens, and the
ModelSummarizer asks for that many as ``max_tokens``; a model registered with
max_output 500 refuses the request before it is sent, and compaction after a turn
swallows that ConfigurationError silently (no summary, no usage row)."""
BUDGET = 4000
USER = "bench"
SYSTEM = "You are a helpful assistant. Answer briefly and precisely."
WHEN = datetime(2024, 1, 1, tzinfo=UTC).isoformat()

NAMES = ("Alice", "Bob", "Chidi", "Dana", "Émile", "Farah", "Goro", "Hana", "Ivan", "Jude")
PLACES = ("Paris", "Lagos", "Osaka", "Lima", "Oslo", "Pune", "Quito", "Tartu", "Cork")
_TEXT = """
    the of and to a in is it you that was for on are with as be at one have this from
    or had by word but what some we can out other were all there when up use your how
    said an each which do their time if will way about many then them would like so
    these long make thing see two has look more day could go come did number sound no
    most people my over know water than call first who may down side been now find any
    new work part take get place made live where after back little only round year came
    show every good me give our under name very through just form sentence great think
    say help low line turn cause much mean before move right old too same tell does set
    three want air well also play small end put home read hand large spell add even land
    here must big high such follow act why ask change went light kind off need house try
    meeting budget invoice deadline train ticket recipe garden project report database
    context window token summary message assistant model request latency server client
    café naïve résumé 東京 München 🙂 — “quoted” 3.14 2024-06-07 1,000 #42
    """
VOCABULARY = tuple(_TEXT.split())


def sentence(rng: random.Random) -> str:
    """10-60 words, with a name, a place and a number the summary can keep."""
    words = rng.choices(VOCABULARY, k=rng.randint(7, 57))
    fact = [rng.choice(NAMES), rng.choice(PLACES), str(rng.randint(1, 9999))]
    for word in fact:
        words.insert(rng.randrange(len(words) + 1), word)
    return " ".join(words)


def chat_reply(body: dict[str, Any]) -> str | None:
    """The server's answer: its own summarizer for summaries, else a 10-60 word reply."""
    if replies.is_summarization(body):
        return None
    last = body["messages"][-1].get("content") or ""
    return sentence(random.Random(len(body["messages"]) * 7919 + len(str(last))))


def tokens(message: dict[str, Any]) -> int:
    """One message as the server counts it inside a prompt (its share, priming excluded)."""
    return tokenizer.count_tokens([message]) - tokenizer.PRIMING


def open_memory(path: Path, server: ChatServer, client: Any, **options: Any) -> Memory:
    return Memory(str(path), client=client, model=MODEL, **options)


# -- 1 and 2: a long conversation with the summary strategy --------------------------------


@dataclass
class LongRun:
    turns: int
    summary_calls: int
    summary_prompt: int
    message_tokens: int
    over_turns: int
    """Turns sent once the history no longer fit the budget."""
    server_fill: float
    own_fill: float
    report_fill: float
    """Mean ``context().report.utilization`` (corrected / limit), sampled before turns."""
    bad_requests: int
    summary_failures: int
    seconds: float


def long_conversation(folder: Path, turns: int, strategy: str, seed: int) -> LongRun:
    path = folder / f"long-{seed}.db"
    rng = random.Random(seed)
    started = time.perf_counter()
    with (
        ChatServer(window=WINDOW, model=MODEL, reply=chat_reply, keep_requests=None) as server,
        server.client() as client,
        open_memory(path, server, client, strategy=strategy) as memory,
    ):
        conversation = memory.conversation(user=USER, system=SYSTEM, budget=BUDGET)
        history = tokenizer.count_tokens([{"role": "system", "content": SYSTEM}])  # + priming
        first_over: int | None = None
        report_fill: list[float] = []
        for turn in range(turns):
            if first_over is not None and turn % 10 == 0:
                report_fill.append(conversation.context().report.utilization)
            text = sentence(rng)
            reply = conversation.send(text, max_tokens=200)
            # What the whole history would cost, by the server's tokenizer.
            history += tokens({"role": "user", "content": text}) + tokens(reply.message)
            if first_over is None and history > BUDGET:
                first_over = turn
        elapsed = time.perf_counter() - started
        messages = conversation.history()
        bad = [r for r in server.chat_requests if r.status != 200]
        rejections = server.rejections
        engine = sa.create_engine(f"sqlite:///{path}")
        try:
            with engine.connect() as conn:
                usage = conn.execute(
                    sa.text(
                        "SELECT kind, position, prompt_tokens, counted_prompt_tokens, error "
                        "FROM usage WHERE conversation_id = :id ORDER BY id"
                    ),
                    {"id": conversation.id},
                ).all()
        finally:
            engine.dispose()
    # The conversation's own tokens, each message as the server counts it inside a prompt.
    message_tokens = sum(tokens(m) for m in messages)
    summaries = [u for u in usage if u.kind == "summary" and u.error is None]
    failures = [u for u in usage if u.kind == "summary" and u.error is not None]
    chats = [u for u in usage if u.kind == "chat"]
    over = chats[first_over:] if first_over is not None else []
    return LongRun(
        turns=turns,
        summary_calls=len(summaries) + len(failures),
        summary_prompt=sum(u.prompt_tokens or 0 for u in summaries),
        message_tokens=message_tokens,
        over_turns=len(over),
        server_fill=statistics.mean(u.prompt_tokens / BUDGET for u in over) if over else 0.0,
        own_fill=statistics.mean(u.counted_prompt_tokens / BUDGET for u in over) if over else 0.0,
        report_fill=statistics.mean(report_fill) if report_fill else 0.0,
        bad_requests=len(bad) + len(rejections),
        summary_failures=len(failures),
        seconds=elapsed,
    )


def bench_long(folder: Path, turns: int, tuned_turns: int) -> list[Row]:
    run = long_conversation(folder, turns, "summary", seed=1)
    ratio = run.summary_prompt / run.message_tokens
    per_turn = run.summary_calls / run.turns
    rows = [
        Row(f"{run.turns:,} turns, strategy summary (high 0.9, low 0.6)", f"{run.seconds:.0f} s"),
        Row("  conversation's own message tokens (server tokenizer)", f"{run.message_tokens:,}"),
        Row("  summarizer prompt tokens (usage rows, server-reported)", f"{run.summary_prompt:,}"),
        Row("  summarizer input / message tokens", f"{ratio:.2f}x", "<= 1.3x", ratio <= 1.3),
        Row(
            f"  summarizer calls per turn ({run.summary_calls} calls)",
            f"{per_turn:.3f}",
            "<= 0.1",
            per_turn <= 0.1,
        ),
        Row("  summarizer failures", f"{run.summary_failures}"),
        Row(
            f"  budget use, server's count / limit ({run.over_turns} turns over budget)",
            f"{run.server_fill:.1%}",
            ">= 90%",
            run.server_fill >= 0.9,
        ),
        Row("  budget use, our count (report total) / limit", f"{run.own_fill:.1%}"),
        Row("  budget use, report utilization (corrected / limit)", f"{run.report_fill:.1%}"),
        Row(
            "  requests over the window (400s + rejections)",
            f"{run.bad_requests}",
            "0",
            run.bad_requests == 0,
        ),
    ]
    tuned = "summary:high=0.98,low=0.85,tokens=300"
    again = long_conversation(folder, tuned_turns, tuned, seed=2)
    rows += [
        Row(f"{again.turns:,} turns, strategy {tuned}", f"{again.seconds:.0f} s"),
        Row(
            "  budget use, server's count / limit",
            f"{again.server_fill:.1%}",
            "(info)",
        ),
        Row(
            "  summarizer input / message tokens; calls per turn",
            f"{again.summary_prompt / again.message_tokens:.2f}x; "
            f"{again.summary_calls / again.turns:.3f}",
        ),
        Row("  requests over the window", f"{again.bad_requests}"),
    ]
    return rows


# -- 3: engine overhead over a bare SDK call -------------------------------------------------


def export_text(conversation_id: str, count: int, seed: int) -> str:
    rng = random.Random(seed)
    header = {
        "convmem": 1,
        "type": "conversation",
        "id": conversation_id,
        "user": USER,
        "title": None,
        "model": MODEL,
        "system": SYSTEM,
        "settings": {"strategy": "summary", "budget": BUDGET},
        "created_at": WHEN,
        "updated_at": WHEN,
    }
    extra = {"convmem": {"created_at": WHEN}}
    lines = [dumps(header)]
    for position in range(count):
        role = "user" if position % 2 == 0 else "assistant"
        lines.append(dumps({"role": role, "content": sentence(rng), **extra}))
    return "\n".join(lines) + "\n"


def bench_overhead(folder: Path, history: int, runs: int) -> list[Row]:
    rng = random.Random(3)
    texts = [sentence(rng) for _ in range(runs + 20)]
    newest: list[dict[str, Any]] = [{}]

    def reply(body: dict[str, Any]) -> str | None:
        # The server keeps the newest request body (the engine's and the bare call's
        # alike), so neither timed call has to fetch it.
        newest[0] = body
        return chat_reply(body)

    # What a synchronous=FULL commit waits for: one fdatasync of a page just written
    # (SQLite's WAL commit on Linux), in the same folder, timed in the same rounds.
    probe = os.open(folder / "fsync-probe", os.O_CREAT | os.O_RDWR, 0o600)
    sync = getattr(os, "fdatasync", os.fsync)  # macOS has only fsync
    page = bytes(4096)
    os.write(probe, page * 16)
    sync(probe)
    with (
        ChatServer(window=WINDOW, model=MODEL, reply=reply, keep_requests=None) as server,
        server.client() as client,
        open_memory(
            folder / "overhead.db", server, client, strategy="summary", compaction="manual"
        ) as memory,
        open_memory(
            folder / "unindexed.db", server, client, strategy="summary", compaction="manual"
        ) as unindexed_memory,
    ):
        started = time.perf_counter()
        memory.import_conversation(export_text("overhead", history, seed=4))
        loaded = time.perf_counter() - started
        conversation = memory.conversation(id="overhead", user=USER)
        # The same conversation in a store whose full-text index triggers are dropped:
        # what the index's upkeep adds to a turn (information).
        unindexed_memory.import_conversation(export_text("overhead", history, seed=4))
        drop_search_triggers(folder / "unindexed.db")
        unindexed = unindexed_memory.conversation(id="overhead", user=USER)

        def engine_turn(i: int) -> None:
            conversation.send(texts[i])

        def unindexed_turn(i: int) -> None:
            unindexed.send(texts[i])

        def bare_call(i: int) -> None:
            client.chat.completions.create(**newest[0])  # the body the engine just sent

        def disk_sync(i: int) -> None:
            os.pwrite(probe, page, (i % 16) * len(page))
            sync(probe)

        try:
            # The bare call still comes right after each turn it repeats (its body is that
            # turn's), and before the unindexed turn, which would replace it.
            engine, disk, bare, bare_index = alternating(
                (engine_turn, disk_sync, bare_call, unindexed_turn), runs, warmup=5
            )
        finally:
            os.close(probe)
        assert server.rejections == [], server.rejections
        assert all(r.status == 200 for r in server.chat_requests)
        report = conversation.context().report
    median = statistics.median
    m_engine, m_bare, m_sync = median(engine.wall), median(bare.wall), median(disk.wall)
    overhead = m_engine - m_bare
    return [
        Row(f"import {history:,} messages (one transaction)", f"{loaded:.1f} s"),
        Row(f"conv.send, {history:,}-msg history ({report.sent} msgs sent)", ms(m_engine)),
        Row("client.chat.completions.create, same body", ms(m_bare)),
        Row(
            "  engine overhead per turn (median - median)",
            ms(overhead),
            "<= 1 ms",
            overhead <= 0.001,
        ),
        Row("  one fdatasync in the same folder (median; a commit waits for one)", ms(m_sync)),
        Row("  overhead less that fdatasync", ms(overhead - m_sync), "(info)"),
        Row(
            "  main-thread CPU time, send - create (median - median)",
            ms(median(engine.cpu) - median(bare.cpu)),
            "(info)",
        ),
        Row(
            "  overhead without the search index's triggers (wall; CPU)",
            f"{ms(median(bare_index.wall) - m_bare)}; "
            f"{ms(median(bare_index.cpu) - median(bare.cpu))}",
            "(info)",
        ),
    ]


def drop_search_triggers(path: Path) -> None:
    """Drop the triggers that keep the full-text index of ``path`` (migration 0003)."""
    con = sqlite3.connect(path, isolation_level=None)
    try:
        names = con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'messages'"
        ).fetchall()
        for (name,) in names:
            con.execute(f"DROP TRIGGER {name}")
    finally:
        con.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer turns (smoke)")
    args = parser.parse_args(argv)
    register_model(MODEL, window=WINDOW, max_output=MAX_OUTPUT)
    started = time.perf_counter()
    turns = 300 if args.quick else 2_000
    # The same in both: with 20 runs the overhead's median moved by +-0.5 ms from run to run
    # on a busy machine, enough to flip its verdict; 60 more take about 3 seconds.
    runs = 60
    with tempfile.TemporaryDirectory(prefix="convmem-bench-chat-") as name:
        folder = Path(name)
        print(f"{turns:,} turns with the summary strategy ...", file=sys.stderr)
        rows = bench_long(folder, turns, tuned_turns=200 if args.quick else 500)
        print("engine overhead ...", file=sys.stderr)
        rows += bench_overhead(folder, 10_000, runs)
    return print_table(
        f"conversation_memory chat bench ({'quick' if args.quick else 'full'}; ChatServer window "
        f"{WINDOW:,}, max_output {MAX_OUTPUT}, budget {BUDGET:,}; overhead medians of {runs} "
        f"runs; Python {sys.version.split()[0]})",
        rows,
        seconds=time.perf_counter() - started,
    )


if __name__ == "__main__":
    sys.exit(main())
