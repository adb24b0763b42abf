"""RabbitMQ topology declared before anything is published.

An event published to an exchange with no bound queue is confirmed and lost. So ``huiying up``
(and every service at start) declares every event exchange and every event-handler queue of all
four services, with the same names nameko gives them, before any service publishes.

Every durable work queue of the system (each event-handler queue and its retry queue,
``huiying.events.dead``, the ticket queue and notify's delivery queue with their retry and
dead-letter queues) is a ``WorkQueue``: its arguments come from ``work_queue_arguments`` each time
it is declared, by whichever code declares it (``declare_all``, a publisher, a consumer), so
``HUIYING_QUEUE_TYPE=quorum`` makes every one of them a quorum queue (replicated over a RabbitMQ
cluster), however early the module holding the ``Queue`` object was imported.

nameko's RPC queues stay classic, on purpose. Each caller's reply queue is exclusive and
auto-delete, which a quorum queue cannot be (quorum queues are always durable and shared).
``rpc-<service>`` is declared by nameko's own RPC consumer, and RPC here is request/response
from the operator CLI (and tests): a request lost with a broker node ends in a timeout for the
caller, who runs the command again (submissions are idempotent by source and external id).
Nothing the system has accepted waits in an RPC queue: cases, events and deliveries all travel
through the work queues above.
"""

from concurrent.futures import ThreadPoolExecutor

from amqp.exceptions import PreconditionFailed
from kombu import Connection, Exchange, Queue
from nameko.events import SERVICE_POOL, EventHandler
from nameko.extensions import ENTRYPOINT_EXTENSIONS_ATTR
from nameko.standalone.events import get_event_exchange

from services.common import config as settings

# What work_queue_arguments adds; a WorkQueue keeps only its own arguments and adds these when read.
TYPE_ARGUMENTS = ("x-queue-type", "x-dead-letter-strategy", "x-overflow")


def work_queue_arguments(arguments: dict | None = None) -> dict:
    """The arguments a durable work queue is declared with: its own (dead-lettering) ones and what
    ``HUIYING_QUEUE_TYPE`` asks for. The one place that decides; read at each call.

    - ``classic`` (default): its own arguments, unchanged (what existing brokers hold).
    - ``quorum``: ``x-queue-type: quorum``. A queue that dead-letters (a retry queue, whose
      messages go back to their work queue when their per-message TTL ends; the ticket queue)
      also gets ``x-dead-letter-strategy: at-least-once``: a quorum queue's default is
      at-most-once, which drops a message whose dead-letter target cannot take it at that moment
      (a leader election). At-least-once needs ``x-overflow: reject-publish`` (RabbitMQ 3.10+).
    """
    arguments = {key: value for key, value in (arguments or {}).items() if key not in TYPE_ARGUMENTS}
    if settings.queue_type() == "quorum":
        arguments["x-queue-type"] = "quorum"
        if "x-dead-letter-exchange" in arguments:
            arguments["x-dead-letter-strategy"] = "at-least-once"
            arguments["x-overflow"] = "reject-publish"
    return arguments


class WorkQueue(Queue):
    """A durable queue whose ``queue_arguments`` are ``work_queue_arguments(its own)``, worked out
    when they are read (when it is declared), not when the module that built it was imported."""

    def __init__(self, name="", exchange=None, routing_key="", queue_arguments=None, **kwargs):
        kwargs.setdefault("durable", True)
        # never None: kombu would read the property (and the setting) to see if it is set
        super().__init__(name, exchange, routing_key, queue_arguments=queue_arguments or {}, **kwargs)

    @property
    def queue_arguments(self) -> dict:
        return work_queue_arguments(self._own_arguments)

    @queue_arguments.setter
    def queue_arguments(self, arguments):
        # kombu copies a queue (to bind it) with its arguments as read: keep only the queue's own
        self._own_arguments = {key: value for key, value in (arguments or {}).items() if key not in TYPE_ARGUMENTS}


def event_exchange(service_name: str) -> Exchange:
    return get_event_exchange(service_name, {})  # exactly what nameko's dispatcher declares


def event_handler_queue(
    source_service: str, event_type: str, service_name: str, method_name: str, exchange: Exchange | None = None
) -> WorkQueue:
    """The queue of a ``SERVICE_POOL`` event handler, named as nameko names it."""
    return WorkQueue(
        f"evt-{source_service}-{event_type}--{service_name}.{method_name}",
        exchange=exchange or event_exchange(source_service),
        routing_key=event_type,
        durable=True,
        auto_delete=False,
    )


def event_handler_queues(service_cls) -> list[Queue]:
    """The durable queues nameko will consume for the service's ``@event_handler`` methods."""
    queues = []
    for method_name in dir(service_cls):
        method = getattr(service_cls, method_name)
        for entrypoint in getattr(method, ENTRYPOINT_EXTENSIONS_ATTR, ()):
            if isinstance(entrypoint, EventHandler) and entrypoint.handler_type is SERVICE_POOL:
                queues.append(
                    event_handler_queue(entrypoint.source_service, entrypoint.event_type, service_cls.name, method_name)
                )
    return queues


def all_service_classes():
    from services.intake.service import IntakeService
    from services.notify.service import NotifyService
    from services.routing.service import RoutingService
    from services.supervision.service import SupervisionService

    return [IntakeService, RoutingService, SupervisionService, NotifyService]


def event_handler_queue_names() -> list[str]:
    """Every service's event-handler queues (for status and for waiting until they are drained)."""
    return [queue.name for cls in all_service_classes() for queue in event_handler_queues(cls)]


class TopologyMismatch(RuntimeError):
    """A queue exists with other arguments (another queue type) than this process declares."""


def declare(entity, channel) -> None:
    """Declare a queue (with its exchange and binding) or an exchange; a queue that already exists
    with other arguments is reported with what to do, not as a bare PRECONDITION_FAILED."""
    try:
        entity(channel).declare()
    except PreconditionFailed as exc:
        if not isinstance(entity, Queue):
            raise TopologyMismatch(f"{exc}; the exchange {entity.name!r} was declared differently elsewhere") from None
        raise TopologyMismatch(
            f"{exc}. With HUIYING_QUEUE_TYPE={settings.queue_type()}, {entity.name!r} is declared with "
            f"{getattr(entity, 'queue_arguments', None)}; a queue's type cannot change in place: stop the "
            f"services, move or drain its messages, delete it (rabbitmqctl delete_queue {entity.name}) "
            "and start again, or use a new vhost"
        ) from None


# Queues of handlers that are gone. Still bound, they would keep collecting events nobody reads;
# they held nothing that is not elsewhere, so they are deleted.
RETIRED_QUEUES = (
    "evt-intake-case_received--notify.on_case_received",  # notify asks intake for a case when it needs it
    "evt-intake-case_received--notify.on_case_received.retry",
)


DECLARING_CONNECTIONS = 4


def declare_all(amqp_uri: str, service_classes=None) -> list[str]:
    """Declare every exchange and queue the system uses; returns the queue names.

    The queues are declared over ``DECLARING_CONNECTIONS`` connections at once: RabbitMQ makes a
    new durable queue in 3-10 ms, one after the other on one channel (0.24-0.77 s for the
    system's 70 in a new vhost, as every test's is; 0.22 s over four connections)."""
    from services.common.events import DEAD_QUEUE, retry_queue_for
    from services.intake.ticket_queue import ticket_queues
    from services.notify.queue import delivery_queues

    settings.queue_type()  # a bad value is refused before anything is declared
    service_classes = service_classes or all_service_classes()
    declared, queues = [], []
    for cls in service_classes:
        for queue in event_handler_queues(cls):
            queues += [queue, retry_queue_for(queue.name)]
            declared.append(queue.name)
    queues.append(DEAD_QUEUE)
    for queue in [*ticket_queues(), *delivery_queues()]:
        queues.append(queue)
        declared.append(queue.name)
    with Connection(amqp_uri, connect_timeout=5) as connection:
        channel = connection.channel()
        for cls in service_classes:
            declare(event_exchange(cls.name), channel)
        for name in RETIRED_QUEUES:
            channel.queue_delete(name)  # nothing to do when it does not exist

    def declare_share(share: list) -> None:
        with Connection(amqp_uri, connect_timeout=5) as connection:
            channel = connection.channel()
            for queue in share:
                declare(queue, channel)

    shares = [queues[start::DECLARING_CONNECTIONS] for start in range(DECLARING_CONNECTIONS)]
    with ThreadPoolExecutor(DECLARING_CONNECTIONS) as pool:  # green threads once eventlet has patched
        list(pool.map(declare_share, shares))  # a queue refused (TopologyMismatch) is raised here
    return declared
