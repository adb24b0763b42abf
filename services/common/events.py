"""Event handlers whose failures neither lose the event nor spin on it, one event at a time
(``reliable_event_handler``) or every event waiting at once (``event_batch_handler``).

A handler's queue is named after its service and method (``evt-intake-case_received--routing.
on_case_received``): renaming a handler method would strand the events waiting in the old queue.

nameko acks an event whose handler raised, unless ``requeue_on_error`` — and then it is redelivered
at once, again and again, for as long as the handler fails (a poison event spins a core). Here a
failed event waits in its own retry queue for a growing delay (1, 2, 4 … s; RabbitMQ sends it back
to the handler's queue when its TTL ends), and after ``MAX_ATTEMPTS`` it is parked in
``huiying.events.dead`` with the queue it came from and the last error.
"""

import json
import logging

from kombu import Exchange
from nameko.events import SERVICE_POOL, EventHandler

from services.common import metrics
from services.common.batching import DEFAULT_MAX_BATCH, MAX_BATCHES_IN_FLIGHT, Batching
from services.common.retrying import DeadLetterQueue, ParkingQueueConsumer, retry_or_park
from services.common.topology import WorkQueue, event_handler_queue

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 8
RETRY_EXCHANGE = Exchange("huiying.events.retry", type="direct", durable=True)
DEAD_EXCHANGE = Exchange("huiying.events.dead", type="direct", durable=True)
DEAD_QUEUE = WorkQueue("huiying.events.dead", exchange=DEAD_EXCHANGE, routing_key="dead")
DEAD_LETTER = DeadLetterQueue(DEAD_EXCHANGE, DEAD_QUEUE, "dead")


def retry_queue_for(queue_name: str) -> WorkQueue:
    """The queue a failed event of ``queue_name`` waits in; it expires back into ``queue_name``."""
    return WorkQueue(
        f"{queue_name}.retry",
        exchange=RETRY_EXCHANGE,
        routing_key=queue_name,
        queue_arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue_name},
    )


class ReliableEventHandler(Batching, EventHandler):
    queue_consumer = ParkingQueueConsumer(DEAD_LETTER)  # a body that is not JSON is parked at once

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.handler_type is not SERVICE_POOL or not self.reliable_delivery:
            # other handler types get exclusive or auto-delete queues, never declared up front
            raise ValueError("reliable_event_handler supports only SERVICE_POOL handlers with reliable delivery")

    def setup(self):
        super().setup()  # nameko builds its own queue and registers this entrypoint with the consumer
        # The consumer declares self.queue when it starts consuming, after setup: it must carry the
        # arguments topology.declare_all gave it (a quorum queue, say), or RabbitMQ refuses the
        # declaration with PRECONDITION_FAILED.
        queue = event_handler_queue(
            self.source_service, self.event_type, self.container.service_name, self.method_name, self.queue.exchange
        )
        if queue.name != self.queue.name:
            raise RuntimeError(f"event queue {queue.name} is not nameko's {self.queue.name}")
        self.queue = queue

    def items_of(self, body) -> list:
        """A message carries one event, or — as the outbox publishes them — a list of events of
        one type (outbox.envelopes): each is handled, retried or parked on its own."""
        events = body if isinstance(body, list) else [body]
        for event in events:
            if isinstance(event, dict):
                metrics.observe_lag(self.container.service_name, event)
        return events

    def handle_message_processed(self, message, result=None, exc_info=None):
        if exc_info is None:
            return self.queue_consumer.ack_message(message)
        self._retry_or_park(message, [(message.body, exc_info)])

    def handle_items_failed(self, message, failed: list):
        # Only the events that failed come back (each alone) or are parked; the others were handled.
        self._retry_or_park(message, [(json.dumps(event, ensure_ascii=False).encode(), e) for event, e in failed])

    def _retry_or_park(self, message, failures: list):
        queue = self.queue.name
        retry_or_park(
            self,
            message,
            failures,
            max_attempts=MAX_ATTEMPTS,
            retry=(RETRY_EXCHANGE, retry_queue_for(queue), queue),
            park=lambda reason, body: DEAD_LETTER.park(
                self.container.config["AMQP_URI"],
                body,
                message.content_type or "application/json",
                message.headers,
                reason,
                queue,
            ),
        )


reliable_event_handler = ReliableEventHandler.decorator


def event_batch_handler(
    source_service: str,
    event_type: str,
    max_batch: int = DEFAULT_MAX_BATCH,
    gather_seconds: float | None = None,
    batches_in_flight: int = MAX_BATCHES_IN_FLIGHT,
):
    """As ``reliable_event_handler``, but the method gets a list of events: every one waiting in
    its queue, up to ``max_batch``; with ``gather_seconds``, every batch waits that long for more;
    ``batches_in_flight`` batches may be handled at once (batching.py)."""
    return ReliableEventHandler.decorator(
        source_service,
        event_type,
        max_batch=max_batch,
        gather_seconds=gather_seconds,
        batches_in_flight=batches_in_flight,
    )
