"""From one event to the deliveries it owes: recipients from the directory, channels from their
contacts, text from the templates. Pure functions: nothing is sent here."""

from dataclasses import dataclass

from services.common.privacy import mask_phone
from services.common.timeutil import iso
from services.notify.settings import NotifySettings

KIND_NAMES = {
    "agenda": ("纳入民主监督议题", "纳入民主监督议题库"),
    "joint_supervision": ("联合督查督办", "交由区督查部门联合督查督办"),
    "special_inspection": ("专项视察监督", "列入专项视察监督"),
}
OPEN311_STATUS = {"case_closed": "closed"}
STATUS_NOTES = {
    "case_referred": "已转交{departments}办理",
    "case_needs_triage": "正在人工分派",
    "referral_replied": "已答复",
    "case_reopened": "群众不满意，已重办",
    "case_closed": "已办结",
}


@dataclass
class Delivery:
    recipient: str
    channel: str
    address: str
    subject: str
    body: str
    digest: bool = False  # held for the daily digest


def _departments_of(event: dict) -> list[str]:
    if event.get("referrals"):
        return [r["department"] for r in event["referrals"]]
    return list(event.get("departments") or ([event["department"]] if event.get("department") else []))


def _contact_channels(contact) -> list[tuple[str, str]]:
    if contact is None:
        return []
    pairs = [
        ("email", contact.email),
        ("webhook", contact.webhook),
        ("wecom", contact.wecom),
        ("dingtalk", contact.dingtalk),
    ]
    return [(channel, address) for channel, address in pairs if address]


def plan(settings: NotifySettings, event: dict, case: dict, directory, citizen_phone: str | None) -> list[Delivery]:
    event_type = event["event_type"]
    if event_type == "referral_replied" and not event.get("case_replied"):
        return []
    departments = {d.code: d for d in directory.departments} if directory else {}
    members = {m.id: m for m in directory.members} if directory else {}
    involved = _departments_of(event)
    context = {
        "case": {"id": case["case_id"], "title": case["title"], "street": case.get("street")},
        "departments": [departments[d].name if d in departments else d for d in involved],
        "rule_id": event.get("rule_id"),
        "agenda_id": event.get("agenda_id"),
        "case_ids": event.get("case_ids") or [case["case_id"]],
        "case_count": len(event.get("case_ids") or [1]),
        "result": (event.get("result") or "")[:200],
        "deadline": _deadline_text(event.get("deadline")),
        "kind_name": KIND_NAMES.get(event.get("kind"), ("", ""))[0],
        "kind_name_verb": KIND_NAMES.get(event.get("kind"), ("", ""))[1],
    }
    out: list[Delivery] = []
    for route in settings.routes:
        if route.event != event_type or (route.kinds and event.get("kind") not in route.kinds):
            continue
        for recipient in route.to:
            for key, name, channels, extra in _recipients(
                recipient, event, case, involved, departments, members, directory, citizen_phone
            ):
                subject, body = settings.render(route.template, {**context, "recipient_name": name, **extra})
                out += [Delivery(key, channel, address, subject, body, route.digest) for channel, address in channels]
    unique = {(d.recipient, d.channel): d for d in out}
    return list(unique.values())


def _recipients(kind, event, case, involved, departments, members, directory, citizen_phone):
    if kind == "department":
        for code in involved:
            department = departments.get(code)
            if department is None:
                continue
            extra = _referral_extra(event, code)
            yield f"department:{code}", department.name, _contact_channels(department.contact), extra
    elif kind == "supervisors" and directory:
        for posting in directory.supervisors:
            if set(posting.departments) & set(involved) and posting.member in members:
                member = members[posting.member]
                channels = [(c, a) for c, a in (("email", member.email), ("sms", member.phone)) if a]
                yield f"supervisor:{member.id}", member.name, channels, {}
    elif kind == "inspection_office" and directory and directory.inspection_office:
        office = directory.inspection_office
        yield f"inspection_office:{office.code}", office.name, _contact_channels(office.contact), {}
    elif kind == "citizen" and citizen_phone:
        yield "citizen", "您好", [("sms", citizen_phone)], {}
    elif kind == "raiser" and directory:
        # The member who raised it (source "member-<id>") or the workstation it came through.
        member = members.get(case["source"].removeprefix("member-")) if case["source"].startswith("member-") else None
        if member:
            channels = [(c, a) for c, a in (("email", member.email), ("sms", member.phone)) if a]
            yield f"member:{member.id}", member.name, channels, {}
        station = next((w for w in directory.workstations if w.code == case.get("workstation")), None)
        if station:
            yield f"workstation:{station.code}", station.name, _contact_channels(station.contact), {}


def _referral_extra(event, department) -> dict:
    for referral in event.get("referrals") or []:
        if referral["department"] == department:
            return {
                "lead": referral.get("lead", False),
                "due_at": referral.get("due_at", "")[:10],
                "return_by": (referral.get("return_by") or "")[:10],
            }
    return {"lead": False, "due_at": (event.get("due_at") or "")[:10], "return_by": ""}


def _deadline_text(deadline) -> str:
    if not deadline:
        return ""
    if "working_days" in deadline:
        return f"{deadline['working_days']}个工作日"
    return f"{deadline['months']}个月"


def status_update(event: dict, case: dict, update_id: str) -> dict:
    """The Open311 service-request-update the case's source system receives."""
    departments = "、".join(r.get("department_name", r["department"]) for r in event.get("referrals") or [])
    notes = STATUS_NOTES[event["event_type"]].format(departments=departments)
    if event["event_type"] == "referral_replied" and event.get("result"):
        notes += "：" + event["result"][:500]
    return {
        "update_id": update_id,
        "service_request_id": case["case_id"],
        "external_id": case["external_id"],
        "status": OPEN311_STATUS.get(event["event_type"], "open"),
        "description": notes,
        "updated_datetime": event.get("occurred_at") or iso(None),
    }


def masked_address(channel: str, address: str) -> str:
    if channel == "sms":
        return mask_phone(address)
    if channel in ("webhook", "wecom", "dingtalk", "callback"):
        return address.split("?", 1)[0]  # robot tokens and signatures stay private
    return address


def recipient_name(directory, key: str) -> str:
    """The name to greet a recipient by, from its key (``department:cgj`` …)."""
    kind, _, code = key.partition(":")
    if directory is not None:
        entries = {
            "department": directory.departments,
            "member": directory.members,
            "supervisor": directory.members,
            "workstation": directory.workstations,
        }.get(kind, [])
        for entry in entries:
            if getattr(entry, "code", None) == code or getattr(entry, "id", None) == code:
                return entry.name
        if kind == "inspection_office" and directory.inspection_office:
            return directory.inspection_office.name
    return code or "您好"
