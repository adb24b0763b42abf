"""an index of each shard's open cases by cluster and most recent first, the order in which
placing a new case reads them (projection._peers)

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_supervision_cases_open_by_cluster",
        "supervision_cases",
        ["street", "category", "cluster_key", sa.text("received_at DESC"), sa.text("case_id DESC")],
        postgresql_where=sa.text("status <> 'closed'"),
        sqlite_where=sa.text("status <> 'closed'"),
    )


def downgrade() -> None:
    op.drop_index("ix_supervision_cases_open_by_cluster", table_name="supervision_cases")
