"""Events published before their consumer ever ran are not lost: every service declares all
queues when it starts, so intake's first case waits in routing's queue for routing."""

import pytest
from nameko.exceptions import RemoteError

from services.common.runner import load_service_class
from tests.conftest import wait_for

pytestmark = pytest.mark.interface


def test_a_case_received_before_routing_ever_started_is_routed_when_it_does(
    runner_factory, service_config, rpc, demo_directory
):
    intake = runner_factory(service_config("intake"), load_service_class("intake"))  # a bare vhost: nothing declared
    intake.start()
    rpc.intake.load_directory(demo_directory)
    case_id = rpc.intake.submit_case(
        {
            "source": "hotline-12345",
            "external_id": "T-1",
            "title": "路灯不亮",
            "description": "一周没有路灯",
            "street": "南湾",
        }
    )["id"]

    routing = runner_factory(service_config("routing"), load_service_class("routing"))
    routing.start()

    def referred():
        try:
            found = rpc.routing.get_case_routing(case_id)
        except RemoteError:  # not there yet
            return None
        return found if found["status"] == "referred" else None

    routed = wait_for(referred, timeout=15)
    assert routed["referrals"][0]["department"] == "cgj"
