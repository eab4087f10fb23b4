"""The fastslow operator as a real process against the test control plane, and helpers for
the tests that drive it (CRDs installed from crds/, runs and streams created, waited on)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from fst_operator.policy import Policy
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from tests.k8s.waiting import wait_until
from tests.servers import free_port, log_tail

REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION = "fastslow.io", "v1alpha1"
# A task small enough for a trainer pod to run a step in seconds on CPU.
TINY_TASK = {
    "name": "arithmetic",
    "trainSize": 32,
    "valSize": 4,
    "testSize": 4,
    "params": {"steps": 1, "maxOperand": 20, "answerFormat": "last_number"},
}


def install_crds(api: k8s.ApiClient) -> None:
    """Create or replace the CRDs of crds/ and wait until they are Established."""
    ext = k8s.ApiextensionsV1Api(api)
    names = []
    for path in sorted((REPO / "crds").glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        name = body["metadata"]["name"]
        names.append(name)
        try:
            ext.create_custom_resource_definition(body)
        except ApiException as e:
            if e.status != 409:
                raise
            old = ext.read_custom_resource_definition(name)
            body["metadata"]["resourceVersion"] = old.metadata.resource_version
            ext.replace_custom_resource_definition(name, body)
    deadline = time.monotonic() + 60
    for name in names:
        while True:
            crd = ext.read_custom_resource_definition(name)
            conds = {c.type: c.status for c in (crd.status.conditions or [])}
            if conds.get("Established") == "True":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} not Established: {conds}")
            time.sleep(0.2)


def tiny_config(**over: Any) -> dict[str, Any]:
    """A run that takes seconds per step on CPU."""
    cfg = {
        "mode": "rl",
        "steps": 4,
        "seed": 3,
        "task": TINY_TASK,
        "rollout": {"temperature": 0.8, "maxNewTokens": 8, "batchSize": 16},
        "slow": {"problemsPerStep": 2, "groupSize": 2, "microBatchSize": 4},
        "fast": {"everySteps": 2, "topK": 2, "metricCalls": 4, "minibatchSize": 2, "paretoSize": 2},
        "metrics": {"klPrompts": 1, "klEvery": 1},
        "checkpoint": {"every": 2, "keepLast": 1},
    }
    cfg.update(over)
    return cfg


def tiny_model_config(model_dir: Path, **over: Any) -> dict[str, Any]:
    """tiny_config on the tiny random Llama of tests/tiny_model.py (`model_dir`, a local folder:
    the process kubelet runs the trainer on this machine): a step in a fraction of a second
    where SmolLM2 takes ~10 s, and no GGUF to dequantize at each pod's start."""
    cfg = tiny_config(**over)
    cfg["model"] = {**cfg.get("model", {}), "name": str(model_dir)}
    cfg["rollout"] = {**cfg["rollout"], "maxNewTokens": 6}
    # Groups of 4: with 2 a group's two rewards are often equal, no advantage, no update. And
    # a learning rate at which the random model moves visibly.
    cfg["slow"] = {"lr": 1e-2, **cfg["slow"], "groupSize": 4, "microBatchSize": 8}
    return cfg


# Imported by every Python process started with varied_trainer_env's PYTHONPATH (site.py
# imports `sitecustomize` at start-up): the trainer pods' `fst train`, and torchrun with its
# ranks.
TRAINER_HOOK = """\
\"\"\"Test hook of tests.k8s.operator_proc.varied_trainer_env (see there).\"\"\"
import os

from fst.tasks.arithmetic import ArithmeticTask

from tests.tiny_model import varied_score

ArithmeticTask.score = varied_score

HANG = os.environ.get("FST_TEST_HANG_AFTER_EVENT")
if HANG:
    import time

    from fst.store.db import RunDB

    _run, _, _step = HANG.rpartition(":")
    _log_event = RunDB.log_event

    def _log_then_hang(self, run, kind, message):
        _log_event(self, run, kind, message)
        if (run, kind) == (_run, "checkpoint") and message.rstrip("/").endswith(
            "step-%08d" % int(_step)
        ):
            while True:
                time.sleep(60)

    RunDB.log_event = _log_then_hang
"""


def varied_trainer_env(folder: Path) -> dict[str, str]:
    """Env entries for trainer pods (put in the Secret their spec names in envFrom) under which
    the operator's own command, the venv's `fst train` (or torchrun's `-m fst train`), runs
    as `python -m tests.varied_fst` does: the arithmetic task scored by
    tests.tiny_model.varied_score, so the tiny random model has reward variance, trains at every
    step and GEPA's scores vary. A `sitecustomize` in `folder` (first on PYTHONPATH) does it.

    With FST_TEST_HANG_AFTER_EVENT=RUN:STEP added, the trainer of run RUN (its run key) sleeps
    until killed right after logging the "checkpoint" event of step STEP, which the operator
    mirrors into status.checkpointUri (tests.varied_fst's FST_TEST_HANG_AFTER hangs before
    that event): a kill lands at a known point although a tiny step takes a fraction of a
    second. Torch on one thread: the tiny model's matrices are too small for a second one to
    help (tests.tiny_model.one_torch_thread)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(TRAINER_HOOK)
    return {"PYTHONPATH": f"{folder}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}


@dataclass
class OperatorProcess:
    """`python -m fst_operator --namespace NS` with the admin kubeconfig and `env`."""

    kubeconfig: Path
    namespaces: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    metrics_port: int = 0
    liveness_port: int = 0
    module: str = "fst_operator"  # tests.k8s.crashing_operator for the restart test

    def start(self) -> OperatorProcess:
        self.metrics_port, self.liveness_port = free_port(), free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "FST_METRICS_PORT": str(self.metrics_port),
            "FST_LIVENESS_PORT": str(self.liveness_port),
            "FST_PROGRESS_INTERVAL": "2",
            "FST_STREAM_POLL_INTERVAL": "3",
            # The tests' images, Secrets and nodes are not the chart's defaults: the policy is
            # tested in tests/unit/test_policy.py and test_operator_tenancy.py.
            "FST_POLICY": Policy.unrestricted().to_env(),
            "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'operator'}",
            **self.env,
        }
        args = [sys.executable, "-m", self.module]
        for ns in self.namespaces:
            args += ["--namespace", ns]
        out = self.log.open("a")
        out.write(f"--- start {time.strftime('%H:%M:%S')}\n")
        out.flush()
        self.proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        out.close()
        self.wait_until(self.healthy, "operator /healthz", 60)
        return self

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"operator exited {self.proc.returncode}:\n{self.tail()}")
        try:
            url = f"http://127.0.0.1:{self.liveness_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()

    def kill(self) -> None:
        """SIGKILL: no cleanup, as when a node dies or the OOM killer strikes."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self) -> str:
        return log_tail(self.log, 4000)

    def wait_until(self, ready: Callable[[], Any], what: str, timeout: float) -> Any:
        return wait_until(ready, timeout, what, self.tail)


class Resources:
    """Create and read fastslow objects in one namespace."""

    def __init__(self, api: k8s.ApiClient, namespace: str) -> None:
        self.api, self.ns = api, namespace
        self.custom = k8s.CustomObjectsApi(api)
        self.core = k8s.CoreV1Api(api)
        self.batch = k8s.BatchV1Api(api)

    def create(self, plural: str, kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": kind,
            "metadata": {"name": name},
            "spec": spec,
        }
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, plural, body)

    def run(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.ns, "fastslowruns", name
        )

    def stream(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.ns, "taskstreams", name
        )

    def runs(self) -> list[dict[str, Any]]:
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, self.ns, "fastslowruns")[
            "items"
        ]

    def patch(self, plural: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.ns, plural, name, patch
        )

    def jobs(self) -> list[Any]:
        return self.batch.list_namespaced_job(self.ns).items

    def secret(self, name: str, data: dict[str, str]) -> None:
        body = {"metadata": {"name": name}, "stringData": data}
        self.core.create_namespaced_secret(self.ns, body)

    def events(self, name: str) -> list[str]:
        items = self.core.list_namespaced_event(
            self.ns, field_selector=f"involvedObject.name={name}"
        ).items
        return [f"{e.reason}: {e.message}" for e in items]


def phase(obj: dict[str, Any]) -> str | None:
    return (obj.get("status") or {}).get("phase")


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    conds = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == type_), None)


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)[:6000]
