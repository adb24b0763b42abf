"""End to end: cases pushed into intake (AMQP tickets, and HTTP) until each is referred and
visible in supervision — sustained throughput and latency percentiles — beside the raw broker
limit measured in the same run, on a fresh database and vhost.

    .venv/bin/python -m bench.e2e [--burst 3000] [--rate 200 --seconds 30] [--http-share 0.2]

Latency of a case = the moment a poller (every 20 ms) first sees its referral in supervision's
tables − the moment its publish was confirmed (or its HTTP request answered).
"""

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.raw_broker import measure as raw_broker
from tests.conftest import DEMO_DIRECTORY, Receiver, SmtpServer
from tests.faults.harness import Resources, Sender, Stack, case_payload

RULES_DIR = DEMO_DIRECTORY.parent.parent / "rules"


class Watcher:
    """Polls supervision's tables; records when each external id's referral first appears."""

    def __init__(self, stack: Stack, source: str):
        self.stack, self.source, self.seen, self.running = stack, source, {}, True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while self.running:
            rows = self.stack.rows(
                "SELECT i.external_id FROM intake_cases i"
                " JOIN supervision_referrals r ON r.case_id = i.id WHERE i.source = :s",
                s=self.source,
            )
            at = time.perf_counter()
            for (external_id,) in rows:
                self.seen.setdefault(external_id, at)
            time.sleep(0.02)

    def wait(self, expected: set, timeout: float) -> bool:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline and not expected <= self.seen.keys():
            time.sleep(0.1)
        return expected <= self.seen.keys()

    def stop(self):
        self.running = False
        self.thread.join()


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {f"p{int(q * 100)}_ms": round(pick(q) * 1000) for q in (0.5, 0.95, 0.99)} | {
        "mean_ms": round(statistics.mean(ordered) * 1000)
    }


def push(stack, sender, watcher, prefix, count, rate, http_share, timeout):
    """Send ``count`` cases (at ``rate``/s, or as fast as possible when 0); returns the figures."""
    sent_at, started = {}, time.perf_counter()
    http_every = round(1 / http_share) if http_share else 0
    for i in range(count):
        payload = case_payload(i, "hotline-12345", prefix)
        if http_every and i % http_every == 0:
            sender.http(payload)
        else:
            sender.amqp(payload)
        sent_at[payload["external_id"]] = time.perf_counter()
        if rate:
            time.sleep(max(0.0, started + (i + 1) / rate - time.perf_counter()))
    offered = time.perf_counter() - started
    complete = watcher.wait(set(sent_at), timeout)
    done = {k: watcher.seen[k] - t for k, t in sent_at.items() if k in watcher.seen}
    last = max(watcher.seen[k] for k in done) if done else started
    return {
        "cases": count,
        "offered_per_s": round(count / offered, 1),
        "completed": len(done),
        "complete": complete,
        "throughput_per_s": round(len(done) / (last - started), 1),
        **percentiles(list(done.values())),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=3000, help="cases sent as fast as possible")
    parser.add_argument("--rate", type=float, default=200, help="cases per second for the latency run")
    parser.add_argument("--seconds", type=float, default=30, help="length of the latency run")
    parser.add_argument("--http-share", type=float, default=0.2, help="share of cases sent by HTTP")
    parser.add_argument("--raw-messages", type=int, default=20000)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="huiying-bench-"))
    shutil.copytree(RULES_DIR, root / "rules")
    resources = Resources()
    smtp, receiver = SmtpServer(root / "maildir"), Receiver()
    vhost = resources.vhost()
    stack = Stack(
        root,
        f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
        vhost,
        resources.database(),
        {
            "HUIYING_SMTP_HOST": "127.0.0.1",
            "HUIYING_SMTP_PORT": str(smtp.port),
            "HUIYING_SMS_GATEWAY_URL": receiver.url("/sms"),
            "HUIYING_LOG_LEVEL": "WARNING",
        },
    )
    report = {}
    try:
        report["raw_broker"] = raw_broker(stack.amqp_uri, args.raw_messages)
        stack.up()
        sender = Sender(stack, stack.keys["hotline"])
        watcher = Watcher(stack, "hotline-12345")
        report["burst"] = push(stack, sender, watcher, "B", args.burst, 0, args.http_share, timeout=900)
        report["steady"] = push(
            stack, sender, watcher, "S", int(args.rate * args.seconds), args.rate, args.http_share, timeout=900
        )
        watcher.stop()
        report["ratio_to_raw_broker"] = round(
            report["burst"]["throughput_per_s"] / report["raw_broker"]["end_to_end_per_s"], 4
        )
    finally:
        stack.down()
        smtp.close()
        receiver.close()
        resources.close()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(report, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()
