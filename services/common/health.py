"""``GET /health``: 200 when the service reaches both its broker and its database."""

from kombu import Connection
from sqlalchemy import text


def check(sessions, amqp_uri: str) -> tuple[bool, dict]:
    checks = {}
    try:
        with sessions() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        with Connection(amqp_uri, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    return all(v == "ok" for v in checks.values()), checks


def respond(service_name: str, sessions, amqp_uri: str):
    from services.common.http import json_response

    healthy, checks = check(sessions, amqp_uri)
    return json_response(200 if healthy else 503, {"service": service_name, "healthy": healthy, "checks": checks})
