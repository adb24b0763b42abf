"""Kill -9 each service in turn, and restart RabbitMQ, while cases stream in through intake's HTTP
API and AMQP channel; then reconcile the database against the log of what was accepted:
0 lost, 0 duplicated, every case routed once, seen by supervision, notified once."""

import subprocess
import time

import pytest

from tests.faults.conftest import LONG
from tests.faults.harness import (
    SERVICES,
    Sender,
    assert_nothing_lost_or_doubled,
    case_payload,
    finished,
    stream,
    unmasked_phones,
)

CASES = 2000 if LONG else 240
RATE = 40 if LONG else 20  # cases per second, offered


def test_kill_minus_9_each_service_in_turn_loses_and_doubles_nothing(make_stack, capsys):
    stack = make_stack()
    stack.up()
    sender = Sender(stack, stack.keys["hotline"])
    killed = {}

    def kill(service):
        def fault():
            killed[service] = stack.kill(service)
            time.sleep(1.0)  # messages pile up meanwhile; HTTP clients retry
            return stack.restart_in_background()

        return fault

    # Each service is killed once, a fifth of the way apart, while cases keep coming.
    faults = {CASES * (k + 1) // 5: kill(service) for k, service in enumerate(SERVICES)}
    restarts = stream(sender, CASES, RATE, "K", faults)
    for restart in restarts:
        assert restart.wait(120) == 0, (stack.var / "log" / "restarts.txt").read_text()
    figures = finished(stack, sender)
    with capsys.disabled():
        print(
            f"\nkill -9 {', '.join(killed)} while {CASES} cases streamed at {RATE}/s:"
            f" stored {figures['stored']}, lost {len(figures['lost'])}, extra {len(figures['extra'])},"
            f" HTTP retries {sender.http_retries}, AMQP retries {sender.amqp_retries}"
        )
    assert set(killed) == set(SERVICES)
    assert_nothing_lost_or_doubled(figures, CASES)
    assert all(n == 0 for n in stack.dead_letters().values()), stack.dead_letters()
    assert stack.scalar("SELECT count(*) FROM notify_deliveries WHERE event_type = 'case_referred'") > 0
    assert unmasked_phones(stack.logs()) == {}


def rabbitmqctl(*args):
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


@pytest.fixture
def broker_restart():
    """Stops and starts the RabbitMQ application (connections drop; durable queues and persistent
    messages survive, as in a real restart). Makes sure it runs again whatever the test does."""
    yield lambda: (rabbitmqctl("stop_app"), time.sleep(3), rabbitmqctl("start_app"))
    rabbitmqctl("start_app")
    rabbitmqctl("await_startup")


@pytest.mark.alone  # every other test's connections drop with it: scripts/test runs it after the rest
def test_a_broker_restart_mid_stream_loses_nothing_and_every_service_reconnects(make_stack, broker_restart, capsys):
    stack = make_stack()
    stack.up()
    sender = Sender(stack, stack.keys["hotline"])
    count = CASES // 2
    outage = {}

    def restart_broker():
        started = time.monotonic()
        broker_restart()
        outage["seconds"] = time.monotonic() - started

    stream(sender, count, RATE, "B", {count // 3: restart_broker})
    figures = finished(stack, sender)
    with capsys.disabled():
        print(
            f"\nRabbitMQ restarted ({outage['seconds']:.1f}s down) while {count} cases streamed:"
            f" stored {figures['stored']}, lost {len(figures['lost'])}, HTTP retries {sender.http_retries},"
            f" AMQP retries {sender.amqp_retries}"
        )
    assert_nothing_lost_or_doubled(figures, count)
    # Every service reconnected by itself: healthy, and still consuming.
    status = stack.cli("status", "--json")
    assert status.returncode == 0
    after = case_payload(count, "hotline-12345", "B")
    sender.amqp(after)
    assert finished(stack, sender)["stored"] == count + 1
