"""every word of the larger clusters' cases, so that a new case is compared with a cluster's
cases only when it shares enough words with the cluster (projection._peers); filled as clusters
are first needed, so nothing is backfilled

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

from services.common.db import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "supervision_cluster_words",
        sa.Column("cluster_key", sa.String(length=120), nullable=False),
        sa.Column("words", sa.Text(), nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("cluster_key"),
    )


def downgrade() -> None:
    op.drop_table("supervision_cluster_words")
