"""Transactional outbox: an event is stored in the same transaction as the change it reports,
then published after the commit; a timer publishes whatever is still pending (broker down,
process killed between commit and publish). So an accepted change always gets its event out,
at least once; consumers are idempotent.
"""

import logging
import threading
import uuid
from datetime import timedelta

from kombu import Connection, Exchange, Producer
from nameko.extensions import DependencyProvider
from sqlalchemy import JSON, Column, Index, Integer, MetaData, String, Table, insert, select, update

from services.common import metrics
from services.common.db import ON_COMMIT, UTCDateTime
from services.common.timeutil import now, to_cst
from services.common.topology import event_exchange

log = logging.getLogger(__name__)

CONFIRM_TIMEOUT = 10  # seconds to wait for the broker to confirm a batch


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
    return add_events(session, table, [(event_type, payload)])[0]


def add_events(session, table: Table, events: list[tuple[str, dict]]) -> list[dict]:
    """Queue ``(event_type, payload)`` events in the caller's transaction, in one statement;
    returns the payloads as they will be sent."""
    if not events:
        return []
    created = now()
    # Full precision: consumers order events by it.
    occurred_at = to_cst(created).isoformat()
    messages = [
        {"event_id": str(uuid.uuid4()), "event_type": event_type, "occurred_at": occurred_at, **payload}
        for event_type, payload in events
    ]
    session.execute(
        insert(table),
        [dict(event_id=m["event_id"], event_type=m["event_type"], payload=m, created_at=created) for m in messages],
    )
    # handed to the service's relay when the transaction commits (db.Database), to be published
    # from memory without being read back
    session.info.setdefault(ON_COMMIT, []).extend((table.name, m) for m in messages)
    return messages


class PublisherShut(RuntimeError):
    """A publish after the service stopped (``BatchPublisher.shut``)."""


class BatchPublisher:
    """Publishes batches of JSON messages to one exchange over one long-lived connection, in
    publisher confirm mode, waiting once for the broker to confirm the whole batch: a confirm
    round trip (and a pooled connection and channel) per message was most of the cost of
    publishing. Used by one greenthread at a time (the lock makes the others wait their turn)."""

    def __init__(self, amqp_uri: str, exchange: Exchange, declare=()):
        self.amqp_uri, self.exchange, self.declare = amqp_uri, exchange, list(declare)
        self.connection = self.channel = None
        self._sent = 0  # delivery tags are numbered per channel from 1
        self._unconfirmed: set[int] = set()
        self._refused = False
        self._shut = False
        self._lock = threading.Lock()  # green once eventlet has patched threading

    def __call__(self, routing_key: str, payload: dict | list):
        """As nameko's ``dispatch(event_type, payload)``: one message, confirmed."""
        self.publish_batch([(routing_key, payload)])

    def publish_batch(self, messages: list[tuple[str, dict | list]]):
        """Publish every ``(routing_key, body)``; returns once the broker confirmed them all and
        raises if it did not (then some may have gone out: the caller publishes them again)."""
        if not messages:
            return
        with self._lock:
            try:
                self._publish(messages)
            except Exception:
                self.close()  # a broken or stale connection: the next try starts afresh
                raise

    def _open(self):
        self.connection = Connection(self.amqp_uri, connect_timeout=5)
        channel = self.connection.channel()
        # topology.declare_all declares every queue at start; the exchange (and any queue given)
        # again here, as nameko's publishers did, in case this process started first.
        for entity in [self.exchange, *self.declare]:
            entity(channel).declare()
        channel.confirm_select()
        channel.events["basic_ack"].add(self._confirmed)
        channel.events["basic_nack"].add(self._refused_by_broker)
        self.channel, self._sent = channel, 0

    def _confirmed(self, tag: int, multiple: bool):
        # Confirms may come out of order, and one may cover every tag up to its own.
        self._unconfirmed -= {t for t in self._unconfirmed if t <= tag} if multiple else {tag}

    def _refused_by_broker(self, tag: int, multiple: bool):
        self._refused = True
        self._confirmed(tag, multiple)

    def _publish(self, messages):
        if self._shut:
            raise PublisherShut(f"the publisher to {self.exchange.name} has stopped with its service")
        if self.channel is None:
            self._open()
        producer = Producer(self.channel, exchange=self.exchange, serializer="json", auto_declare=False)
        self._unconfirmed, self._refused = set(), False
        for routing_key, payload in messages:
            producer.publish(payload, routing_key=routing_key, delivery_mode=2, retry=False)
            self._sent += 1
            self._unconfirmed.add(self._sent)
        while self._unconfirmed:
            self.connection.drain_events(timeout=CONFIRM_TIMEOUT)
        if self._refused:
            raise RuntimeError(f"the broker refused messages to {self.exchange.name}")

    def shut(self):
        """Close for good, as the service stops: work still finishing (an evaluation a stopping
        supervision waits for) must not open a connection that nothing would close. What it
        would have published stays pending in its outbox, for the next relay."""
        self._shut = True
        self.close()

    def close(self):
        connection, self.connection, self.channel = self.connection, None, None
        if connection is not None:
            try:
                connection.close()
            except Exception:  # already broken: nothing to close cleanly
                pass


class BatchPublishing(DependencyProvider):
    """Gives workers a ``BatchPublisher`` to ``exchange``; by default the service's event
    exchange, and then callable as nameko's ``dispatch(event_type, payload)``."""

    def __init__(self, exchange: Exchange | None = None, declare=()):
        self.exchange, self.declare = exchange, declare

    def setup(self):
        exchange = self.exchange or event_exchange(self.container.service_name)
        self.publisher = BatchPublisher(self.container.config["AMQP_URI"], exchange, self.declare)

    def stop(self):
        self.publisher.shut()

    def kill(self):
        self.publisher.shut()

    def get_dependency(self, worker_ctx):
        return self.publisher


class OutboxRelay:
    """Publishes a service's outbox events; one relay runs at a time per process.

    ``relay`` (after each commit) publishes the events this process has just committed, from
    memory, and notes their ids; ``relay_pending`` (the 1-second timer) marks those published in
    the table with one statement, then publishes whatever is still pending for longer than
    ``grace``: events whose publish failed (broker down), or whose process died between commit
    and publish, or that a process which does not relay committed. So an event costs no
    database round trip of its own to get out, and still goes out at least once: a crash before
    the marking publishes it again, and consumers are idempotent. (The grace keeps one replica's
    timer from sending what another replica has just sent and not yet marked.)"""

    def __init__(self, table: Table, batch_size: int = 200, grace: timedelta = timedelta(seconds=2)):
        self.table = table
        self.batch_size = batch_size
        self.grace = grace
        self._running = threading.Lock()  # green lock once eventlet has patched threading
        self._sent: list[str] = []  # event ids published and not yet marked in the table

    def relay(self, sessions, dispatch) -> int:
        """Publish the events committed in this process. ``dispatch`` is a ``BatchPublisher``
        (one confirm wait per batch) or any ``dispatch(event_type, payload)`` callable."""
        if not self._running.acquire(blocking=False):
            return 0  # the running relay goes on until no committed event is left
        try:
            return self._publish_committed(sessions, dispatch)
        finally:
            self._running.release()

    def relay_pending(self, sessions, dispatch) -> int:
        """The timer's part (see the class)."""
        with self._running:
            published = self._publish_committed(sessions, dispatch)
            try:
                self._mark_sent(sessions)
                published += self._publish_pending(sessions, dispatch)
            except Exception as exc:  # broker or database unreachable: the next tick tries again
                log.warning("outbox %s: publishing deferred (%s)", self.table.name, exc)
            # Workers that committed meanwhile found the relay busy and left their events to us.
            return published + self._publish_committed(sessions, dispatch)

    def _publish_committed(self, sessions, dispatch) -> int:
        committed, published = getattr(sessions, "committed", {}).get(self.table.name, []), 0
        while committed:
            batch = committed[: self.batch_size]
            del committed[: len(batch)]  # before publishing: others append while we wait for it
            try:
                _publish(dispatch, [(m["event_type"], m) for m in batch])
            except Exception as exc:  # still pending in the table: relay_pending sends them
                log.warning("outbox %s: publishing deferred (%s)", self.table.name, exc)
                return published
            self._sent += [m["event_id"] for m in batch]
            published += len(batch)
            self._count(batch)
        return published

    def _count(self, events: list[dict]):
        """Metrics, and one log line per event carrying its case id: a case's whole trail through
        the services can be followed in their JSON logs (``case_id``)."""
        service = self.table.name.removesuffix("_outbox")
        for event in events:
            metrics.count_published(service, event)
            log.info(
                "%s published",
                event["event_type"],
                extra={
                    "case_id": event.get("case_id"),
                    "event_type": event["event_type"],
                    "event_id": event.get("event_id"),
                },
            )

    def _mark_sent(self, sessions):
        while self._sent:
            ids = self._sent[:1000]
            with sessions.begin() as session:
                session.execute(update(self.table).where(self.table.c.event_id.in_(ids)).values(published_at=now()))
            del self._sent[: len(ids)]

    def _publish_pending(self, sessions, dispatch) -> int:
        # Read, publish, then mark — no database transaction stays open while the broker is
        # talked to. A crash between publish and mark publishes the rows again: at least once.
        published = 0
        while True:
            with sessions() as session:
                rows = session.execute(
                    select(self.table.c.id, self.table.c.event_type, self.table.c.payload)
                    .where(self.table.c.published_at.is_(None), self.table.c.created_at < now() - self.grace)
                    .order_by(self.table.c.id)
                    .limit(self.batch_size)
                ).all()
            if rows:
                _publish(dispatch, [(row.event_type, row.payload) for row in rows])
                self._count([{**row.payload, "event_type": row.event_type} for row in rows])
                with sessions.begin() as session:
                    session.execute(
                        update(self.table).where(self.table.c.id.in_([r.id for r in rows])).values(published_at=now())
                    )
                published += len(rows)
            if len(rows) < self.batch_size:
                return published


EVENTS_PER_MESSAGE = 50


def envelopes(events: list[tuple[str, dict]]) -> list[tuple[str, dict | list]]:
    """The messages that carry ``(event type, payload)`` events: those of one type together, up
    to ``EVENTS_PER_MESSAGE`` in a message whose body is their list (one alone is the payload
    itself). A message per event cost the broker, and every consumer, most of a case's share
    (bench/e2e.py); consumers take both (events.ReliableEventHandler.items_of)."""
    by_type: dict[str, list] = {}
    for event_type, payload in events:
        by_type.setdefault(event_type, []).append(payload)
    messages = []
    for event_type, payloads in by_type.items():
        for start in range(0, len(payloads), EVENTS_PER_MESSAGE):
            chunk = payloads[start : start + EVENTS_PER_MESSAGE]
            messages.append((event_type, chunk if len(chunk) > 1 else chunk[0]))
    return messages


def _publish(dispatch, events: list[tuple[str, dict]]):
    publish_batch = getattr(dispatch, "publish_batch", None)
    if publish_batch is not None:
        publish_batch(envelopes(events))
    else:
        for event_type, payload in events:
            dispatch(event_type, payload)
