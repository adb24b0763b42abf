"""The README's run path, for real: `huiying up` starts four processes on RabbitMQ and the
embedded SQLite database, the CLI talks to them, `huiying down` stops them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.conftest import wait_for
from tests.support import DEMO_DIRECTORY, free_port

pytestmark = pytest.mark.e2e
HUIYING = [sys.executable, "-m", "huiying.cli"]


@pytest.fixture
def stack_env(rabbit_config, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}  # the embedded default
    env.update(AMQP_URI=rabbit_config["AMQP_URI"], HUIYING_VAR_DIR=str(tmp_path / "var"))
    for service in ("intake", "routing", "supervision", "notify"):
        env[f"HUIYING_{service.upper()}_ADDRESS"] = f"127.0.0.1:{free_port()}"
    yield env
    subprocess.run(HUIYING + ["down"], env=env, capture_output=True, timeout=60)


def huiying(env, *args, timeout=120):
    return subprocess.run(HUIYING + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout)


def test_up_load_submit_show_status_down(stack_env):
    up = huiying(stack_env, "up")
    assert up.returncode == 0, up.stderr
    assert Path(stack_env["HUIYING_VAR_DIR"], "huiying.db").exists()

    assert huiying(stack_env, "directory", "load", DEMO_DIRECTORY).returncode == 0
    submitted = json.loads(
        huiying(
            stack_env,
            "submit",
            "--source",
            "hotline-12345",
            "--external-id",
            "E2E-1",
            "--title",
            "园山街道南片区交通拥堵",
            "--description",
            "早高峰拥堵严重",
            "--street",
            "园山",
            "--reporter-phone",
            "13812345678",
            "--json",
        ).stdout
    )
    assert submitted["created"] is True

    def shown():
        """The record once intake's event is in it (routing's may be projected first)."""
        result = huiying(stack_env, "case", "show", submitted["id"], "--json")
        record = json.loads(result.stdout) if result.returncode == 0 else None
        return record if record and "case_received" in [step["event"] for step in record["timeline"]] else None

    record = wait_for(shown, timeout=20, interval=0.5)
    assert record["street"] == "yuanshan" and record["timeline"][0]["event"] == "case_received"

    # The embedded database shared by four processes holds up under a batch: the 58 suggestions
    # of one consultation event, routed and clustered while they arrive.
    imported = json.loads(
        huiying(
            stack_env,
            "import",
            DEMO_DIRECTORY.parent / "examples" / "haijixing-58-suggestions.csv",
            "--source",
            "consultation-pinghu",
            "--json",
        ).stdout
    )
    assert imported == {"imported": 58, "duplicates": 0, "rejected": []}
    agenda = wait_for(lambda: json.loads(huiying(stack_env, "agenda", "list", "--json").stdout), timeout=30, interval=1)
    assert all(item["rule_id"].startswith("similar-cases") for item in agenda)

    def last_case_referred():
        result = huiying(stack_env, "case", "show", submitted["id"][:8] + "000059", "--json")
        return result.returncode == 0 and len(json.loads(result.stdout)["referrals"]) == 2

    wait_for(last_case_referred, timeout=30, interval=1)

    def agenda_escalated_and_every_case_seen():
        """The agenda as it stands once each of its items' escalation was published and supervision
        has intake's event of all 59 cases: more items come after the first as the background
        evaluation reaches more of the similar cases, and each event is published after its commit
        (routing's event of case 59 is often projected before intake's, which gathers)."""
        now_listed = json.loads(huiying(stack_env, "agenda", "list", "--json").stdout)
        samples = scrape(stack_env, "supervision")
        published = value(samples, "huiying_events_published_total", event_type="case_escalated")
        seen = value(samples, "huiying_event_lag_seconds_count", event_type="case_received")
        return published == len(now_listed) >= 1 and seen == 59 and now_listed

    agenda = wait_for(agenda_escalated_and_every_case_seen, timeout=30, interval=1)

    status = json.loads(huiying(stack_env, "status", "--json").stdout)
    assert all(s["healthy"] for s in status["services"].values())
    assert all(s["ready"] for s in status["services"].values()), status["services"]
    assert all(s["checks"]["schema"] == "ok" for s in status["services"].values())
    assert set(status["services"]) == {"intake", "routing", "supervision", "notify"}
    dead = status["dead_letters"]
    assert (dead["huiying.intake.tickets.dead"], dead["huiying.events.dead"]) == (0, 0)
    assert "huiying.notify.deliveries.dead" in dead  # no SMTP server here: e-mails get parked there

    # Every service serves Prometheus metrics (services/common/metrics.py).
    intake, routing, supervision, notify = (
        scrape(stack_env, service) for service in ("intake", "routing", "supervision", "notify")
    )
    assert value(intake, "huiying_events_published_total", event_type="case_received") == 59
    routed = value(routing, "huiying_events_published_total", event_type="case_referred") + value(
        routing, "huiying_events_published_total", event_type="case_needs_triage"
    )
    assert routed == 59
    assert value(supervision, "huiying_events_published_total", event_type="case_escalated") == len(agenda) >= 1
    assert value(supervision, "huiying_event_lag_seconds_count", event_type="case_received") == 59
    assert value(routing, "huiying_rule_evaluation_seconds_count") >= 1
    assert value(supervision, "huiying_rule_evaluation_seconds_count") >= 1
    assert "huiying_notification_failures" in {family for family, _, _ in notify}
    assert value(intake, "huiying_cases_received_total") == 59
    # The loop-lag probe keeps waking (every 50 ms): each service's count grows by ten more. A
    # fixed floor on the count depends on how long the steps above took, which the machine decides.
    for service, samples in zip(("intake", "routing", "supervision", "notify"), (intake, routing, supervision, notify)):
        probes = value(samples, "huiying_loop_lag_seconds_count")
        assert probes >= 1, service
        wait_for(
            lambda service=service, probes=probes: (
                value(scrape(stack_env, service), "huiying_loop_lag_seconds_count") >= probes + 10
            ),
            timeout=15,
            interval=0.2,
        )
    assert (
        value(routing, "huiying_cases_routed_total", outcome="referred")
        + value(routing, "huiying_cases_routed_total", outcome="triage")
        == 59
    )
    assert value(supervision, "huiying_cases_escalated_total", action="add_to_agenda") >= 1

    # Structured logs: one JSON object a line; a case's trail found by its id in every service.
    for service in ("intake", "routing", "supervision", "notify"):
        lines = Path(stack_env["HUIYING_VAR_DIR"], "log", f"{service}.log").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        assert records and all(r["service"] == service for r in records)
        if service in ("intake", "routing"):
            assert any(r.get("case_id") == submitted["id"] for r in records), service

    # Personal data: the reporter's phone appears in no log line of any service.
    logs = Path(stack_env["HUIYING_VAR_DIR"], "log")
    assert not [path.name for path in logs.glob("*.log") if "13812345678" in path.read_text(errors="replace")]

    down = huiying(stack_env, "down")
    assert down.returncode == 0
    after = json.loads(huiying(stack_env, "status", "--json").stdout)
    assert not any(s["healthy"] for s in after["services"].values())


def test_an_unreachable_broker_is_one_line_and_non_zero(tmp_path):
    env = dict(os.environ, AMQP_URI="amqp://guest:guest@127.0.0.1:1/", HUIYING_VAR_DIR=str(tmp_path))
    for command in (["up"], ["submit", "--source", "s", "--external-id", "1", "--title", "t", "--description", "d"]):
        result = huiying(env, *command)
        assert result.returncode == 1
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert "cannot reach RabbitMQ" in result.stderr and "Traceback" not in result.stderr


def scrape(env, service: str) -> list:
    """``[(family, (sample name, labels), value)]`` from a service's ``/metrics`` (families with no
    sample yet appear once, with None)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://{env[f'HUIYING_{service.upper()}_ADDRESS']}/metrics", timeout=5).text
    return [
        (family.name, (sample.name, sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ] + [(family.name, None, None) for family in text_string_to_metric_families(text) if not family.samples]


def value(samples: list, name: str, **labels) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        found for _, sample, found in samples if sample and sample[0] == name and labels.items() <= sample[1].items()
    )
