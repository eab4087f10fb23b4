"""Multi-GPU and multi-node trainer Jobs (spec.trainer.nodes, gpusPerNode) on the test
control plane (tests/k8s): what the apiserver refuses, what the operator creates for a run on
two kwok GPU nodes, and two CPU pods of one run that rendezvous and train on the process
kubelet's node (its stand-in for the pods' DNS names: tests/k8s/process_kubelet.py)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from fst_operator.builders import run_key
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from fst.store.db import RunDB
from tests.k8s.cluster import PROCESS_NODE, PROCESS_NODE_SELECTOR, PROCESS_NODE_TOLERATION
from tests.k8s.operator_proc import (
    TINY_TASK,
    OperatorProcess,
    Resources,
    condition,
    dump,
    phase,
    tiny_config,
    tiny_model_config,
    varied_trainer_env,
)
from tests.k8s.process_kubelet import pod_log
from tests.k8s.waiting import wait_until
from tests.tiny_model import tiny_model_dir  # noqa: F401  (fixture)

pytest_plugins = ["tests.k8s.fixtures"]
pytestmark = pytest.mark.integration


@pytest.fixture
def start_operator(k8s_cluster, k8s_namespace, crds, tmp_path: Path):
    started: list[OperatorProcess] = []
    log = tmp_path / "operator.log"

    def start(**env: str) -> OperatorProcess:
        op = OperatorProcess(k8s_cluster.kubeconfig, [k8s_namespace], log, env)
        op.start()
        started.append(op)
        return op

    yield start
    for op in started:
        op.stop()
    if log.exists():
        print(f"operator log ({log}):\n{log.read_text()[-6000:]}")  # shown if the test fails


def pods_of(res: Resources, job: str) -> list[Any]:
    """The Job's pods, by completion index."""
    pods = res.core.list_namespaced_pod(res.ns, label_selector=f"job-name={job}").items
    return sorted(pods, key=lambda p: p.spec.hostname or "")


# ----------------------------------------------------------------------------- the schema


def test_the_apiserver_refuses_bad_gpu_and_node_settings_naming_the_field(res) -> None:
    def create(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
        plural = {"FastSlowRun": "fastslowruns", "TaskStream": "taskstreams"}[kind]
        return res.create(plural, kind, f"r-{uuid.uuid4().hex[:8]}", spec)

    def refused(trainer: dict[str, Any], device: str | None = None) -> str:
        cfg = tiny_config(**({"model": {"device": device}} if device else {}))
        with pytest.raises(ApiException) as e:
            create("FastSlowRun", {"config": cfg, "trainer": trainer})
        assert e.value.status == 422, e.value.body
        return json.loads(e.value.body)["message"]

    msg = refused({"nodes": 0})
    assert "spec.trainer.nodes" in msg and "should be greater than or equal to 1" in msg, msg
    msg = refused({"gpusPerNode": 17})
    assert "spec.trainer.gpusPerNode" in msg and "less than or equal to 16" in msg, msg
    msg = refused({"gpus": 1, "gpusPerNode": 1})
    assert "spec.trainer.gpus" in msg and "deprecated synonym of spec.trainer.gpusPerNode" in msg
    msg = refused({"gpus": 2, "nodes": 2})
    assert "spec.trainer.gpus: only for a one-node run" in msg, msg
    msg = refused({"gpusPerNode": 1}, device="cpu")
    assert "spec.config.model.device: cpu cannot use the GPUs requested" in msg, msg
    msg = refused({}, device="cpu")  # one GPU per pod by default
    assert "spec.config.model.device: cpu cannot use the GPUs requested" in msg, msg
    msg = refused({"gpusPerNode": 0}, device="cuda")
    assert "spec.config.model.device: cuda needs a GPU" in msg, msg
    msg = refused({"gpus": 0}, device="cuda:1")
    assert "spec.config.model.device: cuda needs a GPU" in msg, msg

    # What is fine: the default run (one GPU, device auto), the deprecated field alone, a
    # null beside the other field, CPU pods on cpu, many GPU nodes on cuda.
    for trainer, device in [
        ({}, None),
        ({"gpus": 4}, None),
        ({"gpus": None, "gpusPerNode": 2}, None),
        ({"gpusPerNode": 0, "nodes": 3}, "cpu"),
        ({"gpusPerNode": 8, "nodes": 4}, "cuda"),
    ]:
        cfg = tiny_config(**({"model": {"device": device}} if device else {}))
        stored = create("FastSlowRun", {"config": cfg, "trainer": trainer, "suspend": True})
        assert stored["spec"]["trainer"]["nodes"] == trainer.get("nodes", 1)

    # A TaskStream: its base model's device against its trainer (copied into every stage run).
    stages = [{"name": "a", "task": TINY_TASK, "steps": 2}]
    with pytest.raises(ApiException) as e:
        create("TaskStream", {"model": {"device": "cpu"}, "stages": stages})
    msg = json.loads(e.value.body)["message"]
    assert "spec.model.device: cpu cannot use the GPUs requested" in msg, msg
    with pytest.raises(ApiException) as e:
        create("TaskStream", {"trainer": {"gpus": 1, "gpusPerNode": 1}, "stages": stages})
    assert "deprecated synonym" in json.loads(e.value.body)["message"]
    spec = {"model": {"device": "cpu"}, "trainer": {"gpusPerNode": 0}, "stages": stages}
    create("TaskStream", {**spec, "suspend": True})


# ----------------------------------------------------------------------------- kwok GPU nodes


def test_two_gpu_nodes_get_an_indexed_job_and_a_headless_service(res, start_operator) -> None:
    """On kwok's fake GPU nodes (8 GPUs each): one pod per node, each with hostname
    <job>-<index> under the Service's subdomain; kwok completes both pods, the Job and run
    succeed."""
    op = start_operator(FST_DEFAULT_CHECKPOINT_URI="s3://bucket/runs")
    trainer = {"nodes": 2, "gpusPerNode": 8}
    res.create("fastslowruns", "FastSlowRun", "wide", {"config": tiny_config(), "trainer": trainer})

    def succeeded() -> dict[str, Any] | None:
        run = res.run("wide")
        return run if phase(run) == "Succeeded" else None

    run = wait_until(succeeded, 90, "run wide Succeeded", op.tail)
    job = res.batch.read_namespaced_job("wide-a1", res.ns)
    assert job.spec.completion_mode == "Indexed"
    assert job.spec.completions == job.spec.parallelism == 2 and job.spec.backoff_limit == 0
    template = job.spec.template.spec
    assert template.subdomain == "wide-a1"
    c = template.containers[0]
    assert c.command == ["torchrun"]
    assert c.args[:10] == [
        "--nnodes",
        "2",
        "--nproc-per-node",
        "8",
        "--node-rank",
        "$(JOB_COMPLETION_INDEX)",
        "--master-addr",
        "wide-a1-0.wide-a1",
        "--master-port",
        "29500",
    ]
    assert c.args[10:13] == ["-m", "fst", "train"] and "--resume" in c.args
    assert c.resources.limits == {"nvidia.com/gpu": "8"}
    shm = next(v for v in template.volumes if v.name == "shm")
    assert shm.empty_dir.medium == "Memory"
    assert job.status.succeeded == 2

    svc = res.core.read_namespaced_service("wide-a1", res.ns)
    assert svc.spec.cluster_ip == "None" and svc.spec.publish_not_ready_addresses
    assert svc.spec.selector == {"fastslow.io/run": "wide", "fastslow.io/attempt": "1"}
    assert [p.port for p in svc.spec.ports] == [29500]
    net = k8s.NetworkingV1Api(res.api).read_namespaced_network_policy("wide-a1", res.ns)
    assert net.spec.policy_types == ["Ingress"]
    for obj in (job, svc, net):
        (owner,) = obj.metadata.owner_references
        assert owner.kind == "FastSlowRun" and owner.name == "wide" and owner.controller

    pods = pods_of(res, "wide-a1")
    assert [p.spec.hostname for p in pods] == ["wide-a1-0", "wide-a1-1"]
    assert all(p.spec.subdomain == "wide-a1" for p in pods)
    assert {p.spec.node_name for p in pods} == {"gpu-node-0", "gpu-node-1"}  # 8 GPUs each
    for i, pod in enumerate(pods):
        # What the kubelet expands $(JOB_COMPLETION_INDEX) in the args from: an env var the Job
        # controller adds, from the pod's index label (annotation before Kubernetes 1.28).
        index = "batch.kubernetes.io/job-completion-index"
        assert pod.metadata.annotations[index] == str(i)
        env = {e.name: e for e in pod.spec.containers[0].env}
        ref = env["JOB_COMPLETION_INDEX"].value_from.field_ref.field_path
        assert ref in (f"metadata.labels['{index}']", f"metadata.annotations['{index}']"), ref
        if ref.startswith("metadata.labels"):
            assert pod.metadata.labels[index] == str(i)
    assert condition(run, "Succeeded")["status"] == "True", dump(run)


# ----------------------------------------------------------------------------- real trainers


@pytest.fixture
def trainer_secrets(
    res: Resources, s3_env: dict[str, str], pg_url: str, tmp_path: Path
) -> dict[str, str]:
    s3 = {k: v for k, v in s3_env.items() if k.startswith("AWS_")}
    # The tiny model's varied reward in the pods' env (tests.k8s.operator_proc.varied_trainer_env).
    res.secret("s3", {**s3, **varied_trainer_env(tmp_path / "trainer-hook")})
    res.secret("db", {"url": pg_url})
    return {"FST_DATABASE_URL": pg_url, **s3}


@pytest.mark.slow
def test_two_cpu_pods_rendezvous_and_train_on_the_process_kubelet(
    k8s_cluster,
    res,
    start_operator,
    trainer_secrets,
    s3_uri,
    pg_url,
    tiny_model_dir,  # noqa: F811
) -> None:
    """Two pods of one Indexed Job on the process node: torchrun on each, node ranks 0 and
    1, static rendezvous at <job>-0.<job> (127.0.0.1 here), gloo; two steps, checkpoints in
    the test MinIO, progress in the run's status. On the tiny random Llama with its varied
    reward (tests/tiny_model.py): what is tested is that two pods find each other and train
    as one run, not what SmolLM2 learns (tests/integration/test_distributed.py checks that
    two ranks take the one-process step, SmolLM2 included)."""
    op = start_operator(**trainer_secrets)
    trainer = {
        "nodes": 2,
        "gpusPerNode": 0,
        "image": "fastslow/trainer:cpu",
        "nodeSelector": PROCESS_NODE_SELECTOR,
        "tolerations": [PROCESS_NODE_TOLERATION],
        "s3Secret": "s3",
        "databaseSecret": {"name": "db", "key": "url"},
        "checkpointUri": s3_uri,
    }
    cfg = tiny_model_config(tiny_model_dir, steps=2, checkpoint={"every": 2, "keepLast": 1})
    spec = {"config": cfg, "trainer": trainer, "backoffLimit": 0}  # one attempt: fail fast
    res.create("fastslowruns", "FastSlowRun", "pair", spec)
    workdir = k8s_cluster.root / "process-kubelet"

    def logs() -> str:
        """The operator's log and every pod's output (also of pods the Job controller deleted
        when the other one failed), from the process kubelet's folders."""
        out = [op.tail()]
        for folder in sorted((workdir / "pods").glob(f"{res.ns}_pair-a*")):
            for log in sorted(folder.glob("*.log")):
                out.append(f"--- pod {folder.name.split('_')[1]}:\n{log.read_text()[-5000:]}")
        return "\n".join(out)

    # Both pods run here, each its own torchrun with its node rank and the master's name
    # resolved (the process kubelet's stand-in for cluster DNS).
    def both_running() -> list[Any] | None:
        pods = pods_of(res, "pair-a1")
        started = [p for p in pods if p.status.phase in ("Running", "Succeeded", "Failed")]
        return pods if len(started) == 2 else None

    pods = wait_until(both_running, 120, "both pods of pair-a1 started", logs)
    assert {p.spec.node_name for p in pods} == {PROCESS_NODE}
    assert [p.spec.hostname for p in pods] == ["pair-a1-0", "pair-a1-1"]
    for index, pod in enumerate(pods):
        first = pod_log(workdir, res.ns, pod.metadata.name).read_text().splitlines()[0]
        argv = first.split(" ", 2)[2]  # "--- <time> [argv...]"
        assert "'--node-rank', '" + str(index) + "'" in argv, argv
        assert "'--master-addr', '127.0.0.1'" in argv, argv
        assert "'-m', 'fst', 'train'" in argv, argv

    # Trained together: two steps, one checkpoint in S3, the run's status shows them.
    def done() -> dict[str, Any] | None:
        run = res.run("pair")
        if phase(run) in ("Failed", "Invalid"):
            pytest.fail(f"run pair {phase(run)}: {dump(run.get('status'))}\n{logs()}")
        return run if phase(run) == "Succeeded" else None

    run = wait_until(done, 900, "run pair Succeeded", logs, poll=2)
    s = run["status"]
    assert s["step"] == 2 and s["steps"] == 2, dump(s)
    assert s["checkpointUri"].startswith(f"{s3_uri}/{run_key(res.ns, 'pair')}"), dump(s)
    job = res.batch.read_namespaced_job("pair-a1", res.ns)
    assert job.status.succeeded == 2
    # Both steps updated the weights (the varied reward reached the ranks): the gradients went
    # through the two pods' all-reduce, not only a rendezvous.
    with RunDB(pg_url) as db:
        metrics = db.metrics(run_key(res.ns, "pair"))
    assert sorted(metrics) == [1, 2] and all(m["updated"] == 1.0 for m in metrics.values()), metrics
