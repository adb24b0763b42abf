"""routing keeps each case's own id in its source system, so that its first event about a case
carries what notify needs to address the notifications (no call to intake per event)

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("routing_cases") as batch:
        batch.add_column(sa.Column("external_id", sa.String(128)))


def downgrade() -> None:
    with op.batch_alter_table("routing_cases") as batch:
        batch.drop_column("external_id")
