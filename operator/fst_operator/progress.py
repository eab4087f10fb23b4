"""Training progress into FastSlowRun status: one poller for the whole operator.

A trainer reports its progress (step, reward, KL, checkpoint, prompt population) to the
database, not to Kubernetes, so the operator has to ask. It used to ask per run, with a kopf
timer on every unfinished FastSlowRun: at 1000 runs that was 1000 timer tasks (~45 MiB) and
1000 reconciles (a GET of the run, four queries) every interval, whether or not anything moved
(docs/performance.md, round 2). Now one loop asks each namespace's database once per interval
which runs moved (RunDB.progress_markers, one query) and reads and patches only those.

    kopf index `active_runs` --snapshot--> ProgressPoller.poll --> RunDB.progress_markers
        (unfinished runs, their                                     RunDB.progress (moved only)
         progress fields)                                           builders.progress_patch
                                                                    kube.patch_run_status

Progress never changes a run's phase or starts an attempt (builders.decide_run: those follow
the Job), so the poller writes only the progress fields and emits no Events.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Mapping
from typing import Any

from fst.store.db import ProgressMarker, RunDB
from fst_operator import builders, metrics

log = logging.getLogger("fst_operator")

# {namespace: {run name: its status's progress fields}}
ActiveRuns = Mapping[str, Mapping[str, dict[str, Any]]]
StatusPatcher = Callable[[str, str, dict[str, Any]], None]  # (namespace, name, merge patch)


class ProgressPoller:
    """Mirrors the database's progress of unfinished runs into their status, one round per
    call of `poll`. It remembers each run's last ProgressMarker, so a round reads the progress
    of only the runs that moved; the first round after a start reads every run once."""

    def __init__(
        self,
        database: Callable[[str], RunDB | None],
        patch_status: StatusPatcher,
        run_key: Callable[[str, str], str] = builders.run_key,
    ) -> None:
        self._database, self._patch_status, self._run_key = database, patch_status, run_key
        self._seen: dict[tuple[str, str], ProgressMarker] = {}

    def poll(self, active: ActiveRuns) -> int:
        """One round over `active`; returns how many runs' status it patched. A database or API
        error is logged and that namespace (or run) is tried again next round."""
        patched = 0
        for namespace, runs in active.items():
            db = self._database(namespace)
            if db is None or not runs:
                continue
            keys = {self._run_key(namespace, name): name for name in runs}
            try:
                markers = db.progress_markers(keys)
            except Exception as e:  # the database is down: status waits, the runs go on
                log.warning("progress of %d run(s) in %s: %s", len(keys), namespace, e)
                continue
            for key, marker in markers.items():
                name = keys[key]
                if self._seen.get((namespace, name)) == marker:
                    continue
                try:
                    progress = db.progress(key)
                    patch = builders.progress_patch(runs[name], progress) if progress else {}
                    if patch:
                        with metrics.reconciling("progress"):
                            self._patch_status(namespace, name, patch)
                        patched += 1
                except Exception as e:  # not remembered: tried again next round
                    log.warning("progress of %s/%s: %s", namespace, name, e)
                    continue
                self._seen[(namespace, name)] = marker
        # Finished and deleted runs leave the index: forget them.
        self._seen = {
            (ns, name): m for (ns, name), m in self._seen.items() if name in active.get(ns, {})
        }
        return patched


def snapshot(index: Mapping[Any, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """The kopf index `active_runs` (namespace -> values (name, progress fields)) copied into
    plain dicts: kopf changes the index on its event loop, the round reads it in a thread."""
    active: dict[str, dict[str, dict[str, Any]]] = {}
    for namespace, values in index.items():
        active[namespace] = {name: dict(fields) for name, fields in values}
    return active


async def poll_forever(index: Mapping[Any, Any], poller: ProgressPoller, interval: float) -> None:
    """A round every `interval` seconds, in a thread of its own (so a slow database never
    holds up kopf's handler threads), until cancelled at the operator's shutdown."""
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="progress") as thread:
        while True:
            await asyncio.sleep(interval)
            active = snapshot(index)
            try:
                patched = await loop.run_in_executor(thread, poller.poll, active)
            except Exception:  # a bug, not the outside world (poll catches that): say where
                log.exception("progress round failed")
                continue
            if patched:
                log.info("progress: %d of %d run(s) moved", patched, sum(map(len, active.values())))
