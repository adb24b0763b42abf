"""Carrying out escalation decisions, each exactly once, and the agenda's own lifecycle.

A decision is recorded under a unique key (rule, action, case or cluster, and for reminders the
deadline), inside the same transaction as what it causes; a second evaluation — later, or on
another replica at the same moment — finds the key taken and does nothing. An agenda item is
likewise unique per kind, rule and subject; a growing cluster adds its new cases to its item.
"""

from collections import defaultdict
from datetime import datetime

from sqlalchemy import select, update

from services.common.http import Conflict, NotFound, ValidationFailed
from services.common.outbox import add_event, add_events
from services.common.timeutil import CST, iso
from services.common.upsert import insert_ignoring_duplicates, insert_many_ignoring_duplicates
from services.supervision.evaluation import Decision, name_whole_clusters
from services.supervision.models import agenda, agenda_cases, case_projection, counters, decisions, outbox

AGENDA_KIND = {
    "add_to_agenda": "agenda",
    "open_joint_supervision": "joint_supervision",
    "trigger_special_inspection": "special_inspection",
}
KIND_NAMES = {"agenda": "民主监督议题", "joint_supervision": "联合督查督办", "special_inspection": "专项视察监督"}
LIFECYCLE = ("proposed", "scheduled", "under_supervision", "concluded")


def apply(session, to_apply: list[Decision], now, growth_among=None) -> list[Decision]:
    """Carry out the decisions not taken before; returns those newly taken. ``growth_among``:
    when given, a cluster item taken before gains only those of these cases it lacks (the cases
    events just changed: its other cases were linked when they changed, or are by the next sweep,
    which evaluates every cluster changed since its last pass), not every case of the cluster
    looked up again — for a cluster of thousands, every evaluation after events.

    Done a batch at a time, in a few multi-row statements (a backlog's first sweep takes tens of
    thousands): a case's own agenda item is numbered before its decision is recorded, so the
    decision row carries its item's id. A cluster's item, rarer and shared, is made one decision
    at a time (``_ensure_item``); once made, it gains the cluster's new cases in a statement for
    all the clusters of a rule (``_grow_cluster_items``)."""
    known = _already_taken(session, to_apply)
    fresh = [d for d in to_apply if d.key not in known]
    name_whole_clusters(session, fresh)
    linked = _cluster_items(
        session, [c for d in fresh if d.scope == "cluster" and d.action in AGENDA_KIND for c in d.case_ids]
    )
    cases = _cases(session, fresh)
    own_items = [d for d in fresh if d.action in AGENDA_KIND and d.scope == "case"]
    item_ids = dict(zip((d.key for d in own_items), _next_agenda_ids(session, now, len(own_items))))
    first_time = _record(session, fresh, item_ids, now)
    _make_own_items(session, [d for d in own_items if d.key in first_time], item_ids, now, cases)
    taken, growing = [], []
    events = []  # queued together at the end, in one statement: a batch may grow hundreds of items
    for decision in to_apply:
        agenda_id = item_ids.get(decision.key)
        if decision.scope == "cluster" and decision.action in AGENDA_KIND:
            if known.get(decision.key):
                among = [c for c in decision.case_ids if growth_among is None or c in growth_among]
                if among:
                    growing.append((decision, known[decision.key], among))
            else:  # recorded just now (or a moment ago by another replica)
                agenda_id, new_cases = _ensure_item(session, decision, now, cases, linked)
                if decision.key in first_time:
                    session.execute(
                        update(decisions)
                        .where(*(column == value for column, value in zip(DECISION_KEY, decision.key)))
                        .values(agenda_id=agenda_id)
                    )
                elif new_cases:
                    events.append(("agenda_cases_added", {"agenda_id": agenda_id, "case_ids": new_cases}))
        if decision.key in first_time:
            events.append(_announcement(decision, agenda_id, cases))
            taken.append(decision)
    for agenda_id, new_cases in _grow_cluster_items(session, growing, now, growth_among is None).items():
        events.append(("agenda_cases_added", {"agenda_id": agenda_id, "case_ids": new_cases}))
    add_events(session, outbox, events)
    return taken


def _grow_cluster_items(
    session, growing: list[tuple[Decision, str, list]], now, whole_clusters: bool
) -> dict[str, list[str]]:
    """Each cluster item of ``growing`` — ``(its decision, taken before; the item; the cases to
    check)`` — gains those of the cases to check (the cluster's unresolved cases, as evaluated, or
    those of them events just changed) that are on no cluster item of its kind and rule yet.
    Which are is read together, by case id (``_cluster_items``);
    they are linked by one cached statement sent with every link (``insert_many_ignoring_duplicates``:
    built with ``.values(links)``, it was compiled anew each time, 46 ms for 1,000 links, and held
    every other greenthread of the process meanwhile). Returns ``{item: the cases it gained}``.

    (Asking the database for each cluster's unlinked cases instead read every decided cluster's
    cases again on every whole pass: 1,000,000 open cases took minutes a pass, not seconds.)

    On a whole pass nearly every case to check is on its own cluster's item already: those are
    told apart first by the links alone (``_links_of``), and only the others are looked up across
    every cluster item. (Looking every case up across the items made PostgreSQL join each chunk
    of 1,000 against every cluster item: 4.9 s of a 300,000-case whole pass's 16.2 s in-process,
    8-9 s on stale statistics; 1.4 s this way.) ``whole_clusters``: the cases to check are every
    unresolved case of their clusters (a sweep), not the few that events just changed."""
    on_item = _links_of(session, growing, whole_clusters)
    growing = [
        (d, agenda_id, missing)
        for d, agenda_id, among in growing
        if (missing := [c for c in among if (agenda_id, c) not in on_item])
    ]
    linked = _cluster_items(session, [case_id for _, _, among in growing for case_id in among])
    links = [
        {"agenda_id": agenda_id, "case_id": case_id, "added_at": now}
        for decision, agenda_id, among in growing
        for case_id in among
        if (AGENDA_KIND[decision.action], decision.rule_id, case_id) not in linked
    ]
    added = defaultdict(list)
    key = (agenda_cases.c.agenda_id, agenda_cases.c.case_id)
    for agenda_id, case_id in insert_many_ignoring_duplicates(session, agenda_cases, links, key):
        added[agenda_id].append(case_id)
    new_cases = sorted({case_id for cases in added.values() for case_id in cases})
    _mark_on_agenda(session, new_cases, now)
    return {agenda_id: sorted(cases) for agenda_id, cases in added.items()}


DECISION_KEY = (decisions.c.rule_id, decisions.c.action, decisions.c.subject_id, decisions.c.dedupe_key)


def _record(session, fresh: list[Decision], item_ids: dict, now) -> set:
    """Record the decisions in one statement; the keys of those recorded now (a replica racing
    for the same decision records it, or we do — never both)."""
    rows = [
        dict(
            rule_id=d.rule_id,
            action=d.action,
            scope=d.scope,
            subject_id=d.subject_id,
            dedupe_key=d.dedupe_key,
            case_ids=d.case_ids,
            agenda_id=item_ids.get(d.key),
            ruleset_version=d.ruleset_version,
            facts=d.facts,
            evaluated_at=d.evaluated_at,
            recorded_at=now,
        )
        for d in fresh
    ]
    return set(insert_many_ignoring_duplicates(session, decisions, rows, DECISION_KEY))


def _make_own_items(session, taken: list[Decision], item_ids: dict, now, cases: dict) -> None:
    """The agenda items of case-scope decisions just recorded, their links and their cases'
    ``on_agenda``, in three statements. An item is unique per kind, rule and case, as its
    decision is, so the replica that recorded the decision is the one making the item."""
    if not taken:
        return
    insert_many_ignoring_duplicates(
        session,
        agenda,
        [
            dict(
                id=item_ids[d.key],
                kind=AGENDA_KIND[d.action],
                status="proposed",
                rule_id=d.rule_id,
                scope=d.scope,
                subject_id=d.subject_id,
                title=_title(d, AGENDA_KIND[d.action], cases),
                history=[{"status": "proposed", "at": iso(now), "by": f"rule {d.rule_id}"}],
                created_at=now,
                updated_at=now,
            )
            for d in taken
        ],
        agenda.c.id,
    )
    insert_many_ignoring_duplicates(
        session,
        agenda_cases,
        [{"agenda_id": item_ids[d.key], "case_id": d.case_ids[0], "added_at": now} for d in taken],
        (agenda_cases.c.agenda_id, agenda_cases.c.case_id),
    )
    _mark_on_agenda(session, sorted({d.case_ids[0] for d in taken}), now)


def _already_taken(session, to_apply: list[Decision]) -> dict:
    """``{key: its agenda item or None}`` of these decisions already recorded, looked up together
    (the unique key still decides between two replicas racing to take the same one)."""
    known: dict = {}
    subjects = sorted({d.subject_id for d in to_apply})
    for start in range(0, len(subjects), 1000):
        for row in session.execute(
            select(*DECISION_KEY, decisions.c.agenda_id).where(
                decisions.c.subject_id.in_(subjects[start : start + 1000])
            )
        ):
            known[tuple(row)[:4]] = row.agenda_id
    return known


def _links_of(session, growing: list[tuple[Decision, str, list]], whole_clusters: bool) -> set[tuple[str, str]]:
    """``{(item, case)}``: the links of ``growing``'s items, or of its cases. Whole clusters are
    read by item, the links' primary key (a 300,000-case whole pass carried out its decisions in
    2.1 s so, in 4.3 s reading by case id); the few cases events changed are read by case id, not
    every case of a large cluster."""
    if whole_clusters:
        column, keys = agenda_cases.c.agenda_id, {agenda_id for _, agenda_id, _ in growing}
    else:
        column, keys = agenda_cases.c.case_id, {case_id for _, _, among in growing for case_id in among}
    keys, links = sorted(keys), set()
    for start in range(0, len(keys), 1000):
        rows = session.execute(
            select(agenda_cases.c.agenda_id, agenda_cases.c.case_id).where(column.in_(keys[start : start + 1000]))
        )
        links.update((agenda_id, case_id) for agenda_id, case_id in rows)
    return links


def _cluster_items(session, case_ids) -> dict:
    """``(kind, rule, case) → agenda item`` for those of these cases already linked to a cluster
    item, read together: a cluster whose cases all are has nothing to add, and one with some finds
    its item here. (Driven by the case ids: asking per decision by kind and rule made PostgreSQL
    walk every item of that kind for each new cluster.)"""
    case_ids = sorted(set(case_ids))
    linked: dict = {}
    for start in range(0, len(case_ids), 1000):
        for kind, rule_id, case_id, agenda_id in session.execute(
            select(agenda.c.kind, agenda.c.rule_id, agenda_cases.c.case_id, agenda.c.id)
            .join(agenda_cases, agenda_cases.c.agenda_id == agenda.c.id)
            .where(agenda.c.scope == "cluster", agenda_cases.c.case_id.in_(case_ids[start : start + 1000]))
        ):
            linked[(kind, rule_id, case_id)] = agenda_id
    return linked


def _cases(session, new: list[Decision]) -> dict:
    """Title, street and departments of the cases these decisions name, read together (for the
    items' titles and the departments their announcements address)."""
    case_ids = sorted({c for d in new for c in d.case_ids})
    c = case_projection.c
    found = {}
    for start in range(0, len(case_ids), 1000):
        for row in session.execute(
            select(c.case_id, c.title, c.street, c.departments).where(c.case_id.in_(case_ids[start : start + 1000]))
        ):
            found[row.case_id] = row
    return found


def _departments(cases: dict, case_ids) -> list[str]:
    return sorted({d for c in case_ids if c in cases for d in (cases[c].departments or [])})


def _announcement(decision: Decision, agenda_id, cases: dict) -> tuple[str, dict]:
    """The event that tells of a decision just taken: ``(event type, payload)``."""
    base = {
        "rule_id": decision.rule_id,
        "ruleset_version": decision.ruleset_version,
        "scope": decision.scope,
        "case_ids": decision.case_ids,
        "case_id": decision.case_ids[0],
        "evaluated_at": iso(decision.evaluated_at),
    }
    if decision.action in AGENDA_KIND:
        return "case_escalated", base | {
            "action": decision.action,
            "kind": AGENDA_KIND[decision.action],
            "agenda_id": agenda_id,
            "departments": _departments(cases, decision.case_ids),
        }
    if decision.action == "remind_department":
        return "department_reminded", base | {"referrals": decision.details.get("referrals", [])}
    if decision.action == "alert_supervisors":
        return "supervisors_alerted", base | {"departments": _departments(cases, decision.case_ids)}
    raise ValueError(f"no announcement for the action {decision.action!r}")


def _next_agenda_ids(session, now, count: int) -> list[str]:
    """``count`` new agenda item numbers of this year, taken together (numbers taken for a
    decision another replica recorded first stay unused: the sequence may skip)."""
    if not count:
        return []
    year = now.astimezone(CST).year
    name = f"agenda-{year}"
    take = (
        update(counters)
        .where(counters.c.name == name)
        .values(last_number=counters.c.last_number + count)
        .returning(counters.c.last_number)
    )
    last = session.execute(take).scalar()
    if last is None:  # the year's first item
        insert_ignoring_duplicates(session, counters, {"name": name, "last_number": 0})
        last = session.execute(take).scalar_one()
    return [f"AG-{year}-{number:04d}" for number in range(last - count + 1, last + 1)]


def _ensure_item(session, decision: Decision, now, cases: dict, linked_items: dict) -> tuple[str, list]:
    kind = AGENDA_KIND[decision.action]
    # The cluster's key follows its earliest open case; its item follows its cases.
    items = [linked_items.get((kind, decision.rule_id, c)) for c in decision.case_ids]
    existing = next((item for item in items if item), None)
    if existing is None:
        existing = session.scalar(
            select(agenda.c.id).where(
                agenda.c.kind == kind, agenda.c.rule_id == decision.rule_id, agenda.c.subject_id == decision.subject_id
            )
        )
    linked: set = set()
    if existing is None:
        title = _title(decision, kind, cases)
        [new_id] = _next_agenda_ids(session, now, 1)
        created = insert_ignoring_duplicates(
            session,
            agenda,
            dict(
                id=new_id,
                kind=kind,
                status="proposed",
                rule_id=decision.rule_id,
                scope=decision.scope,
                subject_id=decision.subject_id,
                title=title,
                history=[{"status": "proposed", "at": iso(now), "by": f"rule {decision.rule_id}"}],
                created_at=now,
                updated_at=now,
            ),
        )
        existing = (
            new_id
            if created
            else session.scalar(  # another replica made it a moment ago
                select(agenda.c.id).where(
                    agenda.c.kind == kind,
                    agenda.c.rule_id == decision.rule_id,
                    agenda.c.subject_id == decision.subject_id,
                )
            )
        )
    else:
        linked = {c for c, item in zip(decision.case_ids, items) if item == existing}
    added_now = set(
        insert_many_ignoring_duplicates(
            session,
            agenda_cases,
            [{"agenda_id": existing, "case_id": c, "added_at": now} for c in decision.case_ids if c not in linked],
            agenda_cases.c.case_id,
        )
    )
    new_cases = [c for c in decision.case_ids if c in added_now]
    linked_items.update({(kind, decision.rule_id, c): existing for c in new_cases})
    _mark_on_agenda(session, new_cases, now)
    return existing, new_cases


def _title(decision: Decision, kind: str, cases: dict) -> str:
    first = cases.get(decision.case_ids[0])
    title = first.title if first else decision.subject_id
    if decision.scope == "cluster":
        return f"{KIND_NAMES[kind]}：{first.street if first else ''} {len(decision.case_ids)}件类似问题（{title}）"[
            :300
        ]
    return f"{KIND_NAMES[kind]}：{title}"[:300]


# --- reading and the agenda lifecycle --------------------------------------------------------


def item_view(session, row, with_cases: bool = True) -> dict:
    view = {
        "id": row.id,
        "kind": row.kind,
        "status": row.status,
        "rule_id": row.rule_id,
        "scope": row.scope,
        "title": row.title,
        "scheduled_for": row.scheduled_for,
        "findings": row.findings,
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
        "history": row.history,
    }
    view["case_ids"] = list(
        session.scalars(
            select(agenda_cases.c.case_id).where(agenda_cases.c.agenda_id == row.id).order_by(agenda_cases.c.case_id)
        )
    )
    if with_cases:
        rows = session.execute(
            select(
                case_projection.c.case_id,
                case_projection.c.title,
                case_projection.c.status,
                case_projection.c.street,
                case_projection.c.departments,
            ).where(case_projection.c.case_id.in_(view["case_ids"]))
        ).all()
        view["cases"] = [
            {
                "id": r.case_id,
                "title": r.title,
                "status": r.status,
                "street": r.street,
                "departments": r.departments or [],
            }
            for r in rows
        ]
    return view


def list_items(session, status=None, kind=None, with_cases: bool = False) -> list[dict]:
    query = select(agenda).order_by(agenda.c.id)
    if status:
        query = query.where(agenda.c.status == status)
    if kind:
        query = query.where(agenda.c.kind == kind)
    return [item_view(session, row, with_cases) for row in session.execute(query).all()]


def show_item(session, agenda_id: str) -> dict:
    row = session.execute(select(agenda).where(agenda.c.id == agenda_id)).first()
    if row is None:
        raise NotFound(f"no agenda item {agenda_id!r}")
    return item_view(session, row)


def advance(session, agenda_id: str, to: str, now, by: str, findings=None, scheduled_for=None, note=None) -> dict:
    row = session.execute(select(agenda).where(agenda.c.id == agenda_id).with_for_update()).first()
    if row is None:
        raise NotFound(f"no agenda item {agenda_id!r}")
    if to not in LIFECYCLE:
        raise ValidationFailed(
            f"status must be one of {', '.join(LIFECYCLE)}", [{"field": "status", "problem": "unknown"}]
        )
    if LIFECYCLE.index(to) != LIFECYCLE.index(row.status) + 1:
        raise Conflict(
            f"{agenda_id} is {row.status}; the next step is "
            f"{LIFECYCLE[LIFECYCLE.index(row.status) + 1] if row.status != 'concluded' else 'none (concluded)'}"
        )
    if to == "concluded" and not (findings and str(findings).strip()):
        raise ValidationFailed("concluding needs the findings", [{"field": "findings", "problem": "missing"}])
    values = {
        "status": to,
        "updated_at": now,
        "history": [*row.history, {"status": to, "at": iso(now), "by": by, **({"note": note} if note else {})}],
    }
    if findings:
        values["findings"] = str(findings).strip()
    if scheduled_for:
        values["scheduled_for"] = str(scheduled_for)[:10]
    session.execute(update(agenda).where(agenda.c.id == agenda_id).values(**values))
    add_event(
        session, outbox, "agenda_item_changed", {"agenda_id": agenda_id, "kind": row.kind, "status": to, "by": by}
    )
    return show_item(session, agenda_id)


def escalations_for(session, case_id: str) -> list[dict]:
    linked = select(agenda_cases.c.agenda_id).where(agenda_cases.c.case_id == case_id)
    rows = session.execute(
        select(decisions)
        .where((decisions.c.subject_id == case_id) | decisions.c.agenda_id.in_(linked))
        .order_by(decisions.c.id)
    ).all()
    return [
        {
            "action": r.action,
            "rule_id": r.rule_id,
            "ruleset_version": r.ruleset_version,
            "at": iso(r.evaluated_at),
            "agenda_id": r.agenda_id,
            "scope": r.scope,
        }
        for r in rows
    ]


def _mark_on_agenda(session, case_ids: list[str], now: datetime) -> None:
    """``on_agenda`` for cases an agenda item links now, and ``changed_at``, so that the next
    incremental sweep looks at them again. Only for those not on the agenda already: their facts
    do not change (a case on a second item was rewritten for nothing: half of these writes in
    bench/e2e.py, bench/README.md, 3 Dec)."""
    if case_ids:
        c = case_projection.c
        session.execute(
            update(case_projection)
            .where(c.case_id.in_(case_ids), c.on_agenda.is_(False))
            .values(on_agenda=True, changed_at=now)
        )
