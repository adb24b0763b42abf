"""Supervision's rules: the facts its rule files may test and the escalations they may order.

Every escalation decision is durable_rules' (through the adapter) on the files in
``rules/supervision/``; this module only lists the vocabulary and checks the settings.
"""

from pathlib import Path

from services.common.rules import ruleset
from services.common.rules.conditions import Fact
from services.common.rules.ruleset import Action, Param

STAGES = ("escalate",)
SCOPES = ("case", "cluster")

FACTS = {
    f.name: f
    for f in [
        Fact("status", "code", "received, referred, triage, replied, reopened, closed"),
        Fact("unresolved", "bool", "not closed yet"),
        Fact("kind", "code", "proposal, consultation_topic, public_opinion, referral"),
        Fact("category", "code", "category code"),
        Fact("street", "code", "street code"),
        Fact("source", "text", "the channel's id"),
        Fact("title", "text", "the case title"),
        Fact("departments", "codes", "every department the case was referred to"),
        Fact("department_count", "number", "how many departments the case involves"),
        Fact("lead_department", "code", "the lead (主办) department"),
        Fact("working_days_since_referral", "number", "working days since the first referral"),
        Fact("working_days_to_deadline", "number", "working days to the nearest open deadline (0: today, <0: passed)"),
        Fact("working_days_overdue", "number", "working days past the most overdue open deadline (0 when none)"),
        Fact("returns", "number", "times a department returned the case (退回)"),
        Fact("extensions", "number", "extension requests (延期)"),
        Fact("reopen_count", "number", "times an unsatisfied rating reopened the case (重办)"),
        Fact("unsatisfied_count", "number", "不满意 ratings"),
        Fact("last_rating", "code", "满意, 基本满意 or 不满意"),
        Fact("residents_affected", "number", "residents affected, where known"),
        Fact("on_agenda", "bool", "already linked to a democratic-supervision agenda item"),
        Fact(
            "similar_unresolved_count",
            "number",
            "unresolved similar cases (same category and street, within the window, similar text), itself included",
        ),
    ]
}

ACTIONS = {
    a.name: a
    for a in [
        Action("add_to_agenda", "escalate", {"scope": Param("code", required=False)}),
        Action("open_joint_supervision", "escalate", {"scope": Param("code", required=False)}),
        Action("trigger_special_inspection", "escalate", {"scope": Param("code", required=False)}),
        Action("remind_department", "escalate", {}),
        Action("alert_supervisors", "escalate", {}),
    ]
}

SETTINGS = {
    "cluster_window_days": ("int", 1, 366),
    "cluster_similarity": ("number", 0, 1),  # share of shared two-character words
    "sweep_interval_seconds": ("int", 5, 86400),
    "sweep_lease_seconds": ("int", 2, 86400),
}


def load(directory: Path) -> ruleset.Ruleset:
    loaded = ruleset.load(
        Path(directory) / "supervision",
        "supervision",
        FACTS,
        ACTIONS,
        STAGES,
        ruleset.settings_checker("rules/supervision", SETTINGS),
    )
    problems = [
        ruleset.Problem(rule.file, rule.line, f"rule {rule.id}: scope must be case or cluster")
        for rule in loaded.rules
        for name, params in rule.actions
        if params.get("scope", "case") not in SCOPES
    ]
    if problems:
        raise ruleset.RulesetInvalid(problems)
    return loaded
