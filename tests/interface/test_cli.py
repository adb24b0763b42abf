"""The operator CLI against running services: directory load, submit, import, case show."""

import csv
import json

import pytest
from click.testing import CliRunner
from openpyxl import Workbook

from huiying.cli import main
from tests.conftest import wait_for
from tests.support import DEMO_DIRECTORY

pytestmark = pytest.mark.interface
EXAMPLE = DEMO_DIRECTORY.parent / "examples" / "haijixing-58-suggestions.csv"


@pytest.fixture
def cli(run_services, rabbit_config, monkeypatch):
    run_services("intake", "supervision")
    monkeypatch.setenv("AMQP_URI", rabbit_config["AMQP_URI"])
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    loaded = invoke("directory", "load", DEMO_DIRECTORY, "--json")
    assert loaded.exit_code == 0, loaded.output
    return invoke


def test_directory_load_reports_what_it_loaded(cli):
    result = cli("directory", "load", DEMO_DIRECTORY, "--json")
    summary = json.loads(result.stdout)
    assert (summary["streets"], summary["departments"], summary["special_supervisors"]) == (12, 25, 79)
    assert (summary["sectors"], summary["sector_groups"], summary["workstations"]) == (30, 9, 12)


def test_a_bad_directory_is_refused_with_the_entry_at_fault(cli, tmp_path):
    bad = tmp_path / "dir.yaml"
    bad.write_text(
        DEMO_DIRECTORY.read_text(encoding="utf-8").replace("categories:\n  - traffic", "categories:\n  - trafic", 1),
        encoding="utf-8",
    )
    result = cli("directory", "load", bad)
    assert result.exit_code == 1
    assert "departments[8].categories[0]: unknown category 'trafic'" in result.stderr
    assert "Traceback" not in result.output


def test_submit_then_case_show(cli):
    result = cli(
        "submit",
        "--source",
        "ws-pinghu",
        "--external-id",
        "PH-1",
        "--title",
        "托儿所学位不足",
        "--description",
        "平湖街道普惠性托育机构少",
        "--street",
        "平湖",
        "--category",
        "childcare",
        "--reporter-phone",
        "13700001234",
        "--json",
    )
    submitted = json.loads(result.stdout)
    assert submitted["created"] is True
    again = json.loads(
        cli(
            "submit", "--source", "ws-pinghu", "--external-id", "PH-1", "--title", "x", "--description", "y", "--json"
        ).stdout
    )
    assert again == {"id": submitted["id"], "created": False}

    def shown():
        outcome = cli("case", "show", submitted["id"], "--json")
        return json.loads(outcome.stdout) if outcome.exit_code == 0 else None

    record = wait_for(shown)
    assert {"id", "status", "kind", "category", "street", "referrals", "timeline", "escalations"} <= set(record)
    assert (record["status"], record["category"], record["street"]) == ("received", "childcare", "pinghu")
    assert [step["event"] for step in record["timeline"]] == ["case_received"]
    missing = cli("case", "show", "LG-1999-000001")
    assert missing.exit_code == 1 and "no case" in missing.stderr


def test_submit_rejects_bad_input_in_one_line(cli):
    result = cli("submit", "--source", "Bad Source", "--external-id", "1", "--title", "t", "--description", "d")
    assert result.exit_code == 1 and "source" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_import_the_58_suggestions_then_rerun_after_an_interruption(cli, tmp_path):
    with open(EXAMPLE, encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    partial = tmp_path / "first-30.csv"
    with open(partial, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows(rows[:31])  # header + 30 rows: the run that was interrupted

    first = json.loads(cli("import", partial, "--source", "consultation-pinghu", "--json").stdout)
    assert first == {"imported": 30, "duplicates": 0, "rejected": []}
    rerun = json.loads(cli("import", EXAMPLE, "--source", "consultation-pinghu", "--json").stdout)
    assert rerun == {"imported": 28, "duplicates": 30, "rejected": []}


def test_import_xlsx_reports_rejected_rows_with_reasons(cli, tmp_path):
    workbook = Workbook()
    sheet = workbook.active
    sheet.append(["标题", "内容", "街道", "联系电话"])
    sheet.append(["大芬油画村综合整治", "统筹规划、提升标准、统一实施", "布吉", "13800138000"])
    sheet.append(["", "没有标题的建议", "布吉", None])
    sheet.append(["横岗南片区海绵公园", "分期建设，探索以运营反哺管养", "火星", None])
    sheet.append(["AED配置", "地铁站增加AED", None, "not a phone"])
    path = tmp_path / "batch.xlsx"
    workbook.save(path)

    report = json.loads(cli("import", path, "--source", "ws-buji", "--json").stdout)
    assert report["imported"] == 1 and report["duplicates"] == 0
    rejected = {r["row"]: r["reason"] for r in report["rejected"]}
    assert set(rejected) == {3, 4, 5}
    assert "title" in rejected[3] and "street" in rejected[4] and "reporter_phone" in rejected[5]
    assert "not a phone" not in json.dumps(report)  # input is never echoed back


def test_import_refuses_a_file_it_cannot_read(cli, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    result = cli("import", bad, "--source", "x")
    assert result.exit_code == 1 and "unsupported file type .txt" in result.stderr
    headerless = tmp_path / "h.csv"
    headerless.write_text("a,b\n1,2\n")
    result = cli("import", headerless, "--source", "x")
    assert result.exit_code == 1 and "missing column(s) title, description" in result.stderr


def test_unknown_subcommand_fails_cleanly(cli):
    result = CliRunner().invoke(main, ["frobnicate"])
    assert result.exit_code == 2 and "No such command" in result.output
