"""Supervision running beside intake and routing: sweeps from the CLI at a moved clock, the agenda,
explain, simulate, reload with a bad file, and two replicas sweeping at once."""

import json
import shutil

import eventlet
import pytest
from click.testing import CliRunner
from nameko.testing.services import entrypoint_hook

from huiying.cli import main
from tests.conftest import wait_for, wait_supervised
from tests.support import DEMO_DIRECTORY

pytestmark = pytest.mark.interface
RULES_DIR = DEMO_DIRECTORY.parent.parent / "rules"
LATER = "2027-03-01T09:00:00+08:00"  # every 2026 deadline long past


@pytest.fixture
def env(run_services, rabbit_config, monkeypatch, tmp_path, rpc):
    rules = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules)
    monkeypatch.setenv("HUIYING_RULES_DIR", str(rules))
    monkeypatch.setenv("AMQP_URI", rabbit_config["AMQP_URI"])
    run_services("intake", "routing", "supervision")
    runner = CliRunner()

    def cli(*args, ok=True):
        result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    cli("directory", "load", DEMO_DIRECTORY)

    def submit(external_id, title, street="平湖", **extra):
        case_id = rpc.intake.submit_case(
            {
                "source": "hotline-12345",
                "external_id": external_id,
                "title": title,
                "description": "群众反映",
                "street": street,
                **extra,
            }
        )["id"]
        wait_supervised(rpc, case_id)
        return case_id

    return cli, submit, rules


def test_a_sweep_at_a_later_time_escalates_once_and_the_agenda_moves_on(env):
    cli, submit, _ = env
    case_id = submit("S-1", "丹竹头社区路灯不亮", street="南湾")
    first = json.loads(cli("sweep", "--now", LATER, "--json").stdout)
    assert {(d["rule_id"], d["action"]) for d in first["decisions"]} == {
        ("overdue-5-working-days", "add_to_agenda"),
        ("overdue-5-working-days", "open_joint_supervision"),
        ("overdue-5-working-days", "alert_supervisors"),
    }
    again = json.loads(cli("sweep", "--now", LATER, "--json").stdout)
    assert again["decisions"] == [] and again["repeated"] == 3

    items = json.loads(cli("agenda", "list", "--json").stdout)
    assert sorted(i["kind"] for i in items) == ["agenda", "joint_supervision"]
    assert all(i["case_ids"] == [case_id] and i["rule_id"] == "overdue-5-working-days" for i in items)
    item = next(i for i in items if i["kind"] == "agenda")["id"]
    skip = cli("agenda", "advance", item, "--to", "concluded", "--findings", "x", ok=False)
    assert skip.exit_code == 1 and "next step is scheduled" in skip.stderr
    cli("agenda", "advance", item, "--to", "scheduled", "--date", "2027-03-15")
    cli("agenda", "advance", item, "--to", "under_supervision")
    no_findings = cli("agenda", "advance", item, "--to", "concluded", ok=False)
    assert no_findings.exit_code == 1 and "findings" in no_findings.stderr
    done = json.loads(cli("agenda", "advance", item, "--to", "concluded", "--findings", "已全部修复", "--json").stdout)
    assert done["status"] == "concluded" and [h["status"] for h in done["history"]] == [
        "proposed",
        "scheduled",
        "under_supervision",
        "concluded",
    ]

    record = json.loads(cli("case", "show", case_id, "--json").stdout)
    assert {(e["action"], e["rule_id"]) for e in record["escalations"]} == {
        ("add_to_agenda", "overdue-5-working-days"),
        ("open_joint_supervision", "overdue-5-working-days"),
        ("alert_supervisors", "overdue-5-working-days"),
    }
    assert all(len(e["ruleset_version"]) == 12 for e in record["escalations"])


def test_explain_and_simulate_change_nothing(env):
    cli, submit, rules = env
    case_id = submit("S-2", "丹竹头社区路灯不亮", street="南湾")
    explained = json.loads(cli("rules", "explain", case_id, "--now", "2026-12-01T09:00:00+08:00", "--json").stdout)
    by_rule = {r["rule_id"]: r for r in explained["rules"]}
    assert explained["ruleset_version"] and not by_rule["returned-twice"]["matched"]
    assert by_rule["returned-twice"]["failed_conditions"] == ["returns ge 2 (is 0)"]

    candidate = rules.parent / "candidate"
    shutil.copytree(rules, candidate)
    policy = candidate / "supervision" / "10-escalation.yaml"
    policy.write_text(
        policy.read_text(encoding="utf-8").replace(
            "{fact: working_days_overdue, ge: 5}", "{fact: working_days_overdue, ge: 500}"
        ),
        encoding="utf-8",
    )
    simulated = json.loads(cli("rules", "simulate", "--now", LATER, "--rules", candidate, "--json").stdout)
    assert simulated["added"] == []
    assert {d["action"] for d in simulated["removed"]} == {
        "add_to_agenda",
        "open_joint_supervision",
        "alert_supervisors",
    }
    assert json.loads(cli("agenda", "list", "--json").stdout) == []  # the dry run changed nothing


def test_a_bad_rule_file_is_refused_at_file_and_line_and_the_old_rules_keep_deciding(env):
    cli, submit, rules = env
    escalation_file = rules / "supervision" / "10-escalation.yaml"
    good = escalation_file.read_text(encoding="utf-8")
    lines = good.splitlines()
    target = next(i for i, line in enumerate(lines) if "{fact: returns, ge: 2}" in line)
    lines[target] = lines[target].replace("{fact: returns, ge: 2}", "{fact: returns, matches: '('}")
    escalation_file.write_text("\n".join(lines) + "\n", encoding="utf-8")

    check = cli("rules", "check", rules, ok=False)
    assert check.exit_code == 1
    assert f"10-escalation.yaml:{target + 1}: rule returned-twice: operator 'matches' does not apply" in check.stderr
    reload = cli("rules", "reload", "--json", ok=False)
    assert reload.exit_code == 1
    assert json.loads(reload.stdout)["supervision"]["problems"]

    case_id = submit("S-3", "丹竹头社区路灯不亮", street="南湾")
    swept = json.loads(cli("sweep", "--now", LATER, "--json").stdout)  # the last good rules decide
    assert {d["case_ids"][0] for d in swept["decisions"]} == {case_id}
    escalation_file.write_text(good, encoding="utf-8")
    cli("rules", "reload")
    versions = json.loads(cli("rules", "versions", "--json").stdout)
    assert len(versions) >= 1 and versions[0]["changes"]["first"] is True


def test_rules_test_from_the_cli(env):
    cli, _, rules = env
    result = cli("rules", "test", rules)
    assert result.stdout.strip().endswith("16 passed, 0 failed")
    broken = rules / "supervision" / "10-escalation.test.yaml"
    broken.write_text(
        broken.read_text(encoding="utf-8").replace("fires: [returned-twice]", "fires: []"), encoding="utf-8"
    )
    failed = cli("rules", "test", rules, ok=False)
    assert failed.exit_code == 1 and "15 passed, 1 failed" in failed.stdout


def test_two_replicas_sweeping_at_once_escalate_once(env, runner_factory, service_config, rpc):
    from services.supervision.service import SupervisionService

    cli, submit, _ = env
    for i, title in enumerate(
        [
            "海吉星市场周边交通拥堵",
            "海吉星市场货车占道拥堵",
            "海吉星市场门口交通拥堵严重",
            "白坭坑海吉星市场拥堵",
            "海吉星市场早高峰拥堵",
        ]
    ):
        submit(f"S-H{i}", title)
    replicas = []
    for _ in range(2):
        runner = runner_factory(service_config("supervision"), SupervisionService)
        runner.start()
        replicas.append(list(runner.containers)[0])

    def sweep(container):
        with entrypoint_hook(container, "sweep") as hook:
            return hook(LATER)

    results = [thread.wait() for thread in [eventlet.spawn(sweep, c) for c in replicas]]
    taken = [(d["rule_id"], d["action"], tuple(d["case_ids"])) for r in results for d in r["decisions"]]
    assert len(taken) == len(set(taken))  # each decision taken by one replica only
    overdue = [t for t in taken if t[0] == "overdue-5-working-days"]
    assert len(overdue) == 15  # 5 overdue cases × 3 actions
    # The cluster's item is made by whichever evaluation sees the fifth case first: an event's or a sweep's.
    assert len(taken) - len(overdue) <= 1
    items = json.loads(cli("agenda", "list", "--json").stdout)
    cluster_items = [i for i in items if i["rule_id"] == "similar-cases-5"]
    assert len(cluster_items) == 1 and len(cluster_items[0]["case_ids"]) == 5


def test_default_rules_on_cases_walked_through_routing(env, rpc):
    """Returns, ratings, reach and deadlines produced by routing itself, not by hand-made events."""
    cli, submit, _ = env

    def escalations(case_id):
        return {
            (e["rule_id"], e["action"])
            for e in json.loads(cli("case", "show", case_id, "--json").stdout)["escalations"]
        }

    # Returned twice (退单): each department says "not ours" until the case lands on triage.
    ping_pong = submit("W-1", "海吉星市场周边交通拥堵")
    for _ in range(2):
        lead = next(r for r in rpc.routing.list_referrals("referred", None, ping_pong) if r["lead"])
        rpc.routing.referral_step(lead["id"], "return", {"reason": "不属于本部门职责"})
    wait_for(lambda: ("returned-twice", "add_to_agenda") in escalations(ping_pong), timeout=15)

    # Rated unsatisfied twice: reply, 不满意, redo, reply, 不满意.
    unhappy = submit("W-2", "丹竹头社区路灯不亮", street="南湾")
    for _ in range(2):
        for referral in rpc.routing.list_referrals("referred", None, unhappy):
            rpc.routing.referral_step(referral["id"], "reply", {"result": "已处理"})
        wait_for(lambda: rpc.routing.get_case_routing(unhappy)["status"] == "replied")
        rpc.routing.record_feedback(unhappy, "不满意")
    wait_for(lambda: ("unsatisfied-twice", "add_to_agenda") in escalations(unhappy), timeout=15)
    assert ("returned-twice", "add_to_agenda") not in escalations(unhappy)

    # Three departments, unresolved: a special inspection 20 working days after the referral.
    wide = rpc.intake.submit_case(
        {
            "source": "hotline-12345",
            "external_id": "W-3",
            "title": "你好",
            "description": "布吉街道某片区综合问题",
            "street": "布吉",
        }
    )["id"]
    wait_for(lambda: any(c["case_id"] == wide for c in rpc.routing.list_triage()))  # no rule routes it
    rpc.routing.route_triaged_case(wide, ["gxzbj", "wgltj", "cgj"], "gxzbj")  # staff name three departments
    wait_for(lambda: len(json.loads(cli("case", "show", wide, "--json").stdout)["referrals"]) == 3)
    referred_on = json.loads(cli("case", "show", wide, "--json").stdout)["referrals"][0]["referred_at"][:10]
    from datetime import date

    from services.common.workdays import WorkingCalendar

    calendar = WorkingCalendar.from_file(RULES_DIR / "calendar" / "holidays.yaml")
    day_19 = calendar.add_working_days(date.fromisoformat(referred_on), 19)
    day_20 = calendar.add_working_days(date.fromisoformat(referred_on), 20)
    cli("sweep", "--now", f"{day_19}T09:00:00+08:00")
    assert ("wide-ranging-unresolved", "trigger_special_inspection") not in escalations(wide)
    cli("sweep", "--now", f"{day_20}T09:00:00+08:00")
    assert ("wide-ranging-unresolved", "trigger_special_inspection") in escalations(wide)

    # The reminder: one working day before the deadline, once.
    due = date.fromisoformat(json.loads(cli("case", "show", wide, "--json").stdout)["referrals"][0]["due_at"][:10])
    day_before = next(
        d
        for d in (date.fromordinal(due.toordinal() - n) for n in range(1, 10))
        if calendar.working_days_between(d, due) == 1
    )
    first = json.loads(cli("sweep", "--now", f"{day_before}T09:00:00+08:00", "--json").stdout)
    assert ("remind-before-deadline", "remind_department", (wide,)) in {
        (d["rule_id"], d["action"], tuple(d["case_ids"])) for d in first["decisions"]
    }
    again = json.loads(cli("sweep", "--now", f"{day_before}T17:00:00+08:00", "--json").stdout)
    assert all(d["action"] != "remind_department" or d["case_ids"] != [wide] for d in again["decisions"])
