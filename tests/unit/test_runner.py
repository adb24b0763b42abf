"""The service runner's process-wide settings (services/common/runner.py)."""

import subprocess
import sys

from services.common.config import PROJECT_ROOT


def test_what_start_made_is_left_out_of_later_collections():
    # In a process of its own: the runner patches the standard library when imported.
    code = (
        "import gc; from services.common.runner import freeze_what_start_made, load_service_class; "
        "load_service_class('supervision'); freeze_what_start_made(); print(gc.get_freeze_count())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT, check=True
    )
    # every module, table and class loaded by then: a full collection no longer walks them
    assert int(result.stdout) > 50_000
