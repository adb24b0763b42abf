"""Supervision's projection of cases: updated from events, read by ``huiying case show``."""

from datetime import datetime

from sqlalchemy import select

from services.common.http import NotFound
from services.common.timeutil import iso, now
from services.common.upsert import insert_ignoring_duplicates
from services.supervision.models import case_projection, timeline


def record_case_received(session, event: dict) -> bool:
    """Project a ``case_received`` event; False when this event was already recorded."""
    received_at = datetime.fromisoformat(event["received_at"])
    first_time = insert_ignoring_duplicates(
        session,
        timeline,
        dict(
            event_id=event["event_id"],
            case_id=event["case_id"],
            event_type="case_received",
            at=received_at,
            details={"source": event["source"], "channel": event["channel"]},
        ),
    )
    insert_ignoring_duplicates(
        session,
        case_projection,
        dict(
            case_id=event["case_id"],
            source=event["source"],
            title=event["title"],
            status="received",
            kind=event.get("kind"),
            category=event.get("category"),
            street=event.get("street"),
            residents_affected=event.get("residents_affected"),
            received_at=received_at,
            updated_at=now(),
        ),
    )
    return first_time


def case_record(session, case_id: str) -> dict:
    """The whole-process record of one case (the shape of ``huiying case show --json``)."""
    row = session.execute(select(case_projection).where(case_projection.c.case_id == case_id)).first()
    if row is None:
        raise NotFound(f"no case {case_id!r}")
    steps = session.execute(
        select(timeline.c.at, timeline.c.event_type, timeline.c.details)
        .where(timeline.c.case_id == case_id)
        .order_by(timeline.c.at, timeline.c.id)
    ).all()
    return {
        "id": row.case_id,
        "source": row.source,
        "title": row.title,
        "status": row.status,
        "kind": row.kind,
        "category": row.category,
        "street": row.street,
        "received_at": iso(row.received_at),
        "referrals": [],
        "timeline": [{"at": iso(s.at), "event": s.event_type, "details": s.details or {}} for s in steps],
        "escalations": [],
    }
