"""The routing service on RabbitMQ and PostgreSQL: cases arrive as events, departments work
through the HTTP API with their own keys, rule files reload while it runs."""

import shutil
import time

import pytest
import requests

from tests.conftest import wait_for
from tests.support import DEMO_DIRECTORY

pytestmark = pytest.mark.interface
RULES_DIR = DEMO_DIRECTORY.parent.parent / "rules"


@pytest.fixture
def stack(run_services, rpc, demo_directory, tmp_path, monkeypatch, service_config):
    rules = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules)
    monkeypatch.setenv("HUIYING_RULES_DIR", str(rules))  # read by services.common.config
    urls = run_services("intake", "routing")
    rpc.intake.load_directory(demo_directory)
    keys = {
        name: rpc.intake.create_credential(role, subject)["key"]
        for name, role, subject in [
            ("hotline", "source", "hotline-12345"),
            ("jtglj", "department", "jtglj"),
            ("jjdd", "department", "jjdd"),
            ("cgj", "department", "cgj"),
            ("staff", "staff", "office"),
        ]
    }

    class Stack:
        routing = urls["routing"]
        rules_dir = rules

        def auth(self, who):
            return {"Authorization": f"Bearer {keys[who]}"}

        def submit(self, external_id, **fields):
            case_id = rpc.intake.submit_case(
                {"source": "hotline-12345", "external_id": external_id, "title": "t", "description": "d"} | fields
            )["id"]
            wait_for(
                lambda: (
                    rpc.routing.get_case_routing(case_id)["status"] != "awaiting_routing"
                    if self.known(case_id)
                    else False
                )
            )
            return rpc.routing.get_case_routing(case_id)

        def known(self, case_id):
            try:
                rpc.routing.get_case_routing(case_id)
                return True
            except Exception:
                return False

    return Stack()


def test_a_received_case_is_referred_with_an_event(stack, event_tap):
    tap = event_tap("routing", "case_referred")
    case = stack.submit("R-1", title="海吉星市场周边交通拥堵", street="平湖")
    assert case["status"] == "referred"
    assert [(r["department"], r["lead"]) for r in case["referrals"]] == [("jtglj", True), ("jjdd", False)]
    [event] = tap.drain(expect=1)
    assert (
        event["case_id"] == case["case_id"] and event["referrals"][0]["department_name"] == "深圳市交通运输局龙岗管理局"
    )


def test_department_a_cannot_read_or_act_on_department_b(stack):
    case = stack.submit("R-2", title="海吉星市场周边交通拥堵", street="平湖")
    lead_id = case["referrals"][0]["id"]
    base = stack.routing + "/api/v1"
    assert requests.get(f"{base}/referrals").status_code == 401
    assert requests.get(f"{base}/referrals/{lead_id}", headers={"Authorization": "Bearer nope"}).status_code == 401

    other = stack.auth("cgj")
    assert requests.get(f"{base}/referrals/{lead_id}", headers=other).status_code == 404
    assert requests.get(f"{base}/referrals", headers=other).json() == {"referrals": []}
    assert requests.get(f"{base}/cases/{case['case_id']}", headers=other).status_code == 404
    for step, body in [
        ("accept", {}),
        ("reply", {"result": "x"}),
        ("return", {"reason": "x"}),
        ("extension", {"working_days": 2, "reason": "x"}),
    ]:
        response = requests.post(f"{base}/referrals/{lead_id}/{step}", json=body, headers=other)
        assert response.status_code == 404, step
    assert "jtglj" not in requests.get(f"{base}/referrals", headers=other).text

    own = requests.get(f"{base}/referrals", headers=stack.auth("jtglj")).json()["referrals"]
    assert [r["id"] for r in own] == [lead_id]
    co_view = requests.get(f"{base}/cases/{case['case_id']}", headers=stack.auth("jjdd")).json()
    assert [r["department"] for r in co_view["referrals"]] == ["jjdd"]  # not the lead's details
    staff = requests.get(f"{base}/referrals", headers=stack.auth("staff")).json()["referrals"]
    assert len(staff) == 2
    assert requests.get(f"{base}/triage", headers=stack.auth("jtglj")).status_code == 403
    assert (
        requests.post(
            f"{base}/referrals/{lead_id}/extension/decision", json={"grant": True}, headers=stack.auth("jtglj")
        ).status_code
        == 403
    )


def test_the_whole_lifecycle_over_http(stack, event_tap):
    taps = {
        t: event_tap("routing", t)
        for t in (
            "referral_accepted",
            "referral_replied",
            "feedback_received",
            "case_reopened",
            "case_closed",
            "extension_requested",
            "extension_granted",
        )
    }
    case = stack.submit("R-3", title="丹竹头社区路灯不亮", street="南湾")
    [referral] = case["referrals"]
    base, dept, staff = stack.routing + "/api/v1", stack.auth("cgj"), stack.auth("staff")
    url = f"{base}/referrals/{referral['id']}"

    assert requests.post(f"{url}/accept", headers=dept).json()["status"] == "accepted"
    asked = requests.post(f"{url}/extension", json={"working_days": 2, "reason": "等待供电局"}, headers=dept)
    assert asked.status_code == 200
    granted = requests.post(f"{url}/extension/decision", json={"grant": True}, headers=staff).json()
    assert granted["extension"] == "granted" and granted["due_at"] > referral["due_at"]
    bad = requests.post(f"{url}/reply", json={}, headers=dept)
    assert bad.status_code == 422 and bad.json()["error"]["details"][0]["field"] == "result"
    assert requests.post(f"{url}/reply", json={"result": "已修复路灯"}, headers=dept).json()["case_status"] == "replied"
    again = requests.post(f"{url}/reply", json={"result": "again"}, headers=dept)
    assert again.status_code == 409 and again.json()["error"]["code"] == "illegal_step"

    hotline = stack.auth("hotline")
    redo = requests.post(f"{base}/cases/{case['case_id']}/feedback", json={"rating": "不满意"}, headers=hotline).json()
    assert redo["status"] == "reopened"
    [second] = redo["referrals"]
    requests.post(f"{base}/referrals/{second['referral_id']}/reply", json={"result": "重新维修"}, headers=dept)
    closed = requests.post(f"{base}/cases/{case['case_id']}/feedback", json={"rating": "满意"}, headers=hotline)
    assert closed.json()["status"] == "closed"
    assert [
        len(taps[t].drain(expect=n))
        for t, n in [
            ("referral_accepted", 1),
            ("extension_requested", 1),
            ("extension_granted", 1),
            ("referral_replied", 2),
            ("feedback_received", 2),
            ("case_reopened", 1),
            ("case_closed", 1),
        ]
    ] == [1, 1, 1, 2, 2, 1, 1]


def test_triage_over_http(stack):
    case = stack.submit("R-4", title="你好", description="想咨询一件事")
    assert case["status"] == "triage"
    base, staff = stack.routing + "/api/v1", stack.auth("staff")
    listed = requests.get(f"{base}/triage", headers=staff).json()["cases"]
    assert [c["case_id"] for c in listed] == [case["case_id"]]
    bad = requests.post(f"{base}/triage/{case['case_id']}/route", json={"departments": ["nope"]}, headers=staff)
    assert bad.status_code == 422
    routed = requests.post(f"{base}/triage/{case['case_id']}/route", json={"departments": ["xfj"]}, headers=staff)
    assert routed.status_code == 200 and routed.json()["referrals"][0]["department"] == "xfj"
    assert requests.get(f"{base}/triage", headers=staff).json()["cases"] == []


def test_an_edited_rule_file_changes_routing_while_running_and_a_bad_one_is_refused(stack, rpc):
    assert stack.submit("R-5", title="路灯不亮", street="布吉")["referrals"][0]["department"] == "cgj"
    assign = stack.rules_dir / "routing" / "30-assign.yaml"
    good = assign.read_text(encoding="utf-8")
    assign.write_text(
        good.replace("- refer_to: {department: cgj, lead: true}", "- refer_to: {department: zjj, lead: true}", 1),
        encoding="utf-8",
    )
    status = rpc.routing.reload_rules()
    assert status["problems"] == []
    assert stack.submit("R-6", title="路灯不亮", street="布吉")["referrals"][0]["department"] == "zjj"

    assign.write_text(
        assign.read_text(encoding="utf-8").replace(
            "when: {fact: category, eq: traffic}", "when: {fact: colour, eq: traffic}"
        ),
        encoding="utf-8",
    )
    refused = rpc.routing.reload_rules()
    assert refused["version"] == status["version"]
    assert any("30-assign.yaml:" in p and "unknown fact 'colour'" in p for p in refused["problems"])
    assert stack.submit("R-7", title="路灯不亮", street="布吉")["referrals"][0]["department"] == "zjj"

    assign.write_text(good, encoding="utf-8")  # the timer notices a fixed file by itself
    deadline = time.monotonic() + 10
    while rpc.routing.rules_status()["version"] == status["version"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stack.submit("R-8", title="路灯不亮", street="布吉")["referrals"][0]["department"] == "cgj"
