"""Kueue's admission of a run's Job, as the run's condition: pure functions on Workload dicts.

A queued run (spec.trainer.queueName) has its Job created suspended; Kueue makes a Workload
for it (kueue.x-k8s.io/v1beta2, owned by the Job, labelled kueue.x-k8s.io/job-uid), reserves
quota in a ClusterQueue when the whole Job fits (all its pods or none: gang admission), then
unsuspends the Job. Its Workload's conditions say where that stands:

    QuotaReserved  False, reason Pending: "couldn't assign flavors to pod set main: insufficient
                   quota for nvidia.com/gpu in flavor gpu, 8 more needed"
                   False, reason Inadmissible: "LocalQueue team-a doesn't exist", a stopped queue
    Admitted       True once quota is reserved and every admission check passed
    Evicted        True when Kueue takes the quota back (preemption, a stopped queue, ...)
    Finished       True when the Job ended

`admission()` turns that into the run's Admitted condition (reason and Kueue's message); the
handlers (handlers.py) keep the Workloads in a kopf index by their Job and pass the one of the
run's current Job to builders.decide_run. Without Kueue (its CRDs absent) there is no Workload,
and a queued run says that it waits for one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fst.k8s.status import Reason

GROUP, VERSION, PLURAL = "kueue.x-k8s.io", "v1beta2", "workloads"
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"

# Kueue's reason for a QuotaReserved=False that only waits for room in the queue.
KUEUE_PENDING = "Pending"
KUEUE_INADMISSIBLE = "Inadmissible"


@dataclass(frozen=True)
class Admission:
    """The run's Admitted condition: admitted or not, a reason, and what Kueue says."""

    admitted: bool
    reason: Reason
    message: str


def owning_job(workload: dict[str, Any]) -> str | None:
    """The name of the batch/v1 Job that owns `workload`, if a Job does."""
    for ref in (workload.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == "Job" and str(ref.get("apiVersion", "")).startswith("batch/"):
            name: str | None = ref.get("name")
            return name
    return None


def workload_summary(workload: dict[str, Any]) -> dict[str, Any]:
    """What admission() reads of a Workload, in the Workload's own shape: kept per Job in
    kopf's in-memory index instead of the whole object (its pod sets hold the pod template)."""
    meta = workload.get("metadata") or {}
    status = workload.get("status") or {}
    admission_ = status.get("admission") or {}
    return {
        "metadata": {
            "name": meta.get("name"),
            "creationTimestamp": meta.get("creationTimestamp"),
        },
        "status": {
            "conditions": [
                {k: c.get(k) for k in ("type", "status", "reason", "message")}
                for c in status.get("conditions") or []
            ],
            "admission": {"clusterQueue": admission_.get("clusterQueue")},
        },
    }


def newest(workloads: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The Job's current Workload when Kueue made more than one (it replaces a Workload whose
    Job changed): the newest. RFC 3339 timestamps in UTC sort as strings."""
    if not workloads:
        return None
    return max(workloads, key=lambda w: (w.get("metadata") or {}).get("creationTimestamp") or "")


def _condition(workload: dict[str, Any], type_: str) -> dict[str, Any] | None:
    conds = (workload.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c.get("type") == type_), None)


def _true(cond: dict[str, Any] | None) -> bool:
    return cond is not None and cond.get("status") == "True"


def _said(cond: dict[str, Any] | None) -> str:
    return " ".join(str((cond or {}).get("message") or "").split())


def admission(workload: dict[str, Any] | None, job: dict[str, Any] | None, queue: str) -> Admission:
    """The Admitted condition of a run queued in LocalQueue `queue`, from the Workload of its
    current Job (None: Kueue has made none, or is not installed) and that Job."""
    job_name = ((job or {}).get("metadata") or {}).get("name") or "the Job"
    suspended = bool(((job or {}).get("spec") or {}).get("suspend"))
    if workload is None:
        if job is not None and not suspended:
            # Only the queue's controller unsuspends a queued Job (the operator never does).
            return Admission(True, Reason.ADMITTED, f"Job {job_name} unsuspended by its queue")
        return Admission(
            False,
            Reason.NO_WORKLOAD,
            f"no Kueue Workload for Job {job_name} yet: is Kueue running, with LocalQueue "
            f"{queue} and this namespace managed by it?",
        )
    admitted = _condition(workload, "Admitted")
    reserved = _condition(workload, "QuotaReserved")
    evicted = _condition(workload, "Evicted")
    cluster_queue = ((workload.get("status") or {}).get("admission") or {}).get("clusterQueue")
    where = f"ClusterQueue {cluster_queue}" if cluster_queue else f"queue {queue}"
    if _true(admitted):
        return Admission(True, Reason.ADMITTED, f"admitted by {where}")
    if _true(evicted):
        kueue_reason = (evicted or {}).get("reason") or "Evicted"
        return Admission(False, Reason.EVICTED, f"{kueue_reason}: {_said(evicted)}".strip(": "))
    if _true(reserved):
        # Quota is held; admission checks (if the ClusterQueue has any) are still pending.
        why = _said(admitted) or "waiting for admission checks"
        return Admission(False, Reason.QUOTA_RESERVED, f"quota reserved in {where}; {why}")
    if reserved is None:  # made, and not yet looked at by Kueue's scheduler
        return Admission(False, Reason.QUEUED, f"waiting in LocalQueue {queue}")
    kueue_reason = reserved.get("reason") or ""
    message = _said(reserved)
    if kueue_reason == KUEUE_PENDING:
        return Admission(False, Reason.WAITING_FOR_QUOTA, message or f"waiting in {where}")
    if kueue_reason == KUEUE_INADMISSIBLE:
        return Admission(False, Reason.INADMISSIBLE, message or "inadmissible")
    # A reason of a newer Kueue: named in the message, the condition's reason stays ours.
    return Admission(False, Reason.NOT_ADMITTED, f"{kueue_reason}: {message}".strip(": "))
