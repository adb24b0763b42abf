"""Notify against a real SMTP server (aiosmtpd, in its own process) and local HTTP receivers:
each kind of event reaching its recipients, retries, the dead-letter path and its replay, no
duplicate under redelivery, and status updates back to the source ticketing system."""

import json
import shutil
import time
from email.header import decode_header, make_header

import pytest
from kombu import Connection, Producer

from services.common.topology import event_exchange
from services.notify.channels import signature
from tests.conftest import Receiver, wait_for
from tests.support import DEMO_DIRECTORY

pytestmark = pytest.mark.interface
RULES_DIR = DEMO_DIRECTORY.parent.parent / "rules"
SECRET = "test-secret"


@pytest.fixture
def env(run_services, service_config, rabbit_config, rpc, demo_directory, smtp, tmp_path, monkeypatch):
    receiver = Receiver()
    rules = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules)
    (rules / "notify" / "sources.yaml").write_text(
        f"sources:\n  hotline-12345:\n    callback: {receiver.url('/callback')}\n", encoding="utf-8"
    )
    recipients = rules / "notify" / "recipients.yaml"
    recipients.write_text(
        recipients.read_text(encoding="utf-8").replace("max_attempts: 6", "max_attempts: 3"), encoding="utf-8"
    )
    smtp_port, _ = smtp
    monkeypatch.setenv("HUIYING_RULES_DIR", str(rules))
    monkeypatch.setenv("HUIYING_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("HUIYING_SMTP_PORT", str(smtp_port))
    monkeypatch.setenv("HUIYING_SMS_GATEWAY_URL", receiver.url("/sms"))
    monkeypatch.setenv("HUIYING_WEBHOOK_SECRET", SECRET)
    directory = json.loads(json.dumps(demo_directory))
    cgj = next(d for d in directory["departments"] if d["code"] == "cgj")
    cgj["contact"].update(
        webhook=receiver.url("/cgj/webhook"), wecom=receiver.url("/cgj/wecom"), dingtalk=receiver.url("/cgj/dingtalk")
    )
    run_services("intake", "routing", "supervision", "notify")
    rpc.intake.load_directory(directory)
    yield receiver, rpc
    receiver.close()


def submit(rpc, external_id, **extra):
    return rpc.intake.submit_case(
        {
            "source": "hotline-12345",
            "external_id": external_id,
            "title": "丹竹头社区路灯不亮",
            "description": "一周没有路灯",
            "street": "南湾",
            "reporter_phone": "13912345678",
            **extra,
        }
    )["id"]


def test_a_referral_reaches_the_department_on_every_channel_and_the_source_hears_back(env, smtp):
    receiver, rpc = env
    case_id = submit(rpc, "N-1")
    _, mails = smtp
    wait_for(lambda: len(mails()) == 1 and receiver.at("/cgj/dingtalk") and receiver.at("/callback"), timeout=20)
    [mail] = mails()
    subject = str(make_header(decode_header(mail["Subject"])))
    assert mail["To"] == "cgj@lg.example.gov.cn" and subject == f"【回应】新转办件 {case_id}：丹竹头社区路灯不亮"
    assert "龙岗区城市管理和综合执法局" in mail.get_payload(decode=True).decode()

    [hook] = receiver.at("/cgj/webhook")
    assert hook["signature"] == signature(SECRET, hook["body"])  # HMAC-SHA256 over the exact body
    assert json.loads(hook["body"])["recipient"] == "department:cgj"
    assert json.loads(receiver.at("/cgj/wecom")[0]["body"])["msgtype"] == "markdown"
    assert json.loads(receiver.at("/cgj/dingtalk")[0]["body"])["markdown"]["title"].startswith("【回应】新转办件")

    [update] = receiver.at("/callback")
    document = json.loads(update["body"])
    assert {"update_id", "service_request_id", "status", "description", "updated_datetime"} <= set(document)
    assert (document["service_request_id"], document["status"], document["external_id"]) == (case_id, "open", "N-1")
    assert update["signature"] == signature(SECRET, update["body"])

    expected = {("department:cgj", c, "sent") for c in ("email", "webhook", "wecom", "dingtalk")} | {
        ("source:hotline-12345", "callback", "sent")
    }
    # The receivers got everything; the log says "sent" a moment later, once each send returned.
    wait_for(
        lambda: {(d["recipient"], d["channel"], d["status"]) for d in rpc.notify.deliveries_for(case_id)} == expected,
        timeout=10,
    )


def test_the_citizen_hears_of_the_reply_and_the_closure_by_sms_and_the_source_of_each_step(env):
    receiver, rpc = env
    case_id = submit(rpc, "N-2")
    wait_for(lambda: rpc.routing.list_referrals("referred", None, case_id))
    [referral] = rpc.routing.list_referrals("referred", None, case_id)
    rpc.routing.referral_step(referral["id"], "reply", {"result": "已修复路灯"})
    wait_for(lambda: receiver.at("/sms"), timeout=20)
    [sms] = receiver.at("/sms")
    assert json.loads(sms["body"])["phone"] == "13912345678"  # the gateway needs the real number
    assert "已修复路灯" in json.loads(sms["body"])["text"]
    rpc.routing.record_feedback(case_id, "满意")
    wait_for(lambda: len(receiver.at("/sms")) == 2 and len(receiver.at("/callback")) == 3, timeout=20)
    statuses = [json.loads(r["body"])["status"] for r in receiver.at("/callback")]
    assert sorted(statuses) == ["closed", "open", "open"]  # one batch's callbacks may overtake another's
    log = rpc.notify.deliveries_for(case_id)
    assert all(d["address"] == "139****5678" for d in log if d["channel"] == "sms")


def test_a_failed_send_is_retried_by_the_broker(env):
    receiver, rpc = env
    receiver.fail = 2  # the first two requests (whichever channels) get 503
    case_id = submit(rpc, "N-3")

    def all_five_sent():  # one read: two could see different moments (no deliveries yet, then five)
        log = rpc.notify.deliveries_for(case_id)
        return len(log) == 5 and all(d["status"] == "sent" for d in log)

    wait_for(all_five_sent, timeout=30)
    log = rpc.notify.deliveries_for(case_id)
    # Exactly two failed attempts in all, whichever deliveries they hit (one may have hit twice).
    assert sum(d["attempts"] for d in log) == len(log) + 2, (
        receiver.fail,
        [(d["channel"], d["attempts"], d["last_error"]) for d in log],
    )


def test_a_send_that_keeps_failing_is_parked_and_replayed(env, rabbit_config):
    receiver, rpc = env
    receiver.fail = 10_000
    case_id = submit(rpc, "N-4")
    wait_for(lambda: len([d for d in rpc.notify.failures() if d["case_id"] == case_id]) == 4, timeout=40)
    failed = [d for d in rpc.notify.failures() if d["case_id"] == case_id]
    assert all(d["attempts"] == 3 and "HTTP 503" in d["last_error"] for d in failed)

    def parked():
        with Connection(rabbit_config["AMQP_URI"]) as connection:
            return connection.default_channel.queue_declare("huiying.notify.deliveries.dead", passive=True)[1]

    # notify parks a delivery after committing its failure: under CI's load the fourth was
    # committed, so listed, before it was parked
    wait_for(lambda: parked() >= 4, timeout=10)
    receiver.fail = 0
    assert len(rpc.notify.retry(None)["retried"]) >= 4
    wait_for(lambda: all(d["status"] == "sent" for d in rpc.notify.deliveries_for(case_id)), timeout=20)
    assert rpc.notify.failures() == []


def test_no_duplicate_when_an_event_is_delivered_twice(env, smtp, rabbit_config, db):
    from sqlalchemy import select

    from services.routing.models import outbox as routing_outbox

    receiver, rpc = env
    case_id = submit(rpc, "N-5")
    _, mails = smtp
    wait_for(lambda: len(mails()) == 1 and len(receiver.at("/callback")) == 1, timeout=20)
    with db.connect() as connection:
        payloads = connection.scalars(
            select(routing_outbox.c.payload).where(routing_outbox.c.event_type == "case_referred")
        ).all()
    [event] = [p for p in payloads if p["case_id"] == case_id]
    with Connection(rabbit_config["AMQP_URI"]) as connection:  # the same event, with its id, once more
        Producer(connection.channel()).publish(
            event, exchange=event_exchange("routing"), routing_key="case_referred", serializer="json"
        )
    time.sleep(2)
    assert len(mails()) == 1 and len(receiver.at("/callback")) == 1
    assert len(rpc.notify.deliveries_for(case_id)) == 5


def test_an_event_back_after_its_work_message_was_lost_sends_what_is_still_pending(env, smtp, rabbit_config, db):
    """The broker went down between notify's commit and its publish: the deliveries are recorded,
    pending, with no work message, and the event comes back after the restart. They go out then,
    not a minute later by the stale-delivery timer."""
    from sqlalchemy import select, update

    from services.common.timeutil import now
    from services.notify.models import deliveries
    from services.routing.models import outbox as routing_outbox

    receiver, rpc = env
    case_id = submit(rpc, "N-6")
    _, mails = smtp
    wait_for(lambda: len(mails()) == 1 and len(receiver.at("/callback")) == 1, timeout=20)
    with db.begin() as connection:
        [event] = [
            p
            for p in connection.scalars(
                select(routing_outbox.c.payload).where(routing_outbox.c.event_type == "case_referred")
            )
            if p["case_id"] == case_id
        ]
    # Sent as far as notify is concerned too: a send it has not yet recorded would overwrite the
    # loss staged below (under CI's load the mail was in before that commit, and nothing resent).
    sent = select(deliveries.c.id).where(
        deliveries.c.event_id == event["event_id"],
        deliveries.c.channel.in_(("email", "callback")),
        deliveries.c.status == "sent",
    )

    def both_sent():
        with db.connect() as connection:
            return len(connection.execute(sent).all()) == 2

    wait_for(both_sent, timeout=10)
    with db.begin() as connection:
        # as if they had been recorded and their work message lost (updated now: the timer waits)
        lost = connection.execute(
            update(deliveries)
            .where(deliveries.c.event_id == event["event_id"], deliveries.c.channel.in_(("email", "callback")))
            .values(status="pending", sent_at=None, updated_at=now())
            .returning(deliveries.c.id)
        ).all()
    assert len(lost) == 2
    with Connection(rabbit_config["AMQP_URI"]) as connection:
        Producer(connection.channel()).publish(
            event, exchange=event_exchange("routing"), routing_key="case_referred", serializer="json"
        )
    wait_for(lambda: len(mails()) == 2 and len(receiver.at("/callback")) == 2, timeout=15)

    def statuses():
        with db.connect() as connection:
            of_event = select(deliveries.c.status).where(deliveries.c.event_id == event["event_id"])
            return set(connection.scalars(of_event))

    # A mail or callback is received a moment before notify commits it as sent.
    wait_for(lambda: statuses() == {"sent"}, timeout=5)
    assert statuses() == {"sent"}


def test_escalation_reaches_department_supervisors_and_inspection_office_and_reminders_come_as_a_digest(env, smtp):
    receiver, rpc = env
    case_id = submit(rpc, "N-6")
    _, mails = smtp
    wait_for(lambda: len(mails()) == 1, timeout=20)
    [referral] = rpc.routing.list_referrals("referred", None, case_id)
    due = referral["due_at"][:10]

    from datetime import date

    from services.common.workdays import WorkingCalendar

    calendar = WorkingCalendar.from_file(RULES_DIR / "calendar" / "holidays.yaml")
    day_before = next(
        d
        for d in (date.fromordinal(date.fromisoformat(due).toordinal() - n) for n in range(1, 10))
        if calendar.working_days_between(d, date.fromisoformat(due)) == 1
    )
    swept = rpc.supervision.sweep(f"{day_before}T08:00:00+08:00")  # the reminder is held for the digest
    assert any(d["action"] == "remind_department" for d in swept["decisions"]), swept
    wait_for(lambda: any(d["status"] == "held" for d in rpc.notify.deliveries_for(case_id)), timeout=15)
    assert rpc.notify.send_digests(f"{day_before}T08:30:00+08:00") == {"digests": []}  # before 09:00
    digests = rpc.notify.send_digests(f"{day_before}T09:05:00+08:00")["digests"]
    assert digests and rpc.notify.send_digests(f"{day_before}T10:00:00+08:00") == {"digests": []}  # once a day
    wait_for(lambda: any("催办汇总" in str(make_header(decode_header(m["Subject"]))) for m in mails()), timeout=20)

    rpc.supervision.sweep("2027-03-01T09:00:00+08:00")  # long overdue: agenda, joint supervision, supervisors
    recipients = lambda: {(d["recipient"], d["channel"]) for d in rpc.notify.deliveries_for(case_id)}  # noqa: E731
    wait_for(lambda: ("inspection_office:ducha", "email") in recipients(), timeout=20)
    supervisors = {r for r, c in recipients() if r.startswith("supervisor:")}
    assert len(supervisors) == 3  # the three special supervisors posted to 城管局
    assert {c for r, c in recipients() if r.startswith("supervisor:")} == {"sms"}  # the demo members have phones
    wait_for(lambda: len(receiver.at("/sms")) >= 3, timeout=20)  # recorded first, sent a moment later
    sms_numbers = [json.loads(r["body"])["phone"] for r in receiver.at("/sms")]
    assert all(number.isdigit() for number in sms_numbers)  # the gateway gets whole numbers; the log masks them
    log = rpc.notify.deliveries_for(case_id)
    assert all("****" in d["address"] for d in log if d["channel"] == "sms")


def test_the_member_who_raised_it_hears_of_the_reply_and_the_cli_shows_failures_and_the_log(
    env, smtp, rabbit_config, monkeypatch
):
    from click.testing import CliRunner

    from huiying.cli import main

    receiver, rpc = env
    monkeypatch.setenv("AMQP_URI", rabbit_config["AMQP_URI"])
    cli = CliRunner()
    case_id = rpc.intake.submit_case(
        {
            "source": "member-m001",
            "external_id": "M-1",
            "title": "路灯不亮",
            "description": "一周没有路灯",
            "street": "南湾",
            "workstation": "ws-nanwan",
        }
    )["id"]
    wait_for(lambda: rpc.routing.list_referrals("referred", None, case_id))
    [referral] = rpc.routing.list_referrals("referred", None, case_id)
    receiver.fail = 10_000  # the member's SMS will fail; e-mail still works
    rpc.routing.referral_step(referral["id"], "reply", {"result": "已修复"})
    _, mails = smtp
    wait_for(lambda: any(m["To"] == "ws-nanwan@lgzx.example.org.cn" for m in mails()), timeout=20)
    wait_for(lambda: any(d["recipient"] == "member:m001" for d in rpc.notify.failures()), timeout=30)

    failures = json.loads(cli.invoke(main, ["notify", "failures", "--json"]).stdout)
    [sms] = [d for d in failures if d["recipient"] == "member:m001"]
    assert sms["channel"] == "sms" and sms["address"].startswith("138****")
    receiver.fail = 0
    retried = json.loads(cli.invoke(main, ["notify", "retry", "--all", "--json"]).stdout)
    assert sms["id"] in retried["retried"]
    wanted = {("member:m001", "sent"), ("workstation:ws-nanwan", "sent"), ("department:cgj", "sent")}

    def shown_sent():
        shown = json.loads(cli.invoke(main, ["case", "show", case_id, "--json"]).stdout)
        return {(d["recipient"], d["status"]) for d in shown["deliveries"]} >= wanted

    wait_for(shown_sent, timeout=20)  # the replayed SMS goes out a moment after the retry
