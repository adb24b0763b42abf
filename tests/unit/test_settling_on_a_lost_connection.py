"""A worker that acks (or requeues) its message just as RabbitMQ restarts must not take the whole
service down: nameko only ignores amqp's own ConnectionError there, not the socket's errors."""

import pytest
from nameko.messaging import QueueConsumer

import services.common.retrying  # noqa: F401  (patches QueueConsumer on import)


class MessageOnADeadSocket:
    class channel:
        connection = object()  # nameko checks it is set before settling

    def __init__(self, error):
        self.error = error

    def ack(self):
        raise self.error

    def requeue(self):
        raise self.error


@pytest.mark.parametrize("error", [ConnectionResetError(104, "reset by peer"), BrokenPipeError(32, "broken pipe")])
def test_settling_a_message_on_a_dead_connection_is_tolerated(error):
    consumer = QueueConsumer()
    consumer.ack_message(MessageOnADeadSocket(error))
    consumer.requeue_message(MessageOnADeadSocket(error))


def test_other_errors_still_surface():
    with pytest.raises(ValueError):
        QueueConsumer().ack_message(MessageOnADeadSocket(ValueError("a bug")))
