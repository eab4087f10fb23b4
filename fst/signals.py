"""SIGTERM as an exception: how a trainer leaves when Kubernetes deletes, drains, evicts or
preempts its pod (or someone runs `kill`).

By default SIGTERM ends a Python process on the spot: no `finally` runs. Measured on a real
node (tests/integration/test_e2e_real_node.py): a trainer pod deleted mid-run kept its writer
lease in the database, and the run's next attempt, started seconds later, was refused until
the lease expired, twice, which used up the run's retries. With `stop_on_sigterm()` the signal
raises Terminated in the main thread instead: the run unwinds like Ctrl-C, releases its lease
and folder lock, and the next attempt takes over at once. Torch-free, so `fst` installs it
before anything heavy is imported.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, so that no `except Exception` swallows it."""


def _raise_terminated(signum: int, _frame: FrameType | None) -> None:
    raise Terminated(f"stopped by signal {signum} (SIGTERM)")


def stop_on_sigterm() -> None:
    """Turn SIGTERM into Terminated (only the main thread may set signal handlers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
