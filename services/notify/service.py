"""The notify nameko service: entrypoints only.

Each event becomes its deliveries (planning.py, from rules/notify/), recorded once per event,
recipient and channel (deliveries.py); each delivery is a message on notify's work queue, sent by
channels.py, retried by the broker with growing delays, and parked when it keeps failing.
"""

import json
import logging
from datetime import timedelta

from nameko.messaging import Publisher
from nameko.rpc import RpcProxy, rpc
from nameko.timer import timer

from services.common import metrics
from services.common.base import ServiceBase
from services.common.directory import parse_directory
from services.common.events import reliable_event_handler
from services.common.outbox import BatchPublishing, OutboxRelay
from services.common.retrying import backoff_seconds
from services.common.rules.provider import Rules
from services.common.timeutil import now
from services.notify import channels, deliveries, planning
from services.notify import settings as notify_settings
from services.notify.models import outbox
from services.notify.queue import (
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    EXCHANGE,
    QUEUE,
    ROUTING_KEY,
    RetryLater,
    consume_deliveries,
)

log = logging.getLogger(__name__)


class NotifyService(ServiceBase):
    name = "notify"

    relay = OutboxRelay(outbox)
    rules = Rules(notify_settings.load)
    intake = RpcProxy("intake")
    enqueue = BatchPublishing(EXCHANGE, declare=[QUEUE])
    park = Publisher(exchange=DEAD_EXCHANGE, declare=[DEAD_EXCHANGE, DEAD_QUEUE])

    # --- events → deliveries ----------------------------------------------------------------

    def _directory(self):
        if "directory" not in self.state:
            document = self.intake.get_directory()
            self.state["directory"] = parse_directory(document) if document else None
        return self.state["directory"]

    def _owe(self, event: dict):
        """Record what this event owes to whom (once), then enqueue it. No RPC inside a transaction."""
        settings = self.rules.get()
        case = self._case(event["case_id"])
        if case is None:
            raise LookupError(f"case {event['case_id']} not seen yet")  # requeued until case_received lands
        needs_citizen = any(route.event == event["event_type"] and "citizen" in route.to for route in settings.routes)
        phone = self.intake.get_reporter_contact(event["case_id"])["phone"] if needs_citizen else None
        planned = planning.plan(settings, event, case, self._directory(), phone)
        callback = settings.callbacks.get(case["source"])
        if (
            callback
            and event["event_type"] in notify_settings.STATUS_EVENTS
            and (event["event_type"] != "referral_replied" or event.get("case_replied"))
        ):
            update = planning.status_update(event, case, event["event_id"])
            planned.append(
                planning.Delivery(
                    f"source:{case['source']}",
                    "callback",
                    callback,
                    "status update",
                    json.dumps(update, ensure_ascii=False),
                )
            )
        with self.db.begin() as session:
            new_ids = deliveries.record(session, event, planned, now())
        self._enqueue(new_ids)

    def _recent_cases(self) -> deliveries.RecentCases:
        return self.state.setdefault("recent_cases", deliveries.RecentCases())

    def _case(self, case_id: str) -> dict | None:
        case = self._recent_cases().get(case_id)
        if case is None:
            with self.db() as session:
                case = deliveries.case_of(session, case_id)
            if case is not None:
                self._recent_cases().put(case)
        return case

    def _enqueue(self, delivery_ids: list[int]):
        """One work message per delivery, all confirmed by the broker at once."""
        self.enqueue.publish_batch([(ROUTING_KEY, {"delivery_id": delivery_id}) for delivery_id in delivery_ids])

    @reliable_event_handler("intake", "case_received")
    def on_case_received(self, event):
        with self.db.begin() as session:
            stored = deliveries.record_case(session, event)
        if stored is not None:
            self._recent_cases().put(stored)

    @reliable_event_handler("intake", "directory_loaded")
    def on_directory_loaded(self, event):
        self.state.pop("directory", None)

    # One handler, one queue per event type (nameko names each queue after the type).
    @reliable_event_handler("routing", "case_referred")
    @reliable_event_handler("routing", "case_needs_triage")
    @reliable_event_handler("routing", "referral_replied")
    @reliable_event_handler("routing", "case_reopened")
    @reliable_event_handler("routing", "case_closed")
    @reliable_event_handler("supervision", "case_escalated")
    @reliable_event_handler("supervision", "department_reminded")
    @reliable_event_handler("supervision", "supervisors_alerted")
    def on_event(self, event):
        self._owe(event)

    # --- the work queue: send one delivery ---------------------------------------------------

    @consume_deliveries(expected_exceptions=(RetryLater,))  # a retry is not an error worth a traceback
    def deliver(self, body):
        delivery_id = body["delivery_id"]
        with self.db.begin() as session:
            claimed = deliveries.claim(session, delivery_id, now())
        if claimed is None:
            return  # already sent (a duplicate message), being sent, or parked
        try:
            channels.send(claimed, self.config)
        except channels.ChannelError as exc:
            settings = self.rules.get()
            if exc.retryable and claimed.attempts < settings.max_attempts:
                metrics.NOTIFICATION_FAILURES.labels(claimed.channel, "retried").inc()
                with self.db.begin() as session:
                    deliveries.finish(session, delivery_id, "retrying", now(), str(exc))
                raise RetryLater(backoff_seconds(claimed.attempts)) from None
            metrics.NOTIFICATION_FAILURES.labels(claimed.channel, "parked").inc()
            with self.db.begin() as session:
                deliveries.finish(session, delivery_id, "failed", now(), str(exc))
            self.park({"delivery_id": delivery_id, "error": str(exc)}, routing_key=ROUTING_KEY)
            log.warning("delivery %s parked after %s attempt(s): %s", delivery_id, claimed.attempts, exc)
            return
        with self.db.begin() as session:
            deliveries.finish(session, delivery_id, "sent", now())

    @timer(interval=30)
    def requeue_stale(self):
        with self.db.begin() as session:
            ids = deliveries.stale(session, now(), timedelta(seconds=60), timedelta(minutes=10))
        self._enqueue(ids)

    @timer(interval=60)
    def send_due_digests(self):
        self._digests(now())

    def _digests(self, moment) -> list:
        directory = self._directory()  # before the transaction: no RPC inside one
        with self.db.begin() as session:
            ids = deliveries.make_digests(session, self.rules.get(), moment, directory)
        self._enqueue(ids)
        return ids

    @rpc
    def send_digests(self, now_iso=None) -> dict:
        """Collect held reminders into digests as of ``now_iso`` (the timer does this each minute)."""
        from datetime import datetime

        return {"digests": self._digests(datetime.fromisoformat(now_iso) if now_iso else now())}

    @timer(interval=5)
    def watch_rule_files(self):
        self.rules.refresh()

    # --- RPC: the operator CLI --------------------------------------------------------------

    @rpc
    def failures(self) -> list:
        with self.db() as session:
            return deliveries.failures(session)

    @rpc
    def retry(self, ids=None) -> dict:
        with self.db.begin() as session:
            chosen = deliveries.reset_for_retry(session, ids, now())
        self._enqueue(chosen)
        return {"retried": chosen}

    @rpc
    def deliveries_for(self, case_id) -> list:
        with self.db() as session:
            return deliveries.for_case(session, case_id)

    @rpc
    def reload_rules(self) -> dict:
        self.rules.refresh(force=True)
        return self.rules.status()
