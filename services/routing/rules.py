"""Routing's rules: the facts its rule files may test, the actions they may take, and how the
four stages (classify → kind → assign → deadline) turn a case into a routing decision.

Which category, kind, department and deadline a case gets is decided by durable_rules from the
files in ``rules/routing/``; this module only says how the results of each stage combine:
single-valued settings go to the highest-priority matching rule (ties: file order), departments
are the union of every matching rule's, minus those that returned the case.
"""

from dataclasses import dataclass, field
from pathlib import Path

from services.common.rules import ruleset
from services.common.rules.conditions import Fact
from services.common.rules.ruleset import Action, Param

STAGES = ("classify", "kind", "assign", "deadline")
KINDS = ("proposal", "consultation_topic", "public_opinion", "referral")
URGENCIES = ("normal", "urgent")

FACTS = {
    f.name: f
    for f in [
        Fact("source", "text", "the channel's id, e.g. hotline-12345"),
        Fact("channel", "code", "http, open311, amqp, import, cli"),
        Fact("category", "code", "the category code (from the channel, or set by classify rules)"),
        Fact("street", "code", "street code"),
        Fact("sector", "code", "sector code"),
        Fact("workstation", "code", "member workstation code"),
        Fact("kind", "code", "proposal, consultation_topic, public_opinion, referral"),
        Fact("urgency", "code", "normal or urgent"),
        Fact("title", "text", "the case title"),
        Fact("description", "text", "the case description"),
        Fact("text", "text", "title and description together"),
        Fact("residents_affected", "number", "residents affected, where known"),
        Fact("returned_by", "codes", "departments that returned the case"),
        Fact("reopen_count", "number", "times the citizen's dissatisfaction reopened the case"),
    ]
}

ACTIONS = {
    a.name: a
    for a in [
        Action("set_category", "classify", {"category": Param("code")}),
        Action("set_urgency", "classify", {"urgency": Param("code")}),
        Action("set_kind", "kind", {"kind": Param("code")}),
        Action("refer_to", "assign", {"department": Param("code"), "lead": Param("bool", required=False)}),
        Action(
            "set_deadline",
            "deadline",
            {"working_days": Param("int", minimum=1), "months": Param("int", minimum=1)},
            one_of=("working_days", "months"),
        ),
    ]
}

SETTINGS = {
    "return_window_working_days": ("int", 1, 60),
    "max_extension_working_days": ("int", 1, 250),
}


def load(directory: Path) -> ruleset.Ruleset:
    loaded = ruleset.load(
        Path(directory) / "routing",
        "routing",
        FACTS,
        ACTIONS,
        STAGES,
        ruleset.settings_checker("rules/routing", SETTINGS),
    )
    problems = []
    for rule in loaded.rules:
        for name, params in rule.actions:
            if name == "set_kind" and params["kind"] not in KINDS:
                problems.append(
                    ruleset.Problem(rule.file, rule.line, f"rule {rule.id}: kind must be one of {', '.join(KINDS)}")
                )
            if name == "set_urgency" and params["urgency"] not in URGENCIES:
                problems.append(
                    ruleset.Problem(rule.file, rule.line, f"rule {rule.id}: urgency must be normal or urgent")
                )
    if problems:
        raise ruleset.RulesetInvalid(problems)
    return loaded


@dataclass
class Decision:
    category: str | None
    urgency: str
    kind: str
    departments: list[str]
    lead: str | None
    deadline: dict | None  # {"working_days": n} or {"months": n}
    rule_ids: list[str] = field(default_factory=list)
    ruleset_version: str = ""

    @property
    def routable(self) -> bool:
        return bool(self.departments) and self.deadline is not None


def case_facts(case: dict) -> dict:
    title, description = case.get("title") or "", case.get("description") or ""
    return {
        "source": case.get("source"),
        "channel": case.get("channel"),
        "category": case.get("category"),
        "street": case.get("street"),
        "sector": case.get("sector"),
        "workstation": case.get("workstation"),
        "kind": case.get("kind"),
        "urgency": case.get("urgency"),
        "title": title,
        "description": description,
        "text": f"{title}\n{description}",
        "residents_affected": case.get("residents_affected"),
        "returned_by": list(case.get("returned_by") or []),
        "reopen_count": case.get("reopen_count") or 0,
    }


def decide(rules: ruleset.Ruleset, case: dict, known_departments: set[str] | None = None) -> Decision:
    facts = case_facts(case)
    fired: list[str] = []

    def first(stage, action, param):
        for rule in rules.fire(stage, facts):
            for name, params in rule.actions:
                if name == action:
                    fired.append(rule.id)
                    return params[param]
        return None

    facts["category"] = facts["category"] or first("classify", "set_category", "category")
    facts["urgency"] = facts["urgency"] or first("classify", "set_urgency", "urgency") or "normal"
    facts["kind"] = facts["kind"] or first("kind", "set_kind", "kind") or "referral"

    departments, lead = [], None
    for rule in rules.fire("assign", facts):
        for name, params in rule.actions:
            if name != "refer_to":
                continue
            department = params["department"]
            if department in facts["returned_by"] or department in departments:
                continue
            if known_departments is not None and department not in known_departments:
                continue  # a rule naming a department the directory lacks must not strand the case
            departments.append(department)
            if params.get("lead") and lead is None:
                lead = department
            if rule.id not in fired:
                fired.append(rule.id)
    if departments and lead is None:
        lead = departments[0]
    if lead:
        departments.remove(lead)
        departments.insert(0, lead)

    deadline = None
    for rule in rules.fire("deadline", facts):
        for name, params in rule.actions:
            if name == "set_deadline" and deadline is None:
                deadline = dict(params)
                fired.append(rule.id)
    return Decision(
        facts["category"], facts["urgency"], facts["kind"], departments, lead, deadline, fired, rules.version
    )
