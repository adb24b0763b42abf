"""Delayed redelivery by RabbitMQ: a message to be tried again later waits in a retry queue for
its own TTL, then RabbitMQ dead-letters it back onto its work queue. No worker sleeps, nothing is
lost if the service stops meanwhile, and the delay grows with each attempt. After the last
attempt the message is parked in a dead-letter queue with the reason."""

import logging
from dataclasses import dataclass
from functools import partial

from kombu import Exchange, Queue
from nameko.amqp.publish import Publisher
from nameko.messaging import QueueConsumer

from services.common.batching import Batching
from services.common.timeutil import iso, now
from services.common.topology import WorkQueue

log = logging.getLogger(__name__)

ATTEMPTS_HEADER = "x-huiying-attempts"
REASON_HEADER = "x-huiying-reason"
QUEUE_HEADER = "x-huiying-queue"  # the queue a parked message came from
DEAD_AT_HEADER = "x-huiying-dead-at"


def retry_queue(name: str, work_exchange: Exchange, routing_key: str) -> tuple[Exchange, WorkQueue]:
    exchange = Exchange(f"{name}.retry", type="direct", durable=True)
    queue = WorkQueue(
        f"{name}.retry",
        exchange=exchange,
        routing_key=routing_key,
        queue_arguments={"x-dead-letter-exchange": work_exchange.name, "x-dead-letter-routing-key": routing_key},
    )
    return exchange, queue


def backoff_seconds(attempt: int, cap: int = 3600) -> int:
    """1, 2, 4, 8 … seconds, at most ``cap``."""
    return min(cap, 2 ** max(0, attempt - 1))


def publish_raw(
    amqp_uri: str,
    exchange: Exchange,
    queue: Queue,
    routing_key: str,
    body,
    content_type: str | None,
    headers: dict,
    **properties,
):
    """Publish a message body as it came (bytes), declaring where it goes first."""
    if isinstance(body, str):  # py-amqp hands over text when the sender set a content encoding
        body = body.encode("utf-8", "surrogateescape")
    Publisher(amqp_uri, exchange=exchange, declare=[exchange, queue]).publish(
        body,
        routing_key=routing_key,
        content_type=content_type or "application/octet-stream",
        content_encoding="binary",
        headers=headers,
        **properties,
    )


@dataclass(frozen=True)
class DeadLetterQueue:
    """Where messages that cannot be handled are parked, with the reason, for a person to look at."""

    exchange: Exchange
    queue: Queue
    routing_key: str

    def park(self, amqp_uri: str, body, content_type, headers, reason: str, from_queue: str | None = None):
        """Publish ``body`` as it came, its headers kept, with the reason (and the queue it left)."""
        extra = {REASON_HEADER: reason[:1000], DEAD_AT_HEADER: iso(now())}
        if from_queue:
            extra[QUEUE_HEADER] = from_queue
        publish_raw(
            amqp_uri, self.exchange, self.queue, self.routing_key, body, content_type, {**(headers or {}), **extra}
        )
        log.error("parked in %s%s: %s", self.queue.name, f" from {from_queue}" if from_queue else "", reason[:200])


def publish_for_retry(
    amqp_uri: str, exchange: Exchange, queue: Queue, routing_key: str, message, delay: float, headers: dict, body=None
):
    """A copy of ``message`` (a kombu message) — or ``body`` with its headers — comes back to its
    work queue after ``delay`` s."""
    publish_raw(
        amqp_uri,
        exchange,
        queue,
        routing_key,
        message.body if body is None else body,
        message.content_type or "application/json",
        {**(message.headers or {}), **headers},
        expiration=delay,
    )  # seconds (kombu turns them into the milliseconds AMQP wants)


def retry_or_park(consumer, message, failures: list, *, max_attempts: int, retry: tuple, park) -> None:
    """The end of a message whose handling failed. Each of ``failures`` — ``(body, exc_info)``:
    the message's own body, or those of the events it carried that failed — goes back to the
    queue later through ``retry = (exchange, queue, routing_key)``, or, after ``max_attempts``,
    is parked with ``park(reason, body)``. The message is acked only once all of those are
    published; otherwise it is requeued, never lost."""
    attempt = int((message.headers or {}).get(ATTEMPTS_HEADER, 1))
    try:
        for body, exc_info in failures:
            error = f"{exc_info[0].__name__}: {str(exc_info[1])[:300]}"
            if attempt >= max_attempts:
                park(f"failed {attempt} times, last: {error}", body)
                continue
            exchange, queue, routing_key = retry
            delay = backoff_seconds(attempt)
            log.warning(
                "%s failed (attempt %s of %s): %s; retrying in %ss",
                queue.name,
                attempt,
                max_attempts,
                exc_info[0].__name__,
                delay,
            )
            publish_for_retry(
                consumer.container.config["AMQP_URI"],
                exchange,
                queue,
                routing_key,
                message,
                delay,
                {ATTEMPTS_HEADER: attempt + 1},
                body,
            )
    except Exception:
        log.exception("could not schedule a retry; requeueing the message")
        return consumer.queue_consumer.requeue_message(message)
    consumer.queue_consumer.ack_message(message)


def _tolerate_a_dead_connection(settle):
    """nameko ignores amqp's ConnectionError when it acks or requeues on a connection that just
    died, but not the socket's own ConnectionResetError or BrokenPipeError: one of those, raised
    in a worker while RabbitMQ restarts, kills the whole service container. The broker redelivers
    an unacknowledged message anyway, so there is nothing to do but carry on."""

    def settle_tolerantly(self, message):
        try:
            settle(self, message)
        except OSError as exc:
            log.warning("could not settle a message on a lost connection (%s); the broker redelivers it", exc)

    return settle_tolerantly


# Patched here, once, for every queue consumer in the process (events, tickets, deliveries, RPC).
QueueConsumer.ack_message = _tolerate_a_dead_connection(QueueConsumer.ack_message)
QueueConsumer.requeue_message = _tolerate_a_dead_connection(QueueConsumer.requeue_message)


class ParkingQueueConsumer(QueueConsumer):
    """A queue consumer (its own connection) that parks a message whose body it cannot decode in
    ``dead_letter``, with the reason, and acks it only once parked.

    kombu only logs such a message and leaves it unacknowledged: it holds a prefetch slot for as
    long as the connection lives and comes back, undecodable again, after every reconnect."""

    def __init__(self, dead_letter: DeadLetterQueue, accept_types=("json",)):
        super().__init__()
        self.dead_letter, self.accept_types = dead_letter, list(accept_types)

    @property
    def sharing_key(self):
        # one per dead-letter queue and container (intake has one for tickets and one for events)
        return (type(self), self.dead_letter.queue.name)

    def start(self):
        # This consumer has a connection of its own, started alongside nameko's shared one, which
        # carries the replies to this service's RPC calls. A message handled before that one is
        # ready could make an RPC call whose reply queue does not exist yet: the reply would be
        # dropped and the worker would wait for ever. So messages flow only once it is ready.
        shared = self.container.shared_extensions.get(QueueConsumer)
        if shared is not None and shared is not self:
            shared._consumers_ready.wait()
        super().start()

    def handle_message(self, provider, body, message):
        if isinstance(provider, Batching):
            provider.handle_message(body, message)  # it only notes the message: no thread needed
        else:
            super().handle_message(provider, body, message)

    def get_consumers(self, consumer_cls, channel):
        # A channel's consumers all get the prefetch set last before they start (basic.qos
        # applies to consumers started after it): the largest any provider asks for.
        prefetch = max([self.prefetch_count, *(getattr(p, "prefetch_count", 0) for p in self._providers)])
        for provider in self._providers:
            consumer = consumer_cls(
                queues=[provider.queue],
                callbacks=[partial(self.handle_message, provider)],
                accept=self.accept_types,
                on_decode_error=partial(self.on_undecodable, provider),
            )
            consumer.qos(prefetch_count=prefetch)
            self._consumers[provider] = consumer
        return self._consumers.values()

    def on_undecodable(self, provider, message, exc):
        reason = f"body could not be decoded as {message.content_type or 'JSON'}: {type(exc).__name__}: {exc}"
        try:
            self.dead_letter.park(
                self.amqp_uri, message.body, message.content_type, message.headers, reason, provider.queue.name
            )
        except Exception:
            log.exception("could not park an undecodable message; leaving it queued")
            self.requeue_message(message)
            return
        self.ack_message(message)
