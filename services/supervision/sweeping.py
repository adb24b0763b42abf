"""The periodic sweep, shared among supervision replicas without overlap.

Unresolved cases are split into shards by (street, category): similar cases (类案) share both, so
each shard holds whole clusters and can be evaluated on its own. The projection registers a
shard when it first sees a case in it (projection.register_shard). A replica takes a shard that is
due (not swept within the interval) and not leased, by a conditional UPDATE that only one replica
can win; it sweeps it and gives it back marked as swept. A replica killed mid-sweep holds its
lease until ``lease_seconds`` pass; then another replica takes the shard over. Whatever a killed
replica had already decided stays decided once: every decision has a unique key
(escalation.py), so a shard swept twice never acts twice.

Sweeps are incremental. The time-based facts (working days to a deadline, overdue, since
referral) change only when a working day begins in China, so a shard is evaluated whole on its
first pass of each working day and after the rules change; every other pass takes only the
clusters with a case changed (by an event, or by joining the agenda) since the previous pass
began.
"""

import os
import socket
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from sqlalchemy import and_, or_, select, update

from services.supervision.models import case_projection, sweep_shards

NONE = ""  # the shard key of cases with no street or no category
# An incremental pass looks back this far before the previous pass began: a change committed
# just after that pass took its snapshot carries a slightly earlier time (evaluating a case twice
# is harmless, missing one is not).
OVERLAP = timedelta(seconds=30)


@dataclass(frozen=True)
class Claim:
    """A shard leased to one replica, and what its previous pass left."""

    street: str
    category: str
    started_at: datetime | None  # when the previous completed pass began
    whole_on: str | None  # the China date of its last whole pass
    whole_version: str | None  # the ruleset version of that pass

    @property
    def shard(self) -> tuple[str, str]:
        return self.street, self.category

    def changed_since(self, today: date, version: str, calendar) -> datetime | None:
        """None: evaluate the shard whole (a working day began since its last whole pass, the
        rules changed, or it was never swept); else the moment from which changed clusters must
        be evaluated. Working-day counts do not move on weekends and holidays, so neither do the
        time-based facts: those days need no whole pass."""
        if self.whole_on is None or self.whole_version != version or self.started_at is None:
            return None
        if calendar.working_days_between(date.fromisoformat(self.whole_on), today) > 0:
            return None
        return self.started_at - OVERLAP


def replica_name() -> str:
    """Who holds a lease: host, process and a random part (a restarted process is someone new)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def shard_filter(shard: tuple[str, str]):
    """The cases of one shard, as a condition on the projection."""
    street, category = shard
    street_col, category_col = case_projection.c.street, case_projection.c.category
    return and_(
        street_col.is_(None) if street == NONE else street_col == street,
        category_col.is_(None) if category == NONE else category_col == category,
    )


def open_shards(session) -> list[tuple[str, str]]:
    """The shards that hold unresolved cases, for a whole sweep."""
    street, category = case_projection.c.street, case_projection.c.category
    rows = session.execute(
        select(street, category).where(case_projection.c.status != "closed").group_by(street, category)
    ).all()
    return sorted({(s or NONE, c or NONE) for s, c in rows})


def claim_shard(session, owner: str, at: datetime, interval_seconds: int, lease_seconds: int) -> Claim | None:
    """Lease one due shard to ``owner``; None when none is due."""
    free = or_(sweep_shards.c.lease_until.is_(None), sweep_shards.c.lease_until < at)
    due = or_(sweep_shards.c.swept_at.is_(None), sweep_shards.c.swept_at <= at - timedelta(seconds=interval_seconds))
    candidates = session.execute(
        select(
            sweep_shards.c.street,
            sweep_shards.c.category,
            sweep_shards.c.started_at,
            sweep_shards.c.whole_on,
            sweep_shards.c.whole_version,
        )
        .where(free, due)
        .order_by(sweep_shards.c.swept_at.is_not(None), sweep_shards.c.swept_at)
        .limit(8)
    ).all()
    for street, category, started_at, whole_on, whole_version in candidates:
        # The same conditions again in the UPDATE: PostgreSQL re-checks them against a row another
        # replica just leased (and SQLite runs one writer at a time), so only one replica wins.
        won = session.execute(
            update(sweep_shards)
            .where(sweep_shards.c.street == street, sweep_shards.c.category == category, free, due)
            .values(owner=owner, lease_until=at + timedelta(seconds=lease_seconds))
        ).rowcount
        if won:
            return Claim(street, category, started_at, whole_on, whole_version)
    return None


def release_shard(
    session,
    shard: tuple[str, str],
    owner: str,
    at: datetime,
    evaluated: int,
    started_at: datetime | None = None,
    whole: tuple[str, str] | None = None,
) -> bool:
    """Mark a shard swept by ``owner`` (a pass that began at ``started_at``; ``whole``: the China
    date and ruleset version of a whole pass); False if its lease had run out and another took it."""
    street, category = shard
    values = dict(owner=None, lease_until=None, swept_at=at, swept_by=owner, evaluated=evaluated)
    if started_at is not None:
        values["started_at"] = started_at
    if whole is not None:
        values["whole_on"], values["whole_version"] = whole
    return bool(
        session.execute(
            update(sweep_shards)
            .where(sweep_shards.c.street == street, sweep_shards.c.category == category, sweep_shards.c.owner == owner)
            .values(**values)
        ).rowcount
    )
