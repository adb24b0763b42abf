"""intake → routing → supervision: the whole-process record a case leaves, driven from the CLI."""

import json

import pytest
from click.testing import CliRunner

from huiying.cli import main
from services.supervision.projection import ROUTING_EVENTS
from services.supervision.service import SupervisionService
from tests.conftest import wait_for
from tests.support import DEMO_DIRECTORY

pytestmark = pytest.mark.interface


@pytest.fixture
def cli(run_services, rabbit_config, monkeypatch):
    run_services("intake", "routing", "supervision")
    monkeypatch.setenv("AMQP_URI", rabbit_config["AMQP_URI"])
    runner = CliRunner()

    def invoke(*args, ok=True):
        result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    invoke("directory", "load", DEMO_DIRECTORY)
    return invoke


def record(cli, case_id, until):
    def shown():
        outcome = cli("case", "show", case_id, "--json", ok=False)
        if outcome.exit_code != 0:
            return None
        document = json.loads(outcome.stdout)
        return document if until(document) else None

    return wait_for(shown, timeout=15)


def test_supervision_listens_to_every_routing_event():
    handled = {entry.event_type for entry in getattr(SupervisionService.on_routing_event, "nameko_entrypoints")}
    assert handled == set(ROUTING_EVENTS)


def test_a_case_from_receipt_to_redo_and_closure(cli, rpc):
    submitted = json.loads(
        cli(
            "submit",
            "--source",
            "hotline-12345",
            "--external-id",
            "W-1",
            "--title",
            "海吉星市场周边交通拥堵",
            "--description",
            "白坭坑片区早高峰拥堵",
            "--street",
            "平湖",
            "--json",
        ).stdout
    )
    case_id = submitted["id"]
    first = record(cli, case_id, lambda r: len(r["referrals"]) == 2)
    at_intake = wait_for(lambda: (c := rpc.intake.get_case(case_id))["status"] == "referred" and c)
    assert at_intake["agency_responsible"] == "深圳市交通运输局龙岗管理局"
    assert at_intake["expected_at"] == first["referrals"][0]["due_at"]
    assert [(r["department"], r["lead"], r["status"]) for r in first["referrals"]] == [
        ("jtglj", True, "referred"),
        ("jjdd", False, "referred"),
    ]
    assert first["status"] == "referred" and first["category"] == "traffic" and first["kind"] == "referral"

    listed = json.loads(cli("referral", "list", "--case", case_id, "--json").stdout)
    lead, co = listed[0]["id"], listed[1]["id"]
    cli("referral", "accept", lead)
    cli("referral", "extend", lead, "--days", "3", "--reason", "需协调市场方")
    cli("referral", "decide", lead, "--grant")
    late = cli("referral", "extend", lead, "--days", "99", "--reason", "x", ok=False)
    assert late.exit_code == 1 and "working_days" in late.stderr
    cli("referral", "reply", lead, "--result", "已增设人车分流设施")
    cli("referral", "reply", co, "--result", "高峰期加派警力")
    cli("feedback", case_id, "--rating", "不满意")
    redone = record(cli, case_id, lambda r: len(r["referrals"]) == 4)
    assert redone["reopen_count"] == 1 and {r["round"] for r in redone["referrals"]} == {1, 2}
    for referral in json.loads(cli("referral", "list", "--case", case_id, "--status", "referred", "--json").stdout):
        cli("referral", "reply", referral["id"], "--result", "重办完成")
    cli("feedback", case_id, "--rating", "满意")

    # routing's feedback_received and case_closed reach supervision through two queues
    final = record(cli, case_id, lambda r: r["status"] == "closed" and r["last_rating"] == "满意")
    events = [step["event"] for step in final["timeline"]]
    assert events[0] == "case_received" and events[-1] == "case_closed"
    for expected in (
        "case_referred",
        "referral_accepted",
        "extension_requested",
        "extension_granted",
        "referral_replied",
        "feedback_received",
        "case_reopened",
    ):
        assert expected in events
    assert final["extensions"] == 1 and final["last_rating"] == "满意"
    closed = wait_for(lambda: (c := rpc.intake.get_case(case_id))["status"] == "closed" and c)
    assert closed["status_notes"] == "已办结（评价：满意）"
    human = cli("case", "show", case_id).stdout
    assert "深圳市交通运输局龙岗管理局" in human and "case_closed" in human


def test_triage_from_the_cli(cli):
    case_id = json.loads(
        cli(
            "submit",
            "--source",
            "ws-buji",
            "--external-id",
            "W-2",
            "--title",
            "你好",
            "--description",
            "想咨询一件事",
            "--json",
        ).stdout
    )["id"]
    wait_for(lambda: any(c["case_id"] == case_id for c in json.loads(cli("triage", "list", "--json").stdout)))
    routed = json.loads(cli("triage", "route", case_id, "--department", "xfj", "--json").stdout)
    assert routed["referrals"][0]["department"] == "xfj"
    record(cli, case_id, lambda r: r["status"] == "referred")
    unknown = cli("triage", "route", case_id, "--department", "xfj", ok=False)
    assert unknown.exit_code == 1 and "not on the triage list" in unknown.stderr


def test_rules_reload_from_the_cli(cli):
    status = json.loads(cli("rules", "reload", "--json").stdout)
    assert status["routing"]["problems"] == [] and len(status["routing"]["version"]) == 12
