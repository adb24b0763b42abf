"""What two of the pipeline's most repeated writes cost, each beside the way it was done before,
in one run, as ratios:

- **E-mail**: notify's ``SmtpConnections.send_many`` (eventlet-patched, as in the service) sending
  batches of e-mails to the mail sink, once as the sink offers PIPELINING and CHUNKING (one write
  per group of 50) and once as an older server offering neither (``--plain``: smtplib's four
  round trips per e-mail); and building an e-mail (``channels.email_message``) beside
  email.mime and its generator, which notify used until 3 Dec. CPU of the sending process and of
  the sink, per e-mail.
- **Updates of many rows**: ``update_many`` (one ``UPDATE … FROM (VALUES …)``) beside an
  UPDATE per row (SQLAlchemy's executemany, as it was until 3 Dec), 100-row transactions on a
  20,000-row table in a database of its own: the client's CPU and the PostgreSQL backend's, per
  row.

    .venv/bin/python -m bench.sending [--emails 4000] [--rows 20000]
"""

import eventlet

eventlet.monkey_patch()

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from email.header import Header  # noqa: E402
from email.mime.text import MIMEText  # noqa: E402
from email.utils import formatdate, make_msgid  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from sqlalchemy import JSON, Column, Integer, MetaData, String, Table, bindparam, text  # noqa: E402
from sqlalchemy.orm import sessionmaker  # noqa: E402

from bench.machine import cpu_seconds  # noqa: E402
from huiying.mail_sink import SmtpSink  # noqa: E402
from services.common.db import UTCDateTime, create_db_engine  # noqa: E402
from services.common.upsert import update_many  # noqa: E402
from services.notify import channels  # noqa: E402
from tests.faults.harness import Resources  # noqa: E402

SENDER = "回应 <huiying@district.example>"
BATCH = 25  # about what a deliver batch of notify's held at 200 cases/s (3 Dec)


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def delivery(number: int):
    return SimpleNamespace(
        id=number,
        channel="email",
        address=f"dept{number % 40}@district.example",
        recipient=f"department:d{number % 40}",
        subject=f"新的转办件 HY-2026-{number:06d} 请在五个工作日内办理并答复",
        body="案件：某某街道道路积水，请及时处理并在系统中答复。\n" * 12,
        attempts=0,
    )


def email_mime(sent) -> bytes:
    """The e-mail as notify built it until 3 Dec (email.mime, compat32)."""
    message = MIMEText(sent.body, "plain", "utf-8")
    message["From"] = SENDER
    message["To"] = sent.address
    message["Subject"] = Header(sent.subject, "utf-8")
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain="huiying")
    return message.as_bytes()


def per_item(function, items: list, count: int) -> dict:
    started, cpu = time.perf_counter(), own_cpu()
    for item in items:
        function(item)
    return {
        "wall_ms": round(1000 * (time.perf_counter() - started) / count, 4),
        "cpu_ms": round(1000 * (own_cpu() - cpu) / count, 4),
    }


def emails(count: int) -> dict:
    deliveries = [delivery(n) for n in range(count)]
    report = {
        "build": {
            "email_message": per_item(lambda d: channels.email_message(d, SENDER), deliveries, count),
            "email.mime": per_item(email_mime, deliveries, count),
        }
    }
    batches = [deliveries[start : start + BATCH] for start in range(0, count, BATCH)]
    for kind in ("pipelined", "one_at_a_time"):
        sink = SmtpSink(plain=kind == "one_at_a_time")
        connections = channels.SmtpConnections()
        try:

            def send(batch, port=sink.port, connections=connections):
                messages = [(d.address, channels.email_message(d, SENDER)) for d in batch]
                outcomes = connections.send_many("127.0.0.1", port, SENDER, messages)
                assert outcomes == [None] * len(batch), outcomes

            send(batches[0])  # the connection and its EHLO, outside the measure
            sink_cpu = cpu_seconds(sink.process.pid)
            report[kind] = per_item(send, batches, count)
            report[kind]["sink_cpu_ms"] = round(1000 * (cpu_seconds(sink.process.pid) - sink_cpu) / count, 4)
        finally:
            sink.close()
    report["ratios"] = {
        "build_cpu_email_message_to_email.mime": _ratio(
            report["build"]["email_message"], report["build"]["email.mime"]
        ),
        "send_cpu_pipelined_to_one_at_a_time": _ratio(report["pipelined"], report["one_at_a_time"]),
        "sink_cpu_pipelined_to_one_at_a_time": round(
            report["pipelined"]["sink_cpu_ms"] / max(report["one_at_a_time"]["sink_cpu_ms"], 1e-9), 3
        ),
    }
    return report


def _ratio(ours: dict, theirs: dict) -> float:
    return round(ours["cpu_ms"] / theirs["cpu_ms"], 3)


def updates(database_url: str, rows: int) -> dict:
    engine = create_db_engine(database_url)
    metadata = MetaData()
    table = Table(
        "bench_cases",
        metadata,
        Column("case_id", String(32), primary_key=True),
        Column("status", String(16), nullable=False),
        Column("category", String(64)),
        Column("departments", JSON),
        Column("updated_at", UTCDateTime),
        Column("returns", Integer, nullable=False),
    )
    metadata.create_all(engine)
    stamp = datetime.now(timezone.utc)
    with engine.begin() as connection:
        connection.execute(
            table.insert(),
            [
                dict(case_id=f"HY-{n:06d}", status="received", departments=[], updated_at=stamp, returns=0)
                for n in range(rows)
            ],
        )
        connection.execute(text("ANALYZE bench_cases"))
    rng = random.Random(7)

    def changes(round_: int) -> list[dict]:
        picked = rng.sample(range(rows), 100)
        return [
            dict(
                case_id=f"HY-{n:06d}",
                status="referred",
                category="roads",
                departments=["住建局", "城管局"],
                updated_at=datetime.now(timezone.utc),
                returns=round_,
            )
            for n in picked
        ]

    def one_by_one(session, changed):
        session.execute(
            table.update().where(table.c.case_id == bindparam("b_key")),
            [{"b_key": row["case_id"], **{k: v for k, v in row.items() if k != "case_id"}} for row in changed],
        )

    def together(session, changed):
        update_many(session, table, table.c.case_id, changed)

    sessions = sessionmaker(engine)
    report = {}
    for name, write in [("update_per_row", one_by_one), ("update_many", together)] * 2:  # each twice, alternating
        with sessions() as session:
            backend = session.execute(text("SELECT pg_backend_pid()")).scalar()
            backend_cpu, client_cpu, started = cpu_seconds(backend), own_cpu(), time.perf_counter()
            for round_ in range(rows // 100):
                write(session, changes(round_))
                session.commit()
            measured = {
                "wall_ms": 1000 * (time.perf_counter() - started) / rows,
                "client_cpu_ms": 1000 * (own_cpu() - client_cpu) / rows,
                "postgresql_cpu_ms": 1000 * (cpu_seconds(backend) - backend_cpu) / rows,
            }
        best = report.setdefault(name, measured)
        report[name] = {k: round(min(best[k], measured[k]), 4) for k in measured}  # the better of two
    engine.dispose()
    ours, theirs = report["update_many"], report["update_per_row"]
    report["ratios"] = {
        f"{what}_update_many_to_update_per_row": round(ours[what] / theirs[what], 3)
        for what in ("wall_ms", "client_cpu_ms", "postgresql_cpu_ms")
    }
    return report


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.sending", description=__doc__.split("\n\n")[0])
    parser.add_argument("--emails", type=int, default=4000)
    parser.add_argument("--rows", type=int, default=20000, help="rows updated in each of the four measures")
    args = parser.parse_args()
    resources = Resources()
    try:
        report = {"emails": emails(args.emails), "updates": updates(resources.database(), args.rows)}
    finally:
        resources.close()
    print(json.dumps(report, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()
