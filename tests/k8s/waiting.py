"""Polling for the Kubernetes tests: one loop, one failure message."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest


def wait_until(
    check: Callable[[], Any],
    timeout: float,
    what: str,
    describe: Callable[[], str] | None = None,
    poll: float = 0.3,
) -> Any:
    """Poll until `check` returns something truthy and return it; else fail the test with
    `what` and, if given, `describe()` (say, the operator's log)."""
    deadline = time.monotonic() + timeout
    while True:
        if value := check():
            return value
        if time.monotonic() > deadline:
            detail = f"\n{describe()}" if describe is not None else ""
            pytest.fail(f"{what}: not after {timeout:.0f}s{detail}", pytrace=False)
        time.sleep(poll)
