"""LOCAL ONLY (HUIYING_LONG_TESTS=1): a quorum queue keeps every confirmed message when a broker
node is lost, the queue's leader or a follower, killed with SIGKILL right after the last confirm.

``scripts/rabbit-cluster`` starts a separate three-node cluster on this machine (hy1, hy2,
hy3@localhost on 127.0.0.1:5681-5683, with its own data, ports and Erlang cookie) and the test stops
it at the end; the default node on 5672 is never touched. This is the broker property that
HUIYING_QUEUE_TYPE=quorum relies on: a publisher confirm from a quorum queue means a majority of
its members has the message, so losing any one node loses nothing confirmed.

    HUIYING_LONG_TESTS=1 .venv/bin/python -m pytest tests/faults/test_rabbit_cluster.py -s
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import amqp
import pytest

from tests.conftest import wait_for

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "rabbit-cluster"
RABBITMQ_BIN = Path(os.environ.get("RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
PORTS = {1: 5681, 2: 5682, 3: 5683}
N = 2000
COLUMNS = ("name", "leader", "members", "online")

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(os.environ.get("HUIYING_LONG_TESTS") != "1", reason="local only: set HUIYING_LONG_TESTS=1"),
    pytest.mark.skipif(
        not (RABBITMQ_BIN / "rabbitmq-server").exists() or shutil.which("setsid") is None,
        reason="needs rabbitmq-server installed (RABBITMQ_BIN) and setsid",
    ),
]


def cluster_script(*args, timeout=300) -> str:
    done = subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"rabbit-cluster {' '.join(map(str, args))}: {done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def cluster():
    try:
        cluster_script("start")
        yield
    finally:
        cluster_script("stop")


def queue_state(queue: str, via: int) -> dict | None:
    try:
        listed = cluster_script("ctl", via, "list_queues", *COLUMNS, "--formatter", "json", timeout=30)
        rows = json.loads(listed)
    except (AssertionError, ValueError):
        return None
    return next((row for row in rows if row["name"] == queue), None)


def node_number(node: str) -> int:
    return int(node.split("@", 1)[0].removeprefix("hy"))


def connect(port: int, **options) -> amqp.Connection:
    connection = amqp.Connection(f"127.0.0.1:{port}", userid="guest", password="guest", connect_timeout=5, **options)
    connection.connect()
    return connection


def publish_confirmed(port: int, queue: str, count: int) -> list[str]:
    """Persistent messages, each returned only once the broker confirmed it (a nack raises)."""
    confirmed = []
    connection = connect(port, confirm_publish=True)
    try:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"})
        for i in range(count):
            body = f"{queue}:{i}"
            channel.basic_publish(amqp.Message(body, delivery_mode=2), exchange="", routing_key=queue)
            confirmed.append(body)  # basic_publish returned: the broker acked it
    finally:
        connection.close()
    return confirmed


def consume_everything(ports: list[int], queue: str, expect: int, timeout: float = 90) -> tuple[list[str], float]:
    """Get and ack every message through the surviving nodes, retrying while a new leader is
    elected; returns the bodies (duplicates possible: at-least-once) and the seconds it took."""
    started, got = time.monotonic(), []
    deadline = started + timeout
    attempt = 0
    while time.monotonic() < deadline:
        port = ports[attempt % len(ports)]
        attempt += 1
        try:
            connection = connect(port)
            try:
                channel = connection.channel()
                while (message := channel.basic_get(queue, no_ack=False)) is not None:
                    body = message.body.decode() if isinstance(message.body, bytes) else message.body
                    got.append(body)
                    channel.basic_ack(message.delivery_tag)
            finally:
                connection.close()
        except (amqp.exceptions.AMQPError, OSError):
            time.sleep(0.5)  # no leader yet, or this node is not serving the queue yet
            continue
        if len(set(got)) >= expect:
            break
        time.sleep(0.5)
    return got, time.monotonic() - started


@pytest.mark.parametrize("lose", ["follower", "leader"])
def test_every_confirmed_message_survives_the_loss_of_a_node(cluster, lose):
    queue = f"huiying.faults.{lose}"
    wait_for(lambda: (s := queue_state(queue, 1)) is None or len(s["online"]) == 3, timeout=60)
    confirmed = publish_confirmed(PORTS[1], queue, N)
    state = wait_for(lambda: queue_state(queue, 1), timeout=30)
    assert sorted(state["members"]) == ["hy1@localhost", "hy2@localhost", "hy3@localhost"], state
    leader = node_number(state["leader"])
    victim = leader if lose == "leader" else next(n for n in PORTS if n != leader)
    cluster_script("kill", victim)  # SIGKILL: a crash, no clean shutdown
    survivors = [n for n in PORTS if n != victim]
    try:
        got, seconds = consume_everything([PORTS[n] for n in survivors], queue, N)
        after = wait_for(lambda: queue_state(queue, survivors[0]), timeout=30)
        print(
            f"\n{lose} hy{victim} killed (leader was hy{leader}, now {after['leader']}): "
            f"{len(confirmed)} confirmed, {len(set(got))} distinct consumed ({len(got)} deliveries) "
            f"from hy{survivors[0]}/hy{survivors[1]} in {seconds:.1f}s"
        )
        assert len(confirmed) == N
        assert set(got) == set(confirmed)
        assert node_number(after["leader"]) in survivors
    finally:
        cluster_script("start-node", victim)  # back for the next case
