"""One trainer in its own process, stepping on command from the orchestrator.

Each trainer lives in its own process so that its peak memory is its own and nothing it
allocates or caches (threads, allocator pools) helps or hurts the other. The orchestrator sends
"step" or "stop" over a multiprocessing pipe; the worker answers each "step" with one record.
While a worker waits for its next command it is blocked on the pipe and uses no CPU, so the two
trainers never run at the same time.
"""

from __future__ import annotations

import os
import re
import resource
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss_mib() -> float:
    """VmHWM, the process's peak resident set size since the last reset, in MiB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0), so the peak we
    # read after a step is the peak DURING that step, not the model load's.
    Path("/proc/self/clear_refs").write_text("5")


class StepMeter:
    """Wall time, CPU time, peak RSS and load average around one step."""

    def start(self) -> None:
        _reset_peak_rss()
        self.load0 = os.getloadavg()[0]
        self.cpu0 = _cpu_seconds()
        self.t0 = time.perf_counter()

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        cpu = _cpu_seconds() - self.cpu0
        return {
            "step_s": wall,
            "cpu_s": cpu,
            # CPU seconds per wall second: ~threads when the step had the cores to itself,
            # lower when other processes on the machine took them.
            "cpu_util": cpu / wall if wall > 0 else 0.0,
            "peak_rss_mib": _peak_rss_mib(),
            "load_start": self.load0,
            "load_end": os.getloadavg()[0],
        }


def serve(kind: str, settings_dict: dict[str, Any], conn: Connection, log_path: str) -> None:
    """Entry point of a worker process (multiprocessing, spawn)."""
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    os.dup2(log.fileno(), 1)  # libraries print progress and logs; keep the console clean
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log

    import torch

    from bench.speed.settings import BenchSettings

    settings = BenchSettings(**settings_dict)
    torch.set_num_threads(settings.threads)
    t0 = time.perf_counter()
    try:
        if kind == "fastslow":
            from bench.speed.fastslow_side import FastslowSide

            side: Any = FastslowSide(settings)
        elif kind == "trl":
            from bench.speed.trl_side import TrlSide

            side = TrlSide(settings)
        else:
            raise ValueError(f"unknown worker kind {kind!r}")
        conn.send({"ready": True, "load_s": time.perf_counter() - t0, **side.describe()})
        side.run(conn, StepMeter())
    except BaseException as e:  # report, then die: the orchestrator must not hang
        import traceback

        traceback.print_exc()
        conn.send({"error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        side_close = locals().get("side")
        if side_close is not None and hasattr(side_close, "close"):
            side_close.close()
