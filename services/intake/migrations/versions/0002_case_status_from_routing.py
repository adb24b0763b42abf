"""case status from routing: the responsible agency and the expected date

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


def upgrade() -> None:
    with op.batch_alter_table("intake_cases") as batch:
        batch.add_column(sa.Column("agency_responsible", sa.String(200)))
        batch.add_column(sa.Column("expected_at", UTCDateTime))


def downgrade() -> None:
    with op.batch_alter_table("intake_cases") as batch:
        batch.drop_column("expected_at")
        batch.drop_column("agency_responsible")
