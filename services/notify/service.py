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
from services.common.batching import DEFAULT_MAX_BATCH, GATHER_OFF_THE_CASES_WAY, SomeFailed
from services.common.directory import parse_directory
from services.common.events import event_batch_handler, reliable_event_handler
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
    consume_deliveries,
    delivery_ids_in,
    retry_later,
    work_messages,
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

    def _owe(self, events: list[dict]):
        """Record what these events owe to whom (each once), then enqueue it. No RPC inside a
        transaction. An event whose case notify has not stored yet waits for it (retried)."""
        settings = self.rules.get()
        cases = self._cases(events)
        phones = self._citizen_phones(settings, [e for e in events if cases.get(e["case_id"]) is not None])
        owed, errors = [], {}
        for position, event in enumerate(events):
            case = cases.get(event["case_id"])
            if case is None:  # not even intake knows it (yet): tried again later
                errors[position] = LookupError(f"case {event['case_id']} not known to intake")
            else:
                owed.append((event, self._plan(settings, event, case, phones.get(event["case_id"]))))
        with self.db.begin() as session:
            new_ids = deliveries.record_many(session, owed, now())
        self._enqueue(new_ids)
        if errors:
            raise SomeFailed(errors)

    def _citizen_phones(self, settings, events: list[dict]) -> dict[str, str | None]:
        """The reporters' phones for the events whose routes reach the citizen, asked of intake in
        one call for the batch (a call per event cost a round trip through RabbitMQ for each)."""
        to_citizen = {route.event for route in settings.routes if "citizen" in route.to}
        case_ids = sorted({event["case_id"] for event in events if event["event_type"] in to_citizen})
        if not case_ids:
            return {}
        return {case_id: contact["phone"] for case_id, contact in self.intake.get_reporter_contacts(case_ids).items()}

    def _plan(self, settings, event: dict, case: dict, phone: str | None) -> list[planning.Delivery]:
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
        return planned

    def _recent_cases(self) -> deliveries.RecentCases:
        return self.state.setdefault("recent_cases", deliveries.RecentCases())

    def _cases(self, events: list[dict]) -> dict[str, dict]:
        """The cases the events are about: from memory, else from notify's table in one query,
        else from the event itself — routing's first event about a case (referred, or on the
        triage list) carries what notify needs — else from intake, in one call for them all;
        what was not in the table is kept there. (Hearing of every ``case_received`` cost a
        message per case, and routing's event often overtook it in a burst.)"""
        recent = self._recent_cases()
        found = {event["case_id"]: recent.get(event["case_id"]) for event in events}
        missing = [case_id for case_id, case in found.items() if case is None]
        if missing:
            with self.db() as session:
                found.update(deliveries.cases_of(session, missing))
        carried = {
            event["case_id"]: deliveries.case_row(event)
            for event in events
            if found[event["case_id"]] is None and event.get("external_id") and event.get("title") is not None
        }
        missing = [case_id for case_id, case in found.items() if case is None and case_id not in carried]
        asked = [{**view, "case_id": view["id"]} for view in self.intake.get_cases(missing)] if missing else []
        new = list(carried.values()) + [deliveries.case_row(case) for case in asked]
        if new:
            with self.db.begin() as session:
                deliveries.record_cases(session, new)
        found.update((case["case_id"], case) for case in new)
        for case in found.values():
            if case is not None:
                recent.put(case)
        return found

    def _enqueue(self, delivery_ids: list[int]):
        """Work messages naming the deliveries, all confirmed by the broker at once."""
        self.enqueue.publish_batch(work_messages(delivery_ids))

    @reliable_event_handler("intake", "directory_loaded")
    def on_directory_loaded(self, event):
        self.state.pop("directory", None)

    # One handler, one queue per event type (nameko names each queue after the type). No case
    # waits on notify: its queues gather for a while into each batch (batching.py).
    @event_batch_handler("routing", "case_referred", gather_seconds=GATHER_OFF_THE_CASES_WAY)
    @event_batch_handler("routing", "case_needs_triage", gather_seconds=GATHER_OFF_THE_CASES_WAY)
    @event_batch_handler("routing", "referral_replied", gather_seconds=GATHER_OFF_THE_CASES_WAY)
    @event_batch_handler("routing", "case_reopened", gather_seconds=GATHER_OFF_THE_CASES_WAY)
    @event_batch_handler("routing", "case_closed", gather_seconds=GATHER_OFF_THE_CASES_WAY)
    @event_batch_handler("supervision", "case_escalated", gather_seconds=GATHER_OFF_THE_CASES_WAY)
    @event_batch_handler("supervision", "department_reminded", gather_seconds=GATHER_OFF_THE_CASES_WAY)
    @event_batch_handler("supervision", "supervisors_alerted", gather_seconds=GATHER_OFF_THE_CASES_WAY)
    def on_event(self, events: list):
        self._owe(events)

    # --- the work queue: send deliveries ----------------------------------------------------

    @consume_deliveries(max_batch=DEFAULT_MAX_BATCH, gather_seconds=GATHER_OFF_THE_CASES_WAY)
    def deliver(self, bodies: list):
        """Send every delivery the waiting work messages name; a failed send is retried later
        (alone), or parked after the last attempt."""
        ids, errors = [], {}
        for position, body in enumerate(bodies):
            try:
                ids += delivery_ids_in(body)
            except ValueError as exc:
                errors[position] = exc
        with self.db.begin() as session:
            claimed = deliveries.claim(session, sorted(set(ids)), now())
        # nothing claimed for a delivery already sent (a duplicate message), being sent, or parked
        outcomes, retries, parked = [], [], []
        for delivery, failure in zip(claimed, channels.send_all(claimed, self.config), strict=True):
            if failure is None:
                outcomes.append((delivery.id, "sent", None))
            else:
                settings = self.rules.get()
                if failure.retryable and delivery.attempts < settings.max_attempts:
                    metrics.NOTIFICATION_FAILURES.labels(delivery.channel, "retried").inc()
                    outcomes.append((delivery.id, "retrying", str(failure)))
                    retries.append((delivery.id, backoff_seconds(delivery.attempts)))
                else:
                    metrics.NOTIFICATION_FAILURES.labels(delivery.channel, "parked").inc()
                    outcomes.append((delivery.id, "failed", str(failure)))
                    parked.append((delivery.id, str(failure), delivery.attempts))
        with self.db.begin() as session:
            deliveries.finish(session, outcomes, now())
        for delivery_id, delay in retries:
            retry_later(self.config["AMQP_URI"], delivery_id, delay)
        for delivery_id, error, attempts in parked:
            self.park({"delivery_id": delivery_id, "error": error}, routing_key=ROUTING_KEY)
            log.warning("delivery %s parked after %s attempt(s): %s", delivery_id, attempts, error)
        if errors:
            raise SomeFailed(errors)

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
