"""HUIYING_QUEUE_TYPE=quorum: every durable work queue is a quorum queue (replicated when the broker
is a cluster), and the system works the same on them: both channels in, routing, supervision's
projection, notify, broker-delayed retries (per-message TTL, then dead-lettering back) and the
dead-letter queues. nameko's RPC queues stay classic. A bad value is refused at start."""

import json
import subprocess
import sys

import pytest
from nameko.exceptions import RemoteError
from sqlalchemy import select

from services.common import config as settings
from services.common.retrying import REASON_HEADER
from services.common.topology import TopologyMismatch, declare_all, work_queue_arguments
from services.intake.models import cases as intake_cases
from services.intake.ticket_queue import DEAD_QUEUE as TICKETS_DEAD_QUEUE
from tests.conftest import take_messages, wait_for
from tests.support import free_port

pytestmark = pytest.mark.interface

TICKET = {
    "source": "hotline-12345",
    "title": "南湾街道路灯不亮",
    "description": "丹竹头社区一段路灯连续一周不亮",
    "street": "南湾",
}


@pytest.fixture(autouse=True)
def quorum(monkeypatch):
    """Set before the topology fixture declares anything (autouse fixtures come first)."""
    monkeypatch.setenv("HUIYING_QUEUE_TYPE", "quorum")


@pytest.fixture
def stack(run_services, rpc, demo_directory, monkeypatch):
    # notify's e-mails go to a port where nothing listens: they fail and wait in the retry queue
    monkeypatch.setenv("HUIYING_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("HUIYING_SMTP_PORT", str(free_port()))
    run_services("intake", "routing", "supervision", "notify")
    rpc.intake.load_directory(demo_directory)
    return rpc


@pytest.fixture
def publish(publish_ticket):
    return publish_ticket


def case_id_for(db, external_id, channel="amqp"):
    with db.connect() as connection:
        return connection.scalar(
            select(intake_cases.c.id).where(
                intake_cases.c.external_id == external_id, intake_cases.c.channel == channel
            )
        )


def referred(rpc, case_id):
    try:
        found = rpc.routing.get_case_routing(case_id)
    except RemoteError:  # not there yet
        return None
    return found if found["status"] == "referred" else None


def projected_referrals(rpc, case_id):
    try:
        return rpc.supervision.get_case_record(case_id)["referrals"]
    except RemoteError:
        return []


def dead_letters(amqp_uri, queue, count, timeout):
    return take_messages(amqp_uri, queue, count, timeout)


def test_every_work_queue_is_quorum_and_a_case_flows_from_both_channels_to_supervision(
    stack, publish, db, rabbit_manager, rabbit_config, topology
):
    rpc = stack
    publish({**TICKET, "external_id": "Q-AMQP-1"})
    by_rpc = rpc.intake.submit_case({**TICKET, "external_id": "Q-RPC-1"})["id"]
    by_amqp = wait_for(lambda: case_id_for(db, "Q-AMQP-1"), timeout=15)
    for case_id in (by_amqp, by_rpc):
        routed = wait_for(lambda: referred(rpc, case_id), timeout=15)
        assert routed["referrals"][0]["department"] == "cgj"
        assert wait_for(lambda: projected_referrals(rpc, case_id), timeout=15)[0]["department"] == "cgj"
    # notify consumed the events and its own delivery queue (the e-mails failed: no SMTP server)
    wait_for(lambda: any(d["attempts"] >= 1 for d in rpc.notify.deliveries_for(by_rpc)), timeout=15)

    queues = {q["name"]: q for q in rabbit_manager.get_queues(rabbit_config["vhost"])}
    work = [
        *topology,  # event-handler queues, tickets (+ retry, dead), deliveries (+ retry, dead)
        *(f"{name}.retry" for name in topology if name.startswith("evt-")),
        "huiying.events.dead",
    ]
    assert {"huiying.intake.tickets.retry", "huiying.notify.deliveries.dead"} <= set(work)
    not_quorum = {name: queues[name]["type"] for name in work if queues[name]["type"] != "quorum"}
    assert not_quorum == {}
    assert queues["huiying.intake.tickets.retry"]["arguments"]["x-dead-letter-strategy"] == "at-least-once"
    # the only other queues: nameko's RPC queues and reply queues, classic on purpose
    others = {name: q["type"] for name, q in queues.items() if name not in work}
    assert {"rpc-intake", "rpc-routing", "rpc-supervision", "rpc-notify"} <= set(others)
    assert all(name.startswith("rpc") and kind == "classic" for name, kind in others.items()), others


def test_a_failing_handler_and_a_failing_ticket_come_back_through_quorum_retry_queues(stack, publish, db, monkeypatch):
    from services.intake import cases
    from services.supervision import projection

    rpc = stack
    real_record, events = projection.record_routing_events, []

    def flaky_record(session, batch, settings, to_place=None):
        events.extend(event["event_type"] for event in batch)
        if "case_referred" in (e["event_type"] for e in batch) and events.count("case_referred") == 1:
            raise RuntimeError("database hiccup")
        return real_record(session, batch, settings, to_place)

    real_submit, submits = cases.submit_many, []

    def flaky_submit(*args, **kwargs):
        submits.append(1)
        if len(submits) == 1:
            raise RuntimeError("database unavailable")
        return real_submit(*args, **kwargs)

    monkeypatch.setattr(projection, "record_routing_events", flaky_record)
    monkeypatch.setattr(cases, "submit_many", flaky_submit)
    publish({**TICKET, "external_id": "Q-FLAKY-1"})
    case_id = wait_for(lambda: case_id_for(db, "Q-FLAKY-1"), timeout=15)
    assert len(submits) == 2  # failed once, back from huiying.intake.tickets.retry after 1 s
    wait_for(lambda: projected_referrals(rpc, case_id), timeout=15)
    assert events.count("case_referred") == 2  # back from evt-routing-case_referred--….retry


def test_poison_tickets_reach_the_quorum_dead_letter_queue(stack, publish, rabbit_config, monkeypatch):
    from services.intake import cases, ticket_queue

    publish(b"{broken json")
    [undecodable] = dead_letters(rabbit_config["AMQP_URI"], TICKETS_DEAD_QUEUE, 1, timeout=10)
    assert "decoded" in undecodable.headers[REASON_HEADER]

    monkeypatch.setattr(ticket_queue, "MAX_ATTEMPTS", 2)  # one pass through the retry queue
    monkeypatch.setattr(cases, "submit_many", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("still down")))
    publish({**TICKET, "external_id": "Q-POISON-1"})
    [parked] = dead_letters(rabbit_config["AMQP_URI"], TICKETS_DEAD_QUEUE, 1, timeout=15)
    assert parked.headers[REASON_HEADER] == "failed 2 times, last: RuntimeError: still down"
    assert json.loads(parked.body)["external_id"] == "Q-POISON-1"


def test_classic_queues_keep_their_arguments_and_a_switch_in_place_is_refused_with_what_to_do(
    rabbit_config, monkeypatch
):
    monkeypatch.setenv("HUIYING_QUEUE_TYPE", "classic")
    assert work_queue_arguments({"x-dead-letter-exchange": ""}) == {"x-dead-letter-exchange": ""}
    declare_all(rabbit_config["AMQP_URI"])
    monkeypatch.setenv("HUIYING_QUEUE_TYPE", "quorum")
    with pytest.raises(TopologyMismatch) as refused:
        declare_all(rabbit_config["AMQP_URI"])
    message = str(refused.value)
    assert "PRECONDITION_FAILED" in message and "x-queue-type" in message
    assert "HUIYING_QUEUE_TYPE=quorum" in message and "delete_queue" in message


@pytest.mark.parametrize("value", ["mirrored", "stream", "quorum-ish"])
def test_an_unknown_queue_type_is_refused_naming_the_variable_and_the_allowed_values(value, monkeypatch):
    monkeypatch.setenv("HUIYING_QUEUE_TYPE", value)
    expected = f"HUIYING_QUEUE_TYPE must be 'classic' or 'quorum' (default 'classic'), not '{value}'"
    with pytest.raises(settings.ConfigurationError) as refused:
        settings.nameko_config("routing")
    assert str(refused.value) == expected
    with pytest.raises(settings.ConfigurationError):
        declare_all("amqp://guest:guest@127.0.0.1:1/")  # refused before any connection


def test_a_service_started_with_an_unknown_queue_type_exits_with_that_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HUIYING_QUEUE_TYPE", "mirrored")
    monkeypatch.setenv("AMQP_URI", "amqp://guest:guest@127.0.0.1:1/")  # never reached
    monkeypatch.setenv("HUIYING_VAR_DIR", str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "services.common.runner", "routing"],
        cwd=settings.PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .endswith("HUIYING_QUEUE_TYPE must be 'classic' or 'quorum' (default 'classic'), not 'mirrored'")
    )
