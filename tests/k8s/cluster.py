"""A real Kubernetes control plane on loopback for tests, without Docker (like envtest).

    etcd -> kube-apiserver -> kube-controller-manager + kube-scheduler -> kwok + process kubelet

Everything runs as local processes from the binaries of tests/k8s/binaries.py, in one temp
folder (certs, kubeconfigs, etcd data, a log per component). The apiserver serves TLS with
client-cert authentication, RBAC + Node authorization and the default admission plugins
(PodSecurity among them) — what a real cluster enforces. Nodes:

- `gpu-node-<i>`: fake nodes with nvidia.com/gpu capacity, simulated by kwok (pods go Running,
  Job pods then Succeeded; see kwok-stages.yaml);
- `process-node-0`: served by tests/k8s/process_kubelet.py, which runs a pod's command as a
  local process. It is tainted, so only pods that ask for it (toleration + nodeSelector, or
  spec.nodeName) land there: see PROCESS_NODE_TOLERATION.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException

from tests.k8s import binaries
from tests.k8s.pki import CertFiles, CertificateAuthority, service_account_keys
from tests.k8s.process_kubelet import pod_log
from tests.servers import free_port, log_tail

HERE = Path(__file__).resolve().parent
KWOK_STAGES = HERE / "kwok-stages.yaml"
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
PROCESS_NODE = "process-node-0"
PROCESS_NODE_TAINT = "fst.test/process-node"
# What a pod spec needs to be scheduled on the process kubelet's node.
PROCESS_NODE_TOLERATION = {"key": PROCESS_NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"}
PROCESS_NODE_SELECTOR = {"kubernetes.io/hostname": PROCESS_NODE}
SERVICE_CIDR = "10.0.0.0/24"
START_TIMEOUT = 120.0


class ClusterError(RuntimeError):
    """The control plane could not start; the message holds the failing component's log."""


@dataclass
class Component:
    """One server process, its output appended to `log`."""

    name: str
    cmd: list[str]
    log: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("a") as out:
            out.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(self.cmd)}\n")
            out.flush()
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                preexec_fn=_die_with_parent,
            )

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ClusterError(
                f"{self.name} exited with {self.proc.returncode}; log {self.log}:\n"
                + log_tail(self.log)
            )

    def stop(self, grace: float = 15) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@dataclass
class GpuNodes:
    count: int = 2
    gpus: int = 8
    cpu: str = "32"
    memory: str = "256Gi"


@dataclass
class TestCluster:
    """The control plane and its nodes; `start()`, use `kubeconfig` or `api()`, `stop()`."""

    root: Path
    bins: dict[str, Path]
    gpu_nodes: GpuNodes = field(default_factory=GpuNodes)
    components: list[Component] = field(default_factory=list)
    keep_logs: bool = False
    start_seconds: float = 0.0

    __test__ = False  # not a pytest test class, whatever its name

    def __post_init__(self) -> None:
        self.pki = self.root / "pki"
        self.logs = self.root / "logs"
        self.kubeconfig = self.root / "admin.kubeconfig"
        self.etcd_port, self.port = free_port(), free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        # The real node's address (tests/k8s/node.py), chosen now so that the apiserver's
        # serving certificate names it: pods on that node reach the apiserver there.
        self.node_subnet = pick_node_subnet()
        self.node_ip = f"10.88.{self.node_subnet}.1"
        self.pod_server = f"https://{self.node_ip}:{self.port}"
        self._api: k8s.ApiClient | None = None
        self.phase_seconds: dict[str, float] = {}  # how long each start phase took
        self._phase_end = 0.0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        t0 = time.monotonic()
        for folder in (self.pki, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        certs = self._make_certs()
        self._phase("certificates", t0)
        self._start_etcd()
        self._phase("etcd")
        self._start_apiserver(certs)
        self._phase("kube-apiserver")
        # Everything else at once: on a busy machine the start is CPU-bound, and processes
        # starting side by side get more of the CPU than one after the other.
        health = self._start_controllers(certs)
        self._start_kwok()
        self._start_process_kubelet()
        self._create_nodes()
        for name, url in health.items():
            self.wait_for(lambda url=url: _http_ok(url, insecure=True), f"{name} /healthz")
        self.wait_for(self._nodes_ready, "all nodes Ready")
        self.wait_for(lambda: self._has_service_account("default"), "default service account")
        self._phase("controllers and nodes Ready")
        self.start_seconds = time.monotonic() - t0

    def _phase(self, name: str, since: float | None = None) -> None:
        """Record how long a start phase took (from the previous phase's end)."""
        t = time.monotonic()
        start = since if since is not None else self._phase_end
        self.phase_seconds[name] = round(t - start, 2)
        self._phase_end = t

    def stop(self) -> None:
        """Reverse order: node agents first, etcd last, so nothing logs a dead dependency."""
        if self._api is not None:
            self._api.close()
            self._api = None
        for component in reversed(self.components):
            component.stop()

    def component_logs(self) -> dict[str, Path]:
        return {c.name: c.log for c in self.components}

    def describe_failure(self) -> str:
        """The tail of every component's log, for a failed test's report."""
        parts = [f"==== {c.name} ({c.log})\n{log_tail(c.log, 1500)}" for c in self.components]
        return "\n".join(parts)

    # ------------------------------------------------------------------ clients

    def api(self) -> k8s.ApiClient:
        """An admin (system:masters) client of the kubernetes package."""
        if self._api is None:
            self._api = k8s_config.new_client_from_config(config_file=str(self.kubeconfig))
        return self._api

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def get_json(self, path: str) -> dict:
        with urllib.request.urlopen(self.server + path, context=self.ssl_context()) as r:
            return json.loads(r.read())

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> str:
        """A namespace, returned once its `default` service account exists: before that,
        the ServiceAccount admission plugin rejects every pod in it."""
        body = {"metadata": {"name": name, "labels": labels or {}}}
        k8s.CoreV1Api(self.api()).create_namespace(body)
        self.wait_for(lambda: self._has_service_account(name), f"service account in {name}", 60)
        return name

    def pod_log(self, namespace: str, name: str) -> Path:
        """Output of a pod that the process kubelet ran."""
        return pod_log(self.root / "process-kubelet", namespace, name)

    def wait_for(
        self, ready: Callable[[], bool], what: str, timeout: float = START_TIMEOUT
    ) -> None:
        """Poll `ready`; fail early, with its log, when a component died meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            for component in self.components:
                component.check_alive()
            if ready():
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"{what}: not after {timeout:.0f}s\n{self.describe_failure()}")
            time.sleep(0.2)

    # ------------------------------------------------------------------ certificates

    def _make_certs(self) -> dict[str, CertFiles]:
        # Kept: the real node (tests/k8s/node.py) gets its kubelet's identity from it.
        self.ca = ca = CertificateAuthority(self.pki)
        hosts = (
            "127.0.0.1",
            "localhost",
            "10.0.0.1",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
            self.node_ip,
        )
        certs = {
            "ca": ca.files,
            "serving": ca.issue("apiserver", "kube-apiserver", hosts=hosts),
            "sa": service_account_keys(self.pki),
            # system:masters bypasses RBAC: the test's and the process kubelet's identity.
            "admin": ca.issue("admin", "fst-test-admin", ("system:masters",)),
            # The bootstrap RBAC policy grants these two users what their components need.
            "controller-manager": ca.issue("controller-manager", "system:kube-controller-manager"),
            "scheduler": ca.issue("scheduler", "system:kube-scheduler"),
            # The aggregation layer's identity towards extension apiservers (as kubeadm sets
            # it up); without it the components log errors about a missing requestheader CA.
            "front-proxy": ca.issue("front-proxy-client", "front-proxy-client"),
            # The apiserver's identity towards a real kubelet (logs, exec): the kubelet
            # trusts this CA's client certificates (tests/k8s/node.py).
            "kubelet-client": ca.issue(
                "apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",)
            ),
        }
        for user in ("admin", "controller-manager", "scheduler"):
            self.write_kubeconfig(self.root / f"{user}.kubeconfig", user, certs[user])
        return certs

    def write_kubeconfig(self, path: Path, user: str, cert: CertFiles) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "fst-test",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority": str(self.pki / "ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {"client-certificate": str(cert.cert), "client-key": str(cert.key)},
                }
            ],
            "contexts": [{"name": "fst-test", "context": {"cluster": "fst-test", "user": user}}],
            "current-context": "fst-test",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))

    # ------------------------------------------------------------------ components

    def _add(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Component:
        component = Component(name, [str(c) for c in cmd], self.logs / f"{name}.log", env)
        self.components.append(component)
        component.start()
        return component

    def _start_etcd(self) -> None:
        peer = f"http://127.0.0.1:{free_port()}"
        client_url = f"http://127.0.0.1:{self.etcd_port}"
        self._add(
            "etcd",
            [
                self.bins["etcd"],
                "--name=fst-test",
                f"--data-dir={self.root / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=fst-test={peer}",
                "--unsafe-no-fsync=true",  # throwaway data: durability only costs time
                "--log-level=warn",
            ],
        )
        self.wait_for(lambda: _http_ok(f"{client_url}/health"), "etcd /health", 60)

    def _start_apiserver(self, certs: dict[str, CertFiles]) -> None:
        self._add(
            "kube-apiserver",
            [
                self.bins["kube-apiserver"],
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                # All addresses: pods on the real node reach it at the node's address (it exists
                # once the node starts); clients authenticate with certificates or tokens.
                "--bind-address=0.0.0.0",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--cert-dir={self.pki}",
                f"--tls-cert-file={certs['serving'].cert}",
                f"--tls-private-key-file={certs['serving'].key}",
                f"--client-ca-file={certs['ca'].cert}",
                f"--service-account-key-file={certs['sa'].cert}",
                f"--service-account-signing-key-file={certs['sa'].key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                f"--requestheader-client-ca-file={certs['ca'].cert}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={certs['front-proxy'].cert}",
                f"--proxy-client-key-file={certs['front-proxy'].key}",
                f"--kubelet-client-certificate={certs['kubelet-client'].cert}",
                f"--kubelet-client-key={certs['kubelet-client'].key}",
                # The real node's name resolves nowhere; its InternalIP is what reaches it.
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                # PodSecurity is on by default; named so that a default change cannot drop it.
                "--enable-admission-plugins=NodeRestriction,PodSecurity",
                # Privileged pods must pass validation so that PodSecurity is what judges them.
                "--allow-privileged=true",
                # A loopback address is not a valid endpoint of the `kubernetes` Service.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
            ],
        )
        self.wait_for(lambda: self._https_ok("/readyz"), "kube-apiserver /readyz")

    def _start_controllers(self, certs: dict[str, CertFiles]) -> dict[str, str]:
        """Start controller-manager and scheduler; returns their /healthz URLs."""
        cm_port, sched_port = free_port(), free_port()
        cm_kubeconfig = self.root / "controller-manager.kubeconfig"
        self._add(
            "kube-controller-manager",
            [
                self.bins["kube-controller-manager"],
                f"--kubeconfig={cm_kubeconfig}",
                f"--authentication-kubeconfig={cm_kubeconfig}",
                f"--authorization-kubeconfig={cm_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={cm_port}",
                f"--cert-dir={self.pki}",
                "--leader-elect=false",
                # Each controller acts as its own service account, as kubeadm sets it up: the
                # bootstrap RBAC roles are written for those identities.
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={certs['sa'].key}",
                f"--root-ca-file={certs['ca'].cert}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # Lifts the taints of a new node within a second of it being Ready (default 5s).
                "--node-monitor-period=1s",
                # The default 20 requests/s spaces the ~40 controllers' service-account
                # set-up ~150 ms apart: seconds of startup for nothing on a test cluster.
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                "--profiling=false",
            ],
        )
        sched_kubeconfig = self.root / "scheduler.kubeconfig"
        self._add(
            "kube-scheduler",
            [
                self.bins["kube-scheduler"],
                f"--kubeconfig={sched_kubeconfig}",
                f"--authentication-kubeconfig={sched_kubeconfig}",
                f"--authorization-kubeconfig={sched_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={sched_port}",
                f"--cert-dir={self.pki}",
                "--leader-elect=false",
                "--profiling=false",
            ],
        )
        return {
            "kube-controller-manager": f"https://127.0.0.1:{cm_port}/healthz",
            "kube-scheduler": f"https://127.0.0.1:{sched_port}/healthz",
        }

    def _start_kwok(self) -> None:
        key, value = KWOK_NODE_ANNOTATION
        self._add(
            "kwok",
            [
                self.bins["kwok"],
                f"--kubeconfig={self.kubeconfig}",
                f"--config={KWOK_STAGES}",
                f"--manage-nodes-with-annotation-selector={key}={value}",
                "--node-lease-duration-seconds=40",
            ],
        )

    def _start_process_kubelet(self) -> None:
        self._add(
            "process-kubelet",
            [
                sys.executable,
                "-m",
                "tests.k8s.process_kubelet",
                f"--kubeconfig={self.kubeconfig}",
                f"--node={PROCESS_NODE}",
                f"--taint={PROCESS_NODE_TAINT}",
                f"--workdir={self.root / 'process-kubelet'}",
            ],
            env={**os.environ, "PYTHONPATH": str(HERE.parent.parent), "PYTHONUNBUFFERED": "1"},
        )

    # ------------------------------------------------------------------ nodes

    def _create_nodes(self) -> None:
        core = k8s.CoreV1Api(self.api())
        for i in range(self.gpu_nodes.count):
            core.create_node(self._gpu_node(f"gpu-node-{i}"))

    def _gpu_node(self, name: str) -> dict:
        key, value = KWOK_NODE_ANNOTATION
        resources = {
            "cpu": self.gpu_nodes.cpu,
            "memory": self.gpu_nodes.memory,
            "pods": "110",
            "nvidia.com/gpu": str(self.gpu_nodes.gpus),
        }
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {key: value, "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    "nvidia.com/gpu.present": "true",
                },
            },
            # The apiserver keeps a new Node's status, so the capacity is there from the start.
            "status": {"capacity": resources, "allocatable": resources},
        }

    def _nodes_ready(self) -> bool:
        nodes = k8s.CoreV1Api(self.api()).list_node().items
        names = {n.metadata.name for n in nodes if _is_ready(n) and not _not_ready_taint(n)}
        wanted = {f"gpu-node-{i}" for i in range(self.gpu_nodes.count)} | {PROCESS_NODE}
        return wanted <= names

    def _has_service_account(self, namespace: str) -> bool:
        try:
            k8s.CoreV1Api(self.api()).read_namespaced_service_account("default", namespace)
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    def _https_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(
                self.server + path, context=self.ssl_context(), timeout=5
            ) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies, even by SIGKILL, so a
    crashed test run leaves no apiserver behind (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def pick_node_subnet() -> int:
    """<n> of a 10.88.<n>.0/24 that no interface of this machine uses (two test runs on one
    machine may both have a real node)."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    return random.choice([n for n in range(10, 250) if f" 10.88.{n}." not in used])


def _is_ready(node) -> bool:
    conditions = node.status.conditions or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def _not_ready_taint(node) -> bool:
    """The node lifecycle controller taints a new node until it sees it Ready; the scheduler
    would not place pods before the taint is gone."""
    taints = node.spec.taints or []
    return any(t.key.startswith("node.kubernetes.io/") for t in taints)


def _http_ok(url: str, insecure: bool = False) -> bool:
    ctx = None
    if insecure:  # a component's self-signed /healthz; only its liveness matters
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=5, context=ctx) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def test_cluster(gpu_nodes: GpuNodes | None = None) -> Iterator[TestCluster]:
    """Build missing binaries, start the cluster in a fresh temp folder, stop it at the end.
    The folder (logs included) is kept when startup failed or `keep_logs` was set, or when
    FST_K8S_KEEP=1."""
    bins = binaries.all_binaries()
    cluster = TestCluster(Path(tempfile.mkdtemp(prefix="fst-k8s-")), bins, gpu_nodes or GpuNodes())
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()
        if not (cluster.keep_logs or os.environ.get("FST_K8S_KEEP") == "1"):
            shutil.rmtree(cluster.root, ignore_errors=True)


test_cluster.__test__ = False  # type: ignore[attr-defined]
