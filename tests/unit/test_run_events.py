"""Which events of a FastSlowRun queue a reconcile (operator/fst_operator/handlers.run_event):
a new run (urgently, its body kept for its first reconcile), a changed spec, a run this process
has not met yet; never the run's own status writes; a deleted run is forgotten."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest
from fst_operator import handlers, workqueue


def run(generation: int = 1, status: dict[str, Any] | None = None) -> kopf.Body:
    raw = {"metadata": {"namespace": "ns", "name": "r", "generation": generation}, "spec": {}}
    if status is not None:
        raw["status"] = status
    return kopf.Body(raw)  # type: ignore[arg-type]


def running(observed: int) -> dict[str, Any]:
    return {"phase": "Running", "observedGeneration": observed}


def queued(events: list[tuple[str | None, kopf.Body]]) -> list[tuple[Any, int]]:
    """What the events put on a fresh queue: (key, rank), rank 0 urgent and 1 not."""

    async def main() -> list[tuple[Any, int]]:
        queue = workqueue.KeyQueue()
        for type_, body in events:
            await handlers.run_event(type=type_, body=body, memo={"run_queue": queue})
        return [(key, rank) for key, (rank, _context) in queue._waiting.items()]

    return asyncio.run(main())


@pytest.fixture(autouse=True)
def fresh_process():
    handlers._met_runs.clear()
    handlers._unseen_runs.clear()
    yield
    handlers._met_runs.clear()
    handlers._unseen_runs.clear()


def test_a_new_run_is_queued_with_its_body_and_its_own_status_writes_are_not():
    body = run()
    assert queued([("ADDED", body)]) == [(("ns", "r"), 0)]
    assert handlers._unseen_runs[("ns", "r")]["metadata"]["name"] == "r"
    # Its status written by the reconcile, then a progress update: nothing to do.
    assert queued([("MODIFIED", run(1, running(1))), ("MODIFIED", run(1, running(1)))]) == []


def test_a_changed_spec_is_queued_and_its_body_is_not_kept():
    queued([("ADDED", run())])
    handlers._unseen_runs.clear()  # its first reconcile took it
    assert queued([("MODIFIED", run(2, running(1)))]) == [(("ns", "r"), 1)]
    assert ("ns", "r") not in handlers._unseen_runs  # a later reconcile GETs the run


def test_every_run_is_reconciled_once_when_the_process_starts_and_not_on_a_relist():
    assert queued([(None, run(3, running(3)))]) == [(("ns", "r"), 1)]  # a restart's resume
    assert queued([(None, run(3, running(3)))]) == []  # kopf lists again after "410 Gone"


def test_a_run_still_without_status_is_queued_again_but_its_body_is_kept_only_once():
    queued([("ADDED", run())])
    handlers._unseen_runs.clear()
    # Its first reconcile failed before writing status (say its tenant was not ready), and
    # its user labelled it meanwhile: queued again, read by a GET.
    assert queued([("MODIFIED", run())]) == [(("ns", "r"), 0)]
    assert ("ns", "r") not in handlers._unseen_runs


def test_a_deleted_run_is_forgotten_and_one_made_again_under_its_name_is_new():
    queued([("ADDED", run()), ("MODIFIED", run(1, running(1)))])
    queued([("DELETED", run(1, running(1)))])
    assert ("ns", "r") not in handlers._met_runs and not handlers._unseen_runs
    assert queued([("ADDED", run())]) == [(("ns", "r"), 0)]
    assert ("ns", "r") in handlers._unseen_runs
