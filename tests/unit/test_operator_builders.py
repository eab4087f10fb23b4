"""The operator's pure logic (operator/fst_operator/builders.py), without a cluster."""

from __future__ import annotations

from typing import Any

import pytest
from fst_operator import builders

from fst.k8s.api import FastSlowRunSpec
from fst.k8s.status import ConditionType, ServedModel, set_condition
from fst.plan import StageRun, StageStatus
from fst.store.db import RunProgress

TASK = {"name": "arithmetic", "params": {"answerFormat": "last_number"}}


def run_object(spec: dict[str, Any] | None = None, status: dict | None = None) -> dict:
    return {
        "apiVersion": "fastslow.io/v1alpha1",
        "kind": "FastSlowRun",
        "metadata": {"name": "acme", "namespace": "team", "uid": "u-1", "generation": 3},
        "spec": spec or {"config": {"task": TASK, "steps": 4}},
        "status": status or {},
    }


def failed_job() -> dict:
    return {
        "spec": {},
        "status": {
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "BackoffLimitExceeded",
                    "message": "Job has reached the limit",
                }
            ]
        },
    }


DEFAULTS = builders.Defaults(checkpoint_prefix="s3://ckpt/runs")


def test_train_config_fills_in_what_the_operator_owns() -> None:
    _, cfg = builders.train_config(run_object(), DEFAULTS)
    key = builders.run_key("team", "acme")
    assert cfg.run == key and cfg.output_dir == "/scratch/runs"
    assert cfg.checkpoint.uri == f"s3://ckpt/runs/{key}"
    assert cfg.database is None
    with pytest.raises(ValueError, match=r"spec\.trainer\.checkpointUri: required"):
        builders.train_config(run_object(), builders.Defaults())
    local = run_object({"config": {"task": TASK, "checkpoint": {"uri": "/data"}}})
    with pytest.raises(ValueError, match="must be an s3:// URI"):
        builders.train_config(local, DEFAULTS)


def test_with_tenancy_a_run_saves_under_its_namespace_with_its_credentials() -> None:
    tenancy = builders.Defaults(
        checkpoint_prefix="s3://ckpt/runs",
        s3_secret="root-s3",
        database_secret={"name": "owner-db", "key": "url"},
        tenant_prefix="s3://fastslow/tenants",
    )
    spec, cfg = builders.train_config(run_object(), tenancy)
    key = builders.run_key("team", "acme")
    assert cfg.checkpoint.uri == f"s3://fastslow/tenants/team/runs/{key}"
    (c,) = builders.job(run_object(), spec, 1, tenancy)["spec"]["template"]["spec"]["containers"]
    # Only the namespace's own Secret: never the operator-wide (root/owner) defaults.
    assert c["envFrom"] == [{"secretRef": {"name": "fastslow-tenant"}}]
    assert not any(e["name"] == "FST_DATABASE_URL" for e in c["env"])


def test_long_names_are_shortened_deterministically() -> None:
    a = builders.run_key("n" * 40, "r" * 40)
    assert len(a) == 63 and a == builders.run_key("n" * 40, "r" * 40)
    assert a != builders.run_key("n" * 40, "r" * 39 + "s")
    assert builders.run_key("team", "acme").startswith("team-acme-")
    # Namespaces and names both hold '-': the key must still tell these apart.
    assert builders.run_key("team-a", "prod-x") != builders.run_key("team-a-prod", "x")


def test_job_without_gpus_or_secrets_has_no_empty_fields() -> None:
    spec = FastSlowRunSpec.model_validate({"config": {"task": TASK}, "trainer": {"gpus": 0}})
    job = builders.job(run_object(), spec, 2, builders.Defaults())
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert job["metadata"]["name"] == "acme-a2"
    assert "resources" not in c or c["resources"] == {}
    assert c["envFrom"] == [] and "FST_DATABASE_URL" not in {e["name"] for e in c["env"]}
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
    assert job["spec"]["suspend"] is False
    assert "ownerReferences" not in job["metadata"]  # the handler adopts it (kopf.adopt)


def queued_spec(suspend: bool = False) -> FastSlowRunSpec:
    return FastSlowRunSpec.model_validate(
        {"config": {"task": TASK}, "trainer": {"queueName": "team-a"}, "suspend": suspend}
    )


def test_a_queued_job_is_created_suspended_for_kueue_to_admit() -> None:
    job = builders.job(run_object(), queued_spec(), 1, builders.Defaults())
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["suspend"] is True


def test_the_operator_never_unsuspends_a_queued_job() -> None:
    waiting = {"spec": {"suspend": True}}  # Kueue has not admitted it
    admitted = {"spec": {"suspend": False}}
    # The user's intent changes: suspend always applies; resuming a queued Job is Kueue's.
    assert builders.job_suspend_change(queued_spec(suspend=False), waiting) is None
    assert builders.job_suspend_change(queued_spec(suspend=True), admitted) is True
    assert builders.job_suspend_change(queued_spec(suspend=True), waiting) is None
    plain = FastSlowRunSpec.model_validate({"config": {"task": TASK}})
    assert builders.job_suspend_change(plain, waiting) is False
    assert builders.job_suspend_change(plain, admitted) is None
    # Waiting for admission shows as Suspended with reason Queued, not as the user's suspend.
    run = run_object({"config": {"task": TASK}, "trainer": {"queueName": "team-a"}})
    d = builders.decide_run(run, queued_spec(), waiting, None)
    suspended = d.status.condition(ConditionType.SUSPENDED)
    assert d.status.phase == "Suspended" and d.create_attempt is None
    assert suspended is not None and suspended.reason == "Queued" and suspended.status == "True"


def test_operator_default_secrets_apply_when_the_run_names_none() -> None:
    spec = FastSlowRunSpec.model_validate({"config": {"task": TASK}})
    defaults = builders.Defaults(
        database_secret={"name": "fastslow-db", "key": "url"}, s3_secret="fastslow-s3"
    )
    c = builders.job(run_object(), spec, 1, defaults)["spec"]["template"]["spec"]["containers"][0]
    db = next(e for e in c["env"] if e["name"] == "FST_DATABASE_URL")
    assert db["valueFrom"]["secretKeyRef"] == {"name": "fastslow-db", "key": "url"}
    assert c["envFrom"] == [{"secretRef": {"name": "fastslow-s3"}}]


def decide(
    status: dict,
    job: dict | None,
    progress: RunProgress | None = None,
    oom: str | None = None,
    **spec,
):
    body = {"config": {"task": TASK, "steps": 4}, **spec}
    run = run_object(body, status)
    spec_model = FastSlowRunSpec.model_validate(body)
    return builders.decide_run(run, spec_model, job, progress, None, oom)


def progress(step: int, error: str | None = None) -> RunProgress:
    return RunProgress(step, 0.5, 0.01, f"s3://c/step-{step:08d}", 2, ["p1", "p2"], error)


def test_running_job_mirrors_progress() -> None:
    d = decide({}, {"spec": {}, "status": {"active": 1}}, progress(2))
    s = d.status.dump()
    assert d.create_attempt is None
    assert s["phase"] == "Running" and s["step"] == 2 and s["reward"] == 0.5
    assert s["checkpointUri"] == "s3://c/step-00000002" and s["bestPrompt"] == "p1"
    assert "population" not in s  # the population lives in the checkpoint and the database
    conds = {c["type"]: c for c in s["conditions"]}
    assert conds["Running"]["status"] == "True" and conds["Running"]["observedGeneration"] == 3


def test_failed_attempt_starts_the_next_one_with_the_trainers_error() -> None:
    d = decide(
        {"attempt": 1, "phase": "Running"},
        failed_job(),
        progress(2, "OSError: disk"),
        backoffLimit=2,
    )
    assert d.create_attempt == 2
    s = d.status.dump()
    assert s["attempt"] == 2 and s["jobName"] == "acme-a2"
    assert s["phase"] == "Pending" and s["lastError"] == "OSError: disk"
    running = next(c for c in s["conditions"] if c["type"] == "Running")
    assert running["reason"] == "Retrying" and "s3://c/step-00000002" in running["message"]


def test_backoff_limit_exhausted_fails_the_run() -> None:
    d = decide({"attempt": 3, "phase": "Pending"}, failed_job(), None, backoffLimit=2)
    assert d.create_attempt is None and d.status.phase == "Failed"
    failed = d.status.condition(ConditionType.FAILED)
    assert failed is not None and failed.reason == "BackoffLimitExceeded"
    assert "Job has reached the limit" in failed.message


def trainer_pod(terminated: dict | None, last: dict | None = None, memory: str = "6Gi") -> dict:
    """A Job's pod as the API returns it (camelCase), its trainer container ended."""
    return {
        "metadata": {"name": "acme-a1-x7k2p"},
        "spec": {"containers": [{"name": "trainer", "resources": {"limits": {"memory": memory}}}]},
        "status": {
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {"terminated": terminated} if terminated else {"waiting": {}},
                    "lastState": {"terminated": last} if last else {},
                }
            ]
        },
    }


def test_an_oom_killed_trainer_is_named_with_its_limit() -> None:
    oom = {"reason": "OOMKilled", "exitCode": 137}
    message = builders.oom_failure([trainer_pod(oom, memory="300Mi")])
    assert message is not None
    assert message.startswith("OOMKilled: container trainer of pod acme-a1-x7k2p")
    assert "memory limit 300Mi (exit 137)" in message and "spec.trainer.memory" in message
    # Also from the last state (the kubelet restarted the container in place).
    assert builders.oom_failure([trainer_pod({"reason": "Error", "exitCode": 1}, oom)])
    # Not an OOM kill: a plain error, or a SIGKILL that was not the OOM killer.
    assert builders.oom_failure([trainer_pod({"reason": "Error", "exitCode": 1})]) is None
    assert builders.oom_failure([trainer_pod({"reason": "Error", "exitCode": 137})]) is None
    assert builders.oom_failure([]) is None


def test_an_oom_kill_fails_the_run_at_once_with_the_limit() -> None:
    oom = builders.oom_failure([trainer_pod({"reason": "OOMKilled", "exitCode": 137})])
    d = decide({"attempt": 1, "phase": "Running"}, failed_job(), progress(2), oom, backoffLimit=2)
    assert d.create_attempt is None and d.status.phase == "Failed"  # no retry into the same wall
    failed = d.status.condition(ConditionType.FAILED)
    assert failed is not None and failed.reason == "OOMKilled" and "6Gi" in failed.message
    assert d.status.last_error == oom and d.status.step == 2


def test_terminal_runs_stay_terminal() -> None:
    done = decide({"attempt": 1, "phase": "Succeeded", "conditions": []}, failed_job())
    assert done.status.phase == "Succeeded" and done.create_attempt is None


def test_condition_transition_time_changes_only_with_the_status() -> None:
    running, pod, done = (
        ConditionType.RUNNING,
        builders.Reason.POD_RUNNING,
        builders.Reason.COMPLETED,
    )
    conds = set_condition([], running, True, pod, "", 1)
    conds[0].last_transition_time = "2020-01-01T00:00:00Z"
    same = set_condition(conds, running, True, pod, "still", 2)
    assert same[0].last_transition_time == "2020-01-01T00:00:00Z"
    flipped = set_condition(conds, running, False, done, "", 2)
    assert flipped[0].last_transition_time != "2020-01-01T00:00:00Z"


def test_status_patch_removes_what_is_gone() -> None:
    old = {"phase": "Failed", "lastError": "x", "step": 2}
    assert builders.status_patch(old, {"phase": "Pending", "step": 2}) == {
        "phase": "Pending",
        "lastError": None,
    }


def stream_object(stages: list[dict]) -> dict:
    return {
        "apiVersion": "fastslow.io/v1alpha1",
        "kind": "TaskStream",
        "metadata": {"name": "acme", "namespace": "team", "uid": "s-1", "generation": 1},
        "spec": {"defaults": {"mode": "fst"}, "trainer": {"gpus": 4}, "stages": stages},
    }


def run_for_stage_b(**spec) -> dict:
    """The FastSlowRun of stage b (3 steps) of a 2-stage stream, started from stage a's
    checkpoint of step 2 with a population of two prompts; `spec`: more stream spec."""
    stream = stream_object(
        [{"name": "a", "task": TASK, "steps": 2}, {"name": "b", "task": TASK, "steps": 3}]
    )
    stream["spec"].update(spec)
    planned = StageRun(
        stage="b",
        version=1,
        run="acme-b",
        start_checkpoint="s3://c/team-acme-a/step-00000002",
        start_population=["best", "second"],
    )
    return builders.run_for_stage(stream, builders.stream_model(stream), planned, sequence=1)


def test_run_for_stage_is_the_planned_run() -> None:
    run = run_for_stage_b()
    cfg = run["spec"]["config"]
    assert run["metadata"]["name"] == "acme-b"
    assert cfg["model"]["name"] == "s3://c/team-acme-a/step-00000002"
    assert cfg["model"]["reference"] == "smollm2-135m-instruct"
    assert cfg["fast"]["initialPopulation"] == ["best", "second"]
    assert cfg["steps"] == 3 and cfg["mode"] == "fst"
    assert not {"run", "outputDir", "database"} & set(cfg)
    assert run["spec"]["trainer"]["gpus"] == 4
    FastSlowRunSpec.model_validate(run["spec"])  # a valid run spec


def test_a_continued_trajectory_runs_from_the_base_with_the_checkpoint_to_continue() -> None:
    """continueTrajectory: the stage's run loads the base model and continues the start
    checkpoint's whole state (continueFrom); it inherits no initialPopulation (the population
    comes with the checkpoint) and ends at the checkpoint's step + its steps."""
    cfg = run_for_stage_b(continueTrajectory=True)["spec"]["config"]
    assert cfg["continueFrom"] == "s3://c/team-acme-a/step-00000002"
    assert cfg["model"]["name"] == "smollm2-135m-instruct" and "reference" not in cfg["model"]
    assert not cfg["fast"].get("initialPopulation")
    parsed = FastSlowRunSpec.model_validate({"config": cfg})
    assert (parsed.config.first_step, parsed.config.final_step) == (2, 5)


def test_continue_from_must_name_one_checkpoint() -> None:
    with pytest.raises(ValueError, match=r"continueFrom[\s\S]*must name one checkpoint"):
        FastSlowRunSpec.model_validate(
            {"config": {"task": TASK, "continueFrom": "s3://c/team-acme-a"}}
        )


def child(name: str, stage: str, seq: int, phase: str, version: int = 1) -> dict:
    return {
        "metadata": {
            "name": name,
            "labels": {builders.LABEL_STAGE: stage},
            "annotations": {
                builders.ANNOTATION_SEQUENCE: str(seq),
                builders.ANNOTATION_STAGE_VERSION: str(version),
            },
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "status": {"phase": phase, "checkpointUri": f"s3://{name}"},
    }


def test_stage_runs_follow_the_sequence_not_the_clock() -> None:
    children = [child("s-b", "b", 1, "Running"), child("s-a", "a", 0, "Succeeded")]
    runs = builders.stage_runs(children)
    assert [r.stage for r in runs] == ["a", "b"]
    assert [r.status for r in runs] == [StageStatus.SUCCEEDED, StageStatus.RUNNING]
    status = builders.stream_status(stream_object([]), children)
    assert status.phase == "Running" and status.current_stage == "b"
    assert [s.run for s in status.stages] == ["s-a", "s-b"]


def test_the_cluster_plans_like_fst_stream() -> None:
    """The operator's view of a stream (its child runs) and the planner give the same next
    run as `fst stream` does from stream.json: same name, checkpoint and population."""
    from fst.plan import next_stage

    stream = stream_object(
        [{"name": "a", "task": TASK, "steps": 2}, {"name": "b", "task": TASK, "steps": 3}]
    )
    model = builders.stream_model(stream)
    runs = builders.stage_runs([child("acme-a", "a", 0, "Succeeded")])
    populations = {"s3://acme-a": ["p1", "p2", "p3"]}
    planned = next_stage(model, runs, lambda task: None, populations.__getitem__)
    assert planned is not None
    assert (planned.stage, planned.run, planned.version) == ("b", "acme-b", 1)
    assert planned.start_checkpoint == "s3://acme-a"
    assert planned.start_population == ["p1", "p2", "p3"]


def test_the_indexed_job_summary_decides_like_the_whole_job() -> None:
    running = {"metadata": {"name": "acme-a1"}, "spec": {"parallelism": 1}, "status": {"active": 1}}
    for job in (failed_job() | {"metadata": {"name": "acme-a1"}}, running):
        summary = builders.job_summary(job)
        assert builders.job_outcome(summary) == builders.job_outcome(job)
        whole = decide({"attempt": 1}, job, progress(1)).status.dump()
        small = decide({"attempt": 1}, summary, progress(1)).status.dump()
        for s in (whole, small):
            for c in s["conditions"]:
                c.pop("lastTransitionTime")
            s.pop("startTime", None)
        assert whole == small


def test_phase_is_computed_from_the_conditions() -> None:
    from fst.k8s.status import Reason, phase_of

    def conds(*pairs: tuple[ConditionType, bool, Reason]) -> list:
        out: list = []
        for type_, value, reason in pairs:
            out = set_condition(out, type_, value, reason, "", 1)
        return out

    c, r = ConditionType, Reason
    assert phase_of([]) == "Pending"
    assert phase_of(conds((c.RUNNING, True, r.POD_RUNNING))) == "Running"
    assert phase_of(conds((c.RUNNING, False, r.SUSPENDED), (c.SUSPENDED, True, r.QUEUED))) == (
        "Suspended"
    )
    assert phase_of(conds((c.SUCCEEDED, True, r.COMPLETED))) == "Succeeded"
    assert phase_of(conds((c.FAILED, True, r.BACKOFF_LIMIT_EXCEEDED))) == "Failed"
    assert phase_of(conds((c.SUCCEEDED, True, r.COMPLETED), (c.FAILED, True, r.INVALID_SPEC))) == (
        "Invalid"
    )


def test_an_invalid_run_made_valid_starts_over() -> None:
    run = run_object()
    invalid = builders.invalid_status(run, "spec.trainer.s3Secret: nope").dump()
    assert invalid["phase"] == "Invalid"
    d = decide(invalid, {"spec": {}, "status": {"active": 1}})
    assert d.status.phase == "Running" and d.status.condition(ConditionType.FAILED) is None


# ----------------------------------------------------------------------------- the gate

GATE_PASSED = {
    "promoted": True,
    "reason": "GatePassed",
    "message": "a 0.250 -> 0.375",
    "candidate": {"a": 0.375},
    "baseline": {"a": 0.25},
    "n": 8,
    "bundle": "s3://c/team-acme-a/bundle/step-00000002",
}
REGRESSED = {
    "promoted": False,
    "reason": "RegressionOnA",
    "message": "a 0.375 -> 0.0",
    "candidate": {"a": 0.0, "b": 0.5},
    "baseline": {"a": 0.375, "b": 0.5},
    "n": 8,
}


def gated_child(name: str, stage: str, seq: int, gate: dict | None) -> dict:
    run = child(name, stage, seq, "Succeeded")
    run["metadata"]["labels"][builders.LABEL_STREAM] = "acme"
    run["metadata"]["namespace"] = "team"
    run["spec"] = {"config": {"task": TASK, "steps": 2}, "trainer": {"gpusPerNode": 2, "nodes": 2}}
    if gate is not None:
        run["status"]["gate"] = gate
    return run


def test_a_succeeded_run_waits_for_its_gate_before_the_next_stage() -> None:
    from fst.plan import awaiting_gate

    stream = stream_object(
        [{"name": "a", "task": TASK, "steps": 2}, {"name": "b", "task": TASK, "steps": 3}]
    )
    model = builders.stream_model(stream)
    ungated = builders.stage_runs([gated_child("acme-a", "a", 0, None)], model.spec.promotion)
    assert awaiting_gate(model, ungated) == ungated[0]
    gated = builders.stage_runs([gated_child("acme-a", "a", 0, GATE_PASSED)])
    assert awaiting_gate(model, gated) is None
    assert gated[0].promoted and gated[0].bundle == GATE_PASSED["bundle"]
    assert gated[0].gate is not None and gated[0].gate.candidate["a"].n == 8
    stream["spec"]["evalProblems"] = 0  # gates nothing: every succeeded run counts
    assert awaiting_gate(builders.stream_model(stream), ungated) is None


def test_the_gate_job_runs_fst_gate_like_the_trainer_on_one_pod() -> None:
    run = gated_child("acme-b", "b", 1, None)
    job = builders.gate_job(run, DEFAULTS)
    assert job["metadata"]["name"] == "acme-b-gate"
    labels = job["metadata"]["labels"]
    assert labels[builders.LABEL_GATE] == "acme-b" and labels[builders.LABEL_STREAM] == "acme"
    assert builders.LABEL_RUN not in labels  # never mistaken for an attempt's trainer Job
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["fst", "gate"]
    assert container["args"] == ["/etc/fastslow/gate.json"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "config", "configMap": {"name": "acme-b-gate"}} in pod["volumes"]
    # The run trained on 2 nodes; its gate is one pod, retried (scores resume from the DB).
    assert "completionMode" not in job["spec"] and job["spec"]["backoffLimit"] == 2
    assert builders.LABEL_RUN not in job["spec"]["template"]["metadata"]["labels"]


def test_gate_input_is_the_stream_history_up_to_the_gated_run() -> None:
    from fst.gate import GateJob

    stream = stream_object(
        [{"name": "a", "task": TASK, "steps": 2}, {"name": "b", "task": TASK, "steps": 3}]
    )
    stream["metadata"]["namespace"] = "team"
    model = builders.stream_model(stream)
    children = [gated_child("acme-a", "a", 0, GATE_PASSED), gated_child("acme-b", "b", 1, None)]
    runs = builders.stage_runs(children, model.spec.promotion)
    job = GateJob.model_validate(builders.gate_input(stream, model, runs, runs[0]))
    assert [r.run for r in job.runs] == ["acme-a"] and job.run == "acme-a"
    job = GateJob.model_validate(builders.gate_input(stream, model, runs, runs[1]))
    assert [r.run for r in job.runs] == ["acme-a", "acme-b"]
    assert job.runs[0].promoted and job.runs[0].bundle == GATE_PASSED["bundle"]
    assert job.run_keys["acme-b"] == builders.run_key("team", "acme-b")
    assert job.stream_key == builders.run_key("team", "acme")


def test_stream_status_names_the_gate_decision_and_what_is_served() -> None:
    stream = stream_object([])
    children = [gated_child("acme-a", "a", 0, GATE_PASSED), gated_child("acme-b", "b", 1, None)]
    gating = builders.Gating("acme-b", "Job acme-b-gate: running")
    status = builders.stream_status(stream, children, gating=gating)
    promoted = next(c for c in status.conditions if c.type == ConditionType.PROMOTED)
    assert (promoted.status, promoted.reason) == ("False", "GateRunning")
    assert status.phase == "Running"  # a stream is not done while a gate decides
    assert status.promoted is not None and status.promoted.run == "acme-a"

    children[1]["status"]["gate"] = REGRESSED
    served = ServedModel(stage="a", run="acme-a", bundle=GATE_PASSED["bundle"])
    status = builders.stream_status(stream, children, serving=served)
    promoted = next(c for c in status.conditions if c.type == ConditionType.PROMOTED)
    assert (promoted.status, promoted.reason) == ("False", "RegressionOnA")
    assert "stage b rejected" in promoted.message
    assert status.phase == "Succeeded" and status.serving_stage == "a"
    assert [(s.promoted, s.gate_reason) for s in status.stages] == [
        (True, "GatePassed"),
        (False, "RegressionOnA"),
    ]
    assert status.promoted is not None and status.promoted.run == "acme-a"  # not b

    failed = builders.Gating("acme-b", "Job acme-b-gate failed", failed=True)
    children[1]["status"].pop("gate")
    status = builders.stream_status(stream, children, gating=failed)
    assert status.phase == "Failed"


def test_the_serving_config_map_follows_the_served_bundle() -> None:
    stream = stream_object([{"name": "a", "task": TASK, "steps": 2}])
    stream["metadata"]["namespace"] = "team"
    model = builders.stream_model(stream)
    base = builders.serving_config_map(stream, None, model, "You are helpful.")
    assert base["metadata"]["name"] == "acme-serving"
    assert base["data"]["model"] == "smollm2-135m-instruct" and base["data"]["stage"] == ""
    (run,) = builders.stage_runs([gated_child("acme-a", "a", 0, GATE_PASSED)])
    cm = builders.serving_config_map(stream, run, model, "Add carefully.")
    assert cm["data"]["model"] == GATE_PASSED["bundle"]
    assert (cm["data"]["systemPrompt"], cm["data"]["stage"]) == ("Add carefully.", "a")
    assert cm["data"]["digest"] != base["data"]["digest"]
    other = builders.serving_config_map(stream, run, model, "Add very carefully.")
    assert other["data"]["digest"] != cm["data"]["digest"]  # the prompt is half the model
