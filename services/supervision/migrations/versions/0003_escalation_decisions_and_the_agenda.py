"""escalation decisions and the agenda

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 04:26:22.852371
"""

import sqlalchemy as sa
from alembic import op

from services.common.db import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "supervision_agenda",
        sa.Column("id", sa.String(length=20), nullable=False),
        sa.Column("kind", sa.String(length=24), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("rule_id", sa.String(length=100), nullable=False),
        sa.Column("scope", sa.String(length=10), nullable=False),
        sa.Column("subject_id", sa.String(length=120), nullable=False),
        sa.Column("title", sa.String(length=300), nullable=False),
        sa.Column("scheduled_for", sa.String(length=10), nullable=True),
        sa.Column("findings", sa.Text(), nullable=True),
        sa.Column("history", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("kind", "rule_id", "subject_id", name="uq_supervision_agenda_subject"),
    )
    op.create_table(
        "supervision_counters",
        sa.Column("name", sa.String(length=20), nullable=False),
        sa.Column("last_number", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "supervision_decisions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("rule_id", sa.String(length=100), nullable=False),
        sa.Column("action", sa.String(length=40), nullable=False),
        sa.Column("scope", sa.String(length=10), nullable=False),
        sa.Column("subject_id", sa.String(length=120), nullable=False),
        sa.Column("dedupe_key", sa.String(length=64), nullable=False),
        sa.Column("case_ids", sa.JSON(), nullable=False),
        sa.Column("agenda_id", sa.String(length=20), nullable=True),
        sa.Column("ruleset_version", sa.String(length=12), nullable=False),
        sa.Column("facts", sa.JSON(), nullable=False),
        sa.Column("evaluated_at", UTCDateTime, nullable=False),
        sa.Column("recorded_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("rule_id", "action", "subject_id", "dedupe_key", name="uq_supervision_decisions_once"),
    )
    op.create_table(
        "supervision_rule_versions",
        sa.Column("version", sa.String(length=12), nullable=False),
        sa.Column("loaded_at", UTCDateTime, nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("changes", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("version"),
    )
    op.create_table(
        "supervision_agenda_cases",
        sa.Column("agenda_id", sa.String(length=20), nullable=False),
        sa.Column("case_id", sa.String(length=32), nullable=False),
        sa.Column("added_at", UTCDateTime, nullable=False),
        sa.ForeignKeyConstraint(
            ["agenda_id"],
            ["supervision_agenda.id"],
        ),
        sa.PrimaryKeyConstraint("agenda_id", "case_id"),
    )
    with op.batch_alter_table("supervision_agenda_cases", schema=None) as batch_op:
        batch_op.create_index("ix_supervision_agenda_cases_case", ["case_id"], unique=False)

    with op.batch_alter_table("supervision_cases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("description", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("supervision_cases", schema=None) as batch_op:
        batch_op.drop_column("description")

    with op.batch_alter_table("supervision_agenda_cases", schema=None) as batch_op:
        batch_op.drop_index("ix_supervision_agenda_cases_case")

    op.drop_table("supervision_agenda_cases")
    op.drop_table("supervision_rule_versions")
    op.drop_table("supervision_decisions")
    op.drop_table("supervision_counters")
    op.drop_table("supervision_agenda")
