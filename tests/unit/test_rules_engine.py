"""The durable_rules adapter: every trap of durable-rules 2.0.28 engineered around, and the engine
agreeing with the plain-Python reading of the same conditions on generated rules and facts."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.rules.conditions import Fact, evaluate, normalize, parse
from services.common.rules.engine import CompiledRules

FACTS = {
    f.name: f
    for f in [
        Fact("category", "code"),
        Fact("street", "code"),
        Fact("text", "text"),
        Fact("days", "number"),
        Fact("departments", "codes"),
        Fact("overdue", "bool"),
    ]
}
CODES = ["traffic", "water", "pinghu", "buji", "a", "b"]
WORDS = ["拥堵", "路灯", "AED", "a.b", "50%", "(x)", "海吉星"]


def compiled(rules: dict) -> CompiledRules:
    parsed = {}
    for rule_id, condition in rules.items():
        errors = []
        parsed[rule_id] = parse(condition, FACTS, errors)
        assert not errors, [e.message for e in errors]
    return CompiledRules("test", parsed)


def test_every_matching_rule_fires_not_only_the_first():
    rules = compiled(
        {
            "by-category": {"fact": "category", "eq": "traffic"},
            "by-street": {"fact": "street", "eq": "pinghu"},
            "by-text": {"fact": "text", "contains": "拥堵"},
        }
    )
    assert rules.matching({"category": "traffic", "street": "pinghu", "text": "严重拥堵"}) == [
        "by-category",
        "by-street",
        "by-text",
    ]


def test_rules_about_missing_facts_do_not_match_durables_own_session_state():
    rules = compiled({"no-street": {"fact": "street", "exists": False}})
    assert rules.matching({"category": "traffic", "street": "pinghu"}) == []
    assert rules.matching({"category": "traffic"}) == ["no-street"]


def test_many_evaluations_keep_one_session_and_flat_memory():
    rules = compiled({"r": {"fact": "days", "ge": 5}, "never": {"fact": "category", "eq": "zzz"}})

    def rss_mb():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * 4096 / 2**20

    for i in range(2_000):  # warm-up; then far more than durable's 1024-session limit
        rules.matching({"days": i, "category": f"c{i}"})
    before = rss_mb()
    for i in range(30_000):
        assert rules.matching({"days": i % 10, "category": f"c{i}"}) == (["r"] if i % 10 >= 5 else [])
    assert rss_mb() - before < 5


def test_a_fact_that_matches_nothing_is_harmless():
    rules = compiled({"r": {"fact": "category", "eq": "traffic"}})
    for _ in range(100):  # delete_state on such a session would segfault; we never call it
        assert rules.matching({"category": "other"}) == []


def test_versions_with_the_same_name_coexist_and_close():
    first = compiled({"r": {"fact": "category", "eq": "a"}})
    second = compiled({"r": {"fact": "category", "eq": "b"}})
    assert first.matching({"category": "a"}) == ["r"] and second.matching({"category": "a"}) == []
    first.close()
    assert second.matching({"category": "b"}) == ["r"]
    assert first.matching({"category": "a"}) == []  # a closed version decides nothing


def test_regular_expressions_are_validated_before_durable_sees_them():
    for pattern, problem in [
        ("(", "invalid regular expression"),
        ("^a", "anchors"),
        ("(?=a)", "not supported"),
        ("[^a]", "negated"),
        ("a*?", "lazy"),
        (r"\bword", "unsupported escape"),
    ]:
        errors = []
        parse({"fact": "text", "matches": pattern}, FACTS, errors)
        assert errors and problem in errors[0].message, (pattern, errors)


def test_not_over_a_text_match_is_refused_with_the_reason():
    errors = []
    parse({"not": {"fact": "text", "contains": "x"}}, FACTS, errors)
    assert "no negated text match" in errors[0].message


# --- the engine against the plain-Python reading, on generated rules and facts --------------

leaf = st.one_of(
    st.builds(
        lambda f, op, v: {"fact": f, op: v},
        st.sampled_from(["category", "street"]),
        st.sampled_from(["eq", "ne"]),
        st.sampled_from(CODES),
    ),
    st.builds(
        lambda f, op, v: {"fact": f, op: v},
        st.sampled_from(["category", "street"]),
        st.sampled_from(["in", "not_in"]),
        st.lists(st.sampled_from(CODES), min_size=1, max_size=3),
    ),
    st.builds(
        lambda op, v: {"fact": "days", op: v},
        st.sampled_from(["eq", "ne", "lt", "le", "gt", "ge"]),
        st.integers(-2, 12) | st.floats(-2, 12, allow_nan=False),
    ),
    st.builds(lambda v: {"fact": "overdue", "eq": v}, st.booleans()),
    st.builds(lambda f, v: {"fact": f, "exists": v}, st.sampled_from(list(FACTS)), st.booleans()),
    st.builds(
        lambda op, v: {"fact": "departments", op: v}, st.sampled_from(["includes", "excludes"]), st.sampled_from(CODES)
    ),
    st.builds(
        lambda v: {"fact": "departments", "includes_any": v}, st.lists(st.sampled_from(CODES), min_size=1, max_size=3)
    ),
)
text_leaf = st.one_of(
    st.builds(lambda v: {"fact": "text", "contains": v}, st.sampled_from(WORDS)),
    st.builds(lambda v: {"fact": "text", "contains_any": v}, st.lists(st.sampled_from(WORDS), min_size=1, max_size=3)),
    st.builds(
        lambda v: {"fact": "text", "matches": v},
        st.sampled_from([r"拥堵|路灯", r"\d{3}", r"a\.b", r"[0-9]+%", r"(?:海吉|AE)[星D]", r"\(x\)", r"路.", r"\s"]),
    ),
)


def conditions(allow_text=True):
    base = leaf | text_leaf if allow_text else leaf
    return st.recursive(
        base,
        lambda inner: st.one_of(
            st.builds(lambda parts: {"all": parts}, st.lists(inner, max_size=3)),
            st.builds(lambda parts: {"any": parts}, st.lists(inner, max_size=3)),
        ),
        max_leaves=6,
    )


negatable = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.builds(lambda p: {"all": p}, st.lists(inner, max_size=3)),
        st.builds(lambda p: {"any": p}, st.lists(inner, max_size=3)),
        st.builds(lambda p: {"not": p}, inner),
    ),
    max_leaves=6,
)
fact_values = st.fixed_dictionaries(
    {},
    optional={
        "category": st.sampled_from(CODES),
        "street": st.sampled_from(CODES),
        "text": st.text(st.sampled_from("拥堵路灯海吉星AEDab.%()x 0123\n\t\x0b\x0c"), max_size=12),
        "days": st.integers(-3, 14)
        | st.floats(-3, 14, allow_nan=False)
        | st.floats(-1e20, 1e20, allow_nan=False)
        | st.integers(-(10**14), 10**14),
        "departments": st.lists(st.sampled_from(CODES), max_size=3),
        "overdue": st.booleans(),
    },
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rules=st.lists(conditions() | st.builds(lambda n: n, negatable), min_size=1, max_size=4),
    samples=st.lists(fact_values, min_size=1, max_size=6),
)
def test_engine_agrees_with_plain_python(rules, samples):
    parsed = {}
    for index, condition in enumerate(rules):
        errors = []
        parsed[f"rule-{index}"] = parse(condition, FACTS, errors)
        assert not errors
    engine = CompiledRules("property", parsed)
    try:
        for facts in samples:
            expected = [rule_id for rule_id, tree in parsed.items() if evaluate(tree, normalize(facts))]
            assert engine.matching(facts) == expected, (facts, rules)
    finally:
        engine.close()


@pytest.mark.parametrize("text, expected", [("a.b", True), ("aXb", False), ("50%", True), ("(x)", True)])
def test_literal_text_with_regex_characters_is_matched_literally(text, expected):
    rules = compiled({"r": {"fact": "text", "contains_any": ["a.b", "50%", "(x)"]}})
    assert (rules.matching({"text": text}) == ["r"]) is expected


def test_remembered_answers_are_durables_for_every_combination_of_the_facts_read():
    from itertools import product

    from services.common.rules.ruleset import Rule, Ruleset

    conditions_by_id = {
        "overdue-traffic": {"all": [{"fact": "overdue", "eq": True}, {"fact": "category", "eq": "traffic"}]},
        "long": {"fact": "days", "ge": 5},
    }
    rules = []
    for rule_id, condition in conditions_by_id.items():
        errors = []
        rules.append(Rule(rule_id, "s", "", 0, parse(condition, FACTS, errors), [], "f.yaml", 1))
    ruleset = Ruleset("test", "v1", rules, {})
    assert ruleset.reads("s") == ("category", "days", "overdue")
    engine = ruleset.engine("s")
    for overdue, category, days, street in product([True, False, 1, None], ["traffic", "water"], [1, 5, 5.0], CODES):
        facts = {"overdue": overdue, "category": category, "days": days, "street": street}
        # Asked twice: the second answer is the remembered one, and both are durable's own.
        for _ in range(2):
            assert [r.id for r in ruleset.fire("s", facts)] == engine.matching(facts), facts
    assert len(ruleset._fired) == 4 * 2 * 3  # street is read by no rule: it does not multiply the asking
    ruleset.close()


def test_texts_are_remembered_by_their_tests_outcomes_not_by_their_wording():
    """No two citizens word a case alike: keyed by the text itself, durable was asked for every
    case. Texts with the same outcomes of every text test share one answer, and it is durable's."""
    from services.common.rules.ruleset import Rule, Ruleset

    conditions_by_id = {
        "lights": {"all": [{"fact": "text", "contains_any": ["路灯", "照明"]}, {"fact": "category", "eq": "roads"}]},
        "noise": {"fact": "text", "matches": r"噪音|施工"},
        "here": {"fact": "street", "eq": "buji"},
    }
    rules = []
    for rule_id, condition in conditions_by_id.items():
        errors = []
        rules.append(Rule(rule_id, "s", "", 0, parse(condition, FACTS, errors), [], "f.yaml", 1))
        assert not errors, errors
    ruleset = Ruleset("test", "v1", rules, {})
    engine = ruleset.engine("s")
    asked = []
    matching = engine.matching
    engine.matching = lambda facts: asked.append(facts) or matching(facts)
    texts = [
        f"第{i}号楼{thing}，联系电话139{i:08d}"
        for i in range(50)
        for thing in ("路灯不亮", "夜间施工噪音", "照明坏了", "漏水")
    ]
    for text in texts:
        for category in ("roads", "water"):
            facts = {"text": text, "category": category, "street": "buji"}
            assert [r.id for r in ruleset.fire("s", facts)] == matching(facts), facts
    # 2 categories × the outcomes met (lights, noise, neither), not 400 texts.
    assert len(asked) == 2 * 3
    assert [r.id for r in ruleset.fire("s", {"text": "路灯", "category": "roads", "street": "pinghu"})] == ["lights"]
    assert len(asked) == 2 * 3 + 1  # another street is another combination
    ruleset.close()


@pytest.mark.parametrize(
    "condition, text",
    [
        ({"fact": "text", "matches": r"\d\d"}, "0001"),
        ({"fact": "text", "matches": r"\d{3}"}, "00001"),
        ({"fact": "text", "contains": "拥堵拥"}, "拥堵拥堵"),
        ({"fact": "text", "contains_any": ["路灯", "拥堵拥"]}, "拥拥堵拥堵"),
    ],
)
def test_text_tests_durables_automaton_gets_wrong_are_right(condition, text):
    """durable_rules' own regular-expression automaton says no to each of these; the adapter
    makes text tests itself (RE2) and gives durable the outcome."""
    rules = compiled({"r": condition})
    assert rules.matching({"text": text}) == ["r"]
    assert rules.matching({"text": text[:1]}) == []
