"""Conversations keyed by the application: ``memory.conversation(key=..., user=...)``.

The key is the application's own name for a conversation (a chat id, a
ticket number), unique per user, stored in its own indexed column (migration
0005). With a key, ``conversation`` resumes that user's conversation or
creates it, atomically: processes racing on one new key end with one
conversation holding every append.
"""

from __future__ import annotations

import sqlalchemy as sa

from conversation_memory.engine import Memory
from conversation_memory.store import migrate


def _key_columns(db) -> set[str]:
    return {c["name"] for c in sa.inspect(db.engine).get_columns("conversations")}


def test_migration_0005_goes_down_and_up_again(db_url):
    from alembic import command

    with Memory(db_url) as memory:
        db = memory.database
        with db.engine.begin() as conn:
            command.downgrade(migrate.alembic_config(conn), "0004")
        assert "key" not in _key_columns(db)
        assert migrate.upgrade(db) == "0005"
        assert "key" in _key_columns(db)
        indexes = {i["name"]: i for i in sa.inspect(db.engine).get_indexes("conversations")}
        assert indexes["ix_conversations_user_key"]["unique"]
        assert migrate.check(db) == []
