"""Fault tests: the stack as separate processes, each with its own database and vhost.

Bounded for CI by default; ``HUIYING_LONG_TESTS=1`` runs the long versions (README, Reliability).
"""

import os
import shutil

import pytest

from tests.conftest import Receiver, SmtpServer
from tests.faults.harness import Resources, Stack
from tests.support import DEMO_DIRECTORY

LONG = os.environ.get("HUIYING_LONG_TESTS") == "1"
RULES_DIR = DEMO_DIRECTORY.parent.parent / "rules"


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/faults/" in str(item.fspath):
            item.add_marker(pytest.mark.faults)


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
