"""Intake's CPU per HTTP request, one request at a time on a keep-alive connection, so that only
the request's own work is measured (nothing is batched with it): a new case by POST, an unknown
case's GET (a 404: the cost of answering a caller's mistake), ``/health`` and ``/metrics``.

    .venv/bin/python -m bench.http_cost [--requests 1000] [--profile]

Prints one JSON line per request kind: intake's CPU ms per request (from /proc, so it includes
what a noisy neighbour costs: compare kinds within a run, or runs made back to back) and the
wall time. ``--profile`` then samples intake with py-spy over as many POSTs of new cases
(bench/profiling.py: the stacks go to ``bench-http-post-intake.folded`` in the current
directory, intake's top functions to the last JSON line)."""

import argparse
import http.client
import itertools
import json
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench.e2e import RULES_DIR
from bench.machine import cpu_seconds
from bench.profiling import sampled
from tests.faults.harness import Resources, Stack, case_payload


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests of each kind")
    parser.add_argument("--profile", action="store_true", help="sample intake with py-spy over as many POSTs")
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
        numbers = itertools.count()

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
            cpu, started = cpu_seconds(pid), time.perf_counter()
            statuses = {request(method, path) for _ in range(args.requests)}
            cpu, wall = cpu_seconds(pid) - cpu, time.perf_counter() - started
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
            with sampled(True, {"intake": pid}, "bench-http-post") as profile:
                for _ in range(args.requests):
                    request("POST", "/api/v1/cases")
            print(json.dumps({"profile": profile}))
    finally:
        stack.down()
        resources.close()


if __name__ == "__main__":
    main()
