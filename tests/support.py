"""What the tests and the benchmarks share that needs no eventlet: importing this module leaves
the standard library unpatched, so a benchmark's senders and meters run as real threads (a
greenthread hub cost the load generator CPU on the two cores it measures the services on)."""

import os
import socket

from services.common import config as settings

TEST_DATABASE_URL = os.environ.get("HUIYING_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
DEMO_DIRECTORY = settings.PROJECT_ROOT / "data" / "longgang-directory.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
