"""Sending one delivery: e-mail over SMTP, a signed JSON webhook, 企业微信 and 钉钉 group robots in
their own message formats, SMS through a configurable HTTP gateway, and status callbacks to
ticketing systems. One function per channel; ``ChannelError`` says whether trying again may help."""

import hashlib
import hmac
import json
import smtplib
import time
from email.header import Header
from email.message import Message
from email.mime.text import MIMEText
from email.utils import formatdate, make_msgid

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
        raise ChannelError(f"{delivery.channel}: {type(exc).__name__}: {str(exc)[:200]}") from None


def _email(delivery, config):
    # email.mime (the compat32 policy) rather than EmailMessage: the same UTF-8 message, built in
    # a fifth of the time (EmailMessage's header parsing was a tenth of notify's time in a burst).
    message = MIMEText(delivery.body, "plain", "utf-8")
    message["From"] = config["SMTP_FROM"]
    message["To"] = delivery.address
    message["Subject"] = Header(delivery.subject, "utf-8")
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain="huiying")
    SMTP_CONNECTIONS.send(config["SMTP_HOST"], config["SMTP_PORT"], message)


class SmtpConnections:
    """SMTP connections kept open between e-mails: a connection (and its greeting and EHLO) per
    e-mail was a large share of notify's time in a burst. Each is used by one delivery at a
    time; one that failed is closed, never reused, and one idle for long is not trusted."""

    IDLE_SECONDS = 30  # servers drop idle clients after a minute or more

    def __init__(self):
        self.idle = []  # (host, port, smtp, idle since)

    def send(self, host: str, port: int, message: Message):
        smtp = self._take(host, port)
        if smtp is not None:
            try:
                smtp.send_message(message)
                return self._keep(host, port, smtp)
            except smtplib.SMTPServerDisconnected:
                _close(smtp)  # the server hung up on the idle connection: send on a new one
            except Exception:
                _close(smtp)
                raise
        smtp = smtplib.SMTP(host, port, timeout=TIMEOUT)
        try:
            smtp.send_message(message)
        except Exception:
            _close(smtp)
            raise
        self._keep(host, port, smtp)

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

    def _keep(self, host, port, smtp):
        self.idle.append((host, port, smtp, time.monotonic()))


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
