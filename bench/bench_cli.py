"""``convmem`` as a user runs it: ``sessions`` over 10,000 conversations, and the
first answer of ``convmem chat`` on the local model.

The conversations are written through the library (``Memory.conversation``
plus one appended turn each, in batches) into a temporary SQLite file; then
the installed ``convmem`` script is run as a subprocess, so interpreter
start-up and imports are part of the figure, exactly as a user waits for it.
The baseline, measured in the same run, is ``python -c pass``: the floor any
Python command pays.

The first local answer: ``convmem chat --new`` with no API key, a question
piped on stdin, timed from process start to the first byte of the reply on
stdout (interpreter start, imports, starting the llama.cpp server and loading
the model included); medians of 3 (warm install: the files are in the page
cache after the first run, which is not counted).

    python bench/bench_cli.py            # 10,000 conversations, 7 runs per figure
    python bench/bench_cli.py --quick    # 2,000 conversations, 3 runs
    python bench/bench_cli.py --no-local # skip the local model figure
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import Row, print_table

from conversation_memory import Memory

TARGET_SECONDS = 1.0
FIRST_ANSWER_TARGET = 10.0


def fill(path: Path, count: int) -> None:
    with Memory(path) as memory:
        for i in range(count):
            conversation = memory.conversation(
                user=f"user{i % 50}", title=f"conversation {i}", system="You are helpful."
            )
            conversation.extend(
                [
                    {"role": "user", "content": f"question {i}"},
                    {"role": "assistant", "content": f"answer {i}"},
                ]
            )


def timed(command: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_local_answer(folder: Path) -> tuple[float, float]:
    """Seconds to the first reply byte and to the end of the chat, one run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CONVMEM_"))}
    command = [str(Path(sys.executable).with_name("convmem")), "chat", "--new"]
    command += ["--db", str(folder / "local.db")]
    start = time.perf_counter()
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert process.stdin is not None
    assert process.stdout is not None
    process.stdin.write(b"What is the capital of France?\n")
    process.stdin.close()
    first = process.stdout.read(1)
    answered = time.perf_counter() - start
    process.stdout.read()
    if process.wait() != 0 or not first:
        raise SystemExit(f"convmem chat failed: {process.stderr.read().decode()[-2000:]}")
    return answered, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-local", action="store_true", help="skip the local model figure")
    args = parser.parse_args()
    began = time.perf_counter()
    count, runs = (2_000, 3) if args.quick else (10_000, 7)
    convmem = str(Path(sys.executable).with_name("convmem"))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sessions.db"
        start = time.perf_counter()
        fill(path, count)
        filled = time.perf_counter() - start
        floor = timed([sys.executable, "-c", "pass"], runs)
        page = timed([convmem, "sessions", "--db", str(path)], runs)
        everything = timed([convmem, "sessions", "--db", str(path), "--all", "--json"], runs)
        one_user = timed([convmem, "sessions", "--db", str(path), "--user", "user7"], runs)
        local = None
        if not args.no_local:
            first_local_answer(Path(folder))  # warm the page cache; not counted
            runs_local = [first_local_answer(Path(folder)) for _ in range(3)]
            local = (
                statistics.median(r[0] for r in runs_local),
                statistics.median(r[1] for r in runs_local),
            )
    rows = [
        Row("conversations stored", f"{count:,} (written in {filled:.1f} s)"),
        Row("python -c pass (floor)", f"{floor:.3f} s"),
        Row(
            "convmem sessions (newest 50 + count)",
            f"{page:.3f} s",
            f"<= {TARGET_SECONDS:.0f} s",
            page <= TARGET_SECONDS,
        ),
        Row(
            "convmem sessions --all --json",
            f"{everything:.3f} s",
            f"<= {TARGET_SECONDS:.0f} s",
            everything <= TARGET_SECONDS,
        ),
        Row("convmem sessions --user (1 of 50 users)", f"{one_user:.3f} s"),
    ]
    if local is not None:
        rows += [
            Row(
                "convmem chat, local model: first reply byte",
                f"{local[0]:.2f} s",
                f"<= {FIRST_ANSWER_TARGET:.0f} s",
                local[0] <= FIRST_ANSWER_TARGET,
            ),
            Row("  whole one-message chat, server stopped", f"{local[1]:.2f} s"),
        ]
    return print_table(
        f"convmem sessions over {count:,} conversations (medians of {runs})",
        rows,
        seconds=time.perf_counter() - began,
    )


if __name__ == "__main__":
    sys.exit(main())
