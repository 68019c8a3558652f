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
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, delete, func, insert, literal, select, update

from conversation_memory.messages import from_row
from conversation_memory.store.schema import (
    calibrations,
    compaction_leases,
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


LISTING_COLUMNS = [
    conversations.c.id,
    conversations.c.user_id,
    conversations.c.title,
    conversations.c.model,
    conversations.c.message_count,
    conversations.c.total_tokens,
    conversations.c.created_at,
    conversations.c.updated_at,
    conversations.c.forked_from,
]


def list_conversations(
    conn: Connection, user: str | None, *, limit: int | None = None
) -> list[Any]:
    """``LISTING_COLUMNS`` of each conversation, newest activity first.

    Only the columns a listing shows: no settings JSON to parse, which keeps
    ``convmem sessions --all`` over 10,000 conversations well under a second.
    """
    query = select(*LISTING_COLUMNS).order_by(
        conversations.c.updated_at.desc(), conversations.c.id.desc()
    )
    if user is not None:
        query = query.where(conversations.c.user_id == user)
    if limit is not None:
        query = query.limit(limit)
    return list(conn.execute(query).all())


def count_conversations(conn: Connection, user: str | None) -> int:
    query = select(func.count()).select_from(conversations)
    if user is not None:
        query = query.where(conversations.c.user_id == user)
    return conn.execute(query).scalar_one()


def find_conversations(
    conn: Connection, ref: str, user: str | None, *, limit: int = 2
) -> tuple[str, list[Any]]:
    """``(kind, LISTING_COLUMNS rows)`` of what ``ref`` may mean: the conversation with
    that id ("id"), else the most recently active one with that title ("title"), else,
    newest first, at most ``limit`` whose id starts with it ("prefix"); ``("", [])``.

    A title is looked up before a prefix so that a title a person typed is never
    shadowed by ids that happen to start with it.
    """
    owned = [] if user is None else [conversations.c.user_id == user]
    base = select(*LISTING_COLUMNS).where(*owned)
    newest = (conversations.c.updated_at.desc(), conversations.c.id.desc())
    row = conn.execute(base.where(conversations.c.id == ref)).first()
    if row is not None:
        return "id", [row]
    row = conn.execute(base.where(conversations.c.title == ref).order_by(*newest).limit(1)).first()
    if row is not None:
        return "title", [row]
    if ref.isalnum() and ref == ref.lower():
        prefixed = conn.execute(
            base.where(conversations.c.id.startswith(ref, autoescape=True))
            .order_by(*newest)
            .limit(limit)
        ).all()
        return "prefix", list(prefixed)
    return "", []


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


def lineage(conn: Connection, row: ConversationRow) -> list[Segment]:
    def parent_of(conversation_id: str) -> tuple[str | None, int | None] | None:
        found = conn.execute(
            select(conversations.c.forked_from, conversations.c.fork_position).where(
                conversations.c.id == conversation_id
            )
        ).first()
        return None if found is None else (found[0], found[1])

    return walk_lineage(row.id, row.forked_from, row.fork_position, parent_of)


# -- appending ---------------------------------------------------------------


def insert_messages(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    conn.execute(insert(messages), list(rows))


# -- the hot path ------------------------------------------------------------------
#
# Appending a message and reading what the next context needs run on every
# turn, so they are fixed SQL strings executed on the DBAPI cursor (see
# Database.cursor). Measured here, SQLAlchemy Core spent ~1 ms of Python per
# append against ~0.3 ms of SQLite work; these strings are what Core compiled,
# written once.

# A new conversation's row, inserted by its first turn; DO NOTHING: two threads
# sharing one new Conversation object may both try, and the second just appends.
_CREATE = """
INSERT INTO conversations (id, user_id, title, model, system, system_tokens, counter, settings,
                           created_at, updated_at, next_position, message_count, total_tokens)
VALUES (:id, :user_id, :title, :model, :system, :system_tokens, :counter, :settings,
        :now, :now, 0, 0, 0)
ON CONFLICT (id) DO NOTHING
"""
_CLAIM = """
UPDATE conversations
   SET next_position = next_position + :count, message_count = message_count + :count,
       total_tokens = total_tokens + :tokens, updated_at = :now
 WHERE id = :id AND user_id = :user
RETURNING next_position
"""
_INSERT = """
INSERT INTO messages (conversation_id, position, role, content, parts, name, tool_calls,
                      tool_call_id, tokens, created_at, meta, complete, pinned)
VALUES (:conversation_id, :position, :role, :content, :parts, :name, :tool_calls,
        :tool_call_id, :tokens, :created_at, :meta, :complete, :pinned)
"""
# The row and its calibration in one round trip.
_HEAD = """
SELECT c.system, c.system_tokens, c.forked_from, c.fork_position, c.next_position,
       c.message_count, c.total_tokens, k.factor, k.margin
  FROM conversations c
  LEFT JOIN calibrations k ON k.conversation_id = c.id AND k.model = :model
 WHERE c.id = :id AND c.user_id = :user
"""
_ITEMS = "position, role, content, parts, name, tool_calls, tool_call_id, tokens, pinned, complete"
_TAIL = f"""
SELECT {_ITEMS} FROM messages
 WHERE conversation_id = :id AND position <= :upto AND position > :after
 ORDER BY position DESC LIMIT :n
"""
# "AND pinned" must match the partial index's predicate word for word, or
# SQLite walks every row of the conversation instead of using it.
_PINNED = f"""
SELECT {_ITEMS} FROM messages
 WHERE conversation_id = :id AND position <= :upto AND pinned
 ORDER BY position
"""
_SUMMARY = """
SELECT id, start_position, end_position, text, tokens, level FROM summaries
 WHERE conversation_id = :id AND end_position <= :upto
 ORDER BY end_position DESC, level DESC LIMIT 1
"""
_COVER_STEP = """
SELECT id, start_position, end_position, text, tokens, level FROM summaries
 WHERE conversation_id = :id AND start_position = :start AND end_position <= :upto
 ORDER BY end_position DESC, level DESC LIMIT 1
"""
_RECENT = """
SELECT position, role, tool_calls, tool_call_id FROM messages
 WHERE conversation_id = :id AND position <= :upto
 ORDER BY position DESC LIMIT :n
"""
_PARENT = "SELECT forked_from, fork_position FROM conversations WHERE id = :id"
_CALIBRATE = """
INSERT INTO calibrations (conversation_id, model, factor, margin, samples, last_counted,
                          last_reported, updated_at)
VALUES (:conversation_id, :model, :factor, :margin, 1, :last_counted, :last_reported,
        :updated_at)
ON CONFLICT (conversation_id, model) DO UPDATE
   SET factor = excluded.factor, margin = excluded.margin,
       samples = calibrations.samples + 1, last_counted = excluded.last_counted,
       last_reported = excluded.last_reported, updated_at = excluded.updated_at
"""
_USAGE = """
INSERT INTO usage (conversation_id, kind, model, position, prompt_tokens, completion_tokens,
                   counted_prompt_tokens, latency_ms, finish_reason, request_id, error,
                   created_at)
VALUES (:conversation_id, :kind, :model, :position, :prompt_tokens, :completion_tokens,
        :counted_prompt_tokens, :latency_ms, :finish_reason, :request_id, :error, :created_at)
"""
_NO_LIMIT = 2**62


@dataclass(frozen=True, slots=True)
class Head:
    """What the hot path needs of a conversation row (plus its calibration)."""

    system: str | None
    system_tokens: int
    forked_from: str | None
    fork_position: int | None
    next_position: int
    message_count: int
    total_tokens: int
    factor: float | None
    margin: int | None

    def page_for(self, tokens: int) -> int:
        """Rows likely to hold ``tokens``, from the average message size, with slack."""
        if self.message_count == 0:
            return 16
        average = max(self.total_tokens / self.message_count, 1.0)
        return min(int(tokens / average * 1.1) + 4, 4096)


def _item_from(row: Sequence[Any]) -> Item:
    position, role, content, parts, name, calls, call_id, tokens, pinned, complete = row
    # Positional: this runs for every message read on every turn.
    return Item(
        position,
        from_row(role, content, parts, name, calls, call_id),
        tokens,
        bool(pinned),
        bool(complete),
    )


class HotPath:
    """The prepared statements of one backend (its parameter style)."""

    def __init__(self, dialect: str) -> None:
        self.sqlite = dialect == "sqlite"

        def prepare(sql: str) -> str:
            sql = " ".join(sql.split())
            return sql if self.sqlite else re.sub(r":(\w+)", r"%(\1)s", sql)

        self.create_sql = prepare(_CREATE)
        self.claim_sql = prepare(_CLAIM)
        self.insert_sql = prepare(_INSERT)
        self.head_sql = prepare(_HEAD)
        self.tail_sql = prepare(_TAIL)
        self.pinned_sql = prepare(_PINNED)
        self.summary_sql = prepare(_SUMMARY)
        self.recent_sql = prepare(_RECENT)
        self.cover_sql = prepare(_COVER_STEP)
        self.parent_sql = prepare(_PARENT)
        self.usage_sql = prepare(_USAGE)
        self.calibrate_sql = prepare(_CALIBRATE)

    def stamp(self, when: datetime) -> Any:
        """A timestamp as SQLAlchemy's DateTime would store it on this backend."""
        if self.sqlite:
            return when.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
        return when

    def create(self, cur: Any, row: Mapping[str, Any]) -> None:
        """Insert a new conversation's row (see ``_CREATE``)."""
        cur.execute(self.create_sql, row)

    def claim(
        self,
        cur: Any,
        conversation_id: str,
        user: str,
        tokens: int,
        when: Any,
        *,
        count: int = 1,
    ) -> int | None:
        """Reserve the next ``count`` positions; return the first (None: no such conversation).

        The UPDATE also moves the running totals and takes the conversation
        row's write lock, so concurrent appends to one conversation queue here
        on PostgreSQL too; positions stay unique and gap-free because a
        rolled-back append also rolls back its claim.
        """
        cur.execute(
            self.claim_sql,
            {
                "count": count,
                "tokens": tokens,
                "now": when,
                "id": conversation_id,
                "user": user,
            },
        )
        found = cur.fetchone()
        return None if found is None else found[0] - count

    def insert(self, cur: Any, row: Mapping[str, Any]) -> None:
        cur.execute(self.insert_sql, row)

    def insert_usage(self, cur: Any, row: Mapping[str, Any]) -> None:
        cur.execute(self.usage_sql, row)

    def upsert_calibration(self, cur: Any, row: Mapping[str, Any]) -> None:
        cur.execute(self.calibrate_sql, row)

    def head(self, cur: Any, conversation_id: str, user: str, model: str) -> Head | None:
        cur.execute(self.head_sql, {"id": conversation_id, "user": user, "model": model})
        found = cur.fetchone()
        return None if found is None else Head(*found)

    def lineage(self, cur: Any, conversation_id: str, head: Head) -> list[Segment]:
        def parent_of(parent: str) -> tuple[str | None, int | None] | None:
            cur.execute(self.parent_sql, {"id": parent})
            found = cur.fetchone()
            return None if found is None else (found[0], found[1])

        return walk_lineage(conversation_id, head.forked_from, head.fork_position, parent_of)

    def tail(
        self,
        cur: Any,
        segments: Sequence[Segment],
        *,
        tokens: int,
        after: int = -1,
        first_page: int = 32,
    ) -> tuple[list[Item], bool]:
        """The newest messages, oldest first, until they hold more than ``tokens``.

        Stops at position ``after`` (exclusive; e.g. the end of a summary).
        Returns the items and whether older messages (past ``after``) remain.
        """
        collected: list[Item] = []
        total = 0
        page = first_page
        upto: int | None = None
        for conversation_id, segment_upto in segments:
            if segment_upto is not None:
                upto = segment_upto if upto is None else min(upto, segment_upto)
            while True:
                cur.execute(
                    self.tail_sql,
                    {
                        "id": conversation_id,
                        "upto": _NO_LIMIT if upto is None else upto,
                        "after": after,
                        "n": page,
                    },
                )
                rows = cur.fetchall()
                for row in rows:
                    item = _item_from(row)
                    collected.append(item)
                    total += item.tokens
                    if total > tokens:
                        collected.reverse()
                        return collected, collected[0].position > after + 1
                if rows:
                    upto = rows[-1][0] - 1
                if len(rows) < page:
                    break
                page = min(page * 4, 4096)
        collected.reverse()
        return collected, False

    def pinned_before(self, cur: Any, segments: Sequence[Segment], position: int) -> list[Item]:
        """Pinned messages older than ``position``, oldest first."""
        found: list[Item] = []
        for conversation_id, upto in segments:
            limit = position - 1 if upto is None else min(upto, position - 1)
            cur.execute(self.pinned_sql, {"id": conversation_id, "upto": limit})
            found.extend(_item_from(row) for row in cur.fetchall())
        found.sort(key=lambda item: item.position)
        return found

    def newest_summary(self, cur: Any, segments: Sequence[Segment]) -> Summary | None:
        """The summary reaching furthest (highest level first among equals)."""
        best: Summary | None = None
        for conversation_id, upto in segments:
            cur.execute(
                self.summary_sql,
                {"id": conversation_id, "upto": _NO_LIMIT if upto is None else upto},
            )
            row = cur.fetchone()
            if row is not None and (best is None or row[2] > best.end):
                best = Summary(
                    id=row[0], start=row[1], end=row[2], text=row[3], tokens=row[4], level=row[5]
                )
        return best

    def summary_cover(self, cur: Any, segments: Sequence[Segment]) -> list[Summary]:
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
                    self.cover_sql,
                    {
                        "id": conversation_id,
                        "start": start,
                        "upto": _NO_LIMIT if upto is None else upto,
                    },
                )
                row = cur.fetchone()
                if row is not None and (best is None or (row[2], row[5]) > (best[2], best[5])):
                    best = row
            if best is None:
                return cover
            cover.append(
                Summary(
                    id=best[0],
                    start=best[1],
                    end=best[2],
                    text=best[3],
                    tokens=best[4],
                    level=best[5],
                )
            )
            start = best[2] + 1

    def pending_calls(self, cur: Any, segments: Sequence[Segment], before: int) -> set[str] | None:
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
                cur.execute(self.recent_sql, {"id": conversation_id, "upto": upto, "n": 16})
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


def entries(
    conn: Connection, segments: Sequence[Segment], *, first: int = 0, last: int | None = None
) -> Iterable[Entry]:
    """Stored messages oldest first, optionally only positions ``first..last``."""
    for segment in reversed(segments):
        query = select(*_ITEM_COLUMNS, messages.c.created_at, messages.c.meta).where(
            _segment_filter(segment, None if last is None else last + 1),
            messages.c.position >= first,
        )
        rows = conn.execute(query.order_by(messages.c.position))
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


def usage_calls(conn: Connection, conversation_id: str) -> list[Any]:
    """Every usage row of a conversation, oldest first, with its time and outcome."""
    return list(
        conn.execute(
            select(
                usage.c.kind,
                usage.c.model,
                usage.c.position,
                usage.c.prompt_tokens,
                usage.c.completion_tokens,
                usage.c.counted_prompt_tokens,
                usage.c.latency_ms,
                usage.c.finish_reason,
                usage.c.error,
                usage.c.created_at,
            )
            .where(usage.c.conversation_id == conversation_id)
            .order_by(usage.c.id)
        )
    )


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
            .values(
                forked_from=row.forked_from,
                fork_position=(None if row.fork_position is None else min(upto, row.fork_position)),
            )
        )


def delete_conversation(conn: Connection, conversation_id: str) -> None:
    # Derived rows go explicitly too: a backend without enforced cascades
    # must not keep summaries or usage of erased messages.
    for table in (usage, summaries, calibrations, compaction_leases, messages):
        conn.execute(delete(table).where(table.c.conversation_id == conversation_id))
    conn.execute(delete(conversations).where(conversations.c.id == conversation_id))


def erase_user(conn: Connection, user: str) -> int:
    ids = select(conversations.c.id).where(conversations.c.user_id == user).scalar_subquery()
    for table in (usage, summaries, calibrations, compaction_leases, messages):
        conn.execute(delete(table).where(table.c.conversation_id.in_(ids)))
    # Forks of this user's conversations are this user's too (a fork keeps its
    # owner), so the whole family goes in one statement.
    result = conn.execute(delete(conversations).where(conversations.c.user_id == user))
    return result.rowcount
