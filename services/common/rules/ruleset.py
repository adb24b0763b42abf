"""A folder of rule files, validated and versioned.

A rule file is YAML::

    stage: assign                 # which step of the service's decision this file feeds
    rules:
      - id: assign-traffic        # unique across the folder
        description: 交通出行 → 交通运输局（主办）、交警大队（协办）
        priority: 0               # optional; higher wins where only one rule's action can apply
        when: {fact: category, eq: traffic}
        then:
          - refer_to: {department: jtglj, lead: true}
          - refer_to: {department: jjdd}
    settings:                     # optional numbers the service reads (validated by the service)
      return_window_working_days: 2

Every problem is reported as ``FILE:LINE: message``; a folder with any problem is refused whole,
so the running rules are only ever replaced by a complete, valid set.
"""

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.common import metrics
from services.common.rules import conditions, yamlfile
from services.common.rules.conditions import Fact
from services.common.rules.engine import CompiledRules, RulesEngineError
from services.common.rules.yamlfile import line_of

MAX_FILES = 200
FIRED_REMEMBERED = 50_000  # distinct fact combinations remembered per ruleset version


@dataclass(frozen=True)
class Param:
    type: str  # code, text, int, number, bool
    required: bool = True
    minimum: float | None = None


@dataclass(frozen=True)
class Action:
    name: str
    stage: str
    params: dict  # name -> Param
    one_of: tuple = ()  # exactly one of these params must be given


@dataclass
class Rule:
    id: str
    stage: str
    description: str
    priority: int
    condition: dict
    actions: list  # [(name, {param: value})]
    file: str
    line: int


@dataclass
class Problem:
    file: str
    line: int
    message: str

    def __str__(self):
        return f"{self.file}:{self.line}: {self.message}"


class RulesetInvalid(ValueError):
    def __init__(self, problems: list[Problem]):
        super().__init__("; ".join(map(str, problems)))
        self.problems = problems


@dataclass
class Ruleset:
    name: str
    version: str
    rules: list[Rule]
    settings: dict
    files: dict = field(default_factory=dict)  # relative path -> content hash
    _compiled: dict = field(default_factory=dict, repr=False)
    _fired: dict = field(default_factory=dict, repr=False)  # (stage, those facts' values) -> rule ids

    def stage(self, stage: str) -> list[Rule]:
        return [r for r in self.rules if r.stage == stage]

    def engine(self, stage: str) -> CompiledRules:
        if stage not in self._compiled:
            self._compiled[stage] = CompiledRules(
                f"{self.name}.{stage}", {r.id: r.condition for r in self.stage(stage)}
            )
        return self._compiled[stage]

    def fire(self, stage: str, facts: dict) -> list[Rule]:
        """The rules of ``stage`` that durable_rules says hold, highest priority first (then file order).

        durable_rules is asked once per distinct combination of what it would be given (the facts
        the stage's rules read, a text as its text tests' outcomes), and its answer remembered for
        this version of the rules: a rule can only depend on facts it names, and a sweep of a
        million cases meets a few thousand combinations, not a million. Texts are keyed by their
        tests' outcomes because no two citizens word a case alike: keyed by the text itself,
        routing asked durable for every case."""
        key = (stage, self._read_values(stage, facts))
        chosen = self._fired.get(key)
        if chosen is None:
            started = time.perf_counter()
            fired = set(self.engine(stage).matching(facts))
            metrics.RULE_EVALUATION.labels(self.name).observe(time.perf_counter() - started)
            chosen = sorted((r for r in self.stage(stage) if r.id in fired), key=lambda r: -r.priority)
            if len(self._fired) >= FIRED_REMEMBERED:
                self._fired.clear()  # titles or free text in a condition: combinations need not repeat
            self._fired[key] = chosen
        return list(chosen)

    def reads(self, stage: str) -> tuple:
        """The names of the facts the rules of ``stage`` test."""
        return tuple(sorted({leaf["fact"] for rule in self.stage(stage) for leaf in conditions.leaves(rule.condition)}))

    def _read_values(self, stage: str, facts: dict) -> tuple:
        engine = self.engine(stage)
        values = tuple(map(facts.get, engine.plain_reads))
        if list in map(type, values):  # lists (codes) are not hashable
            values = tuple(tuple(v) if type(v) is list else v for v in values)
        # The types go into the key too: True == 1 in Python, not to a rule.
        return values, tuple(map(type, values)), engine.text_outcomes(facts)

    def explain(self, stage: str, facts: dict) -> list[dict]:
        fired = set(self.engine(stage).matching(facts))
        normalized = conditions.normalize(facts)
        return [
            {
                "rule_id": r.id,
                "matched": r.id in fired,
                "failed_conditions": [] if r.id in fired else conditions.failed_conditions(r.condition, normalized),
            }
            for r in self.stage(stage)
        ]

    def close(self):
        for compiled in self._compiled.values():
            compiled.close()
        self._compiled.clear()
        self._fired.clear()


def settings_checker(folder: str, spec: dict):
    """A ``settings_check`` for ``load``: ``spec`` maps each setting to ``(kind, minimum, maximum)``
    with kind ``int`` or ``number``; every setting is required and no other is allowed."""

    def check(settings: dict):
        for name, (kind, minimum, maximum) in spec.items():
            if name not in settings:
                yield (folder, 1, f"setting {name!r} is missing (policy.yaml)")
                continue
            value, file, line = settings[name]
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not is_number or (kind == "int" and not isinstance(value, int)) or not minimum <= value <= maximum:
                whole = "whole " if kind == "int" else ""
                yield (file, line, f"{name} must be a {whole}number from {minimum:g} to {maximum:g}")
        for name, (_, file, line) in settings.items():
            if name not in spec:
                yield (file, line, f"unknown setting {name!r}; known: {', '.join(spec)}")

    return check


def is_test_file(path: Path) -> bool:
    """``*.test.yaml`` files hold rule tests (``huiying rules test``), not rules."""
    return path.name.endswith(".test.yaml")


def content_version(directory: Path) -> tuple[str, dict]:
    files = sorted(p for p in Path(directory).rglob("*.yaml") if p.is_file())[: MAX_FILES + 1]
    digest = hashlib.sha256()
    hashes = {}
    for path in files:
        data = path.read_bytes() if path.stat().st_size <= yamlfile.MAX_FILE_BYTES else b"<too large>"
        relative = str(path.relative_to(directory))
        hashes[relative] = hashlib.sha256(data).hexdigest()[:12]
        digest.update(relative.encode() + b"\0" + data + b"\0")
    return digest.hexdigest()[:12], hashes


def load(
    directory,
    name: str,
    facts: dict[str, Fact],
    actions: dict[str, Action],
    stages: tuple[str, ...],
    settings_check=None,
) -> Ruleset:
    """Load and validate every ``*.yaml`` under ``directory``; raise ``RulesetInvalid`` with all problems."""
    directory = Path(directory)
    problems: list[Problem] = []
    if not directory.is_dir():
        raise RulesetInvalid([Problem(str(directory), 1, "rules folder not found")])
    paths = sorted(p for p in directory.rglob("*.yaml") if p.is_file() and not is_test_file(p))
    if len(paths) > MAX_FILES:
        raise RulesetInvalid([Problem(str(directory), 1, f"more than {MAX_FILES} rule files")])
    rules: list[Rule] = []
    settings: dict = {}
    seen_ids: dict[str, str] = {}
    for path in paths:
        try:
            document = yamlfile.load(path)
        except yamlfile.YamlFileError as exc:
            problems.append(Problem(exc.path, exc.line, exc.message))
            continue
        _load_file(path, document, facts, actions, stages, rules, settings, seen_ids, problems)
    if settings_check and not problems:
        for line_file, line, message in settings_check(settings):
            problems.append(Problem(line_file, line, message))
    if problems:
        raise RulesetInvalid(problems)
    version, hashes = content_version(directory)
    clean_settings = {k: v for k, (v, _, _) in settings.items()}
    loaded = Ruleset(name=name, version=version, rules=rules, settings=clean_settings, files=hashes)
    _compile_now(loaded, stages)
    return loaded


def _compile_now(loaded: Ruleset, stages) -> None:
    """Give every stage to durable_rules now: a condition it cannot compile (a regular expression
    too large for its automaton, ``a{1,300}``) refuses the folder, instead of failing every
    decision once the new version has replaced the running one."""
    failed = []
    for stage in stages:
        try:
            loaded.engine(stage)
        except RulesEngineError:
            failed.append(stage)
    if not failed:
        return
    loaded.close()
    # Rare: find the rules at fault, one at a time (each trial costs durable a little memory).
    problems = []
    for rule in (r for r in loaded.rules if r.stage in failed):
        try:
            CompiledRules(f"{loaded.name}.check", {rule.id: rule.condition}).close()
        except RulesEngineError as exc:
            problems.append(Problem(rule.file, rule.line, f"rule {rule.id}: {_engine_refusal(rule, exc)}"))
    raise RulesetInvalid(problems or [Problem(loaded.name, 1, f"durable_rules cannot compile stage(s) {failed}")])


def _engine_refusal(rule: Rule, exc: Exception) -> str:
    code = str(exc).rsplit("error code:", 1)[-1].strip()
    for leaf in conditions.leaves(rule.condition):
        try:
            CompiledRules("check", {"r": leaf}).close()
        except RulesEngineError:
            hint = (
                "; make the regular expression simpler (e.g. no long {m,n} repetitions)"
                if leaf["op"] == "matches"
                else ""
            )
            described = conditions.describe(leaf)
            described = described if len(described) <= 160 else described[:159] + "…"
            return f"durable_rules cannot run the condition {described} (error {code}){hint}"
    return f"durable_rules cannot compile this condition (error {code})"


def _load_file(path, document, facts, actions, stages, rules, settings, seen_ids, problems):
    file = str(path)

    def problem(line, message):
        problems.append(Problem(file, line, message))

    if document is None:
        return
    if not isinstance(document, dict):
        return problem(1, "a rule file is a mapping with stage, rules and settings")
    unknown = set(document) - {"stage", "rules", "settings", "description", "tests"}
    for key in sorted(unknown, key=str):
        problem(line_of(document, key), f"unknown key {key!r}; a rule file has stage, rules, settings, description")
    stage = document.get("stage")
    rule_list = document.get("rules") or []
    if rule_list and stage not in stages:
        problem(line_of(document, "stage"), f"stage must be one of {', '.join(stages)}; got {stage!r}")
        return
    if not isinstance(rule_list, list):
        return problem(line_of(document, "rules"), "rules is a list")
    for index, entry in enumerate(rule_list):
        rule = _load_rule(entry, line_of(rule_list, index), stage, facts, actions, problem)
        if rule is None:
            continue
        if rule.id in seen_ids:
            problem(rule.line, f"duplicate rule id {rule.id!r} (first in {seen_ids[rule.id]})")
            continue
        seen_ids[rule.id] = f"{file}:{rule.line}"
        rule.file = file
        rules.append(rule)
    file_settings = document.get("settings") or {}
    if not isinstance(file_settings, dict):
        return problem(line_of(document, "settings"), "settings is a mapping of names to values")
    for key, value in file_settings.items():
        if key in settings:
            problem(line_of(file_settings, key), f"setting {key!r} is also set in {settings[key][1]}")
        settings[key] = (value, file, line_of(file_settings, key))


def _load_rule(entry, line, stage, facts, actions, problem) -> Rule | None:
    if not isinstance(entry, dict):
        problem(line, "a rule is a mapping with id, description, when, then")
        return None
    for key in sorted(set(entry) - {"id", "description", "priority", "when", "then"}, key=str):
        problem(line_of(entry, key), f"unknown key {key!r} in a rule; use id, description, priority, when, then")
    rule_id = entry.get("id")
    if not isinstance(rule_id, str) or not rule_id.strip():
        problem(line, "rule needs an id (text)")
        return None
    priority = entry.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        problem(line_of(entry, "priority"), f"rule {rule_id}: priority must be a whole number")
        return None
    if "when" not in entry:
        problem(line, f"rule {rule_id}: missing 'when' (use 'when: {{all: []}}' for always)")
        return None
    errors: list = []
    condition = conditions.parse(entry["when"], facts, errors)
    for error in errors:
        problem(error.line, f"rule {rule_id}: {error.message}")
    parsed_actions = _load_actions(entry.get("then"), line_of(entry, "then", line), rule_id, stage, actions, problem)
    if errors or parsed_actions is None:
        return None
    description = entry.get("description") or ""
    return Rule(rule_id, stage, str(description), priority, condition, parsed_actions, "", line)


def _load_actions(then, line, rule_id, stage, actions, problem):
    if not isinstance(then, list) or not then:
        problem(line, f"rule {rule_id}: 'then' must be a non-empty list of actions")
        return None
    parsed, ok = [], True
    for index, item in enumerate(then):
        item_line = line_of(then, index)
        if not isinstance(item, dict) or len(item) != 1:
            problem(item_line, f"rule {rule_id}: each action is one mapping such as 'refer_to: {{department: X}}'")
            ok = False
            continue
        ((name, params),) = item.items()
        spec = actions.get(name)
        if spec is None:
            problem(item_line, f"rule {rule_id}: unknown action {name!r}; allowed: {', '.join(sorted(actions))}")
            ok = False
            continue
        if spec.stage != stage:
            problem(item_line, f"rule {rule_id}: action {name!r} belongs in stage {spec.stage!r}, not {stage!r}")
            ok = False
            continue
        checked = _check_params(spec, params if params is not None else {}, item_line, rule_id, problem)
        if checked is None:
            ok = False
            continue
        parsed.append((name, checked))
    return parsed if ok else None


def _check_params(spec: Action, params, line, rule_id, problem):
    if not isinstance(params, dict):
        problem(line, f"rule {rule_id}: {spec.name} takes a mapping of parameters")
        return None
    ok = True
    for key in params:
        if key not in spec.params:
            problem(
                line_of(params, key, line),
                f"rule {rule_id}: {spec.name} has no parameter {key!r}; it takes {', '.join(spec.params)}",
            )
            ok = False
    for key, param in spec.params.items():
        if key not in params:
            if param.required and key not in spec.one_of:
                problem(line, f"rule {rule_id}: {spec.name} needs {key}")
                ok = False
            continue
        value = params[key]
        if not _type_ok(param, value):
            problem(
                line_of(params, key, line),
                f"rule {rule_id}: {spec.name}.{key} must be {_type_name(param)}, got {value!r}",
            )
            ok = False
    if spec.one_of and sum(k in params for k in spec.one_of) != 1:
        problem(line, f"rule {rule_id}: {spec.name} takes exactly one of {', '.join(spec.one_of)}")
        ok = False
    return dict(params) if ok else None


def _type_ok(param: Param, value) -> bool:
    if param.type == "bool":
        return isinstance(value, bool)
    if param.type in ("int", "number"):
        if isinstance(value, bool) or not isinstance(value, int if param.type == "int" else (int, float)):
            return False
        return param.minimum is None or value >= param.minimum
    return isinstance(value, str) and bool(value.strip())


def _type_name(param: Param) -> str:
    names = {"bool": "true or false", "int": "a whole number", "number": "a number", "code": "a code", "text": "text"}
    suffix = f" ≥ {param.minimum:g}" if param.minimum is not None else ""
    return names[param.type] + suffix
