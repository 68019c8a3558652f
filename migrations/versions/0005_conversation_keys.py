"""Add the application's key to conversations, unique per user.

Why: a chat application knows its conversations by its own names (a
Telegram chat id, a ticket number) and wants ``memory.conversation(key=...)``
to resume the conversation with that key or create it, without keeping a
table of its own that maps its names to our ids. The key is a nullable
column of ``conversations`` (conversations made without one keep NULL) with
a unique index on ``(user_id, key)``: the index finds a key's conversation
and makes get-or-create atomic, since of two processes inserting the same
new key only one insert succeeds. NULL keys never collide, on SQLite and
PostgreSQL alike.

Nothing to backfill: existing conversations have no key.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column without a default: both backends add it in place.
    op.add_column("conversations", sa.Column("key", sa.String(255), nullable=True))
    op.create_index(
        op.f("ix_conversations_user_key"), "conversations", ["user_id", "key"], unique=True
    )


def downgrade() -> None:
    op.drop_index("ix_conversations_user_key", table_name="conversations")
    # In place on both backends (SQLite >= 3.35): a batch copy of the table would
    # trip over the search index's triggers on messages.
    op.execute('ALTER TABLE conversations DROP COLUMN "key"')
