"""The operator with a crash point, for the restart test (tests/integration/test_operator.py).

    python -m tests.k8s.crashing_operator --namespace NS ...

Runs `python -m fst_operator` unchanged, except that the process exits (code 17, no cleanup)
right after it created its first trainer Job, before the run's status records it: the worst
moment for idempotency. $FST_TEST_CRASH_MARKER names a file that makes the crash happen once
per test. Kept here, not in the operator: production code carries no test hooks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fst_operator import __main__ as operator_main
from fst_operator import kube

CRASH_EXIT_CODE = 17
_create_if_absent = kube.create_if_absent


def _create_then_crash(obj: dict[str, Any]) -> dict[str, Any]:
    made = _create_if_absent(obj)
    marker = Path(os.environ["FST_TEST_CRASH_MARKER"])
    if obj["kind"] == "Job" and not marker.exists():
        marker.touch()
        logging.getLogger("fst_operator").error("test crash point: exiting after a Job create")
        os._exit(CRASH_EXIT_CODE)
    return made


kube.create_if_absent = _create_then_crash  # handlers call it through the module

if __name__ == "__main__":
    operator_main.main()
