"""The JSON HTTP API for ticketing systems, against real RabbitMQ and PostgreSQL."""

import pytest
import requests
from sqlalchemy import func, select

from services.intake.models import cases
from tests.conftest import wait_for

pytestmark = pytest.mark.interface


@pytest.fixture
def intake(run_services, rpc, demo_directory):
    urls = run_services("intake")
    rpc.intake.load_directory(demo_directory)
    key = rpc.intake.create_credential("source", "hotline-12345")["key"]
    return urls["intake"], {"Authorization": f"Bearer {key}"}


def case_count(db):
    with db.connect() as connection:
        return connection.scalar(select(func.count()).select_from(cases))


def test_a_ticket_becomes_one_case_and_one_event_however_often_it_is_sent(intake, db, event_tap):
    url, auth = intake
    tap = event_tap("intake", "case_received")
    body = {
        "external_id": "12345-2026-0001",
        "title": "海吉星市场周边交通拥堵",
        "description": "白坭坑片区早高峰人车混行，请求增设人车分流设施。联系人电话13812345678",
        "category": "交通出行",
        "street": "平湖",
        "reporter_phone": "138 1234 5678",
    }

    first = requests.post(f"{url}/api/v1/cases", json=body, headers=auth)
    again = requests.post(f"{url}/api/v1/cases", json=body, headers=auth)

    assert first.status_code == 201 and first.json()["created"] is True
    assert again.status_code == 200 and again.json() == {"id": first.json()["id"], "created": False}
    assert first.json()["id"].startswith("LG-2026-") or first.json()["id"].startswith("LG-20")
    assert case_count(db) == 1
    events = tap.drain(expect=1)
    assert len(events) == 1
    event = events[0]
    assert event["case_id"] == first.json()["id"]
    assert (event["category"], event["street"], event["channel"]) == ("traffic", "pinghu", "http")
    assert event["reporter_phone_masked"] == "138****5678"
    assert "13812345678" not in str(event)  # masked inside the description too

    shown = requests.get(f"{url}/api/v1/cases/{first.json()['id']}", headers=auth).json()
    assert shown["status"] == "received" and shown["reporter_phone"] == "138****5678"
    found = requests.get(f"{url}/api/v1/cases", params={"external_id": "12345-2026-0001"}, headers=auth)
    assert found.json()["id"] == first.json()["id"]


def test_case_ids_are_readable_and_sortable(intake):
    url, auth = intake
    ids = [
        requests.post(
            f"{url}/api/v1/cases", json={"external_id": f"n{i}", "title": "t", "description": "d"}, headers=auth
        ).json()["id"]
        for i in range(3)
    ]
    assert ids == sorted(ids)
    assert [int(i.rsplit("-", 1)[1]) for i in ids] == [1, 2, 3]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"title": "t", "description": "d"}, "external_id"),
        ({"external_id": "x", "description": "d"}, "title"),
        ({"external_id": "x", "title": "t", "description": "d", "street": "火星街道"}, "street"),
        ({"external_id": "x", "title": "t", "description": "d", "category": "nope"}, "category"),
        ({"external_id": "x", "title": "t", "description": "d", "reporter_phone": "call me"}, "reporter_phone"),
        ({"external_id": "x", "title": "t", "description": "d", "residents_affected": -1}, "residents_affected"),
        ({"external_id": "x", "title": "t" * 201, "description": "d"}, "title"),
        ({"external_id": "x", "title": "t", "description": "d", "colour": "red"}, "colour"),
        ({"external_id": "x", "title": "t\x00", "description": "d"}, "title"),
    ],
)
def test_bad_input_names_the_field_and_writes_nothing(intake, db, body, field):
    url, auth = intake
    response = requests.post(f"{url}/api/v1/cases", json=body, headers=auth)
    assert response.status_code == 422
    assert field in [d["field"] for d in response.json()["error"]["details"]]
    assert case_count(db) == 0


def test_not_json_is_a_400(intake, db):
    url, auth = intake
    response = requests.post(f"{url}/api/v1/cases", data="{not json", headers=auth)
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    assert case_count(db) == 0


def test_keys_are_required_and_scoped_to_their_source(intake, rpc):
    url, auth = intake
    body = {"external_id": "a1", "title": "t", "description": "d"}
    assert requests.post(f"{url}/api/v1/cases", json=body).status_code == 401
    assert requests.post(f"{url}/api/v1/cases", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert requests.post(f"{url}/api/v1/cases", json=body | {"source": "other"}, headers=auth).status_code == 403

    created = requests.post(f"{url}/api/v1/cases", json=body, headers=auth).json()["id"]
    other = {"Authorization": f"Bearer {rpc.intake.create_credential('source', 'online-platform')['key']}"}
    assert requests.get(f"{url}/api/v1/cases/{created}", headers=other).status_code == 404
    department = {"X-Api-Key": rpc.intake.create_credential("department", "jtglj")["key"]}
    assert requests.post(f"{url}/api/v1/cases", json=body, headers=department).status_code == 403


def test_health(intake):
    url, _ = intake
    response = requests.get(f"{url}/health")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_http_requests_and_tickets_arriving_during_a_store_are_stored_together_in_the_next(
    intake, publish_ticket, db, monkeypatch
):
    """One transaction for the submissions of a moment, whatever their channel: while a store
    runs, the HTTP requests and ticket batches that arrive wait, and the next store takes them all.
    Each caller still gets its own answer; a request naming an unknown street gets its 422 and
    the others are stored."""
    import eventlet
    from eventlet.event import Event

    from services.intake import cases as intake_cases
    from services.intake import service as intake_service

    url, auth = intake
    real_store, stores, release = intake_cases.submit_many, [], Event()
    real_parse, parsed = intake_service.parse_submission, []

    def held_store(sessions, received, *args):
        stores.append(sorted(channel for _, channel in received))
        if len(stores) == 1:
            release.wait()
        return real_store(sessions, received, *args)

    def counted_parse(data):
        parsed.append(data["external_id"])  # handed over to the store straight after, with no pause
        return real_parse(data)

    monkeypatch.setattr(intake_cases, "submit_many", held_store)
    monkeypatch.setattr(intake_service, "parse_submission", counted_parse)

    def post(external_id, **extra):
        body = {"external_id": external_id, "title": "路灯不亮", "description": "一段路灯连续一周不亮", **extra}
        return requests.post(f"{url}/api/v1/cases", json=body, headers=auth)

    first = eventlet.spawn(post, "H-0")
    wait_for(lambda: len(stores) == 1)
    posted = [eventlet.spawn(post, f"H-{n}") for n in (1, 2)] + [eventlet.spawn(post, "H-bad", street="火星街道")]
    for n in (1, 2):
        publish_ticket({"source": "hotline-12345", "external_id": f"T-{n}", "title": "噪音", "description": "夜间施工"})
    wait_for(lambda: len(parsed) == 6)
    release.send()

    answers = [thread.wait() for thread in [first, *posted]]
    assert [a.status_code for a in answers] == [201, 201, 201, 422]
    assert "street" in [d["field"] for d in answers[3].json()["error"]["details"]]
    wait_for(lambda: case_count(db) == 5)
    assert stores == [["http"], ["amqp", "amqp", "http", "http", "http"]]
    with db.connect() as connection:
        channels = dict(connection.execute(select(cases.c.external_id, cases.c.channel)).all())
    assert channels == {"H-0": "http", "H-1": "http", "H-2": "http", "T-1": "amqp", "T-2": "amqp"}
    assert len({a.json()["id"] for a in answers[:3]}) == 3


def test_a_callers_mistake_is_logged_as_the_answer_it_got_not_as_a_server_fault(intake, caplog):
    """A 404 is an ApiError the entrypoint expects: one INFO line, without a traceback, once the
    services' log filter (logs.ExpectedErrorsBriefly, installed by config.logging_config) sees it."""
    import logging

    from services.common.logs import ExpectedErrorsBriefly

    url, auth = intake
    containers, brief = logging.getLogger("nameko.containers"), ExpectedErrorsBriefly()
    containers.addFilter(brief)
    try:
        with caplog.at_level(logging.INFO):
            response = requests.get(f"{url}/api/v1/cases/LG-2026-999999", headers=auth)
    finally:
        containers.removeFilter(brief)
    assert response.status_code == 404
    worker_errors = [r for r in caplog.records if r.name == "nameko.containers" and "handling worker" in r.msg]
    assert [(r.levelname, r.exc_info) for r in worker_errors] == [("INFO", None)]
