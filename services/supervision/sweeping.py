"""The periodic sweep, shared among supervision replicas without overlap.

Unresolved cases are split into shards by (street, category): similar cases (类案) share both, so
each shard holds whole clusters and can be evaluated on its own. The projection registers a
shard when it first sees a case in it (projection.register_shard). A replica takes a shard that is
due (not swept within the interval) and not leased, by a conditional UPDATE that only one replica
can win; it sweeps it and gives it back marked as swept. A replica killed mid-sweep holds its
lease until ``lease_seconds`` pass; then another replica takes the shard over. Whatever a killed
replica had already decided stays decided once: every decision has a unique key
(escalation.py), so a shard swept twice never acts twice.
"""

import os
import socket
import uuid
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update

from services.supervision.models import case_projection, sweep_shards

NONE = ""  # the shard key of cases with no street or no category


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


def claim_shard(session, owner: str, at: datetime, interval_seconds: int, lease_seconds: int):
    """Lease one due shard to ``owner``; ``(street, category)`` or None when none is due."""
    free = or_(sweep_shards.c.lease_until.is_(None), sweep_shards.c.lease_until < at)
    due = or_(sweep_shards.c.swept_at.is_(None), sweep_shards.c.swept_at <= at - timedelta(seconds=interval_seconds))
    candidates = session.execute(
        select(sweep_shards.c.street, sweep_shards.c.category)
        .where(free, due)
        .order_by(sweep_shards.c.swept_at.is_not(None), sweep_shards.c.swept_at)
        .limit(8)
    ).all()
    for street, category in candidates:
        # The same conditions again in the UPDATE: PostgreSQL re-checks them against a row another
        # replica just leased (and SQLite runs one writer at a time), so only one replica wins.
        won = session.execute(
            update(sweep_shards)
            .where(sweep_shards.c.street == street, sweep_shards.c.category == category, free, due)
            .values(owner=owner, lease_until=at + timedelta(seconds=lease_seconds))
        ).rowcount
        if won:
            return street, category
    return None


def release_shard(session, shard: tuple[str, str], owner: str, at: datetime, evaluated: int) -> bool:
    """Mark a shard swept by ``owner``; False if its lease had run out and another took it."""
    street, category = shard
    return bool(
        session.execute(
            update(sweep_shards)
            .where(sweep_shards.c.street == street, sweep_shards.c.category == category, sweep_shards.c.owner == owner)
            .values(owner=None, lease_until=None, swept_at=at, swept_by=owner, evaluated=evaluated)
        ).rowcount
    )
