"""The notify nameko service: entrypoints only.

Today it starts, owns its tables and answers health; recipients, channels and delivery are the
notify issue's work (see README, "Status of the services").
"""
from nameko.dependency_providers import Config
from nameko.events import EventDispatcher
from nameko.timer import timer

from services.common import health
from services.common.db import Database
from services.common.http import http
from services.common.outbox import OutboxRelay
from services.notify.models import outbox


class NotifyService:
    name = "notify"

    config = Config()
    db = Database()
    dispatch = EventDispatcher()
    relay = OutboxRelay(outbox)

    @timer(interval=1)
    def publish_pending_events(self):
        self.relay.relay(self.db, self.dispatch)

    @http("GET", "/health")
    def health(self, request):
        return health.respond(self.name, self.db, self.config["AMQP_URI"])
