"""referral projection: what routing's events say about each case and its referrals

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from services.common.db import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

NEW_CASE_COLUMNS = [
    sa.Column("lead_department", sa.String(64)),
    sa.Column("departments", sa.JSON()),
    sa.Column("first_referred_at", UTCDateTime),
    sa.Column("returns", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("extensions", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("reopen_count", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("unsatisfied_count", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("last_rating", sa.String(8)),
]


def upgrade() -> None:
    with op.batch_alter_table("supervision_cases") as batch:
        for column in NEW_CASE_COLUMNS:
            batch.add_column(column)
    op.create_table(
        "supervision_referrals",
        sa.Column("referral_id", sa.String(48), primary_key=True),
        sa.Column("case_id", sa.String(32), nullable=False),
        sa.Column("department", sa.String(64), nullable=False),
        sa.Column("department_name", sa.String(200)),
        sa.Column("is_lead", sa.Integer(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("extension", sa.String(16)),
        sa.Column("referred_at", UTCDateTime, nullable=False),
        sa.Column("due_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_supervision_referrals_case", "supervision_referrals", ["case_id"])


def downgrade() -> None:
    op.drop_table("supervision_referrals")
    with op.batch_alter_table("supervision_cases") as batch:
        for column in NEW_CASE_COLUMNS:
            batch.drop_column(column.name)
