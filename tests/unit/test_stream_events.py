"""Every wake-up of a TaskStream (its own change, its data-poll timer, its stage runs' and gate
Jobs' events) only queues the stream's key (operator/fst_operator/handlers.py): one key per
stream while it waits, so one reconcile at a time, on the stream read afresh. Before, the
stream's own handlers wrote status through kopf's deferred `patch` while its children's events
wrote it through the API, two writers racing on one status."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
from fst_operator import builders, handlers, workqueue


def body(raw: dict[str, Any]) -> kopf.Body:
    return kopf.Body(raw)  # type: ignore[arg-type]


STREAM = body({"metadata": {"namespace": "ns", "name": "acme"}, "spec": {}})
STAGE_RUN = body(
    {"metadata": {"namespace": "ns", "name": "acme-add", "labels": {builders.LABEL_STREAM: "acme"}}}
)
GATE_JOB = body(
    {
        "metadata": {
            "namespace": "ns",
            "name": "acme-add-gate",
            "labels": {builders.LABEL_STREAM: "acme", builders.LABEL_GATE: "acme-add"},
        }
    }
)


def waiting_after(*wakeups: tuple[str, str | None, kopf.Body]) -> list[Any]:
    """The keys waiting on a fresh stream queue after these handler calls, none of which may
    touch the API (there is none here: a handler that reconciled inline would fail)."""

    async def main() -> list[Any]:
        queue = workqueue.KeyQueue()
        memo = {"stream_queue": queue}
        for handler, type_, obj in wakeups:
            await getattr(handlers, handler)(type=type_, body=obj, memo=memo)
        return list(queue._waiting)

    return asyncio.run(main())


def test_all_wakeups_of_a_stream_queue_its_key_once():
    assert waiting_after(
        ("stream_changed", None, STREAM),
        ("stream_data_poll", None, STREAM),
        ("stage_run_event", "MODIFIED", STAGE_RUN),
        ("gate_job_event", "ADDED", GATE_JOB),
    ) == [("ns", "acme")]


def test_each_child_event_alone_queues_its_stream_and_a_deletion_does_not():
    assert waiting_after(("stage_run_event", "MODIFIED", STAGE_RUN)) == [("ns", "acme")]
    assert waiting_after(("gate_job_event", "MODIFIED", GATE_JOB)) == [("ns", "acme")]
    assert waiting_after(("stage_run_event", "DELETED", STAGE_RUN)) == []
    assert waiting_after(("gate_job_event", "DELETED", GATE_JOB)) == []
