"""Recording the deliveries an event owes (once), claiming and finishing them, and the failure list."""

from collections import OrderedDict
from datetime import datetime, time, timedelta

from sqlalchemy import select, update

from services.common.timeutil import CST, iso
from services.common.upsert import insert_ignoring_duplicates, insert_many_ignoring_duplicates
from services.notify.models import deliveries, notify_cases
from services.notify.planning import Delivery, masked_address, recipient_name


def case_row(event: dict) -> dict:
    """What notify keeps of a case, from routing's first event about it, intake's view of it or its
    ``case_received`` event."""
    return dict(
        case_id=event["case_id"],
        source=event["source"],
        external_id=event["external_id"],
        title=event["title"],
        street=event.get("street"),
        category=event.get("category"),
        workstation=event.get("workstation"),
    )


def record_case(session, event: dict) -> dict | None:
    """Store what notify needs of a case, once: the row, or None when it was already stored."""
    row = case_row(event)
    return row if insert_ignoring_duplicates(session, notify_cases, row) else None


def record_cases(session, events: list[dict]) -> list[dict]:
    """``record_case`` for many, in one statement: the rows stored now."""
    rows = list({event["case_id"]: case_row(event) for event in events}.values())
    stored = set(insert_many_ignoring_duplicates(session, notify_cases, rows, notify_cases.c.case_id))
    return [row for row in rows if row["case_id"] in stored]


def cases_of(session, case_ids) -> dict[str, dict]:
    rows = session.execute(select(notify_cases).where(notify_cases.c.case_id.in_(list(case_ids)))).all()
    return {row.case_id: row._asdict() for row in rows}


class RecentCases:
    """The last ``size`` cases notify stored or read. A notify_cases row never changes once
    stored, so each later event of a case need not read it."""

    def __init__(self, size: int = 10_000):
        self.size, self.rows = size, OrderedDict()

    def get(self, case_id: str) -> dict | None:
        row = self.rows.get(case_id)
        if row is not None:
            self.rows.move_to_end(case_id)
        return row

    def put(self, row: dict):
        self.rows[row["case_id"]] = row
        self.rows.move_to_end(row["case_id"])
        if len(self.rows) > self.size:
            self.rows.popitem(last=False)


def record(session, event: dict, planned: list[Delivery], now) -> list[int]:
    """Store the deliveries; the ids of those to be sent now: the new ones (held ones wait for the
    digest) and, for an event seen before, its ones still pending. One statement for them all."""
    return record_many(session, [(event, planned)], now)


def record_many(session, owed: list[tuple[dict, list[Delivery]]], now) -> list[int]:
    """``record`` for the deliveries of many events, in one statement."""
    rows = [
        dict(
            event_id=event["event_id"],
            event_type=event["event_type"],
            case_id=event.get("case_id"),
            recipient=delivery.recipient,
            channel=delivery.channel,
            address=delivery.address,
            subject=delivery.subject[:300],
            body=delivery.body,
            status="held" if delivery.digest else "pending",  # held: waits for the daily digest
            attempts=0,
            created_at=now,
            updated_at=now,
        )
        for event, planned in owed
        for delivery in planned
    ]
    if not rows:
        return []
    inserted = insert_many_ignoring_duplicates(session, deliveries, rows, (deliveries.c.id, deliveries.c.status))
    to_send = {delivery_id for delivery_id, status in inserted if status == "pending"}
    if len(inserted) < len(rows):
        # An event seen before: its deliveries still pending go out again now. Their work message
        # may never have been published (the broker went down between the commit and the
        # publish, and the event came back after its restart): else they waited a minute for
        # the stale-delivery timer. A second work message for one sent meanwhile sends nothing.
        seen_before = sorted({row["event_id"] for row in rows})
        to_send.update(
            session.scalars(
                select(deliveries.c.id).where(deliveries.c.event_id.in_(seen_before), deliveries.c.status == "pending")
            )
        )
    return sorted(to_send)


def claim(session, delivery_ids: list[int], now) -> list:
    """Take deliveries for sending, in one statement; those sent, being sent or parked are not
    taken (a duplicate work message sends nothing)."""
    if not delivery_ids:
        return []
    return session.execute(
        update(deliveries)
        .where(deliveries.c.id.in_(delivery_ids), deliveries.c.status.in_(("pending", "retrying")))
        .values(status="sending", attempts=deliveries.c.attempts + 1, updated_at=now)
        .returning(deliveries)
    ).all()


def finish(session, outcomes: list[tuple[int, str, str | None]], now):
    """Record how each send went, ``(delivery id, status, error)``: the sent ones in one statement,
    the others one each (failures are few)."""
    sent = [delivery_id for delivery_id, status, _ in outcomes if status == "sent"]
    if sent:
        session.execute(
            update(deliveries)
            .where(deliveries.c.id.in_(sent))
            .values(status="sent", updated_at=now, sent_at=now, last_error=None)
        )
    for delivery_id, status, error in outcomes:
        if status != "sent":
            session.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery_id)
                .values(status=status, updated_at=now, last_error=error)
            )


def view(row) -> dict:
    return {
        "id": row.id,
        "event": row.event_type,
        "case_id": row.case_id,
        "recipient": row.recipient,
        "channel": row.channel,
        "address": masked_address(row.channel, row.address),
        "subject": row.subject,
        "status": row.status,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "created_at": iso(row.created_at),
        "sent_at": iso(row.sent_at),
    }


def for_case(session, case_id: str) -> list[dict]:
    rows = session.execute(select(deliveries).where(deliveries.c.case_id == case_id).order_by(deliveries.c.id)).all()
    return [view(r) for r in rows]


def failures(session) -> list[dict]:
    rows = session.execute(select(deliveries).where(deliveries.c.status == "failed").order_by(deliveries.c.id)).all()
    return [view(r) for r in rows]


def reset_for_retry(session, ids: list[int] | None, now) -> list[int]:
    """Parked deliveries back to pending (all of them when ``ids`` is None)."""
    query = select(deliveries.c.id).where(deliveries.c.status == "failed")
    if ids is not None:
        query = query.where(deliveries.c.id.in_(ids))
    chosen = list(session.scalars(query))
    if chosen:
        session.execute(
            update(deliveries)
            .where(deliveries.c.id.in_(chosen))
            .values(status="pending", attempts=0, last_error=None, updated_at=now)
        )
    return chosen


def stale(session, now, pending_for: timedelta, sending_for: timedelta) -> list[int]:
    """Deliveries whose work message may have been lost — pending and untouched for a while (the
    broker was down when they were recorded), or stuck sending (a crash mid-send) — back to
    pending, to be enqueued again by a timer. At least once: a crash mid-send may send twice."""
    condition = ((deliveries.c.status == "pending") & (deliveries.c.updated_at < now - pending_for)) | (
        (deliveries.c.status == "sending") & (deliveries.c.updated_at < now - sending_for)
    )
    ids = list(session.scalars(select(deliveries.c.id).where(condition).limit(500)))
    if ids:
        session.execute(update(deliveries).where(deliveries.c.id.in_(ids)).values(status="pending", updated_at=now))
    return ids


def make_digests(session, settings, now, directory) -> list[int]:
    """Collect the held deliveries from before today's digest hour into one message per
    recipient and channel; returns the new deliveries' ids (none before the digest hour, and at
    most one digest per recipient, channel and day however often this runs)."""
    local = now.astimezone(CST)
    if local.hour < settings.digest_hour:
        return []
    cutoff = datetime.combine(local.date(), time(settings.digest_hour), tzinfo=CST)
    held = session.execute(
        select(deliveries)
        .where(deliveries.c.status == "held", deliveries.c.created_at < cutoff)
        .order_by(deliveries.c.id)
    ).all()
    groups: dict = {}
    for row in held:
        groups.setdefault((row.recipient, row.channel, row.address), []).append(row)
    new_ids = []
    for (recipient, channel, address), rows in groups.items():
        name = recipient_name(directory, recipient)
        subject, body = settings.render("digest", {"recipient_name": name, "items": [r.subject for r in rows]})
        event = {"event_id": f"digest-{local.date()}", "event_type": "digest", "case_id": None}
        new_ids += record(session, event, [Delivery(recipient, channel, address, subject, body)], now)
        session.execute(
            update(deliveries)
            .where(deliveries.c.id.in_([r.id for r in rows]))
            .values(status="digested", updated_at=now)
        )
    return new_ids
