"""when the events that set each case's status, rating, lead department and category, and each
referral's status and extension, occurred, so that an older event projected late changes none
of them; and the steps on a referral that came before it, which its case_referred applies

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

from services.common.db import UTCDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

CASE_TIMES = ("status_at", "rated_at", "lead_at", "category_at")
# Which events set each of them; a case's is the latest such event in its timeline.
SET_BY = {
    "status_at": ("case_referred", "case_needs_triage", "case_reopened", "case_closed", "referral_replied"),
    "rated_at": ("feedback_received",),
    "lead_at": ("case_referred",),
    "category_at": ("case_referred", "case_needs_triage"),
}


def upgrade() -> None:
    with op.batch_alter_table("supervision_cases", schema=None) as batch_op:
        for name in CASE_TIMES:
            batch_op.add_column(sa.Column(name, UTCDateTime, nullable=True))
        batch_op.add_column(sa.Column("early_steps", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("supervision_referrals", schema=None) as batch_op:
        batch_op.add_column(sa.Column("status_at", UTCDateTime, nullable=True))
        batch_op.add_column(sa.Column("extension_at", UTCDateTime, nullable=True))
    for name, event_types in SET_BY.items():
        types = ", ".join(f"'{t}'" for t in event_types)
        op.execute(
            f"UPDATE supervision_cases SET {name} = (SELECT max(t.at) FROM supervision_timeline t"
            f" WHERE t.case_id = supervision_cases.case_id AND t.event_type IN ({types}))"
        )
    # A referral's last event (updated_at) is at least as late as the one that set its status or
    # extension: nothing older changes them any more.
    op.execute("UPDATE supervision_referrals SET status_at = updated_at WHERE status <> 'referred'")
    op.execute("UPDATE supervision_referrals SET extension_at = updated_at WHERE extension IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("supervision_referrals", schema=None) as batch_op:
        batch_op.drop_column("extension_at")
        batch_op.drop_column("status_at")
    # SQLite rebuilds the table to drop columns, and would bring this index back without its
    # DESC order: made again as 0008 made it.
    op.drop_index("ix_supervision_cases_open_by_cluster", table_name="supervision_cases")
    with op.batch_alter_table("supervision_cases", schema=None) as batch_op:
        batch_op.drop_column("early_steps")
        for name in reversed(CASE_TIMES):
            batch_op.drop_column(name)
    op.create_index(
        "ix_supervision_cases_open_by_cluster",
        "supervision_cases",
        ["street", "category", "cluster_key", sa.text("received_at DESC"), sa.text("case_id DESC")],
        postgresql_where=sa.text("status <> 'closed'"),
        sqlite_where=sa.text("status <> 'closed'"),
    )
