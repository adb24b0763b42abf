"""An SMTP server that accepts every message and keeps none: the district's mail server in the
benchmarks and in ``huiying demo``. It speaks just enough SMTP for smtplib (greeting, EHLO/HELO,
MAIL, RCPT, DATA with dot-stuffing, RSET, NOOP, QUIT) and counts what it accepted. aiosmtpd, which the tests use, parses
every message and took a tenth of the machine in a burst; a real mail server is another machine.

    .venv/bin/python -m huiying.mail_sink PORT [--sms [SMS_PORT]]

With ``--sms`` it also answers HTTP on SMS_PORT (PORT + 1 when not given) as an SMS gateway that
accepts every message.
"""

import argparse
import asyncio
import socket
import subprocess
import sys
import time

REPLIES = {
    b"EHLO": b"250-sink\r\n250 8BITMIME\r\n",
    b"HELO": b"250 sink\r\n",
    b"MAIL": b"250 ok\r\n",
    b"RCPT": b"250 ok\r\n",
    b"RSET": b"250 ok\r\n",
    b"NOOP": b"250 ok\r\n",
}
accepted = 0


async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    global accepted
    writer.write(b"220 sink ESMTP\r\n")
    try:
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await reader.readuntil(b"\r\n.\r\n")
                accepted += 1
                writer.write(b"250 accepted\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(REPLIES.get(verb, b"502 not implemented\r\n"))
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


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


async def main(port: int, sms_port: int | None = None):
    if sms_port:  # first: the SMTP port answering is the sign that both are up
        await asyncio.start_server(sms_gateway, "127.0.0.1", sms_port)
    server = await asyncio.start_server(session, "127.0.0.1", port, limit=2**22)
    async with server:
        await server.serve_forever()


class SmtpSink:
    """This server as a process of its own, on a free port; ``detached`` outlives the process
    that started it (the demo's, stopped by ``huiying demo --stop``)."""

    def __init__(self, detached: bool = False, sms_gateway: bool = False):
        # Both ports are found free together. (The SMS gateway used to take PORT + 1 unchecked:
        # with the test suite's two halves running at once, that port was sometimes taken, and
        # the sink exited at once.)
        self.port, self.sms_port = _free_ports(2)
        sms = ["--sms", str(self.sms_port)] if sms_gateway else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "huiying.mail_sink", str(self.port), *sms],
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
    args = parser.parse_args()
    asyncio.run(main(args.port, None if args.sms is None else args.sms or args.port + 1))
