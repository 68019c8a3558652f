"""Reciprocal-rank fusion: one ranking made of several (pure).

Lexical search ranks by BM25 or cover density, vector search by cosine
similarity; the two scores share no scale, so they are not added. Their
ranks are: each list gives an item ``1 / (k + rank)`` (rank from 1), and
items are ordered by the sum (Cormack, Clarke and Büttcher, SIGIR 2009). An
item found by both lists beats one found by a single list at the same rank;
``k`` (60 in the paper, and here) damps the weight of the very first places.
Ties keep the order in which items were first met, lexical list first, so
the result is deterministic.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import TypeVar

from conversation_memory.errors import ConfigurationError

K = TypeVar("K", bound=Hashable)

RRF_K = 60
"""The damping constant of the original paper."""


def fuse(*rankings: Iterable[K], k: int = RRF_K) -> list[tuple[K, float]]:
    """Fuse rankings (best first, each item once per list) into one, best first.

    Returns ``(item, score)`` pairs, the score being the sum over the lists of
    ``1 / (k + rank)``. An item repeated within one list counts at its first
    (best) rank only.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigurationError(f"k must be a whole number of 0 or more, got {k!r}")
    scores: dict[K, float] = {}
    for ranking in rankings:
        seen: set[K] = set()
        for rank, item in enumerate(ranking, start=1):
            if item in seen:
                continue
            seen.add(item)
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    # sorted() is stable: equal scores stay in the order first met.
    return sorted(scores.items(), key=lambda pair: -pair[1])


__all__ = ["RRF_K", "fuse"]
