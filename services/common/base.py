"""What every Huiying service has: config, its database, an event dispatcher, the outbox relay
(a timer publishes events still pending after a failed or interrupted publish), ``/health`` and
``/metrics``.

A service subclasses ``ServiceBase`` and sets ``name`` and ``relay = OutboxRelay(its outbox)``;
nameko finds inherited dependencies and entrypoints like its own.

When a message is acknowledged is chosen per kind of entrypoint, never left to nameko's default
(which acks a message whose handler raised, so the message is lost):
- events (``events.reliable_event_handler``), tickets (``intake.ticket_queue``) and deliveries
  (``notify.queue``): acked only once handled, or once a copy waits in a retry queue or is parked
  in a dead-letter queue with its reason; an undecodable body is parked at once. They carry
  what the system has accepted, so nothing may be dropped, and a poison message must not spin.
- RPC (the operator CLI): nameko acks the request and sends any error back; the caller sees it
  and decides. Nothing accepted travels by RPC, so nothing is lost by not retrying it.
- timers and HTTP carry no message: a timer's next tick, or the HTTP client, tries again.
"""

import time

import eventlet
from nameko.dependency_providers import Config
from nameko.extensions import DependencyProvider
from nameko.timer import timer

from services.common import health, metrics
from services.common.db import Database
from services.common.http import http
from services.common.outbox import BatchPublishing, OutboxRelay


class ContainerState(DependencyProvider):
    """A dict that lives as long as the service container (workers come and go per call):
    caches and timestamps that must not leak between containers, as class attributes would."""

    def setup(self):
        self.state = {}

    def get_dependency(self, worker_ctx):
        return self.state


class DeclaredTopology(DependencyProvider):
    """Declares every exchange and queue of the system when the service starts (as `huiying up`
    does), so that what this service publishes always has its queues, whichever started first."""

    def setup(self):
        from services.common.topology import declare_all

        declare_all(self.container.config["AMQP_URI"])


class LoopLagProbe(DependencyProvider):
    """Asks the event loop to wake it every ``INTERVAL`` and records how much later it woke
    (``huiying_loop_lag_seconds``): the delay every greenthread of the service meets at that
    moment — behind code that does not yield, or behind other processes for a core.

    Every 50 ms, not every 10: a wakeup of an idle service's loop costs about 150 us of CPU here
    (the hub's epoll calls), so a 10 ms probe took 1.5 % of a core in each of the four services
    at all times; at 50 ms it takes 0.4 %. How late each wakeup is, is measured just as well;
    there are fewer of them."""

    INTERVAL = 0.05
    _thread = None

    def start(self):
        self._thread = self.container.spawn_managed_thread(self._probe, identifier="loop lag probe")

    def stop(self):
        if self._thread is not None:
            self._thread.kill()

    def kill(self):
        self.stop()

    def _probe(self):
        while True:
            asked = time.monotonic()
            eventlet.sleep(self.INTERVAL)
            metrics.LOOP_LAG.observe(max(0.0, time.monotonic() - asked - self.INTERVAL))


class ServiceBase:
    name: str
    relay: OutboxRelay

    config = Config()
    db = Database()
    dispatch = BatchPublishing()  # callable as nameko's EventDispatcher; publishes batches too
    state = ContainerState()
    topology = DeclaredTopology()
    loop_lag = LoopLagProbe()

    def publish_events(self):
        """Publish the events this process has just committed (called after each commit)."""
        self.relay.relay(self.db, self.dispatch)

    @timer(interval=1)
    def publish_pending_events(self):
        """Marks what was published after commits, and publishes what is still pending."""
        self.relay.relay_pending(self.db, self.dispatch)

    @http("GET", "/health")
    def health(self, request):
        return health.respond(self.name, self.db, self.config["AMQP_URI"])

    @http("GET", "/ready")
    def ready(self, request):
        rules = getattr(self, "rules", None)
        return health.respond_ready(self.name, self.db, self.config["AMQP_URI"], rules.status() if rules else None)

    @http("GET", "/metrics")
    def metrics(self, request):
        """Prometheus's text format (services/common/metrics.py lists what is measured)."""
        return metrics.respond()
