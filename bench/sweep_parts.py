"""Where a sweep's time goes, in this process: bench.sweep's cases seeded into a new database, then
each shard evaluated (``evaluation.evaluate``) and its decisions carried out in batches
(``escalation.apply``) as the supervision service does, but one shard at a time and with nothing
else running — so the two parts can be timed apart, and profiled with cProfile.

1. first: the backlog's first pass, taking its escalations;
2. whole: ``--repeat`` passes over every case again, nothing new to take (each working day's first).

    .venv/bin/python -m bench.sweep_parts --cases 300000 [--repeat 2] [--cprofile whole]

``--cprofile`` prints the 25 functions with the most time of their own in that pass.
"""

import eventlet

eventlet.monkey_patch()  # as in the service (services/common/runner.py)

import argparse  # noqa: E402
import cProfile  # noqa: E402
import json  # noqa: E402
import pstats  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

from psycogreen.eventlet import patch_psycopg  # noqa: E402
from sqlalchemy.orm import sessionmaker  # noqa: E402

from bench.autovacuum import Autovacuum  # noqa: E402
from bench.sweep import RULES_DIR, seed  # noqa: E402
from services.common.db import create_db_engine  # noqa: E402
from services.common.migrations import upgrade  # noqa: E402
from services.common.timeutil import now  # noqa: E402
from services.supervision import escalation, evaluation  # noqa: E402
from services.supervision.service import APPLY_BATCH, load_supervision  # noqa: E402
from services.supervision.sweeping import open_shards  # noqa: E402
from tests.faults.harness import Resources  # noqa: E402


def one_pass(sessions, loaded) -> dict:
    """Every shard evaluated and its decisions carried out; the seconds spent in each part."""
    with sessions() as session:
        shards = open_shards(session)
    moment, report = now(), {"evaluated": 0, "decided": 0, "taken": 0, "evaluate_s": 0.0, "apply_s": 0.0}
    for shard in shards:
        started = time.perf_counter()
        with sessions() as session:
            evaluated, decided = evaluation.evaluate(session, loaded.rules, loaded.calendar, moment, shard=shard)
        decided.sort(key=lambda d: d.key)
        evaluated_at = time.perf_counter()
        for start in range(0, len(decided), APPLY_BATCH):
            with sessions.begin() as session:
                report["taken"] += len(escalation.apply(session, decided[start : start + APPLY_BATCH], now()))
        report["evaluated"] += evaluated
        report["decided"] += len(decided)
        report["evaluate_s"] += evaluated_at - started
        report["apply_s"] += time.perf_counter() - evaluated_at
    return report | {"evaluate_s": round(report["evaluate_s"], 2), "apply_s": round(report["apply_s"], 2)}


def profiled(sessions, loaded) -> dict:
    profile = cProfile.Profile()
    result = profile.runcall(one_pass, sessions, loaded)
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=2, help="whole passes after the first")
    parser.add_argument("--cprofile", choices=["first", "whole"], help="profile that pass (the first whole one)")
    args = parser.parse_args()

    resources = Resources()
    try:
        url = resources.database()
        upgrade("supervision", url)
        started = time.perf_counter()
        seed(url, args.cases, random.Random(7))
        report = {"cases": args.cases, "seed_s": round(time.perf_counter() - started, 1)}
        patch_psycopg()  # seeding's COPY needed it off; the service's waits are cooperative
        sessions = sessionmaker(create_db_engine(url, "bench-sweep-parts"))
        loaded = load_supervision(RULES_DIR)
        autovacuum = Autovacuum(url)  # as a deployment's server would (bench/autovacuum.py)
        try:
            report["first"] = (profiled if args.cprofile == "first" else one_pass)(sessions, loaded)
            report["whole"] = [
                (profiled if args.cprofile == "whole" and n == 0 else one_pass)(sessions, loaded)
                for n in range(args.repeat)
            ]
        finally:
            report["maintenance"] = autovacuum.stop()
    finally:
        resources.close()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
