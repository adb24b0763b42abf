"""Event handlers whose failures neither lose the event nor spin on it.

nameko acks an event whose handler raised, unless ``requeue_on_error`` — and then it is redelivered
at once, again and again, for as long as the handler fails (a poison event spins a core). Here a
failed event waits in its own retry queue for a growing delay (1, 2, 4 … s; RabbitMQ sends it back
to the handler's queue when its TTL ends), and after ``MAX_ATTEMPTS`` it is parked in
``huiying.events.dead`` with the queue it came from and the last error.
"""

import logging

from kombu import Exchange, Queue
from nameko.amqp.publish import Publisher
from nameko.events import EventHandler

from services.common.retrying import backoff_seconds, publish_for_retry

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 8
ATTEMPTS_HEADER = "x-huiying-attempts"
RETRY_EXCHANGE = Exchange("huiying.events.retry", type="direct", durable=True)
DEAD_EXCHANGE = Exchange("huiying.events.dead", type="direct", durable=True)
DEAD_QUEUE = Queue("huiying.events.dead", exchange=DEAD_EXCHANGE, routing_key="dead", durable=True)


def retry_queue_for(queue_name: str) -> Queue:
    """The queue a failed event of ``queue_name`` waits in; it expires back into ``queue_name``."""
    return Queue(
        f"{queue_name}.retry",
        exchange=RETRY_EXCHANGE,
        routing_key=queue_name,
        durable=True,
        queue_arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue_name},
    )


class ReliableEventHandler(EventHandler):
    def handle_message_processed(self, message, result=None, exc_info=None):
        if exc_info is None:
            return self.queue_consumer.ack_message(message)
        amqp_uri = self.container.config["AMQP_URI"]
        attempt = int((message.headers or {}).get(ATTEMPTS_HEADER, 1))
        error = f"{exc_info[0].__name__}: {str(exc_info[1])[:300]}"
        try:
            if attempt >= MAX_ATTEMPTS:
                body = message.body.encode() if isinstance(message.body, str) else message.body
                Publisher(amqp_uri, exchange=DEAD_EXCHANGE, declare=[DEAD_EXCHANGE, DEAD_QUEUE]).publish(
                    body,
                    routing_key="dead",
                    content_type=message.content_type or "application/json",
                    content_encoding="binary",
                    headers={
                        **(message.headers or {}),
                        "x-huiying-queue": self.queue.name,
                        "x-huiying-reason": f"failed {attempt} times, last: {error}",
                    },
                )
                log.error("event parked after %s attempts on %s: %s", attempt, self.queue.name, error)
            else:
                publish_for_retry(
                    amqp_uri,
                    RETRY_EXCHANGE,
                    retry_queue_for(self.queue.name),
                    self.queue.name,
                    message,
                    backoff_seconds(attempt),
                    {ATTEMPTS_HEADER: attempt + 1},
                )
        except Exception:
            log.exception("could not schedule an event retry; requeueing it")
            return self.queue_consumer.requeue_message(message)
        self.queue_consumer.ack_message(message)


reliable_event_handler = ReliableEventHandler.decorator
