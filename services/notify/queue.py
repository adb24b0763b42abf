"""Notify's work queue: messages naming the deliveries owed (an event's together). A delivery
whose send failed waits in the retry queue, alone (RabbitMQ redelivers it after 1, 2, 4 … s);
after the last attempt it is parked: the delivery is marked failed and a copy goes to the
dead-letter queue, to be replayed with `huiying notify retry`."""

import json
import logging

from kombu import Exchange, Queue
from nameko.messaging import Consumer

from services.common.batching import Batching
from services.common.retrying import DeadLetterQueue, ParkingQueueConsumer, publish_for_retry, publish_raw, retry_queue
from services.common.topology import WorkQueue

log = logging.getLogger(__name__)

EXCHANGE = Exchange("huiying.notify", type="direct", durable=True)
ROUTING_KEY = "delivery"
# WorkQueues: classic or quorum (HUIYING_QUEUE_TYPE) is decided when they are declared, not here.
QUEUE = WorkQueue("huiying.notify.deliveries", exchange=EXCHANGE, routing_key=ROUTING_KEY)
RETRY_EXCHANGE, RETRY_QUEUE = retry_queue("huiying.notify.deliveries", EXCHANGE, ROUTING_KEY)
DEAD_EXCHANGE = Exchange("huiying.notify.dead", type="direct", durable=True)
DEAD_QUEUE = WorkQueue("huiying.notify.deliveries.dead", exchange=DEAD_EXCHANGE, routing_key=ROUTING_KEY)
DEAD_LETTER = DeadLetterQueue(DEAD_EXCHANGE, DEAD_QUEUE, ROUTING_KEY)
UNEXPECTED_ERROR_DELAY = 60


def delivery_queues() -> list[Queue]:
    return [QUEUE, RETRY_QUEUE, DEAD_QUEUE]


IDS_PER_MESSAGE = 50  # deliveries named by one work message (an event's, usually all of them)


def work_messages(delivery_ids: list[int]) -> list[tuple[str, dict]]:
    """The work messages that ask for ``delivery_ids`` to be sent: ``(routing key, body)``."""
    return [
        (ROUTING_KEY, {"delivery_ids": delivery_ids[start : start + IDS_PER_MESSAGE]})
        for start in range(0, len(delivery_ids), IDS_PER_MESSAGE)
    ]


def delivery_ids_in(body) -> list[int]:
    """The deliveries a work message asks for (``{"delivery_ids": [...]}``, or the single
    ``{"delivery_id": n}`` of a retry or of an earlier version); ValueError for anything else."""
    ids = body.get("delivery_ids", [body.get("delivery_id")]) if isinstance(body, dict) else None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"not a delivery work message: {str(body)[:200]}")
    return ids


def retry_later(amqp_uri: str, delivery_id: int, delay: float):
    """The delivery comes back to the work queue after ``delay`` seconds (through the retry queue)."""
    publish_raw(
        amqp_uri,
        RETRY_EXCHANGE,
        RETRY_QUEUE,
        ROUTING_KEY,
        json.dumps({"delivery_id": delivery_id}).encode(),
        "application/json",
        {},
        expiration=delay,
    )


class DeliveryConsumer(Batching, Consumer):
    """Acks only what was handled or handed to the retry queue: a delivery message is never lost.
    The handler gets every work message waiting (batching.py); a send that fails is retried by
    the handler itself, delivery by delivery, and only an unexpected error fails a message."""

    queue_consumer = ParkingQueueConsumer(DEAD_LETTER)  # a message that is not JSON is parked at once

    def __init__(self, **kwargs):
        super().__init__(QUEUE, **kwargs)

    def handle_message_processed(self, message, result=None, exc_info=None):
        if exc_info is not None:
            try:
                publish_for_retry(
                    self.container.config["AMQP_URI"],
                    RETRY_EXCHANGE,
                    RETRY_QUEUE,
                    ROUTING_KEY,
                    message,
                    UNEXPECTED_ERROR_DELAY,
                    {},
                )
            except Exception:
                log.exception("could not schedule a delivery retry; requeueing it")
                return self.queue_consumer.requeue_message(message)
        self.queue_consumer.ack_message(message)


consume_deliveries = DeliveryConsumer.decorator
