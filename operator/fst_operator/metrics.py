"""Prometheus metrics of the operator: reconciles, errors, runs by phase."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("fst_operator")

RECONCILES = Counter("fastslow_reconciles_total", "Reconciles done.", ["kind"])
ERRORS = Counter("fastslow_reconcile_errors_total", "Reconciles that raised.", ["kind"])
DURATION = Histogram("fastslow_reconcile_seconds", "Time per reconcile.", ["kind"])
RUNS = Gauge("fastslow_runs", "FastSlowRuns by phase (as last seen).", ["phase"])

_phases: dict[tuple[str, str], str] = {}
_lock = threading.Lock()
PHASES = ("Pending", "Running", "Succeeded", "Failed", "Suspended", "Invalid")


@contextmanager
def reconciling(kind: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    except Exception:
        ERRORS.labels(kind).inc()
        raise
    finally:
        RECONCILES.labels(kind).inc()
        DURATION.labels(kind).observe(time.perf_counter() - t0)


def observe_phase(namespace: str, name: str, phase: str) -> None:
    with _lock:
        _phases[(namespace, name)] = phase
        counts = dict.fromkeys(PHASES, 0)
        for p in _phases.values():
            counts[p] = counts.get(p, 0) + 1
        for p, n in counts.items():
            RUNS.labels(p).set(n)


def forget(namespace: str, name: str) -> None:
    with _lock:
        _phases.pop((namespace, name), None)


def start_server(port: int) -> None:
    if port:
        start_http_server(port)
        log.info("Prometheus metrics on :%d/metrics", port)
