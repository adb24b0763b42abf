"""Transactional outbox: an event is stored in the same transaction as the change it reports,
then published after the commit; a timer publishes whatever is still pending (broker down,
process killed between commit and publish). So an accepted change always gets its event out,
at least once; consumers are idempotent.
"""

import logging
import threading
import uuid

from kombu import Connection, Exchange, Producer
from nameko.extensions import DependencyProvider
from sqlalchemy import JSON, Column, Index, Integer, MetaData, String, Table, insert, select, update

from services.common.db import UTCDateTime
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
        self._lock = threading.Lock()  # green once eventlet has patched threading

    def __call__(self, routing_key: str, payload: dict):
        """As nameko's ``dispatch(event_type, payload)``: one message, confirmed."""
        self.publish_batch([(routing_key, payload)])

    def publish_batch(self, messages: list[tuple[str, dict]]):
        """Publish every ``(routing_key, payload)``; returns once the broker confirmed them all and
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
        self.publisher.close()

    def kill(self):
        self.publisher.close()

    def get_dependency(self, worker_ctx):
        return self.publisher


class OutboxRelay:
    """Publishes pending outbox rows in order; one relay runs at a time per process.

    A relay asked for while another runs is not dropped: the running one goes round again, so
    an event committed meanwhile goes out at once instead of waiting for the 1-second timer."""

    def __init__(self, table: Table, batch_size: int = 200):
        self.table = table
        self.batch_size = batch_size
        self._running = threading.Lock()  # green lock once eventlet has patched threading
        self._again = False

    def relay(self, sessions, dispatch) -> int:
        """``dispatch`` is a ``BatchPublisher`` (one confirm wait per batch) or any
        ``dispatch(event_type, payload)`` callable, such as nameko's event dispatcher."""
        self._again = True
        if not self._running.acquire(blocking=False):
            return 0  # the running relay sees _again and picks our rows up
        published = 0
        try:
            while self._again:
                self._again = False
                published += self._relay(sessions, dispatch)
            return published
        except Exception as exc:  # broker unreachable: rows stay pending for the next try
            log.warning("outbox %s: publishing deferred (%s)", self.table.name, exc)
            return published
        finally:
            self._running.release()

    def _relay(self, sessions, dispatch) -> int:
        # Read, publish, then mark — no database transaction stays open while the broker is
        # talked to. A crash between publish and mark publishes the rows again: at least once.
        publish_batch = getattr(dispatch, "publish_batch", None)
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
                if publish_batch is not None:
                    if rows:
                        publish_batch([(row.event_type, row.payload) for row in rows])
                    done = [row.id for row in rows]
                else:
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
