"""Rule files are data: every problem is reported at its file and line, hostile files are refused."""

import shutil
from pathlib import Path

import pytest

from services.common.rules.ruleset import RulesetInvalid
from services.supervision import rules as supervision_rules

RULES = Path(__file__).resolve().parents[2] / "rules"


@pytest.fixture
def folder(tmp_path):
    shutil.copytree(RULES, tmp_path / "rules")
    return tmp_path / "rules"


def problems_for(folder, text, name="20-extra.yaml"):
    (folder / "supervision" / name).write_text(text, encoding="utf-8")
    with pytest.raises(RulesetInvalid) as error:
        supervision_rules.load(folder)
    return [str(p) for p in error.value.problems]


RULE = """stage: escalate
rules:
  - id: extra
    description: 测试
    when:
      all:
        - {{fact: unresolved, eq: true}}
        - {condition}
    then:
      - {action}
"""


@pytest.mark.parametrize(
    "condition, action, line, message",
    [
        ("{fact: colour, eq: red}", "add_to_agenda: {}", 8, "unknown fact 'colour'"),
        ("{fact: returns, approx: 2}", "add_to_agenda: {}", 8, "unknown operator 'approx'"),
        ("{fact: returns, ge: two}", "add_to_agenda: {}", 8, "returns ge: expects a number value, got 'two'"),
        ("{fact: title, matches: '(unclosed'}", "add_to_agenda: {}", 8, "invalid regular expression"),
        ("{fact: title, matches: '^anchored'}", "add_to_agenda: {}", 8, "anchors ^ and $ are not supported"),
        ("{fact: returns, ge: 2}", "launch_missiles: {}", 10, "unknown action 'launch_missiles'"),
        ("{fact: returns, ge: 2}", "add_to_agenda: {scope: everyone}", 3, "scope must be case or cluster"),
        ("{fact: returns, ge: 2}", "add_to_agenda: {colour: red}", 10, "add_to_agenda has no parameter 'colour'"),
    ],
)
def test_each_problem_is_reported_at_its_file_and_line(folder, condition, action, line, message):
    found = problems_for(folder, RULE.format(condition=condition, action=action))
    assert any(p.startswith(f"{folder}/supervision/20-extra.yaml:{line}: ") and message in p for p in found), found


def test_duplicate_ids_name_both_places(folder):
    found = problems_for(
        folder,
        RULE.format(condition="{fact: returns, ge: 2}", action="add_to_agenda: {}").replace(
            "id: extra", "id: returned-twice"
        ),
    )
    assert any("duplicate rule id 'returned-twice' (first in" in p and "10-escalation.yaml" in p for p in found)


def test_python_tags_are_refused(folder):
    found = problems_for(folder, "stage: escalate\nrules: !!python/object/apply:os.system ['touch /tmp/pwned']\n")
    assert "could not determine a constructor" in found[0] and not Path("/tmp/pwned").exists()


def test_an_oversized_file_is_refused_before_parsing(folder):
    found = problems_for(folder, "# " + "x" * 2_000_000 + "\n")
    assert "rule files are limited to 1,000,000" in found[0]


def test_deep_nesting_is_refused(folder):
    condition = "{fact: returns, ge: 2}"
    for _ in range(20):
        condition = "{all: [" + condition + "]}"
    found = problems_for(folder, RULE.format(condition=condition, action="add_to_agenda: {}"))
    assert any("nested deeper than 12 levels" in p for p in found)


def test_settings_are_checked(folder):
    policy = folder / "supervision" / "policy.yaml"
    policy.write_text(
        policy.read_text(encoding="utf-8").replace("cluster_similarity: 0.2", "cluster_similarity: 3")
        + "  colour: red\n",
        encoding="utf-8",
    )
    with pytest.raises(RulesetInvalid) as error:
        supervision_rules.load(folder)
    found = [str(p) for p in error.value.problems]
    assert any("cluster_similarity must be a number from 0 to 1" in p for p in found)
    assert any("unknown setting 'colour'" in p for p in found)
