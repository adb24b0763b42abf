"""The whole system as separate processes on real RabbitMQ and PostgreSQL, for fault tests:
start it as an operator does (`huiying up`), feed it cases as the channels do, break it
(kill -9, broker restart, duplicated messages), and reconcile what was sent with what is stored.

Each stack has its own PostgreSQL database and RabbitMQ vhost, so nothing leaks between tests
or into a developer's running demo.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import requests
from kombu import Connection, Exchange, Producer
from sqlalchemy import create_engine, text

from tests.support import DEMO_DIRECTORY, TEST_DATABASE_URL, free_port

HUIYING = [sys.executable, "-m", "huiying.cli"]
SERVICES = ("intake", "routing", "supervision", "notify")
MANAGEMENT = "http://127.0.0.1:15672/api"
TICKETS = Exchange("huiying.tickets", "direct", durable=True)
# A mainland mobile number standing on its own (not inside a longer run of digits, nor touching
# an ASCII letter): what must never leak unmasked. A phone in a log stands after a space, a quote,
# a colon or Chinese text; eleven digits inside an event's UUID (a hex group such as
# "a16102573305") are not one, and such a group in routing's log once failed a clean-clone run.
PHONE = re.compile(r"(?<![0-9A-Za-z])1[3-9]\d{9}(?![0-9A-Za-z])")

STREETS = ["平湖", "布吉", "坂田", "南湾", "横岗", "龙城", "龙岗", "坪地", "园山", "宝龙", "吉华"]
TOPICS = [
    ("路灯不亮", "小区门口路灯一周不亮，夜间出行不便"),
    ("道路积水", "暴雨后路口积水严重，行人无法通行"),
    ("噪音扰民", "夜间施工噪音扰民，影响休息"),
    ("垃圾清运不及时", "垃圾桶满溢无人清运，气味难闻"),
    ("断头路", "两条道路之间断头路多年未打通，绕行严重"),
    ("AED配置", "地铁站和公园缺少AED除颤仪"),
    ("托育机构不足", "社区托育机构少，入托难"),
    ("公交线路调整", "公交线路调整后换乘不便，等车时间长"),
]


def case_payload(index: int, source: str, prefix: str) -> dict:
    """A realistic submission; every fourth carries a phone number in its text as well."""
    street = STREETS[index % len(STREETS)]
    title, description = TOPICS[index % len(TOPICS)]
    phone = f"139{index:08d}"[-11:]
    if index % 4 == 0:
        description += f"，联系电话{phone}"
    return {
        "source": source,
        "external_id": f"{prefix}-{index:06d}",
        "title": f"{street}街道{title}",
        "description": description,
        "street": street,
        "reporter_name": "市民",
        "reporter_phone": phone,
    }


class Stack:
    def __init__(self, root: Path, amqp_uri: str, vhost: str, database_url: str, extra_env: dict):
        self.root, self.amqp_uri, self.vhost, self.database_url = root, amqp_uri, vhost, database_url
        self.var = root / "var"
        self.rules = root / "rules"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HUIYING_")}
        self.env.update(
            AMQP_URI=amqp_uri,
            DATABASE_URL=database_url,
            HUIYING_VAR_DIR=str(self.var),
            HUIYING_RULES_DIR=str(self.rules),
            **extra_env,
        )
        for service in SERVICES:
            self.env[f"HUIYING_{service.upper()}_ADDRESS"] = f"127.0.0.1:{free_port()}"
        self.engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg2://"))
        self.replicas: list[subprocess.Popen] = []
        self.keys: dict[str, str] = {}

    # --- running it --------------------------------------------------------------------------

    def cli(self, *args, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
        result = subprocess.run(
            HUIYING + [str(a) for a in args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(f"huiying {' '.join(map(str, args))} exited {result.returncode}: {result.stderr}")
        return result

    def up(self, directory: Path = DEMO_DIRECTORY):
        self.cli("up")
        self.cli("directory", "load", directory)
        for name, option in [("hotline", "--source=hotline-12345"), ("staff", "--staff=office")]:
            self.keys[name] = json.loads(self.cli("credentials", "create", option, "--json").stdout)["key"]

    def restart_in_background(self) -> subprocess.Popen:
        """`huiying up` again, as an operator (or a supervisor like systemd) would."""
        log = open(self.var / "log" / "restarts.txt", "ab")  # not *.log: no service writes it
        return subprocess.Popen(HUIYING + ["up"], env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def url(self, service: str) -> str:
        return f"http://{self.env[f'HUIYING_{service.upper()}_ADDRESS']}"

    def pid(self, service: str) -> int | None:
        try:
            pid = int((self.var / "run" / f"{service}.pid").read_text())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def kill(self, service: str) -> int:
        pid = self.pid(service)
        assert pid, f"{service} is not running"
        os.kill(pid, signal.SIGKILL)
        return pid

    def start_replica(self, service: str, index: int) -> subprocess.Popen:
        """One more process of ``service`` (a competing consumer), with its own HTTP port and log."""
        env = dict(self.env, **{f"HUIYING_{service.upper()}_ADDRESS": f"127.0.0.1:{free_port()}"})
        log = open(self.var / "log" / f"{service}-{index}.log", "ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "services.common.runner", service],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        process.address = env[f"HUIYING_{service.upper()}_ADDRESS"]
        self.replicas.append(process)
        return process

    def down(self):
        """Kill everything at once: a fault test's stack is thrown away, so no graceful stop."""
        for process in self.replicas:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        for service in SERVICES:
            pid = self.pid(service)
            if pid:
                os.kill(pid, signal.SIGKILL)
        self.engine.dispose()

    # --- watching it -------------------------------------------------------------------------

    @staticmethod
    def rss_mb(pid: int) -> float:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no VmRSS for {pid}")

    def queues(self) -> dict:
        """``{queue: messages}``: ready + unacknowledged from the management API (refreshed every
        few seconds), or the exact ready count from a passive declare when that is higher."""
        vhost = requests.utils.quote(self.vhost, safe="")
        response = requests.get(f"{MANAGEMENT}/queues/{vhost}", auth=("guest", "guest"), timeout=10)
        response.raise_for_status()
        counts = {q["name"]: q.get("messages", 0) or 0 for q in response.json()}
        with Connection(self.amqp_uri, connect_timeout=5) as connection:
            channel = connection.channel()
            for name in counts:
                try:
                    counts[name] = max(counts[name], channel.queue_declare(name, passive=True).message_count)
                except Exception:  # an exclusive reply queue of another connection
                    channel = connection.channel()
        return counts

    def consumers(self) -> dict:
        """``{queue: consumers}`` from passive declares."""
        counts = {}
        with Connection(self.amqp_uri, connect_timeout=5) as connection:
            channel = connection.channel()
            for name in self.queues():
                try:
                    counts[name] = channel.queue_declare(name, passive=True).consumer_count
                except Exception:
                    channel = connection.channel()
        return counts

    def scalar(self, sql: str, **params):
        with self.engine.begin() as connection:
            return connection.execute(text(sql), params).scalar()

    def rows(self, sql: str, **params) -> list:
        with self.engine.connect() as connection:
            return connection.execute(text(sql), params).all()

    def pending_outbox(self) -> int:
        return sum(
            self.scalar(f"SELECT count(*) FROM {service}_outbox WHERE published_at IS NULL") for service in SERVICES
        )

    def unsent_deliveries(self) -> int:
        """Notifications recorded but not yet sent or given up: a message notify holds unacked
        while it sends can be missing from the management API's counts (refreshed every 5 s).
        (After a fault some wait for notify's timer by design: a minute when the broker was down
        as they were recorded, ten when notify died mid-send.)"""
        return self.scalar("SELECT count(*) FROM notify_deliveries WHERE status IN ('pending', 'sending', 'retrying')")

    def settled(self, deliveries_sent: bool = False) -> bool:
        busy = {
            name: n
            for name, n in self.queues().items()
            if n and not name.endswith(".dead") and not name.startswith("rpc-") and "reply" not in name
        }
        return not busy and self.pending_outbox() == 0 and (not deliveries_sent or self.unsent_deliveries() == 0)

    def wait_settled(self, timeout: float = 180, quiet_for: float = 6.0, deliveries_sent: bool = False):
        """Until every work queue is empty and every outbox published, for ``quiet_for`` seconds
        (exact ready counts from passive declares; the management API adds unacked ones); with
        ``deliveries_sent``, also every notification sent or given up. Quiet for longer than
        supervision's evaluation after events may wait to run (three times its previous run, which
        can reach a second under load: batching.InBackground) and the management API's statistics
        lag (5 s), or decisions may still come after."""
        deadline, quiet_since = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.settled(deliveries_sent):
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= quiet_for:
                    return
            else:
                quiet_since = None
            time.sleep(0.25)
        raise AssertionError(
            f"not settled within {timeout}s: {self.queues()}, outbox {self.pending_outbox()},"
            f" unsent deliveries {self.unsent_deliveries()}"
        )

    def dead_letters(self) -> dict:
        return {name: n for name, n in self.queues().items() if name.endswith(".dead")}

    def counts(self) -> dict:
        """What a person would count: cases, referrals, agenda items, notifications."""
        return {
            "cases": self.scalar("SELECT count(*) FROM intake_cases"),
            "routed cases": self.scalar("SELECT count(*) FROM routing_cases WHERE status <> 'awaiting_routing'"),
            "referrals": self.scalar("SELECT count(*) FROM routing_referrals"),
            "supervised cases": self.scalar("SELECT count(*) FROM supervision_cases"),
            "timeline entries": self.scalar("SELECT count(*) FROM supervision_timeline"),
            "decisions": self.scalar("SELECT count(*) FROM supervision_decisions"),
            "agenda items": self.scalar("SELECT count(*) FROM supervision_agenda"),
            "agenda links": self.scalar("SELECT count(*) FROM supervision_agenda_cases"),
            "deliveries": self.scalar("SELECT count(*) FROM notify_deliveries"),
            "events": {
                service: dict(
                    self.rows(f"SELECT event_type, count(*) FROM {service}_outbox GROUP BY event_type ORDER BY 1")
                )
                for service in SERVICES
            },
        }

    def logs(self) -> dict[str, str]:
        return {path.name: path.read_text(errors="replace") for path in (self.var / "log").glob("*.log")}


class Sender:
    """Feeds cases in as the channels do and keeps the log of what was accepted: an HTTP 200/201,
    or an AMQP publish the broker confirmed. A ticketing system retries what was not accepted
    (same external id), so the sender does too."""

    def __init__(self, stack: Stack, key: str):
        self.stack, self.key = stack, key
        self.accepted: dict[str, str] = {}  # external id → channel
        self.http_retries = self.amqp_retries = 0
        self.connection = Connection(stack.amqp_uri, transport_options={"confirm_publish": True}, connect_timeout=5)

    def http(self, payload: dict, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while True:
            try:
                response = requests.post(
                    f"{self.stack.url('intake')}/api/v1/cases",
                    json=payload,
                    headers={"Authorization": f"Bearer {self.key}"},
                    timeout=10,
                )
                if response.status_code in (200, 201):
                    self.accepted[payload["external_id"]] = "http"
                    return response.json()["id"]
                assert response.status_code >= 500, response.text  # 4xx would be our bug
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"intake did not accept {payload['external_id']} within {timeout}s"
            self.http_retries += 1
            time.sleep(0.2)

    def amqp(self, payload: dict, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while True:
            try:
                producer = Producer(self.connection.default_channel)
                producer.publish(
                    payload,
                    exchange=TICKETS,
                    routing_key="ticket",
                    serializer="json",
                    delivery_mode=2,
                    message_id=str(uuid.uuid4()),
                )
                self.accepted[payload["external_id"]] = "amqp"  # confirmed: publish returned
                return
            except Exception:
                self.amqp_retries += 1
                assert time.monotonic() < deadline, f"broker did not confirm {payload['external_id']}"
                try:
                    self.connection.close()
                except Exception:
                    pass
                self.connection = Connection(
                    self.stack.amqp_uri, transport_options={"confirm_publish": True}, connect_timeout=5
                )
                time.sleep(0.5)

    def close(self):
        self.connection.release()


def reconcile(stack: Stack, sender: Sender, source: str) -> dict:
    """Compare what was accepted with what is stored, case by case; returns the figures."""
    stored = dict(stack.rows("SELECT external_id, id FROM intake_cases WHERE source = :s", s=source))
    sent = set(sender.accepted)
    lost, extra = sent - set(stored), set(stored) - sent
    per_case_events = stack.rows(
        "SELECT payload->>'case_id', count(*) FROM routing_outbox"
        " WHERE event_type IN ('case_referred', 'case_needs_triage') GROUP BY 1 HAVING count(*) <> 1"
    )
    duplicated_referrals = stack.rows(
        "SELECT case_id, department, round, count(*) FROM routing_referrals GROUP BY 1, 2, 3 HAVING count(*) > 1"
    )
    received_twice = stack.rows(
        "SELECT payload->>'case_id', count(*) FROM intake_outbox WHERE event_type = 'case_received'"
        " GROUP BY 1 HAVING count(*) > 1"
    )
    unrouted = stack.scalar(
        "SELECT count(*) FROM intake_cases i LEFT JOIN routing_cases r ON r.case_id = i.id"
        " WHERE i.source = :s AND (r.case_id IS NULL OR r.status = 'awaiting_routing')",
        s=source,
    )
    unsupervised = stack.scalar(
        "SELECT count(*) FROM intake_cases i LEFT JOIN supervision_cases s ON s.case_id = i.id"
        " WHERE i.source = :s AND s.case_id IS NULL",
        s=source,
    )
    notified_twice = stack.rows(
        # events that happen once per case in a stream of new cases (escalations may be several)
        "SELECT d.case_id, d.event_type, d.recipient, d.channel, count(*) FROM notify_deliveries d"
        " WHERE d.event_type IN ('case_received', 'case_referred') GROUP BY 1, 2, 3, 4 HAVING count(*) > 1"
    )
    return {
        "sent": len(sent),
        "stored": len(stored),
        "lost": sorted(lost),
        "extra": sorted(extra),
        "routed other than once": per_case_events,
        "duplicated referrals": duplicated_referrals,
        "case_received more than once": received_twice,
        "unrouted": unrouted,
        "missing in supervision": unsupervised,
        "notified twice": notified_twice,
    }


def stream(sender, count: int, rate: float, prefix: str, faults: dict | None = None, each=None) -> list:
    """Send ``count`` cases at ``rate``/s, half by HTTP and half by AMQP. Before case i, run
    ``faults[i]()`` (what they return, if anything, is returned in a list) and ``each(i)``."""
    results, start = [], time.monotonic()
    for i in range(count):
        if faults and i in faults:
            results.append(faults[i]())
        if each:
            each(i)
        (sender.http if i % 2 else sender.amqp)(case_payload(i, "hotline-12345", prefix))
        time.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))
    return [r for r in results if r is not None]


def finished(stack, sender, timeout=240, settle_timeout=180) -> dict:
    """Wait until every accepted case is stored, routed and in supervision and all is quiet;
    then the reconciliation's figures."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        figures = reconcile(stack, sender, "hotline-12345")
        if not figures["lost"] and not figures["unrouted"] and not figures["missing in supervision"]:
            break
        time.sleep(1)
    stack.wait_settled(timeout=settle_timeout)
    return reconcile(stack, sender, "hotline-12345")


def assert_nothing_lost_or_doubled(figures, count):
    assert figures["sent"] == figures["stored"] == count, figures
    assert figures["lost"] == [] and figures["extra"] == []
    assert figures["routed other than once"] == [] and figures["duplicated referrals"] == []
    assert figures["case_received more than once"] == []
    assert figures["unrouted"] == 0 and figures["missing in supervision"] == 0
    assert figures["notified twice"] == []


def unmasked_phones(texts: dict[str, str]) -> dict[str, list[str]]:
    """``{where: [phone numbers found]}`` for every text that holds one."""
    found = {}
    for where, content in texts.items():
        hits = PHONE.findall(content)
        if hits:
            found[where] = sorted(set(hits))[:5]
    return found


class Resources:
    """Databases and vhosts made for stacks, dropped at the end."""

    def __init__(self):
        self.databases, self.vhosts = [], []
        parts = urlsplit(TEST_DATABASE_URL)
        self.admin_url = urlunsplit(parts._replace(path="/postgres"))
        self.base = parts

    def database(self) -> str:
        name = f"huiying_fault_{uuid.uuid4().hex[:10]}"
        connection = psycopg2.connect(self.admin_url)
        connection.autocommit = True
        connection.cursor().execute(f"CREATE DATABASE {name}")
        connection.close()
        self.databases.append(name)
        return urlunsplit(self.base._replace(path=f"/{name}"))

    def vhost(self) -> str:
        name = f"huiying-fault-{uuid.uuid4().hex[:10]}"
        auth = ("guest", "guest")
        try:
            requests.put(f"{MANAGEMENT}/vhosts/{name}", auth=auth, timeout=10).raise_for_status()
        except requests.ConnectionError:
            raise RuntimeError(
                f"RabbitMQ's management API ({MANAGEMENT}) is not answering; the fault tests and the "
                "benchmarks make a vhost each through it: rabbitmq-plugins enable rabbitmq_management"
            ) from None
        requests.put(
            f"{MANAGEMENT}/permissions/{name}/guest",
            json={"configure": ".*", "write": ".*", "read": ".*"},
            auth=auth,
            timeout=10,
        ).raise_for_status()
        self.vhosts.append(name)
        return name

    def close(self):
        for name in self.vhosts:
            requests.delete(f"{MANAGEMENT}/vhosts/{name}", auth=("guest", "guest"), timeout=30)
        connection = psycopg2.connect(self.admin_url)
        connection.autocommit = True
        for name in self.databases:
            connection.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        connection.close()
