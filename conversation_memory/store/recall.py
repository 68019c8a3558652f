"""Candidates for recall: the earlier whole turns that best match a query.

:func:`candidates` is the one place a recalling strategy's candidates are
found: a full-text search of the conversation's lineage below
``query.before`` (``store.search``, ranked hits only), then, around the hits,
the whole turns they belong to: from the user message at or before a hit up
to the next user message (a tool call stays with its results). It runs
inside the caller's read transaction (the snapshot the rest of the state is
read in), reads the index and one bounded window of rows around each of the
few best hits (one statement per lineage segment for all of them), and
writes nothing. When the query carries a vector (the question embedded) and
the store has vectors, the hits are those of the fused search
(``store.vectors.fused_search``): the words' ranking and the messages nearest
the vector, at least ``query.min_similarity`` similar, by reciprocal rank. A
message without a vector yet is still found by its words.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, text

from conversation_memory.store.queries import item_of
from conversation_memory.store.search import search_lineage
from conversation_memory.store.values import Segment
from conversation_memory.store.vectors import VectorStore, fused_search
from conversation_memory.types import Item, RecallQuery

__all__ = ["WINDOW", "candidates"]

WINDOW = 16
"""Messages read on each side of a hit to find its turn; a turn longer than that
(a long tool loop) is not recalled."""

_COLUMNS = (
    "position, role, content, parts, name, tool_calls, tool_call_id, tokens, pinned, complete"
)


def candidates(
    conn: Connection,
    segments: Sequence[Segment],
    query: RecallQuery,
    vectors: VectorStore | None = None,
) -> tuple[tuple[float, tuple[Item, ...]], ...]:
    """The best whole turns for ``query``, best first, each with its score (the
    words' search score; the fused score when a vector took part).

    Only ranked hits count (words too common to rank say nothing about the
    question); several hits in one turn bring it back once.
    """
    if query.before <= 0:
        return ()
    hits = _hits(conn, segments, query, vectors)
    if not hits:
        return ()
    rows = _near(conn, segments, [position for _, position in hits], query.before)
    found: list[tuple[float, tuple[Item, ...]]] = []
    seen: set[int] = set()
    for score, position in hits:
        if position in seen:
            continue
        turn = _turn_around(rows, position, query.before)
        if turn is None:
            continue
        seen.update(item.position for item in turn)
        found.append((score, turn))
        if len(found) == query.limit:
            break
    return tuple(found)


def _hits(
    conn: Connection, segments: Sequence[Segment], query: RecallQuery, vectors: VectorStore | None
) -> list[tuple[float, int]]:
    """The messages that match ``query`` best, as (score, position), best first."""
    limit = query.limit + 2
    if vectors is None or query.vector is None or query.model is None:
        hits = search_lineage(
            conn, segments, query.text, before=query.before, limit=limit, ranked_only=True
        )
        return [(hit.score, hit.position) for hit in hits if hit.score > 0]
    fused = fused_search(
        conn,
        vectors,
        segments,
        query.text,
        model=query.model,
        query=query.vector,
        before=query.before,
        limit=limit,
        min_similarity=query.min_similarity,
        ranked_only=True,
    )
    return [
        (each.score, each.position)
        for each in fused
        if each.similarity is not None or (each.hit is not None and each.hit.score > 0)
    ]


def _near(
    conn: Connection, segments: Sequence[Segment], positions: Sequence[int], before: int
) -> dict[int, Item]:
    """The stored messages within :data:`WINDOW` of each of ``positions``, below ``before``:
    one statement, a range scan of the (conversation, position) index per window and
    lineage segment."""
    parts, params = [], {}
    for n, (conversation_id, upto) in enumerate(segments):
        params[f"c{n}"] = conversation_id
        top = before - 1 if upto is None else min(upto, before - 1)
        for m, position in enumerate(positions):
            low, high = max(0, position - WINDOW), min(top, position + WINDOW)
            if low <= high:
                params[f"lo{n}_{m}"], params[f"hi{n}_{m}"] = low, high
                parts.append(
                    f"SELECT {_COLUMNS} FROM messages WHERE conversation_id = :c{n} "
                    f"AND position BETWEEN :lo{n}_{m} AND :hi{n}_{m}"
                )
    if not parts:
        return {}
    return {row[0]: item_of(row) for row in conn.execute(text(" UNION ".join(parts)), params)}


def _turn_around(rows: dict[int, Item], position: int, before: int) -> tuple[Item, ...] | None:
    """The whole turn holding ``position`` from ``rows`` (None: its question or its end
    is not among the rows read, or the turn has no user message)."""
    start = position
    while start in rows and rows[start].message.get("role") != "user":
        start -= 1
    if start not in rows:
        return None
    end = position + 1
    while end in rows and rows[end].message.get("role") != "user":
        end += 1
    if end not in rows and end < before:
        return None  # the turn goes on past the window
    return tuple(rows[p] for p in range(start, end))
