"""Add the table of message embeddings, for optional semantic recall.

Why: with an embeddings endpoint configured, recall finds old messages by
meaning as well as by their words (reciprocal-rank fusion with the full-text
index of 0003). The vectors are derived data, made after a turn is stored and
off its path, so they live in a table of their own rather than in
``messages``: a message without a vector yet (the endpoint was down) is
simply embedded later, and deleting a message (its conversation, its user)
deletes its vectors through the foreign key.

Each row names its message by ``(conversation_id, position)``, the messages'
own unique key, so the unique index on ``(conversation_id, position, model)``
serves both the cascade and a conversation's reads. The vector is a blob of
little-endian float32 (``dimensions`` values). PostgreSQL stores the same
``bytea``; ``pgvector`` is not required (a brute-force scan over the blobs,
kept in memory between reads, is fast enough at 100,000 messages).

Nothing to backfill: messages stored before this revision are embedded when
an embeddings endpoint is first configured (``Conversation.embed_pending``).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "message_vectors",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("conversation_id", sa.String(64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("dimensions", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_message_vectors")),
        sa.ForeignKeyConstraint(
            ["conversation_id", "position"],
            ["messages.conversation_id", "messages.position"],
            name=op.f("fk_message_vectors_conversation_id_messages"),
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint(
            "conversation_id",
            "position",
            "model",
            name=op.f("uq_message_vectors_conversation_id_position_model"),
        ),
        # Ids are never reused: the scan tells new rows from old ones by id.
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_message_vectors_conversation_id"),
        "message_vectors",
        ["conversation_id", "model", "id"],
    )


def downgrade() -> None:
    op.drop_index("ix_message_vectors_conversation_id", table_name="message_vectors")
    op.drop_table("message_vectors")
