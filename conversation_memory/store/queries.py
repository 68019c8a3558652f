"""The log's reads on a DBAPI cursor: tail, pinned messages, summaries, entries.

Each function runs fixed statements (``statements``) inside the caller's
transaction and walks a conversation's lineage (see ``walk_lineage``):
a fork reads its own messages, then its parent's up to the fork point, and
so on to the root. Rows become plain values here: ``Item`` and ``Summary``
for what a context is built from, ``Entry`` for whole records.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from conversation_memory.errors import InvalidMessage
from conversation_memory.messages import dumps, from_row
from conversation_memory.store.statements import Statements
from conversation_memory.store.values import ConversationRow, Entry, Head, Segment, Snapshot
from conversation_memory.types import Item, Summary

NO_LIMIT = 2**62
"""A position past any conversation's end."""


def item_of(row: Sequence[Any]) -> Item:
    position, role, content, parts, name, calls, call_id, tokens, pinned, complete = row
    # Positional: this runs for every message read.
    return Item(
        position,
        from_row(role, content, parts, name, calls, call_id),
        tokens,
        bool(pinned),
        bool(complete),
    )


def summary_of(row: Sequence[Any]) -> Summary:
    return Summary(id=row[0], start=row[1], end=row[2], text=row[3], tokens=row[4], level=row[5])


def walk_lineage(
    conversation_id: str,
    forked_from: str | None,
    fork_position: int | None,
    parent_of: Callable[[str], tuple[str | None, int | None] | None],
) -> list[Segment]:
    """Segments from a conversation back to the root of its forks."""
    segments: list[Segment] = [(conversation_id, None)]
    parent, upto = forked_from, fork_position
    limit: int | None = None
    while parent is not None:
        # A fork of a fork sees its grandparent only up to the nearer fork point.
        limit = upto if limit is None or upto is None else min(limit, upto)
        segments.append((parent, limit))
        found = parent_of(parent)
        if found is None:
            break
        parent, upto = found
    return segments


def tail(
    cur: Any,
    sql: Statements,
    segments: Sequence[Segment],
    *,
    tokens: int,
    after: int = -1,
    first_page: int = 32,
    cached: Sequence[tuple[Any, ...]] = (),
) -> tuple[list[Item], bool, list[tuple[Any, ...]]]:
    """The newest messages, oldest first, until they hold more than ``tokens``.

    Stops at position ``after`` (exclusive; e.g. the end of a summary).
    ``cached`` are rows of the newest positions already read (newest first, see
    ``tailcache``): they are used first, and only older ones are fetched.
    Returns the items, whether older messages (past ``after``) remain, and the
    rows used, newest first.
    """
    collected: list[Item] = []
    used: list[tuple[Any, ...]] = []
    total = 0
    page = first_page
    upto: int | None = None
    for row in cached:
        position, role, content, parts, name, calls, call_id, size, pinned, done = row
        if position <= after:
            collected.reverse()
            return collected, False, used
        used.append(row)
        message = from_row(role, content, parts, name, calls, call_id)
        collected.append(Item(position, message, size, bool(pinned), bool(done)))
        total += size
        if total > tokens:
            collected.reverse()
            return collected, collected[0].position > after + 1, used
        upto = position - 1
    for conversation_id, segment_upto in segments:
        if segment_upto is not None:
            upto = segment_upto if upto is None else min(upto, segment_upto)
        while True:
            limit = NO_LIMIT if upto is None else upto
            cur.execute(sql.tail, (conversation_id, limit, after, page))
            # Row by row: the rows past the one that fills the budget are never made
            # into Python objects (the page is an estimate, with slack).
            read = 0
            for row in cur:
                read += 1
                position, role, content, parts, name, calls, call_id, size, pinned, done = row
                used.append(row)
                message = from_row(role, content, parts, name, calls, call_id)
                collected.append(Item(position, message, size, bool(pinned), bool(done)))
                total += size
                if total > tokens:
                    collected.reverse()
                    return collected, collected[0].position > after + 1, used
                upto = position - 1
            if read < page:
                break
            page = min(page * 4, 4096)
    collected.reverse()
    return collected, False, used


def snapshot(  # noqa: PLR0917 - the log's read, split in two
    cur: Any,
    sql: Statements,
    head: Head,
    segments: Sequence[Segment],
    need: int,
    whole_cover: bool,
    overlap: bool,
    cache: Any,
) -> Snapshot:
    """The rest of ``ConversationLog.read`` once the head is read: the newest summary
    (or the whole cover), a tail of ``need`` tokens (reusing the ``TailCache``'s rows),
    and the pinned messages before it."""
    summaries: list[Summary] = []
    if whole_cover:
        summaries = cover(cur, sql, segments)
        summary = summaries[-1] if summaries else None
    else:
        summary = newest_summary(cur, sql, segments)
    after = summary.end if summary is not None else -1
    # Read until the tail alone would overflow: anything older can't fit.
    items, has_older, rows = tail(
        cur,
        sql,
        segments,
        tokens=need,
        after=-1 if overlap else after,
        first_page=head.page_for(need),
        cached=cache.rows(head),
    )
    cache.keep(head, rows)
    has_older = has_older and (not items or items[0].position > after + 1)
    start = items[0].position if items else head.next_position
    pinned = pinned_before(cur, sql, segments, start)
    return Snapshot(head, summary, summaries, items, has_older, pinned)


def pinned_before(
    cur: Any, sql: Statements, segments: Sequence[Segment], position: int
) -> list[Item]:
    """Pinned messages older than ``position``, oldest first."""
    found: list[Item] = []
    for conversation_id, upto in segments:
        limit = position - 1 if upto is None else min(upto, position - 1)
        cur.execute(sql.pinned, (conversation_id, limit))
        found.extend(item_of(row) for row in cur.fetchall())
    found.sort(key=lambda item: item.position)
    return found


def newest_summary(cur: Any, sql: Statements, segments: Sequence[Segment]) -> Summary | None:
    """The summary reaching furthest (highest level first among equals)."""
    best: Summary | None = None
    for conversation_id, upto in segments:
        cur.execute(sql.newest_summary, (conversation_id, NO_LIMIT if upto is None else upto))
        row = cur.fetchone()
        if row is not None and (best is None or row[2] > best.end):
            best = summary_of(row)
    return best


def cover(cur: Any, sql: Statements, segments: Sequence[Segment]) -> list[Summary]:
    """Summaries covering positions 0..n back to back, each reaching as far as any.

    For hierarchical summaries this picks the merged (higher-level)
    summaries for old periods and the fine ones after them; for a rolling
    summary it is just the newest one. One indexed lookup per element.
    """
    cover: list[Summary] = []
    start = 0
    while True:
        best = None
        for conversation_id, upto in segments:
            cur.execute(
                sql.cover_step,
                (conversation_id, start, NO_LIMIT if upto is None else upto),
            )
            row = cur.fetchone()
            if row is not None and (best is None or (row[2], row[5]) > (best[2], best[5])):
                best = row
        if best is None:
            return cover
        cover.append(summary_of(best))
        start = best[2] + 1


def open_calls(
    cur: Any, sql: Statements, segments: Sequence[Segment], before: int
) -> set[str] | None:
    """Unanswered call ids of the tool-calling assistant message just before ``before``.

    Walks back over the run of tool messages; None when no tool-calling
    assistant message precedes that run (a tool message there would be
    orphaned).
    """
    answered: set[str] = set()
    upto = before - 1
    for conversation_id, segment_upto in segments:
        if segment_upto is not None:
            upto = min(upto, segment_upto)
        while True:
            cur.execute(sql.recent, (conversation_id, upto, 16))
            rows = cur.fetchall()
            for position, role, calls, call_id in rows:
                if role == "tool":
                    answered.add(call_id)
                    upto = position - 1
                    continue
                if role == "assistant" and calls is not None:
                    return {call["id"] for call in json.loads(calls)} - answered
                return None
            if len(rows) < 16:
                break
    return None


def entries(
    cur: Any,
    sql: Statements,
    segments: Sequence[Segment],
    *,
    first: int = 0,
    last: int | None = None,
    time: Callable[[Any], datetime],
) -> list[Entry]:
    """Stored messages oldest first, positions ``first..last``."""
    found: list[Entry] = []
    for conversation_id, upto in reversed(segments):
        limit = NO_LIMIT if upto is None else upto
        if last is not None:
            limit = min(limit, last)
        cur.execute(sql.entries, (conversation_id, limit, first))
        for row in cur.fetchall():
            position, role, content, parts, name, calls, call_id, tokens, pinned, done = row[:10]
            meta = row[11]
            found.append(
                Entry(
                    position=position,
                    message=from_row(role, content, parts, name, calls, call_id),
                    tokens=tokens,
                    created_at=time(row[10]),
                    pinned=bool(pinned),
                    complete=bool(done),
                    metadata=json.loads(meta) if meta is not None else None,
                )
            )
    return found


def check_answer(open_calls: set[str] | None, row: dict[str, Any], conversation_id: str) -> None:
    call_id = row["tool_call_id"]
    if open_calls is not None and call_id in open_calls:
        return
    raise InvalidMessage(
        f"tool message answers call {call_id!r}, but "
        + (
            "the messages before it have no tool call waiting for an answer"
            if not open_calls
            else f"the open calls are {sorted(open_calls)}"
        )
        + "; append the assistant message with that tool_call first",
        field="tool_call_id",
        conversation_id=conversation_id,
    )


def prefix_totals(
    cur: Any, sql: Statements, segments: Sequence[Segment], at: int
) -> tuple[int, int]:
    """Message count and tokens of positions ``0..at`` over a lineage (a fork's start)."""
    count = tokens = 0
    if at >= 0:
        for conversation_id, upto in segments:
            cur.execute(sql.prefix_totals, (conversation_id, at if upto is None else min(upto, at)))
            found = cur.fetchone()
            count, tokens = count + found[0], tokens + int(found[1])
    return count, tokens


def insert_row(
    cur: Any, sql: Statements, row: ConversationRow, stamp: Callable[[datetime], Any]
) -> None:
    """Insert a conversation's row."""
    cur.execute(
        sql.insert_row,
        (
            row.id,
            row.user_id,
            row.title,
            row.model,
            row.system,
            row.system_tokens,
            row.counter,
            dumps(row.settings),
            stamp(row.created_at),
            stamp(row.updated_at),
            row.forked_from,
            row.fork_position,
            row.next_position,
            row.message_count,
            row.total_tokens,
            row.key,
        ),
    )


def create(cur: Any, sql: Statements, row: ConversationRow, stamp: Any) -> str:
    """Insert a new conversation's row unless it is stored (by id, or by its user's
    key); the id of the conversation that now holds it (another's, for a key that
    another process stored first: PostgreSQL's insert waited for that commit,
    SQLite's writers take turns)."""
    cur.execute(
        sql.create,
        (
            row.id,
            row.user_id,
            row.title,
            row.model,
            row.system,
            row.system_tokens,
            row.counter,
            dumps(row.settings),
            stamp,
            stamp,
            row.key,
        ),
    )
    if cur.rowcount or row.key is None:
        return row.id
    cur.execute(sql.keyed, (row.user_id, row.key))
    return str(cur.fetchone()[0])


def delete(cur: Any, sql: Statements, row: ConversationRow) -> None:
    """Delete a conversation and what derives from it; each fork of it first gets the
    messages (and summaries) it shares with it, and points past it to its parent."""
    cur.execute(sql.forks_of, (row.id,))
    for child_id, upto in cur.fetchall():
        cur.execute(sql.copy_messages, (child_id, row.id, upto))
        cur.execute(sql.copy_summaries, (child_id, row.id, upto))
        position = None if row.fork_position is None else min(upto, row.fork_position)
        cur.execute(sql.repoint_fork, (row.forked_from, position, child_id))
    for statement in sql.delete:
        cur.execute(statement, (row.id,))
