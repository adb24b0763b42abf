"""Open311 GeoReport v2 (https://wiki.open311.org/GeoReport_v2): mapping its parameters to a case
submission and rendering its documents in XML (the required format) and JSON.

Categories are the ``service_code``s. Requests get their ``service_request_id`` (the case id)
at once, so no tokens are ever issued; ``tokens/{token}`` answers for a case id used as a token.
"""

import json
import uuid
from datetime import datetime
from xml.etree import ElementTree as ET

from werkzeug.wrappers import Response

from services.common.http import ApiError
from services.common.privacy import mask_phones_in_text
from services.intake.schemas import CaseSubmission

CLOSED_STATUSES = {"closed"}
REQUEST_FIELDS = (
    "service_request_id",
    "status",
    "status_notes",
    "service_name",
    "service_code",
    "description",
    "agency_responsible",
    "service_notice",
    "requested_datetime",
    "updated_datetime",
    "expected_datetime",
    "address",
    "address_id",
    "zipcode",
    "lat",
    "long",
    "media_url",
)


class Open311Error(ApiError):
    """Rendered in the specification's error format."""


def render(fmt: str, root: str, item: str, records: list[dict], status: int = 200) -> Response:
    """``<root><item>...</item></root>`` in XML, or a JSON list of objects."""
    if fmt == "json":
        return Response(json.dumps(records, ensure_ascii=False), status=status, mimetype="application/json")
    top = ET.Element(root)
    for record in records:
        element = ET.SubElement(top, item)
        _fill(element, record)
    body = ET.tostring(top, encoding="unicode")
    return Response('<?xml version="1.0" encoding="utf-8"?>\n' + body, status=status, mimetype="text/xml")


def render_definition(fmt: str, service_code: str) -> Response:
    """A service definition; our services take no extra attributes (``metadata`` is false)."""
    if fmt == "json":
        return Response(json.dumps({"service_code": service_code, "attributes": []}), mimetype="application/json")
    top = ET.Element("service_definition")
    ET.SubElement(top, "service_code").text = service_code
    ET.SubElement(top, "attributes")
    return Response(
        '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(top, encoding="unicode"), mimetype="text/xml"
    )


def _fill(element, record: dict):
    for key, value in record.items():
        child = ET.SubElement(element, key)
        if isinstance(value, bool):
            child.text = "true" if value else "false"
        elif value is not None:
            child.text = str(value)


def render_error(request, exc: Exception) -> Response:
    from services.common.http import json_error

    fmt = "json" if request.path.endswith(".json") else "xml"
    if isinstance(exc, ApiError):
        status = exc.status if exc.status in (400, 401, 403, 404) else 400
        description = exc.message
        if exc.details:
            description += ": " + "; ".join(
                f"{d['field']}: {d['problem']}" if d["field"] else d["problem"] for d in exc.details
            )
    else:
        json_error(request, exc)  # logs the unexpected error
        status, description = 500, "internal error"
    return render(fmt, "errors", "error", [{"code": status, "description": description}], status=status)


def service_list(directory) -> list[dict]:
    if directory is None:
        return []
    return [
        {
            "service_code": c.code,
            "service_name": c.name,
            "description": c.name,
            "metadata": False,
            "type": "realtime",
            "keywords": ",".join(c.keywords),
            "group": "",
        }
        for c in directory.categories
    ]


def submission_from_form(form, source: str) -> CaseSubmission | dict:
    """Map a POST requests form to submission fields (validated by the caller)."""
    attribute = {
        key[len("attribute[") : -1]: form.get(key) for key in form if key.startswith("attribute[") and key.endswith("]")
    }
    if not form.get("service_code"):
        raise Open311Error("service_code is required", [{"field": "service_code", "problem": "missing"}])
    description = form.get("description") or ""
    title = attribute.get("title") or description.strip().split("\n", 1)[0][:60]
    name = " ".join(p for p in (form.get("last_name"), form.get("first_name")) if p) or None
    data = {
        "source": source,
        # FixMyStreet and similar clients send their own id as attribute[external_id]; without
        # one, every POST is a new report, as the specification has it.
        "external_id": attribute.get("external_id") or form.get("external_id") or f"open311-{uuid.uuid4()}",
        "title": title,
        "description": description,
        "category": form.get("service_code"),
        "street": attribute.get("street"),
        "address": form.get("address_string"),
        "reporter_name": name,
        "reporter_phone": form.get("phone"),
    }
    for field, key in (("lat", "lat"), ("lon", "long")):
        if form.get(key):
            try:
                data[field] = float(form.get(key))
            except ValueError:
                raise Open311Error(f"{key} must be a number", [{"field": key, "problem": "not a number"}]) from None
    return data


def request_record(view: dict, category_names: dict) -> dict:
    status = "closed" if view["status"] in CLOSED_STATUSES else "open"
    return {
        "service_request_id": view["id"],
        "status": status,
        "status_notes": view["status_notes"] or "",
        "service_name": category_names.get(view["category"], ""),
        "service_code": view["category"] or "",
        "description": mask_phones_in_text(view["description"]),
        "agency_responsible": view["agency_responsible"] or "",
        "service_notice": "",
        "requested_datetime": view["received_at"],
        "updated_datetime": view["updated_at"],
        "expected_datetime": view["expected_at"] or "",
        "address": view["address"] or "",
        "address_id": "",
        "zipcode": "",
        "lat": view["lat"] if view["lat"] is not None else "",
        "long": view["lon"] if view["lon"] is not None else "",
        "media_url": "",
    }


def parse_w3c_datetime(value: str, name: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise Open311Error(f"{name} must be a W3C datetime such as 2026-10-01T09:00:00+08:00") from None
    if moment.tzinfo is None:
        raise Open311Error(f"{name} must carry a time zone offset, e.g. +08:00")
    return moment
