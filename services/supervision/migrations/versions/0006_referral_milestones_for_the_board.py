"""when each referral was accepted, returned and replied (and whether on time), and when a case was
closed: the board's per-department rates and weekly charts read them from two tables

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

from services.common.db import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("supervision_referrals", schema=None) as batch_op:
        batch_op.add_column(sa.Column("accepted_at", UTCDateTime, nullable=True))
        batch_op.add_column(sa.Column("returned_at", UTCDateTime, nullable=True))
        batch_op.add_column(sa.Column("replied_at", UTCDateTime, nullable=True))
        batch_op.add_column(sa.Column("replied_on_time", sa.Boolean(), nullable=True))
        batch_op.create_index("ix_supervision_referrals_referred", ["referred_at"], unique=False)
    with op.batch_alter_table("supervision_cases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("closed_at", UTCDateTime, nullable=True))
        batch_op.create_index("ix_supervision_cases_received", ["received_at"], unique=False)
    _backfill_from_the_timeline()


def _backfill_from_the_timeline() -> None:
    """The milestones of what was projected before, from the whole-process record (the last of each
    kind wins, as the projection would have written it)."""
    timeline = sa.table(
        "supervision_timeline",
        sa.column("case_id"),
        sa.column("event_type"),
        sa.column("at", UTCDateTime),
        sa.column("details", sa.JSON),
    )
    referrals = sa.table(
        "supervision_referrals",
        sa.column("referral_id"),
        sa.column("due_at", UTCDateTime),
        *[sa.column(name, UTCDateTime) for name in ("accepted_at", "returned_at", "replied_at")],
        sa.column("replied_on_time", sa.Boolean),
    )
    cases = sa.table("supervision_cases", sa.column("case_id"), sa.column("closed_at", UTCDateTime))
    connection = op.get_bind()
    column = {"referral_accepted": "accepted_at", "referral_returned": "returned_at", "referral_replied": "replied_at"}
    milestones, closed = {}, {}
    steps = connection.execute(
        sa.select(timeline)
        .where(timeline.c.event_type.in_([*column, "case_closed", "case_reopened"]))
        .order_by(timeline.c.at)
    ).all()
    for step in steps:
        if step.event_type == "case_closed":
            closed[step.case_id] = step.at
        elif step.event_type == "case_reopened":
            closed[step.case_id] = None
        elif (step.details or {}).get("referral_id"):
            milestones.setdefault(step.details["referral_id"], {})[column[step.event_type]] = step.at
    due = dict(connection.execute(sa.select(referrals.c.referral_id, referrals.c.due_at)).all())
    for referral_id, values in milestones.items():
        if referral_id not in due:
            continue
        if values.get("replied_at"):
            values["replied_on_time"] = values["replied_at"] <= due[referral_id]
        connection.execute(sa.update(referrals).where(referrals.c.referral_id == referral_id).values(**values))
    for case_id, at in closed.items():
        connection.execute(sa.update(cases).where(cases.c.case_id == case_id).values(closed_at=at))


def downgrade() -> None:
    with op.batch_alter_table("supervision_cases", schema=None) as batch_op:
        batch_op.drop_index("ix_supervision_cases_received")
        batch_op.drop_column("closed_at")
    with op.batch_alter_table("supervision_referrals", schema=None) as batch_op:
        batch_op.drop_index("ix_supervision_referrals_referred")
        batch_op.drop_column("replied_on_time")
        batch_op.drop_column("replied_at")
        batch_op.drop_column("returned_at")
        batch_op.drop_column("accepted_at")
