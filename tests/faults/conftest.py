"""Fault tests: the stack as separate processes, each with its own database and vhost.

Bounded for CI by default; ``HUIYING_LONG_TESTS=1`` runs the long versions (README, Reliability).
"""

import os
import shutil
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
import requests

from tests.conftest import DEMO_DIRECTORY, TEST_DATABASE_URL, Receiver, SmtpServer
from tests.faults.harness import MANAGEMENT, Stack

LONG = os.environ.get("HUIYING_LONG_TESTS") == "1"
RULES_DIR = DEMO_DIRECTORY.parent.parent / "rules"


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/faults/" in str(item.fspath):
            item.add_marker(pytest.mark.faults)


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
        requests.put(f"{MANAGEMENT}/vhosts/{name}", auth=auth, timeout=10).raise_for_status()
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


@pytest.fixture
def make_stack(tmp_path):
    """``make_stack(name, **env)`` → a ``Stack`` (not started) with its own database, vhost,
    rules folder, SMTP server and an HTTP receiver standing in for the SMS gateway."""
    resources, stacks, servers = Resources(), [], []

    def make(name: str = "a", **extra_env) -> Stack:
        root = tmp_path / name
        root.mkdir()
        shutil.copytree(RULES_DIR, root / "rules")
        smtp, receiver = SmtpServer(root / "maildir"), Receiver()
        servers.extend([smtp, receiver])
        vhost = resources.vhost()
        env = {
            "HUIYING_SMTP_HOST": "127.0.0.1",
            "HUIYING_SMTP_PORT": str(smtp.port),
            "HUIYING_SMS_GATEWAY_URL": receiver.url("/sms"),
            **extra_env,
        }
        stack = Stack(root, f"amqp://guest:guest@127.0.0.1:5672/{vhost}", vhost, resources.database(), env)
        stack.smtp, stack.receiver = smtp, receiver
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.down()
    for server in servers:
        server.close()
    resources.close()
