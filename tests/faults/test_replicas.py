"""Scale out: two replicas of every service at once (competing consumers on the same queues),
supervision's periodic sweep shared among its replicas by shard, and one supervision replica
killed with -9 while it holds a shard: every escalation still happens exactly once."""

import os
import signal
import time
import uuid
from datetime import timedelta

from sqlalchemy.orm import sessionmaker

from services.common.rules.provider import with_calendar
from services.common.timeutil import now
from services.notify import deliveries
from services.supervision import evaluation, projection
from services.supervision import rules as supervision_rules
from tests.conftest import wait_for
from tests.faults.conftest import LONG
from tests.faults.harness import (
    SERVICES,
    STREETS,
    TOPICS,
    Sender,
    assert_nothing_lost_or_doubled,
    case_payload,
    finished,
    reconcile,
)

CASES = 120
BACKLOG = 2000 if LONG else 160  # overdue cases for the sweep
POLICY = {"cluster_window_days": 30, "cluster_similarity": 0.2}  # rules/supervision/policy.yaml
ESCALATION_EVENTS = "('case_escalated', 'department_reminded', 'supervisors_alerted')"


def seed_overdue_backlog(stack, count: int) -> None:
    """Cases referred 30 days ago and never answered, written into supervision's projection and
    notify's case table as their event handlers would (a backlog that predates this deployment)."""
    sessions = sessionmaker(stack.engine)
    referred = now() - timedelta(days=30)
    due = referred + timedelta(days=10)
    for start in range(0, count, 500):
        with sessions.begin() as session:
            for i in range(start, min(count, start + 500)):
                case_id = f"BK-2026-{i:06d}"
                # 4 streets × 2 categories: a few large shards, so a replica is seen mid-shard.
                street, (title, description) = STREETS[i % 4], TOPICS[(i // 4) % 2]
                common = {"occurred_at": referred.isoformat(), "case_id": case_id, "source": "backlog"}
                received = common | {
                    "event_id": str(uuid.uuid4()),
                    "event_type": "case_received",
                    "external_id": case_id,
                    "title": f"{street}{title}（{i}）",
                    "description": description,
                    "category": f"topic{(i // 4) % 2}",
                    "street": street,
                    "received_at": referred.isoformat(),
                }
                projection.record_case_received(session, received, POLICY)
                deliveries.record_case(session, received)  # notify's table, as its handler would
                projection.record_routing_event(
                    session,
                    common
                    | {
                        "event_id": str(uuid.uuid4()),
                        "event_type": "case_referred",
                        "round": 1,
                        "kind": "referral",
                        "referrals": [
                            {
                                "referral_id": f"{case_id}-R1",
                                "department": "cgj",
                                "department_name": "龙岗区城市管理和综合执法局",
                                "lead": True,
                                "due_at": due.isoformat(),
                                "return_by": due.isoformat(),
                            }
                        ],
                    },
                    POLICY,
                )


def test_replicas_compete_share_the_sweep_and_survive_a_kill_mid_sweep(make_stack, capsys):
    stack = make_stack()
    policy = stack.rules / "supervision" / "policy.yaml"
    policy.write_text(
        policy.read_text(encoding="utf-8")
        .replace("sweep_interval_seconds: 60", "sweep_interval_seconds: 3600")
        .replace("sweep_lease_seconds: 300", "sweep_lease_seconds: 5"),
        encoding="utf-8",
    )
    stack.up()
    for service in SERVICES:
        stack.start_replica(service, 2)
    stack.cli("up")  # waits until the first four are healthy; the replicas start alongside
    competing = (
        "huiying.intake.tickets",
        "evt-intake-case_received--routing.on_case_received",
        "huiying.notify.deliveries",
    )
    wait_for(lambda: all(stack.consumers().get(queue) == 2 for queue in competing), timeout=60, interval=0.5)

    # 1. Competing consumers: both replicas of each service consume the same queues.
    sender = Sender(stack, stack.keys["hotline"])
    for i in range(CASES):
        (sender.http if i % 2 else sender.amqp)(case_payload(i, "hotline-12345", "R"))
    figures = finished(stack, sender)
    assert_nothing_lost_or_doubled(figures, CASES)
    consumers = stack.consumers()
    assert consumers["huiying.intake.tickets"] == 2
    assert consumers["evt-intake-case_received--routing.on_case_received"] == 2
    assert consumers["huiying.notify.deliveries"] == 2

    # 2. The sweep shared by shard; one replica killed while it holds a shard.
    decisions_before = stack.scalar("SELECT count(*) FROM supervision_decisions")
    seed_overdue_backlog(stack, BACKLOG)
    stack.scalar("UPDATE supervision_sweep_shards SET swept_at = NULL, owner = NULL, lease_until = NULL RETURNING 1")
    replica_pids = {stack.pid("supervision"), stack.replicas[SERVICES.index("supervision")].pid}
    deadline = time.monotonic() + 120
    victim = None
    while victim is None and time.monotonic() < deadline:
        holders = stack.rows("SELECT owner FROM supervision_sweep_shards WHERE owner IS NOT NULL")
        swept = stack.scalar("SELECT count(*) FROM supervision_sweep_shards WHERE swept_at IS NOT NULL")
        if holders and swept >= 2:
            pid = int(holders[0][0].split(":")[1])
            # one that has swept a shard already (swept_by is host:pid:nonce), so that both
            # replicas are seen to have swept
            if pid in replica_pids and stack.scalar(
                "SELECT count(*) FROM supervision_sweep_shards WHERE swept_by LIKE :me", me=f"%:{pid}:%"
            ):
                victim = pid
        time.sleep(0.01)
    assert victim, "no replica was seen holding a shard"
    os.kill(victim, signal.SIGKILL)
    killed_at = now()

    def all_swept():
        return (
            stack.scalar("SELECT count(*) FROM supervision_sweep_shards WHERE swept_at IS NULL OR owner IS NOT NULL")
            == 0
        )

    deadline = time.monotonic() + 180
    while not all_swept() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert all_swept()
    stack.wait_settled()

    loaded = with_calendar(supervision_rules.load)(stack.rules)
    with sessionmaker(stack.engine)() as session:
        _, expected = evaluation.evaluate(session, loaded.rules, loaded.calendar, now())
    stored = {tuple(r) for r in stack.rows("SELECT rule_id, action, subject_id, dedupe_key FROM supervision_decisions")}
    swept_by = {r[0].split(":")[1] for r in stack.rows("SELECT DISTINCT swept_by FROM supervision_sweep_shards")}
    events = stack.scalar(f"SELECT count(*) FROM supervision_outbox WHERE event_type IN {ESCALATION_EVENTS}")
    taken_over = stack.scalar("SELECT count(*) FROM supervision_sweep_shards WHERE swept_at > :t", t=killed_at)
    shards = stack.scalar("SELECT count(*) FROM supervision_sweep_shards")
    with capsys.disabled():
        print(
            f"\n{CASES} cases through 2 replicas of each service: lost {len(figures['lost'])},"
            f" extra {len(figures['extra'])}; sweep of {BACKLOG} overdue cases in {shards} shards by"
            f" {len(swept_by)} replicas, pid {victim} killed mid-sweep, {taken_over} shards swept after;"
            f" decisions {len(stored) - decisions_before} new, {len(stored)} in all, {events} escalation events"
        )
    assert {d.key for d in expected} <= stored  # everything the rules decide now was decided
    assert len(stored) == events  # and each decision announced once
    assert str(victim) in swept_by and len(swept_by) == 2  # both replicas swept shards
    assert stack.dead_letters() == {name: 0 for name in stack.dead_letters()}
    assert reconcile(stack, sender, "hotline-12345")["notified twice"] == []
