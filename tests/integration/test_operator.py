"""The operator (operator/fst_operator) against the real control plane of tests/k8s.

Each test starts its own operator process watching only the test's namespace. Trainer pods
land either on kwok's fake GPU nodes (their Jobs "succeed" after ~1 s, or fail when the image
is fst.test/fail: for the operator's bookkeeping) or on the process kubelet's node, where
`fst train` really runs on CPU against the test MinIO and Postgres, on the tiny random Llama
of tests/tiny_model.py with its varied reward (tests.k8s.operator_proc.varied_trainer_env):
what these tests check is the operator's bookkeeping of a real trainer (status, attempts,
resume, stage hand-over), not what the model learns (SmolLM2 took ~4 min per test here).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from fst_operator.builders import run_key
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from fst.handover import checkpoint_population
from fst.store.db import RunDB
from tests.k8s.cluster import PROCESS_NODE, PROCESS_NODE_SELECTOR, PROCESS_NODE_TOLERATION
from tests.k8s.operator_proc import (
    GROUP,
    TINY_TASK,
    VERSION,
    OperatorProcess,
    Resources,
    condition,
    dump,
    phase,
    tiny_config,
    tiny_model_config,
    varied_trainer_env,
)
from tests.k8s.waiting import wait_until
from tests.tiny_model import tiny_model_dir  # noqa: F401  (fixture)

pytest_plugins = ["tests.k8s.fixtures"]
pytestmark = pytest.mark.integration

TASK = TINY_TASK


PROCESS_TRAINER = {
    "gpus": 0,
    "image": "fastslow/trainer:cpu",
    "nodeSelector": PROCESS_NODE_SELECTOR,
    "tolerations": [PROCESS_NODE_TOLERATION],
    "s3Secret": "s3",
    "databaseSecret": {"name": "db", "key": "url"},
}


@pytest.fixture
def start_operator(k8s_cluster, k8s_namespace, crds, tmp_path: Path, request):
    started: list[OperatorProcess] = []
    log = tmp_path / "operator.log"

    def start(module: str = "fst_operator", **env: str) -> OperatorProcess:
        op = OperatorProcess(k8s_cluster.kubeconfig, [k8s_namespace], log, env, module=module)
        op.start()
        started.append(op)
        return op

    yield start
    for op in started:
        op.stop()
    if log.exists():
        print(f"operator log ({log}):\n{log.read_text()[-6000:]}")  # shown if the test fails


def wait(what: str, fn, timeout: float, op: OperatorProcess | None = None, poll: float = 0.5):
    return wait_until(fn, timeout, what, op.tail if op else None, poll)


def wait_phase(res: Resources, name: str, want: str, timeout: float, op: OperatorProcess):
    def reached() -> dict[str, Any] | None:
        run = res.run(name)
        return run if phase(run) == want else None

    return wait(f"run {name} {want}", reached, timeout, op)


def get_table(cluster, path: str) -> dict[str, Any]:
    import urllib.request

    req = urllib.request.Request(
        cluster.server + path, headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}
    )
    with urllib.request.urlopen(req, context=cluster.ssl_context()) as r:
        return json.loads(r.read())


def job_names(res: Resources) -> list[str]:
    return sorted(j.metadata.name for j in res.jobs())


# ----------------------------------------------------------------------------- validation


def test_invalid_resources_are_rejected_with_messages(res: Resources) -> None:
    def rejected(plural: str, kind: str, name: str, spec: dict) -> str:
        with pytest.raises(ApiException) as e:
            res.create(plural, kind, name, spec)
        assert e.value.status == 422
        return json.loads(e.value.body)["message"]

    msg = rejected("fastslowruns", "FastSlowRun", "r", {"config": {"task": TASK, "steps": 0}})
    assert "spec.config.steps" in msg and "greater than 0" in msg
    msg = rejected("fastslowruns", "FastSlowRun", "r", {"config": {"steps": 3}})
    assert "spec.config.task" in msg and "Required" in msg
    msg = rejected(
        "fastslowruns",
        "FastSlowRun",
        "r",
        {"config": tiny_config(mode="fst", fast={"topK": 4}, slow={"groupSize": 2})},
    )
    assert "fast.topK (K) must not exceed slow.groupSize" in msg
    msg = rejected(
        "fastslowruns",
        "FastSlowRun",
        "r",
        {"config": tiny_config(), "trainer": {"checkpointUri": "/local/dir"}},
    )
    assert "spec.trainer.checkpointUri" in msg
    msg = rejected("fastslowruns", "FastSlowRun", "r" * 53, {"config": tiny_config()})
    assert "at most 52 characters" in msg
    msg = rejected(
        "fastslowruns",
        "FastSlowRun",
        "r",
        {"config": tiny_config(rollout={"temperature": "hot"})},
    )
    assert "spec.config.rollout.temperature" in msg and "number" in msg

    stages = [{"name": "a", "task": TASK, "steps": 2}, {"name": "a", "task": TASK, "steps": 2}]
    msg = rejected("taskstreams", "TaskStream", "s", {"stages": stages})
    assert "stage names must be unique" in msg
    msg = rejected("taskstreams", "TaskStream", "s", {"stages": []})
    assert "spec.stages" in msg

    # Immutable fields: a run's config, a stream's base model.
    res.create("fastslowruns", "FastSlowRun", "ok", {"config": tiny_config(), "suspend": True})
    with pytest.raises(ApiException) as e:
        res.patch("fastslowruns", "ok", {"spec": {"config": {"steps": 9}}})
    assert "spec.config is immutable" in json.loads(e.value.body)["message"]
    res.patch("fastslowruns", "ok", {"spec": {"suspend": False}})  # mutable
    res.create("taskstreams", "TaskStream", "s", {"stages": stages[:1], "suspend": True})
    with pytest.raises(ApiException) as e:
        res.patch("taskstreams", "s", {"spec": {"model": {"name": "other"}}})
    assert "spec.model is immutable" in json.loads(e.value.body)["message"]


def test_spec_the_schema_cannot_check_is_reported_in_status(res: Resources, start_operator) -> None:
    """Task params are free-form in the CRD; the operator validates them with fst's own
    models and says which field is wrong."""
    op = start_operator(FST_DEFAULT_CHECKPOINT_URI="s3://bucket/runs")
    bad = tiny_config(task={**TASK, "params": {"degre": 3}})
    res.create("fastslowruns", "FastSlowRun", "bad", {"config": bad})
    run = wait_phase(res, "bad", "Invalid", 30, op)
    cond = condition(run, "Failed")
    assert cond["reason"] == "InvalidSpec" and "degre" in cond["message"], dump(run)
    assert job_names(res) == []
    wait("event", lambda: any("InvalidSpec" in e for e in res.events("bad")), 10, op)


# ----------------------------------------------------------------------------- runs -> Jobs


def test_run_becomes_a_restricted_job_with_the_spec(k8s_cluster, res, start_operator) -> None:
    core = k8s.CoreV1Api(k8s_cluster.api())
    # The trainer pod must be admitted where the restricted Pod Security level is enforced.
    core.patch_namespace(
        res.ns, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
    )
    op = start_operator(FST_DEFAULT_CHECKPOINT_URI="s3://bucket/runs")
    trainer = {
        "gpus": 2,
        "cpu": "8",
        "memory": "32Gi",
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "s3Secret": "minio-creds",
        "databaseSecret": {"name": "pg", "key": "url"},
        "queueName": "team-a",
    }
    res.create("fastslowruns", "FastSlowRun", "acme", {"config": tiny_config(), "trainer": trainer})
    # Queued: the Job is created suspended and stays so through the operator's reconciles
    # (every 2 s here) until the queue admits it; the operator never unsuspends it itself.
    run = wait_phase(res, "acme", "Suspended", 30, op)
    assert condition(run, "Suspended")["reason"] == "Queued"
    batch = k8s.BatchV1Api(k8s_cluster.api())
    time.sleep(6)
    assert batch.read_namespaced_job("acme-a1", res.ns).spec.suspend is True
    assert phase(res.run("acme")) == "Suspended"
    # Admission, as Kueue does it: the queue's controller unsuspends the Job.
    batch.patch_namespaced_job("acme-a1", res.ns, {"spec": {"suspend": False}})
    run = wait_phase(res, "acme", "Succeeded", 60, op)

    job = batch.read_namespaced_job("acme-a1", res.ns)
    assert job.metadata.owner_references[0].kind == "FastSlowRun"
    assert job.metadata.owner_references[0].controller
    assert job.metadata.labels["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job.spec.backoff_limit == 0
    pod = job.spec.template.spec
    c = pod.containers[0]
    # 2 GPUs on one node: one process per GPU under torchrun.
    assert c.command == ["torchrun"] and c.args[:3] == ["--standalone", "--nproc-per-node", "2"]
    assert c.args[3:6] == ["-m", "fst", "train"] and "--resume" in c.args
    assert c.resources.limits == {"nvidia.com/gpu": "2", "cpu": "8", "memory": "32Gi"}
    assert pod.node_selector == {"nvidia.com/gpu.present": "true"}
    assert pod.tolerations[0].key == "nvidia.com/gpu"
    assert pod.automount_service_account_token is False
    assert pod.security_context.run_as_non_root
    assert pod.security_context.seccomp_profile.type == "RuntimeDefault"
    assert c.security_context.read_only_root_filesystem
    assert c.security_context.allow_privilege_escalation is False
    assert c.security_context.capabilities.drop == ["ALL"]
    env = {e.name: e for e in c.env}
    assert env["FST_DATABASE_URL"].value_from.secret_key_ref.name == "pg"
    assert c.env_from[0].secret_ref.name == "minio-creds"
    assert all(e.value_from or "secret" not in (e.value or "").lower() for e in c.env)
    # The config the trainer reads: the operator-owned fields filled in.
    cm = core.read_namespaced_config_map("acme-config", res.ns)
    import yaml

    cfg = yaml.safe_load(cm.data["config.yaml"])
    key = run_key(res.ns, "acme")
    assert cfg["run"] == key and cfg["checkpoint"]["uri"] == f"s3://bucket/runs/{key}"
    assert "database" not in cfg
    # A pod was admitted under "restricted" and ran (kwok) to completion.
    pods = core.list_namespaced_pod(res.ns, label_selector="fastslow.io/run=acme").items
    assert pods and pods[0].status.phase == "Succeeded"
    assert condition(run, "Succeeded")["status"] == "True"
    assert condition(run, "Created")["reason"] == "JobCreated"
    assert run["status"]["observedGeneration"] == run["metadata"]["generation"]
    # What `kubectl get fsr` prints: the CRD's printer columns, as a server-side Table.
    table = get_table(k8s_cluster, f"/apis/{GROUP}/{VERSION}/namespaces/{res.ns}/fastslowruns")
    columns = [c["name"] for c in table["columnDefinitions"]]
    default = [c["name"] for c in table["columnDefinitions"] if not c.get("priority")]
    assert default == [
        "Name",
        "Stage",
        "Phase",
        "Step",
        "Reward",
        "KL",
        "Ready",
        "Succeeded",
        "Age",
    ]
    assert "Attempt" in columns  # kubectl get -o wide
    row = dict(zip(columns, table["rows"][0]["cells"], strict=False))
    assert row["Name"] == "acme" and row["Phase"] == "Succeeded" and row["Succeeded"] == "True"
    # Operator health and metrics.
    metrics = op.metrics()
    assert re.search(r'fastslow_reconciles_total\{kind="fastslowrun"\} [1-9]', metrics)
    assert 'fastslow_runs{phase="Succeeded"} 1.0' in metrics


def test_suspend_creates_a_suspended_job_and_resumes_it(res, start_operator) -> None:
    op = start_operator(FST_DEFAULT_CHECKPOINT_URI="s3://bucket/runs")
    res.create("fastslowruns", "FastSlowRun", "later", {"config": tiny_config(), "suspend": True})
    run = wait_phase(res, "later", "Suspended", 30, op)
    assert condition(run, "Suspended")["status"] == "True"
    assert res.jobs()[0].spec.suspend is True
    # A run that has not finished gets a deleted Job back (the run still asks for it), as it was.
    first = res.jobs()[0].metadata.uid
    res.batch.delete_namespaced_job("later-a1", res.ns, propagation_policy="Background")
    again = wait_until(
        lambda: [
            j for j in res.jobs() if j.metadata.uid != first and not j.metadata.deletion_timestamp
        ],
        30,
        "the deleted Job re-created",
        op.tail,
    )
    assert again[0].metadata.name == "later-a1" and again[0].spec.suspend is True
    res.patch("fastslowruns", "later", {"spec": {"suspend": False}})
    wait_phase(res, "later", "Succeeded", 60, op)
    assert job_names(res) == ["later-a1"]


def test_failed_attempts_are_retried_then_the_run_fails(res, start_operator) -> None:
    op = start_operator(FST_DEFAULT_CHECKPOINT_URI="s3://bucket/runs")
    spec = {"config": tiny_config(), "trainer": {"image": "fst.test/fail"}, "backoffLimit": 1}
    res.create("fastslowruns", "FastSlowRun", "flaky", spec)
    run = wait_phase(res, "flaky", "Failed", 90, op)
    assert job_names(res) == ["flaky-a1", "flaky-a2"]  # 1 + backoffLimit attempts, no more
    failed = condition(run, "Failed")
    assert failed["reason"] == "BackoffLimitExceeded" and "2 attempt(s) failed" in failed["message"]
    assert run["status"]["attempt"] == 2 and run["status"]["lastError"]
    assert any("Retrying" in e for e in res.events("flaky"))


# ----------------------------------------------------------------------------- real trainers


@pytest.fixture
def trainer_secrets(
    res: Resources, s3_env: dict[str, str], pg_url: str, tmp_path: Path
) -> dict[str, str]:
    s3 = {k: v for k, v in s3_env.items() if k.startswith("AWS_")}
    # The pods' env also gets the tiny model's varied reward (through the Secret, the only
    # env a spec adds to the operator's Job): the trainer is still the operator's command.
    res.secret("s3", {**s3, **varied_trainer_env(tmp_path / "trainer-hook")})
    res.secret("db", {"url": pg_url})
    # The operator reads progress from the same database and data sources from the same S3.
    return {"FST_DATABASE_URL": pg_url, **s3}


def trainer_pids(namespace: str) -> list[int]:
    """Processes of `fst train` started by the process kubelet for pods of `namespace`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "train" in cmd and "--resume" in cmd and f"/pods/{namespace}_" in cmd:
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_status_mirrors_a_real_trainer_and_a_killed_attempt_resumes(
    res,
    start_operator,
    trainer_secrets,
    s3_uri,
    pg_url,
    tiny_model_dir,  # noqa: F811
) -> None:
    op = start_operator(**trainer_secrets)
    # The first attempt sleeps right after its step-2 checkpoint is in the database (where the
    # operator reads it from): the kill below lands there, not after the end of the run (a
    # tiny-model step takes a fraction of a second; the resumed attempt never logs step 2).
    hang = {"FST_TEST_HANG_AFTER_EVENT": f"{run_key(res.ns, 'real')}:2"}
    res.core.patch_namespaced_secret("s3", res.ns, {"stringData": hang})
    trainer = {**PROCESS_TRAINER, "checkpointUri": s3_uri}
    cfg = tiny_model_config(tiny_model_dir)
    # Synchronous uploads: with the upload in the background, the hang above stops only the
    # training thread, so the step-4 upload could still commit before the kill (the second
    # attempt then resumes from step 4 and runs nothing), and the kill point would not be known.
    cfg["checkpoint"] = {**cfg["checkpoint"], "backgroundUpload": False}
    res.create("fastslowruns", "FastSlowRun", "real", {"config": cfg, "trainer": trainer})

    def after_checkpoint():
        run = res.run("real")
        s = run.get("status") or {}
        return (
            s.get("phase") == "Running" and s.get("checkpointUri") and s.get("step", 0) >= 2 and run
        )

    run = wait("step-2 checkpoint in status", after_checkpoint, 300, op, poll=0.2)
    s = run["status"]
    assert s["checkpointUri"].startswith(f"{s3_uri}/{run_key(res.ns, 'real')}"), dump(s)
    assert isinstance(s["reward"], int | float) and isinstance(s["kl"], int | float), dump(s)
    assert condition(run, "Running")["status"] == "True"
    pids = trainer_pids(res.ns)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)  # the node dies under the trainer

    run = wait_phase(res, "real", "Succeeded", 400, op)
    s = run["status"]
    assert s["attempt"] == 2 and job_names(res) == ["real-a1", "real-a2"], dump(s)
    assert s["step"] == 4 and s["checkpointUri"].rstrip("/").endswith("step-00000004"), dump(s)
    with RunDB(pg_url) as db:
        events = [(kind, msg) for _, kind, msg in db.events(run_key(res.ns, "real"))]
        metrics = db.metrics(run_key(res.ns, "real"))
    # Exactly step 2: the first attempt was killed while it waited there.
    assert ("resumed", "from step 2") in events, events
    assert sorted(metrics) == [1, 2, 3, 4]
    # Every step trained (the varied reward reached the pods), so the second attempt went on
    # from weights the first one changed.
    assert all(m["updated"] == 1.0 for m in metrics.values()), metrics


@pytest.mark.slow
def test_a_trainer_error_reaches_the_run_status(res, start_operator, trainer_secrets, s3_uri):
    op = start_operator(**trainer_secrets)
    trainer = {**PROCESS_TRAINER, "checkpointUri": s3_uri}
    cfg = tiny_config(model={"name": f"{s3_uri}/no-such-checkpoint"})
    spec = {"config": cfg, "trainer": trainer, "backoffLimit": 0}
    res.create("fastslowruns", "FastSlowRun", "broken", spec)
    run = wait_phase(res, "broken", "Failed", 240, op)
    msg = condition(run, "Failed")["message"]
    assert "no-such-checkpoint" in msg, dump(run["status"])
    assert job_names(res) == ["broken-a1"]


# ----------------------------------------------------------------------------- streams


def stream_spec(
    stages: list[dict[str, Any]], trainer: dict[str, Any], model: Path | None = None
) -> dict[str, Any]:
    """On `model` (the tiny model's folder), or SmolLM2 where no trainer really runs."""
    cfg = tiny_model_config(model, steps=2) if model else tiny_config(steps=2)
    return {
        "model": {"name": str(model) if model else "smollm2-135m-instruct"},
        "defaults": {k: v for k, v in cfg.items() if k not in ("steps", "task", "model")},
        "trainer": trainer,
        "stages": stages,
    }


def stage_runs(res: Resources) -> list[tuple[str, str]]:
    runs = sorted(
        res.runs(), key=lambda r: int(r["metadata"]["annotations"]["fastslow.io/sequence"])
    )
    return [(r["metadata"]["labels"]["fastslow.io/stage"], r["metadata"]["name"]) for r in runs]


def upload(uri: str, rows: list[dict[str, Any]]) -> None:
    """Write a jsonl object to the test MinIO (the customer's data pipeline)."""
    import io

    from fst.store.s3 import DEFAULT_ENDPOINT, make_client, parse_endpoint, parse_s3_uri

    bucket, key = parse_s3_uri(uri)
    data = ("\n".join(json.dumps(r) for r in rows) + "\n").encode()
    client = make_client(parse_endpoint(os.environ.get("AWS_ENDPOINT_URL") or DEFAULT_ENDPOINT))
    client.put_object(bucket, key, io.BytesIO(data), len(data))


def test_unreadable_data_is_reported_in_status_not_retried_blind(
    res, start_operator, s3_env, s3_uri
) -> None:
    """An s3:// source the operator cannot read (wrong keys here): DataReady=False with the
    reason and a Warning event, no stage run, and no new Event at each poll."""
    data_uri = f"{s3_uri}/data/qa.jsonl"
    upload(data_uri, [{"question": "What is 1+1?", "answer": "2"}] * 8)
    wrong = {**{k: v for k, v in s3_env.items() if k.startswith("AWS_")}}
    wrong["AWS_SECRET_ACCESS_KEY"] = "not-the-key"
    op = start_operator(FST_DEFAULT_CHECKPOINT_URI=f"{s3_uri}/ckpt", **wrong)
    qa_task = {"name": "jsonl", "valSize": 2, "testSize": 2, "params": {"path": data_uri}}
    stages = [{"name": "qa", "task": qa_task, "steps": 2}]
    res.create("taskstreams", "TaskStream", "blind", stream_spec(stages, {"gpus": 1}))

    def unreadable() -> dict[str, Any] | None:
        cond = condition(res.stream("blind"), "DataReady")
        return cond if cond and cond["status"] == "False" else None

    cond = wait("DataReady False", unreadable, 60, op)
    assert cond["reason"] == "DataUnreadable" and data_uri in cond["message"], cond
    assert "S3 SignatureDoesNotMatch" in cond["message"], cond
    # The creation handler and the first poll may both see the change (at most two Events);
    # after that, polls (every 3 s) add none while the problem stays the same.
    time.sleep(4)
    first = sum("DataUnreadable" in e for e in res.events("blind"))
    time.sleep(9)
    assert sum("DataUnreadable" in e for e in res.events("blind")) == first <= 2
    assert res.runs() == []
    assert "Traceback" not in op.tail()


def test_stream_advances_on_a_spec_change_and_on_new_data(
    res, start_operator, s3_env, s3_uri
) -> None:
    """On kwok GPU nodes (Jobs succeed at once): the stream's bookkeeping. A real hand-over of
    checkpoint and population is the next test."""
    data_uri = f"{s3_uri}/data/qa.jsonl"
    rows = [{"question": f"What is {i}+1?", "answer": str(i + 1)} for i in range(12)]
    upload(data_uri, rows)

    s3 = {k: v for k, v in s3_env.items() if k.startswith("AWS_")}
    op = start_operator(FST_DEFAULT_CHECKPOINT_URI=f"{s3_uri}/ckpt", **s3)
    qa_task = {
        "name": "jsonl",
        "valSize": 2,
        "testSize": 2,
        "params": {"path": data_uri, "format": "qa"},
    }
    stages = [
        {"name": "add", "task": TASK, "steps": 2},
        {"name": "qa", "task": qa_task, "steps": 2},
    ]
    res.create("taskstreams", "TaskStream", "acme", stream_spec(stages, {"gpus": 1}))
    stream = wait(
        "2 stages done",
        lambda: (
            phase(res.stream("acme")) == "Succeeded"
            and len(stage_runs(res)) == 2
            and res.stream("acme")
        ),
        90,
        op,
    )
    assert stage_runs(res) == [("add", "acme-add"), ("qa", "acme-qa")]
    assert [s["stage"] for s in stream["status"]["stages"]] == ["add", "qa"]
    assert all(s["phase"] == "Succeeded" for s in stream["status"]["stages"])
    owner = res.run("acme-qa")["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "TaskStream" and owner["name"] == "acme"

    # A stage added to the spec starts a new stage.
    stages.append({"name": "more", "task": {**TASK, "seed": 1}, "steps": 2})
    res.patch("taskstreams", "acme", {"spec": {"stages": stages}})
    wait(
        "stage 3",
        lambda: len(stage_runs(res)) == 3 and phase(res.stream("acme")) == "Succeeded",
        60,
        op,
    )
    assert stage_runs(res)[-1] == ("more", "acme-more")

    # A new version of a data source starts a new version of its stage.
    rows.append({"question": "What is 99+1?", "answer": "100"})
    upload(data_uri, rows)
    wait("qa v2", lambda: len(stage_runs(res)) == 4, 60, op)
    assert stage_runs(res)[-1] == ("qa", "acme-qa-v2")

    def qa_v2_done() -> dict | None:
        # The stream's status lists the new run once the operator has seen it: right after
        # the run is created, the phase may still be the previous Succeeded.
        stream = res.stream("acme")
        stages = (stream.get("status") or {}).get("stages") or []
        return stream if phase(stream) == "Succeeded" and len(stages) == 4 else None

    stream = wait("done", qa_v2_done, 60, op)
    assert [(s["stage"], s["version"]) for s in stream["status"]["stages"]] == [
        ("add", 1),
        ("qa", 1),
        ("more", 1),
        ("qa", 2),
    ]
    time.sleep(4)  # another data poll: nothing changed, nothing new
    assert len(stage_runs(res)) == 4

    # Renaming a stage that has run is refused (fst.plan.check_history): Invalid, named.
    renamed = [dict(stages[0], name="addition"), *stages[1:]]
    res.patch("taskstreams", "acme", {"spec": {"stages": renamed}})
    stream = wait(
        "rename refused",
        lambda: phase(res.stream("acme")) == "Invalid" and res.stream("acme"),
        30,
        op,
    )
    message = condition(stream, "Failed")["message"]
    assert "'add'" in message and "renamed" in message, message
    assert any("InvalidSpec" in e for e in res.events("acme"))
    assert len(stage_runs(res)) == 4  # nothing planned from the renamed manifest

    # Deleting the stream deletes its runs, their Jobs and ConfigMaps (owner references).
    res.custom.delete_namespaced_custom_object(GROUP, VERSION, res.ns, "taskstreams", "acme")
    wait("cascade", lambda: not res.runs() and not res.jobs(), 60, op)
    cms = res.core.list_namespaced_config_map(res.ns, label_selector="fastslow.io/run")
    wait(
        "config maps",
        lambda: (
            not cms.items
            or not res.core.list_namespaced_config_map(
                res.ns, label_selector="fastslow.io/run"
            ).items
        ),
        60,
        op,
    )


@pytest.mark.slow
def test_stream_hands_checkpoint_and_population_to_the_next_stage(
    res,
    start_operator,
    trainer_secrets,
    s3_uri,
    tiny_model_dir,  # noqa: F811
) -> None:
    op = start_operator(**trainer_secrets)
    trainer = {**PROCESS_TRAINER, "checkpointUri": s3_uri}
    stages = [
        {"name": "one", "task": TASK, "steps": 2, "mode": "fst"},
        {"name": "two", "task": {**TASK, "seed": 5}, "steps": 2, "mode": "fst"},
    ]
    res.create("taskstreams", "TaskStream", "real", stream_spec(stages, trainer, tiny_model_dir))
    stream = wait(
        "both stages",
        lambda: (
            phase(res.stream("real")) == "Succeeded"
            and len(stage_runs(res)) == 2
            and res.stream("real")
        ),
        600,
        op,
        poll=1,
    )
    one, two = res.run("real-one"), res.run("real-two")
    assert one["status"]["checkpointUri"].startswith(f"{s3_uri}/{run_key(res.ns, 'real-one')}")
    assert one["status"]["bestPrompt"], dump(one["status"])
    cfg = two["spec"]["config"]
    assert cfg["model"]["name"] == one["status"]["checkpointUri"]
    assert cfg["model"]["reference"] == str(tiny_model_dir)  # the stream's base model
    # The population handed over is the one saved in stage one's final checkpoint, whole,
    # read by the same function `fst stream` uses (fst/handover.py), not a cut of status.
    saved = checkpoint_population(one["status"]["checkpointUri"])
    assert saved and cfg["fast"]["initialPopulation"] == saved
    assert saved[0] == one["status"]["bestPrompt"]
    assert two["status"]["phase"] == "Succeeded" and two["status"]["step"] == 2
    assert [s["phase"] for s in stream["status"]["stages"]] == ["Succeeded", "Succeeded"]
    # Each stage was gated by its own Job before the next one started (a tiny random model
    # scores ~nothing, so "no worse" passes: tests/integration/test_operator_promotion.py has
    # a real rejection); the stream serves the newest promoted bundle.
    assert all(s.get("promoted") is not None for s in stream["status"]["stages"])
    gate_one = res.jobs()
    assert {"real-one-gate", "real-two-gate"} <= {j.metadata.name for j in gate_one}
    served = res.core.read_namespaced_config_map("real-serving", res.ns).data
    assert served["stage"] == stream["status"]["serving"].get("stage", "")
    assert PROCESS_NODE  # the pods ran on the process node (their Jobs completed for real)


# ----------------------------------------------------------------------------- restarts


def test_operator_killed_mid_reconcile_creates_no_duplicates(
    res, start_operator, tmp_path: Path
) -> None:
    # 1) Killed right after creating a Job, before recording it in status.
    op = start_operator(
        module="tests.k8s.crashing_operator",
        FST_DEFAULT_CHECKPOINT_URI="s3://bucket/runs",
        FST_TEST_CRASH_MARKER=str(tmp_path / "crashed"),
    )
    res.create("fastslowruns", "FastSlowRun", "once", {"config": tiny_config(), "suspend": True})
    wait("crash", lambda: op.proc.poll() is not None, 30, op)
    assert op.proc.returncode == 17
    assert job_names(res) == ["once-a1"] and "phase" not in (res.run("once").get("status") or {})
    op = start_operator(FST_DEFAULT_CHECKPOINT_URI="s3://bucket/runs")
    wait("status after restart", lambda: phase(res.run("once")) == "Suspended", 30, op)
    assert job_names(res) == ["once-a1"]

    # 2) SIGKILLed while reconciling many runs at once, then restarted.
    names = [f"many-{i}" for i in range(30)]
    for name in names:
        res.create("fastslowruns", "FastSlowRun", name, {"config": tiny_config()})
    wait("some Jobs", lambda: len(res.jobs()) >= 6, 30, op, poll=0.05)
    op.kill()
    op = start_operator(FST_DEFAULT_CHECKPOINT_URI="s3://bucket/runs")
    wait(
        "all runs Succeeded",
        lambda: all(phase(r) == "Succeeded" for r in res.runs() if r["metadata"]["name"] in names),
        120,
        op,
    )
    jobs = job_names(res)
    assert sorted(jobs) == sorted(["once-a1", *[f"{n}-a1" for n in names]]), jobs
    cms = k8s.CoreV1Api(res.api).list_namespaced_config_map(
        res.ns, label_selector="fastslow.io/run"
    )
    assert len(cms.items) == len(names) + 1


def test_a_pre_made_object_of_a_derived_name_is_not_taken_over(res, start_operator) -> None:
    """Someone made `<run>-config` before the run: the operator neither adopts nor uses it; the
    run waits, with a Warning event saying why."""
    core = k8s.CoreV1Api(res.api)
    core.create_namespaced_config_map(
        res.ns, {"metadata": {"name": "taken-config"}, "data": {"config.yaml": "run: evil"}}
    )
    op = start_operator(FST_DEFAULT_CHECKPOINT_URI="s3://bucket/runs")
    res.create("fastslowruns", "FastSlowRun", "taken", {"config": tiny_config()})
    wait("NameTaken event", lambda: any("NameTaken" in e for e in res.events("taken")), 30, op)
    assert job_names(res) == []
    cm = core.read_namespaced_config_map("taken-config", res.ns)
    assert not cm.metadata.owner_references and cm.data["config.yaml"] == "run: evil"
