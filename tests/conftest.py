"""Test fixtures: real RabbitMQ (a fresh vhost per test, from nameko's pytest plugin) and a real
database (PostgreSQL by default: HUIYING_TEST_DATABASE_URL), the services run in-process.

eventlet must patch the standard library before anything else is imported.
"""

import os
import warnings

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
# trio (which selenium brings for the board's browser test) registers a hypothesis plugin that
# imports trio, and trio cannot be imported once eventlet has patched the socket module.
os.environ.setdefault("HYPOTHESIS_NO_PLUGINS", "1")

import eventlet  # noqa: E402

eventlet.monkey_patch()

from psycogreen.eventlet import patch_psycopg  # noqa: E402

patch_psycopg()

import gc  # noqa: E402
import json  # noqa: E402
import mailbox  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import weakref  # noqa: E402
from pathlib import Path  # noqa: E402

import eventlet.wsgi  # noqa: E402
import pytest  # noqa: E402
from kombu import Connection, Queue  # noqa: E402
from sqlalchemy import text  # noqa: E402

from services.common import config as settings  # noqa: E402
from services.common.db import create_db_engine  # noqa: E402
from tests.support import DEMO_DIRECTORY, TEST_DATABASE_URL, free_port  # noqa: E402

# No greenthread a test started may outlive it. One that did (a killed supervision's evaluation
# after events, still gathering) wrote agenda items into the next test's emptied database and
# failed that test (CI, 3 Dec). Checked in hooks, after every fixture's teardown: nameko's own
# autouse fixtures (runner_factory's kill) are torn down after any fixture of ours.
GREENTHREADS_BEFORE = pytest.StashKey[weakref.WeakSet]()
GRACE_SECONDS = 0.25  # for a thread that ends on its own just after the kill


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    item.stash[GREENTHREADS_BEFORE] = weakref.WeakSet(live_greenthreads())
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    before = item.stash.get(GREENTHREADS_BEFORE, weakref.WeakSet())
    deadline = time.monotonic() + GRACE_SECONDS
    while (left := [t for t in live_greenthreads() if t not in before and not session_long(t)]) and (
        time.monotonic() < deadline
    ):
        eventlet.sleep(0.05)
    if left:
        raise AssertionError(
            f"{len(left)} greenthread(s) outlived {item.nodeid}:\n" + "\n".join(sorted(where(t) for t in left))
        )
    return result


def live_greenthreads() -> list:
    """Every greenthread not yet finished (the hub's own greenlet aside)."""
    import greenlet

    found = []
    for thing in gc.get_objects():
        try:
            if isinstance(thing, greenlet.greenlet) and thing.parent is not None and not thing.dead:
                found.append(thing)
        except ReferenceError:  # a weak proxy whose object is gone
            pass
    return found


def session_long(thread) -> bool:
    """nameko's vhost pipeline: made in the first test's setup, for the whole session."""
    frame = thread.gr_frame
    while frame is not None:
        if frame.f_code.co_filename.endswith("nameko/testing/utils.py"):
            return True
        frame = frame.f_back
    return False


def where(thread) -> str:
    """A greenthread's innermost frames, for the failure message."""
    frames, frame = [], thread.gr_frame
    while frame is not None:
        frames.append(f"{frame.f_code.co_name} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})")
        frame = frame.f_back
    return " < ".join(frames[:6]) or "not started"


@pytest.fixture(scope="session")
def database_url():
    """A clean schema with every service's migrations applied, once per test run."""
    from services.common.migrations import upgrade

    engine = create_db_engine(TEST_DATABASE_URL)
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("DROP SCHEMA public CASCADE"))
            connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    for service in settings.SERVICES:
        upgrade(service, TEST_DATABASE_URL)
    return TEST_DATABASE_URL


@pytest.fixture
def db(database_url):
    """The test database, emptied before each test."""
    engine = create_db_engine(database_url)
    with engine.begin() as connection:
        tables = [
            row[0]
            for row in connection.execute(
                text(
                    "SELECT tablename FROM pg_tables"
                    " WHERE schemaname='public' AND tablename NOT LIKE 'alembic_version_%'"
                )
            )
        ]
        # Only the tables a test wrote to: one query finds them, and TRUNCATE of all 22 took
        # 60-150 ms a test when most are empty.
        written = [
            row[0]
            for row in connection.execute(
                text(" UNION ALL ".join(f"(SELECT '{table}' FROM {table} LIMIT 1)" for table in tables))
            )
        ]
        if written:
            connection.execute(text(f"TRUNCATE {', '.join(written)} CASCADE"))
        # Every id sequence from 1 again, also of a table the test emptied itself.
        connection.execute(
            text(
                "SELECT setval(format('%I.%I', schemaname, sequencename), 1, false) FROM pg_sequences"
                " WHERE schemaname = 'public' AND last_value IS NOT NULL"
            )
        )
    yield engine
    engine.dispose()


@pytest.fixture
def service_config(rabbit_config, db, database_url):
    """nameko config for one service under test; its HTTP server gets a free port."""

    def make(service: str) -> dict:
        config = settings.nameko_config(service)
        config.update(
            AMQP_URI=rabbit_config["AMQP_URI"],
            DATABASE_URL=database_url,
            WEB_SERVER_ADDRESS=f"127.0.0.1:{free_port()}",
        )
        return config

    return make


@pytest.fixture
def topology(rabbit_config):
    """Every exchange and queue declared in this test's vhost, as `huiying up` does."""
    from services.common.topology import declare_all

    return declare_all(rabbit_config["AMQP_URI"])


@pytest.fixture
def run_services(runner_factory, service_config, topology):
    """Start services in-process: ``urls = run_services("intake", "supervision")``."""
    from services.common.runner import load_service_class

    def start(*names):
        urls = {}
        for name in names:
            config = service_config(name)
            runner = runner_factory(config, load_service_class(name))
            runner.start()
            urls[name] = f"http://{config['WEB_SERVER_ADDRESS']}"
        return urls

    return start


class EventTap:
    """A test queue bound to a service's events exchange: what was really published."""

    def __init__(self, amqp_uri: str, service: str, event_type: str):
        from services.common.topology import event_exchange

        self.connection = Connection(amqp_uri)
        self.queue = Queue(
            f"test-tap-{service}-{event_type}",
            exchange=event_exchange(service),
            routing_key=event_type,
            durable=False,
            auto_delete=False,
        )
        self.queue(self.connection.channel()).declare()

    def drain(self, expect: int, timeout: float = 10) -> list[dict]:
        """Wait until ``expect`` events arrived, then a moment more to catch extras."""
        events, deadline = [], time.monotonic() + timeout
        channel = self.connection.channel()
        bound = self.queue(channel)
        while time.monotonic() < deadline:
            message = bound.get(no_ack=True)
            if message is None:
                if len(events) >= expect:
                    time.sleep(0.3)
                    message = bound.get(no_ack=True)
                    if message is None:
                        break
                else:
                    time.sleep(0.05)
                    continue
            events.append(json.loads(message.body))
        return events

    def close(self):
        self.connection.release()


@pytest.fixture
def event_tap(rabbit_config, topology):
    taps = []

    def make(service: str, event_type: str) -> EventTap:
        tap = EventTap(rabbit_config["AMQP_URI"], service, event_type)
        taps.append(tap)
        return tap

    yield make
    for tap in taps:
        tap.close()


@pytest.fixture
def rpc(rabbit_config):
    from nameko.standalone.rpc import ClusterRpcProxy

    with ClusterRpcProxy({"AMQP_URI": rabbit_config["AMQP_URI"], "serializer": "json"}, timeout=30) as proxy:
        yield proxy


@pytest.fixture
def demo_directory():
    from services.common.directory import load_directory_file

    return load_directory_file(DEMO_DIRECTORY).model_dump(mode="json")


def wait_for(predicate, timeout: float = 10, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture
def publish_ticket(rabbit_config):
    """``publish_ticket(body, content_type)``: a message on the AMQP ticket channel, as a ticketing
    system sends it (a dict is sent as JSON, bytes as they are)."""
    from kombu import Producer

    from services.intake.ticket_queue import ROUTING_KEY, TICKET_EXCHANGE

    connection = Connection(rabbit_config["AMQP_URI"])
    producer = Producer(connection.channel(), exchange=TICKET_EXCHANGE)

    def send(body, content_type="application/json"):
        raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
        producer.publish(
            raw, routing_key=ROUTING_KEY, content_type=content_type, content_encoding="utf-8", delivery_mode=2
        )

    yield send
    connection.release()


def take_messages(amqp_uri: str, queue: Queue, count: int, timeout: float = 10) -> list:
    """Take (and ack) messages from ``queue`` until ``count`` have come, within ``timeout``."""
    found = []
    with Connection(amqp_uri) as connection:
        bound = queue(connection.channel())

        def collect():
            message = bound.get(no_ack=True)
            if message is not None:
                found.append(message)
            return len(found) >= count

        wait_for(collect, timeout)
    return found


def wait_supervised(rpc, case_id: str, timeout: float = 15) -> dict:
    """Supervision's record of ``case_id`` once both intake's event (the case's text, its
    cluster) and routing's first (its referral or triage) are in it: its queue of intake's events
    gathers for a quarter of a second, so routing's is often projected first."""

    def whole():
        try:
            record = rpc.supervision.get_case_record(case_id)
        except Exception:  # not projected yet
            return None
        events = {step["event"] for step in record["timeline"]}
        return record if "case_received" in events and events & {"case_referred", "case_needs_triage"} else None

    return wait_for(whole, timeout=timeout)


def wait_routed(rpc, case_id: str, timeout: float = 15) -> dict:
    """Routing's record of ``case_id`` once routing has decided it (referred or triaged)."""

    def routed():
        try:
            return rpc.routing.get_case_routing(case_id)["status"] != "awaiting_routing"
        except Exception:
            return False

    wait_for(routed, timeout=timeout)
    return rpc.routing.get_case_routing(case_id)


@pytest.fixture
def project_root() -> Path:
    return settings.PROJECT_ROOT


class Receiver:
    """A local HTTP endpoint (an SMS gateway, a webhook, a ticketing system's callback) that
    records what it is sent; ``fail`` makes it answer 503."""

    def __init__(self):
        self.requests, self.fail = [], 0
        self.port = free_port()
        server = eventlet.listen(("127.0.0.1", self.port))
        self.thread = eventlet.spawn(eventlet.wsgi.server, server, self.app, log_output=False)

    def app(self, environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        if self.fail:
            self.fail -= 1
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"down"]
        self.requests.append(
            {"path": environ["PATH_INFO"], "body": body, "signature": environ.get("HTTP_X_HUIYING_SIGNATURE")}
        )
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b'{"errcode": 0}']

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path):
        return [r for r in self.requests if r["path"] == path]

    def close(self):
        self.thread.kill()


def accepts_connections(port: int) -> bool:
    """Whether something on this machine takes a TCP connection on ``port`` now."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class SmtpServer:
    """A real SMTP server (aiosmtpd) in its own process, delivering into a maildir."""

    def __init__(self, box: Path):
        self.port, self.box = free_port(), box
        self.process = subprocess.Popen(
            [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{self.port}"]
            + ["-c", "aiosmtpd.handlers.Mailbox", str(box)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # aiosmtpd makes the maildir before it listens: ready once a connection is taken
        wait_for(lambda: box.exists() and accepts_connections(self.port), timeout=10)

    def messages(self) -> list:
        return list(mailbox.Maildir(str(self.box), create=False))

    def close(self):
        self.process.terminate()
        self.process.wait(5)


@pytest.fixture
def smtp(tmp_path):
    """``(port, messages)`` of a real SMTP server for this test."""
    server = SmtpServer(tmp_path / "maildir")
    yield server.port, server.messages
    server.close()
