"""Pure builders and decisions: Kubernetes objects in, Kubernetes objects out. No I/O.

The handlers (handlers.py) fetch, call these, and write. Everything that decides something
lives here, so it is unit-testable without a cluster:

    run_key            the run's name in the database and under the checkpoint prefix
    train_config       FastSlowRun spec -> the TrainConfig the trainer runs
    config_map, job    the trainer's ConfigMap and batch/v1 Job for one attempt
    decide_run         (spec, status, job, progress) -> the new status, the next attempt
    run_for_stage      a TaskStream stage -> its FastSlowRun
    stream_entries     a TaskStream's child runs -> the stage entries fst.stream plans with
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import yaml

from fst.config import TrainConfig
from fst.k8s.api import API_VERSION, OPERATOR_OWNED_KEYS, FastSlowRunSpec
from fst.store.db import RunProgress
from fst.stream import TaskStream, stage_config

LABEL_RUN = "fastslow.io/run"
LABEL_ATTEMPT = "fastslow.io/attempt"
LABEL_STREAM = "fastslow.io/stream"
LABEL_STAGE = "fastslow.io/stage"
ANNOTATION_STAGE_VERSION = "fastslow.io/stage-version"
ANNOTATION_SOURCE = "fastslow.io/source"
ANNOTATION_SEQUENCE = "fastslow.io/sequence"  # order of a stream's runs (timestamps tie)
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
CONFIG_PATH = "/etc/fastslow/config.yaml"
SCRATCH = "/scratch"
TRAINER_UID = 10001  # the trainer image's non-root user (trainer-image/Dockerfile)
TERMINAL = ("Succeeded", "Failed", "Invalid")


@dataclass(frozen=True)
class Defaults:
    """Operator-wide defaults (environment of the operator; the chart's values)."""

    checkpoint_prefix: str | None = None  # s3://bucket/prefix when a run names none
    database_secret: dict[str, str] | None = None  # {name, key} when a run names none
    s3_secret: str | None = None


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def short_name(name: str, limit: int) -> str:
    """`name` if it fits, else a prefix and a hash of the whole: deterministic and unique."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-')}-{digest}"


def run_key(namespace: str, name: str) -> str:
    """The run's name for the trainer: in the database and under the checkpoint prefix.
    Namespaced, so two teams' runs called `acme` never share rows or checkpoints."""
    return short_name(f"{namespace}-{name}", 63)


def job_name(run_name: str, attempt: int) -> str:
    return f"{run_name}-a{attempt}"


def owner_reference(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


# ----------------------------------------------------------------------------- the run


def train_config(run: dict[str, Any], defaults: Defaults) -> tuple[FastSlowRunSpec, TrainConfig]:
    """The validated spec and the TrainConfig the trainer gets. Raises ValueError (pydantic's
    ValidationError) naming the field when the spec is invalid."""
    spec = FastSlowRunSpec.model_validate(run["spec"])
    meta = run["metadata"]
    key = run_key(meta["namespace"], meta["name"])
    raw = spec.config.model_dump(mode="json", by_alias=True)
    raw.update(run=key, outputDir=f"{SCRATCH}/runs")
    raw.pop("database", None)  # from the Secret, as FST_DATABASE_URL
    uri = spec.config.checkpoint.uri
    prefix = spec.trainer.checkpoint_uri or defaults.checkpoint_prefix
    if uri is None:
        if prefix is None:
            raise ValueError(
                "spec.trainer.checkpointUri: required (an s3:// prefix) when "
                "spec.config.checkpoint.uri is not set and the operator has no default"
            )
        raw["checkpoint"]["uri"] = f"{prefix.rstrip('/')}/{key}"
    elif not uri.startswith("s3://"):
        raise ValueError(
            f"spec.config.checkpoint.uri: must be an s3:// URI in a cluster (got {uri!r}): "
            "a pod's local disk is gone with the pod"
        )
    return spec, TrainConfig.model_validate(raw)


def config_map(run: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    body = yaml.safe_dump(
        cfg.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"{run['metadata']['name']}-config",
            "namespace": run["metadata"]["namespace"],
            "labels": {LABEL_RUN: run["metadata"]["name"]},
            "ownerReferences": [owner_reference(run)],
        },
        "data": {"config.yaml": body},
    }


def job(
    run: dict[str, Any], spec: FastSlowRunSpec, attempt: int, defaults: Defaults
) -> dict[str, Any]:
    """The trainer Job of one attempt. Every attempt runs `fst train --resume`: the first
    starts fresh (nothing to resume), the next ones continue from the latest checkpoint."""
    meta = run["metadata"]
    t = spec.trainer
    labels = {
        "app.kubernetes.io/name": "fastslow-trainer",
        "app.kubernetes.io/managed-by": "fastslow-operator",
        LABEL_RUN: meta["name"],
        LABEL_ATTEMPT: str(attempt),
    }
    job_labels = dict(labels)
    if t.queue_name:
        job_labels[KUEUE_QUEUE_LABEL] = t.queue_name
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": SCRATCH},
        {"name": "TMPDIR", "value": SCRATCH},
        {"name": "FST_CACHE", "value": f"{SCRATCH}/cache"},
        {"name": "HF_HOME", "value": f"{SCRATCH}/hf"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "FST_ATTEMPT", "value": str(attempt)},
    ]
    database = t.database_secret.model_dump() if t.database_secret else defaults.database_secret
    if database:
        env.append(
            {
                "name": "FST_DATABASE_URL",
                "valueFrom": {"secretKeyRef": {"name": database["name"], "key": database["key"]}},
            }
        )
    s3_secret = t.s3_secret or defaults.s3_secret
    env_from = [{"secretRef": {"name": s3_secret}}] if s3_secret else []
    resources: dict[str, dict[str, str]] = {"requests": {}, "limits": {}}
    if t.gpus:
        resources["limits"]["nvidia.com/gpu"] = str(t.gpus)
    for name, value in (("cpu", t.cpu), ("memory", t.memory)):
        if value:
            resources["requests"][name] = resources["limits"][name] = value
    container = {
        "name": "trainer",
        "image": t.image,
        "imagePullPolicy": t.image_pull_policy,
        "command": ["fst", "train"],
        "args": [
            "--config",
            CONFIG_PATH,
            "--resume",
            "--no-progress",
            f"--override=outputDir={SCRATCH}/runs",
        ],
        "env": env,
        "envFrom": env_from,
        "resources": {k: v for k, v in resources.items() if v},
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/fastslow", "readOnly": True},
            {"name": "scratch", "mountPath": SCRATCH},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # The trainer never calls the Kubernetes API: no token in the pod.
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": f"{meta['name']}-config"}},
            {"name": "scratch", "emptyDir": {"sizeLimit": t.scratch_size}},
        ],
    }
    if t.node_selector:
        pod_spec["nodeSelector"] = dict(t.node_selector)
    if t.tolerations:
        pod_spec["tolerations"] = [
            x.model_dump(by_alias=True, exclude_none=True) for x in t.tolerations
        ]
    if t.service_account_name:
        pod_spec["serviceAccountName"] = t.service_account_name
    if t.priority_class_name:
        pod_spec["priorityClassName"] = t.priority_class_name
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(meta["name"], attempt),
            "namespace": meta["namespace"],
            "labels": job_labels,
            "ownerReferences": [owner_reference(run)],
        },
        "spec": {
            # Retries are ours (a new Job per attempt, resuming from the checkpoint), so the
            # Job itself never retries: each attempt's outcome stays visible.
            "backoffLimit": 0,
            "suspend": spec.suspend,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


# ----------------------------------------------------------------------------- run status


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """Conditions with `type_` set; lastTransitionTime changes only when the status does."""
    value = "True" if status else "False"
    out = [dict(c) for c in conditions if c["type"] != type_]
    old = next((c for c in conditions if c["type"] == type_), None)
    changed = old is None or old.get("status") != value
    out.append(
        {
            "type": type_,
            "status": value,
            "reason": reason,
            "message": message[:4000],
            "observedGeneration": generation or 0,
            "lastTransitionTime": now() if changed else old["lastTransitionTime"],
        }
    )
    order = ["Created", "Running", "Suspended", "Succeeded", "Failed"]
    return sorted(out, key=lambda c: order.index(c["type"]) if c["type"] in order else 99)


def job_outcome(job: dict[str, Any] | None) -> tuple[str, str]:
    """(Pending | Running | Succeeded | Failed | Suspended, message) of a Job."""
    if job is None:
        return "Pending", "no Job yet"
    status = job.get("status") or {}
    for c in status.get("conditions") or []:
        if c.get("status") != "True":
            continue
        if c["type"] == "Complete":
            return "Succeeded", "the trainer finished"
        if c["type"] == "Failed":
            return "Failed", f"{c.get('reason', 'Failed')}: {c.get('message', '')}".strip(": ")
        if c["type"] == "Suspended":
            return "Suspended", "the Job is suspended"
    if (job.get("spec") or {}).get("suspend"):
        return "Suspended", "the Job is suspended"
    if status.get("active") or status.get("ready"):
        return "Running", "the trainer pod is running"
    return "Pending", "waiting for the trainer pod"


@dataclass(frozen=True)
class RunDecision:
    status: dict[str, Any]  # the whole new status
    create_attempt: int | None = None  # create this attempt's Job


def progress_fields(progress: RunProgress | None) -> dict[str, Any]:
    if progress is None:
        return {}
    out: dict[str, Any] = {"step": progress.step}
    for key, value in (
        ("reward", progress.reward),
        ("kl", progress.kl),
        ("checkpointUri", progress.checkpoint_uri),
        ("populationVersion", progress.population_version),
    ):
        if value is not None:
            out[key] = round(value, 6) if isinstance(value, float) else value
    if progress.population:
        out["population"] = progress.population[:64]
    return out


def decide_run(
    run: dict[str, Any],
    spec: FastSlowRunSpec,
    job: dict[str, Any] | None,
    progress: RunProgress | None,
) -> RunDecision:
    """The run's next status from what was observed, and whether a new attempt starts."""
    old = run.get("status") or {}
    gen = run["metadata"].get("generation")
    status = copy.deepcopy(old)
    if old.get("phase") != "Failed":
        status.pop("lastError", None)
    attempt = int(old.get("attempt") or 1)
    status.update(
        attempt=attempt,
        jobName=job_name(run["metadata"]["name"], attempt),
        observedGeneration=gen,
        steps=spec.config.steps,
        **progress_fields(progress),
    )
    conds = old.get("conditions") or []
    if old.get("phase") in ("Succeeded", "Failed"):
        return RunDecision(status)  # terminal: only progress is refreshed
    conds = set_condition(conds, "Created", True, "JobCreated", f"Job {status['jobName']}", gen)
    outcome, message = job_outcome(job)
    create = None
    if outcome == "Failed":
        error = (progress.last_error if progress else None) or message
        if attempt <= spec.backoff_limit:
            attempt += 1
            create = attempt
            status.update(attempt=attempt, jobName=job_name(run["metadata"]["name"], attempt))
            status["lastError"] = error
            msg = f"attempt {attempt - 1} failed ({error}); attempt {attempt} resumes from "
            msg += status.get("checkpointUri") or "the start (no checkpoint yet)"
            conds = set_condition(conds, "Running", False, "Retrying", msg, gen)
            phase = "Pending"
        else:
            phase = "Failed"
            status["lastError"] = error
            status["completionTime"] = now()
            conds = set_condition(conds, "Running", False, "Failed", error, gen)
            conds = set_condition(
                conds,
                "Failed",
                True,
                "BackoffLimitExceeded",
                f"{attempt} attempt(s) failed; last error: {error}",
                gen,
            )
    elif outcome == "Succeeded":
        phase = "Succeeded"
        status["completionTime"] = now()
        conds = set_condition(conds, "Running", False, "Completed", message, gen)
        conds = set_condition(
            conds, "Succeeded", True, "Completed", f"trained {status['steps']} steps", gen
        )
    elif outcome == "Suspended":
        phase = "Suspended"
        conds = set_condition(conds, "Running", False, "Suspended", message, gen)
    elif outcome == "Running":
        phase = "Running"
        status.setdefault("startTime", now())
        conds = set_condition(conds, "Running", True, "PodRunning", message, gen)
    else:
        phase = "Pending"
        conds = set_condition(conds, "Running", False, "Pending", message, gen)
    suspended = outcome == "Suspended"
    conds = set_condition(
        conds,
        "Suspended",
        suspended,
        "Suspended" if suspended else "NotSuspended",
        "spec.suspend is true" if spec.suspend else "",
        gen,
    )
    status.update(phase=phase, conditions=conds)
    return RunDecision(status, create)


def invalid_status(run: dict[str, Any], message: str) -> dict[str, Any]:
    gen = run["metadata"].get("generation")
    old = run.get("status") or {}
    conds = set_condition(
        old.get("conditions") or [], "Created", False, "InvalidSpec", message, gen
    )
    conds = set_condition(conds, "Failed", True, "InvalidSpec", message, gen)
    return {**old, "phase": "Invalid", "observedGeneration": gen, "conditions": conds}


# ----------------------------------------------------------------------------- streams


def stage_run_name(stream_name: str, stage_name: str, version: int) -> str:
    name = f"{stream_name}-{stage_name}" + ("" if version == 1 else f"-v{version}")
    return short_name(name, 52)


def stream_model(stream: dict[str, Any]) -> TaskStream:
    """The TaskStream CR as fst's model (what `fst stream` reads): one validation."""
    body = {
        "apiVersion": stream["apiVersion"],
        "kind": stream["kind"],
        "metadata": {"name": stream["metadata"]["name"]},
        "spec": stream["spec"],
    }
    return TaskStream.model_validate(body)


def check_stages(model: TaskStream) -> None:
    """Each stage, merged with the stream's defaults, must make a valid run: a ConfigError
    names the stage and the field (what `fst stream` checks when it loads the file)."""
    from pydantic import ValidationError

    from fst.config import ConfigError, format_validation_error

    for i, stage in enumerate(model.spec.stages):
        name = stage_run_name(model.metadata.name, stage.name, 1)
        try:
            stage_config(model, stage, run_name=name)
        except ValidationError as e:
            where = f"spec.stages.{i} ({stage.name})"
            raise ConfigError(format_validation_error(e, where).replace("\n", ";")) from None


def stream_entries(children: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stream's stage runs, oldest first, as the entries fst.stream.next_stage plans with."""
    entries = []

    def order(run: dict[str, Any]) -> int:
        return int(run["metadata"]["annotations"].get(ANNOTATION_SEQUENCE, "0"))

    for run in sorted(children, key=order):
        meta, status = run["metadata"], run.get("status") or {}
        phase = status.get("phase", "Pending")
        entries.append(
            {
                "stage": meta["labels"][LABEL_STAGE],
                "name": meta["name"],
                "run": meta["name"],
                "version": int(meta["annotations"].get(ANNOTATION_STAGE_VERSION, "1")),
                "source": meta["annotations"].get(ANNOTATION_SOURCE) or None,
                "status": {"Succeeded": "succeeded", "Failed": "failed", "Invalid": "failed"}.get(
                    phase, "running"
                ),
                "phase": phase,
                "checkpoint": status.get("checkpointUri"),
                "population": status.get("population"),
                "step": status.get("step"),
                "reward": status.get("reward"),
                "startTime": status.get("startTime"),
                "completionTime": status.get("completionTime"),
            }
        )
    return entries


def run_for_stage(
    stream: dict[str, Any],
    model: TaskStream,
    stage_name: str,
    entry: dict[str, Any],
    sequence: int,
) -> dict[str, Any]:
    """The FastSlowRun of one stage version; starts from the previous stage's checkpoint and
    population (entry's start_checkpoint / start_population) when there is one."""
    stage = next(s for s in model.spec.stages if s.name == stage_name)
    name = stage_run_name(model.metadata.name, stage.name, entry["version"])
    cfg = stage_config(
        model, stage, name, entry.get("start_checkpoint"), entry.get("start_population")
    )
    config = cfg.model_dump(mode="json", by_alias=True, exclude_none=True)
    for key in OPERATOR_OWNED_KEYS:
        config.pop(key, None)
    spec = model.spec
    return {
        "apiVersion": API_VERSION,
        "kind": "FastSlowRun",
        "metadata": {
            "name": name,
            "namespace": stream["metadata"]["namespace"],
            "labels": {LABEL_STREAM: model.metadata.name, LABEL_STAGE: stage.name},
            "annotations": {
                ANNOTATION_STAGE_VERSION: str(entry["version"]),
                ANNOTATION_SOURCE: entry.get("source") or "",
                ANNOTATION_SEQUENCE: str(sequence),
            },
            "ownerReferences": [owner_reference(stream)],
        },
        "spec": {
            "config": config,
            "trainer": spec.trainer.model_dump(mode="json", by_alias=True, exclude_none=True),
            "backoffLimit": spec.backoff_limit,
            "suspend": False,
        },
    }


def stream_status(
    stream: dict[str, Any], entries: list[dict[str, Any]], invalid: str | None = None
) -> dict[str, Any]:
    gen = stream["metadata"].get("generation")
    old = stream.get("status") or {}
    conds = old.get("conditions") or []
    stages = [
        {
            k: v
            for k, v in {
                "stage": e["stage"],
                "version": e["version"],
                "run": e["run"],
                "source": e["source"],
                "phase": e["phase"],
                "step": e["step"],
                "reward": e["reward"],
                "checkpointUri": e["checkpoint"],
                "startTime": e["startTime"],
                "completionTime": e["completionTime"],
            }.items()
            if v is not None
        }
        for e in entries
    ]
    current = entries[-1] if entries else None
    if invalid is not None:
        phase = "Invalid"
        conds = set_condition(conds, "Failed", True, "InvalidSpec", invalid, gen)
    elif current is None:
        phase = "Pending"
    elif current["status"] == "failed":
        phase = "Failed"
        msg = f"stage {current['stage']} (run {current['run']}) failed"
        conds = set_condition(conds, "Running", False, "StageFailed", msg, gen)
        conds = set_condition(conds, "Failed", True, "StageFailed", msg, gen)
    elif current["status"] == "running":
        phase = "Running"
        msg = f"stage {current['stage']} (run {current['run']})"
        conds = set_condition(conds, "Running", True, "StageRunning", msg, gen)
        conds = set_condition(conds, "Succeeded", False, "StageRunning", msg, gen)
    else:
        phase = "Succeeded"
        msg = f"{len(entries)} stage run(s) done; waiting for new stages or data"
        conds = set_condition(conds, "Running", False, "AllStagesDone", msg, gen)
        conds = set_condition(conds, "Succeeded", True, "AllStagesDone", msg, gen)
    if invalid is None:
        conds = [c for c in conds if not (c["type"] == "Failed" and c["reason"] == "InvalidSpec")]
    status = {
        "phase": phase,
        "observedGeneration": gen,
        "stages": stages,
        "conditions": conds,
    }
    if current is not None:
        status["currentStage"] = current["stage"]
    return status
