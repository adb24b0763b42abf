"""A supervision container that stops or is killed leaves no work of its own behind: the
evaluation after events and the sweepers of the periodic sweep end with it, and nothing that
finishes after the stop opens a broker connection. Before they were
container-managed, a killed supervision's evaluation ran later and wrote agenda items into the
database the next test had just emptied (CI, 3 Dec: test_hostile_rules found another test's case
on its agenda)."""

import eventlet
import pytest
from kombu import Connection, Exchange, Producer
from sqlalchemy import func, select

from services.common.outbox import BatchPublisher, PublisherShut
from services.common.topology import event_exchange
from services.supervision.models import agenda, outbox
from services.supervision.service import SupervisionService
from tests.conftest import wait_for
from tests.interface.test_event_retries import referred_event

pytestmark = pytest.mark.interface
OVERDUE_CASE = "LG-2026-000950"  # referred_event's deadline, 16 Oct 2026, is long past


@pytest.fixture
def supervision(runner_factory, service_config, topology):
    runner = runner_factory(service_config("supervision"), SupervisionService)
    runner.start()
    return runner


class HeldEvaluation:
    """The evaluation after events, held after it starts until ``release()``: long enough to stop
    or kill the container in the middle of it."""

    def __init__(self, monkeypatch):
        self.calls, self._released = [], eventlet.event.Event()
        real = SupervisionService._evaluate_cases

        def held(service, case_ids):
            self.calls.append("started")
            self._released.wait()
            real(service, case_ids)
            self.calls.append("finished")

        monkeypatch.setattr(SupervisionService, "_evaluate_cases", held)

    def release(self):
        self._released.send()


@pytest.fixture
def held_evaluation(monkeypatch):
    held = HeldEvaluation(monkeypatch)
    yield held
    if not held._released.ready():
        held.release()


def refer_an_overdue_case(rabbit_config):
    with Connection(rabbit_config["AMQP_URI"]) as connection:
        Producer(connection.channel()).publish(
            [referred_event(OVERDUE_CASE)],
            exchange=event_exchange("routing"),
            routing_key="case_referred",
            serializer="json",
            delivery_mode=2,
        )


def agenda_items(db) -> int:
    with db.connect() as connection:
        return connection.execute(select(func.count()).select_from(agenda)).scalar_one()


def test_a_stopped_supervision_finishes_the_evaluation_going_on(supervision, held_evaluation, rabbit_config, db):
    refer_an_overdue_case(rabbit_config)
    wait_for(lambda: held_evaluation.calls == ["started"], timeout=15)
    stopping = eventlet.spawn(supervision.stop)
    eventlet.sleep(4)  # a container's stop takes about 3 s here (nameko's consumers), if it need not wait
    assert not stopping.dead  # it waits for the evaluation
    held_evaluation.release()
    stopping.wait()
    assert held_evaluation.calls == ["started", "finished"]
    assert agenda_items(db) > 0  # the overdue case went on the agenda before the stop returned
    with db.connect() as connection:  # and its events are in the outbox, sent or left for the next relay
        escalated = select(func.count()).where(outbox.c.event_type == "case_escalated")
        assert connection.execute(escalated).scalar_one() > 0


def test_a_killed_supervision_leaves_no_evaluation_behind(supervision, held_evaluation, rabbit_config, db):
    refer_an_overdue_case(rabbit_config)
    wait_for(lambda: held_evaluation.calls == ["started"], timeout=15)
    supervision.kill()
    held_evaluation.release()  # an evaluation that outlived its container would go on now
    eventlet.sleep(1)
    assert held_evaluation.calls == ["started"]
    assert agenda_items(db) == 0


def test_a_killed_supervision_leaves_no_sweeper_behind(supervision, monkeypatch):
    calls = []

    def slow_sweep(self, me):
        calls.append("sweeping")
        eventlet.sleep(1)
        calls.append("swept")
        return 0, 0

    monkeypatch.setattr(SupervisionService, "_sweep_due_shards", slow_sweep)
    wait_for(lambda: calls, timeout=15)  # the periodic sweep's first tick, 5 s after the start
    supervision.kill()
    eventlet.sleep(2)
    assert "swept" not in calls


def test_a_publisher_shut_with_its_service_opens_no_connection_again(rabbit_config):
    """What finishes after the stop (the evaluation above) publishes nothing: a connection it
    opened then would stay open, nothing left to close it. Its events wait in the outbox."""
    publisher = BatchPublisher(rabbit_config["AMQP_URI"], Exchange("huiying.test.shut", type="topic", durable=True))
    publisher.publish_batch([("anything", {"n": 1})])
    assert publisher.connection is not None
    publisher.shut()
    with pytest.raises(PublisherShut, match="stopped with its service"):
        publisher.publish_batch([("anything", {"n": 2})])
    assert publisher.connection is None
