"""Pure logic: masking, directory validation, the submission schema, import rows."""

from pathlib import Path

import pytest
import yaml

from huiying import importer
from services.common.directory import DirectoryError, load_directory_file, parse_directory
from services.common.http import ValidationFailed
from services.common.privacy import mask_phone, mask_phones_in_text
from services.intake.schemas import parse_submission
from tests.support import DEMO_DIRECTORY


@pytest.mark.parametrize(
    "phone, masked",
    [("13812341234", "138****1234"), ("+86 138-1234-1234", "861****1234"), ("", ""), (None, None), ("12345", "*****")],
)
def test_mask_phone(phone, masked):
    assert mask_phone(phone) == masked


def test_phone_numbers_inside_text_are_masked():
    assert mask_phones_in_text("请回电13812341234或138 1234 5678，谢谢") == "请回电138****1234或138****5678，谢谢"
    assert mask_phones_in_text("工单号 20261001123456789") == "工单号 20261001123456789"


def test_demo_directory_has_the_seed_facts():
    directory = load_directory_file(DEMO_DIRECTORY)
    summary = directory.summary()
    assert summary["streets"] == 12 and [s.code for s in directory.streets if s.kind == "new_district"] == ["dapeng"]
    assert (summary["sectors"], summary["sector_groups"], summary["workstations"]) == (30, 9, 12)
    assert (summary["departments"], summary["special_supervisors"]) == (25, 79)
    assert {s.name for s in directory.sectors if s.group == "g3"} == {"共青团", "总工会", "妇联", "青联", "侨联"}
    assert directory.resolve_street("平湖") == directory.resolve_street("平湖街道") == "pinghu"
    assert directory.street_in_text("龙岗区横岗街道某路") == "henggang"
    assert directory.street_in_text("龙岗区某路") is None  # the district's name is not the 龙岗 street


def test_directory_errors_name_every_entry_at_fault():
    document = yaml.safe_load(DEMO_DIRECTORY.read_text(encoding="utf-8"))
    document["departments"][0]["categories"] = ["nope"]
    document["supervisors"][3]["member"] = "m999"
    document["streets"].append(dict(document["streets"][0]))
    with pytest.raises(DirectoryError) as error:
        parse_directory(document)
    message = str(error.value)
    assert "departments[0].categories[0]: unknown category 'nope'" in message
    assert "supervisors[3].member: unknown member 'm999'" in message
    assert "streets[12].code: duplicate 'pinghu'" in message


def test_directory_file_must_be_plain_yaml(tmp_path: Path):
    hostile = tmp_path / "d.yaml"
    hostile.write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(DirectoryError, match="not valid YAML"):
        load_directory_file(hostile)
    with pytest.raises(DirectoryError, match="cannot read"):
        load_directory_file(tmp_path / "missing.yaml")


def test_submission_errors_name_fields_without_echoing_input():
    with pytest.raises(ValidationFailed) as error:
        parse_submission(
            {"source": "x", "external_id": "1", "title": "", "description": "d", "reporter_phone": "secret-138"}
        )
    fields = {d["field"] for d in error.value.details}
    assert fields == {"title", "reporter_phone"}
    assert "secret-138" not in str(error.value)


def test_submission_normalises_phone_and_blank_fields():
    submission = parse_submission(
        {
            "source": "x",
            "external_id": "1",
            "title": " t ",
            "description": "d",
            "reporter_phone": "138 1234-5678",
            "street": "  ",
        }
    )
    assert (submission.title, submission.reporter_phone, submission.street) == ("t", "13812345678", None)


def test_rows_without_ids_get_stable_content_ids():
    mapping = importer.column_map(Path("x.csv"), ["标题", "内容", "街道"])
    a = importer.row_to_submission(["t", "d", "平湖"], mapping, "s")
    b = importer.row_to_submission(["t", "d", "平湖"], mapping, "s")
    c = importer.row_to_submission(["t", "other", "平湖"], mapping, "s")
    assert a["external_id"] == b["external_id"] != c["external_id"]
    assert a == {"source": "s", "title": "t", "description": "d", "street": "平湖", "external_id": a["external_id"]}
