"""kept clusters and incremental sweeps

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 09:40:00
"""

import sqlalchemy as sa
from alembic import op

from services.common.db import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("supervision_cases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cluster_key", sa.String(length=120), nullable=True))
        batch_op.add_column(sa.Column("changed_at", UTCDateTime, nullable=True))
        batch_op.add_column(sa.Column("nearest_due", UTCDateTime, nullable=True))
        batch_op.add_column(sa.Column("on_agenda", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.create_index("ix_supervision_cases_cluster", ["cluster_key"], unique=False)
        batch_op.create_index("ix_supervision_cases_changed", ["changed_at"], unique=False)
    with op.batch_alter_table("supervision_sweep_shards", schema=None) as batch_op:
        batch_op.add_column(sa.Column("started_at", UTCDateTime, nullable=True))
        batch_op.add_column(sa.Column("whole_on", sa.String(length=10), nullable=True))
        batch_op.add_column(sa.Column("whole_version", sa.String(length=12), nullable=True))
    with op.batch_alter_table("supervision_decisions", schema=None) as batch_op:
        batch_op.create_index("ix_supervision_decisions_subject", ["subject_id"], unique=False)
    op.execute("UPDATE supervision_cases SET changed_at = updated_at")
    op.execute(
        "UPDATE supervision_cases SET nearest_due = (SELECT min(r.due_at) FROM supervision_referrals r"
        " WHERE r.case_id = supervision_cases.case_id AND r.status IN ('referred', 'accepted'))"
    )
    op.execute(
        "UPDATE supervision_cases SET on_agenda = EXISTS (SELECT 1 FROM supervision_agenda_cases a"
        " WHERE a.case_id = supervision_cases.case_id)"
    )
    _cluster_existing_cases()


def _cluster_existing_cases() -> None:
    """Give the cases already projected their cluster keys, as the evaluation used to compute them
    (with the default policy's numbers; the next cases arriving use the configured ones)."""
    from services.supervision.clusters import Member, bigrams, cluster_key, clusters

    cases = sa.table(
        "supervision_cases",
        *[sa.column(name) for name in ("case_id", "category", "street", "title", "description", "status")],
        sa.column("received_at", UTCDateTime),  # read back as an instant on SQLite too
        sa.column("cluster_key"),
    )
    connection = op.get_bind()
    rows = connection.execute(sa.select(cases)).all()
    unresolved = [
        Member(r.case_id, r.category, r.street, r.received_at, bigrams(f"{r.title}\n{r.description or ''}"))
        for r in rows
        if r.status != "closed"
    ]
    keys = {case_id: key for case_id, (key, _) in clusters(unresolved, 30, 0.2).items()}
    for r in rows:
        key = keys.get(r.case_id) or cluster_key(r.category, r.street, r.case_id)
        connection.execute(sa.update(cases).where(cases.c.case_id == r.case_id).values(cluster_key=key))


def downgrade() -> None:
    with op.batch_alter_table("supervision_decisions", schema=None) as batch_op:
        batch_op.drop_index("ix_supervision_decisions_subject")
    with op.batch_alter_table("supervision_sweep_shards", schema=None) as batch_op:
        batch_op.drop_column("whole_version")
        batch_op.drop_column("whole_on")
        batch_op.drop_column("started_at")
    with op.batch_alter_table("supervision_cases", schema=None) as batch_op:
        batch_op.drop_index("ix_supervision_cases_changed")
        batch_op.drop_index("ix_supervision_cases_cluster")
        batch_op.drop_column("on_agenda")
        batch_op.drop_column("nearest_due")
        batch_op.drop_column("changed_at")
        batch_op.drop_column("cluster_key")
