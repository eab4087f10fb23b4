"""A test-only "kubelet" that runs pods as local processes: no images, no containers.

    python -m tests.k8s.process_kubelet --kubeconfig K --node process-node-0 --workdir DIR

It registers its node (tainted `--taint`=true:NoSchedule, so only pods that tolerate it come),
keeps it Ready (node Lease renewed and Ready condition refreshed every few seconds), and for each
pod bound to it runs the FIRST container's `command + args` as a subprocess, reporting the pod
through Pending -> Running -> Succeeded / Failed with the container's exit code, as a kubelet
would. The image is ignored: the command must exist on this machine (the test's Python venv
`bin` folder is first on PATH, so `python` and `fst` are the venv's).

What it does of a pod spec:
- env: `value` (with $(VAR) expansion), `valueFrom` secretKeyRef / configMapKeyRef /
  fieldRef (metadata.name, namespace, uid, labels, annotations, spec.nodeName,
  spec.serviceAccountName, status.podIP / hostIP = 127.0.0.1), and envFrom.
- volumes: configMap, secret, emptyDir and projected (configMap, secret, downwardAPI,
  serviceAccountToken) become folders under DIR/pods/<ns>_<name>_<uid>/volumes/<volume>/.
  A process cannot see them at their mountPath, so the mountPath prefix is rewritten to the
  folder in command, args, env values and workingDir (`--config /etc/fst/cfg.yaml` becomes
  `--config DIR/.../volumes/config/cfg.yaml`), and FST_PROCESS_KUBELET_MOUNTS holds the JSON
  map {mountPath: folder} for paths the program finds elsewhere (e.g. inside a config file).
- networking: no DNS, no pod IPs; every process shares the host's network (podIP 127.0.0.1).
  The narrowest stand-in for the one name multi-pod programs need, a pod's
  `<hostname>.<subdomain>` (what a headless Service gives the pods of an Indexed Job, e.g.
  torchrun's master address `<job>-0.<job>`): in a pod with `spec.subdomain`, such a name
  (also followed by `.<namespace>`, `.svc`, `.cluster.local`) in command, args and env values
  is rewritten to 127.0.0.1 when, as cluster DNS requires, a headless Service named
  `<subdomain>` selects a pod of this namespace with that hostname and subdomain, and that pod
  runs HERE (the process reaches no other node). Until then (the Service or the pod not made
  yet, the pod not scheduled yet) the pod waits in Pending, retried every 2 s, where a real
  program would retry its DNS lookups. Not done: readiness (publishNotReadyAddresses),
  other Services' names, SRV records, names of pods on other nodes (the pod waits forever),
  Endpoints (the EndpointSlice controller refuses the loopback pod IP).
  `$(JOB_COMPLETION_INDEX)` and the hostname (`HOSTNAME`: spec.hostname, which the Job
  controller sets to `<job>-<index>` in an Indexed Job, else the pod name) come as for any
  pod: the env's $(VAR) expansion and fieldRef on the completion-index annotation.
- restartPolicy: Never ends the pod; OnFailure / Always start the process again (1 s later).
- deletion: the process group gets SIGTERM (SIGKILL after the grace period, at most 10 s),
  then the pod object is removed.
- output: stdout + stderr go to DIR/pods/<ns>_<name>_<uid>/<container>.log (see `pod_log`);
  `kubectl logs`/exec/port-forward do not work (there is no kubelet API server).

Not done: images, init and sidecar containers, more than one container, probes, resource
limits, hostPath / PVC volumes, networking beyond the names above (ports are the host's: two
pods listening on one port collide), security contexts (the process runs as this user).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException

log = logging.getLogger("process-kubelet")

HEARTBEAT_SECONDS = 5.0
LEASE_SECONDS = 40
POLL_SECONDS = 0.3
RESTART_DELAY = 1.0
# Host variables a process may need whatever its pod says (OpenBLAS needs its CPU settings on
# some processors). FST_PROCESS_KUBELET_PASSENV adds more, comma-separated.
PASSENV = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


class PodConfigError(Exception):
    """The pod references something missing (a Secret key, ...): it stays Pending, like
    CreateContainerConfigError, and is tried again."""

    reason = "CreateContainerConfigError"


class PodWaiting(PodConfigError):
    """The pod needs what does not exist yet here (a sibling pod's name to resolve): it stays
    Pending and is tried again."""

    reason = "ContainerCreating"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def pod_log(workdir: Path, namespace: str, name: str, container: str | None = None) -> Path:
    """The log file of the newest pod `namespace/name` (its first container by default)."""
    dirs = sorted((workdir / "pods").glob(f"{namespace}_{name}_*"), key=lambda p: p.stat().st_mtime)
    if not dirs:
        raise FileNotFoundError(f"no process-kubelet folder for pod {namespace}/{name}")
    logs = sorted(dirs[-1].glob(f"{container or '*'}.log"))
    if not logs:
        raise FileNotFoundError(f"no log in {dirs[-1]}")
    return logs[0]


# ----------------------------------------------------------------------------- a pod's process


@dataclass
class RunningPod:
    pod: dict
    folder: Path
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    proc: subprocess.Popen | None = None
    started_at: str = ""
    restarts: int = 0
    last_state: dict = field(default_factory=dict)
    finished: bool = False
    restart_at: float | None = None

    @property
    def container(self) -> dict:
        return self.pod["spec"]["containers"][0]

    def start(self) -> None:
        out = (self.folder / f"{self.container['name']}.log").open("a")
        out.write(f"--- {now()} {self.argv}\n")
        out.flush()
        self.started_at = now()
        # A session of its own: stopping the pod signals its whole process group.
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()

    def stop(self, grace: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        _signal_group(self.proc, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(self.proc, signal.SIGKILL)
            self.proc.wait(timeout=10)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is already gone
        os.killpg(proc.pid, sig)


# ----------------------------------------------------------------------------- the kubelet


class ProcessKubelet:
    def __init__(self, api: k8s.ApiClient, node: str, taint: str, workdir: Path) -> None:
        self.core = k8s.CoreV1Api(api)
        self.leases = k8s.CoordinationV1Api(api)
        self.server = api.configuration.host
        self.node, self.taint, self.workdir = node, taint, workdir
        self.pods: dict[str, RunningPod] = {}  # by pod uid
        self.retry_at: dict[str, float] = {}  # pods whose config was incomplete, by uid
        self.next_heartbeat = 0.0
        self.stopping = False

    def run(self) -> None:
        self.register_node()
        while not self.stopping:
            if time.monotonic() >= self.next_heartbeat:
                self.heartbeat()
                self.next_heartbeat = time.monotonic() + HEARTBEAT_SECONDS
            try:
                self.sync_pods()
            except ApiException as e:  # a passing apiserver error: try again next round
                log.warning("sync failed: %s %s", e.status, e.reason)
            time.sleep(POLL_SECONDS)
        for running in self.pods.values():
            running.stop(grace=5)

    # ------------------------------------------------------------------ node

    def register_node(self) -> None:
        resources = {"cpu": str(os.cpu_count() or 1), "memory": _memory(), "pods": "110"}
        body = {
            "metadata": {
                "name": self.node,
                "labels": {
                    "kubernetes.io/hostname": self.node,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    self.taint: "true",
                },
            },
            "spec": {"taints": [{"key": self.taint, "value": "true", "effect": "NoSchedule"}]},
            "status": {"capacity": resources, "allocatable": resources},
        }
        try:
            self.core.create_node(body)
        except ApiException as e:
            if e.status != 409:
                raise
        self.heartbeat()
        log.info("node %s registered", self.node)

    def heartbeat(self) -> None:
        """Renew the node Lease (what the node lifecycle controller watches) and refresh the
        Ready condition, so the node never turns NotReady and its pods are never evicted."""
        spec = {
            "holderIdentity": self.node,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": now_micro(),
        }
        try:
            self.leases.patch_namespaced_lease(self.node, "kube-node-lease", {"spec": spec})
        except ApiException as e:
            if e.status != 404:
                raise
            lease = {"metadata": {"name": self.node, "namespace": "kube-node-lease"}, "spec": spec}
            self.leases.create_namespaced_lease("kube-node-lease", lease)
        ready = {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "process kubelet is posting ready status",
            "lastHeartbeatTime": now(),
        }
        node = self.core.read_node(self.node)
        old = next((c for c in node.status.conditions or [] if c.type == "Ready"), None)
        if old is None or old.status != "True":
            ready["lastTransitionTime"] = now()
        status = {
            "conditions": [ready],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node},
            ],
            "nodeInfo": _node_info(),
        }
        self.core.patch_node_status(self.node, {"status": status})

    # ------------------------------------------------------------------ pods

    def sync_pods(self) -> None:
        resp = self.core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.node}", _preload_content=False
        )
        pods = json.loads(resp.data)["items"]
        seen = set()
        for pod in pods:
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            if pod["metadata"].get("deletionTimestamp"):
                self.remove_pod(pod)
            elif uid not in self.pods:
                pending = pod.get("status", {}).get("phase", "Pending") == "Pending"
                if pending and time.monotonic() >= self.retry_at.get(uid, 0):
                    self.start_pod(pod)
            else:
                self.check_pod(self.pods[uid])
        # Gone without a graceful deletion: force-deleted, or finished (the API server deletes
        # a Succeeded or Failed pod at once). Its volumes go too: a finished trainer's scratch
        # holds GBs, and CI's disk ran out on the ones left behind.
        for uid in set(self.pods) - seen:
            running = self.pods.pop(uid)
            running.stop(grace=1)
            _remove_volumes(running.folder)

    def start_pod(self, pod: dict) -> None:
        meta = pod["metadata"]
        folder = self.workdir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            running = self.prepare(pod, folder)
        except PodConfigError as e:
            self.patch_status(pod, _waiting_status(pod, e.reason, str(e)))
            self.retry_at[meta["uid"]] = time.monotonic() + 2  # still Pending: try again
            return
        running.start()
        self.pods[meta["uid"]] = running
        log.info("started %s/%s: %s", meta["namespace"], meta["name"], running.argv)
        self.patch_status(pod, self.running_status(running))

    def check_pod(self, running: RunningPod) -> None:
        if running.finished:
            return
        if running.restart_at is not None:
            if time.monotonic() >= running.restart_at:
                running.restart_at = None
                running.restarts += 1
                running.start()
                self.patch_status(running.pod, self.running_status(running))
            return
        code = running.proc.poll() if running.proc else None
        if code is None:
            return
        terminated = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": running.started_at,
            "finishedAt": now(),
        }
        policy = running.pod["spec"].get("restartPolicy", "Always")
        if policy == "Always" or (policy == "OnFailure" and code != 0):
            running.last_state = {"terminated": terminated}
            running.restart_at = time.monotonic() + RESTART_DELAY
            return
        running.finished = True
        meta = running.pod["metadata"]
        log.info("%s/%s exited with %s", meta["namespace"], meta["name"], code)
        self.patch_status(running.pod, _terminated_status(running, terminated))

    def remove_pod(self, pod: dict) -> None:
        meta = pod["metadata"]
        running = self.pods.pop(meta["uid"], None)
        if running is not None:
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
            running.stop(grace=min(float(grace), 10.0))
        folder = self.workdir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
        _remove_volumes(folder)
        try:  # grace 0 finishes the deletion, as a kubelet does once containers are gone
            options = {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
            self.core.delete_namespaced_pod(meta["name"], meta["namespace"], body=options)
        except ApiException as e:
            if e.status != 404:  # gone already
                raise

    def patch_status(self, pod: dict, status: dict) -> None:
        meta = pod["metadata"]
        try:
            self.core.patch_namespaced_pod_status(
                meta["name"], meta["namespace"], {"status": status}
            )
        except ApiException as e:
            if e.status != 404:
                raise

    def running_status(self, running: RunningPod) -> dict:
        c = running.container
        container_status = {
            "name": c["name"],
            "image": c.get("image") or "process",
            "imageID": "",
            "containerID": f"process://{running.proc.pid if running.proc else 0}",
            "ready": True,
            "started": True,
            "restartCount": running.restarts,
            "state": {"running": {"startedAt": running.started_at}},
        }
        if running.last_state:
            container_status["lastState"] = running.last_state
        stamp = now()
        return {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "startTime": running.pod.get("status", {}).get("startTime") or stamp,
            "conditions": [
                {"type": t, "status": "True", "lastTransitionTime": stamp}
                for t in ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")
            ],
            "containerStatuses": [container_status],
        }

    # ------------------------------------------------------------------ pod spec -> process

    def prepare(self, pod: dict, folder: Path) -> RunningPod:
        container = pod["spec"]["containers"][0]
        mounts = self.volume_mounts(pod, container, folder / "volumes")
        env = self.container_env(pod, container)
        argv = [
            expand(a, env) for a in (container.get("command") or []) + (container.get("args") or [])
        ]
        if not argv:
            raise PodConfigError(f"container {container['name']} has no command: no image here")
        hosts = self.local_pod_names(pod, [*argv, *env.values()])

        def rewrite(text: str) -> str:
            return rewrite_names(rewrite_paths(text, mounts), hosts)

        env = {k: rewrite(v) for k, v in env.items()}
        cwd = Path(rewrite(container["workingDir"])) if container.get("workingDir") else folder
        cwd.mkdir(parents=True, exist_ok=True)
        process_env = {
            **self.base_env(pod, folder),
            **env,
            "FST_PROCESS_KUBELET_MOUNTS": json.dumps({k: str(v) for k, v in mounts.items()}),
        }
        return RunningPod(pod, folder, [rewrite(a) for a in argv], process_env, cwd)

    def base_env(self, pod: dict, folder: Path) -> dict[str, str]:
        names = list(PASSENV) + os.environ.get("FST_PROCESS_KUBELET_PASSENV", "").split(",")
        env = {n: os.environ[n] for n in names if n and n in os.environ}
        # The venv's python and console scripts (fst) first, as an image's PATH would have them.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        host, _, port = self.server.removeprefix("https://").partition(":")
        env |= {
            "HOME": str(folder),
            "HOSTNAME": pod["spec"].get("hostname") or pod["metadata"]["name"],
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": port or "443",
        }
        return env

    def local_pod_names(self, pod: dict, texts: list[str]) -> dict[str, str]:
        """{name: 127.0.0.1} for each `<hostname>.<subdomain>[.<ns>[.svc[.cluster.local]]]` in
        `texts` that cluster DNS would resolve to a pod on this node (see the module's
        docstring); PodWaiting while one would not resolve yet."""
        subdomain = pod["spec"].get("subdomain")
        if not subdomain:
            return {}
        namespace = pod["metadata"]["namespace"]
        pattern = pod_name_pattern(subdomain, namespace)
        wanted = {m.group(0): m.group(1) for text in texts for m in pattern.finditer(text)}
        if not wanted:
            return {}
        try:
            svc = json.loads(
                self.core.read_namespaced_service(subdomain, namespace, _preload_content=False).data
            )
        except ApiException as e:
            if e.status != 404:
                raise
            raise PodWaiting(
                f"no Service {namespace}/{subdomain} yet: its pods have no names"
            ) from None
        selector = svc["spec"].get("selector") or {}
        if svc["spec"].get("clusterIP") != "None" or not selector:
            raise PodWaiting(
                f"Service {namespace}/{subdomain} is not headless with a selector: its pods "
                "have no names of their own"
            )
        resp = self.core.list_namespaced_pod(
            namespace,
            label_selector=",".join(f"{k}={v}" for k, v in selector.items()),
            _preload_content=False,
        )
        by_host = {
            p["spec"].get("hostname"): p
            for p in json.loads(resp.data)["items"]
            if p["spec"].get("subdomain") == subdomain
            and not p["metadata"].get("deletionTimestamp")
        }
        hosts = {}
        for name, hostname in wanted.items():
            target = by_host.get(hostname)
            if target is None:
                raise PodWaiting(f"{name}: no pod with hostname {hostname} behind the Service yet")
            node = target["spec"].get("nodeName")
            if node != self.node:
                where = f"on node {node}" if node else "not scheduled yet"
                raise PodWaiting(
                    f"{name}: pod {target['metadata']['name']} is {where}; the process kubelet "
                    f"resolves only pods of its own node ({self.node})"
                )
            hosts[name] = "127.0.0.1"
        return hosts

    def container_env(self, pod: dict, container: dict) -> dict[str, str]:
        env: dict[str, str] = {}
        namespace = pod["metadata"]["namespace"]
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if ref := source.get("configMapRef"):
                data = self.config_map(namespace, ref["name"], ref.get("optional", False))
            else:
                ref = source["secretRef"]
                data = self.secret(namespace, ref["name"], ref.get("optional", False))
            env |= {prefix + k: v for k, v in data.items()}
        for var in container.get("env") or []:
            value = self.env_value(pod, var, env)
            if value is not None:
                env[var["name"]] = value
        return env

    def env_value(self, pod: dict, var: dict, env: dict[str, str]) -> str | None:
        if "valueFrom" not in var:
            return expand(var.get("value", ""), env)
        source = var["valueFrom"]
        namespace = pod["metadata"]["namespace"]
        if ref := source.get("secretKeyRef"):
            data = self.secret(namespace, ref["name"], ref.get("optional", False))
        elif ref := source.get("configMapKeyRef"):
            data = self.config_map(namespace, ref["name"], ref.get("optional", False))
        elif ref := source.get("fieldRef"):
            return field_value(pod, ref["fieldPath"])
        else:
            return ""  # resourceFieldRef: no limits are enforced here
        if ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise PodConfigError(f"key {ref['key']} not found in {ref['name']}")
        return data[ref["key"]]

    def config_map(self, namespace: str, name: str, optional: bool) -> dict[str, str]:
        return self._read_data("config_map", namespace, name, optional)

    def secret(self, namespace: str, name: str, optional: bool) -> dict[str, str]:
        data = self._read_data("secret", namespace, name, optional)
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    def _read_data(self, kind: str, namespace: str, name: str, optional: bool) -> dict[str, str]:
        read = getattr(self.core, f"read_namespaced_{kind}")
        try:
            obj = json.loads(read(name, namespace, _preload_content=False).data)
        except ApiException as e:
            if e.status == 404 and optional:
                return {}
            if e.status == 404:
                raise PodConfigError(f"{kind} {namespace}/{name} not found") from None
            raise
        return obj.get("data") or {}

    def volume_mounts(self, pod: dict, container: dict, root: Path) -> dict[str, Path]:
        """Write each mounted volume into a folder; map mountPath -> folder (or file)."""
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts") or []:
            folder = root / mount["name"]
            if not folder.exists():
                self.fill_volume(pod, volumes.get(mount["name"], {}), folder)
            target = folder / mount["subPath"] if mount.get("subPath") else folder
            mounts[mount["mountPath"].rstrip("/") or "/"] = target
        return mounts

    def fill_volume(self, pod: dict, volume: dict, folder: Path) -> None:
        folder.mkdir(parents=True)
        namespace = pod["metadata"]["namespace"]
        if src := volume.get("configMap"):
            data = self.config_map(namespace, src["name"], src.get("optional", False))
            _write_items(folder, data, src.get("items"))
        elif src := volume.get("secret"):
            data = self.secret(namespace, src["secretName"], src.get("optional", False))
            _write_items(folder, data, src.get("items"))
        elif src := volume.get("projected"):
            for source in src.get("sources") or []:
                self.fill_projection(pod, source, folder)
        # emptyDir (and anything unsupported) stays an empty folder

    def fill_projection(self, pod: dict, source: dict, folder: Path) -> None:
        meta = pod["metadata"]
        if src := source.get("configMap"):
            data = self.config_map(meta["namespace"], src["name"], src.get("optional", False))
            _write_items(folder, data, src.get("items"))
        elif src := source.get("secret"):
            data = self.secret(meta["namespace"], src["name"], src.get("optional", False))
            _write_items(folder, data, src.get("items"))
        elif src := source.get("downwardAPI"):
            data = {
                item["path"]: field_value(pod, item["fieldRef"]["fieldPath"])
                for item in src.get("items") or []
                if "fieldRef" in item
            }
            _write_items(folder, data, None)
        elif src := source.get("serviceAccountToken"):
            spec = {"expirationSeconds": src.get("expirationSeconds", 3600)}
            if src.get("audience"):
                spec["audiences"] = [src["audience"]]
            token = self.core.create_namespaced_service_account_token(
                pod["spec"].get("serviceAccountName", "default"),
                meta["namespace"],
                {"spec": spec},
            )
            _write_items(folder, {src["path"]: token.status.token}, None)


# ----------------------------------------------------------------------------- helpers


def _write_items(folder: Path, data: dict[str, str], items: list[dict] | None) -> None:
    paths = {i["key"]: i["path"] for i in items} if items else {k: k for k in data}
    for key, path in paths.items():
        if key in data:
            target = folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(data[key])


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known variables are replaced, $$ escapes a $, unknown
    references stay as they are."""

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", one, text)


def rewrite_paths(text: str, mounts: dict[str, Path]) -> str:
    """Point every mountPath (followed by / or the end of a path) at its local folder.

    One pass over the text, longest mountPath first: a folder just put in (itself under
    /tmp, say) is never rewritten again by a shorter mountPath such as /tmp."""
    if not mounts:
        return text
    paths = sorted(mounts, key=len, reverse=True)
    alternatives = "|".join(re.escape(p) for p in paths)
    pattern = r"(?<![\w./-])(" + alternatives + r")(?=/|$|[\s:,;\"'])"
    return re.sub(pattern, lambda m: str(mounts[m.group(1)]), text)


def pod_name_pattern(subdomain: str, namespace: str) -> re.Pattern[str]:
    """`<hostname>.<subdomain>`, optionally followed by `.<namespace>`, `.svc` and
    `.cluster.local`, as a whole name (not inside a longer one); group 1 is the hostname."""
    label = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
    sub, ns = re.escape(subdomain), re.escape(namespace)
    return re.compile(
        rf"(?<![\w.-])({label})\.{sub}(?:\.{ns}(?:\.svc(?:\.cluster\.local)?)?)?(?![\w-]|\.[\w-])"
    )


def rewrite_names(text: str, hosts: dict[str, str]) -> str:
    """Replace each whole name of `hosts` (longest first) with its address."""
    if not hosts:
        return text
    alternatives = "|".join(re.escape(n) for n in sorted(hosts, key=len, reverse=True))
    pattern = rf"(?<![\w.-])({alternatives})(?![\w-]|\.[\w-])"
    return re.sub(pattern, lambda m: hosts[m.group(1)], text)


def field_value(pod: dict, path: str) -> str:
    meta, spec = pod["metadata"], pod["spec"]
    if m := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
    }
    return simple.get(path, "")


def _remove_volumes(pod_folder: Path) -> None:
    """A deleted pod's volumes go with it, as a kubelet's emptyDirs do (a SmolLM2 trainer's
    scratch holds GBs); its log files stay for the test's report."""
    shutil.rmtree(pod_folder / "volumes", ignore_errors=True)


def _waiting_status(pod: dict, reason: str, message: str) -> dict:
    c = pod["spec"]["containers"][0]
    waiting = {"reason": reason, "message": message}
    return {
        "containerStatuses": [
            {
                "name": c["name"],
                "image": c.get("image") or "process",
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {"waiting": waiting},
            }
        ]
    }


def _terminated_status(running: RunningPod, terminated: dict) -> dict:
    c, stamp = running.container, now()
    ok = terminated["exitCode"] == 0
    return {
        "phase": "Succeeded" if ok else "Failed",
        "conditions": [
            {"type": "ContainersReady", "status": "False", "lastTransitionTime": stamp},
            {"type": "Ready", "status": "False", "lastTransitionTime": stamp},
        ],
        "containerStatuses": [
            {
                "name": c["name"],
                "image": c.get("image") or "process",
                "imageID": "",
                "containerID": f"process://{running.proc.pid if running.proc else 0}",
                "ready": False,
                "started": False,
                "restartCount": running.restarts,
                "state": {"terminated": terminated},
            }
        ],
    }


def _memory() -> str:
    with open("/proc/meminfo") as f:
        kib = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    return f"{kib}Ki"


def _node_info() -> dict[str, str]:
    return {
        "architecture": "amd64",
        "operatingSystem": "linux",
        "kubeletVersion": "process-kubelet",
        "containerRuntimeVersion": "process://",
        "kernelVersion": os.uname().release,
        "osImage": "",
        "machineID": "",
        "systemUUID": "",
        "bootID": "",
        "kubeProxyVersion": "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--taint", default="fst.test/process-node")
    parser.add_argument("--workdir", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    api = k8s_config.new_client_from_config(config_file=args.kubeconfig)
    kubelet = ProcessKubelet(api, args.node, args.taint, args.workdir)

    def stop(_sig, _frame) -> None:
        kubelet.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    kubelet.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
