"""Intake's CPU per HTTP request, one request at a time on a keep-alive connection, so that only
the request's own work is measured (nothing is batched with it): a new case by POST, an unknown
case's GET (a 404: the cost of answering a caller's mistake), ``/health`` and ``/metrics``.

    .venv/bin/python -m bench.http_cost [--requests 1000] [--profile FILE]

Prints one JSON line per request kind: intake's CPU ms per request (from /proc, so it includes
what a noisy neighbour costs: compare kinds within a run, or runs made back to back) and the
wall time. ``--profile FILE`` then samples intake with py-spy over as many POSTs of new cases
and writes collapsed stacks to FILE."""

import argparse
import http.client
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench.e2e import RULES_DIR, _cpu_seconds
from tests.faults.harness import Resources, Stack, case_payload


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests of each kind")
    parser.add_argument("--profile", type=Path, help="py-spy's collapsed stacks of intake during POSTs")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="huiying-bench-http-"))
    shutil.copytree(RULES_DIR, root / "rules")
    resources = Resources()
    vhost = resources.vhost()
    amqp_uri = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    stack = Stack(root, amqp_uri, vhost, resources.database(), {"HUIYING_LOG_LEVEL": "WARNING"})
    try:
        stack.up()
        key, pid = stack.keys["hotline"], stack.pid("intake")
        connection = http.client.HTTPConnection(urlsplit(stack.url("intake")).netloc, timeout=30)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        numbers = iter(range(10**9))

        def request(method: str, path: str) -> int:
            body = None
            if method == "POST":
                body = json.dumps(case_payload(next(numbers), "hotline-12345", "BH"), ensure_ascii=False).encode()
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            return response.status

        kinds = [
            ("POST", "/api/v1/cases"),
            ("GET", "/api/v1/cases/LG-2026-999999"),
            ("GET", "/health"),
            ("GET", "/metrics"),
        ]
        for method, path in kinds:
            request(method, path)  # warm: the first of a kind loads and caches what it needs
        for method, path in kinds:
            cpu, started = _cpu_seconds(pid), time.perf_counter()
            statuses = {request(method, path) for _ in range(args.requests)}
            cpu, wall = _cpu_seconds(pid) - cpu, time.perf_counter() - started
            print(
                json.dumps(
                    {
                        "request": f"{method} {path}",
                        "statuses": sorted(statuses),
                        "intake_cpu_ms_per_request": round(1000 * cpu / args.requests, 3),
                        "wall_ms_per_request": round(1000 * wall / args.requests, 3),
                    }
                )
            )
        if args.profile:
            py_spy = str(Path(sys.executable).parent / "py-spy")
            options = ["--rate", "200", "--format", "raw", "--output", str(args.profile), "--pid", str(pid)]
            spy = subprocess.Popen([py_spy, "record", *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
            for _ in range(args.requests):
                request("POST", "/api/v1/cases")
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
    finally:
        stack.down()
        resources.close()


if __name__ == "__main__":
    main()
