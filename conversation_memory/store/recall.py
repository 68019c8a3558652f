"""Candidates for recall: the earlier whole turns that best match a query.

:func:`candidates` is the one place a recalling strategy's candidates are
found: a full-text search of the conversation's lineage below
``query.before`` (``store.search``), then, around each hit, the whole turn it
belongs to: from the user message at or before it up to the next user
message (a tool call stays with its results). It runs inside the caller's
read transaction (the snapshot the rest of the state is read in), reads only
the index and a bounded window of rows around the few best hits, and writes
nothing. A second source of candidates (a query vector, fused with the words'
ranking) would join here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

from conversation_memory.store.queries import NO_LIMIT, item_of
from conversation_memory.store.search import search_lineage
from conversation_memory.store.statements import Statements
from conversation_memory.store.values import Segment
from conversation_memory.types import Item, RecallQuery

__all__ = ["WINDOW", "candidates"]

WINDOW = 16
"""Messages read on each side of a hit to find its turn; a turn longer than that
(a long tool loop) is not recalled."""


def candidates(
    conn: Connection,
    cur: Any,
    sql: Statements,
    segments: Sequence[Segment],
    query: RecallQuery,
) -> tuple[tuple[float, tuple[Item, ...]], ...]:
    """The best whole turns for ``query``, best first, each with its search score.

    Hits whose words were too common to rank (score 0) say nothing about the
    question and are left out; several hits in one turn bring it back once.
    ``cur`` is a DBAPI cursor in the same transaction as ``conn``.
    """
    if query.before <= 0:
        return ()
    hits = search_lineage(conn, segments, query.text, before=query.before, limit=2 * query.limit)
    found: list[tuple[float, tuple[Item, ...]]] = []
    seen: set[int] = set()
    for hit in hits:
        if hit.score <= 0 or hit.position in seen:
            continue
        turn = _turn_around(cur, sql, segments, hit.position, query.before)
        if turn is None:
            continue
        seen.update(item.position for item in turn)
        found.append((hit.score, turn))
        if len(found) == query.limit:
            break
    return tuple(found)


def _turn_around(
    cur: Any, sql: Statements, segments: Sequence[Segment], position: int, before: int
) -> tuple[Item, ...] | None:
    """The whole turn holding ``position``, all of it below ``before`` (None: not found
    within :data:`WINDOW` messages, or it does not start with a user message)."""
    low, high = max(0, position - WINDOW), min(before - 1, position + WINDOW)
    rows: list[Item] = []
    for conversation_id, upto in segments:
        limit = high if upto is None else min(high, upto)
        if limit < low:
            continue
        cur.execute(sql.tail, (conversation_id, limit, low - 1, NO_LIMIT))
        rows.extend(item_of(row) for row in cur.fetchall())
    rows.sort(key=lambda item: item.position)
    at = next((n for n, item in enumerate(rows) if item.position == position), None)
    if at is None:
        return None
    start = at
    while rows[start].message.get("role") != "user":
        start -= 1
        if start < 0:
            return None  # no question within the window (or none at all)
    end = at + 1
    while end < len(rows) and rows[end].message.get("role") != "user":
        end += 1
    if end == len(rows) and high < before - 1:
        return None  # the turn goes on past the window
    return tuple(rows[start:end])
