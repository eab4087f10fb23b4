"""The real node (tests/k8s/node.py): pods as real containers under kubelet + containerd + runc.

- the node registers as `containerd://1.6.x` and goes Ready, with a non-loopback InternalIP;
- a pod under PodSecurity `restricted` (non-root UID 10001, read-only root, all capabilities
  dropped, seccomp RuntimeDefault) runs: `id` says uid=10001, writing to `/` fails with the
  kernel's "Read-only file system", and its log comes back through the apiserver (which
  reaches the kubelet on the node's address with its client certificate);
- an imported image keeps its unpacked snapshot, not its layer blobs (one copy on disk);
- the memory limit is the kernel's: a container over its 32Mi limit is OOM-killed (137);
- the pod gets an address from the CNI bridge and reaches the host at the node's address.
"""

from __future__ import annotations

import socket
import threading
import uuid

import pytest
from kubernetes import client as k8s

from tests.k8s.cluster import TestCluster
from tests.k8s.images import tools_image
from tests.k8s.node import RealNode
from tests.k8s.waiting import wait_until

pytest_plugins = ["tests.k8s.fixtures"]
pytestmark = [pytest.mark.integration]

UID = 10001


@pytest.fixture(scope="module")
def tools(k8s_real_node: RealNode) -> str:
    archive = tools_image()
    k8s_real_node.import_image(archive)
    return archive.name


@pytest.fixture
def restricted_namespace(k8s_cluster: TestCluster) -> str:
    return k8s_cluster.create_namespace(
        f"real-node-{uuid.uuid4().hex[:6]}", {"pod-security.kubernetes.io/enforce": "restricted"}
    )


def restricted_pod(name: str, image: str, command: list[str], memory: str = "64Mi") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            **RealNode.pod_placement(),
            "restartPolicy": "Never",
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": UID,
                "runAsGroup": UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",  # imported, no registry to pull from
                    "command": command,
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "resources": {
                        "requests": {"cpu": "50m", "memory": memory},
                        "limits": {"cpu": "500m", "memory": memory},
                    },
                }
            ],
        },
    }


def finished(core: k8s.CoreV1Api, namespace: str, name: str) -> k8s.V1Pod:
    def done() -> k8s.V1Pod | None:
        pod = core.read_namespaced_pod(name, namespace)
        return pod if pod.status.phase in ("Succeeded", "Failed") else None

    return wait_until(done, timeout=120, what=f"pod {name} finished")


def terminated(pod: k8s.V1Pod) -> k8s.V1ContainerStateTerminated:
    return pod.status.container_statuses[0].state.terminated


def test_the_real_node_is_ready_with_containerd(k8s_cluster: TestCluster, k8s_real_node):
    node = k8s.CoreV1Api(k8s_cluster.api()).read_node(k8s_real_node.name)
    assert node.status.node_info.container_runtime_version.startswith("containerd://1.")
    assert node.status.node_info.kubelet_version == "v1.34.4"
    addresses = {a.type: a.address for a in node.status.addresses}
    assert addresses["InternalIP"] == k8s_real_node.ip
    assert not addresses["InternalIP"].startswith("127.")
    ready = {c.type: c.status for c in node.status.conditions}["Ready"]
    assert ready == "True"


def test_a_restricted_pod_runs_as_10001_and_cannot_write_its_root(
    k8s_cluster: TestCluster, restricted_namespace: str, tools: str
):
    core = k8s.CoreV1Api(k8s_cluster.api())
    script = "id; cat /proc/self/status | grep CapEff; touch /written 2>&1; echo touch-exit=$?"
    core.create_namespaced_pod(
        restricted_namespace, restricted_pod("whoami", tools, ["sh", "-c", script])
    )
    pod = finished(core, restricted_namespace, "whoami")
    # Through the apiserver, which asks the kubelet on the node's address (not a local file).
    log = core.read_namespaced_pod_log("whoami", restricted_namespace)
    assert pod.status.phase == "Succeeded", log
    assert f"uid={UID}" in log and f"gid={UID}" in log
    assert "CapEff:\t0000000000000000" in log  # every capability dropped
    assert "Read-only file system" in log and "touch-exit=1" in log
    assert pod.status.pod_ip and pod.status.pod_ip.startswith("10.88.")
    assert pod.status.container_statuses[0].image == tools


def test_an_imported_image_keeps_its_snapshot_not_its_layer_blobs(
    k8s_real_node: RealNode, tools: str
):
    """The pods of these tests start from the unpacked snapshots alone: `import_image` deleted
    the layer blobs, which would otherwise hold a second copy of every image (6.6 GB for the
    trainer's)."""
    layers = k8s_real_node.image_layers(tools)
    assert layers
    assert not set(layers) & k8s_real_node.content_digests()


def test_a_container_over_its_memory_limit_is_oom_killed(
    k8s_cluster: TestCluster, restricted_namespace: str, tools: str
):
    core = k8s.CoreV1Api(k8s_cluster.api())
    core.create_namespaced_pod(
        restricted_namespace, restricted_pod("hog", tools, ["memhog", "200"], memory="32Mi")
    )
    pod = finished(core, restricted_namespace, "hog")
    state = terminated(pod)
    assert pod.status.phase == "Failed"
    assert (state.reason, state.exit_code) == ("OOMKilled", 137)
    log = core.read_namespaced_pod_log("hog", restricted_namespace)
    assert "allocated 16 MiB" in log and "holding" not in log  # killed while allocating


def test_a_pod_reaches_the_host_at_the_node_address(
    k8s_cluster: TestCluster, k8s_real_node: RealNode, restricted_namespace: str, tools: str
):
    """What the trainer pods need to reach the test MinIO and Postgres: a server bound to the
    node's address answers a pod."""
    server = socket.create_server((k8s_real_node.ip, 0))
    port = server.getsockname()[1]

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"hello from the host\n")

    threading.Thread(target=answer, daemon=True).start()
    core = k8s.CoreV1Api(k8s_cluster.api())
    script = f"nc {k8s_real_node.ip} {port} </dev/null"
    core.create_namespaced_pod(
        restricted_namespace, restricted_pod("reach", tools, ["sh", "-c", script])
    )
    pod = finished(core, restricted_namespace, "reach")
    log = core.read_namespaced_pod_log("reach", restricted_namespace)
    server.close()
    assert pod.status.phase == "Succeeded", log
    assert "hello from the host" in log
