"""The routing nameko service: entrypoints only.

Today it records every received case as awaiting routing; rule-driven triage, referrals and
deadlines are the routing issue's work (see README, "Status of the services").
"""

from datetime import datetime

from nameko.events import event_handler

from services.common.base import ServiceBase
from services.common.outbox import OutboxRelay
from services.common.timeutil import now
from services.common.upsert import insert_ignoring_duplicates
from services.routing.models import outbox, routing_cases

AWAITING_ROUTING = "awaiting_routing"


class RoutingService(ServiceBase):
    name = "routing"

    relay = OutboxRelay(outbox)

    # requeue_on_error: a failure here (database down) must not ack the event away.
    @event_handler("intake", "case_received", requeue_on_error=True)
    def on_case_received(self, event):
        with self.db.begin() as session:
            insert_ignoring_duplicates(
                session,
                routing_cases,
                dict(
                    case_id=event["case_id"],
                    source=event["source"],
                    category=event.get("category"),
                    street=event.get("street"),
                    kind=event.get("kind"),
                    status=AWAITING_ROUTING,
                    received_at=datetime.fromisoformat(event["received_at"]),
                    recorded_at=now(),
                ),
            )
