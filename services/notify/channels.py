"""Sending one delivery: e-mail over SMTP, a signed JSON webhook, 企业微信 and 钉钉 group robots in
their own message formats, SMS through a configurable HTTP gateway, and status callbacks to
ticketing systems. One function per channel; ``ChannelError`` says whether trying again may help."""

import base64
import hashlib
import hmac
import json
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


def send(delivery, config: dict):
    sender = {
        "email": _email,
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
    except (OSError, smtplib.SMTPException, requests.RequestException) as exc:
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
                send(delivery, config)
                outcomes[delivery.id] = None
            except ChannelError as exc:
                outcomes[delivery.id] = exc
    return [outcomes[delivery.id] for delivery in deliveries]


def _error(channel: str, exc: BaseException) -> ChannelError:
    """A ChannelError for a failure of the network or of the other side; an SMTP server's 5xx
    answer (unknown mailbox, refused sender) is final, as a webhook's 4xx is."""
    code = getattr(exc, "smtp_code", None)
    if isinstance(exc, smtplib.SMTPRecipientsRefused):  # one recipient each: its code
        code = next(iter(exc.recipients.values()))[0]
    return ChannelError(f"{channel}: {type(exc).__name__}: {str(exc)[:200]}", retryable=not (code and code >= 500))


def _email(delivery, config):
    SMTP_CONNECTIONS.send(
        config["SMTP_HOST"],
        config["SMTP_PORT"],
        config["SMTP_FROM"],
        delivery.address,
        email_message(delivery, config["SMTP_FROM"]),
    )


def email_message(delivery, sender: str) -> bytes:
    """The e-mail as sent: UTF-8 text in base64, its subject RFC 2047-encoded by email.header.
    Written out here rather than by email.mime and its generator, which produce the same eight
    header lines (tests/unit/test_email_message.py compares the two) in four times the time:
    0.37 ms an e-mail, a fifth of notify's CPU for each."""
    name, address = parseaddr(sender)
    for what, value in (("sender (HUIYING_SMTP_FROM)", address), ("address", delivery.address)):
        if not value or not value.isascii() or not value.isprintable() or " " in value:
            raise ChannelError(f"email: the {what} {value!r} is not a plain ASCII e-mail address", retryable=False)
    subject = " ".join(delivery.subject.split())  # a line break in it would end the header
    headers = (
        f'Content-Type: text/plain; charset="utf-8"\r\n'
        "MIME-Version: 1.0\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        f"From: {formataddr((name, address), charset='utf-8')}\r\n"
        f"To: {delivery.address}\r\n"
        f"Subject: {Header(subject, 'utf-8', header_name='Subject').encode(linesep=chr(13) + chr(10))}\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-ID: {make_msgid(domain='huiying')}\r\n"
        "\r\n"
    )
    return headers.encode("ascii") + base64.encodebytes(delivery.body.encode("utf-8")).replace(b"\n", b"\r\n")


# Messages written at once on one connection: their replies (three each, tens of bytes) stay far
# below any socket buffer, so the server never waits for us to read while we wait for it to read.
GROUP_MESSAGES = 50
GROUP_BYTES = 1_000_000


class SmtpConnections:
    """SMTP connections kept open between e-mails: a connection (and its greeting and EHLO) per
    e-mail was a large share of notify's time in a burst. Each is used by one greenthread at a
    time; one that failed is closed, never reused, and one idle for long is not trusted.

    Where the server offers PIPELINING and CHUNKING (RFC 2920, RFC 3030: Postfix, Exim and
    Exchange do), a group of e-mails is written at once — for each, MAIL, RCPT and ``BDAT n
    LAST`` followed by the message — and the replies are read after: one round trip for the
    group instead of four for each e-mail, which with eventlet's sockets cost about as much CPU
    as building the e-mail. Other servers get one e-mail at a time, as smtplib sends it."""

    IDLE_SECONDS = 30  # servers drop idle clients after a minute or more

    def __init__(self):
        self.idle = []  # (host, port, smtp, idle since)

    def send(self, host: str, port: int, sender: str, recipient: str, message: bytes):
        """Send one e-mail; ChannelError if it was not accepted."""
        [outcome] = self.send_many(host, port, sender, [(recipient, message)])
        if outcome is not None:
            raise outcome

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
        if smtp is not None:
            outcomes, usable = _exchange(smtp, sender, group)
            if outcomes is not None:
                return self._done(host, port, smtp, outcomes, usable)
            # the server had dropped the idle connection before answering: all again, on a new one
        try:
            smtp = smtplib.SMTP(host, port, timeout=TIMEOUT)
        except (OSError, smtplib.SMTPException) as exc:
            return [_error("email", exc)] * len(group)
        outcomes, usable = _exchange(smtp, sender, group)
        if outcomes is None:
            outcomes = [ChannelError("email: the server closed the connection without answering")] * len(group)
        return self._done(host, port, smtp, outcomes, usable)

    def _done(self, host, port, smtp, outcomes, usable):
        if usable:
            self.idle.append((host, port, smtp, time.monotonic()))
        else:
            _close(smtp)
        return outcomes

    def _take(self, host, port):
        now = time.monotonic()
        for index, (h, p, smtp, since) in enumerate(self.idle):
            if (h, p) == (host, port):
                del self.idle[index]
                if now - since < self.IDLE_SECONDS:
                    return smtp
                _close(smtp)
                return self._take(host, port)
        return None


def _exchange(smtp, sender: str, group: list[tuple[str, bytes]]) -> tuple[list | None, bool]:
    """Send the group on this connection: (each e-mail's outcome, whether the connection can be
    used again); no outcomes (None) when the server closed the connection before any answer."""
    outcomes: list = []
    try:
        smtp.ehlo_or_helo_if_needed()
        if smtp.has_extn("pipelining") and smtp.has_extn("chunking"):
            commands = []
            for recipient, message in group:
                commands.append(
                    f"MAIL FROM:{smtplib.quoteaddr(sender)}\r\nRCPT TO:{smtplib.quoteaddr(recipient)}\r\n"
                    f"BDAT {len(message)} LAST\r\n".encode("ascii")
                )
                commands.append(message)
            smtp.send(b"".join(commands))
            for _ in group:
                outcomes.append(_first_refusal([smtp.getreply() for _ in range(3)]))
        else:
            for recipient, message in group:
                try:
                    smtp.sendmail(sender, [recipient], message)
                    outcomes.append(None)
                except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as exc:
                    outcomes.append(_error("email", exc))  # smtplib has reset the transaction
        return outcomes, True
    except (OSError, smtplib.SMTPException) as exc:
        if not outcomes and isinstance(exc, smtplib.SMTPServerDisconnected):
            return None, False
        return outcomes + [_error("email", exc)] * (len(group) - len(outcomes)), False


def _first_refusal(replies: list[tuple[int, bytes]]):
    """An e-mail's outcome from its MAIL, RCPT and BDAT replies: the first that is not 250 (or 251,
    forwarded) is the reason (what follows a refused MAIL is refused because of it)."""
    for code, text in replies:
        if code not in (250, 251):
            return _error("email", smtplib.SMTPResponseException(code, text.decode("utf-8", "replace")))
    return None


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
