"""The strategy lab's speed: a long generated conversation through 3 strategies × 2 budgets.

    python bench/bench_lab.py            # 500 turns (about 30-40 s on the 2-core machine)
    python bench/bench_lab.py --quick    # 100 turns, a smoke run
    python bench/bench_lab.py --twice    # also rerun and check the results are identical

It runs exactly what ``convmem lab --generate --turns 500 -s truncate -s summary
-s hierarchical -b 1000 -b 4000`` runs: ``conversation_memory.lab.run`` in
replay mode against the lab's deterministic model on an in-process
``ChatServer`` (real HTTP through the ``openai`` SDK), each strategy × budget
replayed in its own conversation on a temporary SQLite file (WAL,
``synchronous=FULL``: one fsync per turn), summaries and probe answers from the
server, plus the full-history baseline (its probes send the whole history).
The target is on the whole run, baseline included: <= 60 s.
"""

from __future__ import annotations

import argparse
import sys
import time

from _measure import Row, print_table

from conversation_memory import lab

STRATEGIES = ("truncate", "summary", "hierarchical")
BUDGETS = (1000, 4000)
MODEL = "gpt-4o-mini"
TARGET_SECONDS = 60.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 turns instead of 500 (smoke)")
    parser.add_argument("--twice", action="store_true", help="rerun and compare the results")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    turns = 100 if args.quick else 500
    transcript = lab.generate(turns, seed=args.seed)
    started = time.perf_counter()
    print(
        f"{turns} turns × {len(STRATEGIES)} strategies × {len(BUDGETS)} budgets ...",
        file=sys.stderr,
    )
    began = time.perf_counter()
    results = lab.run(transcript, strategies=STRATEGIES, budgets=BUDGETS, model=MODEL)
    wall = time.perf_counter() - began
    replayed = sum(r.turns for r in results.runs if not r.baseline)
    strategies_only = sum(v for k, v in results.timing.items() if k not in ("total", lab.BASELINE))
    rows = [
        Row(
            f"whole lab run: {turns} turns × 3 × 2 + baseline",
            f"{wall:.1f} s",
            f"<= {TARGET_SECONDS:.0f} s",
            wall <= TARGET_SECONDS,
        ),
        Row("  the 6 strategy × budget runs", f"{strategies_only:.1f} s"),
        Row("  the full-history baseline", f"{results.timing[lab.BASELINE]:.1f} s"),
        Row("  turns replayed per second (6 runs)", f"{replayed / strategies_only:.0f}"),
    ]
    for run in results.runs:
        rows.append(
            Row(
                f"  {run.label}: seconds · mean tokens/turn · summarizer calls · evidence "
                "retained · recall",
                f"{results.timing[run.label]:.1f} · {run.tokens_mean:,.0f} · "
                f"{run.summary_calls} · {run.retention_shown} · {run.recall_shown}",
                "no error" if run.error is None else "(error)",
                run.error is None or None,
            )
        )
    if args.twice:
        again = lab.run(transcript, strategies=STRATEGIES, budgets=BUDGETS, model=MODEL)
        same = again.to_json() == results.to_json()
        rows.append(Row("rerun gives identical results.json", "yes" if same else "NO", "yes", same))
    return print_table(
        f"conversation_memory lab bench ({'quick' if args.quick else 'full'}; generate("
        f"{turns}, seed={args.seed}), model {MODEL} counted with tiktoken, replay mode, "
        f"test backend; Python {sys.version.split()[0]})",
        rows,
        seconds=time.perf_counter() - started,
    )


if __name__ == "__main__":
    sys.exit(main())
