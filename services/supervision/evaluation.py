"""Evaluating unresolved cases against the supervision rules at a given moment.

Facts are computed here from supervision's own projection (never another service's tables); what
they lead to is decided by durable_rules through the ruleset. Nothing is changed here: the
decisions are returned, and ``escalation.apply`` carries them out (``rules simulate`` does not).

Cases are read a whole cluster at a time, from the projection alone (which keeps each case's
nearest open deadline and whether it is on the agenda), in one streamed query that also counts
each cluster's unresolved cases: the cost per case stays a few microseconds whatever the number
of open cases (bench/sweep.py).
"""

import functools
import itertools
import json
from collections import defaultdict, namedtuple
from dataclasses import dataclass, field
from datetime import datetime

import eventlet
from sqlalchemy import Text, and_, cast, func, select, text, true

from services.common.db import on_postgresql
from services.common.rules.ruleset import Ruleset
from services.common.timeutil import iso
from services.common.workdays import WorkingCalendar, cst_date
from services.supervision.models import case_projection, referral_projection
from services.supervision.projection import OPEN_REFERRAL
from services.supervision.sweeping import shard_filter

YIELD_EVERY = 200  # cases between cooperative yields: a long sweep must not starve AMQP heartbeats
ROWS_PER_FETCH = 2000  # rows streamed from the database at a time: memory stays flat


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
    # False for a cluster decision of an evaluation of given cases: ``case_ids`` then names only
    # those of them in the cluster, and ``name_whole_clusters`` completes it if it is carried out.
    whole_cluster: bool = True

    @property
    def key(self):
        return (self.rule_id, self.action, self.subject_id, self.dedupe_key)


def case_facts(
    case,
    nearest_due,
    on_agenda: bool,
    similar_count: int,
    now: datetime,
    calendar: WorkingCalendar,
    today=None,
    departments=None,
) -> dict:
    """The facts of one case; ``nearest_due`` is the earliest deadline among its open referrals
    (``today``, the China date of ``now``, may be given when many cases are evaluated at once)."""
    today = today or cst_date(now)
    departments = list(case.departments or [] if departments is None else departments)
    facts = {
        "status": case.status,
        "unresolved": case.status != "closed",
        "kind": case.kind,
        "category": case.category,
        "street": case.street,
        "source": case.source,
        "title": case.title,
        "departments": departments,
        "department_count": len(departments),
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
    if nearest_due:
        # Working days only grow with the end date, so the nearest deadline gives the fewest.
        to_deadline = calendar.working_days_between(today, cst_date(nearest_due))
        facts["working_days_to_deadline"] = to_deadline
        facts["working_days_overdue"] = max(0, -to_deadline)
    return facts


@functools.lru_cache(maxsize=4096)
def _departments(departments_json: str | None) -> tuple:
    """Parsed once per distinct list: a million cases name a few hundred."""
    return tuple(json.loads(departments_json)) if departments_json else ()


def _case_columns(similar=None):
    """A case's columns for evaluation; ``similar`` counts its cluster's unresolved cases (by
    default a window over the rows read, which must then be the whole clusters)."""
    c = case_projection.c
    if similar is None:
        similar = func.count().over(partition_by=c.cluster_key)
    return (
        c.case_id,
        c.status,
        c.kind,
        c.category,
        c.street,
        c.source,
        c.title,
        cast(c.departments, Text).label("departments_json"),  # parsed once per distinct value
        c.lead_department,
        c.first_referred_at,
        c.returns,
        c.extensions,
        c.reopen_count,
        c.unsatisfied_count,
        c.last_rating,
        c.residents_affected,
        c.cluster_key,
        c.nearest_due,
        c.on_agenda,
        c.received_at,
        similar.label("similar"),
    )


# A row of ``_case_columns`` as a plain named tuple: SQLAlchemy's ``Row`` finds an attribute through
# a Python ``__getattr__`` (0.6 µs a read, about 25 reads a case: 14 µs of a whole pass's 35 µs
# per case); a named tuple reads it in a C descriptor.
CaseRow = namedtuple("CaseRow", [column.key for column in _case_columns()])


def _case_rows(session, which, stream: bool = True):
    """Unresolved cases meeting ``which``, each with the facts that live in other tables, ordered
    so that a cluster's cases come together (and its count is over the cluster, not the page)."""
    c = case_projection.c
    query = (
        select(*_case_columns()).where(c.status != "closed", which).order_by(c.cluster_key, c.received_at, c.case_id)
    )
    if not stream:  # a case's cluster: a few rows, one round trip
        return map(CaseRow._make, session.execute(query))
    if on_postgresql(session):
        # Streamed rows come from a server-side cursor, which PostgreSQL plans for the first 10 %
        # of rows by default: it would walk the whole cluster index to skip a sort, reading every
        # case of every shard for each shard. We read every row, so plan for all of them.
        session.execute(text("SET LOCAL cursor_tuple_fraction = 1.0"))
    return map(CaseRow._make, session.execute(query.execution_options(yield_per=ROWS_PER_FETCH)))


def _target_rows(session, targets: set):
    """The unresolved ones of ``targets``, in the order of ``_case_rows``, each with the count of
    its cluster's unresolved cases. Only the targets' rows are read; their clusters' other cases
    are only counted, by cluster. (Reading every case of those clusters, every column, for a
    window count, and then keeping the targets, was the statement with the most of PostgreSQL's
    time in bench/e2e.py's short run: 12 %, 27 ms a call. Under the same load this way took
    17-20 ms a call against 32-35: bench/README.md, 6 December.)"""
    c = case_projection.c
    counts = (
        select(c.cluster_key, func.count().label("similar"))
        .where(c.status != "closed", _clusters_of(c.case_id.in_(targets)))
        .group_by(c.cluster_key)
        .subquery()
    )
    rows = session.execute(
        select(*_case_columns(similar=counts.c.similar))
        .join_from(case_projection, counts, counts.c.cluster_key == c.cluster_key)
        .where(c.status != "closed", c.case_id.in_(targets))
        .order_by(c.cluster_key, c.received_at, c.case_id)
    )
    return map(CaseRow._make, rows)


def _unresolved_members(session, cluster_keys) -> dict[str, list[str]]:
    """``{cluster key: its unresolved cases}``, in the order of ``_case_rows``."""
    c = case_projection.c
    members = defaultdict(list)
    keys = sorted(cluster_keys)
    for start in range(0, len(keys), 1000):
        for key, case_id in session.execute(
            select(c.cluster_key, c.case_id)
            .where(c.status != "closed", c.cluster_key.in_(keys[start : start + 1000]))
            .order_by(c.cluster_key, c.received_at, c.case_id)
        ):
            members[key].append(case_id)
    return members


def _row_facts(case, now: datetime, calendar: WorkingCalendar, today=None) -> dict:
    """The facts of a row of ``_case_rows``."""
    departments = _departments(case.departments_json)
    return case_facts(case, case.nearest_due, case.on_agenda, case.similar, now, calendar, today, departments)


def _clusters_of(condition):
    """Every case of the clusters that have a case meeting ``condition`` (closed ones included:
    a case closing changes its cluster's count)."""
    return case_projection.c.cluster_key.in_(select(case_projection.c.cluster_key).where(condition))


def evaluate(
    session,
    ruleset: Ruleset,
    calendar: WorkingCalendar,
    now: datetime,
    case_ids=None,
    shard=None,
    changed_since=None,
    pause=lambda: eventlet.sleep(0),
) -> tuple[int, list]:
    """``(cases evaluated, decisions)`` at ``now``: for the given cases, or else every unresolved
    case (of one sweep shard, when given; only the clusters with a case changed since
    ``changed_since``, when given). ``pause()`` is called every ``YIELD_EVERY`` cases: a
    cooperative yield, or ``GiveWay.pause`` to let the projection go first."""
    if case_ids is not None:
        if not case_ids:
            return 0, []
        rows = _target_rows(session, set(case_ids))  # their clusters' members are read below, if needed
    else:
        which = shard_filter(shard) if shard is not None else true()
        if changed_since is not None:
            which = and_(which, _clusters_of(and_(which, case_projection.c.changed_at >= changed_since)))
        rows = _case_rows(session, which)
    evaluated, decisions, reminders, today = 0, {}, [], cst_date(now)
    for cluster, members in itertools.groupby(rows, key=lambda row: row.cluster_key):
        members = list(members)
        # Evaluating given cases, only they are read: a cluster decision names those of them in
        # the cluster until it is carried out for the first time (name_whole_clusters).
        member_ids = [m.case_id for m in members]
        for case in members:
            evaluated += 1
            if evaluated % YIELD_EVERY == 0:
                pause()
            facts = _row_facts(case, now, calendar, today)
            for rule in ruleset.fire("escalate", facts):
                for action, params in rule.actions:
                    scope = params.get("scope", "case")
                    subject, ids = (cluster, member_ids) if scope == "cluster" else (case.case_id, [case.case_id])
                    # A new deadline (after an extension) is a new reminder.
                    dedupe = (iso(case.nearest_due) or "") if action == "remind_department" else ""
                    decision = Decision(rule.id, action, scope, subject, ids, dedupe, facts, ruleset.version, now)
                    decision.whole_cluster = scope != "cluster" or case_ids is None
                    if decision.key not in decisions:
                        decisions[decision.key] = decision
                        if action == "remind_department":
                            reminders.append((decision, case.nearest_due))
    _add_reminded_referrals(session, reminders)
    return evaluated, list(decisions.values())


def name_whole_clusters(session, decisions: list[Decision]) -> None:
    """Cluster decisions of an evaluation of given cases name every unresolved case of their
    cluster, read now. Only those about to be carried out for the first time need it: a cluster
    item taken before gains just the evaluated cases (escalation.apply's ``growth_among``), and
    reading every case of every cluster an evaluation after events touched was the read that
    returned the most rows under a steady load (bench/e2e.py at 200 cases/s with about 12,000
    cases open: 13,580 rows a run, 40 ms of PostgreSQL's time each, every row parsed here)."""
    partial = [d for d in decisions if not d.whole_cluster]
    if not partial:
        return
    members = _unresolved_members(session, {d.subject_id for d in partial})
    for decision in partial:
        # Closed since the evaluation, the whole cluster: the decision keeps the cases it was made for.
        decision.case_ids = members.get(decision.subject_id) or decision.case_ids
        decision.whole_cluster = True


def _add_reminded_referrals(session, reminders) -> None:
    """A reminder names the referrals due first; looked up only for the cases reminded."""
    for start in range(0, len(reminders), 1000):
        chunk = reminders[start : start + 1000]
        by_case: dict = {}
        for r in session.execute(
            select(referral_projection).where(
                referral_projection.c.case_id.in_([d.case_ids[0] for d, _ in chunk]),
                referral_projection.c.status.in_(OPEN_REFERRAL),
            )
        ).all():
            by_case.setdefault(r.case_id, []).append(r)
        for decision, due in chunk:
            decision.details["referrals"] = [
                {
                    "referral_id": r.referral_id,
                    "department": r.department,
                    "department_name": r.department_name,
                    "due_at": iso(r.due_at),
                }
                for r in by_case.get(decision.case_ids[0], [])
                if r.due_at == due
            ]


def facts_of(session, ruleset: Ruleset, calendar: WorkingCalendar, now: datetime, case_id: str) -> dict:
    """The facts one case presents at ``now`` (for ``rules explain``)."""
    for case in _case_rows(session, _clusters_of(case_projection.c.case_id == case_id), stream=False):
        if case.case_id == case_id:
            return _row_facts(case, now, calendar)
    # A closed case: no cluster to count in, no open referrals.
    case = session.execute(select(case_projection).where(case_projection.c.case_id == case_id)).first()
    return case_facts(case, None, False, 1, now, calendar)
