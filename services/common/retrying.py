"""Delayed redelivery by RabbitMQ: a message to be tried again later waits in a retry queue for
its own TTL, then RabbitMQ dead-letters it back onto its work queue. No worker sleeps, nothing is
lost if the service stops meanwhile, and the delay grows with each attempt."""

from kombu import Exchange, Queue
from nameko.amqp.publish import Publisher


def retry_queue(name: str, work_exchange: Exchange, routing_key: str) -> tuple[Exchange, Queue]:
    exchange = Exchange(f"{name}.retry", type="direct", durable=True)
    queue = Queue(
        f"{name}.retry",
        exchange=exchange,
        routing_key=routing_key,
        durable=True,
        queue_arguments={"x-dead-letter-exchange": work_exchange.name, "x-dead-letter-routing-key": routing_key},
    )
    return exchange, queue


def backoff_seconds(attempt: int, cap: int = 3600) -> int:
    """1, 2, 4, 8 … seconds, at most ``cap``."""
    return min(cap, 2 ** max(0, attempt - 1))


def publish_for_retry(
    amqp_uri: str, exchange: Exchange, queue: Queue, routing_key: str, message, delay: float, headers: dict
):
    """A copy of ``message`` (a kombu message) comes back to its work queue after ``delay`` s."""
    body = message.body.encode("utf-8", "surrogateescape") if isinstance(message.body, str) else message.body
    Publisher(amqp_uri, exchange=exchange, declare=[exchange, queue]).publish(
        body,
        routing_key=routing_key,
        content_type=message.content_type or "application/json",
        content_encoding="binary",
        expiration=delay,  # seconds (kombu turns them into the milliseconds AMQP wants)
        headers={**(message.headers or {}), **headers},
    )
