"""The one adapter around durable_rules 2.0.28. Every rule decision goes through here.

durable_rules is unmaintained and has traps; this adapter engineers around each (and
tests/unit/test_rules_engine.py proves it):

- A posted *event* fires only the first matching rule. We assert each evaluation as a *fact*,
  which fires every matching rule, drain all pending actions, then retract the fact.
- More than 1024 live session ids raise MemoryError, and ``delete_state`` on a session whose
  message matched nothing segfaults. We use one session id for everything and never delete
  state: each evaluation's fact is retracted, so the session holds nothing between evaluations.
- A ruleset name registers once per ``Host``, and every ``Host`` starts timer threads that never
  stop. We never create a ``Host``: we drive the C engine (``durable_rules_engine``) directly, give
  each compiled version a unique name and delete it when it is replaced.
- Unmatched halves of multi-pattern rules stay in memory. Every rule here is one pattern.
- durable's own session-state object is itself matched by rules such as "fact is missing". Every
  rule requires the marker fact that only our facts carry.
- "Every item" is false on an empty list: lists carry one empty item that no rule can name.
- Deleting a ruleset does not give all its memory back (about 0.1 MB each): versions are
  compiled only when the rule files' content changes.
- Invalid regular expressions are accepted silently, and its regular-expression automaton answers
  wrongly for some texts (``\\d\\d`` is not found in "0001", nor "拥堵拥" in "拥堵拥堵"). Text tests
  (contains, contains_any, matches) never reach it: each is made in Python with RE2 (conditions.
  text_test; linear time, so a hostile pattern cannot hang a service) and durable receives its
  outcome as a boolean fact of its own; the rest of every rule is still durable's to decide.
- Error messages are bare numbers: wrapped in ``RulesEngineError``.

The C engine is not thread-safe; under eventlet an evaluation makes no blocking call, so it runs
to completion without yielding, and a lock guards it anyway.
"""

import itertools
import json
import threading
import uuid

import durable_rules_engine

from services.common.rules.conditions import (
    MARKER,
    TEXT_MATCHES,
    compile_condition,
    leaves,
    normalize,
    text_test,
)

_SESSION = "0"
TEXT_TEST = "__text_test_"  # facts of our own; no service declares a fact starting with _
_lock = threading.RLock()


class RulesEngineError(RuntimeError):
    """durable_rules refused something; the message says what we were doing."""


def _encode(value):
    # durable's "every item" ($iall) is false on an empty list, where "x not in []" is true:
    # a list always carries one empty-text item, which no rule can name (values are non-empty).
    if isinstance(value, (list, tuple)):
        return [*value, ""]
    return value


class CompiledRules:
    """One version of a ruleset, loaded into durable_rules.

    ``rules`` maps rule id → parsed condition tree (from conditions.parse)."""

    def __init__(self, name: str, rules: dict[str, dict]):
        self.name = name
        self.rule_ids = list(rules)
        self._engine_name = f"{name}-{uuid.uuid4().hex[:12]}"
        self._ids = itertools.count(1)
        self._handle = None
        self._text_tests: list[tuple[str, dict]] = []  # (the fact durable tests, the text test)
        definition = {}
        for index, (rule_id, tree) in enumerate(rules.items()):
            expression = {"$and": [{MARKER: 1}, compile_condition(self._with_text_tests_as_facts(tree))]}
            # durable rule names are its own; ours map back by position.
            definition[f"r{index}"] = {"all": [{"m": expression}]}
        self._names = {f"r{index}": rule_id for index, rule_id in enumerate(rules)}
        # Only the facts some rule tests go to durable: the rest (titles, say) would only cost
        # encoding, and parsing again in every action message.
        self._reads = sorted(
            {leaf["fact"] for tree in rules.values() for leaf in leaves(tree) if leaf["op"] not in TEXT_MATCHES}
        )
        self._text_reads = sorted({leaf["fact"] for _, leaf in self._text_tests})
        if not definition:
            return
        try:
            with _lock:
                self._handle = durable_rules_engine.create_ruleset(
                    self._engine_name, json.dumps(definition, ensure_ascii=False)
                )
        except durable_rules_engine.error as exc:
            raise RulesEngineError(f"durable_rules could not compile ruleset {name!r}: {exc}") from None

    @property
    def plain_reads(self) -> list[str]:
        """The facts durable receives as they are: every fact a rule tests other than by a text
        test (of a text, durable receives only its tests' outcomes, ``text_outcomes``)."""
        return self._reads

    def text_outcomes(self, facts: dict) -> tuple[bool, ...]:
        """Each text test's outcome on ``facts``, in order: what durable receives of the texts."""
        if not self._text_tests:
            return ()
        texts = normalize({k: facts[k] for k in self._text_reads if k in facts})
        outcomes = []
        for _, test in self._text_tests:
            text = texts.get(test["fact"])
            outcomes.append(isinstance(text, str) and text_test(test["op"], test["value"], text))
        return tuple(outcomes)

    def _with_text_tests_as_facts(self, tree: dict) -> dict:
        """The condition with each text test replaced by "its own fact is true"."""
        if "all" in tree or "any" in tree:
            key = "all" if "all" in tree else "any"
            return {key: [self._with_text_tests_as_facts(part) for part in tree[key]]}
        if "not" in tree:
            return {"not": self._with_text_tests_as_facts(tree["not"])}
        if tree["op"] not in TEXT_MATCHES:
            return tree
        name = f"{TEXT_TEST}{len(self._text_tests)}"
        self._text_tests.append((name, tree))
        return {"fact": name, "op": "eq", "value": True}

    def matching(self, facts: dict) -> list[str]:
        """Ids of every rule whose condition holds for ``facts``, in rule order."""
        if self._handle is None:
            return []
        fact = {k: _encode(v) for k, v in normalize({k: facts[k] for k in self._reads if k in facts}).items()}
        fact.update(zip((name for name, _ in self._text_tests), self.text_outcomes(facts)))
        fact.update({MARKER: 1, "id": next(self._ids), "sid": _SESSION})
        body = json.dumps(fact, ensure_ascii=False)
        fired = set()
        with _lock:
            try:
                result = durable_rules_engine.assert_fact(self._handle, body)
                if result[0] == 0:  # 0: handled (something matched); 1: nothing matched
                    state_handle = result[1]
                    pending = durable_rules_engine.start_action_for_state(self._handle, state_handle)
                    message = pending[1] if pending else None
                    while message:
                        fired.update(json.loads(message).keys())
                        message = durable_rules_engine.complete_and_start_action(self._handle, state_handle)
            except durable_rules_engine.error as exc:
                raise RulesEngineError(f"durable_rules failed evaluating {self.name!r}: {exc}") from None
            finally:
                try:
                    durable_rules_engine.retract_fact(self._handle, body)
                except durable_rules_engine.error:
                    pass  # nothing was stored (the assert itself failed)
        return [self._names[name] for name in sorted(fired, key=lambda n: int(n[1:]))]

    def close(self):
        with _lock:
            if self._handle is not None:
                durable_rules_engine.delete_ruleset(self._handle)
                self._handle = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
