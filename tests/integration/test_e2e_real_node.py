"""End to end on the REAL test node: `helm install` the chart with the images built here, apply
a TaskStream, watch real trainer containers train SmolLM2 stage after stage, `helm uninstall`.

Everything runs as containers under kubelet + containerd + runc (tests/k8s/node.py):
- the operator is the image of operator/Dockerfile (slim, no torch), the trainers the image of
  trainer-image/Dockerfile.cpu, both built by buildah from those files (tests/k8s/image_build.py)
  and imported into the node's containerd;
- the operator authenticates with the chart's ServiceAccount token (a real TokenRequest token
  projected by the kubelet; RBAC enforced) and reaches the apiserver at the node's address:
  KUBERNETES_SERVICE_HOST/PORT point there (no kube-proxy in the test cluster, so the
  `kubernetes` Service's ClusterIP routes nowhere);
- the namespace enforces PodSecurity `restricted`: every pod runs as UID 10001 with a read-only
  root, no capabilities, seccomp RuntimeDefault, CPU and memory limits enforced by the kernel;
- MinIO and PostgreSQL run on the machine, bound to the node's address: what an S3 service
  and a database outside the cluster are to a real one.

Then the faults only a real node shows: a trainer OOM-killed by the kernel at its memory limit,
a trainer pod deleted mid-run (the next attempt resumes from S3), and a hung operator that its
probes take out of its Service and restart.

The process-kubelet control plane (tests/k8s/process_kubelet.py) still runs the faster operator
tests; this module is the one end-to-end test, on the real node. Its first run on a machine
builds the images (about 10 minutes, cached in $FST_CACHE/node-images).
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from tests.k8s.cluster import TestCluster
from tests.k8s.image_build import build_record, operator_image, trainer_cpu_image
from tests.k8s.node import REAL_NODE_SELECTOR, REAL_NODE_TAINT, REAL_NODE_TOLERATION, RealNode
from tests.k8s.operator_proc import (
    GROUP,
    TINY_TASK,
    VERSION,
    Resources,
    dump,
    phase,
    tiny_config,
)
from tests.k8s.waiting import wait_until
from tests.servers import MinioServer, PostgresServer, minio_server, postgres_server

pytest_plugins = ["tests.k8s.fixtures"]
pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RELEASE = "fastslow"
TASK = TINY_TASK
BUCKET = "fst-e2e"


@pytest.fixture(scope="module")
def node_stores(k8s_real_node: RealNode) -> Iterator[tuple[MinioServer, PostgresServer]]:
    """MinIO and PostgreSQL on the real node's address, reachable from its pods."""
    with (
        minio_server(bucket=BUCKET, host=k8s_real_node.ip) as minio,
        postgres_server(host=k8s_real_node.ip) as postgres,
    ):
        yield minio, postgres


@pytest.fixture(scope="module")
def images(k8s_real_node: RealNode) -> dict[str, str]:
    """Build (or take from the cache) and import the operator and CPU trainer images; their
    sizes and times are printed for the log."""
    names = {}
    for role, build in (("operator", operator_image), ("trainer", trainer_cpu_image)):
        archive = build()
        t0 = time.monotonic()
        k8s_real_node.import_image(archive)
        record = build_record(archive)
        print(
            f"{role} image {archive.name}: {record['bytes'] / 2**20:.0f} MiB archive, built in "
            f"{record['seconds']} s, imported in {time.monotonic() - t0:.0f} s"
        )
        names[role] = archive.name
    return names


def helm(cluster, *args: str, timeout: float = 300) -> str:
    cmd = [str(cluster.bins["helm"]), "--kubeconfig", str(cluster.kubeconfig), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def release_objects(api: k8s.ApiClient, namespace: str) -> list[str]:
    """Everything in `namespace` labelled as part of the release."""
    selector = f"app.kubernetes.io/instance={RELEASE}"
    core, apps = k8s.CoreV1Api(api), k8s.AppsV1Api(api)
    rbac = k8s.RbacAuthorizationV1Api(api)
    listings = {
        "Deployment": apps.list_namespaced_deployment,
        "StatefulSet": apps.list_namespaced_stateful_set,
        "Service": core.list_namespaced_service,
        "ConfigMap": core.list_namespaced_config_map,
        "Secret": core.list_namespaced_secret,
        "ServiceAccount": core.list_namespaced_service_account,
        "Pod": core.list_namespaced_pod,
        "Role": rbac.list_namespaced_role,
        "RoleBinding": rbac.list_namespaced_role_binding,
    }
    return [
        f"{kind}/{item.metadata.name}"
        for kind, list_fn in listings.items()
        for item in list_fn(namespace, label_selector=selector).items
    ]


@dataclass
class Release:
    """The chart installed in a `restricted` namespace, its operator Running on the real node."""

    cluster: TestCluster
    node: RealNode
    ns: str
    res: Resources
    images: dict[str, str]
    s3_uri: str
    operator_pod: str

    def describe(self) -> str:
        core = k8s.CoreV1Api(self.cluster.api())
        pods = core.list_namespaced_pod(self.ns).items
        lines = [f"{p.metadata.name}: {p.status.phase} {p.status.container_statuses}" for p in pods]
        lines.append(core.read_namespaced_pod_log(self.operator_pod, self.ns)[-5000:])
        return "\n".join(lines)

    def trainer(self, **over: Any) -> dict[str, Any]:
        """spec.trainer for a CPU trainer container on the real node."""
        return {
            "gpus": 0,
            "image": self.images["trainer"],
            # The node's 2 cores, less the operator's 100m request.
            "cpu": "1800m",
            "memory": "6Gi",
            # A resumed SmolLM2 attempt holds the GGUF-converted model, the downloaded
            # checkpoint and the staging of the next one: with 4Gi it was evicted.
            "scratchSize": "12Gi",
            "nodeSelector": REAL_NODE_SELECTOR,
            "tolerations": [REAL_NODE_TOLERATION],
            **over,
        }

    def operator_routed(self) -> str | None:
        """The operator pod's address when it is Ready AND its metrics Service routes to it
        (the EndpointSlice marks its address ready: what kube-proxy and Prometheus's service
        discovery follow); None otherwise."""
        api = self.cluster.api()
        pod = k8s.CoreV1Api(api).read_namespaced_pod(self.operator_pod, self.ns)
        conds = {c.type: c.status for c in pod.status.conditions or []}
        slices = k8s.DiscoveryV1Api(api).list_namespaced_endpoint_slice(
            self.ns, label_selector=f"kubernetes.io/service-name={RELEASE}-operator-metrics"
        )
        ready = [
            address
            for item in slices.items
            for endpoint in item.endpoints or []
            if endpoint.conditions.ready
            for address in endpoint.addresses
        ]
        ok = conds.get("Ready") == "True" and pod.status.pod_ip in ready
        return pod.status.pod_ip if ok else None

    def operator_metrics(self, pod_ip: str) -> bytes:
        (container,) = (
            k8s.CoreV1Api(self.cluster.api())
            .read_namespaced_pod(self.operator_pod, self.ns)
            .spec.containers
        )
        port = next(p.container_port for p in container.ports if p.name == "metrics")
        with urllib.request.urlopen(f"http://{pod_ip}:{port}/metrics", timeout=10) as reply:
            return reply.read()

    def wait_run(self, name: str, phases: tuple[str, ...], timeout: float) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            run = self.res.run(name)
            return run if phase(run) in phases else None

        return wait_until(reached, timeout, f"run {name} {'/'.join(phases)}", self.describe, 2)


@pytest.fixture(scope="module")
def release(
    k8s_cluster: TestCluster,
    k8s_real_node: RealNode,
    node_stores: tuple[MinioServer, PostgresServer],
    images: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Release]:
    """`helm install` with the built images; `helm uninstall` at the end, checked."""
    api = k8s_cluster.api()
    ns = k8s_cluster.create_namespace(
        "e2e-real-node", {"pod-security.kubernetes.io/enforce": "restricted"}
    )
    minio, postgres = node_stores
    s3_env = minio.env()
    s3_uri = f"s3://{BUCKET}/e2e"
    operator_repo, operator_tag = images["operator"].rsplit(":", 1)
    values = {
        "operator": {
            "image": {"repository": operator_repo, "tag": operator_tag},
            "nodeSelector": REAL_NODE_SELECTOR,
            "tolerations": [REAL_NODE_TOLERATION],
            # Quicker than the chart's defaults, for the hung-operator test: restarted after
            # 3 missed probes 10 s apart.
            "livenessProbe": {
                "initialDelaySeconds": 30,
                "periodSeconds": 10,
                "timeoutSeconds": 5,
                "failureThreshold": 3,
            },
            "extraEnv": [
                {"name": "FST_PROGRESS_INTERVAL", "value": "2"},
                {"name": "FST_STREAM_POLL_INTERVAL", "value": "3"},
                # The apiserver at the node's address (module docstring).
                *k8s_real_node.apiserver_env(),
            ],
        },
        "s3": {
            "external": {
                "endpoint": s3_env["AWS_ENDPOINT_URL"],
                "accessKey": s3_env["AWS_ACCESS_KEY_ID"],
                "secretKey": s3_env["AWS_SECRET_ACCESS_KEY"],
            }
        },
        "database": {"external": {"url": postgres.create_database("e2e")}},
        # One customer per namespace: the operator makes this namespace's own MinIO user and
        # database role (the stores' admin logins stay in the chart's Secrets).
        "tenancy": {"prefix": f"{s3_uri}/tenants"},
        # The policy for this cluster: the built images, the real node's label and taint.
        "policy": {
            "images": ["ghcr.io/fastslow/"],
            "nodeSelectors": [f"{k}={v}" for k, v in REAL_NODE_SELECTOR.items()],
            "tolerations": [f"{REAL_NODE_TAINT}:NoSchedule"],
            "maxGpus": 0,
        },
    }
    values_file = tmp_path_factory.mktemp("e2e") / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    chart = str(REPO / "helm" / "fastslow")
    helm(k8s_cluster, "install", RELEASE, chart, "-n", ns, "-f", str(values_file))

    core = k8s.CoreV1Api(api)
    label = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator"

    def operator_pod():
        pods = core.list_namespaced_pod(ns, label_selector=label).items
        running = [p for p in pods if p.status.phase == "Running"]
        return running[0] if running else None

    def pods() -> str:
        return str([(p.metadata.name, p.status.phase) for p in core.list_namespaced_pod(ns).items])

    pod = wait_until(operator_pod, 180, "operator pod Running", pods, poll=1.0)
    assert pod.spec.node_name == k8s_real_node.name
    assert pod.spec.service_account_name == f"{RELEASE}-operator"
    (status,) = pod.status.container_statuses
    assert status.container_id.startswith("containerd://") and status.image == images["operator"]
    name = pod.metadata.name
    wait_until(
        lambda: "fastslow operator:" in core.read_namespaced_pod_log(name, ns),
        120,
        "operator started",
        lambda: core.read_namespaced_pod_log(name, ns)[-3000:],
        1.0,
    )

    # The kubelet's readiness probe (kopf's /healthz) passes, and only then does the metrics
    # Service route to the pod; the operator's metrics answer at the pod's address on the
    # node's bridge.
    release = Release(k8s_cluster, k8s_real_node, ns, Resources(api, ns), images, s3_uri, name)
    pod_ip = wait_until(
        release.operator_routed, 120, "operator Ready behind its metrics Service", pods, 1.0
    )
    assert b"fastslow" in release.operator_metrics(pod_ip)
    yield release

    # Uninstall: the user's objects first (their runs, Jobs, ConfigMaps go with them), then
    # the chart; only the CRDs stay (Helm never deletes a chart's crds/).
    res = Resources(api, ns)
    for stream in res.custom.list_namespaced_custom_object(GROUP, VERSION, ns, "taskstreams")[
        "items"
    ]:
        name = stream["metadata"]["name"]
        res.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "taskstreams", name)
    for run in res.runs():
        # A stream's stage runs are also being collected with their deleted stream: one can be
        # gone between the list and its delete (seen once in CI: 404 on "customer-add").
        name = run["metadata"]["name"]
        try:
            res.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "fastslowruns", name)
        except k8s.ApiException as e:
            if e.status != 404:
                raise
    wait_until(lambda: not res.runs() and not res.jobs(), 120, "user objects gone", pods, 1.0)
    helm(k8s_cluster, "uninstall", RELEASE, "-n", ns, "--wait", "--timeout", "120s")
    wait_until(
        lambda: release_objects(api, ns) == [] or None,
        120,
        "release objects gone",
        lambda: str(release_objects(api, ns)),
        1.0,
    )
    crds = k8s.ApiextensionsV1Api(api).list_custom_resource_definition().items
    assert {f"fastslowruns.{GROUP}", f"taskstreams.{GROUP}"} <= {c.metadata.name for c in crds}


def test_a_stream_trains_stage_after_stage_in_containers(release: Release) -> None:
    api, ns, res = release.cluster.api(), release.ns, release.res
    core = k8s.CoreV1Api(api)
    # `kubectl apply -f taskstream.yaml`: the stream, with trainer containers on the real node.
    spec = {
        "model": {"name": "smollm2-135m-instruct"},
        "evalProblems": 4,  # each stage's gate (a Job too) scores 4 problems per stage
        "defaults": {
            "mode": "rl",
            "seed": 1,
            "rollout": {"temperature": 0.8, "maxNewTokens": 8, "batchSize": 16},
            "slow": {"problemsPerStep": 2, "groupSize": 2, "microBatchSize": 4},
            "metrics": {"klPrompts": 1, "klEvery": 1},
            "checkpoint": {"every": 2, "keepLast": 1},
        },
        "trainer": release.trainer(),
        "stages": [
            {"name": "add", "task": TASK, "steps": 2},
            {"name": "add-more", "task": {**TASK, "seed": 7}, "steps": 2},
        ],
    }
    res.create("taskstreams", "TaskStream", "customer", spec)

    def done() -> dict[str, Any] | None:
        stream = res.stream("customer")
        stages = (stream.get("status") or {}).get("stages") or []
        ok = phase(stream) == "Succeeded" and len(stages) == 2
        return stream if ok else None

    stream = wait_until(done, 1200, "both stages Succeeded", release.describe, poll=2)
    first, second = res.run("customer-add"), res.run("customer-add-more")
    for run in (first, second):
        s = run["status"]
        assert s["phase"] == "Succeeded" and s["step"] == 2, dump(s)
        assert s["checkpointUri"].startswith(f"{release.s3_uri}/tenants/{ns}/runs/"), dump(s)
        assert "reward" in s and "kl" in s, dump(s)
    # Stage 2 started from stage 1's final checkpoint in S3; the defaults came from the chart.
    assert second["spec"]["config"]["model"]["name"] == first["status"]["checkpointUri"]
    job = k8s.BatchV1Api(api).read_namespaced_job("customer-add-a1", ns)
    # The trainers got only the namespace's own credentials, which the operator made through
    # its RBAC (create, then get/update of that one name).
    (container,) = job.spec.template.spec.containers
    assert [e.secret_ref.name for e in container.env_from] == ["fastslow-tenant"]
    assert "FST_DATABASE_URL" not in {e.name for e in container.env}
    assert container.resources.limits["memory"] == "6Gi"
    tenant = core.read_namespaced_secret("fastslow-tenant", ns).data
    assert base64.b64decode(tenant["AWS_ACCESS_KEY_ID"]).decode() == f"fst-{ns}"
    assert [s["phase"] for s in stream["status"]["stages"]] == ["Succeeded", "Succeeded"]
    # The trainers were containers of the built image on the real node, and ended cleanly.
    trainers = core.list_namespaced_pod(ns, label_selector="job-name=customer-add-a1").items
    assert trainers and all(p.spec.node_name == release.node.name for p in trainers)
    (trainer,) = trainers[0].status.container_statuses
    assert trainer.image == release.images["trainer"]
    assert trainer.state.terminated.exit_code == 0

    # Each stage was gated by `fst gate` in a restricted container of the same image, which
    # published the promoted bundle to the namespace's S3 prefix; the stream serves it.
    # (The stream advances as soon as the gate's decision is in the database; the gate's
    # container then still deletes the checkpoints it downloaded before it exits.)
    def gate_exited() -> Any:
        pods = core.list_namespaced_pod(ns, label_selector="job-name=customer-add-more-gate")
        statuses = [p.status.container_statuses for p in pods.items]
        done = pods.items and all(s and s[0].state.terminated for s in statuses)
        return pods.items if done else None

    gates = wait_until(gate_exited, 120, "the gate container exited", poll=1.0)
    assert gates[0].spec.node_name == release.node.name
    assert gates[0].spec.containers[0].security_context.read_only_root_filesystem
    assert [g.status.container_statuses[0].state.terminated.exit_code for g in gates] == [0]
    gate = second["status"]["gate"]
    assert gate["reason"] in ("GatePassed", "InsufficientGain") or gate["reason"].startswith(
        "RegressionOn"
    ), dump(gate)
    served = core.read_namespaced_config_map("customer-serving", ns).data
    serving = stream["status"]["serving"]
    assert served["stage"] == (serving.get("stage") or ""), (served, serving)
    if served["stage"]:
        assert served["model"].startswith(f"{release.s3_uri}/tenants/{ns}/runs/"), served
        assert "/bundle/step-" in served["model"] and served["systemPrompt"]


def test_a_trainer_over_its_memory_limit_fails_the_run_as_oom_killed(release: Release) -> None:
    """The kernel kills the trainer at its limit (the model alone is bigger than 300Mi); the
    run fails at once, its condition names OOMKilled and the limit."""
    config = tiny_config(model={"name": "smollm2-135m-instruct"}, steps=2)
    spec = {"config": config, "backoffLimit": 2, "trainer": release.trainer(memory="300Mi")}
    release.res.create("fastslowruns", "FastSlowRun", "hungry", spec)
    run = release.wait_run("hungry", ("Failed",), 300)
    status = run["status"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "OOMKilled", dump(status)
    assert "memory limit 300Mi (exit 137)" in failed["message"], dump(status)
    assert status["attempt"] == 1 and status["lastError"] == failed["message"]
    events = k8s.CoreV1Api(release.cluster.api()).list_namespaced_event(release.ns).items
    assert any(e.reason == "OOMKilled" and e.involved_object.name == "hungry" for e in events)


def test_deleting_the_trainer_pod_resumes_from_the_last_checkpoint(release: Release) -> None:
    """A pod deleted mid-run (a node drain, an eviction, a user): the attempt fails, the next
    one resumes from the last S3 checkpoint rather than starting over."""
    config = tiny_config(
        model={"name": "smollm2-135m-instruct"}, steps=4, checkpoint={"every": 1, "keepLast": 2}
    )
    spec = {"config": config, "backoffLimit": 2, "trainer": release.trainer()}
    release.res.create("fastslowruns", "FastSlowRun", "drained", spec)
    core = k8s.CoreV1Api(release.cluster.api())

    def checkpointed() -> dict[str, Any] | None:
        status = release.res.run("drained").get("status") or {}
        return status if status.get("checkpointUri") and (status.get("step") or 0) >= 1 else None

    before = wait_until(checkpointed, 600, "a first checkpoint", release.describe, 2)
    pods = core.list_namespaced_pod(release.ns, label_selector="job-name=drained-a1").items
    (pod,) = [p for p in pods if p.status.phase == "Running"]
    core.delete_namespaced_pod(pod.metadata.name, release.ns)
    run = release.wait_run("drained", ("Succeeded", "Failed"), 900)
    status = run["status"]
    assert status["phase"] == "Succeeded" and status["step"] == 4, dump(status)
    assert status["attempt"] == 2, dump(status)
    retrying = k8s.CoreV1Api(release.cluster.api()).list_namespaced_event(release.ns).items
    resumed = [e.message for e in retrying if e.reason == "Retrying"]
    assert resumed and "attempt 2 resumes from the latest checkpoint" in resumed[0]
    # Attempt 2 began where attempt 1's checkpoint left off: its log says so (fst/loop.py).
    (second,) = core.list_namespaced_pod(release.ns, label_selector="job-name=drained-a2").items
    log = core.read_namespaced_pod_log(second.metadata.name, release.ns)
    resumed_at = re.search(r"resumed \S+ at step (\d+)", log)
    assert resumed_at is not None, log[-3000:]
    # At least the checkpoint the run's status named before the deletion (a later one may
    # have been committed meanwhile; one being uploaded at the deletion is not resumed from).
    saved = int(re.search(r"step-(\d+)", before["checkpointUri"]).group(1))
    assert int(resumed_at.group(1)) >= saved >= 1


def test_a_hung_operator_leaves_its_service_and_is_restarted(release: Release) -> None:
    """The operator's probes, enforced by a real kubelet. Its processes are stopped (SIGSTOP:
    what a deadlocked event loop looks like from outside — the port accepts, nothing
    answers): the readiness probe times out and the metrics Service stops routing to the pod;
    the liveness probe then fails and the kubelet restarts the container (SIGKILL ends a
    stopped process), which comes back Ready and routed to, its metrics answering."""
    core = k8s.CoreV1Api(release.cluster.api())
    pod = core.read_namespaced_pod(release.operator_pod, release.ns)
    (status,) = pod.status.container_statuses
    restarts = status.restart_count
    pids = release.node.container_pids(status.container_id.removeprefix("containerd://"))
    assert pids, status

    def restarted() -> bool:
        pod = core.read_namespaced_pod(release.operator_pod, release.ns)
        (now,) = pod.status.container_statuses
        return now.restart_count > restarts

    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(
            lambda: release.operator_routed() is None,
            60,
            "the hung operator out of its Service",
            release.describe,
            0.5,
        )
        wait_until(restarted, 240, "the hung operator restarted", release.describe, 1.0)
    finally:
        for pid in pids:  # a test that failed above leaves no stopped operator behind
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    pod_ip = wait_until(
        release.operator_routed, 180, "the operator back in its Service", release.describe, 1.0
    )
    assert b"fastslow" in release.operator_metrics(pod_ip)
    events = core.list_namespaced_event(
        release.ns, field_selector=f"involvedObject.name={release.operator_pod}"
    ).items
    unhealthy = " ".join(e.message for e in events if e.reason == "Unhealthy")
    assert "Readiness probe failed" in unhealthy and "Liveness probe failed" in unhealthy, unhealthy
