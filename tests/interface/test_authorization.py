"""Who may see and do what, over the running services (intake, routing, supervision).

Department A (交通运输局, jtglj) holds the traffic case, department B (城管局, cgj) the street-light
case. A's key against B's ids, on every endpoint that takes one, gets 403 or 404 and none of B's
fields; lists, search and export leave B's rows out (and keep A's). No key is 401 everywhere.
Staff-only actions are refused to departments and change nothing. A source key cannot use the
department API. Keys are stored only as their SHA-256."""

import csv
import hashlib
import io
import shutil

import pytest
import requests
from sqlalchemy import text

from services.routing.referrals import EXPORT_COLUMNS
from tests.conftest import wait_for, wait_routed, wait_supervised
from tests.support import DEMO_DIRECTORY

pytestmark = pytest.mark.interface
RULES_DIR = DEMO_DIRECTORY.parent.parent / "rules"
LATER = "2027-03-01T09:00:00+08:00"  # every 2026 deadline long past

A_TITLE, A_DESCRIPTION = "海吉星市场周边交通拥堵", "甲部门独有描述ALPHA-7731"
B_TITLE, B_DESCRIPTION = "丹竹头社区路灯不亮", "乙部门独有描述BRAVO-4419"


def keys_for(rpc):
    return {
        name: rpc.intake.create_credential(role, subject)["key"]
        for name, role, subject in [
            ("a", "department", "jtglj"),
            ("b", "department", "cgj"),
            ("hotline", "source", "hotline-12345"),
            ("staff", "staff", "office"),
        ]
    }


@pytest.fixture
def stack(run_services, rpc, demo_directory, tmp_path, monkeypatch):
    rules = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules)
    monkeypatch.setenv("HUIYING_RULES_DIR", str(rules))
    urls = run_services("intake", "routing", "supervision")
    rpc.intake.load_directory(demo_directory)
    keys = keys_for(rpc)

    def submit(external_id, title, description, street):
        case_id = rpc.intake.submit_case(
            {
                "source": "hotline-12345",
                "external_id": external_id,
                "title": title,
                "description": description,
                "street": street,
            }
        )["id"]
        routed = wait_routed(rpc, case_id)
        wait_supervised(rpc, case_id)  # the title there comes with intake's event
        return routed

    a_case = submit("AUTH-A", A_TITLE, A_DESCRIPTION, "平湖")
    b_case = submit("AUTH-B", B_TITLE, B_DESCRIPTION, "南湾")
    assert [(r["department"], r["lead"]) for r in a_case["referrals"]] == [("jtglj", True), ("jjdd", False)]
    assert [r["department"] for r in b_case["referrals"]] == ["cgj"]

    class Stack:
        intake, routing, supervision = urls["intake"], urls["routing"], urls["supervision"]
        rules_dir = rules
        a = {"case": a_case["case_id"], "referral": a_case["referrals"][0]["id"], "external_id": "AUTH-A"}
        b = {"case": b_case["case_id"], "referral": b_case["referrals"][0]["id"], "external_id": "AUTH-B"}
        # What must never reach department A: B's fields (its case id only where A put it in the URL).
        b_secrets = (B_TITLE, B_DESCRIPTION, "BRAVO-4419", b_case["referrals"][0]["id"])

        def auth(self, who):
            return {"Authorization": f"Bearer {keys[who]}"}

        def key(self, who):
            return keys[who]

    return Stack()


def assert_none_of(body: str, secrets, where: str):
    leaked = [s for s in secrets if s in body]
    assert not leaked, f"{where} leaked {leaked}: {body[:500]}"


# --- department A against department B's ids -------------------------------------------------


def test_department_a_gets_nothing_of_department_b_by_id(stack, rpc):
    b_case, b_ref = stack.b["case"], stack.b["referral"]
    a = stack.auth("a")
    routing, intake, supervision = stack.routing + "/api/v1", stack.intake + "/api/v1", stack.supervision + "/api/v1"
    attempts = [
        ("GET", f"{routing}/referrals/{b_ref}", None),
        ("POST", f"{routing}/referrals/{b_ref}/accept", {}),
        ("POST", f"{routing}/referrals/{b_ref}/return", {"reason": "不是我们的"}),
        ("POST", f"{routing}/referrals/{b_ref}/extension", {"working_days": 2, "reason": "x"}),
        ("POST", f"{routing}/referrals/{b_ref}/extension/decision", {"grant": True}),
        ("POST", f"{routing}/referrals/{b_ref}/reply", {"result": "已处理"}),
        ("GET", f"{routing}/cases/{b_case}", None),
        ("POST", f"{routing}/cases/{b_case}/feedback", {"rating": "满意"}),
        ("GET", f"{supervision}/cases/{b_case}", None),
        ("GET", f"{intake}/cases/{b_case}", None),
        ("GET", f"{intake}/cases?external_id=AUTH-B&source=hotline-12345", None),
    ]
    for method, url, body in attempts:
        response = requests.request(method, url, json=body, headers=a)
        assert response.status_code in (403, 404), (method, url, response.status_code, response.text)
        in_url = [s for s in stack.b_secrets if s in url]
        assert_none_of(response.text, [s for s in stack.b_secrets if s not in in_url], f"{method} {url}")
        assert "error" in response.json() and set(response.json()) == {"error"}

    # The same reads with B's own key (or staff's, where only staff may) succeed: the paths are right.
    b = stack.auth("b")
    assert requests.get(f"{routing}/referrals/{b_ref}", headers=b).json()["id"] == b_ref
    assert requests.get(f"{routing}/cases/{b_case}", headers=b).json()["case_id"] == b_case
    staff = stack.auth("staff")
    assert requests.get(f"{supervision}/cases/{b_case}", headers=staff).json()["title"] == B_TITLE
    assert requests.get(f"{intake}/cases/{b_case}", headers=staff).json()["description"] == B_DESCRIPTION

    # Nothing A tried changed B's referral or case: it is still referred, and B can accept it.
    referral = requests.get(f"{routing}/referrals/{b_ref}", headers=b).json()
    assert referral["status"] == "referred" and referral["extension"] is None and referral["reply"] is None
    assert rpc.routing.get_case_routing(b_case)["status"] == "referred"
    assert requests.post(f"{routing}/referrals/{b_ref}/accept", headers=b).json()["status"] == "accepted"


def test_lists_search_and_export_hold_only_the_callers_own_referrals(stack):
    base, a, staff = stack.routing + "/api/v1/referrals", stack.auth("a"), stack.auth("staff")
    a_ref, b_ref = stack.a["referral"], stack.b["referral"]

    listed = requests.get(base, headers=a)
    assert [r["id"] for r in listed.json()["referrals"]] == [a_ref]
    assert_none_of(listed.text, stack.b_secrets + (stack.b["case"], "cgj"), "list")
    assert requests.get(base, params={"case_id": stack.b["case"]}, headers=a).json() == {"referrals": []}
    assert requests.get(base, params={"department": "cgj"}, headers=a).json()["referrals"][0]["id"] == a_ref

    def search(q, who=a):
        response = requests.get(base, params={"q": q}, headers=who)
        assert response.status_code == 200, response.text
        return [r["id"] for r in response.json()["referrals"]]

    # Search finds by title words, description and case id ...
    assert search("交通拥堵") == [a_ref]
    assert search("alpha-7731") == [a_ref]  # case-insensitive
    assert search(stack.a["case"]) == [a_ref]
    assert b_ref in search("路灯", staff) and b_ref in search("BRAVO", staff)
    # ... but never another department's referrals, nor through LIKE wildcards.
    for q in ("路灯", "丹竹头", "BRAVO-4419", stack.b["case"], b_ref, "%", "_"):
        assert search(q) == [], q
    assert search("%", staff) == [] and search("_", staff) == []
    too_long = requests.get(base, params={"q": "字" * 201}, headers=a)
    assert too_long.status_code == 422 and too_long.json()["error"]["details"][0]["field"] == "q"

    export = requests.get(base + "/export.csv", headers=a)
    assert export.status_code == 200
    assert export.headers["Content-Type"].startswith("text/csv")
    assert "attachment" in export.headers["Content-Disposition"]
    assert export.content.startswith(b"\xef\xbb\xbf")  # the BOM: Excel reads the Chinese right
    rows = list(csv.reader(io.StringIO(export.content.decode("utf-8-sig"))))
    assert rows[0] == list(EXPORT_COLUMNS)
    assert [r[0] for r in rows[1:]] == [a_ref]
    assert_none_of(export.content.decode("utf-8-sig"), stack.b_secrets + (stack.b["case"], "cgj"), "export")
    a_row = dict(zip(rows[0], rows[1], strict=True))
    listed_a = listed.json()["referrals"][0]
    assert a_row["department_name"] == listed_a["department_name"] == "深圳市交通运输局龙岗管理局"
    assert a_row["due_at"] == listed_a["due_at"] and a_row["lead"] == "true"
    extension_fields = {"extension_status", "extension_working_days", "extension_reason", "extension_decided_at"}
    assert set(EXPORT_COLUMNS) == (set(listed_a) - {"extension"}) | extension_fields  # the list view's fields

    def exported(params, who=a):
        response = requests.get(base + "/export.csv", params=params, headers=who)
        assert response.status_code == 200, response.text
        return [r[0] for r in list(csv.reader(io.StringIO(response.content.decode("utf-8-sig"))))[1:]]

    assert exported({"q": "路灯"}) == [] and exported({"case_id": stack.b["case"]}) == []
    assert exported({"status": "accepted"}) == [] and exported({"status": "referred"}) == [a_ref]
    everything = exported({}, staff)
    assert a_ref in everything and b_ref in everything and len(everything) == 3  # jtglj, jjdd, cgj
    assert exported({"q": "路灯"}, staff) == [b_ref]


def test_a_formula_in_a_departments_own_words_is_not_run_by_excel(stack):
    base, a = stack.routing + "/api/v1/referrals", stack.auth("a")
    url = f"{base}/{stack.a['referral']}"
    asked = requests.post(f"{url}/extension", json={"working_days": 2, "reason": "=HYPERLINK(1)"}, headers=a)
    assert asked.status_code == 200
    rows = list(csv.reader(io.StringIO(requests.get(base + "/export.csv", headers=a).content.decode("utf-8-sig"))))
    row = dict(zip(rows[0], rows[1], strict=True))
    assert row["extension_status"] == "requested" and row["extension_reason"] == "'=HYPERLINK(1)"


# --- no credentials -----------------------------------------------------------------------------

X = "LG-2026-000001"
ENDPOINTS = [
    ("intake", "POST", "/api/v1/cases"),
    ("intake", "GET", f"/api/v1/cases/{X}"),
    ("intake", "GET", "/api/v1/cases?external_id=E-1"),
    ("routing", "GET", "/api/v1/referrals"),
    ("routing", "GET", "/api/v1/referrals?q=x"),
    ("routing", "GET", "/api/v1/referrals/export.csv"),
    ("routing", "GET", f"/api/v1/referrals/{X}-R1"),
    ("routing", "POST", f"/api/v1/referrals/{X}-R1/accept"),
    ("routing", "POST", f"/api/v1/referrals/{X}-R1/return"),
    ("routing", "POST", f"/api/v1/referrals/{X}-R1/extension"),
    ("routing", "POST", f"/api/v1/referrals/{X}-R1/extension/decision"),
    ("routing", "POST", f"/api/v1/referrals/{X}-R1/reply"),
    ("routing", "GET", f"/api/v1/cases/{X}"),
    ("routing", "POST", f"/api/v1/cases/{X}/feedback"),
    ("routing", "GET", "/api/v1/triage"),
    ("routing", "POST", f"/api/v1/triage/{X}/route"),
    ("routing", "POST", "/api/v1/rules/reload"),
    ("supervision", "GET", "/api/v1/agenda"),
    ("supervision", "GET", "/api/v1/agenda/AG-2026-0001"),
    ("supervision", "POST", "/api/v1/agenda/AG-2026-0001/advance"),
    ("supervision", "GET", f"/api/v1/cases/{X}"),
    ("supervision", "POST", "/api/v1/rules/reload"),
]


@pytest.mark.parametrize("service, method, path", ENDPOINTS)
def test_no_valid_key_is_401_everywhere(run_services, rpc, service, method, path):
    urls = run_services(*dict.fromkeys(["intake", service]))  # others ask intake who a key is
    revoked_looking = "hy_" + "A" * 43
    for headers in ({}, {"Authorization": "Bearer nope"}, {"X-Api-Key": revoked_looking}, {"Authorization": ""}):
        response = requests.request(method, urls[service] + path, json={}, headers=headers)
        assert response.status_code == 401, (headers, response.status_code, response.text)
        assert response.json()["error"]["code"] == "unauthorized"


# --- staff-only actions -------------------------------------------------------------------------


def test_staff_only_actions_are_refused_to_departments_and_change_nothing(stack, rpc):
    routing, supervision = stack.routing + "/api/v1", stack.supervision + "/api/v1"
    a, staff = stack.auth("a"), stack.auth("staff")

    # Rule reload, on both services.
    for service, url in (("routing", routing), ("supervision", supervision)):
        before = getattr(rpc, service).rules_status()
        refused = requests.post(f"{url}/rules/reload", headers=a)
        assert refused.status_code == 403 and set(refused.json()) == {"error"}, refused.text
        assert getattr(rpc, service).rules_status() == before
        allowed = requests.post(f"{url}/rules/reload", headers=staff)
        assert allowed.status_code == 200 and allowed.json() == {"version": before["version"], "problems": []}

    # An extension decision: A asks (its right), A cannot grant itself; the request stays pending.
    url = f"{routing}/referrals/{stack.a['referral']}"
    due_before = requests.get(url, headers=a).json()["due_at"]
    assert requests.post(f"{url}/extension", json={"working_days": 3, "reason": "施工"}, headers=a).status_code == 200
    for body in ({"grant": True}, {}, {"grant": "yes"}):
        refused = requests.post(f"{url}/extension/decision", json=body, headers=a)
        assert refused.status_code == 403, (body, refused.text)
    after = requests.get(url, headers=a).json()
    assert after["extension"]["status"] == "requested" and after["due_at"] == due_before

    # The triage list and routing from it.
    case_id = rpc.intake.submit_case(
        {"source": "hotline-12345", "external_id": "AUTH-T", "title": "你好", "description": "想咨询一件事"}
    )["id"]

    def triaged():
        try:
            return rpc.routing.get_case_routing(case_id)["status"] == "triage"
        except Exception:
            return False

    wait_for(triaged, timeout=15)
    assert requests.get(f"{routing}/triage", headers=a).status_code == 403
    for body in ({"departments": ["jtglj"]}, {"departments": "nope"}):
        assert requests.post(f"{routing}/triage/{case_id}/route", json=body, headers=a).status_code == 403
    assert rpc.routing.get_case_routing(case_id)["status"] == "triage"
    assert [c["case_id"] for c in requests.get(f"{routing}/triage", headers=staff).json()["cases"]] == [case_id]

    # The agenda: reading and advancing it are staff's.
    wait_for(lambda: rpc.supervision.sweep(LATER)["decisions"] or rpc.supervision.list_agenda(), timeout=20)
    item = next(i for i in rpc.supervision.list_agenda() if i["kind"] == "agenda")
    assert requests.get(f"{supervision}/agenda", headers=a).status_code == 403
    assert requests.get(f"{supervision}/agenda/{item['id']}", headers=a).status_code == 403
    advance = {"status": "scheduled", "scheduled_for": "2027-03-15"}
    refused = requests.post(f"{supervision}/agenda/{item['id']}/advance", json=advance, headers=a)
    assert refused.status_code == 403 and set(refused.json()) == {"error"}
    assert requests.get(f"{supervision}/agenda/{item['id']}", headers=staff).json()["status"] == "proposed"
    moved = requests.post(f"{supervision}/agenda/{item['id']}/advance", json=advance, headers=staff)
    assert moved.status_code == 200 and moved.json()["status"] == "scheduled"  # the path is right


def test_a_source_key_cannot_use_the_department_api(stack):
    routing, hotline = stack.routing + "/api/v1", stack.auth("hotline")
    a_ref = stack.a["referral"]
    for method, path, body in [
        ("GET", "/referrals", None),
        ("GET", "/referrals?q=交通", None),
        ("GET", "/referrals/export.csv", None),
        ("GET", f"/referrals/{a_ref}", None),
        ("POST", f"/referrals/{a_ref}/accept", {}),
        ("POST", f"/referrals/{a_ref}/return", {"reason": "x"}),
        ("POST", f"/referrals/{a_ref}/extension", {"working_days": 2, "reason": "x"}),
        ("POST", f"/referrals/{a_ref}/extension/decision", {"grant": True}),
        ("POST", f"/referrals/{a_ref}/reply", {"result": "x"}),
        ("GET", "/triage", None),
        ("POST", "/rules/reload", None),
    ]:
        response = requests.request(method, routing + path, json=body, headers=hotline)
        assert response.status_code == 403, (method, path, response.status_code, response.text)
        assert set(response.json()) == {"error"}
        assert_none_of(response.text, (A_TITLE, A_DESCRIPTION, "jtglj"), f"{method} {path}")
    assert requests.get(f"{routing}/referrals/{a_ref}", headers=stack.auth("a")).json()["status"] == "referred"
    for path in ("/agenda", "/cases/" + stack.a["case"]):
        assert requests.get(stack.supervision + "/api/v1" + path, headers=hotline).status_code == 403


# --- keys at rest -------------------------------------------------------------------------------


def test_keys_are_stored_only_as_their_sha256(stack, db):
    keys = {who: stack.key(who) for who in ("a", "b", "hotline", "staff")}
    with db.connect() as connection:
        rows = [dict(r._mapping) for r in connection.execute(text("SELECT * FROM intake_credentials"))]
        tables = [r[0] for r in connection.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))]
        everything = "\n".join(
            str(row[0]) for table in tables for row in connection.execute(text(f'SELECT t::text FROM "{table}" t'))
        )
    assert len(rows) == len(keys)
    for who, key in keys.items():
        assert len(key) > 40
        [row] = [r for r in rows if r["key_hash"] == hashlib.sha256(key.encode()).hexdigest()]
        assert all(key not in str(value) for value in row.values()), who
        assert len(row["key_prefix"]) <= 10 < len(key)  # a short prefix, to tell keys apart in listings
        assert key not in everything, f"{who}'s key is stored in plain text somewhere"
    # And a key works only while it hashes to a stored value: its stored hash is not itself a key.
    hashed = hashlib.sha256(keys["a"].encode()).hexdigest()
    as_key = requests.get(stack.routing + "/api/v1/referrals", headers={"Authorization": f"Bearer {hashed}"})
    assert as_key.status_code == 401
