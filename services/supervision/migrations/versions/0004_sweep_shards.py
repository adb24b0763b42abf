"""sweep shards: the periodic sweep shared among replicas

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 06:40:00
"""

import sqlalchemy as sa
from alembic import op

from services.common.db import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "supervision_sweep_shards",
        sa.Column("street", sa.String(length=64), nullable=False),
        sa.Column("category", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=100), nullable=True),
        sa.Column("lease_until", UTCDateTime, nullable=True),
        sa.Column("swept_at", UTCDateTime, nullable=True),
        sa.Column("swept_by", sa.String(length=100), nullable=True),
        sa.Column("evaluated", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("street", "category"),
    )
    with op.batch_alter_table("supervision_cases", schema=None) as batch_op:
        batch_op.create_index("ix_supervision_cases_shard", ["street", "category"], unique=False)
    # The shards of the cases already projected; new ones are registered as cases arrive.
    op.execute(
        "INSERT INTO supervision_sweep_shards (street, category)"
        " SELECT DISTINCT COALESCE(street, ''), COALESCE(category, '') FROM supervision_cases"
    )


def downgrade() -> None:
    with op.batch_alter_table("supervision_cases", schema=None) as batch_op:
        batch_op.drop_index("ix_supervision_cases_shard")
    op.drop_table("supervision_sweep_shards")
