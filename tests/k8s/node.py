"""A real node for the test control plane: kubelet + containerd + runc + CNI bridge.

    with real_node(cluster) as node:           # registered, Ready, its images imported
        node.import_image(archive)             # an OCI archive (tests/k8s/images.py)
        pod = {..., "spec": {**node.pod_placement(), "containers": [...]}}

Where the process kubelet (tests/k8s/process_kubelet.py) runs a pod's command as a local
process, this node runs pods as real containers: the kubelet talks CRI to containerd, which
starts each pod's sandbox and containers with runc in their own namespaces and cgroups, with the
security context, the read-only root and the CPU and memory limits enforced by the kernel.

What comes from where, and why:
- **kubelet** v1.34.x: built from `k8s.io/kubernetes/cmd/kubelet` (tests/k8s/binaries.py), the
  control plane's own version — Debian packages no kubelet;
- **containerd** 1.6 and **runc**: Debian 12's packages (`make test-deps` installs them). They
  are what a Debian node runs, their builds take no time, and the CRI v1 API of containerd 1.6
  is what a 1.34 kubelet speaks;
- **CNI plugins** (bridge, host-local; containerd adds loopback): Debian's
  containernetworking-plugins.

Settings this VM needs (measured; ../shared/notes/real-node.md):
- cgroup v1 with the `cgroupfs` driver (no systemd here), kubelet `failCgroupV1: false`;
  pods live under a cgroup root of their own (`/fst-node-<id>/kubepods/...`), so two test runs
  on one machine never share cgroups;
- `restrict_oom_score_adj = true` in containerd: this VM forbids lowering `oom_score_adj`,
  and runc fails to start a sandbox that tries;
- the `overlayfs` snapshotter: containers share their image's unpacked layers. (`native`
  copies the whole image per container: measured, the 6.6 GB trainer image filled the disk
  after a few trainer pods); an imported image's layer blobs are deleted once unpacked
  (`import_image`), so the trainer image takes its 6.6 GB once, not twice;
- `failSwapOn: false`, no disk eviction (this VM's shared, thin disk reports wildly varying
  free space; a 1% threshold evicted a training pod);
- a node IP that is not loopback (the kubelet refuses one): the CNI bridge's gateway address.
  The harness creates the bridge (`fst<id>`, 10.88.<n>.1/24) before the kubelet starts, so the
  node's InternalIP exists from the start: the apiserver reaches the kubelet there (logs,
  exec) and pods reach the host there — the apiserver too, which listens on all addresses with
  the node's address in its certificate (tests/k8s/cluster.py chooses it before it starts).
  The bridge plugin then attaches pods to it. There is no kube-proxy: a pod that talks to the
  apiserver is given KUBERNETES_SERVICE_HOST/PORT = the node's address and the apiserver's
  port (`RealNode.apiserver_env()`).

Pods are scheduled here only when they ask (the node is tainted, like the process node):
`pod_placement()` gives the toleration and node selector. Everything lives in one temp folder
(containerd's root and state, the kubelet's root, logs), removed at the end with the bridge
and the cgroups; containerd's network namespaces are mounted under its state folder
(`netns_mounts_under_state_dir`), never in the machine's /var/run/netns.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from kubernetes import client as k8s

from tests.k8s import binaries
from tests.k8s.cluster import ClusterError, Component, TestCluster, _is_ready
from tests.k8s.images import ImageArchive, pause_image
from tests.servers import free_port

REAL_NODE = "real-node-0"
REAL_NODE_TAINT = "fst.test/real-node"
REAL_NODE_TOLERATION = {"key": REAL_NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"}
REAL_NODE_SELECTOR = {"kubernetes.io/hostname": REAL_NODE}
CNI_BIN = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
START_TIMEOUT = 120.0
CGROUP_V1 = Path("/sys/fs/cgroup")
SNAPSHOTTER = "overlayfs"


class NodeUnavailable(ClusterError):
    """The machine lacks something the real node needs; the message says what and how."""


@dataclass
class RealNode:
    cluster: TestCluster
    kubelet: Path
    name: str = REAL_NODE
    components: list[Component] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.id = f"{random.getrandbits(24):06x}"
        self.root = self.cluster.root / "real-node"
        self.socket = self.root / "containerd.sock"
        self.bridge = f"fst{self.id}"
        self.subnet = f"10.88.{self.cluster.node_subnet}.0/24"
        self.ip = self.cluster.node_ip
        self.cgroup_root = f"/fst-node-{self.id}"
        self.kubelet_port = free_port()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        _check_tools()
        self._kill_shims()  # orphans of a test run killed before its cleanup
        self.root.mkdir(parents=True, exist_ok=True)
        self._make_bridge()
        self._make_cgroup_root()
        self._start_containerd()
        self.import_image(pause_image())
        self._start_kubelet()
        self.cluster.wait_for(self.ready, f"node {self.name} Ready", START_TIMEOUT)

    def ready(self) -> bool:
        try:
            node = k8s.CoreV1Api(self.cluster.api()).read_node(self.name)
        except k8s.ApiException:
            return False
        taints = [t.key for t in node.spec.taints or []]
        return _is_ready(node) and not any(t.startswith("node.kubernetes.io/") for t in taints)

    def stop(self) -> None:
        """Kubelet first (it would restart what we kill), then every container of ours, then
        containerd; then the mounts, the bridge and the cgroups it leaves behind. Every step
        runs even when one before it failed: a half-stopped node leaks processes and mounts."""
        steps = [*(c.stop for c in reversed(self.components))]
        steps += [self._kill_cgroup_processes, self._kill_shims, self._unmount]
        steps += [self._remove_bridge, self._remove_cgroup_root]
        errors = []
        for step in steps:
            try:
                step()
            except Exception as e:  # reported below, after the other steps
                errors.append(f"{getattr(step, '__name__', step)}: {e}")
        for component in self.components:
            if component in self.cluster.components:
                self.cluster.components.remove(component)
        if errors:
            raise ClusterError("stopping the real node: " + "; ".join(errors))

    def _unmount(self) -> None:
        self._unmount_under(self.root)

    def _remove_bridge(self) -> None:
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def _add(self, name: str, cmd: list[str]) -> Component:
        component = Component(name, [str(c) for c in cmd], self.cluster.logs / f"{name}.log")
        self.components.append(component)
        # One of the cluster's components: a crash fails the next wait, its log joins a failed
        # test's report.
        self.cluster.components.append(component)
        component.start()
        return component

    # ------------------------------------------------------------------ network

    def _make_bridge(self) -> None:
        for cmd in (
            ["ip", "link", "add", self.bridge, "type", "bridge"],
            ["ip", "addr", "add", f"{self.ip}/24", "dev", self.bridge],
            ["ip", "link", "set", self.bridge, "up"],
        ):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise NodeUnavailable(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")

    def cni_config(self) -> dict:
        return {
            "cniVersion": "0.4.0",
            "name": "fst-node",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.subnet, "gateway": self.ip}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.root / "cni-ipam"),
                    },
                }
            ],
        }

    # ------------------------------------------------------------------ cgroups

    def _cgroup_dirs(self) -> list[Path]:
        """Our cgroup root in every hierarchy of the machine (the v1 controllers, and the
        hybrid setup's v2 `unified` one, where the kubelet makes its folders too)."""
        hierarchies = [
            p for p in CGROUP_V1.iterdir() if p.is_dir() and (p / "cgroup.procs").exists()
        ]
        return [h / self.cgroup_root.lstrip("/") for h in hierarchies]

    def _make_cgroup_root(self) -> None:
        for folder in self._cgroup_dirs():
            folder.mkdir(exist_ok=True)
            if folder.parent.name == "cpuset":
                # A new cpuset is empty: a task in it could run nowhere.
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    (folder / knob).write_text((folder.parent / knob).read_text())

    def _kill_cgroup_processes(self) -> None:
        for folder in self._cgroup_dirs():
            if folder.parent.name != "pids" or not folder.exists():
                continue
            for procs in folder.rglob("cgroup.procs"):
                for pid in procs.read_text().split():
                    _kill(int(pid))

    def _remove_cgroup_root(self) -> None:
        for folder in self._cgroup_dirs():
            if not folder.exists():
                continue
            # Deepest first: a cgroup is removed with rmdir once its children are gone.
            for child in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
                if child.is_dir():
                    _rmdir_quietly(child)
            _rmdir_quietly(folder)

    # ------------------------------------------------------------------ containerd

    def containerd_config(self) -> str:
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        return f"""version = 2
root = "{self.root / "containerd-root"}"
state = "{self.root / "containerd-state"}"

[grpc]
  address = "{self.socket}"

# A garbage collection after every deletion: the layer blobs `import_image` deletes are
# freed on disk at once (the default waits for 100 mutations).
[plugins."io.containerd.gc.v1.scheduler"]
  deletion_threshold = 1

[{cri}]
  sandbox_image = "{pause_image().name}"
  # This VM forbids lowering oom_score_adj; runc fails a sandbox that tries.
  restrict_oom_score_adj = true
  # Network namespaces in our folder, not the machine's /var/run/netns.
  netns_mounts_under_state_dir = true
  enable_selinux = false

[{cri}.containerd]
  snapshotter = "{SNAPSHOTTER}"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{self.root / "cni"}"
"""

    def _start_containerd(self) -> None:
        (self.root / "cni").mkdir(exist_ok=True)
        (self.root / "cni" / "10-fst-node.conflist").write_text(json.dumps(self.cni_config()))
        config = self.root / "containerd.toml"
        config.write_text(self.containerd_config())
        self._add("containerd", ["containerd", f"--config={config}"])
        self.cluster.wait_for(self._containerd_up, "containerd", 60)

    def _containerd_up(self) -> bool:
        if not self.socket.exists():
            return False
        return self._ctr("version", check=False).returncode == 0

    def _ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["ctr", f"--address={self.socket}", "--namespace=k8s.io", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if check and proc.returncode != 0:
            raise ClusterError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-2000:]}")
        return proc

    def import_image(self, archive: ImageArchive) -> None:
        """Import an OCI archive as `archive.name`. The archive's index names its manifest by
        tag (org.opencontainers.image.ref.name); `--base-name` completes that to the full
        name. (With `--index-name` instead, ctr also adds an `import-<date>:<tag>` name, which
        the CRI then picks for the sandbox image and fails to find once it is removed.)"""
        base, _, _ = archive.name.rpartition(":")
        # Unpacked now, into the snapshotter the CRI uses: otherwise the kubelet's
        # CreateContainer unpacks a 6 GB image itself and hits its 2-minute deadline.
        self._ctr(
            "images",
            "import",
            f"--snapshotter={SNAPSHOTTER}",
            f"--base-name={base}",
            str(archive.path),
        )
        listed = self._ctr("images", "list", "--quiet").stdout.split()
        if archive.name not in listed:
            raise ClusterError(f"importing {archive.path} gave {listed}, not {archive.name}")
        self._delete_unpacked_layers(archive.name)

    def _delete_unpacked_layers(self, name: str) -> None:
        """Delete an imported image's layer blobs from containerd's content store: once they
        are unpacked, containers start from the snapshots and the CRI reads only the image's
        manifest and config (what the CRI's `discard_unpacked_layers` does for pulled images;
        `ctr` 1.6 has no such import flag). Measured: the trainer image's 6.6 GB of
        uncompressed layers sat beside their 6.6 GB unpacked copy for the rest of a test run,
        and two runs on one machine filled its disk."""
        layers = self.image_layers(name)
        if layers:
            self._ctr("content", "rm", *layers)

    def image_layers(self, name: str) -> list[str]:
        """The digests of an image's layers, read from its manifest(s) in containerd."""
        listing = self._ctr("images", "list", f"name=={name}").stdout.splitlines()
        target = listing[1].split()[2]  # REF TYPE DIGEST ...
        return [layer["digest"] for m in self._manifests(target) for layer in m["layers"]]

    def content_digests(self) -> set[str]:
        """The digests of every blob in containerd's content store."""
        return set(self._ctr("content", "list", "--quiet").stdout.split())

    def _manifests(self, digest: str) -> list[dict]:
        blob = json.loads(self._ctr("content", "get", digest).stdout)
        if "manifests" not in blob:
            return [blob]
        return [m for child in blob["manifests"] for m in self._manifests(child["digest"])]

    def _kill_shims(self) -> None:
        """containerd's shims outlive it by design (containers survive a containerd restart):
        stop ours, named by our socket, and any test node's whose socket is gone (a run that
        was killed before it could clean up). Their containers die with them (runc's
        children of the shim get SIGKILL through the pdeath signal of their init)."""
        out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
        for line in out.splitlines():
            pid, _, args = line.strip().partition(" ")
            if "containerd-shim" not in args or "-address" not in args:
                continue
            socket = args.split("-address", 1)[1].split()[0]
            ours = socket == str(self.socket)
            orphan = "/real-node/containerd.sock" in socket and not Path(socket).exists()
            if ours or orphan:
                _kill(int(pid))

    # ------------------------------------------------------------------ kubelet

    def kubelet_config(self) -> dict:
        # "0%" switches a disk signal off (kubelet ignores 0% and 100%). This VM's disk is
        # thin-provisioned and shared: its free space swings by tens of GB under other load
        # (measured: 600 MB "available" for a moment with 34 GB free a minute later), and 1%
        # of 252 GB evicted a training pod and tainted the node.
        disk_off = "0%"
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.ip,
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            # The apiserver authenticates with a client certificate of the cluster's CA.
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(self.cluster.pki / "ca.crt")},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "failCgroupV1": False,
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "podLogsDir": str(self.root / "pod-logs"),
            "volumePluginDir": str(self.root / "volume-plugins"),
            "registerWithTaints": [{"key": REAL_NODE_TAINT, "effect": "NoSchedule"}],
            "evictionHard": {
                "memory.available": "50Mi",
                "nodefs.available": disk_off,
                "nodefs.inodesFree": disk_off,
                "imagefs.available": disk_off,
                "imagefs.inodesFree": disk_off,
            },
            # Imported images cannot be pulled again: never collect them.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "clusterDomain": "cluster.local",
            "nodeStatusUpdateFrequency": "2s",
            "maxPods": 30,
        }

    def _start_kubelet(self) -> None:
        identity = self.cluster.ca.issue(
            "kubelet-" + self.name, f"system:node:{self.name}", ("system:nodes",)
        )
        kubeconfig = self.root / "kubelet.kubeconfig"
        self.cluster.write_kubeconfig(kubeconfig, "kubelet", identity)
        config = self.root / "kubelet.yaml"
        config.write_text(yaml.safe_dump(self.kubelet_config(), sort_keys=False))
        self._add(
            "kubelet",
            [
                self.kubelet,
                f"--config={config}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={self.root / 'kubelet'}",
                f"--cert-dir={self.root / 'kubelet-pki'}",
                f"--hostname-override={self.name}",
                f"--node-ip={self.ip}",
                f"--node-labels={REAL_NODE_TAINT}=true",
                "--v=2",
            ],
        )

    # ------------------------------------------------------------------ for tests

    @staticmethod
    def pod_placement() -> dict:
        """What a pod spec needs to run here (the node is tainted)."""
        return {"tolerations": [REAL_NODE_TOLERATION], "nodeSelector": REAL_NODE_SELECTOR}

    def apiserver_env(self) -> list[dict]:
        """Container env that points in-cluster clients at the apiserver (no kube-proxy)."""
        return [
            {"name": "KUBERNETES_SERVICE_HOST", "value": self.ip},
            {"name": "KUBERNETES_SERVICE_PORT", "value": str(self.cluster.port)},
        ]

    def describe(self) -> str:
        return self._ctr("images", "list", check=False).stdout

    def container_pids(self, container_id: str) -> list[int]:
        """The host PIDs of a container's processes (`containerd://<id>` of a pod's status,
        without the prefix): what a test signals to make a container hang or die."""
        out = self._ctr("tasks", "ps", container_id).stdout.splitlines()
        return [int(line.split()[0]) for line in out[1:] if line.split()]

    @staticmethod
    def _unmount_under(root: Path) -> None:
        """Unmount whatever the kubelet and containerd left mounted in our folder (secret
        volumes are tmpfs, sandboxes' /dev/shm, network namespaces), deepest first."""
        mounts = []
        for line in Path("/proc/self/mounts").read_text().splitlines():
            target = line.split()[1].replace("\\040", " ")
            if target == str(root) or target.startswith(f"{root}/"):
                mounts.append(target)
        for target in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True)


def _check_tools() -> None:
    missing = [
        t
        for t in ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "ip")
        if not shutil.which(t)
    ]
    if not (CNI_BIN / "bridge").is_file():
        missing.append(f"{CNI_BIN}/bridge")
    if missing:
        raise NodeUnavailable(
            f"the real test node needs {', '.join(missing)}: install Debian's containerd, "
            "runc and containernetworking-plugins (make test-deps does)"
        )
    if os.geteuid() != 0:
        raise NodeUnavailable("the real test node runs containerd and a kubelet: it needs root")


def _kill(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, 9)


def _rmdir_quietly(path: Path) -> None:
    for _ in range(20):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)  # its last task is still exiting


@contextmanager
def real_node(cluster: TestCluster) -> Iterator[RealNode]:
    """Build the kubelet if missing, start containerd and the kubelet, wait until the node is
    Ready; stop and clean up at the end. Raises ClusterError (with the logs) when it cannot."""
    node = RealNode(cluster, binaries.binary("kubelet"))
    try:
        node.start()
        yield node
    finally:
        node.stop()
