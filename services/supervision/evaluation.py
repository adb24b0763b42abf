"""Evaluating unresolved cases against the supervision rules at a given moment.

Facts are computed here from supervision's own projection (never another service's tables); what
they lead to is decided by durable_rules through the ruleset. Nothing is changed here: the
decisions are returned, and ``escalation.apply`` carries them out (``rules simulate`` does not).
"""

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import eventlet
from sqlalchemy import and_, or_, select

from services.common.rules.ruleset import Ruleset
from services.common.timeutil import iso
from services.common.workdays import WorkingCalendar, cst_date
from services.supervision.clusters import Member, bigrams, clusters
from services.supervision.models import agenda_cases, case_projection, referral_projection
from services.supervision.sweeping import shard_filter

OPEN_REFERRAL = ("referred", "accepted")
YIELD_EVERY = 200  # cases between cooperative yields: a long sweep must not starve AMQP heartbeats


@dataclass
class Decision:
    rule_id: str
    action: str
    scope: str
    subject_id: str
    case_ids: list
    dedupe_key: str
    facts: dict
    ruleset_version: str
    evaluated_at: datetime
    details: dict = field(default_factory=dict)

    @property
    def key(self):
        return (self.rule_id, self.action, self.subject_id, self.dedupe_key)


def case_facts(
    case, open_referrals, on_agenda: bool, similar_count: int, now: datetime, calendar: WorkingCalendar
) -> dict:
    today = cst_date(now)
    facts = {
        "status": case.status,
        "unresolved": case.status != "closed",
        "kind": case.kind,
        "category": case.category,
        "street": case.street,
        "source": case.source,
        "title": case.title,
        "departments": list(case.departments or []),
        "department_count": len(case.departments or []),
        "lead_department": case.lead_department,
        "returns": case.returns,
        "extensions": case.extensions,
        "reopen_count": case.reopen_count,
        "unsatisfied_count": case.unsatisfied_count,
        "last_rating": case.last_rating,
        "residents_affected": case.residents_affected,
        "on_agenda": on_agenda,
        "similar_unresolved_count": similar_count,
        "working_days_overdue": 0,
    }
    if case.first_referred_at:
        facts["working_days_since_referral"] = calendar.working_days_between(cst_date(case.first_referred_at), today)
    if open_referrals:
        to_deadline = min(calendar.working_days_between(today, cst_date(r.due_at)) for r in open_referrals)
        facts["working_days_to_deadline"] = to_deadline
        facts["working_days_overdue"] = max(0, -to_deadline)
    return facts


def _candidates(session, case_ids, window_days: int, shard=None):
    """The unresolved cases to evaluate, and the unresolved cases they may cluster with."""
    unresolved = case_projection.c.status != "closed"
    if case_ids is None:
        query = select(case_projection).where(unresolved)
        if shard is not None:  # a shard holds whole clusters: its cases are their own peers
            query = query.where(shard_filter(shard))
        rows = session.execute(query).all()
        return rows, rows
    targets = session.execute(select(case_projection).where(case_projection.c.case_id.in_(case_ids), unresolved)).all()
    if not targets:
        return [], []
    window = timedelta(days=window_days)
    peers_filter = (
        or_(
            *[
                and_(
                    case_projection.c.category == t.category,
                    case_projection.c.street == t.street,
                    case_projection.c.received_at >= t.received_at - window,
                    case_projection.c.received_at <= t.received_at + window,
                )
                for t in targets
                if t.category and t.street
            ]
        )
        if any(t.category and t.street for t in targets)
        else None
    )
    peers = (
        session.execute(select(case_projection).where(unresolved, peers_filter)).all()
        if peers_filter is not None
        else []
    )
    by_id = {row.case_id: row for row in [*peers, *targets]}
    return targets, list(by_id.values())


def _clusters(members, settings) -> dict:
    return clusters(
        [
            Member(m.case_id, m.category, m.street, m.received_at, bigrams(f"{m.title}\n{m.description or ''}"))
            for m in members
        ],
        settings["cluster_window_days"],
        settings["cluster_similarity"],
    )


def evaluate(
    session, ruleset: Ruleset, calendar: WorkingCalendar, now: datetime, case_ids=None, shard=None
) -> tuple[int, list]:
    """``(cases evaluated, decisions)`` for the given cases (default: every unresolved case, or
    those of one sweep shard)."""
    settings = ruleset.settings
    targets, members = _candidates(session, case_ids, settings["cluster_window_days"], shard)
    if not targets:
        return 0, []
    grouped = _clusters(members, settings)
    target_ids = [t.case_id for t in targets]
    open_referrals: dict = {}
    on_agenda = set()
    for start in range(0, len(target_ids), 1000):
        chunk = target_ids[start : start + 1000]
        for r in session.execute(
            select(referral_projection).where(
                referral_projection.c.case_id.in_(chunk), referral_projection.c.status.in_(OPEN_REFERRAL)
            )
        ).all():
            open_referrals.setdefault(r.case_id, []).append(r)
        on_agenda.update(session.scalars(select(agenda_cases.c.case_id).where(agenda_cases.c.case_id.in_(chunk))))

    decisions: dict = {}
    for index, case in enumerate(targets):
        if index % YIELD_EVERY == YIELD_EVERY - 1:
            eventlet.sleep(0)
        cluster_key, cluster_ids = grouped[case.case_id]
        refs = open_referrals.get(case.case_id, [])
        facts = case_facts(case, refs, case.case_id in on_agenda, len(cluster_ids), now, calendar)
        for rule in ruleset.fire("escalate", facts):
            for action, params in rule.actions:
                scope = params.get("scope", "case")
                subject, ids = (cluster_key, cluster_ids) if scope == "cluster" else (case.case_id, [case.case_id])
                dedupe, details = "", {}
                if action == "remind_department":
                    due = min(r.due_at for r in refs) if refs else None
                    dedupe = iso(due) or ""  # a new deadline (after an extension) is a new reminder
                    details["referrals"] = [
                        {
                            "referral_id": r.referral_id,
                            "department": r.department,
                            "department_name": r.department_name,
                            "due_at": iso(r.due_at),
                        }
                        for r in refs
                        if r.due_at == due
                    ]
                decision = Decision(rule.id, action, scope, subject, ids, dedupe, facts, ruleset.version, now, details)
                decisions.setdefault(decision.key, decision)
    return len(targets), list(decisions.values())


def facts_of(session, ruleset: Ruleset, calendar: WorkingCalendar, now: datetime, case_id: str) -> dict:
    """The facts one case presents at ``now`` (for ``rules explain``)."""
    settings = ruleset.settings
    targets, members = _candidates(session, [case_id], settings["cluster_window_days"])
    if not targets:  # a closed case: no cluster, no open referrals
        case = session.execute(select(case_projection).where(case_projection.c.case_id == case_id)).first()
        return case_facts(case, [], False, 1, now, calendar)
    grouped = _clusters(members, settings)
    refs = session.execute(
        select(referral_projection).where(
            referral_projection.c.case_id == case_id, referral_projection.c.status.in_(OPEN_REFERRAL)
        )
    ).all()
    on_agenda = session.scalar(select(agenda_cases.c.case_id).where(agenda_cases.c.case_id == case_id).limit(1))
    return case_facts(targets[0], refs, on_agenda is not None, len(grouped[case_id][1]), now, calendar)
