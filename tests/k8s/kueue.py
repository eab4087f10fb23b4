"""Kueue's real controller manager against the test control plane (tests/k8s/cluster.py).

    with kueue_controller(cluster) as kueue:      # CRDs applied, controller Ready
        ns = cluster.create_namespace("team", kueue.namespace_labels())
        kueue.create_queues(ns, gpus=8)           # ResourceFlavor, ClusterQueue, LocalQueue

The binary and its CRDs come from tests/k8s/binaries.py (Kueue v0.17.0 from its Go module). It
runs as one more process of the cluster, with a Configuration (config.kueue.x-k8s.io/v1beta2)
that fits a test cluster:

- no leader election, no internal cert management (that would need a webhook Service and
  Secret and injects CA bundles into webhook configurations and CRDs), and no webhook
  registered with the apiserver: a Job must be created suspended by its creator, which is what
  the fastslow operator does for a queued run anyway. The webhook server still starts (Kueue
  always serves it) on loopback, with a certificate of a throwaway CA in `webhook.certDir`;
- only the batch/job integration;
- its own namespace, `kueue-system`, is none of the tests' (Kueue never manages Jobs in its
  own namespace), and it manages Jobs only in namespaces labelled MANAGED_LABEL: a test opts
  its namespace in, and a queue-labelled Job anywhere else (test_operator.py's "as Kueue does
  it" test) is left alone even while this controller runs;
- the visibility API server off (feature gate VisibilityOnDemand=false): it reads its serving
  certificate from a fixed /visibility/ and nothing here needs it.

One path cannot be configured: with internal cert management off, Kueue's main() reads the
metrics server's certificate from /etc/kueue/metrics/certs/tls.{crt,key} (hard-coded) and exits
without it. Rather than write into the machine's /etc, Kueue runs in a private mount namespace
(`unshare --mount`) where /etc is an overlay whose upper layer, in the cluster's folder, holds
that pair: the host's /etc is never written. That needs root (CAP_SYS_ADMIN), as CI and the
development machines have; elsewhere the start fails with that message.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from tests.k8s import binaries
from tests.k8s.cluster import ClusterError, Component, TestCluster
from tests.k8s.pki import CertificateAuthority
from tests.servers import free_port

GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
CONFIG_API = "config.kueue.x-k8s.io/v1beta2"
KUEUE_NAMESPACE = "kueue-system"
# Namespaces whose queue-labelled Jobs this Kueue manages (managedJobsNamespaceSelector).
MANAGED_LABEL = ("fst.test/kueue", "managed")
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
METRICS_CERTS = "kueue/metrics/certs"  # under /etc, where Kueue's main() looks (see above)
GPU = "nvidia.com/gpu"
# The kwok GPU nodes' label (tests/k8s/cluster.py): a ResourceFlavor for them.
GPU_NODE_LABELS = {"nvidia.com/gpu.present": "true"}
START_TIMEOUT = 90.0


@dataclass
class KueueController:
    """Kueue's controller manager as a component of `cluster`; `start()`, then helpers."""

    cluster: TestCluster
    binary: Path
    crds: Path
    namespace: str = KUEUE_NAMESPACE
    component: Component | None = None
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = self.cluster.root / "kueue"
        self.config_path = self.root / "config.yaml"
        self.api = self.cluster.api()
        self.custom = k8s.CustomObjectsApi(self.api)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if shutil.which("unshare") is None:
            raise ClusterError("Kueue needs `unshare` (util-linux) for its metrics certificate")
        self.root.mkdir(parents=True, exist_ok=True)
        self.apply_crds()
        if not self._namespace_exists(self.namespace):
            self.cluster.create_namespace(self.namespace)
        self._write_certs()
        self.ports = {"health": free_port(), "metrics": free_port(), "webhook": free_port()}
        self.config_path.write_text(yaml.safe_dump(self.configuration(), sort_keys=False))
        self.component = Component(
            "kueue", self._command(), self.cluster.logs / "kueue.log", env=None
        )
        # One of the cluster's components from here on: its log joins a failed test's report,
        # a crash fails the next wait, and the cluster stops it first (reverse order).
        self.cluster.components.append(self.component)
        self.component.start()
        self.cluster.wait_for(self.ready, "kueue /readyz", START_TIMEOUT)

    def configuration(self) -> dict[str, Any]:
        key, value = MANAGED_LABEL
        return {
            "apiVersion": CONFIG_API,
            "kind": "Configuration",
            "namespace": self.namespace,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.ports['health']}"},
            "metrics": {"bindAddress": f"127.0.0.1:{self.ports['metrics']}"},
            "webhook": {
                "host": "127.0.0.1",
                "port": self.ports["webhook"],
                "certDir": str(self.root / "webhook-certs"),
            },
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "manageJobsWithoutQueueName": False,
            "managedJobsNamespaceSelector": {"matchLabels": {key: value}},
            "integrations": {"frameworks": ["batch/job"]},
            "featureGates": {"VisibilityOnDemand": False},
            # The default 20 requests/s would space a test's few objects' updates for nothing.
            "clientConnection": {"qps": 100, "burst": 200},
        }

    def _command(self) -> list[str]:
        """Kueue in a private mount namespace whose /etc is an overlay with the metrics cert
        pair on top (module docstring). `exec` keeps one process: signals reach Kueue, and the
        kernel's parent-death signal (set before exec) stays with it."""
        upper, work = self.root / "etc-upper", self.root / "etc-work"
        overlay = f"lowerdir=/etc,upperdir={upper},workdir={work}"
        script = f'mount -t overlay fst-kueue-etc -o {overlay} /etc && exec "$@"'
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-ec",
            script,
            "kueue",  # $0 of the script
            str(self.binary),
            f"--config={self.config_path}",
            f"--kubeconfig={self.cluster.kubeconfig}",
            "--zap-log-level=info",
        ]

    def _write_certs(self) -> None:
        """A throwaway CA's serving pair for the webhook server and, in the overlay's upper
        layer, for the metrics server (both on 127.0.0.1; nothing here calls either)."""
        pki = self.root / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        ca = CertificateAuthority(pki)
        hosts = ("127.0.0.1", "localhost")
        for folder in (self.root / "webhook-certs", self.root / "etc-upper" / METRICS_CERTS):
            folder.mkdir(parents=True, exist_ok=True)
            issued = ca.issue("tls", "kueue", hosts=hosts)
            shutil.copy(issued.cert, folder / "tls.crt")
            shutil.copy(issued.key, folder / "tls.key")
        (self.root / "etc-work").mkdir(exist_ok=True)

    def ready(self) -> bool:
        """Kueue's readiness: its webhook server listens (the probe endpoint is plain HTTP)."""
        url = f"http://127.0.0.1:{self.ports['health']}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.component is not None:
            self.component.stop()
            if self.component in self.cluster.components:
                self.cluster.components.remove(self.component)
            self.component = None

    # ------------------------------------------------------------------ CRDs

    def apply_crds(self) -> list[str]:
        """Kueue's CRDs, applied server-side (as `kubectl apply --server-side`: some are too
        large for the last-applied annotation), then waited on until Established."""
        names = []
        for path in sorted(self.crds.glob("*.yaml")):
            for body in yaml.safe_load_all(path.read_text()):
                if body:
                    names.append(body["metadata"]["name"])
                    self._apply("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", body)
        ext = k8s.ApiextensionsV1Api(self.api)

        def established() -> bool:
            for name in names:
                crd = ext.read_custom_resource_definition(name)
                conds = {c.type: c.status for c in (crd.status.conditions or [])}
                if conds.get("Established") != "True":
                    return False
            return True

        self.cluster.wait_for(established, "Kueue CRDs Established", 60)
        return names

    def _apply(self, collection: str, body: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply (PATCH application/apply-patch+yaml; JSON is YAML)."""
        url = (
            f"{self.cluster.server}{collection}/{body['metadata']['name']}"
            "?fieldManager=fst-test&force=true"
        )
        req = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            method="PATCH",
            headers={"Content-Type": "application/apply-patch+yaml"},
        )
        with urllib.request.urlopen(req, context=self.cluster.ssl_context(), timeout=30) as r:
            result: dict[str, Any] = json.loads(r.read())
            return result

    def _namespace_exists(self, name: str) -> bool:
        try:
            k8s.CoreV1Api(self.api).read_namespace(name)
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    # ------------------------------------------------------------------ queues

    @staticmethod
    def namespace_labels() -> dict[str, str]:
        """The labels that put a namespace's queue-labelled Jobs under this Kueue."""
        key, value = MANAGED_LABEL
        return {key: value}

    def create(self, plural: str, body: dict[str, Any], namespace: str | None = None) -> Any:
        body = {"apiVersion": f"{GROUP}/{VERSION}", **body}
        if namespace is None:
            return self.custom.create_cluster_custom_object(GROUP, VERSION, plural, body)
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body)

    def create_queues(
        self,
        namespace: str,
        quota: dict[str, str | int],
        name: str | None = None,
        node_labels: dict[str, str] | None = None,
    ) -> str:
        """A ResourceFlavor for the kwok GPU nodes, a ClusterQueue with `quota` of it (e.g.
        {"nvidia.com/gpu": 8}; every resource a Job requests must be covered) open to
        `namespace`, and a LocalQueue there; all named `name` (default: the namespace).
        Returns the LocalQueue's name, which a FastSlowRun's spec.trainer.queueName takes."""
        name = name or namespace
        flavor = {"nodeLabels": node_labels or GPU_NODE_LABELS}
        self.create(
            "resourceflavors",
            {"kind": "ResourceFlavor", "metadata": {"name": name}, "spec": flavor},
        )
        resources = [{"name": r, "nominalQuota": str(q)} for r, q in quota.items()]
        self.create(
            "clusterqueues",
            {
                "kind": "ClusterQueue",
                "metadata": {"name": name},
                "spec": {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": namespace}
                    },
                    "resourceGroups": [
                        {
                            "coveredResources": list(quota),
                            "flavors": [{"name": name, "resources": resources}],
                        }
                    ],
                },
            },
        )
        self.create(
            "localqueues",
            {"kind": "LocalQueue", "metadata": {"name": name}, "spec": {"clusterQueue": name}},
            namespace,
        )
        self.cluster.wait_for(lambda: self._active("clusterqueues", name), f"ClusterQueue {name}")
        self.cluster.wait_for(
            lambda: self._active("localqueues", name, namespace), f"LocalQueue {name}"
        )
        return name

    def _active(self, plural: str, name: str, namespace: str | None = None) -> bool:
        obj = self.get(plural, name, namespace)
        conds = (obj.get("status") or {}).get("conditions") or []
        return any(c["type"] == "Active" and c["status"] == "True" for c in conds)

    def get(self, plural: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        if namespace is None:
            obj = self.custom.get_cluster_custom_object(GROUP, VERSION, plural, name)
        else:
            obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        result: dict[str, Any] = obj
        return result

    def workloads(self, namespace: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, "workloads"
        )["items"]
        return items

    def workload_of(self, namespace: str, job_uid: str) -> dict[str, Any] | None:
        """The Workload Kueue made for the Job with `job_uid` (its label says which)."""
        items = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, "workloads", label_selector=f"{JOB_UID_LABEL}={job_uid}"
        )["items"]
        return items[0] if items else None


def workload_condition(workload: dict[str, Any], type_: str) -> dict[str, Any] | None:
    conds = (workload.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == type_), None)


@contextmanager
def kueue_controller(cluster: TestCluster) -> Iterator[KueueController]:
    """Build Kueue if missing (tests/k8s/binaries.py), apply its CRDs, start it, stop it at
    the end. Raises BinaryUnavailable or ClusterError (with its log) when it cannot."""
    controller = KueueController(cluster, binaries.binary("kueue"), binaries.kueue_crds())
    try:
        controller.start()
        yield controller
    finally:
        controller.stop()
