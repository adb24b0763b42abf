"""Sending deliveries (``send_all``): e-mail over SMTP, those of a batch together, and one by one a
signed JSON webhook, 企业微信 and 钉钉 group robots in their own message formats, SMS through a
configurable HTTP gateway, and status callbacks to ticketing systems. One function per channel;
``ChannelError`` says whether trying again may help."""

import base64
import functools
import hashlib
import hmac
import json
import re
import smtplib
import time
from email.header import Header
from email.utils import formataddr, formatdate, make_msgid, parseaddr

import requests

TIMEOUT = 10


class ChannelError(RuntimeError):
    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _send_one(delivery, config: dict):
    """Send a delivery of any channel but e-mail (``send_all`` sends those together)."""
    sender = {
        "webhook": _webhook,
        "callback": _webhook,
        "wecom": _wecom,
        "dingtalk": _dingtalk,
        "sms": _sms,
    }.get(delivery.channel)
    if sender is None:
        raise ChannelError(f"unknown channel {delivery.channel!r}", retryable=False)
    try:
        sender(delivery, config)
    except ChannelError:
        raise
    except (OSError, requests.RequestException) as exc:
        raise _error(delivery.channel, exc) from None


def send_all(deliveries: list, config: dict) -> list[ChannelError | None]:
    """Send each delivery; how each went, in order (None: sent). The e-mails go together over one
    SMTP connection (``SmtpConnections.send_many``), the rest one by one."""
    outcomes: dict[int, ChannelError | None] = {}
    emails = [delivery for delivery in deliveries if delivery.channel == "email"]
    messages = []
    for delivery in emails:
        try:
            messages.append((delivery, email_message(delivery, config["SMTP_FROM"])))
        except ChannelError as exc:
            outcomes[delivery.id] = exc
    if messages:
        sent = SMTP_CONNECTIONS.send_many(
            config["SMTP_HOST"], config["SMTP_PORT"], config["SMTP_FROM"], [(d.address, m) for d, m in messages]
        )
        outcomes.update((delivery.id, outcome) for (delivery, _), outcome in zip(messages, sent, strict=True))
    for delivery in deliveries:
        if delivery.channel != "email":
            try:
                _send_one(delivery, config)
                outcomes[delivery.id] = None
            except ChannelError as exc:
                outcomes[delivery.id] = exc
    return [outcomes[delivery.id] for delivery in deliveries]


def _error(channel: str, exc: BaseException) -> ChannelError:
    """A failure of the network or of the other side as a whole (a refused connection, a 554
    greeting, a timeout): tried again later."""
    return ChannelError(f"{channel}: {type(exc).__name__}: {str(exc)[:200]}")


def _refused(code: int, text: str) -> ChannelError:
    """An SMTP server's answer refusing one e-mail (its MAIL, RCPT or data): final when 5xx (an
    unknown mailbox, a refused sender), as a webhook's 4xx is; 503, a bad sequence of commands,
    is not the e-mail's fault."""
    return ChannelError(f"email: {code} {text[:200]}", retryable=code < 500 or code == 503)


CRLF = "\r\n"
PLAIN_ADDRESS = re.compile(r"[!#-'*+\-./0-9=?A-Z^-~]+@[A-Za-z0-9.\-]+")  # one mailbox, nothing around it


def email_message(delivery, sender: str) -> bytes:
    """The e-mail as sent: UTF-8 text in base64, the subject and the sender's name RFC
    2047-encoded and folded by email.header. Written out here rather than by email.mime and its
    generator, which write the same header lines (tests/interface/test_email_sending.py reads
    the two back side by side) in four times the time: 0.37 ms an e-mail, a fifth of notify's
    CPU for each."""
    if not PLAIN_ADDRESS.fullmatch(delivery.address):
        raise ChannelError(f"email: the address {delivery.address!r} is not one plain e-mail address", retryable=False)
    subject = " ".join(delivery.subject.split())  # a line break in it would end the header
    headers = (
        f'Content-Type: text/plain; charset="utf-8"{CRLF}'
        f"MIME-Version: 1.0{CRLF}"
        f"Content-Transfer-Encoding: base64{CRLF}"
        f"From: {_from_header(sender)}{CRLF}"
        f"To: {delivery.address}{CRLF}"
        f"Subject: {Header(subject, 'utf-8', header_name='Subject').encode(linesep=CRLF)}{CRLF}"
        f"Date: {formatdate(localtime=False)}{CRLF}"
        f"Message-ID: {make_msgid(domain='huiying')}{CRLF}"
        f"{CRLF}"
    )
    return headers.encode("ascii") + base64.encodebytes(delivery.body.encode("utf-8")).replace(b"\n", b"\r\n")


@functools.lru_cache(maxsize=8)
def _from_header(sender: str) -> str:
    """``HUIYING_SMTP_FROM`` (``回应 <huiying@…>`` or a bare address) as the From header."""
    name, address = parseaddr(sender)
    if not PLAIN_ADDRESS.fullmatch(address):
        raise ChannelError(
            f"email: the sender (HUIYING_SMTP_FROM) {sender!r} is not a plain e-mail address", retryable=False
        )
    if not name:
        return address
    if name.isascii():
        return formataddr((name, address))
    encoded = Header(name, "utf-8", header_name="From").encode(linesep=CRLF)
    last_line = encoded.rsplit(CRLF, 1)[-1]
    fold = CRLF if len(last_line) + len(address) + 3 > 78 else ""  # RFC 5322's 78 characters a line
    return f"{encoded}{fold} <{address}>"


# Messages written at once on one connection: their replies (four each, tens of bytes) stay far
# below any socket buffer, so the server never waits for us to read while we wait for it to read;
# and the write is done well within TIMEOUT even on a slow link.
GROUP_MESSAGES = 50
GROUP_BYTES = 256_000


class SmtpConnections:
    """SMTP connections kept open between e-mails: a connection (and its greeting and EHLO) per
    e-mail was a large share of notify's time in a burst. Each is used by one greenthread at a
    time; one that failed is closed, never reused; one taken from the idle list is first asked
    for a NOOP, so that a connection the server dropped meanwhile is replaced before anything is
    sent on it (after that, an e-mail without an answer is tried again later, never at once: it
    may have been accepted).

    Where the server offers PIPELINING and CHUNKING (RFC 2920, RFC 3030: Postfix, Exim and
    Exchange do), a group of e-mails is written at once — for each, RSET, MAIL, RCPT and ``BDAT
    n LAST`` followed by the message — and the replies read after: one round trip for the group
    instead of four for each e-mail, which with eventlet's sockets cost about as much CPU as
    building the e-mail. The RSET makes each e-mail's transaction its own whatever became of the
    one before. Other servers get one e-mail at a time, as smtplib sends it."""

    IDLE_SECONDS = 30  # servers drop idle clients after a minute or more

    def __init__(self):
        self.idle = []  # (host, port, smtp, idle since)

    def send_many(self, host: str, port: int, sender: str, messages: list[tuple[str, bytes]]) -> list:
        """Send ``(recipient, message)`` e-mails from ``sender``; for each in order, None when the
        server accepted it, else the ChannelError saying why not."""
        outcomes, group, size = [], [], 0
        for recipient, message in messages:
            if group and (len(group) == GROUP_MESSAGES or size + len(message) > GROUP_BYTES):
                outcomes += self._send_group(host, port, sender, group)
                group, size = [], 0
            group.append((recipient, message))
            size += len(message)
        if group:
            outcomes += self._send_group(host, port, sender, group)
        return outcomes

    def _send_group(self, host, port, sender, group) -> list:
        smtp = self._take(host, port)
        if smtp is None:
            smtp = smtplib.SMTP(timeout=TIMEOUT)
            try:
                code, greeting = smtp.connect(host, port)
                if code != 220:  # "554 too many connections": the server's state, not the e-mails'
                    raise smtplib.SMTPConnectError(code, greeting)
                smtp.ehlo_or_helo_if_needed()
            except (OSError, smtplib.SMTPException) as exc:
                _close(smtp)
                return [_error("email", exc)] * len(group)
        outcomes, usable = _exchange(smtp, sender, group)
        if usable:
            self.idle.append((host, port, smtp, time.monotonic()))
        else:
            _close(smtp)
        return outcomes

    def _take(self, host, port):
        """An idle connection to the server that still answers, or None."""
        while True:
            now = time.monotonic()
            for index, (h, p, smtp, since) in enumerate(self.idle):
                if (h, p) == (host, port):
                    del self.idle[index]
                    break
            else:
                return None
            if now - since < self.IDLE_SECONDS:
                try:
                    if smtp.noop()[0] == 250:
                        return smtp
                except (OSError, smtplib.SMTPException):
                    pass
            _close(smtp)


def _exchange(smtp, sender: str, group: list[tuple[str, bytes]]) -> tuple[list, bool]:
    """Send the group on this connection: each e-mail's outcome, and whether the connection can
    be used again. An e-mail the server did not answer for is tried again later (retryable)."""
    outcomes: list = []
    try:
        if smtp.has_extn("pipelining") and smtp.has_extn("chunking"):
            commands = []
            for recipient, message in group:
                commands.append(
                    f"RSET\r\nMAIL FROM:{smtplib.quoteaddr(sender)}\r\nRCPT TO:{smtplib.quoteaddr(recipient)}\r\n"
                    f"BDAT {len(message)} LAST\r\n".encode("ascii")
                )
                commands.append(message)
            smtp.send(b"".join(commands))
            for _ in group:
                replies = [smtp.getreply() for _ in range(4)]  # RSET, MAIL, RCPT, BDAT
                outcomes.append(_outcome(replies[1:]))
        else:
            for recipient, message in group:
                try:
                    smtp.sendmail(sender, [recipient], message)
                    outcomes.append(None)
                except smtplib.SMTPRecipientsRefused as exc:  # smtplib has reset the transaction
                    code, text = next(iter(exc.recipients.values()))
                    outcomes.append(_refused(code, _text(text)))
                except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as exc:
                    outcomes.append(_refused(exc.smtp_code, _text(exc.smtp_error)))
                    if exc.smtp_code == 421:  # the server is closing the connection
                        raise
        return outcomes, True
    except (OSError, smtplib.SMTPException) as exc:
        return outcomes + [_error("email", exc)] * (len(group) - len(outcomes)), False


def _outcome(replies: list[tuple[int, bytes]]):
    """An e-mail's outcome from its MAIL, RCPT and BDAT replies: sent when the data was accepted
    (BDAT's 250); else the first refusal is the reason (what follows a refused MAIL is refused
    because of it)."""
    if replies[-1][0] == 250:
        return None
    code, text = next(reply for reply in replies if reply[0] not in (250, 251))
    return _refused(code, _text(text))


def _text(reply) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)


def _close(smtp):
    try:
        smtp.close()
    except OSError:
        pass


SMTP_CONNECTIONS = SmtpConnections()  # per process, as each is used by one greenthread at a time


def _post(url: str, payload: dict, headers: dict | None = None):
    body = json.dumps(payload, ensure_ascii=False).encode()
    response = requests.post(
        url, data=body, headers={"Content-Type": "application/json", **(headers or {})}, timeout=TIMEOUT
    )
    if response.status_code >= 500 or response.status_code == 429:
        raise ChannelError(f"HTTP {response.status_code} from {url.split('?')[0]}")
    if response.status_code >= 400:
        raise ChannelError(f"HTTP {response.status_code} from {url.split('?')[0]}", retryable=False)
    return response


def _webhook(delivery, config):
    payload = (
        json.loads(delivery.body)
        if delivery.channel == "callback"
        else {"subject": delivery.subject, "text": delivery.body, "recipient": delivery.recipient}
    )
    body = json.dumps(payload, ensure_ascii=False).encode()
    _post(delivery.address, payload, {"X-Huiying-Signature": signature(config["WEBHOOK_SECRET"], body)})


def _wecom(delivery, config):
    response = _post(
        delivery.address, {"msgtype": "markdown", "markdown": {"content": f"**{delivery.subject}**\n{delivery.body}"}}
    )
    _robot_answer(response, "errcode")


def _dingtalk(delivery, config):
    response = _post(
        delivery.address,
        {
            "msgtype": "markdown",
            "markdown": {"title": delivery.subject, "text": f"### {delivery.subject}\n{delivery.body}"},
        },
    )
    _robot_answer(response, "errcode")


def _robot_answer(response, key):
    try:
        answer = response.json()
    except ValueError:
        return
    if isinstance(answer, dict) and answer.get(key, 0) != 0:
        raise ChannelError(f"robot refused: {answer.get('errmsg') or answer.get(key)}", retryable=False)


def _sms(delivery, config):
    gateway = config.get("SMS_GATEWAY_URL")
    if not gateway:
        raise ChannelError("no SMS gateway configured (HUIYING_SMS_GATEWAY_URL)", retryable=False)
    _post(gateway, {"phone": delivery.address, "text": f"{delivery.subject} {delivery.body}"[:500]})
