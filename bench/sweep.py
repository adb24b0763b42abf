"""The periodic sweep over many open cases in PostgreSQL: the supervision service as its own
process, N unresolved cases written straight into its tables with COPY (as if they had arrived:
each with its referral and its cluster), then three passes, each started by marking every shard
due as the interval would:

1. first: every case evaluated, and the escalations they call for taken (this backlog's first
   sweep ever);
2. whole: every case evaluated again, nothing new to take — the first pass of every day;
3. incremental: the same day, after 1 % of the cases changed — the passes in between.

Reports each pass's duration and cases evaluated, the process's peak memory (VmHWM) and whether
its AMQP connections held throughout (the same consumer connections in RabbitMQ before and after,
no reconnect in its log).

    .venv/bin/python -m bench.sweep --cases 100000 [--timeout 3600]
"""

import argparse
import io
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import psycopg2
import requests

from bench import looplag
from bench.autovacuum import Autovacuum
from bench.profiling import sampled
from services.common.migrations import upgrade
from services.common.timeutil import now
from tests.faults.harness import MANAGEMENT, STREETS, TOPICS, Resources
from tests.support import DEMO_DIRECTORY, free_port

RULES_DIR = DEMO_DIRECTORY.parent.parent / "rules"
CATEGORIES = ["traffic", "urban_management", "environment", "housing", "education", "health", "safety"]


def seed(database_url: str, cases: int, rng: random.Random) -> None:
    """COPY ``cases`` open cases and their referrals into supervision's projection: referred in
    the last 20 days, due 5–60 days after (a few overdue, most not yet); 70 % alone, the others in
    clusters of similar cases (about 20 each) within their street and category."""
    cases_csv, referrals_csv = io.StringIO(), io.StringIO()
    moment = now()
    for i in range(cases):
        case_id = f"LG-2025-{i:07d}"
        street = rng.choice(STREETS)
        category = rng.choice(CATEGORIES)
        title, description = rng.choice(TOPICS)
        referred = moment - timedelta(days=rng.uniform(0, 20))
        due = referred + timedelta(days=rng.randint(5, 60))
        root = case_id if rng.random() < 0.7 else f"{street}-{category}-{rng.randrange(200)}"
        cases_csv.write(
            f"{case_id}\thotline-12345\t{street}{title}{i % 97}\t{description}\treferred\treferral\t{category}\t"
            f'{street}\t{referred.isoformat()}\t{referred.isoformat()}\tcgj\t["cgj"]\t{referred.isoformat()}\t'
            f"cluster:{category}:{street}:{root}\t{referred.isoformat()}\t{due.isoformat()}\n"
        )
        referrals_csv.write(
            f"{case_id}-R1\t{case_id}\tcgj\t龙岗区城市管理和综合执法局\t1\t1\treferred\t"
            f"{referred.isoformat()}\t{due.isoformat()}\t{referred.isoformat()}\n"
        )
    connection = psycopg2.connect(database_url)
    with connection, connection.cursor() as cursor:
        cases_csv.seek(0)
        cursor.copy_from(
            cases_csv,
            "supervision_cases",
            columns=(
                "case_id", "source", "title", "description", "status", "kind", "category", "street",
                "received_at", "updated_at", "lead_department", "departments", "first_referred_at",
                "cluster_key", "changed_at", "nearest_due",
            ),
        )  # fmt: skip
        referrals_csv.seek(0)
        cursor.copy_from(
            referrals_csv,
            "supervision_referrals",
            columns=(
                "referral_id", "case_id", "department", "department_name", "is_lead", "round", "status",
                "referred_at", "due_at", "updated_at",
            ),
        )  # fmt: skip
        cursor.execute(
            "INSERT INTO supervision_sweep_shards (street, category)"
            " SELECT DISTINCT COALESCE(street, ''), COALESCE(category, '') FROM supervision_cases"
            " ON CONFLICT DO NOTHING"
        )
        cursor.execute("ANALYZE")
    connection.close()


def connections(vhost: str) -> list[str]:
    response = requests.get(f"{MANAGEMENT}/connections", auth=("guest", "guest"), timeout=10)
    return sorted(c["name"] for c in response.json() if c.get("vhost") == vhost)


def sweep_pass(db, process, url: str, timeout: float, prepare: str, profile: bool = False) -> dict:
    """Run ``prepare`` (SQL marking shards due), then wait until every shard has been swept
    (with ``profile``, py-spy samples the process meanwhile: bench/profiling.py). ``url``: the
    process's HTTP address, for its event loop's lag over the pass (``loop_lag_ms``)."""
    lag_before = looplag.scrape(url)
    with sampled(profile, {"supervision": process.pid}, "bench-sweep") as profiled:
        with db.cursor() as cursor:
            cursor.execute(prepare)
            cursor.execute("SELECT count(*) FROM supervision_decisions")
            decisions_before = cursor.fetchone()[0]
        started = time.perf_counter()
        while time.perf_counter() - started < timeout and process.poll() is None:
            with db.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM supervision_sweep_shards WHERE swept_at IS NULL OR owner IS NOT NULL"
                )
                if cursor.fetchone()[0] == 0:
                    break
            time.sleep(0.2)
        seconds = time.perf_counter() - started
    with db.cursor() as cursor:
        # The sweep's own time: from the first shard's start to the last shard's end (the wall
        # time above also holds the wait for the service's next timer tick, up to 5 s).
        cursor.execute(
            "SELECT sum(evaluated), extract(epoch FROM max(swept_at) - min(started_at)) FROM supervision_sweep_shards"
        )
        evaluated, sweep_seconds = cursor.fetchone()
        cursor.execute("SELECT count(*) FROM supervision_decisions")
        decisions = cursor.fetchone()[0] - decisions_before
    return {
        "seconds": round(seconds, 1),
        "sweep_s": round(float(sweep_seconds), 1),
        "evaluated": evaluated,
        "new_decisions": decisions,
        # how long the process's other greenthreads (AMQP heartbeats, events, HTTP) waited at worst
        "loop_lag_ms": looplag.summary(lag_before, looplag.scrape(url)),
    } | ({"profile": profiled["supervision"]} if profiled.get("supervision") else {})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed for each pass")
    parser.add_argument(
        "--profile",
        choices=["first", "whole", "incremental"],
        help="sample that pass with py-spy (pip install py-spy): its top functions, and bench-sweep-supervision.folded",
    )
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="huiying-sweep-"))
    rules = root / "rules"
    shutil.copytree(RULES_DIR, rules)
    policy = rules / "supervision" / "policy.yaml"
    text = policy.read_text(encoding="utf-8")
    once_a_day = text.replace("sweep_interval_seconds: 60", "sweep_interval_seconds: 86400")
    policy.write_text(once_a_day, encoding="utf-8")  # only the passes this script starts
    resources = Resources()
    vhost, database_url = resources.vhost(), resources.database()
    env = {
        "AMQP_URI": f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
        "DATABASE_URL": database_url,
        "HUIYING_RULES_DIR": str(rules),
        "HUIYING_VAR_DIR": str(root / "var"),
        "HUIYING_SUPERVISION_ADDRESS": f"127.0.0.1:{free_port()}",
        "HUIYING_LOG_LEVEL": "WARNING",
        "PATH": "/usr/bin:/bin",
        # the services of this checkout, not whichever the virtualenv has installed
        "PYTHONPATH": str(RULES_DIR.parent),
    }
    report = {"cases": args.cases}
    process = autovacuum = None
    try:
        upgrade("supervision", database_url)
        started = time.perf_counter()
        seed(database_url, args.cases, random.Random(7))
        report["seed_s"] = round(time.perf_counter() - started, 1)
        autovacuum = Autovacuum(database_url)  # as a deployment's server would, from here on
        db = psycopg2.connect(database_url)
        db.autocommit = True
        with db.cursor() as cursor:  # nothing due until the process is up and connected
            cursor.execute("UPDATE supervision_sweep_shards SET swept_at = now()")
        log = open(root / "supervision.log", "wb")
        command = [sys.executable, "-m", "services.common.runner", "supervision"]
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        time.sleep(8)  # started and connected
        before = connections(vhost)
        url = "http://" + env["HUIYING_SUPERVISION_ADDRESS"]
        every_shard_due = "UPDATE supervision_sweep_shards SET swept_at = NULL"
        report["first"] = sweep_pass(db, process, url, args.timeout, every_shard_due, args.profile == "first")
        whole = every_shard_due + ", whole_on = NULL"
        report["whole"] = sweep_pass(db, process, url, args.timeout, whole, args.profile == "whole")
        one_percent = max(1, args.cases // 100)
        changed = (
            f"UPDATE supervision_cases SET changed_at = now() WHERE case_id IN"
            f" (SELECT case_id FROM supervision_cases ORDER BY random() LIMIT {one_percent}); {every_shard_due}"
        )
        report["incremental"] = sweep_pass(db, process, url, args.timeout, changed, args.profile == "incremental") | {
            "cases_changed": one_percent
        }
        status = Path(f"/proc/{process.pid}/status").read_text() if process.poll() is None else ""
        peak = [line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")]
        report["peak_rss_mb"] = round(int(peak[0]) / 1024) if peak else None
        after = connections(vhost)
        reconnects = (root / "supervision.log").read_text(errors="replace").count("Connection to broker lost")
        # Its consumers' connections must all still be there (publisher connections come and go).
        report["amqp_connection_held"] = bool(before) and set(before) <= set(after) and reconnects == 0
        if not report["amqp_connection_held"]:  # say what went
            report["amqp_connections_gone"] = sorted(set(before) - set(after))
            report["amqp_reconnects_logged"] = reconnects
            report["log_tail"] = (root / "supervision.log").read_text(errors="replace").splitlines()[-15:]
        report["completed"] = report["whole"]["evaluated"] == args.cases
    finally:
        if process and process.poll() is None:
            process.kill()
        if autovacuum:
            report["maintenance"] = autovacuum.stop()
        resources.close()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
