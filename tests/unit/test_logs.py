"""How the services' logging configuration (config.logging_config, logs.py) writes what nameko
logs when an entrypoint raises. Each case runs in a process of its own: dictConfig is global."""

import os
import subprocess
import sys

import pytest

from services.common.config import PROJECT_ROOT

# nameko.containers' own calls (nameko 2.14, ServiceContainer._run_worker), for an exception the
# entrypoint expects and for one it does not
LOG_BOTH = """
import logging, logging.config
from services.common.config import logging_config
logging.config.dictConfig(logging_config("intake"))
log = logging.getLogger("nameko.containers")
try:
    raise LookupError("case LG-2026-000001 not found")
except LookupError as exc:
    log.warning("(expected) error handling worker %s: %s", "<WorkerContext>", exc, exc_info=True)
try:
    raise ZeroDivisionError("a bug")
except ZeroDivisionError as exc:
    log.exception("error handling worker %s: %s", "<WorkerContext>", exc)
"""


def logged(level: str) -> list[str]:
    env = {**os.environ, "HUIYING_LOG_FORMAT": "plain", "HUIYING_LOG_LEVEL": level}
    result = subprocess.run(
        [sys.executable, "-c", LOG_BOTH], capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT, env=env
    )
    assert result.returncode == 0, result.stderr
    return result.stderr.splitlines()


def test_an_expected_error_is_one_info_line_and_an_unexpected_one_keeps_its_level_and_traceback():
    lines = logged("INFO")
    [expected] = [line for line in lines if "(expected)" in line]
    assert " INFO nameko.containers (expected) error handling worker <WorkerContext>: case LG-2026" in expected
    assert "LookupError" not in "\n".join(lines)  # no traceback of it
    [unexpected] = [line for line in lines if "error handling worker" in line and "(expected)" not in line]
    assert " ERROR nameko.containers " in unexpected
    assert lines[-1] == "ZeroDivisionError: a bug" and any(line.startswith("Traceback") for line in lines)


@pytest.mark.parametrize("level", ["WARNING", "ERROR"])
def test_an_expected_error_is_not_written_where_info_is_not(level):
    lines = logged(level)
    assert not [line for line in lines if "(expected)" in line]
    assert any(" ERROR nameko.containers error handling worker" in line for line in lines)
