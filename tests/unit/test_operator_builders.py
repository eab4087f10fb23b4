"""The operator's pure logic (operator/fst_operator/builders.py), without a cluster."""

from __future__ import annotations

from typing import Any

import pytest
from fst_operator import builders

from fst.k8s.api import FastSlowRunSpec
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
    assert cfg.run == "team-acme" and cfg.output_dir == "/scratch/runs"
    assert cfg.checkpoint.uri == "s3://ckpt/runs/team-acme"
    assert cfg.database is None
    with pytest.raises(ValueError, match=r"spec\.trainer\.checkpointUri: required"):
        builders.train_config(run_object(), builders.Defaults())
    local = run_object({"config": {"task": TASK, "checkpoint": {"uri": "/data"}}})
    with pytest.raises(ValueError, match="must be an s3:// URI"):
        builders.train_config(local, DEFAULTS)


def test_long_names_are_shortened_deterministically() -> None:
    a = builders.run_key("n" * 40, "r" * 40)
    assert len(a) == 63 and a == builders.run_key("n" * 40, "r" * 40)
    assert a != builders.run_key("n" * 40, "r" * 39 + "s")
    assert builders.run_key("team", "acme") == "team-acme"


def test_job_without_gpus_or_secrets_has_no_empty_fields() -> None:
    spec = FastSlowRunSpec.model_validate({"config": {"task": TASK}, "trainer": {"gpus": 0}})
    job = builders.job(run_object(), spec, 2, builders.Defaults())
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert job["metadata"]["name"] == "acme-a2"
    assert "resources" not in c or c["resources"] == {}
    assert c["envFrom"] == [] and "FST_DATABASE_URL" not in {e["name"] for e in c["env"]}
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]


def test_operator_default_secrets_apply_when_the_run_names_none() -> None:
    spec = FastSlowRunSpec.model_validate({"config": {"task": TASK}})
    defaults = builders.Defaults(
        database_secret={"name": "fastslow-db", "key": "url"}, s3_secret="fastslow-s3"
    )
    c = builders.job(run_object(), spec, 1, defaults)["spec"]["template"]["spec"]["containers"][0]
    db = next(e for e in c["env"] if e["name"] == "FST_DATABASE_URL")
    assert db["valueFrom"]["secretKeyRef"] == {"name": "fastslow-db", "key": "url"}
    assert c["envFrom"] == [{"secretRef": {"name": "fastslow-s3"}}]


def decide(status: dict, job: dict | None, progress: RunProgress | None = None, **spec):
    body = {"config": {"task": TASK, "steps": 4}, **spec}
    run = run_object(body, status)
    return builders.decide_run(run, FastSlowRunSpec.model_validate(body), job, progress)


def progress(step: int, error: str | None = None) -> RunProgress:
    return RunProgress(step, 0.5, 0.01, f"s3://c/step-{step:08d}", 2, ["p1", "p2"], error)


def test_running_job_mirrors_progress() -> None:
    d = decide({}, {"spec": {}, "status": {"active": 1}}, progress(2))
    s = d.status
    assert d.create_attempt is None
    assert s["phase"] == "Running" and s["step"] == 2 and s["reward"] == 0.5
    assert s["checkpointUri"] == "s3://c/step-00000002" and s["population"] == ["p1", "p2"]
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
    assert d.status["attempt"] == 2 and d.status["jobName"] == "acme-a2"
    assert d.status["phase"] == "Pending" and d.status["lastError"] == "OSError: disk"
    running = next(c for c in d.status["conditions"] if c["type"] == "Running")
    assert running["reason"] == "Retrying" and "s3://c/step-00000002" in running["message"]


def test_backoff_limit_exhausted_fails_the_run() -> None:
    d = decide({"attempt": 3, "phase": "Pending"}, failed_job(), None, backoffLimit=2)
    assert d.create_attempt is None and d.status["phase"] == "Failed"
    failed = next(c for c in d.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "Job has reached the limit" in failed["message"]


def test_terminal_runs_stay_terminal() -> None:
    done = decide({"attempt": 1, "phase": "Succeeded", "conditions": []}, failed_job())
    assert done.status["phase"] == "Succeeded" and done.create_attempt is None


def test_condition_transition_time_changes_only_with_the_status() -> None:
    conds = builders.set_condition([], "Running", True, "PodRunning", "", 1)
    conds[0]["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    same = builders.set_condition(conds, "Running", True, "PodRunning", "still", 2)
    assert same[0]["lastTransitionTime"] == "2020-01-01T00:00:00Z"
    flipped = builders.set_condition(conds, "Running", False, "Completed", "", 2)
    assert flipped[0]["lastTransitionTime"] != "2020-01-01T00:00:00Z"


def stream_object(stages: list[dict]) -> dict:
    return {
        "apiVersion": "fastslow.io/v1alpha1",
        "kind": "TaskStream",
        "metadata": {"name": "acme", "namespace": "team", "uid": "s-1", "generation": 1},
        "spec": {"defaults": {"mode": "fst"}, "trainer": {"gpus": 4}, "stages": stages},
    }


def test_next_stage_starts_from_the_previous_checkpoint_and_population() -> None:
    stream = stream_object(
        [{"name": "a", "task": TASK, "steps": 2}, {"name": "b", "task": TASK, "steps": 3}]
    )
    model = builders.stream_model(stream)
    entry = {
        "version": 1,
        "start_checkpoint": "s3://c/team-acme-a/step-00000002",
        "start_population": ["best", "second"],
        "source": None,
    }
    run = builders.run_for_stage(stream, model, "b", entry, sequence=1)
    cfg = run["spec"]["config"]
    assert run["metadata"]["name"] == "acme-b"
    assert cfg["model"]["name"] == "s3://c/team-acme-a/step-00000002"
    assert cfg["model"]["reference"] == "smollm2-135m-instruct"
    assert cfg["fast"]["initialPopulation"] == ["best", "second"]
    assert cfg["steps"] == 3 and cfg["mode"] == "fst"
    assert not {"run", "outputDir", "database"} & set(cfg)
    assert run["spec"]["trainer"]["gpus"] == 4
    assert run["metadata"]["ownerReferences"][0]["uid"] == "s-1"
    FastSlowRunSpec.model_validate(run["spec"])  # a valid run spec


def test_stream_entries_follow_the_sequence_not_the_clock() -> None:
    def child(name: str, stage: str, seq: int, phase: str) -> dict:
        return {
            "metadata": {
                "name": name,
                "labels": {builders.LABEL_STAGE: stage},
                "annotations": {builders.ANNOTATION_SEQUENCE: str(seq)},
                "creationTimestamp": "2026-01-01T00:00:00Z",
            },
            "status": {"phase": phase, "checkpointUri": f"s3://{name}"},
        }

    entries = builders.stream_entries(
        [child("s-b", "b", 1, "Running"), child("s-a", "a", 0, "Succeeded")]
    )
    assert [e["stage"] for e in entries] == ["a", "b"]
    assert [e["status"] for e in entries] == ["succeeded", "running"]
    status = builders.stream_status(stream_object([]), entries)
    assert status["phase"] == "Running" and status["currentStage"] == "b"
