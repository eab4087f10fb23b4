"""End to end on the test control plane: `helm install` the chart, apply a TaskStream, watch
real trainer pods train SmolLM2 stage after stage, `helm uninstall`.

The operator runs as the chart's Deployment: its pod lands on the process kubelet's node, which
runs the pod's command (`python -m fst_operator`) with only what a pod gets — the chart's
ServiceAccount token (a real TokenRequest token, so RBAC is enforced), the Secrets' values and
the environment the chart sets; no kubeconfig. The trainer pods it creates land there too and
run `fst train` against the test MinIO and PostgreSQL.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from tests.k8s.cluster import PROCESS_NODE, PROCESS_NODE_SELECTOR, PROCESS_NODE_TOLERATION
from tests.k8s.operator_proc import GROUP, TINY_TASK, VERSION, Resources, dump, phase
from tests.k8s.waiting import wait_until
from tests.servers import free_port

pytest_plugins = ["tests.k8s.fixtures"]
pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RELEASE = "fastslow"
TASK = TINY_TASK


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


def test_helm_install_apply_a_stream_and_uninstall(
    k8s_cluster, k8s_namespace, s3_env, s3_uri, pg_url, tmp_path
) -> None:
    api, ns = k8s_cluster.api(), k8s_namespace
    values = {
        "operator": {
            "image": {"repository": "fastslow/operator", "tag": "test"},
            # The process node shares the host's network: ports free on this machine.
            "metricsPort": free_port(),
            "livenessPort": free_port(),
            "nodeSelector": PROCESS_NODE_SELECTOR,
            "tolerations": [PROCESS_NODE_TOLERATION],
            "extraEnv": [
                {"name": "FST_PROGRESS_INTERVAL", "value": "2"},
                {"name": "FST_STREAM_POLL_INTERVAL", "value": "3"},
            ],
        },
        "s3": {
            "external": {
                "endpoint": s3_env["AWS_ENDPOINT_URL"],
                "accessKey": s3_env["AWS_ACCESS_KEY_ID"],
                "secretKey": s3_env["AWS_SECRET_ACCESS_KEY"],
            }
        },
        "database": {"external": {"url": pg_url}},
        # One customer per namespace: the operator makes this namespace's own MinIO user and
        # database role (the stores' admin logins stay in the chart's Secrets).
        "tenancy": {"prefix": f"{s3_uri}/tenants"},
        # The policy for this cluster: the test image, the process node's label and taint.
        "policy": {
            "images": ["fastslow/trainer"],
            "nodeSelectors": [f"{k}={v}" for k, v in PROCESS_NODE_SELECTOR.items()],
            "tolerations": [
                f"{PROCESS_NODE_TOLERATION['key']}:{PROCESS_NODE_TOLERATION['effect']}"
            ],
            "maxGpus": 0,
        },
    }
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    helm(
        k8s_cluster,
        "install",
        RELEASE,
        str(REPO / "helm" / "fastslow"),
        "-n",
        ns,
        "-f",
        str(values_file),
    )

    core = k8s.CoreV1Api(api)
    label = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator"

    def operator_pod():
        pods = core.list_namespaced_pod(ns, label_selector=label).items
        running = [p for p in pods if p.status.phase == "Running"]
        return running[0] if running else None

    pod = wait_until(operator_pod, 120, "operator pod Running", poll=1.0)
    assert pod.spec.node_name == PROCESS_NODE
    assert pod.spec.service_account_name == f"{RELEASE}-operator"
    operator_log = k8s_cluster.pod_log(ns, pod.metadata.name)

    def describe() -> str:
        return operator_log.read_text()[-5000:] if operator_log.exists() else "(no log)"

    wait_until(lambda: "fastslow operator:" in describe(), 120, "operator started", describe, 1.0)

    # `kubectl apply -f taskstream.yaml`: the stream, with trainer pods on the process node.
    res = Resources(api, ns)
    spec = {
        "model": {"name": "smollm2-135m-instruct"},
        "defaults": {
            "mode": "rl",
            "seed": 1,
            "rollout": {"temperature": 0.8, "maxNewTokens": 8, "batchSize": 16},
            "slow": {"problemsPerStep": 2, "groupSize": 2, "microBatchSize": 4},
            "metrics": {"klPrompts": 1, "klEvery": 1},
            "checkpoint": {"every": 2, "keepLast": 1},
        },
        "trainer": {
            "gpus": 0,
            "image": "fastslow/trainer:cpu",
            "nodeSelector": PROCESS_NODE_SELECTOR,
            "tolerations": [PROCESS_NODE_TOLERATION],
        },
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

    stream = wait_until(done, 900, "both stages Succeeded", describe, poll=2)
    first, second = res.run("customer-add"), res.run("customer-add-more")
    for run in (first, second):
        s = run["status"]
        assert s["phase"] == "Succeeded" and s["step"] == 2, dump(s)
        assert s["checkpointUri"].startswith(f"{s3_uri}/tenants/{ns}/runs/"), dump(s)
        assert "reward" in s and "kl" in s, dump(s)
    # Stage 2 started from stage 1's final checkpoint; the defaults came from the chart.
    assert second["spec"]["config"]["model"]["name"] == first["status"]["checkpointUri"]
    job = k8s.BatchV1Api(api).read_namespaced_job("customer-add-a1", ns)
    # The trainers got only the namespace's own credentials, which the operator made through
    # its RBAC (create, then get/update of that one name).
    (container,) = job.spec.template.spec.containers
    assert [e.secret_ref.name for e in container.env_from] == ["fastslow-tenant"]
    assert "FST_DATABASE_URL" not in {e.name for e in container.env}
    tenant = core.read_namespaced_secret("fastslow-tenant", ns).data
    assert base64.b64decode(tenant["AWS_ACCESS_KEY_ID"]).decode() == f"fst-{ns}"
    assert [s["phase"] for s in stream["status"]["stages"]] == ["Succeeded", "Succeeded"]

    # Uninstall: the user's stream first (its runs, Jobs, ConfigMaps go with it), then the
    # chart; only the CRDs stay (Helm never deletes a chart's crds/).
    res.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "taskstreams", "customer")
    wait_until(
        lambda: not res.runs() and not res.jobs(), 120, "stream's objects gone", describe, 1.0
    )
    helm(k8s_cluster, "uninstall", RELEASE, "-n", ns, "--wait", "--timeout", "120s")
    left = wait_until(
        lambda: release_objects(api, ns) == [] or None,
        120,
        "release objects gone",
        lambda: str(release_objects(api, ns)),
        1.0,
    )
    assert left is True
    crds = k8s.ApiextensionsV1Api(api).list_custom_resource_definition().items
    assert {f"fastslowruns.{GROUP}", f"taskstreams.{GROUP}"} <= {c.metadata.name for c in crds}
