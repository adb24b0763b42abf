"""The supervision board over HTTP: the staff login, the figures' JSON API against what was done
to the cases, the XLSX form against the API, and the pages' bad input."""

from io import BytesIO

import pytest
import requests

from tests.conftest import wait_for, wait_routed
from tests.support import DEMO_DIRECTORY

pytestmark = pytest.mark.interface


@pytest.fixture
def board(run_services, rpc):
    import yaml

    urls = run_services("intake", "routing", "supervision")
    rpc.intake.load_directory(yaml.safe_load(DEMO_DIRECTORY.read_text(encoding="utf-8")))
    staff = rpc.intake.create_credential("staff", "王秘书")["key"]
    department = rpc.intake.create_credential("department", "chengguan")["key"]
    return urls["supervision"], staff, department


def submit(rpc, external_id, title, street):
    case_id = rpc.intake.submit_case(
        {"source": "hotline-12345", "external_id": external_id, "title": title, "description": title, "street": street}
    )["id"]
    wait_routed(rpc, case_id)
    return case_id


def test_the_board_is_behind_a_staff_login(board):
    url, staff, department = board
    browser = requests.Session()
    first = browser.get(f"{url}/board/agenda", allow_redirects=False)
    assert first.status_code == 303 and first.headers["Location"].startswith("/board/login?next=%2Fboard%2Fagenda")
    refused = browser.post(f"{url}/board/login", data={"key": department, "next": "/board/agenda"})
    assert refused.status_code == 401 and "not a valid staff key" in refused.text
    assert "huiying_board" not in browser.cookies
    signed_in = browser.post(
        f"{url}/board/login", data={"key": staff, "next": "https://evil.example/"}, allow_redirects=False
    )
    assert signed_in.status_code == 303 and signed_in.headers["Location"] == "/board/"  # no open redirect
    page = browser.get(f"{url}/board/agenda")
    assert page.status_code == 200 and "民主监督议题" in page.text
    assert "Supervision agenda" in browser.get(f"{url}/board/agenda?lang=en").text
    assert "Supervision agenda" in browser.get(f"{url}/board/agenda").text  # the choice is remembered
    tampered = requests.get(
        f"{url}/board/", cookies={"huiying_board": "x" + browser.cookies["huiying_board"]}, allow_redirects=False
    )
    assert tampered.status_code == 303
    browser.post(f"{url}/board/logout")
    assert browser.get(f"{url}/board/", allow_redirects=False).status_code == 303
    assert requests.get(f"{url}/api/v1/board/overview").status_code == 401
    as_department = requests.get(f"{url}/api/v1/board/overview", headers={"Authorization": f"Bearer {department}"})
    assert as_department.status_code == 403


def test_the_rates_count_what_departments_did_and_the_xlsx_says_the_same(
    board, rpc, rabbit_config, monkeypatch, tmp_path
):
    import json

    from click.testing import CliRunner
    from openpyxl import load_workbook

    from huiying.cli import main

    url, staff, _ = board
    headers = {"Authorization": f"Bearer {staff}"}
    answered = submit(rpc, "B-1", "龙岗大道路灯不亮", "龙城")
    redone = submit(rpc, "B-2", "龙岗大道路灯又坏了", "龙城")
    untouched = submit(rpc, "B-3", "横岗街道道路积水", "横岗")
    referrals = {c: rpc.routing.list_referrals(None, None, c) for c in (answered, redone, untouched)}
    assert all(referrals.values()), referrals
    for referral in referrals[answered]:
        rpc.routing.referral_step(referral["id"], "accept")
        rpc.routing.referral_step(referral["id"], "reply", {"result": "已修复"})
    for referral in referrals[redone]:
        rpc.routing.referral_step(referral["id"], "reply", {"result": "已安排"})
    rpc.routing.record_feedback(answered, "满意")
    rpc.routing.record_feedback(redone, "不满意")  # 重办: a second round, and not resolved

    n = {c: len(referrals[c]) for c in referrals}
    expected = {
        "referred": sum(n.values()) + n[redone],  # and the redo round, back to who replied
        "responded": n[answered] + n[redone],  # accepted and replied, or replied; the redo round not yet
        "replied": n[answered] + n[redone],
        "rated": n[answered] + n[redone],
        "satisfied": n[answered],
        "resolved": n[answered],  # the redone case was rated 不满意
        "on_time": n[answered] + n[redone],
        "returned": 0,
    }

    def counted():
        body = requests.get(f"{url}/api/v1/reports/departments", headers=headers).json()
        return body, {key: sum(d[key] for d in body["departments"]) for key in expected}

    wait_for(lambda: counted()[1] == expected, timeout=20)
    body, totals = counted()
    lead = next(d for d in body["departments"] if d["replied"])
    assert lead["on_time_rate"] == 1.0
    for row in body["departments"]:
        assert row["response_rate"] == (round(row["responded"] / row["referred"], 4) if row["referred"] else None)
        assert row["satisfaction_rate"] == (round(row["satisfied"] / row["rated"], 4) if row["rated"] else None)

    workbook = requests.get(f"{url}/api/v1/reports/departments.xlsx", headers=headers)
    assert workbook.status_code == 200 and "attachment" in workbook.headers["Content-Disposition"]
    sheet = load_workbook(BytesIO(workbook.content)).active
    rows = list(sheet.iter_rows(values_only=True))
    assert rows[2][:5] == ("单位代码", "承办单位", "交办件数", "响应件数", "响应率")
    by_code = {row[0]: row for row in rows[3:-1]}
    for department in body["departments"]:
        row = by_code[department["department"]]
        assert (row[2], row[3], row[4], row[12]) == (
            department["referred"],
            department["responded"],
            department["response_rate"],
            department["on_time_rate"],
        )
    assert rows[-1][1] == "合计" and rows[-1][2] == totals["referred"]

    monkeypatch.setenv("AMQP_URI", rabbit_config["AMQP_URI"])  # the operator's CLI: the same table, the same form
    cli = CliRunner().invoke(main, ["report", "departments", "--xlsx", str(tmp_path / "r.xlsx"), "--json"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout) == body
    saved = list(load_workbook(tmp_path / "r.xlsx").active.iter_rows(values_only=True))
    assert saved == rows and not (tmp_path / "r.xlsx.partial").exists()
    refused = CliRunner().invoke(main, ["report", "departments", "--from", "2026-02-30"])
    assert refused.exit_code == 1 and "from must be a day as YYYY-MM-DD" in refused.output

    # B-1 was closed: its case_closed comes through a queue of its own, maybe after the ratings
    overview = wait_for(
        lambda: (o := requests.get(f"{url}/api/v1/board/overview", headers=headers).json())["cases_open"] == 2 and o,
        timeout=10,
    )
    assert overview["cases_received"] == 3
    assert {s["name"]: s["cases"] for s in overview["by_street"]} == {"longcheng": 2, "henggang": 1}
    assert overview["weeks"][-1]["received"] == 3 and len(overview["weeks"]) == 12

    record = requests.get(f"{url}/api/v1/cases/{redone}", headers=headers).json()
    browser = requests.Session()
    browser.post(f"{url}/board/login", data={"key": staff})
    page = browser.get(f"{url}/board/cases/{redone}")
    assert page.status_code == 200 and all(step["event"] in page.text for step in record["timeline"])


def test_a_bad_period_or_case_is_named(board):
    url, staff, _ = board
    headers = {"Authorization": f"Bearer {staff}"}
    bad = requests.get(f"{url}/api/v1/reports/departments?from=2026-13-01", headers=headers)
    assert bad.status_code == 422 and "from must be a day as YYYY-MM-DD" in bad.json()["error"]["message"]
    reversed_ = requests.get(f"{url}/api/v1/board/overview?from=2026-11-02&to=2026-11-01", headers=headers)
    assert reversed_.status_code == 422 and "after to" in reversed_.json()["error"]["message"]
    browser = requests.Session()
    browser.post(f"{url}/board/login", data={"key": staff})
    page = browser.get(f"{url}/board/departments?to=yesterday")
    assert page.status_code == 422 and "to must be a day" in page.text and "<html" in page.text
    missing = browser.get(f"{url}/board/cases/LG-2026-999999")
    assert missing.status_code == 404 and "LG-2026-999999" in missing.text
