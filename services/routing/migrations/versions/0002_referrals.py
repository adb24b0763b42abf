"""referral lifecycle: routing's view of cases, referrals

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
    sa.Column("channel", sa.String(16)),
    sa.Column("title", sa.String(200)),
    sa.Column("description", sa.Text()),
    sa.Column("sector", sa.String(64)),
    sa.Column("workstation", sa.String(64)),
    sa.Column("urgency", sa.String(16)),
    sa.Column("residents_affected", sa.Integer()),
    sa.Column("triage_reason", sa.Text()),
    sa.Column("lead_department", sa.String(64)),
    sa.Column("returned_by", sa.JSON()),
    sa.Column("reopen_count", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("rating", sa.String(8)),
    sa.Column("decision", sa.JSON()),
    sa.Column("updated_at", UTCDateTime),
]


def upgrade() -> None:
    with op.batch_alter_table("routing_cases") as batch:
        for column in NEW_CASE_COLUMNS:
            batch.add_column(column)
        batch.create_index("ix_routing_cases_status", ["status"])
    op.create_table(
        "routing_referrals",
        sa.Column("id", sa.String(48), primary_key=True),
        sa.Column("case_id", sa.String(32), sa.ForeignKey("routing_cases.case_id"), nullable=False),
        sa.Column("department", sa.String(64), nullable=False),
        sa.Column("is_lead", sa.Integer(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("referred_at", UTCDateTime, nullable=False),
        sa.Column("due_at", UTCDateTime, nullable=False),
        sa.Column("return_by", UTCDateTime, nullable=False),
        sa.Column("accepted_at", UTCDateTime),
        sa.Column("returned_at", UTCDateTime),
        sa.Column("return_reason", sa.Text()),
        sa.Column("extension_status", sa.String(16)),
        sa.Column("extension_days", sa.Integer()),
        sa.Column("extension_reason", sa.Text()),
        sa.Column("extension_decided_at", UTCDateTime),
        sa.Column("replied_at", UTCDateTime),
        sa.Column("reply", sa.Text()),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_routing_referrals_case", "routing_referrals", ["case_id"])
    op.create_index("ix_routing_referrals_department_status", "routing_referrals", ["department", "status"])


def downgrade() -> None:
    op.drop_table("routing_referrals")
    with op.batch_alter_table("routing_cases") as batch:
        batch.drop_index("ix_routing_cases_status")
        for column in NEW_CASE_COLUMNS:
            batch.drop_column(column.name)
