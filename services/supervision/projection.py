"""Supervision's projection of cases, built only from bus events (it never reads another
service's tables), and the whole-process record that ``huiying case show`` prints.

Every event is recorded once in the timeline (its ``event_id`` is unique), and only a first
recording changes the projection, so redelivered events change nothing. Events from routing may
overtake the ``case_received`` from intake (different queues): the case row is then started
from what routing's event carries and completed when intake's event arrives.
"""

import bisect
from collections import defaultdict
from datetime import datetime, timedelta
from types import SimpleNamespace

from sqlalchemy import bindparam, func, select, update

from services.common.http import NotFound
from services.common.timeutil import iso, now
from services.common.upsert import dialect_insert, insert_ignoring_duplicates, insert_many_ignoring_duplicates
from services.supervision.clusters import bigrams, cluster_key, clusters_to_join
from services.supervision.models import case_projection, referral_projection, sweep_shards, timeline

ROUTING_EVENTS = (
    "case_referred",
    "case_needs_triage",
    "referral_accepted",
    "referral_returned",
    "extension_requested",
    "extension_granted",
    "extension_refused",
    "referral_replied",
    "feedback_received",
    "case_reopened",
    "case_closed",
)
CASE_STATUS = {
    "case_referred": "referred",
    "case_needs_triage": "triage",
    "case_reopened": "reopened",
    "case_closed": "closed",
}
OPEN_REFERRAL = ("referred", "accepted")  # a deadline that still runs
REFERRAL_STATUS = {"referral_accepted": "accepted", "referral_returned": "returned", "referral_replied": "replied"}
EXTENSION = {"extension_requested": "requested", "extension_granted": "granted", "extension_refused": "refused"}
DETAIL_KEYS = (
    "department",
    "department_name",
    "referral_id",
    "reason",
    "rating",
    "working_days",
    "due_at",
    "result",
    "round",
    "reopen_count",
    "source",
    "channel",
    "category",
    "street",
)


def _at(event: dict) -> datetime:
    return datetime.fromisoformat(event["occurred_at"])  # full precision: the timeline's order


def _timeline_row(event_type: str, event: dict, at: datetime) -> dict:
    details = {k: event[k] for k in DETAIL_KEYS if event.get(k) is not None}
    if event_type == "case_referred":
        details["departments"] = [r["department_name"] for r in event["referrals"]]
    return dict(event_id=event["event_id"], case_id=event["case_id"], event_type=event_type, at=at, details=details)


def _record(session, event_type: str, event: dict, at: datetime) -> bool:
    return insert_ignoring_duplicates(session, timeline, _timeline_row(event_type, event, at))


def _new_case_row(event: dict, at: datetime) -> dict:
    """A case's first row, from whichever event about it comes first."""
    return dict(
        case_id=event["case_id"],
        source=event.get("source") or "",
        title="",
        status="received",
        kind=event.get("kind"),
        category=event.get("category"),
        street=event.get("street"),
        received_at=at,
        updated_at=at,
        changed_at=now(),
        cluster_key=cluster_key(event.get("category"), event.get("street"), event["case_id"]),
        departments=[],
        returns=0,
        extensions=0,
        reopen_count=0,
        unsatisfied_count=0,
    )


def _ensure_case(session, event: dict, at: datetime):
    insert_ignoring_duplicates(session, case_projection, _new_case_row(event, at))


def record_case_received(session, event: dict, settings: dict) -> bool:
    """Project a ``case_received`` event; False when this event was already recorded.
    ``settings`` are the supervision policy's (the cluster window and similarity)."""
    return bool(record_cases_received(session, [event], settings))


def record_cases_received(session, events: list[dict], settings: dict) -> list[str]:
    """Project ``case_received`` events, in a few statements for them all; the ids of the cases
    whose event was recorded now (a redelivered one changes nothing)."""
    by_event = {event["event_id"]: event for event in sorted(events, key=lambda e: e["case_id"])}
    fresh_ids = set(
        insert_many_ignoring_duplicates(
            session,
            timeline,
            [_timeline_row("case_received", e, datetime.fromisoformat(e["received_at"])) for e in by_event.values()],
            timeline.c.event_id,
        )
    )
    fresh = list({e["case_id"]: e for e in by_event.values() if e["event_id"] in fresh_ids}.values())
    if not fresh:
        return []
    insert_many_ignoring_duplicates(
        session,
        case_projection,
        [_new_case_row(e, datetime.fromisoformat(e["received_at"])) for e in fresh],
        case_projection.c.case_id,
    )
    c = case_projection.c
    # One UPDATE sent with every case's values; what a routing event that overtook this one
    # already set (kind, category, street) stays when intake's event lacks it.
    session.execute(
        update(case_projection)
        .where(c.case_id == bindparam("b_case_id"))
        .values(
            source=bindparam("b_source"),
            title=bindparam("b_title"),
            description=bindparam("b_description"),
            received_at=bindparam("b_received_at", type_=c.received_at.type),
            residents_affected=bindparam("b_residents_affected"),
            kind=func.coalesce(bindparam("b_kind", type_=c.kind.type), c.kind),
            category=func.coalesce(bindparam("b_category", type_=c.category.type), c.category),
            street=func.coalesce(bindparam("b_street", type_=c.street.type), c.street),
            changed_at=bindparam("b_changed_at", type_=c.changed_at.type),
        ),
        [
            {
                "b_case_id": e["case_id"],
                "b_source": e["source"],
                "b_title": e["title"],
                "b_description": e.get("description"),
                "b_received_at": datetime.fromisoformat(e["received_at"]),
                "b_residents_affected": e.get("residents_affected"),
                "b_kind": e.get("kind"),
                "b_category": e.get("category"),
                "b_street": e.get("street"),
                "b_changed_at": now(),
            }
            for e in fresh
        ],
    )
    ids = [e["case_id"] for e in fresh]
    stored = session.execute(select(*CLUSTERING).where(c.case_id.in_(ids))).all()  # as stored
    place_in_clusters(session, stored, settings)
    return ids


CLUSTERING = (
    case_projection.c.case_id,
    case_projection.c.category,
    case_projection.c.street,
    case_projection.c.received_at,
    case_projection.c.title,
    case_projection.c.description,
)


def register_shard(session, street: str | None, category: str | None) -> None:
    """Make sure the periodic sweep knows the shard this case falls in (sweeping.py)."""
    insert_ignoring_duplicates(session, sweep_shards, dict(street=street or "", category=category or ""))


def _register_and_lock_shard(session, street: str, category: str) -> None:
    """Register the shard and lock its row until the transaction ends, in one statement (an
    upsert that touches the row takes its lock, as SELECT … FOR UPDATE would)."""
    statement = dialect_insert(session, sweep_shards).values(street=street, category=category)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[sweep_shards.c.street, sweep_shards.c.category],
            set_={"street": statement.excluded.street},
        )
    )


def place_in_cluster(session, case, settings: dict) -> str:
    """Put a case into the cluster of the unresolved cases similar to it (clusters.py), merging
    the clusters it bridges; alone, it starts its own. Returns its cluster key."""
    return place_in_clusters(session, [case], settings)[case.case_id]


def place_in_clusters(session, cases: list, settings: dict) -> dict[str, str]:
    """``place_in_cluster`` for many cases: each shard (street × category) is locked once, in one
    order (two batches never deadlock), its unresolved cases are read and split into words once,
    and the new cases join in the order they were received, each seeing the ones before it.
    Returns ``{case id: cluster key}``."""
    c = case_projection.c
    keys, by_shard = {}, defaultdict(list)
    for case in cases:
        if case.category and case.street:
            by_shard[(case.street, case.category)].append(case)
        else:  # no similar cases without both
            register_shard(session, case.street, case.category)
            keys[case.case_id] = cluster_key(case.category, case.street, case.case_id)
    window = timedelta(days=settings["cluster_window_days"])
    for (street, category), arrivals in sorted(by_shard.items()):
        # Two similar cases arriving together (in two batches) must see each other: the shard's
        # row is the lock.
        _register_and_lock_shard(session, street, category)
        arrivals.sort(key=lambda case: (case.received_at, case.case_id))
        arriving = {case.case_id for case in arrivals}
        # (received at, case id, cluster key, words) of the shard's unresolved cases, in order
        peers = [
            [p.received_at, p.case_id, p.cluster_key, bigrams(f"{p.title}\n{p.description or ''}")]
            for p in session.execute(
                select(c.case_id, c.cluster_key, c.title, c.description, c.received_at)
                .where(
                    c.category == category,
                    c.street == street,
                    c.status != "closed",
                    c.received_at.between(arrivals[0].received_at - window, arrivals[-1].received_at + window),
                )
                .order_by(c.received_at, c.case_id)
                .execution_options(yield_per=2000)
            )
            if p.case_id not in arriving
        ]
        for case in arrivals:
            words = bigrams(f"{case.title}\n{case.description or ''}")
            joined = clusters_to_join(
                words,
                ((key, peer_words) for at, _, key, peer_words in peers if abs(at - case.received_at) <= window),
                settings["cluster_similarity"],
            )
            key = joined[0] if joined else cluster_key(case.category, case.street, case.case_id)
            if joined[1:]:  # this case bridges clusters: they become one
                session.execute(
                    update(case_projection)
                    .where(c.cluster_key.in_(joined[1:]))
                    .values(cluster_key=key, changed_at=now())
                )
                for peer in peers:
                    if peer[2] in joined[1:]:
                        peer[2] = key
                keys.update({case_id: key for case_id, old in keys.items() if old in joined[1:]})
            keys[case.case_id] = key
            bisect.insort(peers, [case.received_at, case.case_id, key, words])
    if keys:
        session.execute(
            update(case_projection).where(c.case_id == bindparam("b_case_id")).values(cluster_key=bindparam("b_key")),
            [{"b_case_id": case_id, "b_key": key} for case_id, key in keys.items()],
        )
    return keys


def record_routing_events(session, events: list[dict], settings: dict) -> list[str]:
    """Project routing's events, in one transaction; the ids of the cases changed by an event
    recorded now. Taken case by case, in the order each case's events occurred: a case's row is
    locked while its events are applied, and cases are locked in one order (no deadlock between
    two batches)."""
    ordered = sorted(events, key=lambda e: (e["case_id"], e.get("occurred_at", "")))
    changed = [e["case_id"] for e in ordered if record_routing_event(session, e, settings)]
    return list(dict.fromkeys(changed))


def record_routing_event(session, event: dict, settings: dict) -> bool:
    """Project one of routing's events; False when it was already recorded."""
    event_type = event["event_type"]
    at = _at(event)
    if not _record(session, event_type, event, at):
        return False
    case_id = event["case_id"]
    # Locked: two events about one case (two returns, say) must not both count from the same value.
    locked = select(case_projection).where(case_projection.c.case_id == case_id).with_for_update()
    case = session.execute(locked).first()
    if case is None:  # this event overtook intake's case_received
        _ensure_case(session, event, at)
        register_shard(session, event.get("street"), event.get("category"))
        case = session.execute(locked).first()
    values = {"updated_at": at, "changed_at": now()}
    if event_type in CASE_STATUS:
        values["status"] = CASE_STATUS[event_type]
    if event_type == "case_referred":
        departments = list(dict.fromkeys([*(case.departments or []), *(r["department"] for r in event["referrals"])]))
        values.update(
            departments=departments,
            lead_department=event["referrals"][0]["department"],
            first_referred_at=case.first_referred_at or at,
            category=event.get("category") or case.category,
            kind=event.get("kind") or case.kind,
        )
        insert_many_ignoring_duplicates(
            session,
            referral_projection,
            [
                dict(
                    referral_id=r["referral_id"],
                    case_id=case_id,
                    department=r["department"],
                    department_name=r.get("department_name"),
                    is_lead=int(bool(r.get("lead"))),
                    round=event["round"],
                    status="referred",
                    referred_at=at,
                    due_at=datetime.fromisoformat(r["due_at"]),
                    updated_at=at,
                )
                for r in event["referrals"]
            ],
            referral_projection.c.referral_id,
        )
    elif event_type == "case_needs_triage":
        values.update(category=event.get("category") or case.category)
    elif event_type == "referral_returned":
        values["returns"] = case.returns + 1
    elif event_type == "extension_requested":
        values["extensions"] = case.extensions + 1
    elif event_type == "referral_replied" and event.get("case_replied"):
        values["status"] = "replied"
    elif event_type == "feedback_received":
        values.update(
            last_rating=event["rating"], unsatisfied_count=case.unsatisfied_count + (event["rating"] == "不满意")
        )
    elif event_type == "case_reopened":
        values["reopen_count"] = event["reopen_count"]
    session.execute(update(case_projection).where(case_projection.c.case_id == case_id).values(**values))
    if values.get("category", case.category) != case.category:  # reclassified: another shard and cluster
        place_in_cluster(session, SimpleNamespace(**{**case._mapping, "category": values["category"]}), settings)

    referral_values = {}
    if event_type in REFERRAL_STATUS:
        referral_values["status"] = REFERRAL_STATUS[event_type]
    if event_type in EXTENSION:
        referral_values["extension"] = EXTENSION[event_type]
    if event_type == "extension_granted":
        referral_values["due_at"] = datetime.fromisoformat(event["due_at"])
    if referral_values and event.get("referral_id"):
        session.execute(
            update(referral_projection)
            .where(referral_projection.c.referral_id == event["referral_id"])
            .values(updated_at=at, **referral_values)
        )
    if event_type == "case_referred" or referral_values:
        nearest_due = (
            select(func.min(referral_projection.c.due_at))
            .where(referral_projection.c.case_id == case_id, referral_projection.c.status.in_(OPEN_REFERRAL))
            .scalar_subquery()
        )
        session.execute(
            update(case_projection).where(case_projection.c.case_id == case_id).values(nearest_due=nearest_due)
        )
    return True


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
    referral_rows = session.execute(
        select(referral_projection)
        .where(referral_projection.c.case_id == case_id)
        .order_by(referral_projection.c.round, referral_projection.c.referred_at, referral_projection.c.referral_id)
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
        "referrals": [
            {
                "id": r.referral_id,
                "department": r.department,
                "department_name": r.department_name or r.department,
                "lead": bool(r.is_lead),
                "round": r.round,
                "status": r.status,
                "extension": r.extension,
                "referred_at": iso(r.referred_at),
                "due_at": iso(r.due_at),
            }
            for r in referral_rows
        ],
        "returns": row.returns,
        "extensions": row.extensions,
        "reopen_count": row.reopen_count,
        "last_rating": row.last_rating,
        "timeline": [{"at": iso(s.at), "event": s.event_type, "details": s.details or {}} for s in steps],
        "escalations": [],
    }
