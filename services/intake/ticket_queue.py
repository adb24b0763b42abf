"""The AMQP channel: ticketing platforms publish JSON case submissions straight to RabbitMQ.

Publish to exchange ``huiying.tickets`` (direct, durable) with routing key ``ticket``, persistent,
``content_type: application/json``; the body is the JSON object of the HTTP API (README).
A message that is not JSON, not an object, or not a valid submission goes to the dead-letter
queue ``huiying.intake.tickets.dead`` with the reason in the ``x-huiying-reason`` header, and the
consumer carries on. nameko's own consumer would crash its connection on undecodable bodies, so
this entrypoint catches decode errors itself.
"""

import json
import logging

from kombu import Exchange, Queue
from nameko.amqp.publish import Publisher
from nameko.extensions import DependencyProvider
from nameko.messaging import Consumer, QueueConsumer

from services.common.retrying import backoff_seconds, publish_for_retry, retry_queue
from services.common.timeutil import iso, now

log = logging.getLogger(__name__)

TICKET_EXCHANGE = Exchange("huiying.tickets", type="direct", durable=True)
DEAD_EXCHANGE = Exchange("huiying.tickets.dead", type="direct", durable=True)
ROUTING_KEY = "ticket"
TICKET_QUEUE = Queue(
    "huiying.intake.tickets",
    exchange=TICKET_EXCHANGE,
    routing_key=ROUTING_KEY,
    durable=True,
    # Anything RabbitMQ itself rejects (e.g. expired) also ends up in the dead-letter queue.
    queue_arguments={"x-dead-letter-exchange": DEAD_EXCHANGE.name, "x-dead-letter-routing-key": ROUTING_KEY},
)
DEAD_QUEUE = Queue("huiying.intake.tickets.dead", exchange=DEAD_EXCHANGE, routing_key=ROUTING_KEY, durable=True)
# A valid ticket that fails for another reason (database down) waits here for its per-message
# TTL, then RabbitMQ dead-letters it back onto the ticket queue: delayed redelivery by the broker,
# not a sleeping worker, and bounded — after MAX_ATTEMPTS it goes to the dead-letter queue.
RETRY_EXCHANGE, RETRY_QUEUE = retry_queue("huiying.intake.tickets", TICKET_EXCHANGE, ROUTING_KEY)
REASON_HEADER = "x-huiying-reason"
ATTEMPTS_HEADER = "x-huiying-attempts"
MAX_ATTEMPTS = 8  # delays 1, 2, 4 … 64 s: about two minutes of outage before a ticket is parked


def ticket_queues() -> list[Queue]:
    return [TICKET_QUEUE, RETRY_QUEUE, DEAD_QUEUE]


def publish_dead_letter(amqp_uri: str, body: bytes, reason: str, content_type: str | None, headers: dict | None):
    if isinstance(body, str):  # py-amqp hands over text when the sender set a content encoding
        body = body.encode("utf-8", "surrogateescape")
    publisher = Publisher(amqp_uri, exchange=DEAD_EXCHANGE, declare=[DEAD_EXCHANGE, DEAD_QUEUE])
    publisher.publish(
        body,
        routing_key=ROUTING_KEY,
        content_type=content_type or "application/octet-stream",
        content_encoding="binary",
        headers={**(headers or {}), REASON_HEADER: reason[:1000], "x-huiying-dead-at": iso(now())},
    )
    log.warning("ticket dead-lettered: %s", reason[:200])


class DeadLetters(DependencyProvider):
    """Lets a worker send the message it is handling to the dead-letter queue with a reason."""

    def get_dependency(self, worker_ctx):
        amqp_uri = self.container.config["AMQP_URI"]

        def dead_letter(body, reason: str):
            raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
            publish_dead_letter(amqp_uri, raw, reason, "application/json", None)

        return dead_letter


class TicketQueueConsumer(QueueConsumer):
    """A queue consumer (its own connection) that dead-letters bodies it cannot decode."""

    def get_consumers(self, consumer_cls, channel):
        for provider in self._providers:
            consumer = consumer_cls(
                queues=[provider.queue],
                callbacks=[lambda body, message, p=provider: self.handle_message(p, body, message)],
                accept=["json", "text/plain", "application/octet-stream"],
                on_decode_error=self.on_decode_error,
            )
            consumer.qos(prefetch_count=self.prefetch_count)
            self._consumers[provider] = consumer
        return self._consumers.values()

    def on_decode_error(self, message, exc):
        reason = f"body could not be decoded as {message.content_type or 'JSON'}: {type(exc).__name__}: {exc}"
        try:
            publish_dead_letter(self.amqp_uri, message.body, reason, message.content_type, None)
        except Exception:
            log.exception("could not dead-letter an undecodable ticket; leaving it queued")
            self.requeue_message(message)
            return
        self.ack_message(message)


class TicketConsumer(Consumer):
    """Invalid tickets never raise (the handler dead-letters them); a ticket whose handling raises
    is retried later by the broker, and parked in the dead-letter queue after MAX_ATTEMPTS. It is
    never acked away unhandled: if even the retry cannot be published, it is requeued."""

    queue_consumer = TicketQueueConsumer()

    def __init__(self, **kwargs):
        super().__init__(TICKET_QUEUE, **kwargs)

    def handle_message_processed(self, message, result=None, exc_info=None):
        if exc_info is None:
            return self.queue_consumer.ack_message(message)
        attempt = int((message.headers or {}).get(ATTEMPTS_HEADER, 1))
        error = f"{exc_info[0].__name__}: {str(exc_info[1])[:300]}"
        amqp_uri = self.container.config["AMQP_URI"]
        try:
            if attempt >= MAX_ATTEMPTS:
                publish_dead_letter(
                    amqp_uri,
                    message.body,
                    f"failed {attempt} times, last: {error}",
                    message.content_type,
                    message.headers,
                )
            else:
                delay = backoff_seconds(attempt)
                log.warning(
                    "ticket failed (attempt %s of %s): %s; retrying in %ss",
                    attempt,
                    MAX_ATTEMPTS,
                    exc_info[0].__name__,
                    delay,
                )
                publish_for_retry(
                    amqp_uri, RETRY_EXCHANGE, RETRY_QUEUE, ROUTING_KEY, message, delay, {ATTEMPTS_HEADER: attempt + 1}
                )
        except Exception:
            log.exception("could not park a failed ticket for retry; requeueing it")
            return self.queue_consumer.requeue_message(message)
        self.queue_consumer.ack_message(message)


consume_tickets = TicketConsumer.decorator
