"""An SMTP server that accepts every message and keeps none: the district's mail server in the
benchmarks and in ``huiying demo``. It speaks just enough SMTP for smtplib and for notify's
pipelined sending (greeting, EHLO/HELO, MAIL, RCPT, DATA with dot-stuffing, BDAT, RSET, NOOP,
QUIT; PIPELINING and CHUNKING offered, as Postfix offers them), answering every complete command
that arrived in one write. aiosmtpd, which the tests use, parses every message and took a tenth
of the machine in a burst; a real mail server is another machine.

    .venv/bin/python -m huiying.mail_sink PORT [--sms [SMS_PORT]] [--record FILE] [--plain]

With ``--sms`` it also answers HTTP on SMS_PORT (PORT + 1 when not given) as an SMS gateway that
accepts every message. For tests: ``--record`` appends each accepted message to FILE as a JSON
line (sender, recipients, the message); a recipient whose address starts with ``refuse`` is
refused for good (550) and one starting with ``defer`` for now (451); ``--plain`` offers neither
PIPELINING nor CHUNKING, as an older server.
"""

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time

EXTENSIONS = (b"8BITMIME", b"PIPELINING", b"CHUNKING")


class SmtpSession(asyncio.Protocol):
    """One client's session, read as it arrives: every complete command (and message) in the
    buffer is handled, and the replies go out in one write."""

    def __init__(self, record: str | None = None, plain: bool = False):
        self.record, self.plain = record, plain
        self.buffer = bytearray()
        self.reading = "commands"  # or "data" (until the lone dot) or "bdat" (self.left octets)
        self.left, self.last = 0, False
        self._reset()

    def _reset(self):
        self.sender, self.recipients, self.message = None, [], bytearray()

    def connection_made(self, transport):
        self.transport = transport
        transport.write(b"220 sink ESMTP\r\n")

    def data_received(self, data: bytes):
        self.buffer += data
        replies = []
        while (reply := self._next()) is not None:
            replies.append(reply)
        if replies:
            self.transport.write(b"".join(replies))
        if replies and replies[-1].startswith(b"221"):
            self.transport.close()

    def _next(self) -> bytes | None:
        """Handle the next complete command or message in the buffer: its reply (b"" for none),
        or None when the rest has not arrived yet."""
        if self.reading == "bdat":
            if len(self.buffer) < self.left:
                return None
            self.message += self.buffer[: self.left]
            del self.buffer[: self.left]
            self.reading = "commands"
            return self._finish() if self.last else b"250 2.0.0 chunk received\r\n"
        if self.reading == "data":
            end = self.buffer.find(b"\r\n.\r\n")
            if end < 0:
                return None
            # dot-stuffing undone, the first line's too
            self.message += (b"\r\n" + self.buffer[: end + 2]).replace(b"\r\n..", b"\r\n.")[2:]
            del self.buffer[: end + 5]
            self.reading = "commands"
            return self._finish()
        end = self.buffer.find(b"\r\n")
        if end < 0:
            return None
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return self._command(line)

    def _command(self, line: bytes) -> bytes:
        verb, _, argument = line.partition(b" ")
        verb = verb.upper()
        if verb == b"EHLO":
            self._reset()
            offered = [b"8BITMIME"] if self.plain else list(EXTENSIONS)
            return b"".join(b"250-%s\r\n" % e for e in [b"sink", *offered[:-1]]) + b"250 %s\r\n" % offered[-1]
        if verb == b"HELO":
            self._reset()
            return b"250 sink\r\n"
        if verb == b"MAIL":
            if self.sender is not None:  # RFC 5321 4.1.4: a transaction ends with its data or RSET
                return b"503 5.5.1 nested MAIL command\r\n"
            self.sender = _address(argument)
            return b"250 2.1.0 ok\r\n"
        if verb == b"RCPT":
            recipient = _address(argument)
            if self.sender is None:
                return b"503 5.5.1 need MAIL first\r\n"
            if recipient.startswith("refuse"):
                return b"550 5.1.1 no such mailbox\r\n"
            if recipient.startswith("defer"):
                return b"451 4.3.0 try again later\r\n"
            self.recipients.append(recipient)
            return b"250 2.1.5 ok\r\n"
        if verb == b"DATA":
            if not self.recipients:
                return b"503 5.5.1 no valid recipients\r\n"
            self.reading = "data"
            return b"354 go ahead\r\n"
        if verb == b"BDAT" and not self.plain:
            size, _, last = argument.partition(b" ")
            if not size.isdigit():
                return b"501 5.5.4 BDAT needs a size\r\n"
            self.left, self.last, self.reading = int(size), last.upper() == b"LAST", "bdat"
            return b""  # the reply comes when the chunk has arrived
        if verb == b"RSET":
            self._reset()
            return b"250 2.0.0 ok\r\n"
        if verb == b"NOOP":
            return b"250 2.0.0 ok\r\n"
        if verb == b"QUIT":
            return b"221 2.0.0 bye\r\n"
        return b"502 5.5.2 not implemented\r\n"

    def _finish(self) -> bytes:
        """The end of a message: accepted when it had a sender and a recipient. Otherwise its
        data is read and dropped (RFC 3030), and the transaction stays open, as Postfix keeps it,
        until RSET: a client that sends MAIL straight after is refused (503)."""
        if self.sender is None or not self.recipients:
            return b"554 5.5.1 no valid recipients\r\n"
        if self.record:
            with open(self.record, "a", encoding="utf-8") as out:
                entry = {"sender": self.sender, "recipients": self.recipients, "message": self.message.decode("utf-8")}
                out.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._reset()
        return b"250 2.0.0 accepted\r\n"


def _address(argument: bytes) -> str:
    """The address in ``FROM:<a@b>`` or ``TO:<a@b> SIZE=…``."""
    start, end = argument.find(b"<"), argument.find(b">")
    return argument[start + 1 : end].decode("utf-8", "replace")


async def sms_gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    """An SMS gateway that answers every POST with 200 (the demo's, on a port of its own)."""
    try:
        while request_line := await reader.readline():
            length = 0
            while (header := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = header.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
            if not request_line.startswith(b"POST"):
                break
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        writer.close()


async def main(port: int, sms_port: int | None = None, record: str | None = None, plain: bool = False):
    if sms_port:  # first: the SMTP port answering is the sign that both are up
        await asyncio.start_server(sms_gateway, "127.0.0.1", sms_port)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SmtpSession(record, plain), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


class SmtpSink:
    """This server as a process of its own, on a free port; ``detached`` outlives the process
    that started it (the demo's, stopped by ``huiying demo --stop``)."""

    def __init__(
        self, detached: bool = False, sms_gateway: bool = False, record: str | None = None, plain: bool = False
    ):
        # Both ports are found free together. (The SMS gateway used to take PORT + 1 unchecked:
        # with the test suite's two halves running at once, that port was sometimes taken, and
        # the sink exited at once.)
        self.port, self.sms_port = _free_ports(2)
        options = (["--sms", str(self.sms_port)] if sms_gateway else []) + (["--record", record] if record else [])
        options += ["--plain"] if plain else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "huiying.mail_sink", str(self.port), *options],
            start_new_session=detached,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if detached else None,
            stderr=subprocess.DEVNULL if detached else None,  # not the pipe of whoever ran the demo
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                if self.process.poll() is None:  # and ours is still running (it binds the SMS port first)
                    return
            except OSError:
                pass
            exited = self.process.poll()
            if exited is not None:
                ports = f"{self.port} or {self.sms_port}" if sms_gateway else str(self.port)
                raise RuntimeError(f"the SMTP sink exited with code {exited} (is port {ports} taken?)")
            if time.monotonic() > deadline:
                raise RuntimeError("the SMTP sink did not start within 10 s")
            time.sleep(0.05)

    def close(self):
        self.process.terminate()
        self.process.wait(5)


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on loopback now (all held open while they are found)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m huiying.mail_sink", description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int, help="the SMTP port")
    parser.add_argument(
        "--sms",
        type=int,
        nargs="?",
        const=0,
        metavar="SMS_PORT",
        help="also an SMS gateway, on SMS_PORT (default PORT + 1)",
    )
    parser.add_argument("--record", metavar="FILE", help="append each accepted message to FILE as a JSON line")
    parser.add_argument("--plain", action="store_true", help="offer neither PIPELINING nor CHUNKING")
    args = parser.parse_args()
    asyncio.run(main(args.port, None if args.sms is None else args.sms or args.port + 1, args.record, args.plain))
