"""The test Kubernetes control plane (tests/k8s) behaves like a real cluster: the real
apiserver validates (CEL rules, PodSecurity), controller-manager and scheduler run Jobs, kwok
plays fake GPU nodes and the process kubelet really runs a pod's command."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from tests.k8s.binaries import KUBERNETES_VERSION
from tests.k8s.cluster import PROCESS_NODE, PROCESS_NODE_SELECTOR, PROCESS_NODE_TOLERATION
from tests.k8s.waiting import wait_until

pytest_plugins = ["tests.k8s.fixtures"]
pytestmark = [pytest.mark.integration, pytest.mark.slow]

WARM_START_LIMIT = 60.0


def status_message(error: ApiException) -> str:
    """The apiserver's explanation, from the Status object in the error's body."""
    return json.loads(error.body)["message"]


def job_condition(batch: k8s.BatchV1Api, namespace: str, name: str) -> str | None:
    """'Complete' or 'Failed' once the Job controller decided, else None."""
    job = batch.read_namespaced_job(name, namespace)
    for c in job.status.conditions or []:
        if c.type in ("Complete", "Failed") and c.status == "True":
            return c.type
    return None


def job_pod(core: k8s.CoreV1Api, namespace: str, job: str) -> k8s.V1Pod:
    pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
    assert len(pods) == 1, [p.metadata.name for p in pods]
    return pods[0]


def job(name: str, container: dict, **pod_spec) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {"restartPolicy": "Never", "containers": [container], **pod_spec}},
        },
    }


def test_control_plane_warm_start_is_fast(k8s_cluster) -> None:
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in k8s_cluster.phase_seconds.items())
    print(f"control plane started in {k8s_cluster.start_seconds:.1f}s ({phases})")
    assert k8s_cluster.start_seconds < WARM_START_LIMIT


def test_server_reports_the_pinned_release(k8s_cluster) -> None:
    version = k8s_cluster.get_json("/version")
    assert version["gitVersion"] == KUBERNETES_VERSION
    assert f"v{version['major']}.{version['minor']}" == KUBERNETES_VERSION.rsplit(".", 1)[0]


def test_crd_cel_validation_rule_rejects_invalid_object(k8s_cluster, k8s_namespace) -> None:
    api = k8s_cluster.api()
    group, plural = "fst.test", f"widgets{uuid.uuid4().hex[:6]}"
    spec_schema = {
        "type": "object",
        "properties": {"replicas": {"type": "integer"}, "minReplicas": {"type": "integer"}},
        "x-kubernetes-validations": [
            {
                "rule": "self.minReplicas <= self.replicas",
                "message": "minReplicas must not exceed replicas",
            }
        ],
    }
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": plural[:-1], "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {"spec": spec_schema},
                        }
                    },
                }
            ],
        },
    }
    ext = k8s.ApiextensionsV1Api(api)
    ext.create_custom_resource_definition(crd)

    def established() -> bool:
        conditions = ext.read_custom_resource_definition(f"{plural}.{group}").status.conditions
        return any(c.type == "Established" and c.status == "True" for c in conditions or [])

    wait_until(established, 30, "CRD established")
    objects = k8s.CustomObjectsApi(api)

    def widget(name: str, replicas: int, min_replicas: int) -> dict:
        spec = {"replicas": replicas, "minReplicas": min_replicas}
        return {
            "apiVersion": f"{group}/v1",
            "kind": "Widget",
            "metadata": {"name": name},
            "spec": spec,
        }

    def create(body: dict):
        return objects.create_namespaced_custom_object(group, "v1", k8s_namespace, plural, body)

    # The CRD's REST endpoint can lag its Established condition by a moment.
    wait_until(lambda: _created(lambda: create(widget("ok", 3, 1))), 30, "valid widget created")
    with pytest.raises(ApiException) as rejected:
        create(widget("bad", 1, 3))
    assert rejected.value.status == 422
    assert "minReplicas must not exceed replicas" in status_message(rejected.value)


def _created(create: Callable[[], object]) -> bool:
    try:
        create()
        return True
    except ApiException as e:
        if e.status == 404:
            return False
        raise


def test_gpu_job_is_scheduled_on_a_fake_node_and_completes(k8s_cluster, k8s_namespace) -> None:
    api = k8s_cluster.api()
    batch, core = k8s.BatchV1Api(api), k8s.CoreV1Api(api)
    container = {
        "name": "trainer",
        "image": "fastslow/trainer:test",  # never pulled: kwok only plays the pod
        "resources": {"limits": {"nvidia.com/gpu": "1"}},
    }
    batch.create_namespaced_job(k8s_namespace, job("gpu-train", container))

    assert wait_until(lambda: job_condition(batch, k8s_namespace, "gpu-train"), 60, "job") == (
        "Complete"
    )
    pod = job_pod(core, k8s_namespace, "gpu-train")
    assert pod.spec.node_name.startswith("gpu-node-")
    assert pod.status.phase == "Succeeded"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0


def test_kwok_holds_pods_annotated_to_stay_running(k8s_cluster, k8s_namespace) -> None:
    api = k8s_cluster.api()
    batch, core = k8s.BatchV1Api(api), k8s.CoreV1Api(api)
    body = job("held", {"name": "main", "image": "fastslow/trainer:test"})
    body["spec"]["template"]["metadata"] = {"annotations": {"fst.test/kwok-hold": "true"}}
    batch.create_namespaced_job(k8s_namespace, body)

    def running() -> bool:
        pods = core.list_namespaced_pod(k8s_namespace, label_selector="job-name=held").items
        return bool(pods) and pods[0].status.phase == "Running"

    wait_until(running, 60, "held pod Running")
    time.sleep(3)  # the Succeeded stage would have fired after 1 s
    assert job_pod(core, k8s_namespace, "held").status.phase == "Running"
    assert job_condition(batch, k8s_namespace, "held") is None


def test_job_on_process_node_really_runs_its_command(
    k8s_cluster, k8s_namespace, tmp_path: Path
) -> None:
    api = k8s_cluster.api()
    batch, core = k8s.BatchV1Api(api), k8s.CoreV1Api(api)
    core.create_namespaced_config_map(
        k8s_namespace,
        {"metadata": {"name": "trainer-config"}, "data": {"config.yaml": "steps: 3\n"}},
    )
    core.create_namespaced_secret(
        k8s_namespace,
        {"metadata": {"name": "creds"}, "stringData": {"token": "s3cret"}},
    )
    out = tmp_path / "out.txt"
    script = (
        "import os, pathlib; "
        "cfg = pathlib.Path('/etc/fst/config.yaml').read_text(); "
        "pathlib.Path(os.environ['OUT']).write_text(cfg + os.environ['TOKEN'] + ' ' + "
        "os.environ['POD_NAMESPACE']); print('trainer done')"
    )
    container = {
        "name": "trainer",
        "image": "fastslow/trainer:test",
        "command": ["python", "-c", script],
        "env": [
            {"name": "OUT", "value": str(out)},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
        ],
        "volumeMounts": [{"name": "config", "mountPath": "/etc/fst"}],
    }
    body = job(
        "process-train",
        container,
        nodeSelector=PROCESS_NODE_SELECTOR,
        tolerations=[PROCESS_NODE_TOLERATION],
        volumes=[{"name": "config", "configMap": {"name": "trainer-config"}}],
    )
    batch.create_namespaced_job(k8s_namespace, body)

    condition = wait_until(lambda: job_condition(batch, k8s_namespace, "process-train"), 60, "job")
    pod = job_pod(core, k8s_namespace, "process-train")
    log = k8s_cluster.pod_log(k8s_namespace, pod.metadata.name).read_text()
    assert condition == "Complete", log
    assert pod.spec.node_name == PROCESS_NODE
    assert pod.status.phase == "Succeeded"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0
    assert out.read_text() == f"steps: 3\ns3cret {k8s_namespace}"
    assert "trainer done" in log


def test_failing_command_fails_the_pod_with_its_exit_code(k8s_cluster, k8s_namespace) -> None:
    core = k8s.CoreV1Api(k8s_cluster.api())
    pod = {
        "metadata": {"name": "exit-3"},
        "spec": {
            "nodeName": PROCESS_NODE,
            "restartPolicy": "Never",
            "containers": [
                {"name": "main", "image": "x", "command": ["python", "-c", "raise SystemExit(3)"]}
            ],
        },
    }
    core.create_namespaced_pod(k8s_namespace, pod)

    def finished() -> k8s.V1Pod | None:
        p = core.read_namespaced_pod("exit-3", k8s_namespace)
        return p if p.status.phase in ("Succeeded", "Failed") else None

    done = wait_until(finished, 60, "pod finished")
    assert done.status.phase == "Failed"
    assert done.status.container_statuses[0].state.terminated.exit_code == 3


def test_restricted_namespace_rejects_privileged_pod(k8s_cluster) -> None:
    namespace = k8s_cluster.create_namespace(
        f"restricted-{uuid.uuid4().hex[:5]}",
        labels={"pod-security.kubernetes.io/enforce": "restricted"},
    )
    pod = {
        "metadata": {"name": "root"},
        "spec": {
            "containers": [
                {"name": "main", "image": "busybox", "securityContext": {"privileged": True}}
            ]
        },
    }
    with pytest.raises(ApiException) as rejected:
        k8s.CoreV1Api(k8s_cluster.api()).create_namespaced_pod(namespace, pod)
    assert rejected.value.status == 403
    message = status_message(rejected.value)
    assert 'violates PodSecurity "restricted:latest"' in message
    assert 'privileged (container "main" must not set securityContext.privileged=true)' in message


def test_helm_installs_a_chart_into_the_cluster(k8s_cluster, k8s_namespace, tmp_path) -> None:
    chart = tmp_path / "demo"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: demo\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("greeting: hello\n")
    (chart / "templates" / "config.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-config\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n"
    )
    helm = [str(k8s_cluster.bins["helm"]), f"--kubeconfig={k8s_cluster.kubeconfig}"]
    # Helm keeps caches and settings under HOME/XDG folders: keep them in the test's folder.
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)}
    install = [*helm, "install", "demo", str(chart), "-n", k8s_namespace, "--set", "greeting=hi"]
    proc = subprocess.run([*install, "--wait"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr

    core = k8s.CoreV1Api(k8s_cluster.api())
    assert core.read_namespaced_config_map("demo-config", k8s_namespace).data == {"greeting": "hi"}


def process_pod(name: str, command: list[str], **container) -> dict:
    spec = {"nodeName": PROCESS_NODE, "restartPolicy": "Never", "terminationGracePeriodSeconds": 5}
    main = {"name": "main", "image": "x", "command": command, **container}
    return {"metadata": {"name": name}, "spec": {**spec, "containers": [main]}}


def test_deleting_a_process_pod_stops_its_process(k8s_cluster, k8s_namespace) -> None:
    core = k8s.CoreV1Api(k8s_cluster.api())
    marker = f"fst-sleeper-{uuid.uuid4().hex[:8]}"
    # `exec -a` names the process, so that it can be found without guessing.
    core.create_namespaced_pod(
        k8s_namespace, process_pod("sleeper", ["bash", "-c", f"exec -a {marker} sleep 600"])
    )

    def phase() -> str:
        return core.read_namespaced_pod("sleeper", k8s_namespace).status.phase

    wait_until(lambda: phase() == "Running", 60, "sleeper Running")
    wait_until(lambda: _pids(marker), 10, "sleeper process")
    core.delete_namespaced_pod("sleeper", k8s_namespace)

    def gone() -> bool:
        names = [p.metadata.name for p in core.list_namespaced_pod(k8s_namespace).items]
        return "sleeper" not in names

    wait_until(gone, 30, "pod removed")
    assert _pids(marker) == []


def _pids(pattern: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()


def test_pod_waits_for_a_missing_secret(k8s_cluster, k8s_namespace) -> None:
    core = k8s.CoreV1Api(k8s_cluster.api())
    env = [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "late", "key": "key"}}}]
    core.create_namespaced_pod(
        k8s_namespace, process_pod("waiter", ["python", "-c", "print('got it')"], env=env)
    )

    def waiting_reason() -> str | None:
        statuses = core.read_namespaced_pod("waiter", k8s_namespace).status.container_statuses
        waiting = statuses[0].state.waiting if statuses else None
        return waiting.reason if waiting else None

    assert wait_until(waiting_reason, 30, "waiting") == "CreateContainerConfigError"
    core.create_namespaced_secret(
        k8s_namespace, {"metadata": {"name": "late"}, "stringData": {"key": "v"}}
    )

    def phase() -> str:
        return core.read_namespaced_pod("waiter", k8s_namespace).status.phase

    wait_until(lambda: phase() == "Succeeded", 30, "pod Succeeded once the Secret exists")
