"""What the bench scripts share: timing two things alternately, and the result table."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class Row:
    """One line of a bench table; ``ok`` is None for a figure without a target."""

    name: str
    value: str
    target: str = ""
    ok: bool | None = None


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


@dataclass
class Timings:
    """One timed function's runs, in seconds."""

    wall: list[float]
    cpu: list[float]
    """``time.thread_time()`` of the timing thread: its own work, without waits (disk,
    network, other threads, other processes), so it holds still on a busy machine."""


def alternating(
    functions: Sequence[Callable[[int], object]], runs: int, warmup: int
) -> list[Timings]:
    """Time ``f(i)`` for each function in turn, round after round, so drift hits all alike."""
    for i in range(warmup):
        for function in functions:
            function(i)
    timings = [Timings([], []) for _ in functions]
    clock, cpu_clock = time.perf_counter, time.thread_time
    for i in range(warmup, warmup + runs):
        for function, timing in zip(functions, timings, strict=True):
            cpu_start = cpu_clock()
            start = clock()
            function(i)
            end = clock()
            timing.cpu.append(cpu_clock() - cpu_start)
            timing.wall.append(end - start)
    return timings


def interleaved(
    a: Callable[[int], object], b: Callable[[int], object], runs: int, warmup: int
) -> tuple[list[float], list[float]]:
    """Time ``a(i)`` and ``b(i)`` alternately, so drift hits both; both lists of seconds."""
    first, second = alternating((a, b), runs, warmup)
    return first.wall, second.wall


def print_table(title: str, rows: list[Row], *, seconds: float) -> int:
    """Print the figures with PASS/FAIL against their targets, under ``title``; return the
    exit status (1 when a target fails)."""
    width = max(len(row.name) for row in rows)
    vwidth = max(len(row.value) for row in rows)
    print(title)
    print(f"{'measure':<{width}}  {'value':>{vwidth}}  {'target':<8}  result")
    print("-" * (width + vwidth + 20))
    for row in rows:
        verdict = "" if row.ok is None else ("PASS" if row.ok else "FAIL")
        print(f"{row.name:<{width}}  {row.value:>{vwidth}}  {row.target:<8}  {verdict}")
    print(f"(total {seconds:.0f} s)")
    return 0 if all(row.ok is not False for row in rows) else 1
