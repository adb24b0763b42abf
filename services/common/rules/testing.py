"""``huiying rules test``: test cases beside the rules, like ``opa test``.

A ``*.test.yaml`` file in a ruleset's folder lists cases::

    tests:
      - name: five working days overdue → agenda
        stage: escalate            # optional when the ruleset has one stage
        facts: {unresolved: true, working_days_overdue: 5}
        fires: [overdue-5-working-days]        # exactly these rules fire (in any order)
        not_fires: [returned-twice]            # or: none of these fires
"""

from dataclasses import dataclass
from pathlib import Path

from services.common.rules import yamlfile
from services.common.rules.ruleset import Ruleset, is_test_file


@dataclass
class Outcome:
    where: str
    name: str
    passed: bool
    message: str = ""


def run(folder: Path, loaded: Ruleset, stages: tuple) -> list[Outcome]:
    outcomes = []
    for path in sorted(p for p in Path(folder).rglob("*.yaml") if is_test_file(p)):
        try:
            document = yamlfile.load(path) or {}
        except yamlfile.YamlFileError as exc:
            outcomes.append(Outcome(str(path), "(file)", False, exc.message))
            continue
        cases = document.get("tests") if isinstance(document, dict) else None
        if not isinstance(cases, list):
            outcomes.append(Outcome(f"{path}:1", "(file)", False, "expected 'tests:' with a list of cases"))
            continue
        for index, case in enumerate(cases):
            where = f"{path}:{yamlfile.line_of(cases, index)}"
            outcomes.append(_run_case(where, case, loaded, stages))
    return outcomes


def _run_case(where, case, loaded: Ruleset, stages) -> Outcome:
    if not isinstance(case, dict):
        return Outcome(where, "?", False, "a test case is a mapping with name, facts and fires or not_fires")
    name = str(case.get("name") or "(unnamed)")
    stage = case.get("stage") or (stages[0] if len(stages) == 1 else None)
    if stage not in stages:
        return Outcome(where, name, False, f"stage must be one of {', '.join(stages)}")
    facts = case.get("facts")
    if not isinstance(facts, dict):
        return Outcome(where, name, False, "facts must be a mapping")
    if "fires" not in case and "not_fires" not in case:
        return Outcome(where, name, False, "say what must happen: fires: [...] or not_fires: [...]")
    known = {r.id for r in loaded.stage(stage)}
    named = [*(case.get("fires") or []), *(case.get("not_fires") or [])]
    unknown = [r for r in named if r not in known]
    if unknown:
        return Outcome(where, name, False, f"no rule {', '.join(map(repr, unknown))} in stage {stage}")
    fired = {r.id for r in loaded.fire(stage, dict(facts))}
    if "fires" in case and fired != set(case["fires"] or []):
        return Outcome(where, name, False, f"expected {sorted(case['fires'] or [])}, fired {sorted(fired)}")
    wrongly = fired & set(case.get("not_fires") or [])
    if wrongly:
        return Outcome(where, name, False, f"must not fire, but fired: {sorted(wrongly)}")
    return Outcome(where, name, True)
