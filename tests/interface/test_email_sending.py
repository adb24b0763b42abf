"""Notify's e-mail sending (services/notify/channels.py) against a real SMTP server on loopback
(huiying.mail_sink in its own process, recording what it accepts): the pipelined groups a server
offering PIPELINING and CHUNKING gets, one e-mail at a time for a server offering neither, each
e-mail's own outcome when the server refuses some, a connection the server dropped while it was
idle, no server at all; and the message itself, against what the standard library's email.mime
writes for the same delivery."""

import email
import email.policy
import json
import smtplib
import socket
import subprocess
import sys
from email.header import Header, decode_header, make_header
from email.mime.text import MIMEText
from types import SimpleNamespace

import pytest

from huiying.mail_sink import SmtpSink
from services.notify import channels
from tests.conftest import accepts_connections, wait_for

SENDER = "回应 <huiying@district.example>"


def delivery(number: int, address: str | None = None, subject: str | None = None):
    return SimpleNamespace(
        id=number,
        channel="email",
        address=address or f"dept{number}@district.example",
        recipient=f"department:d{number}",
        subject=subject or f"新的转办件 HY-2026-{number:06d} 请在五个工作日内办理并答复",
        body=f"第 {number} 件：道路积水，请及时处理。\n" * 30,
        attempts=0,
    )


@pytest.fixture(params=["pipelined", "plain"])
def server(request, tmp_path):
    record = tmp_path / "accepted.jsonl"
    sink = SmtpSink(record=str(record), plain=request.param == "plain")
    config = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": sink.port, "SMTP_FROM": SENDER}
    server = SimpleNamespace(config=config, record=record, kind=request.param, process=sink.process)
    yield server
    server.process.terminate()
    server.process.wait(5)


def accepted(server) -> list[dict]:
    if not server.record.exists():
        return []
    return [json.loads(line) for line in server.record.read_text(encoding="utf-8").splitlines()]


def send_all(server, deliveries, connections):
    messages = [(d.address, channels.email_message(d, SENDER)) for d in deliveries]
    return connections.send_many("127.0.0.1", server.config["SMTP_PORT"], SENDER, messages)


def test_every_email_arrives_whole_and_in_order_in_groups(server):
    connections = channels.SmtpConnections()
    deliveries = [delivery(n) for n in range(1, 121)]  # more than two groups (GROUP_MESSAGES)
    assert send_all(server, deliveries, connections) == [None] * 120
    got = accepted(server)
    assert [g["recipients"] for g in got] == [[d.address] for d in deliveries]
    assert {g["sender"] for g in got} == {"huiying@district.example"}
    for sent, entry in zip(deliveries, got, strict=True):
        message = email.message_from_string(entry["message"], policy=email.policy.default)
        assert message["Subject"] == sent.subject
        assert message.get_content() == sent.body
    [(_, _, smtp, _)] = connections.idle  # one connection, kept for the next batch
    assert smtp.has_extn("chunking") == (server.kind == "pipelined")  # so each path was taken


def test_each_email_has_its_own_outcome_when_some_are_refused(server):
    connections = channels.SmtpConnections()
    deliveries = [delivery(n) for n in range(1, 11)]
    deliveries[2].address = "refused-3@district.example"  # 550: for good
    deliveries[6].address = "deferred-7@district.example"  # 451: for now
    outcomes = send_all(server, deliveries, connections)
    refused, deferred = outcomes[2], outcomes[6]
    assert "550" in str(refused) and not refused.retryable
    assert "451" in str(deferred) and deferred.retryable
    assert [o is None for o in outcomes] == [n not in (2, 6) for n in range(10)]
    assert [g["recipients"][0] for g in accepted(server)] == [
        d.address for n, d in enumerate(deliveries) if n not in (2, 6)
    ]
    # the connection is still good: the next e-mails go on it
    assert send_all(server, [delivery(11)], connections) == [None]
    assert len(accepted(server)) == 9


def test_a_connection_the_server_dropped_while_idle_is_replaced_and_nothing_is_lost(server):
    connections = channels.SmtpConnections()
    assert send_all(server, [delivery(1)], connections) == [None]
    server.process.kill()  # the server restarts while notify's connection waits for the next batch
    server.process.wait(5)
    port = server.config["SMTP_PORT"]
    options = ["--record", str(server.record)] + (["--plain"] if server.kind == "plain" else [])
    server.process = subprocess.Popen([sys.executable, "-m", "huiying.mail_sink", str(port), *options])
    wait_for(lambda: accepts_connections(port), timeout=10)  # the mail sink is back
    assert send_all(server, [delivery(2), delivery(3)], connections) == [None, None]
    assert [g["recipients"][0] for g in accepted(server)] == [f"dept{n}@district.example" for n in (1, 2, 3)]


def test_no_server_means_every_email_is_tried_again_later():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    messages = [(d.address, channels.email_message(d, SENDER)) for d in (delivery(1), delivery(2))]
    outcomes = channels.SmtpConnections().send_many("127.0.0.1", port, SENDER, messages)
    assert all(o.retryable and "ConnectionRefused" in str(o) for o in outcomes)


def test_a_bad_address_fails_alone_and_for_good(server):
    injecting = delivery(2, address="a@b.example\r\nBcc: everyone@b.example")
    two = delivery(4, address="a@b.example,evil@x.example")
    deliveries = [delivery(1), injecting, delivery(3), two]
    outcomes = channels.send_all(deliveries, server.config)
    assert outcomes[0] is None and outcomes[2] is None
    for bad in (outcomes[1], outcomes[3]):
        assert not bad.retryable and "not one plain e-mail address" in str(bad)
    assert [g["recipients"][0] for g in accepted(server)] == ["dept1@district.example", "dept3@district.example"]


def test_only_a_refusal_of_the_email_itself_is_final():
    assert not channels._refused(550, "no such mailbox").retryable
    assert channels._refused(451, "try again later").retryable
    assert channels._refused(503, "bad sequence of commands").retryable  # not the e-mail's fault
    for whole_server in (smtplib.SMTPConnectError(554, "too many connections"), smtplib.SMTPHeloError(501, "no")):
        assert channels._error("email", whole_server).retryable


def test_the_message_reads_as_the_standard_librarys_does():
    """What email.mime writes for the delivery (as notify did until 3 Dec) and what notify
    writes now read back the same: headers, subject, sender and body."""
    sent = delivery(7, subject="关于" + "某某街道道路积水问题" * 8 + "的转办通知")  # a subject folded over lines
    ours = email.message_from_bytes(channels.email_message(sent, SENDER), policy=email.policy.default)
    reference = MIMEText(sent.body, "plain", "utf-8")
    reference["From"] = Header("回应", "utf-8").encode() + " <huiying@district.example>"
    reference["To"] = sent.address
    reference["Subject"] = Header(sent.subject, "utf-8")
    theirs = email.message_from_bytes(reference.as_bytes(), policy=email.policy.default)
    for name in ("From", "To", "Subject", "Content-Type", "Content-Transfer-Encoding", "MIME-Version"):
        assert str(ours[name]) == str(theirs[name]), name
    assert ours.get_content() == theirs.get_content() == sent.body
    assert ours["Date"] and ours["Message-ID"].endswith("@huiying>")
    for sender in (SENDER, "中国人民政治协商会议某某区委员会提案委员会社情民意信息办公室 <x@district.example>"):
        raw = channels.email_message(sent, sender)
        assert all(len(line) <= 78 for line in raw.split(b"\r\n"))  # RFC 5322's line length
        assert b"\n" not in raw.replace(b"\r\n", b"")  # every line ends in CRLF
        # RFC 2047's decoder gives the name back whole (email.policy.default's address parser puts
        # a space between the encoded words of a long name; email.mime left no address at all)
        assert str(make_header(decode_header(email.message_from_bytes(raw)["From"]))) == sender
        assert email.message_from_bytes(raw, policy=email.policy.default)["From"].addresses[0].addr_spec == (
            sender.split("<")[1].rstrip(">")
        )
