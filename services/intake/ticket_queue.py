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
from nameko.extensions import DependencyProvider
from nameko.messaging import Consumer

from services.common.batching import Batching
from services.common.retrying import DeadLetterQueue, ParkingQueueConsumer, retry_or_park, retry_queue
from services.common.topology import WorkQueue

log = logging.getLogger(__name__)

TICKET_EXCHANGE = Exchange("huiying.tickets", type="direct", durable=True)
DEAD_EXCHANGE = Exchange("huiying.tickets.dead", type="direct", durable=True)
ROUTING_KEY = "ticket"
# WorkQueues: classic or quorum (HUIYING_QUEUE_TYPE) is decided when they are declared, not here.
TICKET_QUEUE = WorkQueue(
    "huiying.intake.tickets",
    exchange=TICKET_EXCHANGE,
    routing_key=ROUTING_KEY,
    # Anything RabbitMQ itself rejects (e.g. expired) also ends up in the dead-letter queue.
    queue_arguments={"x-dead-letter-exchange": DEAD_EXCHANGE.name, "x-dead-letter-routing-key": ROUTING_KEY},
)
DEAD_QUEUE = WorkQueue("huiying.intake.tickets.dead", exchange=DEAD_EXCHANGE, routing_key=ROUTING_KEY)
DEAD_LETTER = DeadLetterQueue(DEAD_EXCHANGE, DEAD_QUEUE, ROUTING_KEY)
# A valid ticket that fails for another reason (database down) waits here for its per-message
# TTL, then RabbitMQ dead-letters it back onto the ticket queue: delayed redelivery by the broker,
# not a sleeping worker, and bounded — after MAX_ATTEMPTS it goes to the dead-letter queue.
RETRY_EXCHANGE, RETRY_QUEUE = retry_queue("huiying.intake.tickets", TICKET_EXCHANGE, ROUTING_KEY)
MAX_ATTEMPTS = 8  # delays 1, 2, 4 … 64 s: about two minutes of outage before a ticket is parked


def ticket_queues() -> list[Queue]:
    return [TICKET_QUEUE, RETRY_QUEUE, DEAD_QUEUE]


class DeadLetters(DependencyProvider):
    """Lets a worker send the message it is handling to the dead-letter queue with a reason."""

    def get_dependency(self, worker_ctx):
        amqp_uri = self.container.config["AMQP_URI"]

        def dead_letter(body, reason: str):
            raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
            DEAD_LETTER.park(amqp_uri, raw, "application/json", None, reason)

        return dead_letter


class TicketConsumer(Batching, Consumer):
    """Invalid tickets never raise (the handler dead-letters them); a ticket whose handling raises
    is retried later by the broker, and parked in the dead-letter queue after MAX_ATTEMPTS. It is
    never acked away unhandled: if even the retry cannot be published, it is requeued. With
    ``max_batch`` above 1 the handler gets every ticket waiting, as a list (batching.py)."""

    # A ticket it cannot decode goes to the dead-letter queue with the reason.
    queue_consumer = ParkingQueueConsumer(DEAD_LETTER, accept_types=("json", "text/plain", "application/octet-stream"))

    def __init__(self, **kwargs):
        super().__init__(TICKET_QUEUE, **kwargs)

    def handle_message_processed(self, message, result=None, exc_info=None):
        if exc_info is None:
            return self.queue_consumer.ack_message(message)
        amqp_uri = self.container.config["AMQP_URI"]
        retry_or_park(
            self,
            message,
            [(message.body, exc_info)],
            max_attempts=MAX_ATTEMPTS,
            retry=(RETRY_EXCHANGE, RETRY_QUEUE, ROUTING_KEY),
            park=lambda reason, body: DEAD_LETTER.park(amqp_uri, body, message.content_type, message.headers, reason),
        )


consume_tickets = TicketConsumer.decorator
