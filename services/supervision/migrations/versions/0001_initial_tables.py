"""initial tables

Revision ID: 0001
Revises:
Create Date: 2026-11-25 03:53:59.646836
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "supervision_cases",
        sa.Column("case_id", sa.String(length=32), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=True),
        sa.Column("category", sa.String(length=64), nullable=True),
        sa.Column("street", sa.String(length=64), nullable=True),
        sa.Column("residents_affected", sa.Integer(), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("case_id"),
    )
    op.create_table(
        "supervision_outbox",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("event_type", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id"),
    )
    with op.batch_alter_table("supervision_outbox", schema=None) as batch_op:
        batch_op.create_index("ix_supervision_outbox_pending", ["published_at", "id"], unique=False)

    op.create_table(
        "supervision_timeline",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("case_id", sa.String(length=32), nullable=False),
        sa.Column("event_type", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id"),
    )
    with op.batch_alter_table("supervision_timeline", schema=None) as batch_op:
        batch_op.create_index("ix_supervision_timeline_case", ["case_id", "at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("supervision_timeline", schema=None) as batch_op:
        batch_op.drop_index("ix_supervision_timeline_case")

    op.drop_table("supervision_timeline")
    with op.batch_alter_table("supervision_outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_supervision_outbox_pending")

    op.drop_table("supervision_outbox")
    op.drop_table("supervision_cases")
