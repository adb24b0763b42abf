"""when the events that set each case's status, rating, lead department and category, and each
referral's status and extension, occurred, so that an older event projected late changes none
of them; and the steps on a referral that came before it, which its case_referred applies.

What the projection wrote before may be wrong where events came out of order (a step on a
referral not projected yet was dropped; a case_reopened projected after the round it opened set
the status back): the upgrade replays each case's timeline, in the order the events occurred,
and writes what differs.

Revision ID: 0009
Revises: 0008
"""

import itertools
from datetime import datetime

import sqlalchemy as sa
from alembic import op

from services.common.db import UTCDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

CASE_TIMES = ("status_at", "rated_at", "lead_at", "category_at")
CASE_STATUS = {
    "case_referred": "referred",
    "case_needs_triage": "triage",
    "case_reopened": "reopened",
    "case_closed": "closed",
}
REFERRAL_STATUS = {"referral_accepted": "accepted", "referral_returned": "returned", "referral_replied": "replied"}
MILESTONE = {"referral_accepted": "accepted_at", "referral_returned": "returned_at", "referral_replied": "replied_at"}
EXTENSION = {"extension_requested": "requested", "extension_granted": "granted", "extension_refused": "refused"}
STEPS = (*REFERRAL_STATUS, *EXTENSION)
ROWS_PER_FETCH = 5000

cases = sa.table(
    "supervision_cases",
    sa.column("case_id"),
    sa.column("status"),
    sa.column("last_rating"),
    sa.column("closed_at", UTCDateTime),
    *[sa.column(name, UTCDateTime) for name in CASE_TIMES],
    sa.column("early_steps", sa.Integer),
    sa.column("nearest_due", UTCDateTime),
)
referrals = sa.table(
    "supervision_referrals",
    sa.column("referral_id"),
    sa.column("case_id"),
    sa.column("status"),
    sa.column("extension"),
    sa.column("due_at", UTCDateTime),
    *[sa.column(name, UTCDateTime) for name in ("accepted_at", "returned_at", "replied_at")],
    sa.column("replied_on_time", sa.Boolean),
    sa.column("status_at", UTCDateTime),
    sa.column("extension_at", UTCDateTime),
)
timeline = sa.table(
    "supervision_timeline",
    sa.column("id"),
    sa.column("case_id"),
    sa.column("event_type"),
    sa.column("at", UTCDateTime),
    sa.column("details", sa.JSON),
)


def upgrade() -> None:
    with op.batch_alter_table("supervision_cases", schema=None) as batch_op:
        for name in CASE_TIMES:
            batch_op.add_column(sa.Column(name, UTCDateTime, nullable=True))
        batch_op.add_column(sa.Column("early_steps", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("supervision_referrals", schema=None) as batch_op:
        batch_op.add_column(sa.Column("status_at", UTCDateTime, nullable=True))
        batch_op.add_column(sa.Column("extension_at", UTCDateTime, nullable=True))
    _times_from_the_timelines()
    _replay_the_timelines()


def _latest(event_types, owner=None) -> sa.ScalarSelect:
    """The time of a case's latest event of ``event_types``; with ``owner`` (a referral), of its
    latest such step."""
    t = timeline.alias()
    if owner is None:
        condition = t.c.case_id == cases.c.case_id
    else:
        condition = (t.c.case_id == owner.c.case_id) & (t.c.details["referral_id"].as_string() == owner.c.referral_id)
    return sa.select(sa.func.max(t.c.at)).where(condition, t.c.event_type.in_(list(event_types))).scalar_subquery()


def _times_from_the_timelines() -> None:
    """Every row's times, set-wise: one UPDATE a table, so each row is written once (the
    timeline's index by case makes each subquery a short walk). Whether a referral_replied set
    its case's status the timeline does not say: it counts only for a case whose status is
    'replied'."""
    op.execute(
        sa.update(cases).values(
            status_at=sa.case(
                (cases.c.status == "replied", _latest([*CASE_STATUS, "referral_replied"])),
                else_=_latest(CASE_STATUS),
            ),
            rated_at=_latest(["feedback_received"]),
            lead_at=_latest(["case_referred"]),
            category_at=_latest(["case_referred", "case_needs_triage"]),
        )
    )
    op.execute(
        sa.update(referrals).values(
            status_at=_latest(REFERRAL_STATUS, referrals), extension_at=_latest(EXTENSION, referrals)
        )
    )


def _replay_the_timelines() -> None:
    """Each case, its referrals and its timeline, read as three streams in case order (one pass,
    one case in memory at a time): where the projection lost a step or let an older event win,
    the replay differs from the row, and that is written — on PostgreSQL every few thousand
    changes, beside the streams' server-side cursors; on SQLite (small installations) once they
    have ended, since it leaves a write under an open read undefined."""
    connection = op.get_bind()
    # One order for the three streams, and Python's: bytewise (a locale's collation may differ)
    by_case = (lambda c: sa.collate(c, "C")) if connection.dialect.name == "postgresql" else (lambda c: c)

    def stream(query):
        return connection.execute(query.execution_options(stream_results=True, yield_per=ROWS_PER_FETCH))

    case_rows = stream(sa.select(cases).order_by(by_case(cases.c.case_id)))
    referral_rows = _ByCase(
        stream(sa.select(referrals).order_by(by_case(referrals.c.case_id), referrals.c.referral_id))
    )
    steps = _ByCase(
        stream(
            sa.select(timeline.c.case_id, timeline.c.event_type, timeline.c.at, timeline.c.details)
            .where(timeline.c.event_type.in_([*CASE_STATUS, *STEPS, "feedback_received"]))
            .order_by(by_case(timeline.c.case_id), timeline.c.at, timeline.c.id)
        )
    )
    write_as_we_go = connection.dialect.name == "postgresql"
    case_changes, referral_changes, changed_cases = [], [], set()
    for case in case_rows:
        its_referrals = {r.referral_id: r for r in referral_rows.take(case.case_id)}
        its_steps = steps.take(case.case_id)
        case_changes += _changed("case_id", case, _case_replayed(case, its_steps, its_referrals))
        for referral_id, referral in its_referrals.items():
            named = [s for s in its_steps if (s.details or {}).get("referral_id") == referral_id]
            changed = _changed("referral_id", referral, _referral_replayed(referral, named))
            referral_changes += changed
            if changed:
                changed_cases.add(case.case_id)
        if write_as_we_go and len(case_changes) + len(referral_changes) >= ROWS_PER_FETCH:
            changed_cases |= _write(connection, case_changes, referral_changes)
    changed_cases |= _write(connection, case_changes, referral_changes)
    _nearest_due_again(connection, sorted(changed_cases))


def _write(connection, case_changes: list, referral_changes: list) -> set:
    """Write the changes (and empty the lists): one executemany per table and set of columns.
    Returns the cases changed."""
    for table, key, changes in (
        (cases, cases.c.case_id, case_changes),
        (referrals, referrals.c.referral_id, referral_changes),
    ):
        for column_set, rows in itertools.groupby(sorted(changes, key=_columns), key=_columns):
            statement = (
                sa.update(table)
                .where(key == sa.bindparam("b_key"))
                .values({column: sa.bindparam(f"b_{column}", type_=table.c[column].type) for column in column_set})
            )
            connection.execute(statement, list(rows))
    written = {row["b_key"] for row in case_changes}
    case_changes.clear()
    referral_changes.clear()
    return written


def _nearest_due_again(connection, changed_cases: list) -> None:
    nearest_due = (
        sa.select(sa.func.min(referrals.c.due_at))
        .where(referrals.c.case_id == cases.c.case_id, referrals.c.status.in_(("referred", "accepted")))
        .scalar_subquery()
    )
    for start in range(0, len(changed_cases), 1000):
        connection.execute(
            sa.update(cases)
            .where(cases.c.case_id.in_(changed_cases[start : start + 1000]))
            .values(nearest_due=nearest_due)
        )


class _ByCase:
    """Rows ordered by case_id, taken case by case as the cases' stream goes by."""

    def __init__(self, rows):
        self._groups = itertools.groupby(rows, key=lambda row: row.case_id)
        self._next = next(self._groups, None)

    def take(self, case_id: str) -> list:
        while self._next is not None and self._next[0] < case_id:  # rows of cases that are gone
            self._next = next(self._groups, None)
        if self._next is None or self._next[0] != case_id:
            return []
        rows = list(self._next[1])
        self._next = next(self._groups, None)
        return rows


def _case_replayed(case, steps: list, referrals: dict) -> dict:
    """The case's status (with its closing time), its last rating and its count of steps on no
    referral, as the projection now keeps them; the times are set already
    (``_times_from_the_timelines``). Whether a referral_replied set the case's status the timeline
    does not say: after the latest status event, any reply leaves the status as it is."""
    values = {}
    statuses = [s for s in steps if s.event_type in CASE_STATUS]
    if statuses:
        latest = statuses[-1]
        if not any(s.event_type == "referral_replied" and s.at > latest.at for s in steps):
            values["status"] = CASE_STATUS[latest.event_type]
        closings = [s for s in statuses if s.event_type == "case_closed"]
        closed = values.get("status", case.status) == "closed" and closings
        values["closed_at"] = closings[-1].at if closed else None
    ratings = [s for s in steps if s.event_type == "feedback_received"]
    if ratings:
        values["last_rating"] = (ratings[-1].details or {}).get("rating", case.last_rating)
    values["early_steps"] = sum(
        1 for s in steps if s.event_type in STEPS and (s.details or {}).get("referral_id") not in referrals
    )
    return values


def _referral_replayed(referral, steps: list) -> dict:
    """The referral's status, extension, due date and milestones from its steps (the last of each
    kind wins, as in 0006; a granted extension only moves the date later); the times are set
    already."""
    values = {}
    for step in steps:
        details = step.details or {}
        if step.event_type in REFERRAL_STATUS:
            values["status"] = REFERRAL_STATUS[step.event_type]
            values[MILESTONE[step.event_type]] = step.at
        if step.event_type in EXTENSION:
            values["extension"] = EXTENSION[step.event_type]
        if step.event_type == "extension_granted" and details.get("due_at"):
            granted = datetime.fromisoformat(details["due_at"])
            values["due_at"] = max(granted, values.get("due_at", referral.due_at))
        if step.event_type == "referral_replied" and "on_time" in details:
            values["replied_on_time"] = bool(details["on_time"])
    return values


def _changed(key: str, row, values: dict) -> list[dict]:
    """``values`` that differ from ``row``'s, as the parameters of one update (none if none)."""
    different = {k: v for k, v in values.items() if getattr(row, k) != v}
    return [{"b_key": getattr(row, key), **{f"b_{k}": v for k, v in different.items()}}] if different else []


def _columns(change: dict) -> tuple:
    return tuple(sorted(k[2:] for k in change if k != "b_key"))


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
