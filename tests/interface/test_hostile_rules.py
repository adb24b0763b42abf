"""Hostile rule files dropped into the running services' rules folder.

Each is refused on reload (the RPC the CLI uses and the staff HTTP endpoint) with a problem naming
the file and line, and the last good version keeps deciding: a new case is routed as before and
supervision still explains with its old rules. Each hostile file also carries a valid rule that
would change every decision if the file were ever accepted (routing: every case to 城管局;
supervision: every case on the agenda), so a file that slipped through would show."""

import shutil
from pathlib import Path

import pytest
import requests

from tests.conftest import wait_for, wait_routed
from tests.support import DEMO_DIRECTORY

pytestmark = pytest.mark.interface
RULES_DIR = DEMO_DIRECTORY.parent.parent / "rules"
SERVICES = {
    # folder: (stage, an action that would change every decision, its indented then-item)
    "routing": ("assign", "refer_to: {department: cgj, lead: true}"),
    "supervision": ("escalate", "add_to_agenda: {}"),
}
HOSTILE_NAME = "35-hostile.yaml"


def valid_rule(stage: str, action: str) -> str:
    """Lines 1-7 of every hostile file: a valid rule that always fires."""
    return (
        f"stage: {stage}\n"
        "rules:\n"
        "  - id: hostile-always\n"
        "    description: 若被接受则改变每个决定\n"
        "    when: {all: []}\n"
        "    then:\n"
        f"      - {action}\n"
    )


def python_tag(path: Path, stage, action, tmp_path):
    marker = tmp_path / f"pwned-{path.parent.name}"
    path.write_text(
        valid_rule(stage, action) + f"settings: !!python/object/apply:os.system ['touch {marker}']\n",
        encoding="utf-8",
    )
    return 8, "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'", marker


def unknown_action(path: Path, stage, action, tmp_path):
    path.write_text(
        valid_rule(stage, action)
        + "  - id: hostile-missiles\n"
        + "    description: 不存在的动作\n"
        + "    when: {all: []}\n"
        + "    then:\n"
        + "      - launch_missiles: {target: everyone}\n",
        encoding="utf-8",
    )
    return 12, "rule hostile-missiles: unknown action 'launch_missiles'", None


def fifty_megabytes(path: Path, stage, action, tmp_path):
    line = "# " + "填充" * 5 + "x" * 67 + "\n"  # 100 bytes of a valid YAML comment
    assert len(line.encode()) == 100
    chunk = line * 10_000  # 1 MB, written 50 times: the test itself never holds 50 MB
    with path.open("w", encoding="utf-8") as file:
        file.write(valid_rule(stage, action))
        for _ in range(50):
            file.write(chunk)
    assert path.stat().st_size > 50_000_000
    return 1, "rule files are limited to 1,000,000", None


def deep_nesting(path: Path, stage, action, tmp_path):
    condition = "{fact: title, contains: 路灯}"
    for _ in range(200):
        condition = "{all: [" + condition + "]}"
    path.write_text(
        valid_rule(stage, action)
        + "  - id: hostile-deep\n"
        + "    description: 200 层嵌套\n"
        + f"    when: {condition}\n"
        + "    then:\n"
        + f"      - {action}\n",
        encoding="utf-8",
    )
    return 10, "nested deeper than", None


def billion_laughs(path: Path, stage, action, tmp_path):
    lines = [f"stage: {stage}", "description:", "  a: &a [哈, 哈, 哈, 哈, 哈, 哈, 哈, 哈, 哈]"]
    previous = "a"
    for name in "bcdefghi":  # 9 ** 9 = 387,420,489 哈 once expanded
        lines.append(f"  {name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
        previous = name
    # A rule whose description is the bomb: printing it (str) took 35 s and 3 GB before aliases
    # were refused; a value that is an error message's repr took longer still.
    path.write_text(
        "\n".join(lines)
        + "\n"
        + valid_rule(stage, action).split("\n", 1)[1]
        + "  - id: hostile-laughs\n"
        + "    description: *i\n"
        + "    when: {fact: title, contains: *i}\n"
        + "    then:\n"
        + f"      - {action}\n",
        encoding="utf-8",
    )
    return 4, "aliases (*a) are not allowed in rule files", None


def oversized_regex(path: Path, stage, action, tmp_path):
    # Valid Python and inside the supported subset, but a repetition RE2 will not build (beyond
    # 1,000): refused at load, with the line, rather than failing every decision once running.
    path.write_text(
        valid_rule(stage, action)
        + "  - id: hostile-regex\n"
        + "    description: 无法运行的正则\n"
        + "    when:\n"
        + "      any:\n"
        + "        - {fact: title, contains: 路灯}\n"
        + "        - {fact: title, matches: 'a{1,2000}'}\n"
        + "    then:\n"
        + f"      - {action}\n",
        encoding="utf-8",
    )
    return 13, "rule hostile-regex: title matches: unsupported regular expression: invalid repetition size", None


HOSTILE = [python_tag, unknown_action, fifty_megabytes, deep_nesting, billion_laughs, oversized_regex]


@pytest.fixture
def stack(run_services, rpc, demo_directory, tmp_path, monkeypatch):
    rules = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules)
    monkeypatch.setenv("HUIYING_RULES_DIR", str(rules))
    urls = run_services("intake", "routing", "supervision")
    rpc.intake.load_directory(demo_directory)
    staff = {"Authorization": "Bearer " + rpc.intake.create_credential("staff", "office")["key"]}
    submitted = []

    def submit(title, street):
        case_id = rpc.intake.submit_case(
            {
                "source": "hotline-12345",
                "external_id": f"H-{len(submitted)}",
                "title": title,
                "description": "群众反映",
                "street": street,
            }
        )["id"]
        submitted.append(case_id)

        return wait_routed(rpc, case_id)

    return urls, rules, staff, submit


def vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def explain(rpc, case_id) -> dict:
    """Supervision's explanation, once its projection has the case."""

    def explained():
        try:
            return rpc.supervision.explain(case_id)
        except Exception:
            return None

    return wait_for(explained, timeout=15)


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda f: f.__name__)
def test_a_hostile_rule_file_is_refused_and_the_running_rules_keep_deciding(stack, rpc, tmp_path, hostile):
    urls, rules, staff, submit = stack
    before = {service: getattr(rpc, service).rules_status() for service in SERVICES}
    assert all(status["version"] and status["problems"] == [] for status in before.values())
    case_before = submit("海吉星市场周边交通拥堵", "平湖")
    assert [(r["department"], r["lead"]) for r in case_before["referrals"]] == [("jtglj", True), ("jjdd", False)]
    explained_before = explain(rpc, case_before["case_id"])

    for service, (stage, action) in SERVICES.items():
        path = rules / service / HOSTILE_NAME
        peak_resettable = reset_peak_rss()
        rss_before = vm_kb("VmRSS")
        line, message, marker = hostile(path, stage, action, tmp_path)
        expected = f"{path}:{line}: "

        by_rpc = getattr(rpc, service).reload_rules()
        response = requests.post(urls[service] + "/api/v1/rules/reload", headers=staff)
        assert response.status_code == 422, response.text  # refused
        by_http = response.json()
        for status in (by_rpc, by_http):
            assert status["version"] == before[service]["version"], (service, status)
            assert any(p.startswith(expected) and message in p for p in status["problems"]), (
                service,
                expected,
                message,
                status["problems"],
            )
            assert all(len(p) < 1000 for p in status["problems"])  # nothing expanded into the message
        if marker is not None:
            assert not marker.exists(), "the YAML tag ran a command"
        grown = (vm_kb("VmHWM") if peak_resettable else vm_kb("VmRSS")) - rss_before
        assert grown < 100_000, f"{service}: memory grew by {grown} kB loading {hostile.__name__}"
        assert requests.get(urls[service] + "/health").status_code == 200

    # The last good versions keep deciding.
    assert {service: getattr(rpc, service).rules_status()["version"] for service in SERVICES} == {
        service: status["version"] for service, status in before.items()
    }
    case_after = submit("海吉星市场周边交通拥堵", "平湖")
    assert [(r["department"], r["lead"]) for r in case_after["referrals"]] == [("jtglj", True), ("jjdd", False)]
    assert case_after["decision"]["ruleset_version"] == case_before["decision"]["ruleset_version"]
    assert submit("丹竹头社区路灯不亮", "南湾")["referrals"][0]["department"] == "cgj"

    explanation = explain(rpc, case_after["case_id"])
    assert explanation["ruleset_version"] == explained_before["ruleset_version"]
    rule_ids = {r["rule_id"] for r in explanation["rules"]}
    assert "overdue-5-working-days" in rule_ids and not any(r.startswith("hostile-") for r in rule_ids)
    assert rpc.supervision.list_agenda() == []  # the always-firing hostile rule never ran

    # And a good edit is still taken: the services were not left stuck.
    for service in SERVICES:
        (rules / service / HOSTILE_NAME).unlink()
    for service in SERVICES:
        assert getattr(rpc, service).reload_rules() == before[service]
