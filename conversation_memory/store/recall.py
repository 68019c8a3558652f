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

from conversation_memory.store.queries import item_of
from conversation_memory.store.search import search_lineage
from conversation_memory.store.statements import Statements
from conversation_memory.store.values import Segment
from conversation_memory.types import Item, RecallQuery

__all__ = ["WINDOW", "candidates"]

WINDOW = 16
"""Messages looked at on each side of a hit to find its turn; a turn longer than that
(a long tool loop) is not recalled. Only the turn's own rows (and the next question)
are made into items."""


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
    hits = search_lineage(
        conn, segments, query.text, before=query.before, limit=query.limit + 2, ranked_only=True
    )
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
    """The whole turn holding ``position``, all of it below ``before`` (None: its start or
    end is more than :data:`WINDOW` messages away, or it has no user message)."""
    older: list[Item] = []  # from ``position`` back to the question, newest first
    for conversation_id, upto in segments:  # newest segment first: positions descend
        limit = position if upto is None else min(position, upto)
        if limit < position - WINDOW:
            continue
        cur.execute(sql.tail, (conversation_id, limit, position - WINDOW - 1, WINDOW + 1))
        for row in cur:  # row by row: the rest of the window is never read
            older.append(item_of(row))
            if older[-1].message.get("role") == "user":
                break
        if older and older[-1].message.get("role") == "user":
            break
    if not older or older[0].position != position or older[-1].message.get("role") != "user":
        return None
    newer: list[Item] = []  # after ``position`` up to the next question, oldest first
    high = min(before - 1, position + WINDOW)
    for conversation_id, upto in reversed(segments):  # oldest segment first: positions ascend
        limit = high if upto is None else min(high, upto)
        if limit <= position:
            continue
        cur.execute(sql.entries, (conversation_id, limit, position + 1))
        for row in cur:
            item = item_of(row[:10])
            if item.message.get("role") == "user":
                return (*reversed(older), *newer)
            newer.append(item)
    if high < before - 1:
        return None  # the turn goes on past the window
    return (*reversed(older), *newer)
