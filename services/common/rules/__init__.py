"""Rule files that staff edit (YAML, data only), compiled to durable_rules, which decides.

- ``yamlfile``: safe YAML loading that remembers line numbers, with size and depth limits.
- ``conditions``: the condition language (all/any/not, comparisons, sets, text), its
  validation, its compilation to durable_rules JSON, and a plain-Python evaluator used to
  explain decisions and to check the engine.
- ``engine``: the one adapter around durable_rules, engineered around its traps.
- ``ruleset``: loading a folder of rule files into a validated, versioned ruleset.
"""
