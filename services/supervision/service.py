"""The supervision nameko service: entrypoints only.

Today it keeps the case projection and answers ``case show``; rules, sweeps and the agenda are
the supervision issue's work (see README, "Status of the services").
"""

from nameko.events import event_handler
from nameko.rpc import rpc

from services.common.base import ServiceBase
from services.common.http import NotFound
from services.common.outbox import OutboxRelay
from services.supervision import projection
from services.supervision.models import outbox


class SupervisionService(ServiceBase):
    name = "supervision"

    relay = OutboxRelay(outbox)

    # requeue_on_error: a failure here (database down) must not ack the event away.
    @event_handler("intake", "case_received", requeue_on_error=True)
    def on_case_received(self, event):
        with self.db.begin() as session:
            projection.record_case_received(session, event)

    # One handler, one queue per routing event type (nameko names each queue after the type).
    @event_handler("routing", "case_referred", requeue_on_error=True)
    @event_handler("routing", "case_needs_triage", requeue_on_error=True)
    @event_handler("routing", "referral_accepted", requeue_on_error=True)
    @event_handler("routing", "referral_returned", requeue_on_error=True)
    @event_handler("routing", "extension_requested", requeue_on_error=True)
    @event_handler("routing", "extension_granted", requeue_on_error=True)
    @event_handler("routing", "extension_refused", requeue_on_error=True)
    @event_handler("routing", "referral_replied", requeue_on_error=True)
    @event_handler("routing", "feedback_received", requeue_on_error=True)
    @event_handler("routing", "case_reopened", requeue_on_error=True)
    @event_handler("routing", "case_closed", requeue_on_error=True)
    def on_routing_event(self, event):
        with self.db.begin() as session:
            projection.record_routing_event(session, event)

    @rpc(expected_exceptions=(NotFound,))
    def get_case_record(self, case_id: str) -> dict:
        with self.db() as session:
            return projection.case_record(session, case_id)
