"""Supervision on a real database with the real rule files and calendar: each default rule
firing and not firing, clusters of similar cases, and each escalation happening once."""

import random
import threading
import uuid
from datetime import date, datetime, timedelta

import pytest
from sqlalchemy import func, select, true, update
from sqlalchemy.orm import sessionmaker

from services.common.rules.provider import with_calendar
from services.common.timeutil import CST, now
from services.supervision import escalation, evaluation, projection, sweeping
from services.supervision import rules as supervision_rules
from services.supervision.models import agenda, agenda_cases, case_projection, decisions, outbox, sweep_shards
from tests.support import DEMO_DIRECTORY

RULES_DIR = DEMO_DIRECTORY.parent.parent / "rules"
REFERRED = datetime(2026, 9, 29, 10, 0, tzinfo=CST)  # due 12 Oct (5 working days over National Day)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=CST) if "+" not in text else datetime.fromisoformat(text)


@pytest.fixture
def world(db):
    loaded = with_calendar(supervision_rules.load)(RULES_DIR)
    sessions = sessionmaker(db)

    class World:
        counter = 0

        def event(self, event_type, case_id, when=REFERRED, **payload):
            body = {
                "event_id": str(uuid.uuid4()),
                "event_type": event_type,
                "occurred_at": when.isoformat(),
                "case_id": case_id,
                **payload,
            }
            with sessions.begin() as session:
                if event_type == "case_received":
                    projection.record_case_received(session, body, loaded.rules.settings)
                else:
                    projection.record_routing_event(session, body, loaded.rules.settings)

        def case(
            self,
            case_id,
            title="丹竹头社区路灯不亮",
            street="nanwan",
            category="urban_management",
            departments=("cgj",),
            due="2026-10-12T23:59:59+08:00",
            received=REFERRED,
            **fields,
        ):
            self.event(
                "case_received",
                case_id,
                received,
                source="hotline-12345",
                channel="amqp",
                title=title,
                description=fields.pop("description", "d"),
                category=category,
                street=street,
                received_at=received.isoformat(),
                residents_affected=fields.pop("residents", None),
            )
            self.counter += 1
            referrals = [
                {
                    "referral_id": f"{case_id}-R{i + 1}",
                    "department": d,
                    "department_name": d,
                    "lead": i == 0,
                    "due_at": due,
                    "return_by": due,
                }
                for i, d in enumerate(departments)
            ]
            self.event(
                "case_referred",
                case_id,
                received,
                referrals=referrals,
                round=1,
                category=category,
                street=street,
                kind="referral",
                source="hotline-12345",
            )

        def sweep(self, when, case_ids=None, growth_among=None):
            with sessions() as session:
                _, decided = evaluation.evaluate(session, loaded.rules, loaded.calendar, at(when), case_ids)
            decided.sort(key=lambda d: d.key)
            with sessions.begin() as session:
                taken = escalation.apply(session, decided, at(when), growth_among)
                return [(d.rule_id, d.action, tuple(d.case_ids)) for d in taken]

        def explain(self, case_id, when):
            with sessions() as session:
                facts = evaluation.facts_of(session, loaded.rules, loaded.calendar, at(when), case_id)
            return facts, {r["rule_id"]: r for r in loaded.rules.explain("escalate", facts)}

        def count(self, table):
            with sessions() as session:
                return session.scalar(select(func.count()).select_from(table))

        def events(self, event_type):
            with sessions() as session:
                return [p for t, p in session.execute(select(outbox.c.event_type, outbox.c.payload)) if t == event_type]

        sessionmaker = sessions

    return World()


def test_reminder_one_working_day_before_the_deadline_once(world):
    world.case("C-1")
    assert world.sweep("2026-10-08T09:00:00") == []  # 9, 10 (调休 Saturday), 12 Oct: 3 working days left
    assert world.sweep("2026-10-10T09:00:00") == [("remind-before-deadline", "remind_department", ("C-1",))]
    assert world.sweep("2026-10-10T15:00:00") == []  # the same reminder is not sent twice
    [reminded] = world.events("department_reminded")
    assert reminded["referrals"][0]["department"] == "cgj"
    assert world.sweep("2026-10-12T09:00:00") == []  # due today: no second reminder


def test_five_working_days_overdue_goes_on_the_agenda_with_joint_supervision(world):
    world.case("C-2")
    assert world.sweep("2026-10-16T09:00:00") == []  # 4 working days overdue
    facts, explained = world.explain("C-2", "2026-10-16T09:00:00")
    assert facts["working_days_overdue"] == 4
    assert explained["overdue-5-working-days"]["failed_conditions"] == ["working_days_overdue ge 5 (is 4)"]
    taken = world.sweep("2026-10-19T09:00:00")
    assert sorted(a for _, a, _ in taken) == ["add_to_agenda", "alert_supervisors", "open_joint_supervision"]
    assert {e["kind"] for e in world.events("case_escalated")} == {"agenda", "joint_supervision"}
    assert world.events("supervisors_alerted")[0]["departments"] == ["cgj"]
    assert world.sweep("2026-10-20T09:00:00") == [] and world.count(agenda) == 2


def test_a_case_linked_to_the_agenda_is_marked_once_and_a_second_item_does_not_touch_it_again(world):
    """``on_agenda`` and ``changed_at`` are set when an item first links a case (the incremental
    sweep looks at it again); another item linking it later changes neither: its facts are the same."""

    def marked():
        with world.sessionmaker() as session:
            c = case_projection.c
            return session.execute(select(c.on_agenda, c.changed_at).where(c.case_id == "C-9")).one()

    world.case("C-9")
    assert marked().on_agenda is False
    taken = world.sweep("2026-10-19T09:00:00")  # 5 working days overdue: the agenda and joint supervision
    assert sorted(a for _, a, _ in taken) == ["add_to_agenda", "alert_supervisors", "open_joint_supervision"]
    assert marked() == (True, at("2026-10-19T09:00:00"))
    for reason in ("x", "y"):
        world.event("referral_returned", "C-9", referral_id="C-9-R1", department="cgj", reason=reason)
    projected_at = at("2026-10-19T10:00:00")  # the returns' projection set changed_at: a known value instead
    with world.sessionmaker.begin() as session:
        c = case_projection.c
        session.execute(update(case_projection).where(c.case_id == "C-9").values(changed_at=projected_at))
    assert world.sweep("2026-10-20T09:00:00") == [("returned-twice", "add_to_agenda", ("C-9",))]
    assert marked() == (True, projected_at)
    assert world.count(agenda) == 3


def test_returned_twice_and_unsatisfied_twice(world):
    world.case("C-3")
    world.event("referral_returned", "C-3", referral_id="C-3-R1", department="cgj", reason="x")
    assert world.sweep("2026-09-30T09:00:00") == []
    world.event("referral_returned", "C-3", referral_id="C-3-R1", department="cgj", reason="y")
    assert world.sweep("2026-09-30T09:00:00") == [("returned-twice", "add_to_agenda", ("C-3",))]

    world.case("C-4")
    world.event("feedback_received", "C-4", rating="不满意")
    assert world.sweep("2026-09-30T09:00:00") == []
    world.event("feedback_received", "C-4", rating="不满意")
    assert world.sweep("2026-09-30T09:00:00") == [("unsatisfied-twice", "add_to_agenda", ("C-4",))]


def test_wide_ranging_cases_unresolved_after_20_working_days_get_a_special_inspection(world):
    world.case(
        "C-5",
        title="大芬油画村综合整治",
        category="urban_renewal",
        street="buji",
        departments=("gxzbj", "wgltj", "cgj"),
        due="2026-12-31T23:59:59+08:00",
    )
    world.case(
        "C-6",
        title="横岗南片区海绵公园建设",
        category="parks",
        street="henggang",
        residents=20000,
        due="2026-12-31T23:59:59+08:00",
    )
    world.case(
        "C-7",
        title="宝龙街道某路段积水",
        category="water",
        street="baolong",
        departments=("swj", "zjj"),
        due="2026-12-31T23:59:59+08:00",
    )
    # 29 Sep + 20 working days (30 Sep; 8, 9 and the 调休 Saturday 10 Oct; 12–16, 19–23, 26–30 Oct; 2 Nov)
    assert world.sweep("2026-10-30T09:00:00") == []  # 19
    taken = world.sweep("2026-11-02T09:00:00")
    assert sorted(taken) == [
        ("wide-ranging-unresolved", "trigger_special_inspection", ("C-5",)),
        ("wide-ranging-unresolved", "trigger_special_inspection", ("C-6",)),
    ]


def test_a_closed_case_is_never_escalated(world):
    world.case("C-8")
    world.event("case_closed", "C-8", rating="满意")
    assert world.sweep("2026-11-30T09:00:00") == []


HAIJIXING = [
    "海吉星市场周边交通拥堵",
    "海吉星市场货车占道拥堵",
    "海吉星市场门口交通拥堵严重",
    "白坭坑海吉星市场拥堵",
    "海吉星市场早高峰拥堵",
    "海吉星市场附近交通拥堵",
    "海吉星市场周边人车混行拥堵",
    "海吉星市场路口拥堵",
    "海吉星市场周边道路拥堵",
    "海吉星市场交通拥堵问题",
]


def test_five_similar_cases_become_one_agenda_item_and_ten_a_special_inspection(world):
    for i, title in enumerate(HAIJIXING[:4]):
        world.case(f"H-{i}", title=title, category="traffic", street="pinghu", due="2026-12-31T23:59:59+08:00")
    world.case(
        "X-1", title="海吉星市场周边交通拥堵", category="traffic", street="buji", due="2026-12-31T23:59:59+08:00"
    )
    world.case("X-2", title="南湾街道路灯不亮", category="traffic", street="pinghu", due="2026-12-31T23:59:59+08:00")
    assert world.sweep("2026-09-30T09:00:00") == []  # four similar in 平湖; the others differ by street or text

    world.case("H-4", title=HAIJIXING[4], category="traffic", street="pinghu", due="2026-12-31T23:59:59+08:00")
    assert world.sweep("2026-09-30T09:00:00") == [
        ("similar-cases-5", "add_to_agenda", ("H-0", "H-1", "H-2", "H-3", "H-4"))
    ]
    [item] = world.events("case_escalated")
    assert item["scope"] == "cluster" and item["case_ids"] == ["H-0", "H-1", "H-2", "H-3", "H-4"]

    for i in range(5, 10):
        world.case(f"H-{i}", title=HAIJIXING[i], category="traffic", street="pinghu", due="2026-12-31T23:59:59+08:00")
    taken = world.sweep("2026-09-30T09:00:00")
    assert [(r, a) for r, a, _ in taken] == [("similar-cases-10", "trigger_special_inspection")]
    assert world.count(agenda) == 2  # one agenda item for the cluster, one inspection: not forty
    with world.sessionmaker() as session:
        linked = session.execute(select(agenda.c.kind, func.count()).join(agenda_cases).group_by(agenda.c.kind)).all()
    assert dict(linked) == {"agenda": 10, "special_inspection": 10}  # the agenda item grew with its cluster


def test_after_events_a_new_cluster_decision_names_every_unresolved_case_of_the_cluster(world):
    # Evaluating given cases reads only them; a cluster decision taken for the first time still
    # names the whole cluster (evaluation.name_whole_clusters), and a closed case stays out.
    for i, title in enumerate(HAIJIXING[:6]):
        world.case(f"H-{i}", title=title, category="traffic", street="pinghu", due="2026-12-31T23:59:59+08:00")
    with world.sessionmaker.begin() as session:
        session.execute(update(case_projection).where(case_projection.c.case_id == "H-2").values(status="closed"))
    assert world.sweep("2026-09-30T09:00:00", case_ids=["H-5"], growth_among={"H-5"}) == [
        ("similar-cases-5", "add_to_agenda", ("H-0", "H-1", "H-3", "H-4", "H-5"))
    ]
    [item] = world.events("case_escalated")
    assert item["case_ids"] == ["H-0", "H-1", "H-3", "H-4", "H-5"]


def test_after_events_a_cluster_item_gains_the_cases_evaluated_and_the_sweep_the_rest(world):
    def linked():
        with world.sessionmaker() as session:
            return set(session.execute(select(agenda_cases.c.case_id)).scalars())

    for i, title in enumerate(HAIJIXING[:5]):
        world.case(f"H-{i}", title=title, category="traffic", street="pinghu", due="2026-12-31T23:59:59+08:00")
    assert [a for _, a, _ in world.sweep("2026-09-30T09:00:00")] == ["add_to_agenda"]
    for i in (5, 6):
        world.case(f"H-{i}", title=HAIJIXING[i], category="traffic", street="pinghu", due="2026-12-31T23:59:59+08:00")
    # evaluated after H-5's event: the item gains H-5, and H-6 is left to its own event or the sweep
    assert world.sweep("2026-09-30T09:00:00", case_ids=["H-5"], growth_among={"H-5"}) == []
    assert linked() == {f"H-{i}" for i in range(6)}
    assert world.sweep("2026-09-30T09:00:00") == []
    assert linked() == {f"H-{i}" for i in range(7)}


def test_concurrent_sweeps_take_each_decision_once(world):
    for i, title in enumerate(HAIJIXING):
        world.case(f"H-{i}", title=title, category="traffic", street="pinghu")
    results, errors = [], []

    def replica():
        try:
            results.append(world.sweep("2026-10-19T09:00:00"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=replica) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    taken = [d for result in results for d in result]
    assert len(taken) == len(set(taken)) == world.count(decisions)
    # 10 overdue cases × (agenda + joint supervision), + the cluster's agenda item and inspection
    assert world.count(agenda) == 22


def test_replicas_share_the_sweep_by_shard_without_overlap_and_take_over_a_dead_ones_lease(world):
    for i, title in enumerate(HAIJIXING[:6]):
        world.case(f"H-{i}", title=title, category="traffic", street="pinghu")
    world.case("L-1", street="nanwan")
    world.case("L-2", street="buji")
    world.case("N-1", street=None, category=None)
    sessions, t0 = world.sessionmaker, at("2026-10-19T09:00:00+08:00")
    with sessions() as session:  # registered by the projection as the cases arrived
        assert session.scalar(select(func.count()).select_from(sweep_shards)) == 4

    def claim(owner, when=t0):
        with sessions.begin() as session:
            return sweeping.claim_shard(session, owner, when, interval_seconds=60, lease_seconds=30)

    a, b, c = claim("a"), claim("b"), claim("a")
    assert len({a.shard, b.shard, c.shard}) == 3  # never the same shard twice while it is leased
    with sessions.begin() as session:
        assert sweeping.release_shard(session, b.shard, "b", t0, 1)
    d = claim("b")
    assert d.shard not in (a.shard, b.shard, c.shard) and claim("b") is None  # b was just swept; a and c are leased
    later = t0 + timedelta(seconds=31)  # "a" died holding a and c; its leases have run out
    assert {claim("b", later).shard, claim("b", later).shard} == {a.shard, c.shard}
    with sessions.begin() as session:
        assert not sweeping.release_shard(session, a.shard, "a", later, 0)  # the dead replica lost it
        assert sweeping.release_shard(session, a.shard, "b", later, 6)


def test_sweeping_shard_by_shard_decides_what_one_whole_sweep_decides(world):
    for i, title in enumerate(HAIJIXING):
        world.case(f"H-{i}", title=title, category="traffic", street="pinghu")
    world.case("L-1", street="nanwan")
    world.case("N-1", street=None, category=None)
    loaded = with_calendar(supervision_rules.load)(RULES_DIR)
    when = at("2026-10-19T09:00:00+08:00")
    with world.sessionmaker() as session:
        _, whole = evaluation.evaluate(session, loaded.rules, loaded.calendar, when)
        shards = session.execute(select(sweep_shards.c.street, sweep_shards.c.category)).all()
        by_shard = [
            d.key
            for shard in shards
            for d in evaluation.evaluate(session, loaded.rules, loaded.calendar, when, shard=tuple(shard))[1]
        ]
    assert len(whole) > 20  # the cluster's decisions are among them
    assert sorted(by_shard) == sorted(d.key for d in whole)


def cluster_keys(world, *case_ids) -> dict:
    with world.sessionmaker() as session:
        rows = session.execute(
            select(case_projection.c.case_id, case_projection.c.cluster_key).where(
                case_projection.c.case_id.in_(case_ids)
            )
        ).all()
    return dict(rows)


def test_clusters_are_kept_a_bridging_case_merges_two_and_a_closed_case_splits_none(world):
    world.case("A-1", title="海吉星市场交通拥堵", category="traffic", street="pinghu")
    world.case("B-1", title="布吉农批路口积水严重", category="traffic", street="pinghu")
    keys = cluster_keys(world, "A-1", "B-1")
    assert keys["A-1"] != keys["B-1"]  # not similar to each other
    world.case("C-1", title="海吉星市场交通拥堵，布吉农批路口积水严重", category="traffic", street="pinghu")
    keys = cluster_keys(world, "A-1", "B-1", "C-1")
    assert set(keys.values()) == {"cluster:traffic:pinghu:A-1"}  # named after its first case
    world.event("case_closed", "C-1")
    facts, _ = world.explain("A-1", "2026-09-30T09:00:00")
    assert facts["similar_unresolved_count"] == 2  # still one problem; the closed case stops counting
    world.event("case_needs_triage", "B-1", category="environment")  # reclassified: another cluster
    assert cluster_keys(world, "B-1")["B-1"] == "cluster:environment:pinghu:B-1"
    facts, _ = world.explain("A-1", "2026-09-30T09:00:00")
    assert facts["similar_unresolved_count"] == 1


def test_given_cases_are_read_with_the_counts_a_whole_pass_reads(world):
    # The evaluation after events reads only the cases given and counts their clusters apart
    # (evaluation._target_rows); what it reads of each must be what a whole pass reads of it.
    rng = random.Random(7)
    for i in range(24):
        street, title = rng.choice(["pinghu", "buji"]), rng.choice(HAIJIXING + ["布吉农批路口积水严重"])
        world.case(f"R-{i}", title=title, category="traffic", street=street, due="2026-12-31T23:59:59+08:00")
    closed = [f"R-{i}" for i in rng.sample(range(24), 7)]
    with world.sessionmaker.begin() as session:
        session.execute(update(case_projection).where(case_projection.c.case_id.in_(closed)).values(status="closed"))
    with world.sessionmaker() as session:
        whole = {row.case_id: row for row in evaluation._case_rows(session, true(), stream=False)}
        assert {row.similar for row in whole.values()} != {1}  # clusters of several, for the counts to mean something
        for _ in range(10):
            given = set(rng.sample(sorted(f"R-{i}" for i in range(24)), rng.randint(1, 12)))
            rows = list(evaluation._target_rows(session, given))
            assert rows == [row for row in whole.values() if row.case_id in given]


def test_an_incremental_pass_evaluates_only_the_clusters_changed_since_the_last(world):
    for i, title in enumerate(HAIJIXING[:3]):
        world.case(f"H-{i}", title=title, category="traffic", street="pinghu")
    world.case("L-1", title="丹竹头社区路灯不亮", category="traffic", street="pinghu")
    world.case("L-2", title="南湾街道垃圾清运不及时", category="traffic", street="pinghu")
    shard, when = ("pinghu", "traffic"), at("2026-10-19T09:00:00")

    def evaluated(changed_since):
        with world.sessionmaker() as session:
            return evaluation.evaluate(
                session, loaded.rules, loaded.calendar, when, shard=shard, changed_since=changed_since
            )[0]

    loaded = with_calendar(supervision_rules.load)(RULES_DIR)
    assert evaluated(None) == 5  # a whole pass
    after_first_pass = now()
    assert evaluated(after_first_pass) == 0  # nothing changed: nothing to evaluate
    world.event("referral_returned", "H-1", referral_id="H-1-R1", department="cgj", reason="x")
    assert evaluated(after_first_pass) == 3  # H-1's whole cluster (its count may matter to the others)
    world.event("case_closed", "L-2")
    assert evaluated(after_first_pass) == 3  # a closed case is not evaluated; its cluster has no other case


def test_a_shard_is_swept_whole_on_a_new_working_day_or_with_new_rules_and_incrementally_otherwise():
    calendar = with_calendar(supervision_rules.load)(RULES_DIR).calendar
    started = datetime(2026, 9, 30, 9, 0, tzinfo=CST)  # the Wednesday before National Day
    claim = sweeping.Claim("pinghu", "traffic", started, "2026-09-30", "v1")
    assert claim.changed_since(date(2026, 9, 30), "v1", calendar) == started - sweeping.OVERLAP
    assert claim.changed_since(date(2026, 10, 9), "v1", calendar) is None  # the working-day counts moved on
    assert claim.changed_since(date(2026, 9, 30), "v2", calendar) is None  # other rules may decide otherwise
    # 1–7 October are holidays: no count moves, so no whole pass (only what changed).
    assert claim.changed_since(date(2026, 10, 3), "v1", calendar) == started - sweeping.OVERLAP
    never = sweeping.Claim("pinghu", "traffic", None, None, None)
    assert never.changed_since(date(2026, 9, 30), "v1", calendar) is None


def test_an_event_twice_in_one_batch_counts_once(world, db):
    """At-least-once delivery may hand a batch the same event twice (a redelivered copy beside the
    original): it is projected once."""
    world.case("LG-2026-000700")
    returned = {
        "event_id": str(uuid.uuid4()),
        "event_type": "referral_returned",
        "occurred_at": at("2026-09-30T10:00:00").isoformat(),
        "case_id": "LG-2026-000700",
        "referral_id": "LG-2026-000700-R1",
        "department": "cgj",
        "reason": "不属于本单位职责",
    }
    settings = with_calendar(supervision_rules.load)(RULES_DIR).rules.settings
    with sessionmaker(db).begin() as session:
        assert projection.record_routing_events(session, [returned, dict(returned)], settings) == ["LG-2026-000700"]
    with sessionmaker(db)() as session:
        returns = session.scalar(select(case_projection.c.returns).where(case_projection.c.case_id == "LG-2026-000700"))
    assert returns == 1
