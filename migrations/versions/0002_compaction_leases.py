"""Add compaction_leases.

Why: concurrent compactions of one conversation must not each pay for a
summarizer call over the same range; a short-lived lease per conversation and
summary level lets exactly one of them work while the others skip.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "compaction_leases",
        sa.Column("conversation_id", sa.String(length=64), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_compaction_leases_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("conversation_id", "level", name=op.f("pk_compaction_leases")),
    )


def downgrade() -> None:
    op.drop_table("compaction_leases")
