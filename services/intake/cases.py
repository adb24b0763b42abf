"""Storing cases: classification against the directory, readable ids, idempotency, the event.

Plain functions over a SQLAlchemy session; the nameko service only calls them.
"""

import logging
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from services.common.db import on_postgresql
from services.common.directory import Directory, parse_directory
from services.common.http import NotFound, ValidationFailed
from services.common.outbox import add_event, add_events
from services.common.privacy import mask_phone, mask_phones_in_text
from services.common.timeutil import CST, iso, now
from services.common.upsert import dialect_insert, update_from_values
from services.intake.models import case_counters, cases, directory_versions, outbox
from services.intake.schemas import CaseSubmission

log = logging.getLogger(__name__)

RECEIVED = "received"


@dataclass
class Submitted:
    case_id: str
    created: bool


class DirectoryCache:
    """The current directory, re-read only when a newer version has been loaded (by any replica).

    Whether there is a newer version is asked at most once every ``recheck_seconds``: a round
    trip per case was a noticeable share of a burst's cost. A directory loaded through this
    process is seen at once (``invalidate``); one loaded through another replica within a second."""

    def __init__(self, recheck_seconds: float = 1.0):
        self.recheck_seconds = recheck_seconds
        self._version_id = None
        self._directory: Directory | None = None
        self._checked_at = None

    def invalidate(self):
        self._checked_at = None

    def current(self, session) -> Directory | None:
        checked = time.monotonic()
        if self._checked_at is not None and checked - self._checked_at < self.recheck_seconds:
            return self._directory
        latest = session.execute(
            select(directory_versions.c.id, directory_versions.c.content_hash)
            .order_by(directory_versions.c.id.desc())
            .limit(1)
        ).first()
        version_id = tuple(latest) if latest else None
        if version_id != self._version_id:
            document = (
                session.scalar(select(directory_versions.c.document).where(directory_versions.c.id == latest.id))
                if latest
                else None
            )
            self._directory = parse_directory(document) if document else None
            self._version_id = version_id
        self._checked_at = checked
        return self._directory


def store_directory(session, directory: Directory) -> dict:
    session.execute(
        insert(directory_versions).values(
            content_hash=directory.content_hash(), document=directory.model_dump(mode="json"), loaded_at=now()
        )
    )
    summary = directory.summary() | {"content_hash": directory.content_hash()}
    add_event(session, outbox, "directory_loaded", summary)
    return summary


def classify(submission: CaseSubmission, directory: Directory | None) -> dict:
    """Codes from the directory for category, street, sector and workstation.

    Unknown codes are an error naming the field (a typo must not silently lose the street);
    with no directory loaded yet, values are kept as given."""
    values = submission.model_dump()
    if directory is None:
        return values
    wrong = []

    def resolve(field, resolver, known):
        given = values[field]
        if given is None:
            return
        code = resolver(given)
        if code is None:
            wrong.append({"field": field, "problem": f"unknown {field} {given!r}; known: {', '.join(known)}"})
        values[field] = code

    resolve("category", directory.resolve_category, [c.code for c in directory.categories])
    resolve("street", directory.resolve_street, [s.code for s in directory.streets])
    resolve(
        "sector", lambda v: v if v in {s.code for s in directory.sectors} else None, [s.code for s in directory.sectors]
    )
    resolve(
        "workstation",
        lambda v: v if v in {w.code for w in directory.workstations} else None,
        [w.code for w in directory.workstations],
    )
    if wrong:
        raise ValidationFailed(f"invalid case submission: {', '.join(w['field'] for w in wrong)}", wrong)
    if values["street"] is None:
        values["street"] = directory.street_in_text(values["address"]) or directory.street_in_text(values["title"])
    return values


def _reserve_case_numbers(session, year: int, count: int) -> int:
    """The first of ``count`` consecutive case numbers for ``year``, reserved in one statement:
    the year's row is created or incremented by ``count``. The update takes the row lock, so
    concurrent submissions queue here until commit and numbers never repeat."""
    last = session.execute(
        dialect_insert(session, case_counters)
        .values(year=year, last_number=count)
        .on_conflict_do_update(
            index_elements=[case_counters.c.year], set_={"last_number": case_counters.c.last_number + count}
        )
        .returning(case_counters.c.last_number)
    ).scalar_one()
    return last - count + 1


def find_by_external_id(session, source: str, external_id: str) -> str | None:
    return session.scalar(select(cases.c.id).where(cases.c.source == source, cases.c.external_id == external_id))


def _known_ids(session, submissions: list[CaseSubmission]) -> dict[tuple, str]:
    """``{(source, external id): case id}`` of the submissions already stored, in one query."""
    sources = {s.source for s in submissions}
    external_ids = {s.external_id for s in submissions}
    rows = session.execute(
        select(cases.c.source, cases.c.external_id, cases.c.id).where(
            cases.c.source.in_(sources), cases.c.external_id.in_(external_ids)
        )
    )
    return {(row.source, row.external_id): row.id for row in rows}


def submit_many(
    sessions, received: list[tuple[CaseSubmission, str]], directory_cache: DirectoryCache, prefix: str
) -> list:
    """Store each new case with its ``case_received`` event, all in one transaction; ``received``
    holds each submission with the channel it came by (submissions of every channel are stored
    together). One result per submission, in order: ``Submitted``, or the ``ValidationFailed`` of
    a submission naming a code the directory does not know (the others are stored all the same).
    A resend of a known (source, external id), here or earlier in the list, answers with the
    existing case."""
    if not received:
        return []
    try:
        with sessions.begin() as session:
            results = _store_new(session, received, directory_cache.current(session), prefix)
    except IntegrityError:
        # Another worker stored one of these (source, external id) a moment ago.
        if len(received) > 1:
            return [submit_many(sessions, [each], directory_cache, prefix)[0] for each in received]
        [(submission, _)] = received
        with sessions() as session:
            existing = find_by_external_id(session, submission.source, submission.external_id)
        if existing is None:
            raise
        return [Submitted(existing, False)]
    for (submission, channel), result in zip(received, results):
        if isinstance(result, Submitted) and result.created:
            log.info(
                "case %s received from %s via %s",
                result.case_id,
                submission.source,
                channel,
                extra={"case_id": result.case_id},
            )
    return results


def _store_new(session, received, directory, prefix) -> list:
    known = _known_ids(session, [submission for submission, _ in received])
    results: list = []
    new = []  # (position in results, channel, values, received_at)
    first_at: dict[tuple, int] = {}  # (source, external id) → position of its new case
    for submission, channel in received:
        key = (submission.source, submission.external_id)
        if key in known:
            results.append(Submitted(known[key], False))
        elif key in first_at:
            results.append(first_at[key])  # a resend within the list: resolved once ids are given
        else:
            try:
                values = classify(submission, directory)
            except ValidationFailed as exc:
                results.append(exc)
                continue
            first_at[key] = len(results)
            new.append((len(results), channel, values, values.pop("received_at") or now()))
            results.append(None)
    if not new:
        return results
    years = [received_at.astimezone(CST).year for *_, received_at in new]
    next_number = {year: _reserve_case_numbers(session, year, years.count(year)) for year in sorted(set(years))}
    stamp, rows, events = now(), [], []
    for (position, channel, values, received_at), year in zip(new, years):
        case_id = f"{prefix}-{year}-{next_number[year]:06d}"
        next_number[year] += 1
        results[position] = Submitted(case_id, True)
        rows.append(
            dict(id=case_id, channel=channel, status=RECEIVED, received_at=received_at, updated_at=stamp, **values)
        )
        events.append(("case_received", case_event(case_id, channel, values, received_at)))
    session.execute(insert(cases), rows)  # one multi-row INSERT
    add_events(session, outbox, events)
    return [Submitted(results[r].case_id, False) if isinstance(r, int) else r for r in results]


def case_event(case_id: str, channel: str, values: dict, received_at) -> dict:
    """The ``case_received`` payload: what other services need, with phone numbers masked."""
    return {
        "case_id": case_id,
        "source": values["source"],
        "external_id": values["external_id"],
        "channel": channel,
        "title": mask_phones_in_text(values["title"]),
        "description": mask_phones_in_text(values["description"]),
        "category": values["category"],
        "street": values["street"],
        "sector": values["sector"],
        "workstation": values["workstation"],
        "kind": values["kind"],
        "address": values["address"],
        "lat": values["lat"],
        "lon": values["lon"],
        "residents_affected": values["residents_affected"],
        "reporter_phone_masked": mask_phone(values["reporter_phone"]),
        "received_at": iso(received_at),
    }


def case_view(row) -> dict:
    """A case as APIs and the CLI show it: no reporter name, phone masked, times in CST."""
    return {
        "id": row.id,
        "source": row.source,
        "external_id": row.external_id,
        "channel": row.channel,
        "status": row.status,
        "status_notes": row.status_notes,
        "title": mask_phones_in_text(row.title),
        "description": mask_phones_in_text(row.description),
        "category": row.category,
        "street": row.street,
        "sector": row.sector,
        "workstation": row.workstation,
        "kind": row.kind,
        "address": row.address,
        "lat": row.lat,
        "lon": row.lon,
        "residents_affected": row.residents_affected,
        "reporter_phone": mask_phone(row.reporter_phone),
        "received_at": iso(row.received_at),
        "updated_at": iso(row.updated_at),
        "agency_responsible": row.agency_responsible,
        "expected_at": iso(row.expected_at),
    }


def get_case_row(session, case_id: str):
    row = session.execute(select(cases).where(cases.c.id == case_id)).first()
    if row is None:
        raise NotFound(f"no case {case_id!r}")
    return row


def reporter_phones(session, case_ids) -> dict[str, str | None]:
    """``{case id: its reporter's phone}`` for those of ``case_ids`` that exist, in one query."""
    ids = sorted(set(case_ids))
    return dict(session.execute(select(cases.c.id, cases.c.reporter_phone).where(cases.c.id.in_(ids))).all())


# What a ticketing system sees of routing's progress: (status, note) per event.
STATUS_FROM_ROUTING = {
    "case_referred": ("referred", "已转交{departments}办理"),
    "case_needs_triage": ("triage", "正在人工分派"),
    "referral_replied": ("replied", "已答复：{result}"),
    "case_reopened": ("reopened", "群众不满意，已重办"),
    "case_closed": ("closed", "已办结（评价：{rating}）"),
}


def apply_routing_statuses(session, events: list[dict]) -> None:
    """Update cases' statuses from routing's events. Events are applied in the order they
    occurred, each only to a case last updated no later than it occurred: an older event arriving
    late changes nothing. On PostgreSQL one statement updates every case once, with its events
    taken together (``_taken_together``): an UPDATE per event had been intake's busiest statement
    in PostgreSQL (8,000 a run of bench/e2e.py, bench/README.md)."""
    changes = _status_changes(events)
    if not changes:
        return
    if on_postgresql(session):
        _apply_taken_together(session, _taken_together(changes))
    else:
        _apply_one_by_one(session, changes)


def _status_changes(events: list[dict]) -> list[dict]:
    """What each event sets, in the order the events occurred: ``case_id``, ``occurred``,
    ``status``, ``notes``, and ``agency`` and ``expected_at`` (a referral's, else None)."""
    changes = []
    for event in sorted(events, key=lambda e: e["occurred_at"]):
        event_type = event["event_type"]
        if event_type == "referral_replied" and not event.get("case_replied"):
            continue
        status, note = STATUS_FROM_ROUTING[event_type]
        at = datetime.fromisoformat(event["occurred_at"])
        change = dict(case_id=event["case_id"], occurred=at, status=status, agency=None, expected_at=None)
        if event_type == "case_referred":
            lead = event["referrals"][0]
            names = "、".join(r["department_name"] for r in event["referrals"])
            change.update(
                agency=lead["department_name"],
                expected_at=datetime.fromisoformat(lead["due_at"]),
                notes=note.format(departments=names),
            )
        else:
            change["notes"] = note.format(result=(event.get("result") or "")[:500], rating=event.get("rating", ""))
        changes.append(change)
    return changes


# A case's row taken together before any of its changes names a referral.
NO_REFERRAL = dict(agency_responsible=None, expected_at=None, agency_at=None)


def _taken_together(changes: list[dict]) -> list[dict]:
    """One row per case with the same outcome as its changes applied one by one. Applied in order,
    a case's changes take effect from the first that occurred no earlier than its last update
    (each one applied moves that update to its own time, no later than the next's): so the case
    ends with the last change's status if that one is not older than the case, and with the agency
    and deadline of its last referral that is not — ``agency_at`` says when that referral
    occurred, to be compared in the statement."""
    together = {}
    for change in changes:  # in the order they occurred
        row = together.get(change["case_id"])
        if row is None:
            row = together[change["case_id"]] = dict(id=change["case_id"], **NO_REFERRAL)
        row.update(updated_at=change["occurred"], status=change["status"], status_notes=change["notes"])
        if change["agency"] is not None:
            row.update(
                agency_responsible=change["agency"], expected_at=change["expected_at"], agency_at=change["occurred"]
            )
    return list(together.values())


def _apply_taken_together(session, rows: list[dict]) -> None:
    referral_applies = "intake_cases.updated_at <= changes.agency_at"  # NULL when it had no referral: false
    update_from_values(
        session,
        cases,
        cases.c.id,
        rows,
        {
            "status": "changes.status",
            "status_notes": "changes.status_notes",
            "updated_at": "changes.updated_at",
            "agency_responsible": (
                f"CASE WHEN {referral_applies} THEN changes.agency_responsible ELSE intake_cases.agency_responsible END"
            ),
            "expected_at": f"CASE WHEN {referral_applies} THEN changes.expected_at ELSE intake_cases.expected_at END",
        },
        condition="intake_cases.updated_at <= changes.updated_at",
        types={"agency_at": cases.c.updated_at.type},
    )


def _apply_one_by_one(session, changes: list[dict]) -> None:
    """An UPDATE per change, in order (SQLite: no UPDATE … FROM VALUES here)."""
    c = cases.c
    statement = (
        update(cases)
        .where(c.id == bindparam("b_id"), c.updated_at <= bindparam("b_occurred", type_=c.updated_at.type))
        .values(
            status=bindparam("b_status"),
            status_notes=bindparam("b_notes"),
            updated_at=bindparam("b_occurred", type_=c.updated_at.type),
            # a referral names the responsible agency and its deadline; later steps keep them
            agency_responsible=func.coalesce(
                bindparam("b_agency", type_=c.agency_responsible.type), c.agency_responsible
            ),
            expected_at=func.coalesce(bindparam("b_expected_at", type_=c.expected_at.type), c.expected_at),
        )
    )
    session.execute(
        statement,
        [
            dict(
                b_id=change["case_id"],
                b_occurred=change["occurred"],
                b_status=change["status"],
                b_notes=change["notes"],
                b_agency=change["agency"],
                b_expected_at=change["expected_at"],
            )
            for change in changes
        ],
    )
