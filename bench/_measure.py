"""What the bench scripts share: timing two things alternately, and the result table."""

from __future__ import annotations

import time
from collections.abc import Callable
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


def interleaved(
    a: Callable[[int], object], b: Callable[[int], object], runs: int, warmup: int
) -> tuple[list[float], list[float]]:
    """Time ``a(i)`` and ``b(i)`` alternately, so drift hits both; both lists of seconds."""
    for i in range(warmup):
        a(i)
        b(i)
    times_a: list[float] = []
    times_b: list[float] = []
    clock = time.perf_counter
    for i in range(warmup, warmup + runs):
        start = clock()
        a(i)
        times_a.append(clock() - start)
        start = clock()
        b(i)
        times_b.append(clock() - start)
    return times_a, times_b


def print_table(title: str, rows: list[Row], *, seconds: float) -> None:
    """The figures with PASS/FAIL against their targets, under ``title``."""
    width = max(len(row.name) for row in rows)
    vwidth = max(len(row.value) for row in rows)
    print(title)
    print(f"{'measure':<{width}}  {'value':>{vwidth}}  {'target':<8}  result")
    print("-" * (width + vwidth + 20))
    for row in rows:
        verdict = "" if row.ok is None else ("PASS" if row.ok else "FAIL")
        print(f"{row.name:<{width}}  {row.value:>{vwidth}}  {row.target:<8}  {verdict}")
    print(f"(total {seconds:.0f} s)")
