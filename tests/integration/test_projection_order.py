"""Routing's events reach supervision through one queue per event type, so they may be projected
in another order than they occurred (CI saw a case's second round of referrals projected before
the case_reopened that opened it). Projected in any order — a step on a referral that came before
its case_referred retried later, as events.py retries it — a case's whole process leaves the same
projection as in the order it happened, on PostgreSQL."""

import random
import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from services.common.timeutil import CST
from services.supervision import projection
from services.supervision.models import case_projection, referral_projection, timeline

SETTINGS = {"cluster_window_days": 30, "cluster_similarity": 0.2}
START = datetime(2026, 9, 1, 9, 0, tzinfo=CST)
PERMUTATIONS = 12
# Set by supervision's own clock or by where the case landed among the others, not by the events.
NOT_FROM_THE_EVENTS = {"case_id", "referral_id", "changed_at", "cluster_key", "nearest_due"}


def whole_process(case_id: str) -> list[dict]:
    """test_whole_process's case as routing and intake tell it: referred to two departments,
    extended, replied, rated unsatisfied, redone, rated satisfied and closed."""
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

    def referred(round_number, first):
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
                # the second round led by the other department, so that an older round's lead shows
                for i, department in enumerate(("jtglj", "jjdd")[:: 3 - 2 * round_number])
            ],
        )

    event(
        "case_received",
        source="hotline-12345",
        channel="amqp",
        title="海吉星市场周边交通拥堵",
        description="白坭坑片区早高峰拥堵",
        category="traffic",
        street="pinghu",
        received_at=START.isoformat(),
    )
    referred(1, 1)
    lead, co = f"{case_id}-R1", f"{case_id}-R2"
    event("referral_accepted", referral_id=lead, department="jtglj")
    event("extension_requested", referral_id=lead, department="jtglj", working_days=3, reason="需协调市场方")
    event("extension_granted", referral_id=lead, department="jtglj", due_at=(START + timedelta(days=10)).isoformat())
    event("referral_replied", referral_id=lead, department="jtglj", result="已增设人车分流设施", on_time=True)
    event(
        "referral_replied", referral_id=co, department="jjdd", result="高峰期加派警力", on_time=True, case_replied=True
    )
    event("feedback_received", rating="不满意", source="hotline-12345")
    event("case_reopened", reopen_count=1, source="hotline-12345")
    referred(2, 3)
    event("referral_accepted", referral_id=f"{case_id}-R4", department="jjdd")
    event("referral_replied", referral_id=f"{case_id}-R3", department="jtglj", result="重办完成", on_time=True)
    event(
        "referral_replied",
        referral_id=f"{case_id}-R4",
        department="jjdd",
        result="重办完成",
        on_time=False,
        case_replied=True,
    )
    event("feedback_received", rating="满意", source="hotline-12345")
    event("case_closed", rating="满意", source="hotline-12345")
    return steps


def project_one_by_one(sessions, events: list[dict]) -> int:
    """Each event in its own transaction, in the order given; one refused for a referral not yet
    projected goes to the back, as its retry would. Returns how many were refused."""
    waiting, refused = list(events), 0
    while waiting:
        event = waiting.pop(0)
        try:
            with sessions.begin() as session:
                projection.record_events(session, [event], SETTINGS)
        except projection.ReferralNotProjectedYet:
            refused += 1
            assert refused < 10 * len(events), "a step is refused for ever"
            waiting.append(event)
    return refused


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
    assert project_one_by_one(sessions, in_order) == 0
    expected = projected(sessions, "LG-2026-000001")
    case, referrals, steps = expected
    assert (case["status"], case["reopen_count"], case["last_rating"], case["extensions"]) == ("closed", 1, "满意", 1)
    assert case["closed_at"] is not None and steps == len(in_order)
    assert [(r["round"], r["status"], r["extension"]) for r in referrals] == [
        (1, "replied", "granted"),
        (1, "replied", None),
        (2, "replied", None),
        (2, "replied", None),
    ]

    rng = random.Random(20261203)
    orders = [list(reversed(range(len(in_order))))] + [
        rng.sample(range(len(in_order)), len(in_order)) for _ in range(PERMUTATIONS - 1)
    ]
    refused = 0
    for number, order in enumerate(orders, start=2):
        case_id = f"LG-2026-{number:06d}"
        events = whole_process(case_id)
        refused += project_one_by_one(sessions, [events[i] for i in order])
        assert differences(projected(sessions, case_id), expected) == [], f"order {order}"
    assert refused > 0  # the orders did make steps come before their referrals


def test_the_second_round_projected_before_the_reopening_counts_it_and_keeps_the_later_status(sessions):
    """The order CI met: the case_referred of round 2 before the case_reopened that opened it."""
    events = whole_process("LG-2026-000100")
    reopened = next(i for i, e in enumerate(events) if e["event_type"] == "case_reopened")
    second_round = events[reopened + 1]
    assert second_round["event_type"] == "case_referred" and second_round["round"] == 2
    project_one_by_one(sessions, events[:reopened] + [second_round])
    case, referrals, _ = projected(sessions, "LG-2026-000100")
    assert (case["reopen_count"], len(referrals), case["status"], case["lead_department"]) == (1, 4, "referred", "jjdd")
    project_one_by_one(sessions, [events[reopened]])
    case, _, steps = projected(sessions, "LG-2026-000100")
    assert (case["reopen_count"], case["status"], case["closed_at"], steps) == (1, "referred", None, reopened + 2)
