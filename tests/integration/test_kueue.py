"""Queued runs under Kueue's REAL controller (tests/k8s/kueue.py) and the operator.

A ClusterQueue with 8 nvidia.com/gpu of quota (a ResourceFlavor for the kwok GPU nodes) and a
LocalQueue in the test's namespace. The trainer image fst.test/hold keeps a run's pods Running
on kwok (tests/k8s/kwok-stages.yaml) until the test releases them (annotation
fst.test/kwok-release), so a run holds its quota as long as the test wants:

- two runs of 8 GPUs: the first is admitted and runs; the second waits suspended, with no
  pod, and its conditions say why in Kueue's words; the first ends, the second is admitted;
- a 2-node run is admitted as one gang: 2 x 8 GPUs never fits 8 (no pod, ever, and the run
  says why); 2 x 4 fits (both pods at once).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.kueue import GPU, KueueController
from tests.k8s.operator_proc import (
    OperatorProcess,
    Resources,
    condition,
    dump,
    phase,
    tiny_config,
)
from tests.k8s.waiting import wait_until

pytest_plugins = ["tests.k8s.fixtures"]
pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOLD_IMAGE = "fst.test/hold"  # kwok keeps its pods Running until released or deleted
RELEASE = {"metadata": {"annotations": {"fst.test/kwok-release": "true"}}}
QUOTA_GPUS = 8


@pytest.fixture
def res(k8s_cluster, kueue_namespace: str, crds) -> Resources:
    return Resources(k8s_cluster.api(), kueue_namespace)


@pytest.fixture
def queue(kueue: KueueController, kueue_namespace: str) -> str:
    """The LocalQueue of the namespace: 8 GPUs of quota on the kwok GPU nodes."""
    return kueue.create_queues(kueue_namespace, {GPU: QUOTA_GPUS})


@pytest.fixture
def operator(k8s_cluster, kueue_namespace: str, crds, tmp_path: Path):
    log = tmp_path / "operator.log"
    op = OperatorProcess(
        k8s_cluster.kubeconfig,
        [kueue_namespace],
        log,
        {"FST_DEFAULT_CHECKPOINT_URI": "s3://bucket/runs"},
    )
    op.start()
    yield op
    op.stop()
    print(f"operator log ({log}):\n{log.read_text()[-6000:]}")  # shown if the test fails


def create_run(res: Resources, name: str, queue: str, **trainer: Any) -> None:
    spec = {
        "config": tiny_config(),
        "trainer": {"image": HOLD_IMAGE, "queueName": queue, **trainer},
        "backoffLimit": 0,
    }
    res.create("fastslowruns", "FastSlowRun", name, spec)


def pods(res: Resources, run: str) -> list[Any]:
    items = res.core.list_namespaced_pod(res.ns, label_selector=f"fastslow.io/run={run}").items
    return [p for p in items if p.metadata.deletion_timestamp is None]


def running_pods(res: Resources, run: str) -> list[Any]:
    return [p for p in pods(res, run) if p.status.phase == "Running"]


def job(res: Resources, run: str) -> Any:
    return res.batch.read_namespaced_job(f"{run}-a1", res.ns)


def admitted(res: Resources, run: str) -> dict[str, Any] | None:
    """The run's Admitted condition once it is True."""
    c = condition(res.run(run), "Admitted")
    return c if c is not None and c["status"] == "True" else None


def not_admitted(res: Resources, run: str, reason: str) -> dict[str, Any] | None:
    c = condition(res.run(run), "Admitted")
    return c if c is not None and c["status"] == "False" and c["reason"] == reason else None


def describe(res: Resources, kueue: KueueController, op: OperatorProcess):
    def text() -> str:
        runs = {r["metadata"]["name"]: r.get("status") for r in res.runs()}
        workloads = {w["metadata"]["name"]: w.get("status") for w in kueue.workloads(res.ns)}
        return f"runs: {dump(runs)}\nworkloads: {dump(workloads)}\n{op.tail()}"

    return text


def test_a_second_run_waits_for_quota_and_runs_when_the_first_ends(
    res: Resources, kueue: KueueController, queue: str, operator: OperatorProcess
) -> None:
    explain = describe(res, kueue, operator)

    def wait(what: str, check, timeout: float = 60) -> Any:
        return wait_until(check, timeout, what, explain)

    create_run(res, "first", queue, gpusPerNode=8)
    # Admitted: Kueue unsuspended the Job, its pod runs, and the run says so.
    wait(
        "first admitted and running", lambda: admitted(res, "first") and running_pods(res, "first")
    )
    assert job(res, "first").spec.suspend is False
    first = wait("first Running", lambda: phase(res.run("first")) == "Running" and res.run("first"))
    assert condition(first, "Admitted")["message"] == f"admitted by ClusterQueue {queue}"
    # The flavor's node labels were put on the pod by Kueue: it runs on a kwok GPU node.
    (pod,) = pods(res, "first")
    assert pod.spec.node_selector == {"nvidia.com/gpu.present": "true"}
    assert pod.spec.node_name.startswith("gpu-node-")

    create_run(res, "second", queue, gpusPerNode=8)
    waiting = wait("second waits for quota", lambda: not_admitted(res, "second", "WaitingForQuota"))
    # Kueue's own words: "couldn't assign flavors to pod set main: insufficient unused quota
    # for nvidia.com/gpu in flavor <flavor>, 8 more needed".
    assert "insufficient" in waiting["message"] and GPU in waiting["message"], waiting
    assert "8 more needed" in waiting["message"], waiting
    second = res.run("second")
    assert phase(second) == "Suspended"
    suspended = condition(second, "Suspended")
    assert suspended["status"] == "True" and suspended["reason"] == "Queued"
    assert suspended["message"] == f"waiting for admission by queue {queue}: {waiting['message']}"
    # And it stays so: suspended, no pod, while the first holds the quota (several of the
    # operator's reconciles, every 2 s, and Kueue's requeues).
    for _ in range(10):
        assert job(res, "second").spec.suspend is True
        assert pods(res, "second") == []
        assert phase(res.run("second")) == "Suspended"
        time.sleep(0.5)
    workload = kueue.workload_of(res.ns, job(res, "second").metadata.uid)
    assert workload is not None and workload["spec"]["queueName"] == queue

    # The first ends (its trainer "exits 0"): the quota is released and the second admitted.
    res.core.patch_namespaced_pod(pod.metadata.name, res.ns, RELEASE)
    wait("first Succeeded", lambda: phase(res.run("first")) == "Succeeded")
    wait(
        "second admitted and running",
        lambda: admitted(res, "second") and running_pods(res, "second"),
    )
    assert job(res, "second").spec.suspend is False
    wait("second Running", lambda: phase(res.run("second")) == "Running")
    suspended = condition(res.run("second"), "Suspended")
    assert suspended["status"] == "False" and suspended["reason"] == "NotSuspended"
    for p in pods(res, "second"):
        res.core.patch_namespaced_pod(p.metadata.name, res.ns, RELEASE)
    wait("second Succeeded", lambda: phase(res.run("second")) == "Succeeded")


def test_a_multi_node_run_is_admitted_as_one_gang(
    res: Resources, kueue: KueueController, queue: str, operator: OperatorProcess
) -> None:
    explain = describe(res, kueue, operator)

    def wait(what: str, check, timeout: float = 60) -> Any:
        return wait_until(check, timeout, what, explain)

    # 2 x 8 GPUs: more than the queue's 8, so never admitted, and no pod is ever made (not one
    # pod of the two holding half the GPUs while the other waits).
    create_run(res, "wide", queue, nodes=2, gpusPerNode=8)
    wide = wait("wide waits for quota", lambda: not_admitted(res, "wide", "WaitingForQuota"))
    # "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu in flavor
    # <flavor>, previously considered podsets requests (0) + current podset request (16) >
    # maximum capacity (8)": the gang's whole request, never one pod's.
    assert GPU in wide["message"] and "request (16) > maximum capacity (8)" in wide["message"]
    spec = job(res, "wide").spec
    assert (spec.parallelism, spec.completions, spec.completion_mode) == (2, 2, "Indexed")
    # Both pods of the gang are one pod set of the Workload: 2 pods x 8 GPUs.
    workload = kueue.workload_of(res.ns, job(res, "wide").metadata.uid)
    assert workload is not None
    (pod_set,) = workload["spec"]["podSets"]
    assert pod_set["count"] == 2
    limits = pod_set["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits[GPU] == "8"

    # 2 x 4 GPUs fits: both pods at once, each with 4 GPUs. (The wide run ahead of it in the
    # queue does not block it: Kueue's default BestEffortFIFO passes what cannot fit.)
    create_run(res, "pair", queue, nodes=2, gpusPerNode=4)
    wait("pair admitted", lambda: admitted(res, "pair"))
    both = wait(
        "both pods of pair Running",
        lambda: len(running_pods(res, "pair")) == 2 and pods(res, "pair"),
    )
    assert sorted(p.spec.containers[0].resources.limits[GPU] for p in both) == ["4", "4"]
    spec = job(res, "pair").spec
    assert (spec.parallelism, spec.suspend) == (2, False)
    wait("pair Running", lambda: phase(res.run("pair")) == "Running")

    # The wide run never got a pod, and still says why.
    for _ in range(6):
        assert pods(res, "wide") == []
        assert job(res, "wide").spec.suspend is True
        time.sleep(0.5)
    run = res.run("wide")
    assert phase(run) == "Suspended"
    assert condition(run, "Admitted")["reason"] == "WaitingForQuota"
    assert GPU in condition(run, "Suspended")["message"]
