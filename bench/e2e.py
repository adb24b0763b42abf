"""End to end: cases pushed into intake (AMQP tickets, and a share by HTTP) until each is referred
and visible in supervision — sustained throughput and latency percentiles — beside the raw broker
limit measured in the same run, on a fresh database and vhost, with the four services as separate
processes (`huiying up`), notify sending its e-mail to an SMTP server on loopback.

    .venv/bin/python -m bench.e2e [--burst 3000] [--rates 50,100,200 --seconds 30] [--http-share 0.2]

- burst: ``--burst`` cases offered at once by several senders (ticketing systems publishing with
  a confirm for each ticket, and HTTP clients); throughput = cases referred and visible in
  supervision / time from the first send to the last of them.
- burst, all work done: the same cases until every work queue is empty and every outbox
  published (notify's e-mails sent too): the rate the whole system can keep up.
- steady: for each of ``--rates``, that many cases a second for ``--seconds``, each sent at its
  scheduled moment whatever the system is doing (open loop), and the latency of each: the
  moment its referral became visible in supervision's tables (a notification at the commit) −
  the moment its publish was confirmed (or its HTTP request answered); and from the moment it
  was to be sent, which counts the wait for intake to accept it too.
- where the capacity goes: CPU seconds of each process during the burst and each steady run,
  per case (the machine is shared: CPU time includes what a noisy neighbour costs, so compare
  shares, not single runs), and the transactions and broker messages per case.
- where the latency goes: each steady run's ``stages``, the p50/p95/p99 of each hop — accepted →
  stored by intake → referred by routing → visible in supervision — from the moments the services
  record in their own transactions.
- ``--profile``: py-spy samples each service during each run (bench/profiling.py).
- ``--timeline``: each steady run's cases by the second they were sent (their p50 and largest
  latency) beside the cores each process used in that second (sampled every half second): a
  latency that rises with every process busy is the cores being full; one that rises with one
  process is that process (``by_second``).
- on a PostgreSQL running without autovacuum (this machine's), the benchmark vacuums and analyzes
  its own tables at autovacuum's default thresholds (bench/autovacuum.py), as a deployment's server would.
"""

import argparse
import http.client
import json
import os
import queue
import select
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
import requests
from kombu import Connection, Producer
from prometheus_client.parser import text_string_to_metric_families

from bench import looplag
from bench.autovacuum import Autovacuum
from bench.dbwaits import DatabaseWaits
from bench.machine import cpu_jiffies, cpu_seconds, python_loop_ms, steal_share
from bench.profiling import sampled
from bench.raw_broker import measure as raw_broker
from huiying.mail_sink import SmtpSink
from tests.faults.harness import MANAGEMENT, SERVICES, TICKETS, Resources, Stack, case_payload
from tests.support import DEMO_DIRECTORY

RULES_DIR = DEMO_DIRECTORY.parent.parent / "rules"
SOURCE = "hotline-12345"


class Senders:
    """Ticketing systems and HTTP clients sending cases at their scheduled moments, each on its
    own connection; a case is accepted when its publish is confirmed or its request answered
    200/201 (what was not accepted is sent again, as a ticketing system would)."""

    def __init__(self, stack: Stack, key: str, amqp_senders: int = 4, http_senders: int = 16):
        self.stack, self.key = stack, key
        self.accepted: dict[str, float] = {}  # external id → perf_counter when accepted
        self.scheduled: dict[str, float] = {}  # external id → when it was to be sent
        self.retries = 0
        self.work = {"amqp": queue.Queue(), "http": queue.Queue()}
        self.threads = [threading.Thread(target=self._amqp, daemon=True) for _ in range(amqp_senders)]
        self.threads += [threading.Thread(target=self._http, daemon=True) for _ in range(http_senders)]
        for thread in self.threads:
            thread.start()

    def offer(self, payloads: list[dict], rate: float, http_share: float) -> float:
        """Schedule the payloads (all at once when ``rate`` is 0); returns the start."""
        start = time.perf_counter() + 0.2
        http_every = round(1 / http_share) if http_share else 0
        for i, payload in enumerate(payloads):
            channel = "http" if http_every and i % http_every == 0 else "amqp"
            moment = start + (i / rate if rate else 0)
            self.scheduled[payload["external_id"]] = moment
            self.work[channel].put((moment, payload))
        return start

    def _wait_until(self, moment: float):
        delay = moment - time.perf_counter()
        if delay > 0:
            time.sleep(delay)

    def _amqp(self):
        connection = Connection(self.stack.amqp_uri, transport_options={"confirm_publish": True})
        while True:
            moment, payload = self.work["amqp"].get()
            self._wait_until(moment)
            while True:
                try:
                    Producer(connection.default_channel).publish(
                        payload,
                        exchange=TICKETS,
                        routing_key="ticket",
                        serializer="json",
                        delivery_mode=2,
                        message_id=str(uuid.uuid4()),
                    )
                    break
                except Exception:
                    self.retries += 1
                    connection = Connection(self.stack.amqp_uri, transport_options={"confirm_publish": True})
                    time.sleep(0.2)
            self.accepted[payload["external_id"]] = time.perf_counter()  # confirmed: publish returned

    def _http(self):
        # http.client rather than requests: 0.5 ms of CPU a request against 2.1 (3 Dec), on the
        # two cores the services are measured on; a client's own cost is not the system's.
        address = urlsplit(self.stack.url("intake")).netloc
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        connection = http.client.HTTPConnection(address, timeout=30)
        while True:
            moment, payload = self.work["http"].get()
            self._wait_until(moment)
            body = json.dumps(payload, ensure_ascii=False).encode()
            reused = connection.sock is not None
            while True:
                try:
                    connection.request("POST", "/api/v1/cases", body, headers)
                    response = connection.getresponse()
                    response.read()
                    if response.status in (200, 201):
                        break
                except (OSError, http.client.HTTPException):
                    connection.close()  # a new connection at the next request
                    if reused:  # the server had closed the idle connection: again at once
                        reused = False
                        continue
                self.retries += 1
                time.sleep(0.2)
            self.accepted[payload["external_id"]] = time.perf_counter()


class Watcher:
    """Records when each external id's referral became visible in supervision. A trigger the
    benchmark adds to its own database notifies, at each commit that inserts referrals into
    supervision's projection, which cases they belong to (LISTEN/NOTIFY: delivered when the
    transaction commits, i.e. when they became visible); nothing is polled, so the watcher costs
    the same however long the run."""

    CHANNEL = "huiying_bench_referred"

    def __init__(self, stack: Stack):
        self.stack, self.seen, self.running = stack, {}, True
        self.connection = psycopg2.connect(stack.database_url)
        self.connection.autocommit = True
        cursor = self.connection.cursor()
        cursor.execute(
            f"""
            CREATE OR REPLACE FUNCTION bench_referred() RETURNS trigger AS $$
            BEGIN
                PERFORM pg_notify('{self.CHANNEL}', string_agg(DISTINCT case_id, ',')) FROM inserted;
                RETURN NULL;
            END $$ LANGUAGE plpgsql;
            CREATE TRIGGER bench_referred AFTER INSERT ON supervision_referrals
                REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION bench_referred();
            LISTEN {self.CHANNEL};
            """
        )
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        external_ids = {}  # case id → external id
        while self.running:
            if select.select([self.connection], [], [], 0.2)[0] == []:
                continue
            self.connection.poll()
            at = time.perf_counter()
            case_ids = {c for note in self.connection.notifies for c in note.payload.split(",")}
            self.connection.notifies.clear()
            unknown = [c for c in case_ids if c not in external_ids]
            if unknown:
                external_ids.update(
                    self.stack.rows("SELECT id, external_id FROM intake_cases WHERE id = ANY(:ids)", ids=unknown)
                )
            for case_id in case_ids:
                self.seen.setdefault(external_ids.get(case_id), at)

    def wait(self, expected: set, timeout: float) -> bool:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline and not expected <= self.seen.keys():
            time.sleep(0.1)
        return expected <= self.seen.keys()

    def stop(self):
        self.running = False
        self.thread.join()
        self.connection.close()


def percentiles(values: list[float], prefix: str = "") -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {f"{prefix}p{int(q * 100)}_ms": round(pick(q) * 1000) for q in (0.5, 0.95, 0.99)} | {
        f"{prefix}max_ms": round(ordered[-1] * 1000)
    }


# The samples of the services' run metrics that Meter reads, and their place in [runs, seconds, items].
RUN_SAMPLES = {"huiying_run_seconds_count": 0, "huiying_run_seconds_sum": 1, "huiying_run_items_sum": 2}


class Meter:
    """CPU seconds of the processes that do the work, transactions of the benchmark's database
    and messages through its vhost, between ``start`` and ``stop``."""

    def __init__(self, stack: Stack, smtp: SmtpSink):
        self.stack, self.smtp = stack, smtp
        self.waits = DatabaseWaits(stack.database_url, stack.engine.url.database)

    def _pids(self) -> dict[str, list[int]]:
        pids = {service: [self.stack.pid(service)] for service in SERVICES}
        pids["postgresql"] = _pgrep("-u", "postgres")
        pids["rabbitmq"] = _pgrep("beam.smp")
        pids["smtp server"] = [self.smtp.process.pid]
        pids["benchmark (senders, watcher)"] = [os.getpid()]
        return pids

    def cpu(self, pids: dict | None = None) -> dict[str, float]:
        """CPU seconds so far of each process group (of ``pids``, or looked up now)."""
        return {name: sum(cpu_seconds(pid) for pid in group if pid) for name, group in (pids or self._pids()).items()}

    def _read(self) -> dict:
        pids = self._pids()
        cpu = self.cpu(pids)
        waited = {name: sum(_runqueue_seconds(pid) for pid in group if pid) for name, group in pids.items()}
        database = self.stack.engine.url.database
        commits = self.stack.scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = :d", d=database)
        return {
            "cpu": cpu,
            "waited": waited,
            "commits": commits,
            "messages": _vhost_messages(self.stack.vhost),
            **self._scrape(),
        }

    def _scrape(self) -> dict:
        """From each service's /metrics: ``runs``, its ``huiying_run_seconds`` and
        ``huiying_run_items`` sums and counts (``{service: {run: [runs, seconds, items]}}``), and
        ``lag``, its ``huiying_loop_lag_seconds`` buckets (``{service: {le: cumulative count}}``)."""
        runs, lag = {}, {}
        for service in SERVICES:
            by_run = runs.setdefault(service, defaultdict(lambda: [0, 0.0, 0]))
            text = requests.get(self.stack.url(service) + "/metrics", timeout=10).text
            samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]
            for sample in samples:
                column = RUN_SAMPLES.get(sample.name)
                if column is not None:
                    by_run[sample.labels["run"]][column] = sample.value
            lag[service] = looplag.read(samples)
        return {"runs": runs, "lag": lag}

    def start(self):
        self.before = self._read()
        self.waits.start()

    def stop(self, cases: int) -> dict:
        waits = self.waits.stop()
        time.sleep(6)  # RabbitMQ's management statistics are refreshed every 5 s
        after = self._read()
        cpu = {name: after["cpu"][name] - self.before["cpu"][name] for name in after["cpu"]}
        waited = {name: after["waited"][name] - self.before["waited"][name] for name in after["waited"]}
        runs = {}
        for service, by_run in after["runs"].items():
            for run, (count, seconds, items) in by_run.items():
                was = self.before["runs"].get(service, {}).get(run, [0, 0.0, 0])
                count, seconds, items = count - was[0], seconds - was[1], items - was[2]
                if count:
                    runs.setdefault(service, {})[run] = {
                        "runs": int(count),
                        "seconds": round(seconds, 2),
                        "mean_ms": round(1000 * seconds / count, 1),
                        "items_per_run": round(items / count, 1),
                    }
        return {
            "loop_lag_ms": {
                service: looplag.summary(self.before["lag"].get(service, {}), buckets)
                for service, buckets in after["lag"].items()
            },
            # every run of work taken together (a queue's batch, supervision's projection run, its
            # evaluation after events, its sweep): how many, how long, how many items each
            "runs": runs,
            "cpu_ms_per_case": {name: round(1000 * seconds / cases, 2) for name, seconds in cpu.items()},
            "cpu_ms_per_case_total": round(1000 * sum(cpu.values()) / cases, 1),
            # time the processes were ready to run and waited for a core (the kernel's schedstat):
            # what contention for the two cores adds to a case's way, beside the CPU it uses
            "runqueue_wait_ms_per_case": {name: round(1000 * seconds / cases, 2) for name, seconds in waited.items()},
            # what each service's database sessions were doing (bench/dbwaits.py): locks and WAL
            # flushes are PostgreSQL's share of a case's way, "idle in transaction" the service's
            "database_sessions": waits,
            "database_transactions_per_case": round((after["commits"] - self.before["commits"]) / cases, 2),
            "broker_messages_per_case": {
                kind: round((after["messages"][kind] - self.before["messages"][kind]) / cases, 2)
                for kind in after["messages"]
            },
        }


def _pgrep(*args) -> list[int]:
    return [int(pid) for pid in subprocess.run(["pgrep", *args], capture_output=True, text=True).stdout.split()]


def _runqueue_seconds(pid: int) -> float:
    """Seconds the threads of ``pid`` have spent ready to run, waiting for a core
    (``/proc/PID/task/TID/schedstat``: on-CPU ns, run-queue wait ns, time slices)."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0.0
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):  # the thread has gone, or no schedstat here
            continue
    return total / 1e9


def _vhost_messages(vhost: str) -> dict:
    stats = (
        requests.get(f"{MANAGEMENT}/vhosts/{requests.utils.quote(vhost, safe='')}", auth=("guest", "guest"), timeout=10)
        .json()
        .get("message_stats", {})
    )
    return {"published": stats.get("publish", 0), "delivered": stats.get("deliver_get", 0)}


class CpuTimeline:
    """The cores each of the Meter's process groups used, every ``INTERVAL`` seconds, from
    ``start`` until ``stop``: ``[(perf_counter moment, {group: cores})]``."""

    INTERVAL = 0.5

    def __init__(self, meter: "Meter"):
        self.meter, self.samples, self._stop = meter, [], threading.Event()

    def _sample(self):
        before, at = self.meter.cpu(), time.perf_counter()
        while not self._stop.wait(self.INTERVAL):
            now_cpu, now_at = self.meter.cpu(), time.perf_counter()
            span = now_at - at
            self.samples.append(
                (now_at, {name: (now_cpu[name] - before.get(name, now_cpu[name])) / span for name in now_cpu})
            )
            before, at = now_cpu, now_at

    def start(self):
        self.samples, self._thread = [], threading.Thread(target=self._sample, name="cpu-timeline", daemon=True)
        self._stop.clear()
        self._thread.start()

    def stop(self) -> list:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.samples


def by_second(start: float, scheduled: dict, latency: dict, samples: list) -> list[dict]:
    """Each second of a steady run (cases by the moment they were to be sent): how many, their p50
    and largest latency (ms), and the mean cores each process group used in that second."""
    seconds = defaultdict(list)
    for key, seconds_taken in latency.items():
        seconds[int(scheduled[key] - start)].append(seconds_taken)
    rows = []
    for second in sorted(seconds):
        taken = sorted(seconds[second])
        inside = [cores for at, cores in samples if start + second < at <= start + second + 1]
        groups = {name for cores in inside for name in cores}
        rows.append(
            {
                "second": second,
                "cases": len(taken),
                "p50_ms": round(1000 * taken[len(taken) // 2]),
                "max_ms": round(1000 * taken[-1]),
                "cores": {n: round(sum(c.get(n, 0) for c in inside) / len(inside), 2) for n in sorted(groups)},
            }
        )
    return rows


class WallClock:
    """Turns the bench's perf_counter moments into the services' wall-clock time (same machine),
    from the two clocks read at the start and the end of a run and interpolated in between: a
    virtual machine's wall clock may drift from its monotonic one (this one's gained 5 ms a
    second on 2 Dec, a second over a full run), and the hops' split would drift with it."""

    def __init__(self):
        self.start = (time.perf_counter(), time.time())

    def stop(self):
        self.end = (time.perf_counter(), time.time())
        (p1, w1), (p2, w2) = self.start, self.end
        self.rate = (w2 - w1) / (p2 - p1) if p2 > p1 else 1.0

    def wall(self, moment: float) -> float:
        p1, w1 = self.start
        return w1 + (moment - p1) * self.rate

    def drift_ms(self) -> int:
        """How far the wall clock moved from perf_counter over the run."""
        (p1, w1), (p2, w2) = self.start, self.end
        return round(((w2 - w1) - (p2 - p1)) * 1000)


# Each hop of a case's way, from the moments the services record in their transactions: intake
# storing the case (its case_received outbox row) and routing recording and referring it (one
# transaction). (The outbox's published_at is no use here: it is marked after the publication, a
# batch at a time.)
STAGES_SQL = """
    SELECT i.external_id, extract(epoch FROM io.created_at), extract(epoch FROM r.recorded_at)
    FROM intake_cases i
    JOIN intake_outbox io ON io.event_type = 'case_received' AND io.payload->>'case_id' = i.id
    JOIN routing_cases r ON r.case_id = i.id
    WHERE i.external_id = ANY(:ids)
"""
STAGES = ("stored_by_intake", "referred_by_routing", "visible_in_supervision")


def stages(stack, accepted: dict[str, float], watcher, clock: WallClock) -> dict:
    """p50, p95 and p99 of each hop (ms): accepted → stored by intake → recorded and referred by
    routing → visible in supervision."""
    hops = defaultdict(list)
    for external_id, stored, referred in stack.rows(STAGES_SQL, ids=list(accepted)):
        seen = watcher.seen.get(external_id)
        if seen is None:
            continue
        points = [clock.wall(accepted[external_id]), float(stored), float(referred), clock.wall(seen)]
        for name, before, after in zip(STAGES, points, points[1:]):
            hops[name].append(after - before)
    return {
        name: {k.replace("_ms", ""): v for k, v in percentiles(hops[name]).items() if not k.startswith("max")}
        for name in STAGES
        if hops[name]
    }


def run(stack, senders, watcher, prefix, count, rate, http_share, timeout, timeline=None) -> dict:
    """Offer ``count`` cases (at ``rate``/s, or all at once when 0); the figures when each is
    visible in supervision. Latency is from the moment a case was accepted (its publish
    confirmed, its HTTP request answered); ``from_scheduled_`` from the moment it was to be sent,
    which adds the time the senders waited for intake to accept it."""
    payloads = [case_payload(i, SOURCE, prefix) for i in range(count)]
    clock = WallClock()
    if timeline:
        timeline.start()
    start = senders.offer(payloads, rate, http_share)
    expected = {p["external_id"] for p in payloads}
    complete = watcher.wait(expected, timeout)
    clock.stop()
    samples = timeline.stop() if timeline else []
    accepted = {k: senders.accepted[k] for k in expected if k in senders.accepted}
    done = {k: watcher.seen[k] - t for k, t in accepted.items() if k in watcher.seen}
    from_scheduled = [watcher.seen[k] - senders.scheduled[k] for k in done]
    last = max(watcher.seen[k] for k in done) if done else start
    figures = {
        "cases": count,
        "offered_per_s": round(count / (max(accepted.values()) - start), 1) if accepted else 0,
        "completed": len(done),
        "complete": complete,
        "throughput_per_s": round(len(done) / (last - start), 1),
        **percentiles(list(done.values())),
        **percentiles(from_scheduled, "from_scheduled_"),
    }
    figures["stages"] = stages(stack, accepted, watcher, clock)
    figures["wall_clock_drift_ms"] = clock.drift_ms()  # corrected for in the stages
    if timeline:
        figures["by_second"] = by_second(start, senders.scheduled, done, samples)
    if rate:  # kept up: took them in at the rate offered, none waiting long
        figures["kept_up"] = figures["throughput_per_s"] >= 0.95 * rate and figures["from_scheduled_p99_ms"] < 1000
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=3000, help="cases offered at once")
    parser.add_argument("--rates", default="50,100,200", help="cases per second of each latency run")
    parser.add_argument("--seconds", type=float, default=30, help="length of each latency run")
    parser.add_argument("--http-share", type=float, default=0.2, help="share of cases sent by HTTP")
    parser.add_argument("--raw-messages", type=int, default=10000)
    parser.add_argument("--gather-ms", type=float, default=0, help="the services' HUIYING_BATCH_GATHER_MS")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample each service with py-spy during each run (pip install py-spy): top functions, *.folded",
    )
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="each steady run's latency by second beside each process's cores in it (by_second)",
    )
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="huiying-bench-"))
    shutil.copytree(RULES_DIR, root / "rules")
    resources = Resources()
    smtp = SmtpSink(sms_gateway=True)  # the mail server and SMS gateway: accept everything, keep nothing
    vhost = resources.vhost()
    stack = Stack(
        root,
        f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
        vhost,
        resources.database(),
        {
            "HUIYING_SMTP_HOST": "127.0.0.1",
            "HUIYING_SMTP_PORT": str(smtp.port),
            "HUIYING_SMS_GATEWAY_URL": f"http://127.0.0.1:{smtp.sms_port}/sms",
            "HUIYING_LOG_LEVEL": "WARNING",
            **({"HUIYING_BATCH_GATHER_MS": str(args.gather_ms)} if args.gather_ms else {}),
        },
    )
    report = {"machine_speed": {"python_loop_ms_before": python_loop_ms()}}
    jiffies = cpu_jiffies()
    try:
        report["raw_broker"] = raw_broker(stack.amqp_uri, args.raw_messages)
        report["raw_broker_without_confirms"] = raw_broker(stack.amqp_uri, args.raw_messages, confirm=False)
        stack.up()
        senders, watcher, meter = Senders(stack, stack.keys["hotline"]), Watcher(stack), Meter(stack, smtp)
        autovacuum = Autovacuum(stack.database_url)
        pids = {service: stack.pid(service) for service in SERVICES}
        with sampled(args.profile, pids, "bench-e2e-burst") as profile:
            meter.start()
            started = time.perf_counter()
            report["burst"] = run(stack, senders, watcher, "B", args.burst, 0, args.http_share, timeout=900)
            stack.wait_settled(timeout=900, quiet_for=1)  # notify's e-mails too
            report["burst"]["all_work_done_s"] = round(time.perf_counter() - started - 1, 1)
            report["burst"] |= meter.stop(args.burst)
            report["burst"]["all_work_done_per_s"] = round(args.burst / report["burst"]["all_work_done_s"], 1)
        if profile:
            report["burst"]["profile"] = profile
        timeline = CpuTimeline(meter) if args.timeline else None
        for n, rate in enumerate(float(r) for r in args.rates.split(",")):
            count = int(rate * args.seconds)
            name = f"steady_{rate:g}_per_s"
            with sampled(args.profile, pids, f"bench-e2e-steady-{rate:g}") as profile:
                meter.start()
                report[name] = run(
                    stack, senders, watcher, f"S{n}", count, rate, args.http_share, timeout=900, timeline=timeline
                )
            if profile:
                report[name]["profile"] = profile
            stack.wait_settled(timeout=900, quiet_for=1)  # the next run starts with nothing behind
            # all of these cases' work, and what idling costs: small batches cost more per case
            report[name] |= meter.stop(count)
        watcher.stop()
        report["maintenance"] = autovacuum.stop()
        report["machine_speed"]["steal_share"] = steal_share(jiffies, cpu_jiffies())
        report["machine_speed"]["python_loop_ms_after"] = python_loop_ms()
        report["sender_retries"] = senders.retries
        raw = report["raw_broker"]["end_to_end_per_s"]
        report["ratio_to_raw_broker"] = round(report["burst"]["throughput_per_s"] / raw, 3)
        report["ratio_to_raw_broker_all_work_done"] = round(report["burst"]["all_work_done_per_s"] / raw, 3)
    finally:
        stack.down()
        smtp.close()
        resources.close()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(report, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()
