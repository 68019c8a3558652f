"""Every query the engine runs, as SQLAlchemy Core on a caller's connection.

The caller owns the transaction (see ``Database.read`` / ``Database.write``);
these functions only read and write rows. Core rather than the ORM because
this is the hot path: appending a message is two statements, and building a
context reads the conversation row, the newest summary and a bounded tail
through indexes, never the whole history.

Forks share their parent's messages: a conversation's *lineage* is a list of
segments ``(conversation_id, last_position)`` from itself back to the root,
and reads walk the segments newest first.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, delete, func, insert, literal, or_, select, update

from conversation_memory.messages import from_row
from conversation_memory.store.schema import (
    calibrations,
    conversations,
    messages,
    summaries,
    usage,
)
from conversation_memory.types import Item, Summary

Segment = tuple[str, int | None]
"""A conversation id and the last position read from it (None: its own end)."""


def now() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime) -> datetime:
    """SQLite hands datetimes back without a zone; they were stored as UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class ConversationRow:
    id: str
    user_id: str
    title: str | None
    model: str
    system: str | None
    system_tokens: int
    counter: str
    settings: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    forked_from: str | None
    fork_position: int | None
    next_position: int
    message_count: int
    total_tokens: int


_CONVERSATION_COLUMNS = [getattr(conversations.c, f) for f in ConversationRow.__slots__]


def _conversation(row: Any) -> ConversationRow:
    values = dict(row._mapping)
    values["settings"] = json.loads(values["settings"])
    values["created_at"] = aware(values["created_at"])
    values["updated_at"] = aware(values["updated_at"])
    return ConversationRow(**values)


def insert_conversation(conn: Connection, values: Mapping[str, Any]) -> None:
    conn.execute(insert(conversations).values(**values))


def get_conversation(conn: Connection, conversation_id: str, user: str) -> ConversationRow | None:
    row = conn.execute(
        select(*_CONVERSATION_COLUMNS).where(
            conversations.c.id == conversation_id, conversations.c.user_id == user
        )
    ).first()
    return None if row is None else _conversation(row)


def conversation_exists(conn: Connection, conversation_id: str) -> bool:
    found = conn.execute(
        select(conversations.c.id).where(conversations.c.id == conversation_id)
    ).first()
    return found is not None


def list_conversations(
    conn: Connection, user: str | None, *, limit: int | None = None
) -> list[ConversationRow]:
    query = select(*_CONVERSATION_COLUMNS).order_by(
        conversations.c.updated_at.desc(), conversations.c.id.desc()
    )
    if user is not None:
        query = query.where(conversations.c.user_id == user)
    if limit is not None:
        query = query.limit(limit)
    return [_conversation(row) for row in conn.execute(query)]


def lineage(conn: Connection, row: ConversationRow) -> list[Segment]:
    """Segments from this conversation back to the root of its forks."""
    segments: list[Segment] = [(row.id, None)]
    parent, upto = row.forked_from, row.fork_position
    while parent is not None:
        segments.append((parent, upto))
        found = conn.execute(
            select(conversations.c.forked_from, conversations.c.fork_position).where(
                conversations.c.id == parent
            )
        ).first()
        if found is None:
            break
        parent, upto = found
    return segments


# -- appending ---------------------------------------------------------------


def claim_position(
    conn: Connection, conversation_id: str, user: str, tokens: int, when: datetime
) -> int | None:
    """Reserve the next position, updating the running totals (None: no such conversation).

    The UPDATE takes the conversation row's write lock, so concurrent appends
    to one conversation queue here on PostgreSQL too; positions stay unique
    and gap-free because a rolled-back append also rolls back its claim.
    """
    found = conn.execute(
        update(conversations)
        .where(conversations.c.id == conversation_id, conversations.c.user_id == user)
        .values(
            next_position=conversations.c.next_position + 1,
            message_count=conversations.c.message_count + 1,
            total_tokens=conversations.c.total_tokens + tokens,
            updated_at=when,
        )
        .returning(conversations.c.next_position)
    ).first()
    return None if found is None else found[0] - 1


def insert_messages(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    conn.execute(insert(messages), list(rows))


# -- reading -------------------------------------------------------------------

_ITEM_COLUMNS = (
    messages.c.position,
    messages.c.role,
    messages.c.content,
    messages.c.parts,
    messages.c.name,
    messages.c.tool_calls,
    messages.c.tool_call_id,
    messages.c.tokens,
    messages.c.pinned,
    messages.c.complete,
)


def _item(row: Any) -> Item:
    position, role, content, parts, name, calls, call_id, tokens, pinned, complete = row
    return Item(
        position=position,
        message=from_row(role, content, parts, name, calls, call_id),
        tokens=tokens,
        pinned=bool(pinned),
        complete=bool(complete),
    )


def _segment_filter(segment: Segment, below: int | None = None) -> Any:
    conversation_id, upto = segment
    clauses = [messages.c.conversation_id == conversation_id]
    if upto is not None:
        clauses.append(messages.c.position <= upto)
    if below is not None:
        clauses.append(messages.c.position < below)
    return and_(*clauses)


def tail(
    conn: Connection,
    segments: Sequence[Segment],
    *,
    tokens: int,
    after: int = -1,
    first_page: int = 32,
) -> tuple[list[Item], bool]:
    """The newest messages, oldest first, until they hold more than ``tokens``.

    Stops early at position ``after`` (exclusive; e.g. the end of a summary).
    Returns the items and whether older messages (past ``after``) remain.
    """
    collected: list[Item] = []
    total = 0
    page = first_page
    below: int | None = None
    for segment in segments:
        while True:
            query = (
                select(*_ITEM_COLUMNS)
                .where(_segment_filter(segment, below), messages.c.position > after)
                .order_by(messages.c.position.desc())
                .limit(page)
            )
            rows = conn.execute(query).all()
            for row in rows:
                item = _item(row)
                collected.append(item)
                total += item.tokens
                if total > tokens:
                    collected.reverse()
                    oldest = collected[0].position
                    return collected, oldest > after + 1
            if rows:
                below = rows[-1][0]
            if len(rows) < page:
                break
            page = min(page * 4, 4096)
        # The next segment (the parent) continues below where this one began.
    collected.reverse()
    return collected, False


def pinned_before(conn: Connection, segments: Sequence[Segment], position: int) -> list[Item]:
    """Pinned messages older than ``position``, oldest first (a partial index serves this)."""
    clauses = [and_(_segment_filter(segment, position), messages.c.pinned) for segment in segments]
    rows = conn.execute(
        select(*_ITEM_COLUMNS).where(or_(*clauses)).order_by(messages.c.position)
    ).all()
    return [_item(row) for row in rows]


def all_items(conn: Connection, segments: Sequence[Segment]) -> list[Item]:
    items: list[Item] = []
    for segment in reversed(segments):
        rows = conn.execute(
            select(*_ITEM_COLUMNS).where(_segment_filter(segment)).order_by(messages.c.position)
        ).all()
        items.extend(_item(row) for row in rows)
    return items


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored message with everything the store keeps about it."""

    position: int
    message: dict[str, Any]
    tokens: int
    created_at: datetime
    pinned: bool
    complete: bool
    metadata: dict[str, Any] | None


def entries(conn: Connection, segments: Sequence[Segment]) -> Iterable[Entry]:
    for segment in reversed(segments):
        rows = conn.execute(
            select(*_ITEM_COLUMNS, messages.c.created_at, messages.c.meta)
            .where(_segment_filter(segment))
            .order_by(messages.c.position)
        )
        for row in rows:
            item = _item(row[:10])
            yield Entry(
                position=item.position,
                message=dict(item.message),
                tokens=item.tokens,
                created_at=aware(row[10]),
                pinned=item.pinned,
                complete=item.complete,
                metadata=json.loads(row[11]) if row[11] is not None else None,
            )


def pending_calls(conn: Connection, segments: Sequence[Segment], before: int) -> set[str] | None:
    """Unanswered call ids of the tool-calling assistant message just before ``before``.

    Walks back over the run of tool messages; None when no tool-calling
    assistant message precedes that run (a tool message there would be orphaned).
    """
    answered: set[str] = set()
    below = before
    for segment in segments:
        while True:
            rows = conn.execute(
                select(
                    messages.c.position,
                    messages.c.role,
                    messages.c.tool_calls,
                    messages.c.tool_call_id,
                )
                .where(_segment_filter(segment, below))
                .order_by(messages.c.position.desc())
                .limit(16)
            ).all()
            for position, role, calls, call_id in rows:
                if role == "tool":
                    answered.add(call_id)
                    below = position
                    continue
                if role == "assistant" and calls is not None:
                    ids = {call["id"] for call in json.loads(calls)}
                    return ids - answered
                return None
            if len(rows) < 16:
                break
    return None


def newest_summary(conn: Connection, segments: Sequence[Segment]) -> Summary | None:
    """The summary reaching furthest, highest level first among equals."""
    best: Summary | None = None
    for conversation_id, upto in segments:
        query = select(
            summaries.c.id,
            summaries.c.start_position,
            summaries.c.end_position,
            summaries.c.text,
            summaries.c.tokens,
            summaries.c.level,
        ).where(summaries.c.conversation_id == conversation_id)
        if upto is not None:
            query = query.where(summaries.c.end_position <= upto)
        row = conn.execute(
            query.order_by(summaries.c.end_position.desc(), summaries.c.level.desc()).limit(1)
        ).first()
        if row is not None and (best is None or row.end_position > best.end):
            best = Summary(
                id=row.id,
                start=row.start_position,
                end=row.end_position,
                text=row.text,
                tokens=row.tokens,
                level=row.level,
            )
    return best


def prefix_totals(conn: Connection, segments: Sequence[Segment]) -> tuple[int, int]:
    """Message count and tokens over a whole lineage (used once, when forking)."""
    count, tokens = 0, 0
    for segment in segments:
        found = conn.execute(
            select(func.count(), func.coalesce(func.sum(messages.c.tokens), 0)).where(
                _segment_filter(segment)
            )
        ).one()
        count += found[0]
        tokens += int(found[1])
    return count, tokens


# -- calibration -----------------------------------------------------------------


def get_calibration(conn: Connection, conversation_id: str, model: str) -> Any:
    return conn.execute(
        select(calibrations).where(
            calibrations.c.conversation_id == conversation_id, calibrations.c.model == model
        )
    ).first()


def put_calibration(conn: Connection, values: Mapping[str, Any], *, exists: bool) -> None:
    if exists:
        conn.execute(
            update(calibrations)
            .where(
                calibrations.c.conversation_id == values["conversation_id"],
                calibrations.c.model == values["model"],
            )
            .values(**values)
        )
    else:
        conn.execute(insert(calibrations).values(**values))


def insert_usage(conn: Connection, values: Mapping[str, Any]) -> None:
    conn.execute(insert(usage).values(**values))


# -- deleting ---------------------------------------------------------------------


def detach_forks(conn: Connection, row: ConversationRow) -> None:
    """Give each fork of ``row`` the messages it shares with it, before ``row`` goes.

    A fork keeps pointing at ``row``'s own parent for anything older.
    """
    children = conn.execute(
        select(conversations.c.id, conversations.c.fork_position).where(
            conversations.c.forked_from == row.id
        )
    ).all()
    copied = [c for c in messages.c if c.name not in ("id", "conversation_id")]
    summary_columns = [
        c for c in summaries.c if c.name not in ("id", "conversation_id", "based_on")
    ]
    for child_id, upto in children:
        conn.execute(
            insert(messages).from_select(
                ["conversation_id", *[c.name for c in copied]],
                select(literal(child_id), *copied).where(
                    messages.c.conversation_id == row.id, messages.c.position <= upto
                ),
            )
        )
        conn.execute(
            insert(summaries).from_select(
                ["conversation_id", *[c.name for c in summary_columns]],
                select(literal(child_id), *summary_columns).where(
                    summaries.c.conversation_id == row.id, summaries.c.end_position <= upto
                ),
            )
        )
        conn.execute(
            update(conversations)
            .where(conversations.c.id == child_id)
            .values(forked_from=row.forked_from, fork_position=row.fork_position)
        )


def delete_conversation(conn: Connection, conversation_id: str) -> None:
    # Derived rows go explicitly too: a backend without enforced cascades
    # must not keep summaries or usage of erased messages.
    for table in (usage, summaries, calibrations, messages):
        conn.execute(delete(table).where(table.c.conversation_id == conversation_id))
    conn.execute(delete(conversations).where(conversations.c.id == conversation_id))


def user_conversation_ids(conn: Connection, user: str) -> list[str]:
    return list(conn.scalars(select(conversations.c.id).where(conversations.c.user_id == user)))


def erase_user(conn: Connection, user: str) -> int:
    ids = select(conversations.c.id).where(conversations.c.user_id == user).scalar_subquery()
    for table in (usage, summaries, calibrations, messages):
        conn.execute(delete(table).where(table.c.conversation_id.in_(ids)))
    # Forks of this user's conversations are this user's too (a fork keeps its
    # owner), so the whole family goes in one statement.
    result = conn.execute(delete(conversations).where(conversations.c.user_id == user))
    return result.rowcount
