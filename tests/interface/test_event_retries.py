"""A failing event handler neither loses the event nor spins on it: the broker brings it back
after a growing delay, and parks it after the last attempt."""

import json
import uuid

import pytest
from kombu import Connection
from nameko.exceptions import RemoteError

from services.common.events import DEAD_QUEUE
from tests.conftest import take_messages, wait_for

pytestmark = pytest.mark.interface


def referrals_seen_by_supervision(rpc, case_id):
    try:
        return rpc.supervision.get_case_record(case_id)["referrals"]
    except RemoteError:
        return []


@pytest.fixture
def submit(run_services, rpc, demo_directory):
    run_services("intake", "routing", "supervision")
    rpc.intake.load_directory(demo_directory)

    def send(external_id):
        return rpc.intake.submit_case(
            {
                "source": "hotline-12345",
                "external_id": external_id,
                "title": "路灯不亮",
                "description": "一周没有路灯",
                "street": "南湾",
            }
        )["id"]

    return send


def test_an_event_whose_handler_fails_once_is_handled_on_the_retry(submit, rpc, monkeypatch):
    from services.supervision import projection

    real, calls = projection.record_routing_events, []

    def flaky(session, events, settings, to_place=None):
        calls.extend(event["event_type"] for event in events)
        if calls.count("case_referred") == 1 and any(event["event_type"] == "case_referred" for event in events):
            raise RuntimeError("database hiccup")
        return real(session, events, settings, to_place)

    monkeypatch.setattr(projection, "record_routing_events", flaky)
    case_id = submit("E-1")
    wait_for(lambda: referrals_seen_by_supervision(rpc, case_id), timeout=15)
    assert calls.count("case_referred") == 2


def test_an_event_that_keeps_failing_is_parked_with_its_reason(submit, rpc, monkeypatch, rabbit_config):
    from services.common import events
    from services.supervision import projection

    monkeypatch.setattr(events, "MAX_ATTEMPTS", 2)
    monkeypatch.setattr(projection, "record_routing_events", lambda session, events, settings, to_place=None: 1 / 0)
    submit("E-2")
    parked = []
    with Connection(rabbit_config["AMQP_URI"]) as connection:
        queue = DEAD_QUEUE(connection.channel())

        def collect():
            message = queue.get(no_ack=True)
            if message is not None:
                parked.append(message)
            return parked

        wait_for(collect, timeout=15)
    assert parked[0].headers["x-huiying-queue"] == "evt-routing-case_referred--supervision.on_routing_event"
    assert parked[0].headers["x-huiying-reason"] == "failed 2 times, last: ZeroDivisionError: division by zero"


def parked_messages(amqp_uri, expect: int, timeout: float = 20) -> list:
    return take_messages(amqp_uri, DEAD_QUEUE, expect, timeout)


def test_a_poison_event_is_parked_while_the_events_around_it_flow(submit, rpc, monkeypatch, rabbit_config):
    from services.common import events
    from services.supervision import projection

    real, poison = projection.record_routing_events, {}

    def fails_for_one_case(session, events, settings, to_place=None):
        if any(event["case_id"] == poison.get("case_id") for event in events):
            raise ValueError("this event can never be projected")
        return real(session, events, settings, to_place)

    monkeypatch.setattr(events, "MAX_ATTEMPTS", 3)
    monkeypatch.setattr(projection, "record_routing_events", fails_for_one_case)
    before = submit("P-before")
    poison["case_id"] = f"{before[:-6]}{int(before[-6:]) + 1:06d}"  # the next case id
    assert submit("P-poison") == poison["case_id"]
    after = submit("P-after")
    wait_for(lambda: referrals_seen_by_supervision(rpc, before) and referrals_seen_by_supervision(rpc, after), 15)
    [parked] = parked_messages(rabbit_config["AMQP_URI"], 1)
    assert parked.headers["x-huiying-reason"] == "failed 3 times, last: ValueError: this event can never be projected"
    assert referrals_seen_by_supervision(rpc, poison["case_id"]) == []


def test_an_undecodable_event_is_parked_and_the_consumer_carries_on(submit, rpc, rabbit_config):
    from kombu import Producer

    from services.common.topology import event_exchange

    with Connection(rabbit_config["AMQP_URI"]) as connection:
        Producer(connection.channel()).publish(
            b"\xff\xfe not json",
            exchange=event_exchange("routing"),
            routing_key="case_referred",
            content_type="application/json",
            content_encoding="binary",
            delivery_mode=2,
        )
    case_id = submit("U-after")
    wait_for(lambda: referrals_seen_by_supervision(rpc, case_id), timeout=15)
    parked = parked_messages(rabbit_config["AMQP_URI"], 1)
    assert parked[0].body == b"\xff\xfe not json"
    assert "decode" in parked[0].headers["x-huiying-reason"].lower()


def referred_event(case_id: str) -> dict:
    """A case_referred event as routing publishes it (supervision starts the case from it)."""
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": "case_referred",
        "occurred_at": "2026-10-09T10:00:00+08:00",
        "case_id": case_id,
        "source": "hotline-12345",
        "category": "urban_management",
        "kind": "referral",
        "street": "nanwan",
        "round": 1,
        "referrals": [
            {
                "referral_id": f"{case_id}-R1",
                "department": "cgj",
                "department_name": "区城管局",
                "lead": True,
                "due_at": "2026-10-16T23:59:59+08:00",
                "return_by": "2026-10-13T23:59:59+08:00",
            }
        ],
    }


def test_in_a_message_of_several_events_only_the_poison_one_is_retried_and_parked(
    run_services, rpc, monkeypatch, rabbit_config
):
    """The outbox publishes a batch's events of one type as one message: the events of it that
    can be handled are, and only the one that cannot is retried on its own, then parked alone."""
    from kombu import Producer

    from services.common import events
    from services.common.topology import event_exchange
    from services.supervision import projection

    real, seen = projection.record_routing_events, []

    def fails_for_one_case(session, batch, settings, to_place=None):
        seen.append([event["case_id"] for event in batch])
        if any(event["case_id"] == "LG-2026-000902" for event in batch):
            raise ValueError("this event can never be projected")
        return real(session, batch, settings, to_place)

    monkeypatch.setattr(events, "MAX_ATTEMPTS", 2)
    monkeypatch.setattr(projection, "record_routing_events", fails_for_one_case)
    run_services("supervision")
    envelope = [referred_event(f"LG-2026-00090{n}") for n in (1, 2, 3)]
    with Connection(rabbit_config["AMQP_URI"]) as connection:
        Producer(connection.channel()).publish(
            envelope,
            exchange=event_exchange("routing"),
            routing_key="case_referred",
            serializer="json",
            delivery_mode=2,
        )
    wait_for(lambda: referrals_seen_by_supervision(rpc, "LG-2026-000901"), timeout=15)
    wait_for(lambda: referrals_seen_by_supervision(rpc, "LG-2026-000903"), timeout=15)
    [parked] = parked_messages(rabbit_config["AMQP_URI"], 1)
    assert json.loads(parked.body)["event_id"] == envelope[1]["event_id"]  # that event alone
    assert parked.headers["x-huiying-reason"] == "failed 2 times, last: ValueError: this event can never be projected"
    assert seen[0] == ["LG-2026-000901", "LG-2026-000902", "LG-2026-000903"]  # one batch first
    assert referrals_seen_by_supervision(rpc, "LG-2026-000902") == []


def test_a_step_on_a_referral_that_came_before_its_case_referred_is_applied_when_that_comes(
    run_services, rpc, rabbit_config
):
    """Routing's events come in one queue per type: a referral_accepted may reach supervision
    before the case_referred that made the referral. It is recorded at once (the case starts from
    it: the timeline shows it before any referral), and the case_referred applies it."""
    from kombu import Producer

    from services.common.topology import event_exchange

    run_services("supervision")
    case_id = "LG-2026-000950"
    referred = referred_event(case_id)
    accepted = {
        "event_id": str(uuid.uuid4()),
        "event_type": "referral_accepted",
        "occurred_at": "2026-10-09T11:00:00+08:00",
        "case_id": case_id,
        "referral_id": f"{case_id}-R1",
        "department": "cgj",
    }

    def publish(event):
        with Connection(rabbit_config["AMQP_URI"]) as connection:
            Producer(connection.channel()).publish(
                [event],
                exchange=event_exchange("routing"),
                routing_key=event["event_type"],
                serializer="json",
                delivery_mode=2,
            )

    def timeline():
        try:
            return [step["event"] for step in rpc.supervision.get_case_record(case_id)["timeline"]]
        except RemoteError:  # no case yet
            return None

    publish(accepted)
    assert wait_for(timeline, timeout=10) == ["referral_accepted"]
    assert referrals_seen_by_supervision(rpc, case_id) == []
    publish(referred)
    wait_for(lambda: [r for r in referrals_seen_by_supervision(rpc, case_id) if r["status"] == "accepted"], timeout=15)
    assert timeline() == ["case_referred", "referral_accepted"]
