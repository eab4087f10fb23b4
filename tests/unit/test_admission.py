"""Kueue's admission mirrored into a queued run's conditions (operator/fst_operator/
admission.py and builders.decide_run), on Workloads shaped as Kueue v0.17 writes them (copied
from a real controller's objects in tests/integration/test_kueue.py's cluster)."""

from __future__ import annotations

from typing import Any

from fst_operator import admission, builders

from fst.k8s.api import FastSlowRunSpec
from fst.k8s.status import ConditionType

TASK = {"name": "arithmetic", "params": {"answerFormat": "last_number"}}
JOB_UID = "f1eb4a66-ced9-4f3a-ab33-5cd040eccb39"
NO_ROOM = (
    "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu "
    "in flavor gpu, 8 more needed"
)


def cond(type_: str, status: str, reason: str, message: str) -> dict[str, Any]:
    return {
        "lastTransitionTime": "2026-12-03T19:09:53Z",
        "message": message,
        "observedGeneration": 1,
        "reason": reason,
        "status": status,
        "type": type_,
    }


def workload(*conditions: dict[str, Any], job: str = "acme-a1", **status: Any) -> dict:
    """A Workload as Kueue makes it for a batch/v1 Job (name, label, owner reference)."""
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "Workload",
        "metadata": {
            "name": f"job-{job}-99545",
            "namespace": "team",
            "creationTimestamp": "2026-12-03T19:09:53Z",
            "labels": {"kueue.x-k8s.io/job-uid": JOB_UID},
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "blockOwnerDeletion": True,
                    "controller": True,
                    "kind": "Job",
                    "name": job,
                    "uid": JOB_UID,
                }
            ],
        },
        "spec": {"queueName": "team-a", "podSets": [{"name": "main", "count": 1}]},
        "status": {"conditions": list(conditions), **status},
    }


ADMITTED = workload(
    cond("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue gpu"),
    cond("Admitted", "True", "Admitted", "The workload is admitted"),
    admission={
        "clusterQueue": "gpu",
        "podSetAssignments": [
            {
                "count": 1,
                "flavors": {"nvidia.com/gpu": "gpu"},
                "name": "main",
                "resourceUsage": {"nvidia.com/gpu": "8"},
            }
        ],
    },
)
WAITING = workload(
    cond("QuotaReserved", "False", "Pending", NO_ROOM),
    resourceRequests=[{"name": "main", "resources": {"nvidia.com/gpu": "8"}}],
)
SUSPENDED_JOB = {"metadata": {"name": "acme-a1"}, "spec": {"suspend": True}, "status": {}}
RUNNING_JOB = {"metadata": {"name": "acme-a1"}, "spec": {"suspend": False}, "status": {"active": 1}}


def test_the_owning_job_and_a_summary_small_enough_for_the_index() -> None:
    assert admission.owning_job(ADMITTED) == "acme-a1"
    not_a_job = workload()
    not_a_job["metadata"]["ownerReferences"][0].update(apiVersion="v1", kind="Pod")
    assert admission.owning_job(not_a_job) is None
    summary = admission.workload_summary(ADMITTED)
    assert "spec" not in summary and "podSetAssignments" not in summary["status"]["admission"]
    assert admission.admission(summary, RUNNING_JOB, "team-a") == admission.admission(
        ADMITTED, RUNNING_JOB, "team-a"
    )
    older = workload(job="acme-a1")
    newer = workload(job="acme-a1")
    newer["metadata"]["creationTimestamp"] = "2026-12-03T19:10:00Z"
    assert admission.newest([newer, older]) is newer and admission.newest([]) is None


def test_admitted() -> None:
    a = admission.admission(ADMITTED, RUNNING_JOB, "team-a")
    assert (a.admitted, a.reason, a.message) == (True, "Admitted", "admitted by ClusterQueue gpu")


def test_waiting_for_quota_says_what_kueue_says() -> None:
    a = admission.admission(WAITING, SUSPENDED_JOB, "team-a")
    assert (a.admitted, a.reason, a.message) == (False, "WaitingForQuota", NO_ROOM)


def test_inadmissible_evicted_reserved_and_unknown_reasons() -> None:
    missing = workload(
        cond("QuotaReserved", "False", "Inadmissible", "LocalQueue team-a doesn't exist")
    )
    a = admission.admission(missing, SUSPENDED_JOB, "team-a")
    assert (a.admitted, a.reason, a.message) == (
        False,
        "Inadmissible",
        "LocalQueue team-a doesn't exist",
    )
    preempted = workload(
        cond("QuotaReserved", "False", "Pending", "Preempted to accommodate a higher priority"),
        cond("Evicted", "True", "Preempted", "Preempted to accommodate a higher priority"),
        cond("Admitted", "False", "NoReservation", "The workload has no reservation"),
    )
    a = admission.admission(preempted, SUSPENDED_JOB, "team-a")
    assert (a.admitted, a.reason) == (False, "Evicted")
    assert a.message == "Preempted: Preempted to accommodate a higher priority"
    checks = workload(
        cond("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue gpu"),
        cond("Admitted", "False", "UnsatisfiedChecks", "The workload has not all checks ready"),
        admission={"clusterQueue": "gpu"},
    )
    a = admission.admission(checks, SUSPENDED_JOB, "team-a")
    assert (a.admitted, a.reason) == (False, "QuotaReserved")
    assert a.message == "quota reserved in ClusterQueue gpu; The workload has not all checks ready"
    new = workload(cond("QuotaReserved", "False", "SomethingNew", "a newer Kueue's reason"))
    a = admission.admission(new, SUSPENDED_JOB, "team-a")
    assert (a.reason, a.message) == ("NotAdmitted", "SomethingNew: a newer Kueue's reason")
    fresh = workload()  # made, not looked at by the scheduler yet
    assert admission.admission(fresh, SUSPENDED_JOB, "team-a").reason == "Queued"


def test_without_a_workload() -> None:
    a = admission.admission(None, SUSPENDED_JOB, "team-a")
    assert (a.admitted, a.reason) == (False, "NoWorkload")
    assert "acme-a1" in a.message and "LocalQueue team-a" in a.message
    # Only a queue unsuspends a queued Job: so it was admitted, even if its Workload is unseen.
    assert admission.admission(None, RUNNING_JOB, "team-a").admitted


# ----------------------------------------------------------------------------- decide_run


def run_object(trainer: dict[str, Any], status: dict | None = None) -> dict:
    return {
        "apiVersion": "fastslow.io/v1alpha1",
        "kind": "FastSlowRun",
        "metadata": {"name": "acme", "namespace": "team", "uid": "u-1", "generation": 2},
        "spec": {"config": {"task": TASK, "steps": 4}, "trainer": trainer},
        "status": status or {},
    }


def decide(job: dict, wl: dict | None, trainer: dict | None = None, status: dict | None = None):
    run = run_object({"queueName": "team-a"} if trainer is None else trainer, status)
    return builders.decide_run(run, FastSlowRunSpec.model_validate(run["spec"]), job, None, wl)


def test_a_run_waiting_for_quota_is_suspended_and_says_why() -> None:
    d = decide(SUSPENDED_JOB, WAITING)
    admitted = d.status.condition(ConditionType.ADMITTED)
    suspended = d.status.condition(ConditionType.SUSPENDED)
    assert d.status.phase == "Suspended"
    assert admitted is not None and suspended is not None
    assert (admitted.status, admitted.reason, admitted.message) == (
        "False",
        "WaitingForQuota",
        NO_ROOM,
    )
    assert suspended.reason == "Queued"
    assert suspended.message == f"waiting for admission by queue team-a: {NO_ROOM}"


def test_an_admitted_run_runs() -> None:
    waiting = decide(SUSPENDED_JOB, WAITING).status.dump()
    d = decide(RUNNING_JOB, ADMITTED, status=waiting)
    admitted = d.status.condition(ConditionType.ADMITTED)
    assert d.status.phase == "Running"
    assert admitted is not None and (admitted.status, admitted.reason) == ("True", "Admitted")
    # The condition's transition time moved with its status.
    before = decide(SUSPENDED_JOB, WAITING).status.condition(ConditionType.ADMITTED)
    assert before is not None and admitted.last_transition_time >= before.last_transition_time


def test_runs_without_a_queue_have_no_admitted_condition() -> None:
    d = decide(RUNNING_JOB, None, trainer={})
    assert d.status.condition(ConditionType.ADMITTED) is None
    queued_before = decide(SUSPENDED_JOB, WAITING).status.dump()
    # The queue taken out of the spec: the condition goes with it.
    d = decide(RUNNING_JOB, None, trainer={}, status=queued_before)
    assert d.status.condition(ConditionType.ADMITTED) is None
