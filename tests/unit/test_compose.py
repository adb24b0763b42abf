"""docker-compose.yml and the Dockerfile, checked as files: no Docker, no network, no nameko.

yaml.safe_load resolves the anchors and ``<<`` merge keys, so each service is checked as Compose
will see it, shared parts included.
"""

import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

# service -> HTTP port (services/common/config.py DEFAULT_HTTP_ADDRESSES)
SERVICES = {"intake": 8001, "routing": 8002, "supervision": 8003, "notify": 8004}
# services that run several replicas (docker-compose.yml deploy.replicas)
REPLICATED = ("routing", "supervision")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def environment(service: dict) -> dict:
    """A service's environment as a dict, whether written as a mapping or as KEY=VALUE items."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {key: None if value is None else str(value) for key, value in env.items()}


def words(command) -> list[str]:
    """A command (list or string form) as a flat list of words."""
    if isinstance(command, str):
        return shlex.split(command)
    return [str(part) for part in command]


def healthcheck_text(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(str(part) for part in test)


def condition(service: dict, dependency: str) -> str | None:
    depends_on = service.get("depends_on") or {}
    assert isinstance(depends_on, dict), "depends_on must use the long form to carry a condition"
    return (depends_on.get(dependency) or {}).get("condition")


def published_ports(service: dict) -> list[tuple[str | None, str]]:
    """Each published port as (host port or None, container port), short or long syntax."""
    found = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            published = port.get("published")
            found.append((None if published in (None, "") else str(published), str(port["target"])))
            continue
        parts = str(port).split("/", 1)[0].rsplit(":", 2)  # [[ip:]host:]container
        container = parts[-1]
        host = parts[-2] if len(parts) >= 2 else None
        found.append((host or None, container))
    return found


def walk_keys(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from walk_keys(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_keys(item)


# --- the file as a whole ------------------------------------------------------------------------


def test_compose_specification_without_version_key(compose):
    assert "version" not in compose
    assert set(compose["services"]) >= {"rabbitmq", "postgres", "migrate", *SERVICES}


def test_anchors_and_merge_keys_resolve(compose):
    assert "<<" not in set(walk_keys(compose["services"]))
    for name in ("migrate", *SERVICES):
        service = compose["services"][name]
        assert service.get("build"), f"{name}: the shared build section did not merge in"
        assert service.get("image") == compose["services"]["migrate"]["image"], f"{name}: not the one shared image"


def test_every_dependency_is_a_defined_service(services):
    for name, service in services.items():
        for dependency in service.get("depends_on") or {}:
            assert dependency in services, f"{name} depends on undefined {dependency}"


def test_named_volumes_are_declared(compose, services):
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            if source and not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} uses undeclared volume {source}"


# --- infrastructure -----------------------------------------------------------------------------


def test_rabbitmq_has_management_image_and_healthcheck(services):
    rabbitmq = services["rabbitmq"]
    assert rabbitmq["image"].startswith("rabbitmq:") and "management" in rabbitmq["image"]
    assert "rabbitmq-diagnostics" in healthcheck_text(rabbitmq)
    published = " ".join(str(port) for port in rabbitmq.get("ports", []))
    assert "5672:5672" in published and "15672:15672" in published


def test_postgres_has_healthcheck_and_named_volume(compose, services):
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert "pg_isready" in healthcheck_text(postgres)
    env = environment(postgres)
    assert env["POSTGRES_USER"] == env["POSTGRES_PASSWORD"] == env["POSTGRES_DB"] == "huiying"
    data_volumes = [v.split(":", 1)[0] for v in postgres["volumes"] if v.endswith("/var/lib/postgresql/data")]
    assert data_volumes and data_volumes[0] in compose["volumes"]


# --- the one-shot migrate job -------------------------------------------------------------------


def test_migrate_runs_every_migration_then_declares_topology(services):
    migrate = services["migrate"]
    command = " ".join(words(migrate["command"]))
    assert "huiying migrate" in command
    migrate_args = command.split("huiying migrate", 1)[1].split("&&", 1)[0].split()
    assert set(migrate_args) == set(SERVICES), "migrate must name all four services (or none)"
    assert "declare_all(amqp_uri())" in command
    assert command.index("huiying migrate") < command.index("declare_all(")
    assert condition(migrate, "rabbitmq") == "service_healthy"
    assert condition(migrate, "postgres") == "service_healthy"
    assert environment(migrate)["DATABASE_URL"].startswith("postgresql")
    assert str(migrate.get("restart", "no")) == "no", "a one-shot job must not be restarted"


# --- the four services --------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVICES)
def test_service_runs_its_runner(services, name):
    assert words(services[name]["command"])[-3:] == ["-m", "services.common.runner", name]


@pytest.mark.parametrize("name", SERVICES)
def test_service_waits_for_broker_database_and_migrations(services, name):
    service = services[name]
    assert condition(service, "rabbitmq") == "service_healthy"
    assert condition(service, "postgres") == "service_healthy"
    assert condition(service, "migrate") == "service_completed_successfully"
    assert service["restart"] == "unless-stopped"


@pytest.mark.parametrize("name", SERVICES)
def test_service_healthcheck_probes_its_own_readiness_endpoint(services, name):
    text = healthcheck_text(services[name])
    assert "/ready" in text  # broker, database, schema at the expected migration, rules loaded
    assert str(SERVICES[name]) in text
    assert "curl" not in text and "wget" not in text, "python:3.11-slim has neither"


def test_the_board_secret_is_given_to_supervision(services):
    assert "HUIYING_BOARD_SECRET" in environment(services["supervision"])


@pytest.mark.parametrize("name", SERVICES)
def test_service_environment(services, name):
    env = environment(services[name])
    assert env["DATABASE_URL"].startswith("postgresql")
    assert urlsplit(env["DATABASE_URL"]).hostname == "postgres"
    amqp = urlsplit(env["AMQP_URI"])
    assert amqp.scheme == "amqp" and amqp.hostname == "rabbitmq"
    assert env[f"HUIYING_{name.upper()}_ADDRESS"] == f"0.0.0.0:{SERVICES[name]}"
    assert env["HUIYING_RULES_DIR"] == "/app/rules"


@pytest.mark.parametrize("name", SERVICES)
def test_service_publishes_its_port_and_mounts_rules_read_only(services, name):
    port = SERVICES[name]
    published = [str(p) for p in services[name].get("ports", [])]
    if name in REPLICATED:  # a host port Docker picks per replica
        assert (None, str(port)) in published_ports(services[name]), published
    else:
        assert any(re.fullmatch(rf"(\S+:)?{port}:{port}(/tcp)?", p) for p in published), published
    assert "./rules:/app/rules:ro" in services[name]["volumes"]


@pytest.mark.parametrize("name", REPLICATED)
def test_replicated_services_run_two_and_fix_no_host_port_or_container_name(services, name):
    service = services[name]
    assert int((service.get("deploy") or {}).get("replicas", 1)) >= 2
    assert "container_name" not in service, "replicas cannot share one container name"
    fixed = [host for host, _ in published_ports(service) if host is not None]
    assert fixed == [], f"{name}: replicas cannot all bind host port(s) {fixed}"


@pytest.mark.parametrize("name", sorted(set(SERVICES) - set(REPLICATED)))
def test_single_services_keep_one_instance(services, name):
    assert int((services[name].get("deploy") or {}).get("replicas", 1)) == 1


def test_no_two_services_bind_the_same_host_port(services):
    bound = [host for service in services.values() for host, _ in published_ports(service) if host is not None]
    assert len(bound) == len(set(bound)), bound


def test_every_process_that_declares_queues_has_the_same_queue_type(services):
    """migrate declares the topology, every service declares it again: one HUIYING_QUEUE_TYPE."""
    types = {name: environment(services[name]).get("HUIYING_QUEUE_TYPE") for name in ("migrate", *SERVICES)}
    assert len(set(types.values())) == 1, types
    assert set(types.values()) <= {"classic", "quorum"}, types


# --- the Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_builds_from_python_311_and_runs_unprivileged():
    assert DOCKERFILE.is_file()
    lines = [line.strip() for line in DOCKERFILE.read_text(encoding="utf-8").splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    bases = [line.split()[1] for line in instructions if line.upper().startswith("FROM ")]
    assert bases and all(base.startswith("python:3.11") for base in bases), bases
    users = [line.split()[1] for line in instructions if line.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    assert any("pip install --no-cache-dir ." in line for line in instructions)
