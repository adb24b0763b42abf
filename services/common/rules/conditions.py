"""The condition language of rule files.

A condition is a tree::

    all: [ ... ]            every part holds (an empty list always holds)
    any: [ ... ]            at least one part holds
    not: { ... }            the part does not hold
    {fact: NAME, OP: VALUE} a comparison on one fact

Operators by fact type:
    code / text:  eq, ne, in, not_in, exists; text also contains, contains_any, matches
    number:       eq, ne, lt, le, gt, ge, in, not_in, exists
    bool:         eq, ne, exists
    codes (list): includes, includes_any, excludes, exists

Semantics (the same in durable_rules and in ``evaluate`` below): a comparison on a fact that is
missing is false; ``not`` is plain negation. ``not`` cannot contain a text match (``contains``,
``contains_any``, ``matches``): write the positive rule instead. ``matches`` takes a Python-style
regular expression from a subset (literals, ``.``, classes, ``* + ? {m,n}`` up to 1000, ``|``,
groups, ``\\d \\w \\s`` as ASCII classes) and is true when the expression is found anywhere in
the text. Text tests are made by ``text_test`` (RE2: linear time whatever the pattern); the
engine adapter hands durable_rules their outcome (engine.py says why).
"""

import functools
import re
from dataclasses import dataclass

import re2

from services.common.rules.yamlfile import line_of

MAX_DEPTH = 12
TYPES = ("code", "text", "number", "bool", "codes")
OPERATORS = {
    "eq": ("code", "text", "number", "bool"),
    "ne": ("code", "text", "number", "bool"),
    "lt": ("number",),
    "le": ("number",),
    "gt": ("number",),
    "ge": ("number",),
    "in": ("code", "text", "number"),
    "not_in": ("code", "text", "number"),
    "contains": ("text",),
    "contains_any": ("text",),
    "matches": ("text",),
    "exists": TYPES,
    "includes": ("codes",),
    "includes_any": ("codes",),
    "excludes": ("codes",),
}
TEXT_MATCHES = ("contains", "contains_any", "matches")
MARKER = "__huiying"  # every fact carries it; durable's own session-state object does not


@dataclass(frozen=True)
class Fact:
    name: str
    type: str
    description: str = ""


class ConditionError(ValueError):
    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line, self.message = line, message


# --- parsing and validation -----------------------------------------------------------------


def parse(node, facts: dict[str, Fact], errors: list, depth: int = 0, negated: bool = False):
    """Validate a condition node; returns a normalised tree, appending ``ConditionError``s."""
    line = line_of(node)
    if depth > MAX_DEPTH:
        errors.append(ConditionError(line, f"condition nested deeper than {MAX_DEPTH} levels"))
        return None
    if not isinstance(node, dict):
        errors.append(ConditionError(line, "a condition is a mapping: all, any, not, or {fact: NAME, OP: VALUE}"))
        return None
    if "fact" in node:
        return _parse_leaf(node, facts, errors, negated)
    if len(node) != 1:
        errors.append(ConditionError(line, f"expected exactly one of all, any, not; got {', '.join(map(str, node))}"))
        return None
    ((kind, body),) = node.items()
    if kind in ("all", "any"):
        if not isinstance(body, list):
            errors.append(ConditionError(line_of(node, kind), f"{kind} takes a list of conditions"))
            return None
        parts = [parse(part, facts, errors, depth + 1, negated) for part in body]
        return {kind: parts}
    if kind == "not":
        return {"not": parse(body, facts, errors, depth + 1, not negated)}
    errors.append(ConditionError(line_of(node, kind), f"unknown condition {kind!r}; use all, any, not or fact"))
    return None


def _parse_leaf(node, facts, errors, negated):
    line = line_of(node)
    name = node["fact"]
    if not isinstance(name, str) or name not in facts:
        known = ", ".join(sorted(facts))
        errors.append(ConditionError(line_of(node, "fact"), f"unknown fact {name!r}; known facts: {known}"))
        return None
    fact = facts[name]
    ops = [k for k in node if k != "fact"]
    if len(ops) != 1:
        errors.append(ConditionError(line, f"fact {name!r} needs exactly one operator, e.g. eq: VALUE"))
        return None
    op = ops[0]
    value = node[op]
    op_line = line_of(node, op)
    if op not in OPERATORS:
        errors.append(ConditionError(op_line, f"unknown operator {op!r}; known operators: {', '.join(OPERATORS)}"))
        return None
    if fact.type not in OPERATORS[op]:
        errors.append(ConditionError(op_line, f"operator {op!r} does not apply to {name!r} (a {fact.type} fact)"))
        return None
    if negated and op in TEXT_MATCHES:
        errors.append(ConditionError(op_line, f"'not' cannot contain {op!r}: durable_rules has no negated text match"))
        return None
    problem = _value_problem(fact, op, value)
    if problem:
        errors.append(ConditionError(op_line, f"{name} {op}: {problem}"))
        return None
    if isinstance(value, list):
        value = [normalize_number(v) for v in value]
    else:
        value = normalize_number(value)
    return {"fact": name, "op": op, "value": value}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _scalar_ok(fact: Fact, v) -> bool:
    if fact.type == "number":
        return _is_number(v)
    if fact.type == "bool":
        return isinstance(v, bool)
    return isinstance(v, str)


def _value_problem(fact: Fact, op: str, value) -> str | None:
    if op == "exists":
        return None if isinstance(value, bool) else "expects true or false"
    if op in ("in", "not_in", "contains_any", "includes_any"):
        if not isinstance(value, list) or not value:
            return "expects a non-empty list"
        scalar = Fact(fact.name, "text") if fact.type in ("codes", "text") else fact
        bad = [v for v in value if not _scalar_ok(scalar, v)]
        if bad:
            return (
                f"expects a list of {'text' if scalar.type in ('code', 'text') else scalar.type} values, got {bad[0]!r}"
            )
        if op == "contains_any" and any(v == "" for v in value):
            return "empty text matches everything"
        return None
    if op in ("includes", "excludes", "contains"):
        if not isinstance(value, str) or not value:
            return "expects non-empty text"
        return None
    if op == "matches":
        return regex_problem(value)
    if not _scalar_ok(fact, value):
        return f"expects a {fact.type} value, got {value!r}"
    return None


# --- regular expressions: Python syntax in, durable_rules dialect out -------------------------

_DURABLE_META = set(".*+?|()[]{}%")
# ASCII classes, spelled out so that durable_rules and Python (re.ASCII) agree exactly.
_CLASS_ESCAPES = {"d": "0-9", "s": " \t\n\r\f", "w": "a-zA-Z0-9_"}  # \v: see normalize()


def regex_problem(pattern) -> str | None:
    if not isinstance(pattern, str) or not pattern:
        return "expects a regular expression"
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"invalid regular expression: {exc}"
    try:
        to_durable_regex(pattern)  # the supported subset
        _compiled_pattern(pattern)
    except ValueError as exc:
        return str(exc)
    return None


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.dot_nl = True  # . matches a line break too, as Python's re.DOTALL
_RE2_OPTIONS.log_errors = False  # a refused pattern is reported to the operator, not to stderr


@functools.lru_cache(maxsize=4096)
def _compiled_pattern(pattern: str):
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        message = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(f"unsupported regular expression: {message}") from None


def text_test(op: str, value, text: str) -> bool:
    """``contains``, ``contains_any`` or ``matches`` on one text (RE2's \\d \\w \\s are ASCII, as
    Python's with re.ASCII)."""
    if op == "contains":
        return value in text
    if op == "contains_any":
        return any(v in text for v in value)
    return _compiled_pattern(value).search(text) is not None


def to_durable_regex(pattern: str) -> str:
    """Translate a Python regex (supported subset) to durable_rules' dialect, whose escape is %."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            nxt = pattern[i + 1] if i + 1 < len(pattern) else ""
            if nxt in _CLASS_ESCAPES:
                body = _CLASS_ESCAPES[nxt]
                out.append(body if in_class else f"[{body}]")
            elif nxt and nxt in _DURABLE_META:
                out.append("%" + nxt)
            else:
                raise ValueError(f"unsupported escape \\{nxt} in regular expression (use \\d \\s \\w or \\. \\( ...)")
            i += 2
            continue
        if in_class:
            if ch == "]":
                in_class = False
            elif ch in "[%":
                out.append("%" + ch)
                i += 1
                continue
            out.append(ch)
            i += 1
            continue
        if ch in "^$":
            raise ValueError("anchors ^ and $ are not supported (matches looks anywhere in the text)")
        if ch == "(" and pattern.startswith("(?", i):
            if pattern.startswith("(?:", i):
                out.append("(")
                i += 3
                continue
            raise ValueError("(?...) groups are not supported (no lookaround, flags or named groups)")
        if ch == "[":
            if pattern.startswith("[^", i):
                raise ValueError("negated classes [^...] are not supported")
            in_class = True
        elif ch in "*+?}" and i + 1 < len(pattern) and pattern[i + 1] == "?":
            raise ValueError("lazy quantifiers (*?, +?, ??) are not supported")
        out.append("%%" if ch == "%" else ch)
        i += 1
    return "".join(out)


def _escape_literal(text: str) -> str:
    return "".join("%" + ch if ch in _DURABLE_META else ch for ch in text)


# --- facts as both evaluators see them ---------------------------------------------------------


NUMBER_LIMIT = 10**12


def normalize_number(value):
    """Numbers within ±10^12 at a precision of 0.001, written without exponents (durable cannot
    parse 1e-05 or 1e+20)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    value = max(-NUMBER_LIMIT, min(NUMBER_LIMIT, value))
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        value = round(value, 3)
        return 0 if abs(value) < 0.001 else value
    return value


def leaves(tree):
    """The single-fact tests of a parsed condition."""
    if "fact" in tree:
        yield tree
    for part in tree.get("all", []) + tree.get("any", []) + ([tree["not"]] if "not" in tree else []):
        yield from leaves(part)


def normalize(facts: dict) -> dict:
    """What the engine and the plain-Python evaluator both compare: missing (None) facts dropped,
    numbers at 0.001, vertical tabs as spaces (durable's classes cannot hold \v)."""
    out = {}
    for name, value in facts.items():
        if value is None:
            continue
        if isinstance(value, (int, float)):
            value = normalize_number(value)
        elif isinstance(value, str):
            value = value.replace("\x0b", " ")
        out[name] = value
    return out


# --- compilation to durable_rules ---------------------------------------------------------------


def compile_condition(tree) -> dict:
    """The durable_rules expression for a parsed condition (without the marker)."""
    if "all" in tree:
        parts = [compile_condition(p) for p in tree["all"]]
        return {"$and": parts} if parts else {"$ex": {MARKER: 1}}
    if "any" in tree:
        parts = [compile_condition(p) for p in tree["any"]]
        return {"$or": parts} if parts else {"$nex": {MARKER: 1}}  # an empty any never holds
    if "not" in tree:
        return _negate(tree["not"])
    return _leaf(tree["fact"], tree["op"], tree["value"])


def _leaf(fact: str, op: str, value) -> dict:
    if op == "eq":
        return {fact: value}
    if op in ("ne", "lt", "le", "gt", "ge"):
        return {{"ne": "$neq", "lt": "$lt", "le": "$lte", "gt": "$gt", "ge": "$gte"}[op]: {fact: value}}
    if op == "in":
        return _or([{fact: v} for v in value])
    if op == "not_in":
        return _and([{"$neq": {fact: v}} for v in value])
    if op == "contains":
        return {"$mt": {fact: ".*" + _escape_literal(value) + ".*"}}
    if op == "contains_any":
        return _or([{"$mt": {fact: ".*" + _escape_literal(v) + ".*"}} for v in value])
    if op == "matches":
        return {"$mt": {fact: ".*(" + to_durable_regex(value) + ").*"}}
    if op == "exists":
        return {"$ex" if value else "$nex": {fact: 1}}
    if op == "includes":
        return {"$iany": {fact: {"$i": value}}}
    if op == "includes_any":
        return _or([{"$iany": {fact: {"$i": v}}} for v in value])
    if op == "excludes":
        return {"$iall": {fact: {"$neq": {"$i": value}}}}
    raise ValueError(f"unknown operator {op}")


def _negate(tree) -> dict:
    """not(tree), pushed to the leaves; a missing fact makes every comparison false, so the
    negation of a comparison also holds when the fact is missing."""
    if "all" in tree:
        return _or([_negate(p) for p in tree["all"]]) if tree["all"] else {"$nex": {MARKER: 1}}
    if "any" in tree:
        return _and([_negate(p) for p in tree["any"]]) if tree["any"] else {"$ex": {MARKER: 1}}
    if "not" in tree:
        return compile_condition(tree["not"])
    fact, op, value = tree["fact"], tree["op"], tree["value"]
    missing = {"$nex": {fact: 1}}
    opposite = {
        "eq": "ne",
        "ne": "eq",
        "lt": "ge",
        "le": "gt",
        "gt": "le",
        "ge": "lt",
        "in": "not_in",
        "not_in": "in",
        "includes": "excludes",
        "excludes": "includes",
    }
    if op == "exists":
        return _leaf(fact, "exists", not value)
    if op in opposite:
        return _or([_leaf(fact, opposite[op], value), missing])
    if op == "includes_any":
        return _or([missing, _and([{"$iall": {fact: {"$neq": {"$i": v}}}} for v in value])])
    raise ValueError(f"cannot negate {op}")  # text matches are refused by parse()


def _or(parts):
    return parts[0] if len(parts) == 1 else {"$or": parts}


def _and(parts):
    return parts[0] if len(parts) == 1 else {"$and": parts}


# --- plain-Python evaluation (explain, and the reference the engine is checked against) -------


def evaluate(tree, facts: dict) -> bool:
    """Whether the condition holds for ``facts`` (pass them through ``normalize`` first)."""
    return not failed_conditions(tree, facts, first_only=True)


def failed_conditions(tree, facts: dict, first_only: bool = False) -> list[str]:
    """Human-readable parts of the condition that do not hold (empty when it holds)."""
    if "all" in tree:
        failed = []
        for part in tree["all"]:
            failed += failed_conditions(part, facts, first_only)
            if failed and first_only:
                break
        return failed
    if "any" in tree:
        if any(not failed_conditions(p, facts, True) for p in tree["any"]):
            return []
        return [f"none of: {'; '.join(describe(p) for p in tree['any'])}"]
    if "not" in tree:
        return [f"not ({describe(tree['not'])})"] if not failed_conditions(tree["not"], facts, True) else []
    return [] if _leaf_holds(tree, facts) else [f"{describe(tree)} (is {facts.get(tree['fact'])!r})"]


def _leaf_holds(tree, facts) -> bool:
    fact, op, value = tree["fact"], tree["op"], tree["value"]
    present = fact in facts and facts[fact] is not None
    if op == "exists":
        return present == value
    if not present:
        return False
    actual = facts[fact]
    if op == "eq":
        return actual == value
    if op == "ne":
        return actual != value
    if op in ("lt", "le", "gt", "ge"):
        return {"lt": actual < value, "le": actual <= value, "gt": actual > value, "ge": actual >= value}[op]
    if op == "in":
        return actual in value
    if op == "not_in":
        return actual not in value
    if op in TEXT_MATCHES:
        return text_test(op, value, actual)
    if op == "includes":
        return value in actual
    if op == "includes_any":
        return any(v in actual for v in value)
    if op == "excludes":
        return value not in actual
    raise ValueError(op)


def describe(tree) -> str:
    if "all" in tree:
        return "all of (" + "; ".join(describe(p) for p in tree["all"]) + ")"
    if "any" in tree:
        return "any of (" + "; ".join(describe(p) for p in tree["any"]) + ")"
    if "not" in tree:
        return "not (" + describe(tree["not"]) + ")"
    return f"{tree['fact']} {tree['op']} {tree['value']!r}"
