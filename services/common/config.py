"""Configuration from the environment, exactly as shared/CONTRACT.md names it.

Every process (services, CLI, tests) reads its settings here, so the defaults live in one place.
"""

import os
from pathlib import Path

SERVICES = ("intake", "routing", "supervision", "notify")

PROJECT_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_AMQP_URI = "amqp://guest:guest@localhost:5672/"
QUEUE_TYPES = ("classic", "quorum")
DEFAULT_HTTP_ADDRESSES = {
    "intake": "127.0.0.1:8001",
    "routing": "127.0.0.1:8002",
    "supervision": "127.0.0.1:8003",
    "notify": "127.0.0.1:8004",
}


def var_dir() -> Path:
    """Where the embedded database, logs and pid files live (``var/`` in the checkout)."""
    return Path(os.environ.get("HUIYING_VAR_DIR", PROJECT_ROOT / "var"))


def amqp_uri() -> str:
    return os.environ.get("AMQP_URI", DEFAULT_AMQP_URI)


class ConfigurationError(ValueError):
    """A setting the services cannot run with; the message names the variable and what it allows."""


def queue_type() -> str:
    """``HUIYING_QUEUE_TYPE``: the type of every durable work queue, ``classic`` (default) or
    ``quorum`` (replicated over a RabbitMQ cluster). Read at each call, not once at import: what a
    queue is declared with is decided by ``topology.work_queue_arguments`` when it is declared."""
    raw = os.environ.get("HUIYING_QUEUE_TYPE", "")
    value = raw.strip().lower() or QUEUE_TYPES[0]
    if value not in QUEUE_TYPES:
        allowed = " or ".join(repr(t) for t in QUEUE_TYPES)
        raise ConfigurationError(f"HUIYING_QUEUE_TYPE must be {allowed} (default 'classic'), not {raw!r}")
    return value


def database_url() -> str:
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    return f"sqlite:///{var_dir() / 'huiying.db'}"


def rules_dir() -> Path:
    return Path(os.environ.get("HUIYING_RULES_DIR", PROJECT_ROOT / "rules"))


def http_address(service: str) -> str:
    """``HOST:PORT`` of a service's HTTP server; ``HUIYING_<SERVICE>_ADDRESS`` overrides it."""
    return os.environ.get(f"HUIYING_{service.upper()}_ADDRESS", DEFAULT_HTTP_ADDRESSES[service])


def case_id_prefix() -> str:
    """District prefix of readable case ids (``LG-2026-000123``)."""
    return os.environ.get("HUIYING_CASE_PREFIX", "LG")


def nameko_config(service: str) -> dict:
    """The nameko config dict for one service process."""
    queue_type()  # a bad HUIYING_QUEUE_TYPE stops the process here, before it declares anything
    return {
        "AMQP_URI": amqp_uri(),
        "WEB_SERVER_ADDRESS": http_address(service),
        "DATABASE_URL": database_url(),
        "HUIYING_RULES_DIR": str(rules_dir()),
        "HUIYING_CASE_PREFIX": case_id_prefix(),
        "serializer": "json",
        # notify's outbound channels
        "SMTP_HOST": os.environ.get("HUIYING_SMTP_HOST", "localhost"),
        "SMTP_PORT": int(os.environ.get("HUIYING_SMTP_PORT", "25")),
        "SMTP_FROM": os.environ.get("HUIYING_SMTP_FROM", "huiying@localhost"),
        "SMS_GATEWAY_URL": os.environ.get("HUIYING_SMS_GATEWAY_URL", ""),
        "WEBHOOK_SECRET": os.environ.get("HUIYING_WEBHOOK_SECRET", "huiying-dev-secret"),
        # signs the board's login cookie (supervision); set it in any deployment others can reach
        "BOARD_SECRET": os.environ.get("HUIYING_BOARD_SECRET", "huiying-dev-board-secret"),
        # Enough concurrent workers for bursts, few enough that a 2-core box is not swamped.
        "max_workers": int(os.environ.get("HUIYING_MAX_WORKERS", "10")),
        "BATCH_GATHER_SECONDS": batch_gather_seconds(),
        "HEARTBEAT": 60,
        "LOGGING": logging_config(service),
    }


def batch_gather_seconds() -> float:
    """``HUIYING_BATCH_GATHER_MS`` (0: off): how long, at most, a queue's batch waits for more
    messages before a worker takes it (never longer than the previous batch took: batching.py).
    Under a sustained load of 100 cases/s or more the batches are then larger, so each case costs
    fewer transactions and messages (bench/README.md)."""
    raw = os.environ.get("HUIYING_BATCH_GATHER_MS", "").strip() or "0"
    try:
        milliseconds = float(raw)
    except ValueError:
        milliseconds = -1
    if not 0 <= milliseconds <= 1000:
        raise ConfigurationError(
            f"HUIYING_BATCH_GATHER_MS must be a number of milliseconds from 0 to 1000 (default 0), not {raw!r}"
        )
    return milliseconds / 1000


LOG_FORMATS = ("json", "plain")


def log_format() -> str:
    """``HUIYING_LOG_FORMAT``: ``json`` (default: one object per line, with ``service`` and, where
    a line is about a case, ``case_id``) or ``plain`` (for reading by eye)."""
    raw = os.environ.get("HUIYING_LOG_FORMAT", "")
    value = raw.strip().lower() or LOG_FORMATS[0]
    if value not in LOG_FORMATS:
        raise ConfigurationError(f"HUIYING_LOG_FORMAT must be 'json' or 'plain' (default 'json'), not {raw!r}")
    return value


def logging_config(service: str) -> dict:
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
            "json": {
                "()": "pythonjsonlogger.json.JsonFormatter",
                "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
                "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
                "static_fields": {"service": service},
                "json_ensure_ascii": False,
            },
        },
        "filters": {"expected_errors_briefly": {"()": "services.common.logs.ExpectedErrorsBriefly"}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": log_format()}},
        "loggers": {"nameko.containers": {"filters": ["expected_errors_briefly"]}},
        "root": {"level": os.environ.get("HUIYING_LOG_LEVEL", "INFO"), "handlers": ["console"]},
    }
