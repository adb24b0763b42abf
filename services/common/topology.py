"""RabbitMQ topology declared before anything is published.

An event published to an exchange with no bound queue is confirmed and lost. So ``huiying up``
(and every service at start) declares every event exchange and every event-handler queue of all
four services, with the same names nameko gives them, before any service publishes.
"""

from kombu import Connection, Exchange, Queue
from nameko.events import SERVICE_POOL, EventHandler
from nameko.extensions import ENTRYPOINT_EXTENSIONS_ATTR
from nameko.standalone.events import get_event_exchange


def event_exchange(service_name: str) -> Exchange:
    return get_event_exchange(service_name, {})  # exactly what nameko's dispatcher declares


def event_handler_queues(service_cls) -> list[Queue]:
    """The durable queues nameko will consume for the service's ``@event_handler`` methods."""
    queues = []
    for method_name in dir(service_cls):
        method = getattr(service_cls, method_name)
        for entrypoint in getattr(method, ENTRYPOINT_EXTENSIONS_ATTR, ()):
            if isinstance(entrypoint, EventHandler) and entrypoint.handler_type is SERVICE_POOL:
                queue_name = (
                    f"evt-{entrypoint.source_service}-{entrypoint.event_type}--{service_cls.name}.{method_name}"
                )
                queues.append(
                    Queue(
                        queue_name,
                        exchange=event_exchange(entrypoint.source_service),
                        routing_key=entrypoint.event_type,
                        durable=True,
                        auto_delete=False,
                    )
                )
    return queues


def all_service_classes():
    from services.intake.service import IntakeService
    from services.notify.service import NotifyService
    from services.routing.service import RoutingService
    from services.supervision.service import SupervisionService

    return [IntakeService, RoutingService, SupervisionService, NotifyService]


def declare_all(amqp_uri: str, service_classes=None) -> list[str]:
    """Declare every exchange and queue the system uses; returns the queue names."""
    from services.common.events import DEAD_QUEUE, retry_queue_for
    from services.intake.ticket_queue import ticket_queues
    from services.notify.queue import delivery_queues

    service_classes = service_classes or all_service_classes()
    declared = []
    with Connection(amqp_uri, connect_timeout=5) as connection:
        channel = connection.channel()
        for cls in service_classes:
            event_exchange(cls.name)(channel).declare()
        for cls in service_classes:
            for queue in event_handler_queues(cls):
                queue(channel).declare()
                retry_queue_for(queue.name)(channel).declare()
                declared.append(queue.name)
        DEAD_QUEUE(channel).declare()
        for queue in [*ticket_queues(), *delivery_queues()]:
            queue(channel).declare()
            declared.append(queue.name)
    return declared
