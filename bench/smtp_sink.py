"""An SMTP server that accepts every message and keeps none: the district's mail server in the
benchmarks. It speaks just enough SMTP for smtplib (greeting, EHLO/HELO, MAIL, RCPT, DATA with
dot-stuffing, RSET, NOOP, QUIT) and counts what it accepted. aiosmtpd, which the tests use, parses
every message and took a tenth of the machine in a burst; a real mail server is another machine.

    .venv/bin/python -m bench.smtp_sink PORT
"""

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


async def main(port: int):
    server = await asyncio.start_server(session, "127.0.0.1", port, limit=2**22)
    async with server:
        await server.serve_forever()


class SmtpSink:
    """This server as a process of its own, on a free port."""

    def __init__(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process = subprocess.Popen([sys.executable, "-m", "bench.smtp_sink", str(self.port)])
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the SMTP sink did not start") from None
                time.sleep(0.05)

    def close(self):
        self.process.terminate()
        self.process.wait(5)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
