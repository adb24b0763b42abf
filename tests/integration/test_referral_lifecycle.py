"""The referral lifecycle on a real database with the real rule files and the official calendar,
the clock set by the test (routing's functions take "now" from their context)."""

import shutil
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from services.common.http import Conflict, Forbidden, NotFound, ValidationFailed
from services.common.timeutil import CST
from services.common.workdays import WorkingCalendar
from services.routing import referrals
from services.routing import rules as routing_rules
from services.routing.models import outbox
from tests.support import DEMO_DIRECTORY

RULES_DIR = DEMO_DIRECTORY.parent.parent / "rules"
STAFF = {"role": "staff", "subject": "office"}


def dept(code):
    return {"role": "department", "subject": code}


@pytest.fixture
def world(db):
    import yaml

    directory = yaml.safe_load(DEMO_DIRECTORY.read_text(encoding="utf-8"))
    names = {d["code"]: d["name"] for d in directory["departments"]}
    rules = routing_rules.load(RULES_DIR)
    calendar = WorkingCalendar.from_file(RULES_DIR / "calendar" / "holidays.yaml")
    sessions = sessionmaker(db)

    class World:
        clock = datetime(2026, 9, 29, 10, 0, tzinfo=CST)  # a Tuesday before the National Day holiday

        def ctx(self, rules_override=None):
            return referrals.Context(rules_override or rules, calendar, names, self.clock)

        def run(self, function, *args, rules_override=None):
            with sessions.begin() as session:
                return function(session, self.ctx(rules_override), *args)

        def receive(self, case_id, **fields):
            event = {
                "case_id": case_id,
                "source": "hotline-12345",
                "channel": "amqp",
                "title": "t",
                "description": "d",
                "received_at": self.clock.isoformat(),
            } | fields
            with sessions.begin() as session:
                referrals.record_case(session, event, self.clock)
                return referrals.route(session, self.ctx(), case_id)

        def events(self, event_type=None):
            with sessions() as session:
                rows = session.execute(select(outbox.c.event_type, outbox.c.payload).order_by(outbox.c.id)).all()
            return [p for t, p in rows if event_type in (None, t)]

        def view(self, case_id):
            with sessions() as session:
                return referrals.case_view(session, case_id, STAFF, names)

    return World()


def test_a_12345_ticket_is_due_in_5_working_days_across_national_day(world):
    routed = world.receive("LG-2026-000001", title="丹竹头社区路灯不亮", description="一周没有路灯", street="nanwan")
    [referral] = routed["referrals"]
    assert referral["department"] == "cgj" and referral["lead"]
    # 30 Sep (1); 1–7 Oct holiday; 8 Oct (2), 9 Oct (3), Saturday 10 Oct is a 调休 working day (4),
    # Sunday 11 Oct is off, Monday 12 Oct (5).
    assert referral["due_at"] == "2026-10-12T23:59:59+08:00"
    assert referral["return_by"] == "2026-10-08T23:59:59+08:00"  # 2 working days
    [event] = world.events("case_referred")
    assert event["rule_ids"] == [
        "classify-urban-management",
        "kind-hotline-referral",
        "assign-urban-management",
        "deadline-hotline",
    ]
    assert event["calendar"] == "chinese-calendar"


def test_a_deadline_in_a_year_the_calendar_package_lacks_uses_the_fallback(world, caplog):
    world.clock = datetime(2026, 12, 29, 9, 0, tzinfo=CST)
    routed = world.receive("LG-2026-000002", title="路灯", street="buji")
    # 30, 31 Dec (1, 2); 1 Jan 2027 is a holiday in rules/calendar/holidays.yaml; 4, 5, 6 Jan (3–5).
    assert routed["referrals"][0]["due_at"] == "2027-01-06T23:59:59+08:00"
    assert world.events("case_referred")[0]["calendar"] == "rules/calendar/holidays.yaml"
    assert "not published in chinese-calendar" in caplog.text


def test_a_proposal_is_due_three_months_after_assignment(world):
    routed = world.receive(
        "LG-2026-000003",
        kind="proposal",
        source="member-m001",
        title="关于优化公交线路的提案",
        description="延伸公交线路",
    )
    assert routed["referrals"][0]["department"] == "jtglj"
    assert routed["referrals"][0]["due_at"] == "2026-12-29T23:59:59+08:00"


def test_the_lead_returns_within_the_window_and_the_case_is_rerouted_then_triaged(world):
    routed = world.receive("LG-2026-000004", title="海吉星市场周边交通拥堵", street="pinghu")
    lead, co = routed["referrals"]
    assert (lead["department"], co["department"]) == ("jtglj", "jjdd")

    with pytest.raises(ValidationFailed):
        world.run(referrals.return_referral, dept("jtglj"), lead["referral_id"], " ")
    outcome = world.run(referrals.return_referral, dept("jtglj"), lead["referral_id"], "属于交警职责")
    [rerouted] = outcome["case"]["referrals"]
    assert rerouted["department"] == "jjdd" and rerouted["lead"]  # never back to jtglj
    statuses = {r["id"]: r["status"] for r in world.view("LG-2026-000004")["referrals"]}
    assert statuses == {
        lead["referral_id"]: "returned",
        co["referral_id"]: "superseded",
        rerouted["referral_id"]: "referred",
    }

    # returned twice (退单): nobody left for traffic → the triage list, never a guess
    world.run(referrals.return_referral, dept("jjdd"), rerouted["referral_id"], "属于交通运输局职责")
    assert world.view("LG-2026-000004")["status"] == "triage"
    [listed] = world.run(lambda session, ctx: referrals.triage_list(session))
    assert listed["case_id"] == "LG-2026-000004" and "returned by jtglj, jjdd" in listed["reason"]
    assert [e["returns"] for e in world.events("referral_returned")] == [1, 2]

    with pytest.raises(Forbidden):
        world.run(referrals.route_from_triage, dept("jjdd"), "LG-2026-000004", ["gws"], None)
    routed = world.run(referrals.route_from_triage, STAFF, "LG-2026-000004", ["gws", "jjdd"], "gws")
    assert [r["department"] for r in routed["referrals"]] == ["gws", "jjdd"]
    assert world.view("LG-2026-000004")["status"] == "referred"


def test_returning_after_the_window_is_refused(world):
    routed = world.receive("LG-2026-000005", title="路灯", street="buji")
    world.clock += timedelta(days=10)
    with pytest.raises(Conflict, match="return window"):
        world.run(referrals.return_referral, dept("cgj"), routed["referrals"][0]["referral_id"], "不是我们的")


def test_extension_granted_then_refused_then_too_late(world):
    routed = world.receive("LG-2026-000006", title="路灯", street="buji")
    referral_id = routed["referrals"][0]["referral_id"]
    with pytest.raises(ValidationFailed, match="1 to 10"):
        world.run(referrals.request_extension, dept("cgj"), referral_id, 11, "施工")
    world.run(referrals.request_extension, dept("cgj"), referral_id, 3, "需要协调供电局")
    with pytest.raises(Conflict, match="already"):
        world.run(referrals.request_extension, dept("cgj"), referral_id, 3, "again")
    with pytest.raises(Forbidden):
        world.run(referrals.decide_extension, dept("cgj"), referral_id, True, None)
    granted = world.run(referrals.decide_extension, STAFF, referral_id, True, "同意")
    assert granted["due_at"] == "2026-10-15T23:59:59+08:00"  # 12 Oct + 3 working days

    world.run(referrals.request_extension, dept("cgj"), referral_id, 2, "还需要时间")
    refused = world.run(referrals.decide_extension, STAFF, referral_id, False, "不同意")
    assert refused["due_at"] == "2026-10-15T23:59:59+08:00"

    world.clock = datetime(2026, 10, 16, 9, 0, tzinfo=CST)
    with pytest.raises(Conflict, match="deadline .* passed"):
        world.run(referrals.request_extension, dept("cgj"), referral_id, 2, "late")
    assert [e["working_days"] for e in world.events("extension_granted")] == [3]
    assert len(world.events("extension_refused")) == 1


def test_reply_then_unsatisfied_feedback_reopens_for_redo_then_satisfied_closes(world):
    routed = world.receive("LG-2026-000007", title="海吉星市场周边交通拥堵", street="pinghu")
    lead, co = (r["referral_id"] for r in routed["referrals"])
    with pytest.raises(Conflict, match="feedback is given on a replied case"):
        world.run(referrals.feedback, STAFF, "LG-2026-000007", "满意")
    world.run(referrals.accept, dept("jtglj"), lead)
    with pytest.raises(Conflict):
        world.run(referrals.accept, dept("jtglj"), lead)
    assert world.run(referrals.reply, dept("jtglj"), lead, "已增设信号灯")["case_status"] == "referred"
    assert world.run(referrals.reply, dept("jjdd"), co, "已加派警力")["case_status"] == "replied"
    with pytest.raises(ValidationFailed):
        world.run(referrals.feedback, STAFF, "LG-2026-000007", "还行")

    world.clock += timedelta(days=1)
    redo = world.run(referrals.feedback, STAFF, "LG-2026-000007", "不满意")
    assert redo["status"] == "reopened"
    assert [(r["department"], r["lead"]) for r in redo["referrals"]] == [("jtglj", True), ("jjdd", False)]
    assert world.events("case_referred")[-1]["rule_ids"][-1] == "deadline-redo"
    assert world.events("case_reopened")[0]["reopen_count"] == 1
    view = world.view("LG-2026-000007")
    assert view["status"] == "referred" and view["reopen_count"] == 1
    assert {r["round"] for r in view["referrals"]} == {1, 2}

    for r in redo["referrals"]:
        world.run(referrals.reply, dept(r["department"]), r["referral_id"], "重办完成")
    assert (
        world.run(referrals.feedback, {"role": "source", "subject": "hotline-12345"}, "LG-2026-000007", "基本满意")[
            "status"
        ]
        == "closed"
    )
    assert [e["rating"] for e in world.events("feedback_received")] == ["不满意", "基本满意"]
    assert len(world.events("case_closed")) == 1


def test_a_reply_to_a_returned_referral_is_an_illegal_step(world):
    routed = world.receive("LG-2026-000008", title="路灯", street="buji")
    referral_id = routed["referrals"][0]["referral_id"]
    world.run(referrals.return_referral, dept("cgj"), referral_id, "不属于本部门")
    with pytest.raises(Conflict, match="is returned"):
        world.run(referrals.reply, dept("cgj"), referral_id, "done")


def test_departments_see_and_act_on_their_own_referrals_only(world):
    routed = world.receive("LG-2026-000009", title="路灯", street="buji")
    referral_id = routed["referrals"][0]["referral_id"]
    for step, args in [
        (referrals.accept, ()),
        (referrals.reply, ("x",)),
        (referrals.return_referral, ("x",)),
        (referrals.request_extension, (2, "x")),
    ]:
        with pytest.raises(NotFound):
            world.run(step, dept("jtglj"), referral_id, *args)
    with pytest.raises(NotFound):
        world.run(lambda s, c: referrals.case_view(s, "LG-2026-000009", dept("jtglj"), {}))
    assert world.run(lambda s, c: referrals.list_referrals(s, dept("jtglj"), {})) == []
    assert len(world.run(lambda s, c: referrals.list_referrals(s, dept("cgj"), {}))) == 1


def test_a_case_no_rule_can_route_goes_to_triage(world):
    routed = world.receive("LG-2026-000010", title="你好", description="想咨询一件事")
    assert routed == {"case_id": "LG-2026-000010", "status": "triage", "reason": "no rule assigns a department"}
    assert world.events("case_needs_triage")[0]["case_id"] == "LG-2026-000010"


def test_editing_a_rule_file_changes_routing_with_no_code_change(world, tmp_path):
    copy = tmp_path / "rules"
    shutil.copytree(RULES_DIR, copy)
    assign = copy / "routing" / "30-assign.yaml"
    assign.write_text(
        assign.read_text(encoding="utf-8")
        .replace(
            "- refer_to: {department: cgj, lead: true}",
            "- refer_to: {department: jsj, lead: true}\n  - refer_to: {department: zjj}",
            1,
        )
        .replace("department: jsj", "department: swj"),
        encoding="utf-8",
    )
    edited = routing_rules.load(copy)
    assert edited.version != routing_rules.load(RULES_DIR).version
    with world_session(world) as run:
        routed = run("LG-2026-000011", edited)
    assert [r["department"] for r in routed["referrals"]] == ["swj", "zjj"]


class world_session:
    def __init__(self, world):
        self.world = world

    def __enter__(self):
        def run(case_id, rules):
            event = {
                "case_id": case_id,
                "source": "hotline-12345",
                "title": "路灯不亮",
                "description": "d",
                "street": "buji",
                "received_at": self.world.clock.isoformat(),
            }

            def step(session, ctx):
                referrals.record_case(session, event, ctx.now)
                return referrals.route(session, ctx, case_id)

            return self.world.run(step, rules_override=rules)

        return run

    def __exit__(self, *exc):
        return False


def test_a_batch_of_received_cases_is_stored_routed_once_and_a_redelivered_one_changes_nothing(world):
    """``record_and_route_new_cases``, as routing's handler calls it: each new case written once,
    already referred or on the triage list; a case stored before (a redelivered event) and the
    second event of a case in the batch make no referral and no event."""

    def received(case_id, title, description):
        return {
            "case_id": case_id,
            "source": "hotline-12345",
            "channel": "amqp",
            "title": title,
            "description": description,
            "street": "nanwan",
            "received_at": world.clock.isoformat(),
        }

    lamp = received("LG-2026-000020", "丹竹头社区路灯不亮", "一周没有路灯")
    question = received("LG-2026-000021", "你好", "想咨询一件事")
    world.run(lambda session, ctx: referrals.record_and_route_new_cases(session, ctx, [lamp]))
    first_events = world.events()
    world.clock += timedelta(hours=1)
    batch = [lamp, question, dict(question, title="重复的事件")]  # lamp again: a redelivery
    world.run(lambda session, ctx: referrals.record_and_route_new_cases(session, ctx, batch))

    events = world.events()
    assert events[: len(first_events)] == first_events
    assert [(e["case_id"], "referrals" in e) for e in events] == [("LG-2026-000020", True), ("LG-2026-000021", False)]
    lamp_view, question_view = world.view("LG-2026-000020"), world.view("LG-2026-000021")
    assert (lamp_view["status"], lamp_view["lead_department"], len(lamp_view["referrals"])) == ("referred", "cgj", 1)
    assert lamp_view["decision"]["rule_ids"][0] == "classify-urban-management"
    assert (question_view["status"], question_view["triage_reason"]) == ("triage", "no rule assigns a department")
    assert question_view["referrals"] == [] and question_view["decision"]["rule_ids"] is not None
