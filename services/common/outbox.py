"""Transactional outbox: an event is stored in the same transaction as the change it reports,
then published after the commit; a timer publishes whatever is still pending (broker down,
process killed between commit and publish). So an accepted change always gets its event out,
at least once; consumers are idempotent.
"""

import logging
import threading
import uuid

from sqlalchemy import JSON, Column, Index, Integer, MetaData, String, Table, insert, select, update

from services.common.db import UTCDateTime
from services.common.timeutil import now, to_cst

log = logging.getLogger(__name__)


def outbox_table(metadata: MetaData, service: str) -> Table:
    name = f"{service}_outbox"
    return Table(
        name,
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("event_id", String(36), nullable=False, unique=True),
        Column("event_type", String(64), nullable=False),
        Column("payload", JSON, nullable=False),
        Column("created_at", UTCDateTime, nullable=False),
        Column("published_at", UTCDateTime, nullable=True),
        Index(f"ix_{name}_pending", "published_at", "id"),
    )


def add_event(session, table: Table, event_type: str, payload: dict) -> dict:
    """Queue an event in the caller's transaction; returns the payload as it will be sent."""
    created = now()
    # Full precision: consumers order events by it.
    message = {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "occurred_at": to_cst(created).isoformat(),
        **payload,
    }
    session.execute(
        insert(table).values(event_id=message["event_id"], event_type=event_type, payload=message, created_at=created)
    )
    return message


class OutboxRelay:
    """Publishes pending outbox rows in order; one relay runs at a time per process."""

    def __init__(self, table: Table, batch_size: int = 200):
        self.table = table
        self.batch_size = batch_size
        self._running = threading.Lock()  # green lock once eventlet has patched threading

    def relay(self, sessions, dispatch) -> int:
        if not self._running.acquire(blocking=False):
            return 0  # another greenthread is relaying; it will pick our rows up
        try:
            return self._relay(sessions, dispatch)
        except Exception as exc:  # broker unreachable: rows stay pending for the next try
            log.warning("outbox %s: publishing deferred (%s)", self.table.name, exc)
            return 0
        finally:
            self._running.release()

    def _relay(self, sessions, dispatch) -> int:
        # Read, publish, then mark — no database transaction stays open while the broker is
        # talked to. A crash between publish and mark publishes the row again: at least once.
        published = 0
        while True:
            with sessions() as session:
                rows = session.execute(
                    select(self.table.c.id, self.table.c.event_type, self.table.c.payload)
                    .where(self.table.c.published_at.is_(None))
                    .order_by(self.table.c.id)
                    .limit(self.batch_size)
                ).all()
            done = []
            try:
                for row in rows:
                    dispatch(row.event_type, row.payload)
                    done.append(row.id)
            finally:
                if done:
                    with sessions.begin() as session:
                        session.execute(update(self.table).where(self.table.c.id.in_(done)).values(published_at=now()))
                    published += len(done)
            if len(rows) < self.batch_size:
                return published
