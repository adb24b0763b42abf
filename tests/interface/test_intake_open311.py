"""Open311 GeoReport v2 on the intake service, in XML and JSON, as a standard client uses it."""

from xml.etree import ElementTree as ET

import pytest
import requests

pytestmark = pytest.mark.interface


@pytest.fixture
def open311(run_services, rpc, demo_directory):
    urls = run_services("intake")
    rpc.intake.load_directory(demo_directory)
    key = rpc.intake.create_credential("source", "fixmystreet")["key"]
    return urls["intake"] + "/open311/v2", key


def test_services_list_the_categories_in_both_formats(open311):
    base, _ = open311
    xml = ET.fromstring(requests.get(f"{base}/services.xml").content)
    assert xml.tag == "services"
    codes = [s.findtext("service_code") for s in xml.findall("service")]
    assert "traffic" in codes and len(codes) == 18
    first = xml.find("service")
    assert first.findtext("metadata") == "false" and first.findtext("type") == "realtime"
    as_json = requests.get(f"{base}/services.json").json()
    assert [s["service_code"] for s in as_json] == codes
    definition = requests.get(f"{base}/services/traffic.json").json()
    assert definition == {"service_code": "traffic", "attributes": []}
    assert requests.get(f"{base}/services/nope.xml").status_code == 404


def test_post_then_get_a_request(open311):
    base, key = open311
    form = {
        "api_key": key,
        "service_code": "health",
        "description": "地铁站出口缺少AED除颤仪",
        "address_string": "龙岗区坂田街道五和地铁站",
        "lat": "22.63",
        "long": "114.06",
        "phone": "13900001111",
        "attribute[external_id]": "fms-123",
        "jurisdiction_id": "LG",
    }
    posted = requests.post(f"{base}/requests.xml", data=form)
    assert posted.status_code == 200
    root = ET.fromstring(posted.content)
    request_id = root.find("request").findtext("service_request_id")
    assert request_id.startswith("LG-")

    again = requests.post(f"{base}/requests.json", data=form).json()
    assert again[0]["service_request_id"] == request_id  # same external id: the same case

    record = requests.get(f"{base}/requests/{request_id}.json").json()[0]
    assert record["status"] == "open" and record["service_code"] == "health"
    assert record["service_name"] == "医疗卫生" and record["lat"] == 22.63
    assert "13900001111" not in requests.get(f"{base}/requests/{request_id}.xml").text
    listed = requests.get(f"{base}/requests.json", params={"service_code": "health", "status": "open"}).json()
    assert [r["service_request_id"] for r in listed] == [request_id]
    assert requests.get(f"{base}/requests.json", params={"service_code": "traffic"}).json() == []
    token = requests.get(f"{base}/tokens/{request_id}.json").json()
    assert token == [{"service_request_id": request_id, "token": request_id}]


def test_errors_use_the_specification_format(open311):
    base, key = open311
    forbidden = requests.post(f"{base}/requests.xml", data={"service_code": "traffic", "description": "d"})
    assert forbidden.status_code == 403
    error = ET.fromstring(forbidden.content).find("error")
    assert error.findtext("code") == "403" and "api_key" in error.findtext("description")

    missing = requests.post(f"{base}/requests.json", data={"api_key": key, "description": "d"})
    assert missing.status_code == 400 and "service_code" in missing.json()[0]["description"]
    bad_code = requests.post(f"{base}/requests.json", data={"api_key": key, "service_code": "nope", "description": "d"})
    assert bad_code.status_code == 400 and "category" in bad_code.json()[0]["description"]
    no_text = requests.post(f"{base}/requests.json", data={"api_key": key, "service_code": "traffic"})
    assert no_text.status_code == 400 and "description" in no_text.json()[0]["description"]
    not_found = requests.get(f"{base}/requests/LG-1999-000001.xml")
    assert not_found.status_code == 404 and ET.fromstring(not_found.content).tag == "errors"
    bad_date = requests.get(f"{base}/requests.json", params={"start_date": "yesterday"})
    assert bad_date.status_code == 400 and bad_date.json()[0]["code"] == 400
    assert (
        requests.post(
            f"{base}/requests.json",
            data={"api_key": key, "service_code": "traffic", "description": "d", "jurisdiction_id": "elsewhere"},
        ).status_code
        == 404
    )
