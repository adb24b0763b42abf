"""``GET /health`` (alive): 200 when the service reaches both its broker and its database.
``GET /ready`` (fit to take work): that, and its tables at the migration its code expects, and
its rule files loaded — what a load balancer or an orchestrator's readiness probe should ask."""

from functools import cache

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


@cache
def _migration_head(service: str) -> str | None:
    from alembic.script import ScriptDirectory

    from services.common.migrations import alembic_config

    return ScriptDirectory.from_config(alembic_config(service)).get_current_head()


def readiness(service_name: str, sessions, amqp_uri: str, rules: dict | None = None) -> tuple[bool, dict]:
    """``(ready, checks)``; ``rules`` is the service's rules status (``{"version", "problems"}``)."""
    healthy, checks = check(sessions, amqp_uri)
    if checks["database"] == "ok":
        head = _migration_head(service_name)
        try:
            with sessions() as session:
                current = session.execute(text(f"SELECT version_num FROM alembic_version_{service_name}")).scalar()
        except Exception:
            current = None
        checks["schema"] = (
            "ok" if current == head else f"at migration {current or 'none'}, code expects {head}: run huiying migrate"
        )
    if rules is not None:
        if not rules.get("version"):
            checks["rules"] = "not loaded"
        elif rules.get("problems"):
            checks["rules"] = f"ok (version {rules['version']}; the folder now has problems, huiying rules check)"
        else:
            checks["rules"] = "ok"
    ready = all(v == "ok" or v.startswith("ok (") for v in checks.values())
    return ready, checks


def respond_ready(service_name: str, sessions, amqp_uri: str, rules=None):
    from services.common.http import json_response

    ready, checks = readiness(service_name, sessions, amqp_uri, rules)
    return json_response(200 if ready else 503, {"service": service_name, "ready": ready, "checks": checks})
