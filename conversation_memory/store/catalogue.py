"""The catalogue: what the store does across conversations.

Creating and resuming a conversation, listing, counting and finding them,
searching their messages, erasing a user and importing a whole conversation
are rare next to turns, and read or write many rows at once, so they are
SQLAlchemy Core on a connection (``Database.read`` / ``Database.write``).
Everything about one conversation once it is open is the conversation log's
(``store.log``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite

from conversation_memory.errors import ConversationExists
from conversation_memory.messages import dumps
from conversation_memory.store.database import Database
from conversation_memory.store.queries import walk_lineage
from conversation_memory.store.schema import (
    calibrations,
    compaction_leases,
    conversations,
    messages,
    summaries,
    usage,
)
from conversation_memory.store.search import search_lineage, search_user
from conversation_memory.store.values import (
    ConversationInfo,
    ConversationRow,
    SearchHit,
    Segment,
    aware,
)

_ROW_COLUMNS = [getattr(conversations.c, f) for f in ConversationRow.__slots__]

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
    conversations.c.key,
]


def _row(found: Any) -> ConversationRow:
    values = dict(found._mapping)
    values["settings"] = json.loads(values["settings"])
    values["created_at"] = aware(values["created_at"])
    values["updated_at"] = aware(values["updated_at"])
    return ConversationRow(**values)


def _info(row: Any) -> ConversationInfo:
    id_, user, title, model, count, tokens, created, updated, parent, key = row
    return ConversationInfo(
        id=id_,
        user=user,
        title=title,
        model=model,
        message_count=count,
        tokens=tokens,
        created_at=aware(created),
        updated_at=aware(updated),
        forked_from=parent,
        key=key,
    )


def _values(row: ConversationRow) -> dict[str, Any]:
    return {name: getattr(row, name) for name in ConversationRow.__slots__} | {
        "settings": dumps(row.settings)
    }


def _get(conn: Connection, conversation_id: str, user: str) -> ConversationRow | None:
    found = conn.execute(
        select(*_ROW_COLUMNS).where(
            conversations.c.id == conversation_id, conversations.c.user_id == user
        )
    ).first()
    return None if found is None else _row(found)


def _by_key(conn: Connection, user: str, key: str) -> ConversationRow | None:
    found = conn.execute(
        select(*_ROW_COLUMNS).where(conversations.c.user_id == user, conversations.c.key == key)
    ).first()
    return None if found is None else _row(found)


def _lineage(conn: Connection, conversation_id: str, user: str) -> list[Segment] | None:
    """The segments of a conversation's lineage (as the log reads them); None if it
    is not stored, or not ``user``'s."""
    fork = select(conversations.c.forked_from, conversations.c.fork_position)
    owner = conversations.c.user_id == user
    found = conn.execute(fork.where(conversations.c.id == conversation_id, owner)).first()
    if found is None:
        return None

    def parent_of(parent: str) -> tuple[str | None, int | None] | None:
        row = conn.execute(fork.where(conversations.c.id == parent)).first()
        return None if row is None else (row[0], row[1])

    return walk_lineage(conversation_id, found[0], found[1], parent_of)


class Catalogue:
    """Conversations as a collection: create, resume, list, count, find, search, erase,
    import."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def get(self, conversation_id: str, user: str) -> ConversationRow | None:
        """The conversation's row, if it is this user's."""
        with self._db.read() as conn:
            return _get(conn, conversation_id, user)

    def create(self, row: ConversationRow) -> None:
        with self._db.write() as conn:
            conn.execute(insert(conversations).values(**_values(row)))

    def by_key(self, user: str, key: str) -> ConversationRow | None:
        """The conversation ``user`` gave ``key`` (the unique index finds it)."""
        with self._db.read() as conn:
            return _by_key(conn, user, key)

    def create_keyed(self, row: ConversationRow) -> ConversationRow:
        """Store ``row`` unless its user already has a conversation with its key; the
        stored conversation with that key either way (compare ids to tell which).

        Atomic: the insert leaves the row alone if the unique index on (user, key)
        holds one already, so of processes racing on a new key one creates it and
        the others read what it created (PostgreSQL's insert waits for theirs to
        commit; SQLite's writers take turns).
        """
        assert row.key is not None
        dialect = sqlite if self._db.target.is_sqlite else postgresql
        with self._db.write() as conn:
            conn.execute(
                dialect.insert(conversations).values(**_values(row)).on_conflict_do_nothing()
            )
            stored = _by_key(conn, row.user_id, row.key)
        assert stored is not None
        return stored

    def list(self, user: str | None, *, limit: int | None = None) -> list[ConversationInfo]:
        """The conversations of ``user`` (None: everyone's), newest activity first.

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
        with self._db.read() as conn:
            return [_info(row) for row in conn.execute(query).all()]

    def count(self, user: str | None) -> int:
        query = select(func.count()).select_from(conversations)
        if user is not None:
            query = query.where(conversations.c.user_id == user)
        with self._db.read() as conn:
            return int(conn.execute(query).scalar_one())

    def find(
        self, ref: str, user: str | None, *, limit: int = 2
    ) -> tuple[str, list[ConversationInfo]]:
        """``(kind, conversations)`` of what ``ref`` may mean: the conversation with that
        id ("id"), else, newest first, at most ``limit`` with that key ("key": one per
        user), else the most recently active one with that title ("title"), else,
        newest first, at most ``limit`` whose id starts with it ("prefix"); ``("", [])``.

        A title is looked up before a prefix so that a title a person typed is never
        shadowed by ids that happen to start with it.
        """
        owned = [] if user is None else [conversations.c.user_id == user]
        base = select(*LISTING_COLUMNS).where(*owned)
        newest = (conversations.c.updated_at.desc(), conversations.c.id.desc())
        with self._db.read() as conn:
            row = conn.execute(base.where(conversations.c.id == ref)).first()
            if row is not None:
                return "id", [_info(row)]
            keyed = conn.execute(
                base.where(conversations.c.key == ref).order_by(*newest).limit(limit)
            ).all()
            if keyed:
                return "key", [_info(row) for row in keyed]
            row = conn.execute(
                base.where(conversations.c.title == ref).order_by(*newest).limit(1)
            ).first()
            if row is not None:
                return "title", [_info(row)]
            if ref.isalnum() and ref == ref.lower():
                prefixed = conn.execute(
                    base.where(conversations.c.id.startswith(ref, autoescape=True))
                    .order_by(*newest)
                    .limit(limit)
                ).all()
                return "prefix", [_info(row) for row in prefixed]
        return "", []

    def search(self, text: str, *, user: str | None, limit: int) -> list[SearchHit]:
        """The best matches for ``text`` in the conversations of ``user`` (None:
        everyone's); see ``store.search``."""
        with self._db.read() as conn:
            return search_user(conn, text, user=user, limit=limit)

    def search_conversation(
        self, conversation_id: str, text: str, *, user: str, limit: int
    ) -> list[SearchHit] | None:
        """The best matches for ``text`` in one conversation of ``user`` and the history
        it shares with those it was forked from, read in one snapshot with its
        lineage; None if it is not stored."""
        with self._db.read() as conn:
            segments = _lineage(conn, conversation_id, user)
            if segments is None:
                return None
            return search_lineage(conn, segments, text, limit=limit)

    def erase_user(self, user: str) -> int:
        """Delete every conversation of ``user`` and everything derived; how many went."""
        ids = select(conversations.c.id).where(conversations.c.user_id == user).scalar_subquery()
        with self._db.write() as conn:
            for table in (usage, summaries, calibrations, compaction_leases, messages):
                conn.execute(delete(table).where(table.c.conversation_id.in_(ids)))
            # Forks of this user's conversations are this user's too (a fork keeps its
            # owner), so the whole family goes in one statement.
            return conn.execute(
                delete(conversations).where(conversations.c.user_id == user)
            ).rowcount

    def import_(self, row: ConversationRow, rows: Sequence[Mapping[str, Any]]) -> ConversationRow:
        """Store a whole conversation (its row and message rows) in one transaction."""
        with self._db.write() as conn:
            exists = conn.execute(
                select(conversations.c.id).where(conversations.c.id == row.id)
            ).first()
            if exists is not None:
                raise ConversationExists(
                    f"conversation {row.id!r} already exists; delete it first, or "
                    "import a copy with a fresh id (new_id=True; `convmem import --new-id`)",
                    conversation_id=row.id,
                )
            keyed = None if row.key is None else _by_key(conn, row.user_id, row.key)
            if keyed is not None:
                raise ConversationExists(
                    f"user {row.user_id!r} already has a conversation with key {row.key!r} "
                    f"({keyed.id}); delete it first, or import it for another user "
                    "(user=...; `convmem import --user`)",
                    conversation_id=keyed.id,
                    key=row.key,
                )
            conn.execute(insert(conversations).values(**_values(row)))
            if rows:
                conn.execute(
                    insert(messages), [dict(each, conversation_id=row.id) for each in rows]
                )
            stored = _get(conn, row.id, row.user_id)
        assert stored is not None
        return stored


__all__ = ["LISTING_COLUMNS", "Catalogue"]
