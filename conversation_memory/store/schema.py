"""The tables, as SQLAlchemy Core metadata (the migrations must agree with it).

Model: a conversation owns an append-only list of messages numbered by
``position`` (0-based, gap-free). A fork points at its parent and the last
parent position it shares (``fork_position``) instead of copying the prefix,
and numbers its own messages from ``fork_position + 1``. Summaries are their
own rows naming the range they cover; nothing ever rewrites a message. The
conversation row carries running totals and the next position, so listing
conversations and appending a message never aggregate over messages.

JSON values (content parts, tool calls, settings, metadata) are stored as text
in one canonical encoding, so exports round-trip byte for byte on every
backend.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    text,
    true,
)

VERSION_TABLE = "convmem_version"
"""Alembic's version table, named so it can't collide with an app's own."""

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

KEY_LENGTH = 255
"""The longest key an application may give a conversation (characters)."""

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# SQLite only makes INTEGER PRIMARY KEY an alias of the rowid (and so
# autoincrementing); BIGINT there would not be.
Id = BigInteger().with_variant(Integer(), "sqlite")

conversations = Table(
    "conversations",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("user_id", String(255), nullable=False),
    Column("title", Text, nullable=True),
    Column("model", String(255), nullable=False),
    Column("system", Text, nullable=True),
    Column("system_tokens", Integer, nullable=False, server_default=text("0")),
    Column("counter", String(128), nullable=False),
    Column("settings", Text, nullable=False, server_default=text("'{}'")),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # NO ACTION (checked at the end of the statement): erasing a user deletes a
    # parent and its forks in one statement. Deleting one conversation first
    # hands its forks the messages they share (see store.queries.delete).
    Column("forked_from", String(64), ForeignKey("conversations.id"), nullable=True),
    Column("fork_position", Integer, nullable=True),
    Column("next_position", Integer, nullable=False, server_default=text("0")),
    Column("message_count", Integer, nullable=False, server_default=text("0")),
    Column("total_tokens", BigInteger, nullable=False, server_default=text("0")),
    # The application's own name for the conversation (migration 0005), unique per
    # user; NULL (no key) never collides. The unique index makes get-or-create by
    # key atomic: of two inserts of one new key, only one succeeds.
    Column("key", String(KEY_LENGTH), nullable=True),
    # Not (user_id, updated_at): every append moves updated_at, and keeping
    # that index in step cost ~20% of an append (measured). A user's
    # conversations are sorted after the index finds them.
    Index("ix_conversations_user", "user_id"),
    Index("ix_conversations_forked_from", "forked_from"),
    Index("ix_conversations_user_key", "user_id", "key", unique=True),
)


def _owner(*, primary_key: bool = False) -> Column[str]:
    """The conversation a row belongs to; deleting the conversation deletes the row."""
    return Column(
        "conversation_id",
        String(64),
        ForeignKey("conversations.id", ondelete="CASCADE"),
        nullable=False,
        primary_key=primary_key,
    )


messages = Table(
    "messages",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    _owner(),
    Column("position", Integer, nullable=False),
    Column("role", String(16), nullable=False),
    Column("content", Text, nullable=True),
    Column("parts", Text, nullable=True),
    Column("name", String(255), nullable=True),
    Column("tool_calls", Text, nullable=True),
    Column("tool_call_id", String(255), nullable=True),
    Column("tokens", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("meta", Text, nullable=True),
    Column("complete", Boolean, nullable=False, server_default=true()),
    Column("pinned", Boolean, nullable=False, server_default=false()),
    # The unique index doubles as the tail index: newest-first reads walk it
    # backwards from the end of one conversation.
    UniqueConstraint("conversation_id", "position"),
    Index(
        "ix_messages_pinned",
        "conversation_id",
        "position",
        sqlite_where=text("pinned"),
        postgresql_where=text("pinned"),
    ),
)

summaries = Table(
    "summaries",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    _owner(),
    Column("start_position", Integer, nullable=False),
    Column("end_position", Integer, nullable=False),
    Column("level", Integer, nullable=False, server_default=text("0")),
    Column("text", Text, nullable=False),
    Column("tokens", Integer, nullable=False),
    Column("strategy", String(128), nullable=False),
    Column("model", String(255), nullable=False),
    Column("prompt_version", String(64), nullable=False),
    Column(
        "based_on",
        Id,
        ForeignKey("summaries.id", ondelete="SET NULL"),
        nullable=True,
    ),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Concurrent compactions of one range produce one row: the loser's insert fails.
    UniqueConstraint("conversation_id", "start_position", "end_position", "level"),
    Index("ix_summaries_conversation_end", "conversation_id", "end_position"),
)

usage = Table(
    "usage",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    _owner(),
    Column("kind", String(32), nullable=False),
    Column("model", String(255), nullable=False),
    Column("position", Integer, nullable=True),
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    Column("counted_prompt_tokens", Integer, nullable=True),
    Column("latency_ms", Float, nullable=True),
    Column("finish_reason", String(32), nullable=True),
    Column("request_id", String(255), nullable=True),
    Column("error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_usage_conversation", "conversation_id", "id"),
)

calibrations = Table(
    "calibrations",
    metadata,
    _owner(primary_key=True),
    Column("model", String(255), primary_key=True),
    Column("factor", Float, nullable=False),
    Column("margin", Integer, nullable=False),
    Column("samples", Integer, nullable=False),
    Column("last_counted", Integer, nullable=False),
    Column("last_reported", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

compaction_leases = Table(
    "compaction_leases",
    metadata,
    _owner(primary_key=True),
    Column("level", Integer, primary_key=True),
    Column("holder", String(64), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)
"""One compaction per conversation and level at a time: a compaction claims
the lease before reading what to fold, renews it while it works and drops it
when it is done. A holder killed mid-call stops renewing, so its lease expires
within ``store.leases.LEASE_SECONDS`` (seconds)."""


message_vectors = Table(
    "message_vectors",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("conversation_id", String(64), nullable=False),
    Column("position", Integer, nullable=False),
    Column("model", String(255), nullable=False),
    Column("dimensions", Integer, nullable=False),
    Column("vector", LargeBinary, nullable=False),
    # The message is named by (conversation, position), which the messages'
    # unique constraint makes a key: the same index then serves the cascade
    # (deleting a conversation's messages, an erased user's) and a lineage's
    # reads, where a message id would need one index for each.
    ForeignKeyConstraint(
        ["conversation_id", "position"],
        ["messages.conversation_id", "messages.position"],
        ondelete="CASCADE",
    ),
    UniqueConstraint("conversation_id", "position", "model"),
    # What a scan adds to what it already holds: the rows of one conversation
    # and model stored after the newest one it has (store.vectors).
    Index("ix_message_vectors_conversation_id", "conversation_id", "model", "id"),
    # Ids never reused (SQLite would hand a deleted row's id out again): the scan
    # tells old rows from new ones by id (store.vectors).
    sqlite_autoincrement=True,
)
"""Embeddings of messages (optional semantic recall; migration 0004): one row per
message and embedding model, the vector as little-endian float32 (``dimensions``
of them; 0 for a message with no text to embed, so that it is not asked for
again). Derived data: a message's vectors go with it."""


# -- the full-text index ---------------------------------------------------------
#
# Made by migration 0003 and kept in step by the database (triggers on SQLite,
# a generated column on PostgreSQL); see that migration for why. It is not
# modelled above: an FTS5 virtual table and a generated tsvector column have
# no Core form both backends share (and a generated column in ``messages``
# would break the Core inserts that list every column). Reflection sees these
# objects anyway, so the migration environment leaves them out of
# ``alembic check`` by name.

SEARCH_TABLE = "messages_fts"
"""SQLite: the FTS5 table (external content); FTS5 adds shadow tables named after it."""
SEARCH_VIEW = "messages_search_text"
"""SQLite: the text indexed for each message (FTS5 reads snippets from it)."""
SEARCH_COLUMN = "search_vector"
"""PostgreSQL: the generated ``tsvector`` column of ``messages``."""
SEARCH_GIN_INDEX = "ix_messages_search_vector"
SEARCH_FUNCTION = "convmem_message_text"
"""PostgreSQL: the text indexed for each message (also what ``ts_headline`` marks up)."""


def outside_models(name: str | None, kind: str) -> bool:
    """Whether a reflected object belongs to the search index rather than to the models.

    ``kind`` is Alembic's ``include_name`` type ("table", "column", "index", ...).
    """
    if name is None:
        return False
    if kind == "table":
        return name == SEARCH_TABLE or name.startswith(f"{SEARCH_TABLE}_")
    return (kind, name) in {("column", SEARCH_COLUMN), ("index", SEARCH_GIN_INDEX)}
