"""Local model bench: from nothing running to the first answer, through the library's own path.

    python bench/bench_local.py            # 3 cold starts, median and worst reported
    python bench/bench_local.py --runs 1   # a single start

What a user of ``convmem chat`` without an API key waits for: each run starts
a :class:`conversation_memory.local.LocalServer` (a new child process that
imports xllamacpp, loads SmolLM2-135M-Instruct and opens llama.cpp's HTTP
server), opens a fresh SQLite ``Memory`` on it, and sends one short message
through ``Conversation.send`` (max_tokens 48, temperature 0): the figure is
the wall time from constructing the server to the stored reply, target
<= 10 s. The package is installed and warm (the GGUF file in the OS page
cache after the first run); importing ``conversation_memory`` in this
process is measured apart, since the CLI pays it before anything else.

Printed beside it: the server start alone (process start to ``/health`` OK),
the first answer after the start, and llama.cpp's own prompt and generation
speeds (its ``timings``, from one extra 128-token answer to a ~300-token
prompt) with the number of threads the server used.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import_started = time.perf_counter()
import conversation_memory  # noqa: E402 - timed on purpose
from conversation_memory import Memory  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - import_started

from _measure import Row, print_table  # noqa: E402

from conversation_memory.local import LOCAL_MODEL, LOCAL_SYSTEM, LocalServer  # noqa: E402

TARGET_SECONDS = 10.0
MESSAGE = "Hello! In one sentence, what can you help me with?"
SPEED_PROMPT = (
    "Here are my notes from this week. The bakery on the corner opens at six, the train "
    "to the coast leaves at eleven fifteen, and the chess club meets on Thursdays. "
) * 8


def one_run(folder: Path, n: int) -> tuple[float, float, float, dict[str, float], int]:
    """(to first answer, server start, answer after start, llama.cpp timings, threads)."""
    started = time.perf_counter()
    server = LocalServer()
    with server:
        up = time.perf_counter()
        with (
            server.client() as client,
            Memory(folder / f"run{n}.db", client=client, model=LOCAL_MODEL) as memory,
        ):
            chat = memory.conversation(system=LOCAL_SYSTEM)
            reply = chat.send(MESSAGE, max_tokens=48, temperature=0, seed=1)
            answered = time.perf_counter()
            assert reply.text.strip(), "the local model answered nothing"
            timed = client.chat.completions.create(
                model=LOCAL_MODEL,
                messages=[
                    {"role": "system", "content": LOCAL_SYSTEM},
                    {"role": "user", "content": f"{n} {SPEED_PROMPT}"},
                ],
                max_tokens=128,
                temperature=0,
                extra_body={"ignore_eos": True},  # always 128 tokens: a steady figure
            )
            timings = (timed.model_extra or {}).get("timings") or {}
        assert server.startup_seconds is not None
        return answered - started, server.startup_seconds, answered - up, timings, server.threads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="cold starts to measure")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    first: list[float] = []
    start: list[float] = []
    answer: list[float] = []
    prompt_speed: list[float] = []
    gen_speed: list[float] = []
    threads = 0
    with tempfile.TemporaryDirectory(prefix="convmem-bench-local-") as name:
        for n in range(args.runs):
            print(f"run {n + 1}/{args.runs} ...", file=sys.stderr)
            total, up, after, timings, threads = one_run(Path(name), n)
            first.append(total)
            start.append(up)
            answer.append(after)
            prompt_speed.append(timings.get("prompt_per_second", float("nan")))
            gen_speed.append(timings.get("predicted_per_second", float("nan")))

    def seconds(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} s (worst {max(values):.2f})"

    rows = [
        Row(
            "first answer: LocalServer() to the stored reply of send()",
            seconds(first),
            f"<= {TARGET_SECONDS:g} s",
            max(first) <= TARGET_SECONDS,
        ),
        Row("  server start: process start to /health OK", seconds(start)),
        Row("  first send() after the start (48 tokens max)", seconds(answer)),
        Row(
            f"llama.cpp prompt speed ({threads} thread{'s' if threads > 1 else ''})",
            f"{statistics.median(prompt_speed):.0f} tokens/s",
        ),
        Row(
            f"llama.cpp generation speed ({threads} thread{'s' if threads > 1 else ''})",
            f"{statistics.median(gen_speed):.0f} tokens/s",
        ),
        Row("import conversation_memory (once, before any run)", f"{IMPORT_SECONDS:.2f} s"),
    ]
    return print_table(
        f"conversation_memory local model bench ({LOCAL_MODEL}, {args.runs} cold start"
        f"{'s' if args.runs > 1 else ''}, conversation_memory {conversation_memory.__version__}, "
        f"Python {sys.version.split()[0]})",
        rows,
        seconds=time.perf_counter() - started,
    )


if __name__ == "__main__":
    sys.exit(main())
