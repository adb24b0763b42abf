"""The referral lifecycle (转办): route, accept, return (退回), extend (延期), reply (答复),
feedback (评价) and redo (重办). Plain functions over a SQLAlchemy session; each step records
its event in the outbox, in the same transaction.

Who may do what: a department acts on its own referrals only (another's is "not found", so
nothing leaks); staff may do everything; only staff decide extensions and route from triage.
"""

import csv
import io
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, or_, select, update

from services.common.http import Conflict, Forbidden, NotFound, ValidationFailed
from services.common.outbox import add_event, add_events
from services.common.rules.ruleset import Ruleset
from services.common.timeutil import iso
from services.common.upsert import insert_ignoring_duplicates, insert_many_ignoring_duplicates, update_many
from services.common.workdays import WorkingCalendar, add_months, cst_date, end_of_day
from services.routing import rules as routing_rules
from services.routing.models import outbox, referrals, routing_cases

RATINGS = {"满意": "satisfied", "基本满意": "basically_satisfied", "不满意": "unsatisfied"}
ACTIVE = ("referred", "accepted")


@dataclass
class Context:
    rules: Ruleset
    calendar: WorkingCalendar
    department_names: dict  # code -> name, from the directory ({} when none is loaded)
    now: datetime

    @property
    def known_departments(self):
        return set(self.department_names) or None


# --- reading ---------------------------------------------------------------------------------


def _case(session, case_id: str, lock: bool = False):
    query = select(routing_cases).where(routing_cases.c.case_id == case_id)
    row = session.execute(query.with_for_update() if lock else query).first()
    if row is None:
        raise NotFound(f"no case {case_id!r}")
    return row


def _referral(session, referral_id: str, actor: dict, lock: bool = True):
    query = select(referrals).where(referrals.c.id == referral_id)
    row = session.execute(query.with_for_update() if lock else query).first()
    if row is None or not can_see(actor, row.department):
        raise NotFound(f"no referral {referral_id!r}")
    return row


def can_see(actor: dict, department: str) -> bool:
    return actor["role"] == "staff" or (actor["role"] == "department" and actor["subject"] == department)


def referral_view(row, names: dict) -> dict:
    return {
        "id": row.id,
        "case_id": row.case_id,
        "department": row.department,
        "department_name": names.get(row.department, row.department),
        "lead": bool(row.is_lead),
        "round": row.round,
        "status": row.status,
        "referred_at": iso(row.referred_at),
        "due_at": iso(row.due_at),
        "return_by": iso(row.return_by),
        "accepted_at": iso(row.accepted_at),
        "returned_at": iso(row.returned_at),
        "return_reason": row.return_reason,
        "extension": _extension_view(row),
        "replied_at": iso(row.replied_at),
        "reply": row.reply,
    }


def _extension_view(row):
    if not row.extension_status:
        return None
    return {
        "status": row.extension_status,
        "working_days": row.extension_days,
        "reason": row.extension_reason,
        "decided_at": iso(row.extension_decided_at),
    }


def case_view(session, case_id: str, actor: dict, names: dict) -> dict:
    case = _case(session, case_id)
    rows = session.execute(select(referrals).where(referrals.c.case_id == case_id).order_by(referrals.c.id)).all()
    if actor["role"] == "department" and not any(r.department == actor["subject"] for r in rows):
        raise NotFound(f"no case {case_id!r}")
    if actor["role"] == "source" and case.source != actor["subject"]:
        raise NotFound(f"no case {case_id!r}")
    visible = [r for r in rows if actor["role"] != "department" or r.department == actor["subject"]]
    return {
        "case_id": case.case_id,
        "status": case.status,
        "category": case.category,
        "kind": case.kind,
        "urgency": case.urgency,
        "street": case.street,
        "lead_department": case.lead_department,
        "triage_reason": case.triage_reason,
        "reopen_count": case.reopen_count,
        "rating": case.rating,
        "decision": case.decision,
        "referrals": [referral_view(r, names) for r in visible],
    }


MAX_QUERY = 200  # characters of a search text
DEFAULT_LIMIT, MAX_LIMIT = 200, 1000


def filters(args) -> dict:
    """The list's, search's and export's filters from a query string: ``status``, ``department``
    (staff only; a department always gets its own), ``case_id`` and ``q`` (text in the case's
    title or description, or in its id)."""
    found = {name: (args.get(name) or "").strip() or None for name in ("status", "department", "case_id", "q")}
    if found["q"] and len(found["q"]) > MAX_QUERY:
        raise ValidationFailed(
            f"q is limited to {MAX_QUERY} characters", [{"field": "q", "problem": f"longer than {MAX_QUERY}"}]
        )
    return found


def limit_from(args) -> int:
    value = args.get("limit", "")
    return min(max(int(value), 1), MAX_LIMIT) if value.isdigit() else DEFAULT_LIMIT


def _visible_referrals(actor: dict, status=None, department=None, case_id=None, q=None):
    """The referrals ``actor`` may see that pass the filters, soonest due first."""
    query = select(referrals).order_by(referrals.c.due_at, referrals.c.id)
    if actor["role"] == "department":
        query = query.where(referrals.c.department == actor["subject"])  # never another department's
    elif actor["role"] != "staff":
        raise Forbidden("referrals are for departments and staff")
    elif department:
        query = query.where(referrals.c.department == department)
    if status:
        query = query.where(referrals.c.status == status)
    if case_id:
        query = query.where(referrals.c.case_id == case_id)
    if q:
        matching = select(routing_cases.c.case_id).where(
            or_(
                routing_cases.c.title.icontains(q, autoescape=True),
                routing_cases.c.description.icontains(q, autoescape=True),
                routing_cases.c.case_id.icontains(q, autoescape=True),
            )
        )
        query = query.where(referrals.c.case_id.in_(matching))
    return query


def list_referrals(
    session,
    actor: dict,
    names: dict,
    status: str | None = None,
    department: str | None = None,
    case_id: str | None = None,
    limit: int = DEFAULT_LIMIT,
    q: str | None = None,
) -> list[dict]:
    query = _visible_referrals(actor, status, department, case_id, q).limit(min(max(limit, 1), MAX_LIMIT))
    return [referral_view(r, names) for r in session.execute(query).all()]


# One column per field of the list view; the extension's fields flattened.
EXPORT_COLUMNS = (
    "id",
    "case_id",
    "department",
    "department_name",
    "lead",
    "round",
    "status",
    "referred_at",
    "due_at",
    "return_by",
    "accepted_at",
    "returned_at",
    "return_reason",
    "extension_status",
    "extension_working_days",
    "extension_reason",
    "extension_decided_at",
    "replied_at",
    "reply",
)
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _export_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    # A department's own words (a return reason, a reply) must not run as a spreadsheet formula.
    return "'" + text if isinstance(value, str) and text.startswith(_FORMULA_STARTS) else text


def export_row(view: dict) -> list[str]:
    extension = view.get("extension") or {}
    flat = {k: v for k, v in view.items() if k != "extension"} | {
        "extension_status": extension.get("status"),
        "extension_working_days": extension.get("working_days"),
        "extension_reason": extension.get("reason"),
        "extension_decided_at": extension.get("decided_at"),
    }
    return [_export_cell(flat.get(column)) for column in EXPORT_COLUMNS]


def export_csv(session, actor: dict, names: dict, status=None, department=None, case_id=None, q=None) -> bytes:
    """Every referral the list would show (no page limit), as CSV in UTF-8 with a byte-order mark
    (so that Excel reads the Chinese correctly), a header row first."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(EXPORT_COLUMNS)
    for row in session.execute(_visible_referrals(actor, status, department, case_id, q)).all():
        writer.writerow(export_row(referral_view(row, names)))
    return ("\ufeff" + out.getvalue()).encode("utf-8")


def triage_list(session) -> list[dict]:
    rows = session.execute(
        select(routing_cases).where(routing_cases.c.status == "triage").order_by(routing_cases.c.received_at)
    ).all()
    return [
        {
            "case_id": r.case_id,
            "title": r.title,
            "category": r.category,
            "street": r.street,
            "source": r.source,
            "reason": r.triage_reason,
            "received_at": iso(r.received_at),
        }
        for r in rows
    ]


# --- routing ---------------------------------------------------------------------------------


def _case_row(event: dict, now: datetime) -> dict:
    return dict(
        case_id=event["case_id"],
        source=event["source"],
        external_id=event.get("external_id"),
        channel=event.get("channel"),
        title=event.get("title"),
        description=event.get("description"),
        category=event.get("category"),
        street=event.get("street"),
        sector=event.get("sector"),
        workstation=event.get("workstation"),
        kind=event.get("kind"),
        residents_affected=event.get("residents_affected"),
        status="awaiting_routing",
        returned_by=[],
        reopen_count=0,
        received_at=datetime.fromisoformat(event["received_at"]),
        recorded_at=now,
        updated_at=now,
    )


def record_case(session, event: dict, now: datetime) -> dict | None:
    """Store a received case once: its row as stored, or None when it was already known (a
    redelivered event)."""
    row = _case_row(event, now)
    return row if insert_ignoring_duplicates(session, routing_cases, row) else None


@dataclass
class Writes:
    """Routing's writes, gathered so that a batch of new cases is written with one statement per
    table; a single step makes and writes its own."""

    referrals: list = field(default_factory=list)  # rows to insert
    cases: list = field(default_factory=list)  # {"case_id", column: value …} to update
    events: list = field(default_factory=list)  # (event type, payload)

    def write(self, session):
        if self.referrals:
            session.execute(referrals.insert(), self.referrals)  # one multi-row INSERT
        update_many(session, routing_cases, routing_cases.c.case_id, self.cases)
        add_events(session, outbox, self.events)


def record_and_route_new_cases(session, ctx: Context, events: list[dict]) -> None:
    """Store received cases, each once, and route them: each case's row is decided before it is
    stored, and written once, routed (an INSERT then an UPDATE of every case had been routing's
    busiest statements: bench/README.md, 3 Dec). The cases stored now — not those of a redelivered
    event, nor one another worker stored meanwhile — get their referrals and events, all of a kind
    in one statement."""
    rows = list({event["case_id"]: _case_row(event, ctx.now) for event in events}.values())
    decided = Writes()
    for row in rows:
        route(session, ctx, row["case_id"], row, decided)
    routed = {change["case_id"]: change for change in decided.cases}
    stored = set(
        insert_many_ignoring_duplicates(
            session, routing_cases, [row | routed[row["case_id"]] for row in rows], routing_cases.c.case_id
        )
    )
    Writes(
        referrals=[referral for referral in decided.referrals if referral["case_id"] in stored],
        events=[(kind, payload) for kind, payload in decided.events if payload["case_id"] in stored],
    ).write(session)


def route(session, ctx: Context, case_id: str, case: dict | None = None, writes: Writes | None = None) -> dict:
    """Decide by the rules and refer the case, or put it on the triage list. ``case`` is its row
    when the caller stores it in this transaction (nobody else can see it, so there is nothing to
    lock or read back: ``record_and_route_new_cases``); otherwise it is read and locked here.
    ``writes`` gathers the writes of several cases routed together; without it they are made now."""
    just_stored = case is not None
    case = dict(case) if just_stored else _case(session, case_id, lock=True)._asdict()
    decision = routing_rules.decide(ctx.rules, case, ctx.known_departments)
    decided = {
        "rule_ids": decision.rule_ids,
        "ruleset_version": decision.ruleset_version,
        "deadline": decision.deadline,
    }
    values = dict(
        category=decision.category, kind=decision.kind, urgency=decision.urgency, decision=decided, updated_at=ctx.now
    )
    if not decision.routable:
        reason = "no rule assigns a department" if not decision.departments else "no rule sets a deadline"
        if case["returned_by"]:
            reason += f" (returned by {', '.join(case['returned_by'])})"
        pending = Writes() if writes is None else writes
        pending.cases.append(
            dict(case_id=case_id, status="triage", triage_reason=reason, lead_department=None, **values)
        )
        pending.events.append(
            (
                "case_needs_triage",
                {
                    "case_id": case_id,
                    "reason": reason,
                    "category": decision.category,
                    "street": case["street"],
                    **_addressing(case),
                    "rule_ids": decision.rule_ids,
                    "ruleset_version": decision.ruleset_version,
                },
            )
        )
        if writes is None:
            pending.write(session)
        return {"case_id": case_id, "status": "triage", "reason": reason}
    # The decision's values are written by _refer's update of the case, with its new status.
    existing = 0 if just_stored else None  # a case stored in this transaction has no referrals yet
    return _refer(
        session,
        ctx,
        case_id,
        decision.departments,
        decision.lead,
        decision.deadline,
        decided,
        case | values,
        existing,
        writes,
    )


def _addressing(case: dict) -> dict:
    """What a case's referral or triage event carries for notify to address its notifications
    (and answer the source system) without asking intake."""
    return {key: case.get(key) for key in ("source", "external_id", "title", "workstation")}


def route_from_triage(session, ctx: Context, actor: dict, case_id: str, departments: list, lead: str | None) -> dict:
    _staff_only(actor, "routing from the triage list")
    case = _case(session, case_id, lock=True)
    if case.status not in ("triage", "awaiting_routing"):
        raise Conflict(f"case {case_id} is {case.status}, not on the triage list")
    departments = list(dict.fromkeys(d for d in departments or [] if d))
    if not departments:
        raise ValidationFailed("name at least one department", [{"field": "departments", "problem": "empty"}])
    unknown = [d for d in departments if ctx.known_departments is not None and d not in ctx.known_departments]
    if unknown:
        raise ValidationFailed(
            f"unknown department(s) {', '.join(unknown)}",
            [{"field": "departments", "problem": f"not in the directory: {', '.join(unknown)}"}],
        )
    lead = lead or departments[0]
    if lead not in departments:
        raise ValidationFailed("the lead must be one of the departments", [{"field": "lead", "problem": "not listed"}])
    decision = routing_rules.decide(ctx.rules, case._asdict() | {"category": case.category}, ctx.known_departments)
    deadline = decision.deadline or {"working_days": 10}
    ordered = [lead] + [d for d in departments if d != lead]
    decided = {
        "rule_ids": decision.rule_ids,
        "ruleset_version": decision.ruleset_version,
        "deadline": deadline,
        "routed_by": actor["subject"],
    }
    session.execute(
        update(routing_cases)
        .where(routing_cases.c.case_id == case_id)
        .values(triage_reason=None, decision=decided, updated_at=ctx.now)
    )
    return _refer(session, ctx, case_id, ordered, lead, deadline, decided)


def due_at(ctx: Context, deadline: dict, start: datetime) -> datetime:
    day = cst_date(start)
    if "working_days" in deadline:
        return end_of_day(ctx.calendar.add_working_days(day, deadline["working_days"]))
    return end_of_day(ctx.calendar.next_working_day(add_months(day, deadline["months"])))


def _refer(
    session,
    ctx,
    case_id,
    departments,
    lead,
    deadline,
    decided,
    case: dict | None = None,
    existing: int | None = None,
    writes: Writes | None = None,
) -> dict:
    """Refer the case to ``departments``. ``case`` is its row as it should be now (with the
    values to write, which are written with its new status), or None to read it; ``existing``
    the number of its referrals so far, or None to count them; ``writes`` as for ``route``."""
    updates = {}
    if case is None:
        case = _case(session, case_id)._asdict()
    else:
        updates = {k: case[k] for k in ("category", "kind", "urgency", "decision") if k in case}
    round_number = (case["reopen_count"] or 0) + 1
    if existing is None:
        existing = session.scalar(select(func.count()).select_from(referrals).where(referrals.c.case_id == case_id))
    due = due_at(ctx, deadline, ctx.now)
    window = ctx.rules.settings["return_window_working_days"]
    return_by = end_of_day(ctx.calendar.add_working_days(cst_date(ctx.now), window))
    rows, created = [], []
    for offset, department in enumerate(departments, start=1):
        referral_id = f"{case_id}-R{existing + offset}"
        rows.append(
            dict(
                id=referral_id,
                case_id=case_id,
                department=department,
                is_lead=int(department == lead),
                round=round_number,
                status="referred",
                referred_at=ctx.now,
                due_at=due,
                return_by=return_by,
                updated_at=ctx.now,
            )
        )
        created.append(
            {
                "referral_id": referral_id,
                "department": department,
                "department_name": ctx.department_names.get(department, department),
                "lead": department == lead,
                "due_at": iso(due),
                "return_by": iso(return_by),
            }
        )
    pending = Writes() if writes is None else writes
    pending.referrals += rows
    pending.cases.append(
        dict(
            case_id=case_id, status="referred", lead_department=lead, triage_reason=None, updated_at=ctx.now, **updates
        )
    )
    pending.events.append(
        (
            "case_referred",
            {
                "case_id": case_id,
                "category": case["category"],
                "kind": case["kind"],
                "street": case["street"],
                **_addressing(case),
                "urgency": case["urgency"],
                "round": round_number,
                "referrals": created,
                "deadline": deadline,
                "rule_ids": decided.get("rule_ids", []),
                "ruleset_version": decided.get("ruleset_version"),
                "calendar": ctx.calendar.source(cst_date(due).year),
            },
        )
    )
    if writes is None:
        pending.write(session)
    return {"case_id": case_id, "status": "referred", "referrals": created}


# --- department steps -----------------------------------------------------------------------


def _event(session, event_type: str, row, ctx: Context, **extra):
    add_event(
        session,
        outbox,
        event_type,
        {
            "case_id": row.case_id,
            "referral_id": row.id,
            "department": row.department,
            "department_name": ctx.department_names.get(row.department, row.department),
            "round": row.round,
            "at": iso(ctx.now),
            **extra,
        },
    )


def _set(session, referral_id, **values):
    session.execute(update(referrals).where(referrals.c.id == referral_id).values(**values))


def accept(session, ctx: Context, actor: dict, referral_id: str) -> dict:
    row = _referral(session, referral_id, actor)
    if row.status != "referred":
        raise Conflict(f"referral {referral_id} is {row.status}; only a referred one can be accepted")
    _set(session, referral_id, status="accepted", accepted_at=ctx.now, updated_at=ctx.now)
    _event(session, "referral_accepted", row, ctx, due_at=iso(row.due_at))
    return {"id": referral_id, "status": "accepted"}


def return_referral(session, ctx: Context, actor: dict, referral_id: str, reason: str | None) -> dict:
    row = _referral(session, referral_id, actor)
    if row.status not in ACTIVE:
        raise Conflict(f"referral {referral_id} is {row.status}; only a referred or accepted one can be returned")
    if not reason or not reason.strip():
        raise ValidationFailed("a return needs a reason", [{"field": "reason", "problem": "missing"}])
    if ctx.now > row.return_by:
        raise Conflict(f"the return window of {referral_id} closed at {iso(row.return_by)}; ask staff to re-route")
    _set(
        session,
        referral_id,
        status="returned",
        returned_at=ctx.now,
        return_reason=reason.strip()[:2000],
        updated_at=ctx.now,
    )
    case = _case(session, row.case_id, lock=True)
    returned_by = list(dict.fromkeys([*(case.returned_by or []), row.department]))
    session.execute(
        update(routing_cases)
        .where(routing_cases.c.case_id == row.case_id)
        .values(returned_by=returned_by, updated_at=ctx.now)
    )
    _event(session, "referral_returned", row, ctx, reason=reason.strip()[:2000], returns=len(returned_by))
    still_active = session.execute(
        select(referrals.c.id, referrals.c.is_lead).where(
            referrals.c.case_id == row.case_id, referrals.c.round == row.round, referrals.c.status.in_(ACTIVE)
        )
    ).all()
    if row.is_lead or not still_active:
        # The lead said "not ours": the case is routed afresh (without the departments that
        # returned it); co-handlers of this round are superseded by the new referrals.
        for other in still_active:
            _set(session, other.id, status="superseded", updated_at=ctx.now)
        outcome = route(session, ctx, row.case_id)
        return {"id": referral_id, "status": "returned", "case": outcome}
    return {"id": referral_id, "status": "returned"}


def request_extension(session, ctx: Context, actor: dict, referral_id: str, working_days, reason) -> dict:
    row = _referral(session, referral_id, actor)
    limit = ctx.rules.settings["max_extension_working_days"]
    if row.status not in ACTIVE:
        raise Conflict(f"referral {referral_id} is {row.status}; only open referrals can be extended")
    if ctx.now > row.due_at:
        raise Conflict(
            f"the deadline of {referral_id} passed at {iso(row.due_at)}; an extension must be asked before it"
        )
    if row.extension_status == "requested":
        raise Conflict(f"referral {referral_id} already has an extension request awaiting a decision")
    if not isinstance(working_days, int) or isinstance(working_days, bool) or not 1 <= working_days <= limit:
        raise ValidationFailed(
            f"working_days must be a whole number from 1 to {limit}",
            [{"field": "working_days", "problem": f"must be 1..{limit}"}],
        )
    if not reason or not str(reason).strip():
        raise ValidationFailed("an extension request needs a reason", [{"field": "reason", "problem": "missing"}])
    _set(
        session,
        referral_id,
        extension_status="requested",
        extension_days=working_days,
        extension_reason=str(reason).strip()[:2000],
        extension_decided_at=None,
        updated_at=ctx.now,
    )
    _event(
        session,
        "extension_requested",
        row,
        ctx,
        working_days=working_days,
        reason=str(reason).strip()[:2000],
        due_at=iso(row.due_at),
    )
    return {"id": referral_id, "extension": "requested"}


def decide_extension(session, ctx: Context, actor: dict, referral_id: str, grant: bool, note: str | None) -> dict:
    _staff_only(actor, "deciding extensions")
    row = _referral(session, referral_id, actor)
    if row.extension_status != "requested":
        raise Conflict(f"referral {referral_id} has no extension request awaiting a decision")
    if grant:
        due = end_of_day(ctx.calendar.add_working_days(cst_date(row.due_at), row.extension_days))
        _set(
            session,
            referral_id,
            extension_status="granted",
            extension_decided_at=ctx.now,
            due_at=due,
            updated_at=ctx.now,
        )
        _event(session, "extension_granted", row, ctx, working_days=row.extension_days, due_at=iso(due), note=note)
        return {"id": referral_id, "extension": "granted", "due_at": iso(due)}
    _set(session, referral_id, extension_status="refused", extension_decided_at=ctx.now, updated_at=ctx.now)
    _event(session, "extension_refused", row, ctx, due_at=iso(row.due_at), note=note)
    return {"id": referral_id, "extension": "refused", "due_at": iso(row.due_at)}


def reply(session, ctx: Context, actor: dict, referral_id: str, result: str | None) -> dict:
    row = _referral(session, referral_id, actor)
    if row.status not in ACTIVE:
        raise Conflict(f"referral {referral_id} is {row.status}; only a referred or accepted one can be replied to")
    if not result or not result.strip():
        raise ValidationFailed("a reply needs the result", [{"field": "result", "problem": "missing"}])
    _set(session, referral_id, status="replied", replied_at=ctx.now, reply=result.strip()[:10000], updated_at=ctx.now)
    open_left = session.scalar(
        select(func.count())
        .select_from(referrals)
        .where(referrals.c.case_id == row.case_id, referrals.c.round == row.round, referrals.c.status.in_(ACTIVE))
    )
    case_replied = open_left == 0
    if case_replied:
        session.execute(
            update(routing_cases)
            .where(routing_cases.c.case_id == row.case_id)
            .values(status="replied", updated_at=ctx.now)
        )
    _event(
        session,
        "referral_replied",
        row,
        ctx,
        result=result.strip()[:10000],
        on_time=ctx.now <= row.due_at,
        case_replied=case_replied,
    )
    return {"id": referral_id, "status": "replied", "case_status": "replied" if case_replied else "referred"}


# --- the citizen's feedback ---------------------------------------------------------------------


def feedback(session, ctx: Context, actor: dict, case_id: str, rating: str | None, comment: str | None = None) -> dict:
    if actor["role"] not in ("staff", "source"):
        raise Forbidden("feedback is recorded by staff or by the channel the case came from")
    case = _case(session, case_id, lock=True)
    if actor["role"] == "source" and case.source != actor["subject"]:
        raise NotFound(f"no case {case_id!r}")
    if rating not in RATINGS:
        raise ValidationFailed(
            f"rating must be one of {', '.join(RATINGS)}", [{"field": "rating", "problem": "unknown"}]
        )
    if case.status != "replied":
        raise Conflict(f"case {case_id} is {case.status}; feedback is given on a replied case")
    session.execute(
        update(routing_cases).where(routing_cases.c.case_id == case_id).values(rating=rating, updated_at=ctx.now)
    )
    add_event(
        session,
        outbox,
        "feedback_received",
        {
            "case_id": case_id,
            "rating": rating,
            "rating_code": RATINGS[rating],
            "comment": comment,
            "source": case.source,
            "at": iso(ctx.now),
        },
    )
    if rating != "不满意":
        session.execute(
            update(routing_cases).where(routing_cases.c.case_id == case_id).values(status="closed", updated_at=ctx.now)
        )
        add_event(
            session,
            outbox,
            "case_closed",
            {"case_id": case_id, "rating": rating, "source": case.source, "at": iso(ctx.now)},
        )
        return {"case_id": case_id, "status": "closed"}
    # 重办: back to the departments that replied last round, with the redo deadline.
    last_round = session.execute(
        select(referrals)
        .where(referrals.c.case_id == case_id, referrals.c.status == "replied")
        .order_by(referrals.c.round.desc())
    ).all()
    departments = [r.department for r in last_round if r.round == last_round[0].round]
    lead = next((r.department for r in last_round if r.round == last_round[0].round and r.is_lead), departments[0])
    reopen_count = (case.reopen_count or 0) + 1
    session.execute(
        update(routing_cases)
        .where(routing_cases.c.case_id == case_id)
        .values(status="reopened", reopen_count=reopen_count, updated_at=ctx.now)
    )
    add_event(
        session,
        outbox,
        "case_reopened",
        {"case_id": case_id, "reopen_count": reopen_count, "source": case.source, "at": iso(ctx.now)},
    )
    decision = routing_rules.decide(ctx.rules, case._asdict() | {"reopen_count": reopen_count}, ctx.known_departments)
    deadline = decision.deadline or {"working_days": 5}
    decided = {
        "rule_ids": decision.rule_ids,
        "ruleset_version": decision.ruleset_version,
        "deadline": deadline,
        "redo": True,
    }
    ordered = [lead] + [d for d in departments if d != lead]
    return _refer(session, ctx, case_id, ordered, lead, deadline, decided) | {"status": "reopened"}


def _staff_only(actor: dict, what: str):
    if actor["role"] != "staff":
        raise Forbidden(f"{what} is for committee staff")
