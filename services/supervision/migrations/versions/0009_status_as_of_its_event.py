"""when the event that set each case's status and rating, and each referral's status and
extension, occurred, so that an older event projected late changes neither

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


def upgrade() -> None:
    with op.batch_alter_table("supervision_cases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("status_at", UTCDateTime, nullable=True))
        batch_op.add_column(sa.Column("rated_at", UTCDateTime, nullable=True))
    with op.batch_alter_table("supervision_referrals", schema=None) as batch_op:
        batch_op.add_column(sa.Column("status_at", UTCDateTime, nullable=True))
        batch_op.add_column(sa.Column("extension_at", UTCDateTime, nullable=True))
    # What was projected before: its last event (updated_at) is at least as late as the one that
    # set the status, so nothing older than it changes the status any more.
    op.execute("UPDATE supervision_cases SET status_at = updated_at WHERE status <> 'received'")
    op.execute("UPDATE supervision_cases SET rated_at = updated_at WHERE last_rating IS NOT NULL")
    op.execute("UPDATE supervision_referrals SET status_at = updated_at WHERE status <> 'referred'")
    op.execute("UPDATE supervision_referrals SET extension_at = updated_at WHERE extension IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("supervision_referrals", schema=None) as batch_op:
        batch_op.drop_column("extension_at")
        batch_op.drop_column("status_at")
    with op.batch_alter_table("supervision_cases", schema=None) as batch_op:
        batch_op.drop_column("rated_at")
        batch_op.drop_column("status_at")
