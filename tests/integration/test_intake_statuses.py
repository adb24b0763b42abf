"""Intake's view of a case's status, from routing's events (``cases.apply_routing_statuses``). On
PostgreSQL a batch's events update each case once, taken together; the outcome must be what
applying them one by one in the order they occurred gives (the path kept for SQLite): an event
older than the case's last update changes nothing, a referral names the agency and its deadline,
and later steps keep them."""

import random
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from services.intake import cases
from services.intake.models import cases as intake_cases

CST = timezone(timedelta(hours=8))
START = datetime(2026, 12, 1, 9, tzinfo=CST)


def store_cases(db, count: int, rng: random.Random) -> None:
    with db.begin() as connection:
        connection.execute(intake_cases.delete())
        connection.execute(
            intake_cases.insert(),
            [
                dict(
                    id=f"HY-{n}",
                    source="12345",
                    external_id=str(n),
                    channel="amqp",
                    title="路灯不亮",
                    description="",
                    status="received",
                    agency_responsible=rng.choice([None, "旧部门"]),
                    expected_at=rng.choice([None, START + timedelta(days=3)]),
                    received_at=START,
                    updated_at=START + timedelta(minutes=rng.randrange(0, 40)),
                )
                for n in range(count)
            ],
        )


def event(case_id: str, event_type: str, minute: int, **more) -> dict:
    return dict(
        event_type=event_type, case_id=case_id, occurred_at=(START + timedelta(minutes=minute)).isoformat(), **more
    )


def referred(case_id: str, minute: int, department: str) -> dict:
    due = (START + timedelta(days=5, minutes=minute)).isoformat()
    referrals = [{"department_name": department, "due_at": due}, {"department_name": "协办部门", "due_at": due}]
    return event(case_id, "case_referred", minute, referrals=referrals)


def random_events(rng: random.Random, count: int) -> list[dict]:
    events = []
    for n in range(count):
        for _ in range(rng.randrange(0, 5)):
            minute, case_id = rng.randrange(0, 60), f"HY-{n}"
            kind = rng.choice(["referred", "triage", "replied", "replied_not_case", "reopened", "closed"])
            if kind == "referred":
                events.append(referred(case_id, minute, rng.choice(["住建局", "城管局", "交通局"])))
            elif kind == "triage":
                events.append(event(case_id, "case_needs_triage", minute))
            elif kind.startswith("replied"):
                replied = kind == "replied"  # the case's reply, not only one department's
                events.append(event(case_id, "referral_replied", minute, case_replied=replied, result="已修复"))
            elif kind == "reopened":
                events.append(event(case_id, "case_reopened", minute))
            else:
                events.append(event(case_id, "case_closed", minute, rating="满意"))
    rng.shuffle(events)  # delivered in any order
    return events


def stored(db) -> list[tuple]:
    c = intake_cases.c
    with db.connect() as connection:
        return connection.execute(
            select(c.id, c.status, c.status_notes, c.agency_responsible, c.expected_at, c.updated_at).order_by(c.id)
        ).all()


@pytest.mark.parametrize("seed", range(12))
def test_a_batch_taken_together_ends_as_its_events_applied_one_by_one(db, seed):
    rng, count = random.Random(seed), 30
    events = random_events(rng, count)
    store_cases(db, count, random.Random(seed))
    with sessionmaker(db).begin() as session:
        cases.apply_routing_statuses(session, events)  # PostgreSQL: one UPDATE … FROM VALUES
    together = stored(db)
    store_cases(db, count, random.Random(seed))
    with sessionmaker(db).begin() as session:
        cases._apply_one_by_one(session, cases._status_changes(events))
    assert together == stored(db)
    assert any(row.status != "received" for row in together)


def test_a_referral_older_than_the_case_does_not_name_the_agency_while_a_later_step_applies(db):
    """The case was updated at minute 20: the referral of minute 10 is too old, the reply of
    minute 30 is not. The reply sets the status and keeps the agency the case had."""
    store_cases(db, 1, random.Random(0))
    with db.begin() as connection:
        connection.execute(
            intake_cases.update().values(updated_at=START + timedelta(minutes=20), agency_responsible="旧部门")
        )
    events = [
        event("HY-0", "referral_replied", 30, case_replied=True, result="已修复"),
        referred("HY-0", 10, "住建局"),
    ]
    with sessionmaker(db).begin() as session:
        cases.apply_routing_statuses(session, events)
    [row] = stored(db)
    assert (row.status, row.status_notes, row.agency_responsible) == ("replied", "已答复：已修复", "旧部门")
    assert row.updated_at == START + timedelta(minutes=30)


def test_a_referral_then_a_step_in_one_batch_keep_the_referral_s_agency_and_deadline(db):
    store_cases(db, 1, random.Random(0))
    with db.begin() as connection:
        connection.execute(intake_cases.update().values(updated_at=START, agency_responsible=None, expected_at=None))
    events = [event("HY-0", "case_closed", 50, rating="满意"), referred("HY-0", 10, "住建局")]
    with sessionmaker(db).begin() as session:
        cases.apply_routing_statuses(session, events)
    [row] = stored(db)
    assert (row.status, row.status_notes, row.agency_responsible) == ("closed", "已办结（评价：满意）", "住建局")
    assert row.expected_at == START + timedelta(days=5, minutes=10)
