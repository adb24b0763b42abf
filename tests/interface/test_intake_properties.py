"""Property tests: whatever arrives over HTTP or AMQP, intake answers without a 5xx or a crash."""

import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import Connection, Producer
from sqlalchemy import select

from services.intake.models import cases
from services.intake.ticket_queue import ROUTING_KEY, TICKET_EXCHANGE, TICKET_QUEUE
from tests.conftest import wait_for

pytestmark = pytest.mark.interface

FIELDS = [
    "source",
    "external_id",
    "title",
    "description",
    "category",
    "street",
    "sector",
    "workstation",
    "kind",
    "address",
    "lat",
    "lon",
    "residents_affected",
    "reporter_name",
    "reporter_phone",
    "received_at",
]
# Any text, including lone surrogates and control characters, which PostgreSQL would refuse.
any_text = st.text(
    st.characters(codec=None, categories=None) | st.sampled_from(["\x00", "\ud800", "平"]), max_size=40
) | st.sampled_from(["平湖", "traffic", "13812345678", "2026-10-01T09:00:00+08:00", "proposal", ""])
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=5,
)
plausible = st.fixed_dictionaries(
    {"external_id": any_text, "title": any_text, "description": any_text},
    optional={field: values for field in FIELDS if field not in ("external_id", "title", "description")},
)
bodies = plausible | st.dictionaries(any_text, values, max_size=4) | values
PROPERTY_SETTINGS = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
def intake(run_services, rpc, demo_directory):
    urls = run_services("intake")
    rpc.intake.load_directory(demo_directory)
    key = rpc.intake.create_credential("source", "fuzz")["key"]
    return urls["intake"], {"Authorization": f"Bearer {key}"}


@PROPERTY_SETTINGS
@given(body=bodies)
def test_http_api_never_answers_5xx(intake, body):
    url, auth = intake
    response = requests.post(f"{url}/api/v1/cases", data=json.dumps(body), headers=auth)
    assert response.status_code in (200, 201, 400, 403, 422), response.text
    if response.status_code >= 400:
        assert response.json()["error"]["message"]


@PROPERTY_SETTINGS
@given(
    form=st.dictionaries(
        st.sampled_from(
            [
                "service_code",
                "description",
                "lat",
                "long",
                "phone",
                "address_string",
                "attribute[external_id]",
                "jurisdiction_id",
                "first_name",
            ]
        ),
        any_text,
    )
)
def test_open311_post_never_answers_5xx(intake, form, rpc):
    url, _ = intake
    form = {k: v.replace("\x00", "") for k, v in form.items()}  # form encoding cannot carry NUL reliably
    form["api_key"] = intake[1]["Authorization"].split()[1]
    response = requests.post(
        f"{url}/open311/v2/requests.json", data={k: v.encode("utf-8", "surrogatepass") for k, v in form.items()}
    )
    assert response.status_code in (200, 400, 404), response.text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(bodies.map(lambda b: json.dumps(b).encode()) | st.binary(max_size=60), min_size=1, max_size=5))
def test_ticket_queue_never_crashes_the_consumer(intake, rabbit_config, db, batch):
    sentinel = {
        "source": "fuzz",
        "external_id": f"sentinel-{len(batch)}-{hash(tuple(batch))}",
        "title": "t",
        "description": "d",
    }
    with Connection(rabbit_config["AMQP_URI"]) as connection:
        producer = Producer(connection.channel(), exchange=TICKET_EXCHANGE)
        for body in batch:
            producer.publish(body, routing_key=ROUTING_KEY, content_type="application/json", content_encoding="binary")
        producer.publish(
            json.dumps(sentinel).encode(),
            routing_key=ROUTING_KEY,
            content_type="application/json",
            content_encoding="binary",
        )

        def sentinel_stored():
            with db.connect() as c:
                return c.scalar(select(cases.c.id).where(cases.c.external_id == sentinel["external_id"]))

        wait_for(sentinel_stored, timeout=15)
        _, waiting, consumers = TICKET_QUEUE(connection.channel()).queue_declare(passive=True)
        assert consumers == 1  # the consumer is alive and still attached
