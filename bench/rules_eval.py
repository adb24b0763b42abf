"""Rule evaluations per second, for the default supervision rules on generated case facts:
through our adapter as the services use it (``Ruleset.fire``, which asks durable_rules once per
distinct combination of the facts the rules read), through the adapter asking durable every time
(``CompiledRules.matching``), raw durable_rules asserting and retracting the same facts (the C
engine, nothing of ours around it), and a plain-Python reading of the same conditions.

    .venv/bin/python -m bench.rules_eval [--facts 20000]
"""

import argparse
import json
import random
import time

import durable_rules_engine

from services.common.rules import conditions
from services.common.rules.provider import with_calendar
from services.supervision import rules as supervision_rules
from tests.support import DEMO_DIRECTORY

RULES_DIR = DEMO_DIRECTORY.parent.parent / "rules"
STREETS = ["pinghu", "buji", "bantian", "nanwan", "henggang", "longcheng"]
CATEGORIES = ["traffic", "urban_management", "environment", "housing", "education"]


def generated_facts(count: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    facts = []
    for i in range(count):
        overdue = max(0, rng.randint(-8, 12))
        facts.append(
            {
                "status": rng.choice(["referred", "referred", "reopened", "replied", "triage"]),
                "unresolved": True,
                "kind": rng.choice(["referral", "proposal", "public_opinion"]),
                "category": rng.choice(CATEGORIES),
                "street": rng.choice(STREETS),
                "source": "hotline-12345",
                "title": f"路灯不亮 {i}",
                "departments": rng.sample(["cgj", "jtglj", "jjdd", "zjj", "sthjj"], rng.randint(1, 3)),
                "department_count": rng.randint(1, 4),
                "lead_department": "cgj",
                "returns": rng.choice([0, 0, 0, 1, 2]),
                "extensions": rng.choice([0, 0, 1]),
                "reopen_count": rng.choice([0, 0, 1]),
                "unsatisfied_count": rng.choice([0, 0, 1, 2]),
                "last_rating": rng.choice([None, "满意", "不满意"]),
                "residents_affected": rng.choice([None, 50, 20000]),
                "on_agenda": rng.random() < 0.1,
                "similar_unresolved_count": rng.choice([1, 1, 2, 5, 11]),
                "working_days_overdue": overdue,
                "working_days_since_referral": rng.randint(0, 40),
                "working_days_to_deadline": -overdue if overdue else rng.randint(0, 10),
            }
        )
    return facts


def backlog_facts(count: int, seed: int = 7) -> list[dict]:
    """Facts as a daily sweep of a large backlog meets them (bench/sweep.py's cases): the numbers
    the rules read fall in narrow ranges, so combinations repeat."""
    rng = random.Random(seed)
    facts = generated_facts(count, seed)
    for f in facts:
        f.update(
            returns=rng.choice([0] * 19 + [1]),
            unsatisfied_count=rng.choice([0] * 19 + [1]),
            department_count=1,
            residents_affected=None,
            similar_unresolved_count=rng.choice([1] * 7 + list(range(2, 7))),
            working_days_since_referral=rng.randint(0, 14),
            working_days_to_deadline=rng.randint(-14, 45),
        )
        f["working_days_overdue"] = max(0, -f["working_days_to_deadline"])
    return facts


def rate(run, items) -> float:
    started = time.perf_counter()
    for item in items:
        run(item)
    return len(items) / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=20000)
    args = parser.parse_args()
    loaded = with_calendar(supervision_rules.load)(RULES_DIR)
    ruleset = loaded.rules
    rules = ruleset.stage("escalate")
    facts = generated_facts(args.facts)

    adapter = rate(lambda f: ruleset.fire("escalate", f), facts)
    engine = ruleset.engine("escalate")
    adapter_every_time = rate(engine.matching, facts)
    distinct = len({ruleset._read_values("escalate", f) for f in facts})
    backlog = backlog_facts(args.facts)
    adapter_backlog = rate(lambda f: ruleset.fire("escalate", f), backlog)
    distinct_backlog = len({ruleset._read_values("escalate", f) for f in backlog})

    # Raw durable_rules: the same compiled ruleset, facts already encoded as the engine takes them.
    handle = engine._handle
    bodies = []
    for i, f in enumerate(facts):
        fact = {k: (v + [""] if isinstance(v, list) else v) for k, v in conditions.normalize(f).items()}
        bodies.append(json.dumps({**fact, conditions.MARKER: 1, "id": i + 10_000_000, "sid": "0"}, ensure_ascii=False))

    def raw(body):
        result = durable_rules_engine.assert_fact(handle, body)
        if result[0] == 0:  # something matched: take every action, as the adapter does
            pending = durable_rules_engine.start_action_for_state(handle, result[1])
            message = pending[1] if pending else None
            while message:
                message = durable_rules_engine.complete_and_start_action(handle, result[1])
        durable_rules_engine.retract_fact(handle, body)

    raw_durable = rate(raw, bodies)

    normalized = [conditions.normalize(f) for f in facts]
    plain = rate(lambda f: [r.id for r in rules if conditions.evaluate(r.condition, f)], normalized)

    # The adapter and plain Python must agree, or the figures mean nothing.
    sample = facts[:2000]
    agree = all(
        {r.id for r in ruleset.fire("escalate", f)}
        == {r.id for r in rules if conditions.evaluate(r.condition, conditions.normalize(f))}
        for f in sample
    )
    print(
        json.dumps(
            {
                "facts": len(facts),
                "rules": len(rules),
                "distinct_combinations_of_facts_read": distinct,
                "adapter_per_s": round(adapter),
                "adapter_asking_durable_every_time_per_s": round(adapter_every_time),
                "backlog_facts_distinct_combinations": distinct_backlog,
                "adapter_on_backlog_facts_per_s": round(adapter_backlog),
                "adapter_on_backlog_facts_to_raw_durable": round(adapter_backlog / raw_durable, 3),
                "raw_durable_per_s": round(raw_durable),
                "plain_python_per_s": round(plain),
                "adapter_to_raw_durable": round(adapter / raw_durable, 3),
                "adapter_to_plain_python": round(adapter / plain, 3),
                "adapter_every_time_to_raw_durable": round(adapter_every_time / raw_durable, 3),
                "adapter_agrees_with_plain_python": agree,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
