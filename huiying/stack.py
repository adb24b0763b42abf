"""Starting, stopping and inspecting the four service processes and the broker they share."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
from kombu import Connection

from services.common import config as settings


class StackError(RuntimeError):
    """An expected failure with a one-line reason (broker down, service failed to start)."""


def check_broker(amqp_uri: str | None = None) -> None:
    amqp_uri = amqp_uri or settings.amqp_uri()
    try:
        with Connection(amqp_uri, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:
        safe = amqp_uri.split("@")[-1]
        raise StackError(
            f"cannot reach RabbitMQ at {safe} ({type(exc).__name__}); start it (e.g. 'rabbitmq-server -detached') "
            "or set AMQP_URI"
        ) from None


def pid_file(service: str) -> Path:
    return settings.var_dir() / "run" / f"{service}.pid"


def log_file(service: str) -> Path:
    return settings.var_dir() / "log" / f"{service}.log"


def running_pid(service: str) -> int | None:
    try:
        pid = int(pid_file(service).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    if _is_zombie(pid):  # killed, not yet reaped (its parent, `huiying up`, is long gone)
        return None
    return pid


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc (not Linux): trust the signal check
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def start(service: str) -> int:
    pid = running_pid(service)
    if pid:
        return pid
    for path in (pid_file(service), log_file(service)):
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file(service), "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.common.runner", service],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the CLI; `huiying down` stops it
            cwd=settings.PROJECT_ROOT,
        )
    pid_file(service).write_text(str(process.pid))
    return process.pid


def health(service: str, timeout: float = 3, readiness: bool = False) -> dict:
    """``{"healthy", "checks", "url"}`` from the service's ``/health`` (with ``readiness``, also
    ``"ready"`` and the checks of ``/ready``: schema at the expected migration, rules loaded)."""
    base = f"http://{settings.http_address(service)}"
    url = f"{base}/health"
    try:
        response = requests.get(url, timeout=timeout)
        body = response.json()
        found = {
            "healthy": response.status_code == 200 and bool(body.get("healthy")),
            "checks": body.get("checks", {}),
            "url": url,
        }
        if readiness:
            response = requests.get(f"{base}/ready", timeout=timeout)
            body = response.json()
            found.update(ready=response.status_code == 200 and bool(body.get("ready")), checks=body.get("checks", {}))
        return found
    except (requests.RequestException, ValueError) as exc:
        return {"healthy": False, "ready": False, "checks": {"http": f"unreachable: {type(exc).__name__}"}, "url": url}


def wait_healthy(services, timeout: float = 90, spawned=None, on_start=None) -> None:
    """Wait until every service answers /health. ``spawned`` names the services whose process the
    caller has just started: one of those that exits is a failed start. Any other that stops
    meanwhile (killed while `huiying up` was waiting for the rest) is started again, as `up` would
    have done a moment later, and ``on_start(service, pid)`` is told."""
    deadline = time.monotonic() + timeout
    pending = list(services)
    spawned = set(services if spawned is None else spawned)
    while pending and time.monotonic() < deadline:
        for service in list(pending):
            if running_pid(service) is None:
                if service in spawned:
                    raise StackError(
                        f"{service} exited during start; see {log_file(service)}: {last_log_line(service)}"
                    )
                pid = start(service)
                spawned.add(service)
                if on_start:
                    on_start(service, pid)
                continue
            if health(service, timeout=2)["healthy"]:
                pending.remove(service)
        if pending:
            time.sleep(0.5)
    if pending:
        raise StackError(f"not healthy after {timeout:.0f}s: {', '.join(pending)}; see {settings.var_dir() / 'log'}")


def last_log_line(service: str) -> str:
    try:
        lines = [line for line in log_file(service).read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1][:300] if lines else "(empty log)"
    except OSError:
        return "(no log)"


def stop(service: str, timeout: float = 20) -> bool:
    """SIGTERM, then SIGKILL after ``timeout``; True if a process was running."""
    return stop_all([service], timeout)[service]


def stop_all(services, timeout: float = 20) -> dict[str, bool]:
    """``stop`` for several at once: each is sent SIGTERM, then all are waited for together (a
    nameko service takes a few seconds to finish its workers and close its connections)."""
    pids = {service: running_pid(service) for service in services}
    for pid in filter(None, pids.values()):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(running_pid(service) for service, pid in pids.items() if pid):
        time.sleep(0.2)
    for service, pid in pids.items():
        if pid and running_pid(service):
            os.kill(pid, signal.SIGKILL)
        pid_file(service).unlink(missing_ok=True)
    return {service: pid is not None for service, pid in pids.items()}


def queue_depths(amqp_uri: str, queue_names) -> dict:
    """``{queue: {"messages", "consumers"}}``, from passive declares (no management plugin needed)."""
    depths = {}
    with Connection(amqp_uri, connect_timeout=3) as connection:
        for name in queue_names:
            channel = connection.channel()
            try:
                _, messages, consumers = channel.queue_declare(name, passive=True)
                depths[name] = {"messages": messages, "consumers": consumers}
            except Exception:
                depths[name] = {"messages": None, "consumers": None, "missing": True}
            finally:
                try:
                    channel.close()
                except Exception:
                    pass
    return depths
