"""The AMQP channel: a ticketing platform publishes straight to RabbitMQ."""

import pytest
from sqlalchemy import func, select

from services.common.retrying import REASON_HEADER
from services.intake.models import cases
from services.intake.ticket_queue import DEAD_QUEUE
from tests.conftest import take_messages, wait_for

pytestmark = pytest.mark.interface


@pytest.fixture
def publish(publish_ticket, run_services, rpc, demo_directory):
    run_services("intake")
    rpc.intake.load_directory(demo_directory)
    return publish_ticket


def dead_letters(amqp_uri, count, timeout=10):
    return take_messages(amqp_uri, DEAD_QUEUE, count, timeout)


def case_count(db):
    with db.connect() as connection:
        return connection.scalar(select(func.count()).select_from(cases))


TICKET = {
    "source": "hotline-12345",
    "external_id": "GD-20261001-0042",
    "title": "南湾街道路灯不亮",
    "description": "丹竹头社区一段路灯连续一周不亮",
    "street": "南湾",
}


def test_a_ticket_becomes_a_case_and_an_event_once(publish, db, event_tap):
    tap = event_tap("intake", "case_received")
    publish(TICKET)
    publish(TICKET)  # a platform's retry
    events = tap.drain(expect=1)
    assert len(events) == 1 and events[0]["channel"] == "amqp" and events[0]["street"] == "nanwan"
    assert case_count(db) == 1


@pytest.mark.parametrize(
    "body, content_type, reason_part",
    [
        (b"{broken json", "application/json", "decoded"),
        (b"\xff\xfe not utf-8", "application/json", "decoded"),
        (b"not json at all", "text/plain", "not JSON"),
        ([1, 2, 3], "application/json", "JSON object"),
        ({"source": "hotline-12345", "title": "no id", "description": "d"}, "application/json", "external_id"),
        ({**TICKET, "street": "火星"}, "application/json", "street"),
        (b"\x80\x04K\x01.", "application/x-python-serialize", "decoded"),  # pickle is never accepted
    ],
)
def test_a_bad_message_is_dead_lettered_with_its_reason_and_the_queue_flows_on(
    publish, rabbit_config, db, body, content_type, reason_part
):
    publish(body, content_type)
    publish({**TICKET, "external_id": "after-the-bad-one"})
    [dead] = dead_letters(rabbit_config["AMQP_URI"], 1)
    assert reason_part in dead.headers[REASON_HEADER]
    wait_for(lambda: case_count(db) == 1)


def test_a_ticket_that_fails_is_retried_later_by_the_broker(publish, db, monkeypatch):
    from services.intake import cases

    real_submit, calls = cases.submit_many, []

    def flaky_submit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("database unavailable")
        return real_submit(*args, **kwargs)

    monkeypatch.setattr(cases, "submit_many", flaky_submit)
    publish({**TICKET, "external_id": "flaky-1"})
    wait_for(lambda: case_count(db) == 1, timeout=15)
    assert len(calls) == 2  # failed once, came back from the retry queue after a second


def test_a_ticket_that_keeps_failing_is_parked_in_the_dead_letter_queue(publish, rabbit_config, db, monkeypatch):
    from services.intake import cases, ticket_queue

    monkeypatch.setattr(ticket_queue, "MAX_ATTEMPTS", 3)  # 1 s + 2 s of delays instead of two minutes
    monkeypatch.setattr(cases, "submit_many", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("still down")))
    publish({**TICKET, "external_id": "always-failing"})
    [dead] = dead_letters(rabbit_config["AMQP_URI"], 1, timeout=20)
    assert dead.headers[REASON_HEADER] == "failed 3 times, last: RuntimeError: still down"
    assert case_count(db) == 0
