"""Routing's events reach supervision through one queue per event type, so they may be projected
in another order than they occurred (CI saw a case's second round of referrals projected before
the case_reopened that opened it). Projected in any order — a step on a referral that came before
its case_referred retried later, as events.py retries it — a case's whole process leaves the same
projection as in the order it happened, on PostgreSQL."""

import random
import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from services.common.timeutil import CST
from services.supervision import projection
from services.supervision.models import case_projection, referral_projection, timeline

SETTINGS = {"cluster_window_days": 30, "cluster_similarity": 0.2}
START = datetime(2026, 9, 1, 9, 0, tzinfo=CST)
PERMUTATIONS = 16
# Set by supervision's own clock or by where the case landed among the others, not by the events.
NOT_FROM_THE_EVENTS = {"case_id", "referral_id", "changed_at", "cluster_key"}


def whole_process(case_id: str) -> list[dict]:
    """A case as routing and intake tell it, with every kind of step: put on the triage list,
    referred, returned by its first department and referred again in the same round, extended
    twice, replied, rated unsatisfied, redone under another lead, rated satisfied and closed."""
    steps, minute = [], 0

    def event(event_type, **payload):
        nonlocal minute
        minute += 7
        steps.append(
            {
                "event_id": str(uuid.uuid4()),
                "event_type": event_type,
                "occurred_at": (START + timedelta(minutes=minute)).isoformat(),
                "case_id": case_id,
                **payload,
            }
        )

    def referred(round_number, first, departments):
        due = (START + timedelta(days=7 * round_number)).isoformat()
        event(
            "case_referred",
            round=round_number,
            category="traffic",
            kind="referral",
            street="pinghu",
            source="hotline-12345",
            referrals=[
                {
                    "referral_id": f"{case_id}-R{first + i}",
                    "department": department,
                    "department_name": department,
                    "lead": i == 0,
                    "due_at": due,
                }
                for i, department in enumerate(departments)
            ],
        )

    def step(event_type, number, department, **payload):
        event(event_type, referral_id=f"{case_id}-R{number}", department=department, **payload)

    event(
        "case_received",
        source="hotline-12345",
        channel="amqp",
        title="海吉星市场周边交通拥堵",
        description="白坭坑片区早高峰拥堵",
        category=None,
        street="pinghu",
        received_at=START.isoformat(),
    )
    event("case_needs_triage", category="other", street="pinghu", reason="no rule assigns a department")
    referred(1, 1, ["xfj"])
    step("referral_returned", 1, "xfj", reason="不属于本单位职责")
    referred(1, 2, ["jtglj", "jjdd"])
    step("referral_accepted", 2, "jtglj")
    for days in (10, 15):
        step("extension_requested", 2, "jtglj", working_days=3, reason="需协调市场方")
        step("extension_granted", 2, "jtglj", due_at=(START + timedelta(days=days)).isoformat())
    step("referral_replied", 2, "jtglj", result="已增设人车分流设施", on_time=True)
    step("referral_replied", 3, "jjdd", result="高峰期加派警力", on_time=True, case_replied=True)
    event("feedback_received", rating="不满意", source="hotline-12345")
    event("case_reopened", reopen_count=1, source="hotline-12345")
    referred(2, 4, ["jjdd", "jtglj"])
    step("referral_accepted", 5, "jtglj")
    step("referral_replied", 4, "jjdd", result="重办完成", on_time=False)
    step("referral_replied", 5, "jtglj", result="重办完成", on_time=True, case_replied=True)
    event("feedback_received", rating="满意", source="hotline-12345")
    event("case_closed", rating="满意", source="hotline-12345")
    return steps


def project_one_by_one(sessions, events: list[dict]) -> None:
    """Each event in its own transaction, in the order given."""
    project_in_batches(sessions, [[event] for event in events])


def project_in_batches(sessions, batches: list[list[dict]]) -> None:
    for batch in batches:
        with sessions.begin() as session:
            projection.record_events(session, batch, SETTINGS)
        assert_nearest_due_is_of_the_open_referrals(sessions)


def assert_nearest_due_is_of_the_open_referrals(sessions) -> None:
    """After every batch, each case's ``nearest_due`` (worked out from the referrals the batch
    read and changed) is the earliest deadline among its open referrals as stored."""
    r = referral_projection.c
    earliest = (
        select(func.min(r.due_at))
        .where(r.case_id == case_projection.c.case_id, r.status.in_(projection.OPEN_REFERRAL))
        .scalar_subquery()
    )
    with sessions() as session:
        rows = session.execute(select(case_projection.c.case_id, case_projection.c.nearest_due, earliest)).all()
    assert [row for row in rows if row[1] != row[2]] == []


def batches_with_redeliveries(rng: random.Random, events: list[dict]) -> list[list[dict]]:
    """``events`` in runs of 1 to 6, as queues hand them to one projection run, with a few sent
    again later (at least once delivery) or twice in one batch."""
    events = list(events)
    for _ in range(3):
        again = dict(rng.choice(events))
        events.insert(rng.randrange(len(events) + 1), again)
    batches, position = [], 0
    while position < len(events):
        size = rng.randint(1, 6)
        batches.append(events[position : position + size])
        position += size
    return batches


def steps_before_their_referral(events: list[dict]) -> int:
    made, early = set(), 0
    for event in events:
        made |= {r["referral_id"] for r in event.get("referrals", [])}
        early += event["event_type"] in projection.STEPS and event["referral_id"] not in made
    return early


def projected(sessions, case_id: str) -> tuple[dict, list[dict], int]:
    with sessions() as session:
        case = session.execute(select(case_projection).where(case_projection.c.case_id == case_id)).one()._asdict()
        referrals = [
            row._asdict()
            for row in session.execute(
                select(referral_projection)
                .where(referral_projection.c.case_id == case_id)
                .order_by(referral_projection.c.referral_id)
            )
        ]
        steps = len(session.execute(select(timeline.c.id).where(timeline.c.case_id == case_id)).all())

    def comparable(row: dict) -> dict:
        return {k: v for k, v in row.items() if k not in NOT_FROM_THE_EVENTS}

    return comparable(case), [comparable(r) for r in referrals], steps


def differences(got: tuple, expected: tuple) -> list[tuple]:
    """``(what, got, expected)`` for each field that differs."""
    (case, referrals, steps), (want_case, want_referrals, want_steps) = got, expected
    found = [(k, case.get(k), v) for k, v in want_case.items() if case.get(k) != v]
    found += [
        (f"referral {i} {k}", r.get(k), v)
        for i, (r, w) in enumerate(zip(referrals, want_referrals))
        for k, v in w.items()
        if r.get(k) != v
    ]
    if (len(referrals), steps) != (len(want_referrals), want_steps):
        found.append(("referrals, steps", (len(referrals), steps), (len(want_referrals), want_steps)))
    return found


@pytest.fixture
def sessions(db):
    return sessionmaker(db)


def test_a_whole_process_projected_in_any_order_ends_as_in_order(sessions):
    in_order = whole_process("LG-2026-000001")
    project_one_by_one(sessions, in_order)
    expected = projected(sessions, "LG-2026-000001")
    case, referrals, steps = expected
    assert (case["status"], case["reopen_count"], case["last_rating"], case["unsatisfied_count"]) == (
        "closed",
        1,
        "满意",
        1,
    )
    assert (case["lead_department"], case["departments"], case["category"], case["kind"]) == (
        "jjdd",
        ["xfj", "jtglj", "jjdd"],
        "traffic",
        "referral",
    )
    assert (case["returns"], case["extensions"], case["early_steps"], steps) == (1, 2, 0, len(in_order))
    assert case["closed_at"] is not None and case["nearest_due"] is None
    assert [(r["round"], r["status"], r["extension"], r["due_at"].day) for r in referrals] == [
        (1, "returned", None, 8),
        (1, "replied", "granted", 16),  # the second extension's date (15 days on)
        (1, "replied", None, 8),
        (2, "replied", None, 15),
        (2, "replied", None, 15),
    ]
    assert [r["replied_on_time"] for r in referrals] == [None, True, True, False, True]

    rng = random.Random(20261203)
    orders = [list(reversed(range(len(in_order))))] + [
        rng.sample(range(len(in_order)), len(in_order)) for _ in range(PERMUTATIONS - 1)
    ]
    early = 0
    for number, order in enumerate(orders, start=2):
        case_id = f"LG-2026-{number:06d}"
        events = [whole_process(case_id)[i] for i in order]
        early += steps_before_their_referral(events)
        if number % 2:
            project_in_batches(sessions, batches_with_redeliveries(rng, events))
        else:
            project_one_by_one(sessions, events)
        assert differences(projected(sessions, case_id), expected) == [], f"order {order}"
    assert early > 0  # the orders did bring steps before their referrals


def test_the_second_round_projected_before_the_reopening_counts_it_and_keeps_the_later_status(sessions):
    """The order CI met: the case_referred of round 2 before the case_reopened that opened it."""
    events = whole_process("LG-2026-000100")
    reopened = next(i for i, e in enumerate(events) if e["event_type"] == "case_reopened")
    second_round = events[reopened + 1]
    assert second_round["event_type"] == "case_referred" and second_round["round"] == 2
    project_one_by_one(sessions, events[:reopened] + [second_round])
    case, referrals, _ = projected(sessions, "LG-2026-000100")
    assert (case["reopen_count"], len(referrals), case["status"], case["lead_department"]) == (1, 5, "referred", "jjdd")
    project_one_by_one(sessions, [events[reopened]])
    case, _, steps = projected(sessions, "LG-2026-000100")
    assert (case["reopen_count"], case["status"], steps) == (1, "referred", reopened + 2)


def test_a_step_before_its_referral_changes_the_case_at_once_and_the_referral_when_it_comes(sessions):
    events = whole_process("LG-2026-000200")
    first_referral = next(i for i, e in enumerate(events) if e["event_type"] == "case_referred")
    returned = events[first_referral + 1]
    assert returned["event_type"] == "referral_returned"
    project_one_by_one(sessions, events[:first_referral] + [returned])
    case, referrals, steps = projected(sessions, "LG-2026-000200")
    assert (case["returns"], case["early_steps"], referrals, steps) == (1, 1, [], first_referral + 1)
    project_one_by_one(sessions, [events[first_referral]])
    case, referrals, _ = projected(sessions, "LG-2026-000200")
    assert (case["early_steps"], [(r["status"], r["returned_at"] is not None) for r in referrals]) == (
        0,
        [("returned", True)],
    )


def test_a_case_another_worker_stores_meanwhile_fails_the_run_and_its_events_then_apply_to_that_row(
    sessions, monkeypatch
):
    """Routing's event starts its case, whose row is written when the event is applied; a replica
    projecting intake's event stores the row first. The run fails (StartedMeanwhile: nothing of it
    is kept), and the event projected again ends the case as projecting both in turn does."""
    received, triage = whole_process("LG-2026-000300")[:2]
    read_referrals = projection._referrals_as_of

    def replica_stores_it_meanwhile(session, events):
        with sessions.begin() as other:
            projection.record_events(other, [received], SETTINGS)
        return read_referrals(session, events)

    monkeypatch.setattr(projection, "_referrals_as_of", replica_stores_it_meanwhile)
    with pytest.raises(projection.StartedMeanwhile, match="LG-2026-000300"):
        with sessions.begin() as session:
            projection.record_events(session, [triage], SETTINGS)
    monkeypatch.undo()
    project_one_by_one(sessions, [triage])

    in_turn = [dict(event, case_id="LG-2026-000301", event_id=str(uuid.uuid4())) for event in (received, triage)]
    project_one_by_one(sessions, in_turn)
    assert differences(projected(sessions, "LG-2026-000300"), projected(sessions, "LG-2026-000301")) == []
    assert projected(sessions, "LG-2026-000300")[0]["status"] == "triage"
