"""Add a full-text index over messages, kept in step by the database itself.

Why: search, and recall of what has left the context window, need to find a
conversation's old messages by their words without reading the whole history.
The index is maintained by the database in the transaction of every insert and
delete, so no code path that writes messages (a turn, an import, a fork being
detached, an erase) can forget it, and a crash leaves nothing half-indexed.

What is indexed, per message: its ``content``, the text of its ``{"type":
"text"}`` parts, and the name and arguments of its tool calls; at most the
first 100,000 characters of that (PostgreSQL refuses a ``tsvector`` above
1 MB; SQLite is capped alike so that both backends find the same messages).

* SQLite: an FTS5 table with external content. ``messages_search_text`` (a
  view) says what is indexed; triggers on ``messages`` add and remove index
  entries. FTS5's ``delete`` must be given the very values that were indexed,
  so both triggers read them from the same view (the delete trigger runs
  BEFORE the row goes). The second column, ``scope``, holds the conversation
  id (as hex, one token whatever its characters) so that a search of one
  conversation can intersect with it inside the index.
* PostgreSQL: a generated ``tsvector`` column under a GIN index, with the
  ``simple`` configuration (lower-cased words, no stemming, no stop words):
  chats mix languages, and a stemmer for the wrong one mangles words, while
  ``simple`` tokenizes like SQLite's ``unicode61``. It is fixed for now;
  choosing a language would be a later migration replacing the column.

None of it is in the models (``store/schema.py``): neither virtual tables nor a
generated column exist on both backends. ``migrations/env.py`` keeps these
objects out of ``alembic check``. A later migration that rebuilds the
``messages`` table on SQLite (batch mode) must drop the triggers first and
recreate them afterwards.

The backfill indexes existing messages in batches, reporting progress through
the ``progress`` callable that ``store.migrate.upgrade`` passes in (``convmem
db upgrade`` prints it).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

import sqlite3
from collections.abc import Callable

import sqlalchemy as sa
from alembic import context, op

from conversation_memory.errors import StoreError

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BATCH = 20_000
"""Messages indexed per statement during the SQLite backfill (one progress line each)."""

_SQLITE_VIEW = """
CREATE VIEW messages_search_text AS
SELECT m.id AS id,
       substr(trim(coalesce(m.content, '')
              || coalesce((SELECT ' ' || group_concat(json_extract(p.value, '$.text'), ' ')
                             FROM json_each(m.parts) AS p
                            WHERE json_extract(p.value, '$.type') = 'text'), '')
              || coalesce((SELECT ' ' || group_concat(
                                      coalesce(json_extract(c.value, '$.function.name'), '')
                                      || ' '
                                      || coalesce(json_extract(c.value, '$.function.arguments'),
                                                  ''),
                                      ' ')
                             FROM json_each(m.tool_calls) AS c), '')),
              1, 100000) AS body,
       hex(m.conversation_id) AS scope
  FROM messages AS m
"""
_SQLITE_TABLE = """
CREATE VIRTUAL TABLE messages_fts USING fts5(
    body, scope,
    content = 'messages_search_text', content_rowid = 'id',
    tokenize = 'unicode61 remove_diacritics 2'
)
"""
_SQLITE_ADD = """
INSERT INTO messages_fts (rowid, body, scope)
SELECT id, body, scope FROM messages_search_text WHERE id = {row}.id;
"""
_SQLITE_REMOVE = """
INSERT INTO messages_fts (messages_fts, rowid, body, scope)
SELECT 'delete', id, body, scope FROM messages_search_text WHERE id = old.id;
"""
# Messages are never updated today; if that changes, the index follows.
_SQLITE_TRIGGERS = {
    "messages_fts_insert": f"AFTER INSERT ON messages BEGIN {_SQLITE_ADD.format(row='new')} END",
    "messages_fts_delete": f"BEFORE DELETE ON messages BEGIN {_SQLITE_REMOVE} END",
    "messages_fts_update_out": (
        "BEFORE UPDATE OF id, conversation_id, content, parts, tool_calls ON messages "
        f"BEGIN {_SQLITE_REMOVE} END"
    ),
    "messages_fts_update_in": (
        "AFTER UPDATE OF id, conversation_id, content, parts, tool_calls ON messages "
        f"BEGIN {_SQLITE_ADD.format(row='new')} END"
    ),
}

# IMMUTABLE: a generated column may only call immutable functions, and this one
# is (it reads nothing but its arguments).
_PG_FUNCTION = """
CREATE FUNCTION convmem_message_text(content text, parts text, tool_calls text)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT left(concat_ws(' ',
    content,
    (SELECT string_agg(p.value ->> 'text', ' ' ORDER BY p.n)
       FROM jsonb_array_elements(parts::jsonb) WITH ORDINALITY AS p(value, n)
      WHERE p.value ->> 'type' = 'text'),
    (SELECT string_agg(concat_ws(' ', c.value -> 'function' ->> 'name',
                                      c.value -> 'function' ->> 'arguments'), ' ' ORDER BY c.n)
       FROM jsonb_array_elements(tool_calls::jsonb) WITH ORDINALITY AS c(value, n))
), 100000)
$$
"""
_PG_COLUMN = """
ALTER TABLE messages ADD COLUMN search_vector tsvector GENERATED ALWAYS AS (
    to_tsvector('simple', convmem_message_text(content, parts, tool_calls))
) STORED
"""
_PG_INDEX = "CREATE INDEX ix_messages_search_vector ON messages USING gin (search_vector)"


def _progress() -> Callable[[str], None]:
    found = context.config.attributes.get("progress")
    return found if found is not None else lambda _line: None


def upgrade() -> None:
    conn = op.get_bind()
    report = _progress()
    total = conn.execute(sa.text("SELECT count(*) FROM messages")).scalar_one()
    if conn.dialect.name == "postgresql":
        if total:
            report(f"search index: indexing {total:,} messages (one statement)")
        op.execute(_PG_FUNCTION)
        op.execute(_PG_COLUMN)
        op.execute(_PG_INDEX)
        if total:
            report(f"search index: {total:,} of {total:,} messages")
        return
    try:
        op.execute(_SQLITE_VIEW)
        op.execute(_SQLITE_TABLE)
    except sa.exc.OperationalError as exc:
        if "fts5" not in str(exc):
            raise
        raise StoreError(
            f"this Python's SQLite ({sqlite3.sqlite_version}) was built without FTS5, "
            "which the search index needs; nothing was changed. "
            "Use a Python whose sqlite3 has FTS5 (python.org and most Linux builds do)."
        ) from None
    _backfill_sqlite(conn, total, report)
    for name, body in _SQLITE_TRIGGERS.items():
        op.execute(f"CREATE TRIGGER {name} {body}")


def _backfill_sqlite(conn: sa.Connection, total: int, report: Callable[[str], None]) -> None:
    if not total:
        return
    report(f"search index: indexing {total:,} messages")
    done, after = 0, -1
    while True:
        upto = conn.execute(
            sa.text(
                "SELECT max(id) FROM "
                "(SELECT id FROM messages WHERE id > :after ORDER BY id LIMIT :n)"
            ),
            {"after": after, "n": BATCH},
        ).scalar()
        if upto is None:
            return
        done += conn.execute(
            sa.text(
                "INSERT INTO messages_fts (rowid, body, scope) SELECT id, body, scope "
                "FROM messages_search_text WHERE id > :after AND id <= :upto"
            ),
            {"after": after, "upto": upto},
        ).rowcount
        report(f"search index: {done:,} of {total:,} messages")
        after = upto


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX ix_messages_search_vector")
        op.execute("ALTER TABLE messages DROP COLUMN search_vector")
        op.execute("DROP FUNCTION convmem_message_text(text, text, text)")
        return
    for name in _SQLITE_TRIGGERS:
        op.execute(f"DROP TRIGGER {name}")
    op.execute("DROP TABLE messages_fts")
    op.execute("DROP VIEW messages_search_text")
