"""Notify's work queue: one message per delivery owed. A failed send waits in the retry queue
(RabbitMQ redelivers it after 1, 2, 4 … s); after the last attempt it is parked: the delivery is
marked failed and a copy goes to the dead-letter queue, to be replayed with `huiying notify retry`."""

import logging

from kombu import Exchange, Queue
from nameko.messaging import Consumer

from services.common.retrying import DeadLetterQueue, ParkingQueueConsumer, publish_for_retry, retry_queue
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


class RetryLater(Exception):
    def __init__(self, delay: float):
        super().__init__(f"retry in {delay}s")
        self.delay = delay


class DeliveryConsumer(Consumer):
    """Acks only what was handled or handed to the retry queue: a delivery message is never lost."""

    queue_consumer = ParkingQueueConsumer(DEAD_LETTER)  # a message that is not JSON is parked at once

    def __init__(self, **kwargs):
        super().__init__(QUEUE, **kwargs)

    def handle_message_processed(self, message, result=None, exc_info=None):
        if exc_info is not None:
            delay = exc_info[1].delay if isinstance(exc_info[1], RetryLater) else UNEXPECTED_ERROR_DELAY
            try:
                publish_for_retry(
                    self.container.config["AMQP_URI"], RETRY_EXCHANGE, RETRY_QUEUE, ROUTING_KEY, message, delay, {}
                )
            except Exception:
                log.exception("could not schedule a delivery retry; requeueing it")
                return self.queue_consumer.requeue_message(message)
        self.queue_consumer.ack_message(message)


consume_deliveries = DeliveryConsumer.decorator
