"""Deliver every message twice: the same scenario on two fresh stacks at once, one where every event,
ticket and notify delivery message reaches its consumers a second time (a copy republished by a
tap on every exchange), must end with the same counts of cases, referrals, decisions, agenda
items and notifications — and the same e-mails and SMS actually sent. The copy stack's logs,
events and outbound messages are then scanned for unmasked phone numbers."""

import json
import time
from datetime import timedelta

import eventlet
import requests
from kombu import Connection, Exchange, Producer, Queue

from services.common.timeutil import now
from services.common.topology import event_exchange
from tests.faults.harness import Sender, case_payload, unmasked_phones
from tests.support import DEMO_DIRECTORY

CASES = 20
SUGGESTIONS = 14
COPY_HEADER = "x-test-copy"
# What every consumer listens to: each service's events (topic), tickets and notify's deliveries.
TAPPED = [
    *[(event_exchange(service), "#") for service in ("intake", "routing", "supervision")],
    (Exchange("huiying.tickets", "direct", durable=True), "ticket"),
    (Exchange("huiying.notify", "direct", durable=True), "delivery"),
]


class Duplicator:
    """Republishes a copy of every message published to the tapped exchanges, once."""

    def __init__(self, amqp_uri: str):
        self.connection = Connection(amqp_uri)
        self.copies, self.by_exchange = 0, {}
        channel = self.connection.channel()
        self.queue = Queue("test-duplicator", durable=False, auto_delete=False)
        self.queue(channel).declare()
        for exchange, key in TAPPED:
            exchange(channel).declare()
            channel.queue_bind(self.queue.name, exchange.name, routing_key=key)
        self.running = True
        self.thread = eventlet.spawn(self.run)

    def run(self):
        channel = self.connection.channel()
        producer = Producer(channel)
        bound = self.queue(channel)
        while self.running:
            message = bound.get(no_ack=False)
            if message is None:
                eventlet.sleep(0.02)
                continue
            headers = message.headers or {}
            if not headers.get(COPY_HEADER):
                info = message.delivery_info
                producer.publish(
                    message.body,
                    exchange=info["exchange"],
                    routing_key=info["routing_key"],
                    content_type=message.content_type,
                    content_encoding=message.content_encoding,
                    headers={**headers, COPY_HEADER: 1},
                    delivery_mode=2,
                )
                self.copies += 1
                self.by_exchange[info["exchange"]] = self.by_exchange.get(info["exchange"], 0) + 1
            message.ack()

    def close(self):
        self.running = False
        self.thread.wait()
        self.connection.release()


def scenario(stack) -> dict:
    """Import a consultation event's 58 suggestions, stream 40 tickets, answer some, rate them,
    sweep a month later; returns what was counted and sent."""
    stack.up()
    # The first SUGGESTIONS rows of the consultation event's file: enough similar ones for a cluster.
    rows = (DEMO_DIRECTORY.parent / "examples" / "haijixing-58-suggestions.csv").read_text(encoding="utf-8")
    suggestions = stack.root / "suggestions.csv"
    suggestions.write_text("\n".join(rows.splitlines()[: SUGGESTIONS + 1]) + "\n", encoding="utf-8")
    imported = json.loads(stack.cli("import", suggestions, "--source", "consult", "--json").stdout)
    assert imported["imported"] == SUGGESTIONS
    phases = [("up and import", time.monotonic())]
    sender = Sender(stack, stack.keys["hotline"])
    for i in range(CASES):
        (sender.http if i % 2 else sender.amqp)(case_payload(i, "hotline-12345", "D"))
    sender.close()
    stack.wait_settled(deliveries_sent=True)
    phases.append(("cases", time.monotonic()))

    staff = {"Authorization": f"Bearer {stack.keys['staff']}"}
    routing = stack.url("routing")

    def step(referral_id, name, body=None):
        response = requests.post(f"{routing}/api/v1/referrals/{referral_id}/{name}", json=body or {}, headers=staff)
        assert response.status_code == 200, response.text

    found = requests.get(f"{routing}/api/v1/referrals", params={"limit": 1000}, headers=staff).json()["referrals"]
    single = sorted(
        (r for r in found if sum(x["case_id"] == r["case_id"] for x in found) == 1), key=lambda r: r["case_id"]
    )
    for r in single[:12]:
        step(r["id"], "accept")
        step(r["id"], "reply", {"result": "已派人处理，问题已解决"})
    for r in single[12:14]:
        step(r["id"], "return", {"reason": "不属于本单位职责"})
    for r in single[14:16]:
        step(r["id"], "extension", {"working_days": 5, "reason": "需协调多个部门"})
        step(r["id"], "extension/decision", {"grant": True})
    stack.wait_settled(deliveries_sent=True)
    for index, r in enumerate(single[:12]):
        rating = "不满意" if index % 3 == 0 else "满意"
        response = requests.post(
            f"{routing}/api/v1/cases/{r['case_id']}/feedback", json={"rating": rating}, headers=staff
        )
        assert response.status_code == 200, response.text
    stack.wait_settled(deliveries_sent=True)
    phases.append(("steps", time.monotonic()))
    later = (now() + timedelta(days=40)).isoformat()
    swept = json.loads(stack.cli("sweep", "--now", later, "--json").stdout)
    assert swept["decisions"], "the month-later sweep should escalate something"
    stack.wait_settled(deliveries_sent=True)
    phases.append(("sweep", time.monotonic()))
    print(" ".join(f"{name} {t - phases[0][1]:.0f}s" for name, t in phases))
    return {
        **stack.counts(),
        "e-mails sent": len(stack.smtp.messages()),
        "SMS sent": len(stack.receiver.at("/sms")),
        "dead letters": stack.dead_letters(),
    }


def test_every_message_delivered_twice_changes_no_count(make_stack, capsys):
    # The two stacks run their scenarios at once (a green thread each): they share nothing but
    # the machine, and mostly wait for their stacks to settle.
    once_run = eventlet.spawn(scenario, make_stack("once"))
    try:
        twice_stack = make_stack("twice")
        duplicator = Duplicator(twice_stack.amqp_uri)
        try:
            twice = scenario(twice_stack)
        finally:
            duplicator.close()
    except BaseException:
        once_run.kill()  # before the fixture takes its stack down
        raise
    once = once_run.wait()
    with capsys.disabled():
        print(
            f"\nduplicated {duplicator.copies} messages ({duplicator.by_exchange});"
            f" counts once: {json.dumps(once, ensure_ascii=False)}"
        )
    # Events, tickets and deliveries really went twice: every kind of message was copied (events
    # travel several to a message, so there are fewer messages than events).
    assert set(duplicator.by_exchange) == {exchange.name for exchange, _ in TAPPED}, duplicator.by_exchange
    assert duplicator.copies > 100
    assert once["cases"] == SUGGESTIONS + CASES and once["agenda items"] > 0 and once["e-mails sent"] > 0
    assert once["SMS sent"] > 0 and once["decisions"] > 0
    assert twice == once

    # Personal data: no unmasked phone in any log line, published event, stored notification or
    # message actually sent (the SMS gateway's "phone" field is the address, not the text).
    texts = dict(twice_stack.logs())
    for service in ("intake", "routing", "supervision", "notify"):
        for (payload,) in twice_stack.rows(f"SELECT payload FROM {service}_outbox"):
            texts[f"{service} event {payload['event_type']}"] = json.dumps(payload, ensure_ascii=False)
    for subject, body in twice_stack.rows("SELECT subject, body FROM notify_deliveries"):
        texts[f"delivery {subject}"] = f"{subject}\n{body}"
    for index, mail in enumerate(twice_stack.smtp.messages()):
        texts[f"e-mail {index}"] = mail.as_string() + (mail.get_payload(decode=True) or b"").decode(errors="replace")
    for index, request in enumerate(twice_stack.receiver.requests):
        body = json.loads(request["body"])
        body.pop("phone", None)
        texts[f"HTTP {request['path']} {index}"] = json.dumps(body, ensure_ascii=False)
    lines = sum(text.count("\n") + 1 for text in texts.values())
    with capsys.disabled():
        print(f"personal data: scanned {len(texts)} logs, events and messages ({lines} lines) for phone numbers")
    assert len(texts) > 100
    assert unmasked_phones(texts) == {}
