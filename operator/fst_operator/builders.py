"""Pure builders and decisions: Kubernetes objects in, Kubernetes objects out. No I/O.

The handlers (handlers.py) fetch, call these, and write. Everything that decides something
lives here, so it is unit-testable without a cluster:

    run_key            the run's name in the database and under the checkpoint prefix
    train_config       FastSlowRun spec -> the TrainConfig the trainer runs
    config_map, job    the trainer's ConfigMap and batch/v1 Job for one attempt
    trainer_command    `fst train`, or torchrun over the pod's GPUs and the run's nodes
    service            a multi-node attempt's headless Service (its pods' DNS names)
    network_policy     a multi-node attempt's pods may connect to each other
    job_suspend_change whether the operator changes a Job's `suspend` (Kueue owns it when queued)
    decide_run         (spec, status, job, progress) -> the new status, the next attempt
    stage_runs         a TaskStream's child runs -> the StageRuns the planner (fst.plan) reads
    run_for_stage      a planned StageRun -> its FastSlowRun
    stream_status      the child runs -> the TaskStream's status

Children are returned without owner references: the handlers adopt them (kopf.adopt).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import yaml

from fst.config import TrainConfig
from fst.gate import GateJob
from fst.k8s.api import (
    API_VERSION,
    OPERATOR_OWNED_KEYS,
    FastSlowRunSpec,
    PromotionSpec,
    TaskStream,
    TrainerSpec,
)
from fst.k8s.status import (
    TERMINAL_PHASES,
    ConditionType,
    FastSlowRunStatus,
    GateStatus,
    Phase,
    Reason,
    ServedModel,
    StageStatus,
    TaskStreamStatus,
    now,
    phase_of,
    remove_condition,
    set_condition,
)
from fst.plan import StageRun, short_name, stage_config, stage_spec, version_name
from fst.plan import StageStatus as PlanStatus
from fst.promote import GateDecision, Score
from fst.store.db import RunProgress, StageInfo
from fst_operator import admission, policy

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
TENANT_SECRET = "fastslow-tenant"  # a namespace's own credentials (tenancy.py; the chart's RBAC)
TRAINER_UID = 10001  # the trainer image's non-root user (trainer-image/Dockerfile)
# torchrun's default master port: a multi-node attempt's static rendezvous at its pod 0.
RENDEZVOUS_PORT = 29500
TERMINAL = tuple(p.value for p in TERMINAL_PHASES)


@dataclass(frozen=True)
class Defaults:
    """Operator-wide defaults (environment of the operator; the chart's values)."""

    checkpoint_prefix: str | None = None  # s3://bucket/prefix when a run names none
    database_secret: dict[str, str] | None = None  # {name, key} when a run names none
    s3_secret: str | None = None
    # One customer per namespace (tenancy.py): s3://bucket/prefix under which namespace N owns
    # <prefix>/N/. Set: runs save under it by default and their pods get the namespace's own
    # credentials (the Secret `tenant_secret`) instead of the three defaults above.
    tenant_prefix: str | None = None
    tenant_secret: str = TENANT_SECRET

    def tenant_root(self, namespace: str) -> str | None:
        """`s3://bucket/<prefix>/<namespace>/`, or None without tenancy."""
        if self.tenant_prefix is None:
            return None
        return policy.tenant_root(self.tenant_prefix, namespace)


def run_key(namespace: str, name: str) -> str:
    """The run's name for the trainer: in the database and under the checkpoint prefix.
    Namespaced, so two teams' runs called `acme` never share rows or checkpoints; the hash of
    `namespace/name` keeps `team-a` + `prod-x` and `team-a-prod` + `x` apart."""
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:6]
    return short_name(f"{namespace}-{name}-{digest}", 63)


def job_name(run_name: str, attempt: int) -> str:
    return f"{run_name}-a{attempt}"


def owned_by(obj: dict[str, Any], owner: dict[str, Any]) -> bool:
    """Whether `owner` controls `obj` (an object of a deterministic name found existing)."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == owner["metadata"]["uid"] for r in refs)


# ----------------------------------------------------------------------------- the run


def train_config(
    run: dict[str, Any], defaults: Defaults, allowed: policy.Policy | None = None
) -> tuple[FastSlowRunSpec, TrainConfig]:
    """The validated spec and the TrainConfig the trainer gets. Raises ValueError (pydantic's
    ValidationError, or policy.PolicyViolation when the spec asks for what `allowed` does not
    allow or names storage outside the namespace's) naming the field."""
    spec = FastSlowRunSpec.model_validate(run["spec"])
    meta = run["metadata"]
    if allowed is not None:
        policy.enforce(policy.check_run(spec, allowed, defaults.tenant_root(meta["namespace"])))
    key = run_key(meta["namespace"], meta["name"])
    raw = spec.config.model_dump(mode="json", by_alias=True)
    raw.update(run=key, outputDir=f"{SCRATCH}/runs")
    raw.pop("database", None)  # from the Secret, as FST_DATABASE_URL
    uri = spec.config.checkpoint.uri
    tenant_root = defaults.tenant_root(meta["namespace"])
    default_prefix = f"{tenant_root}runs" if tenant_root else defaults.checkpoint_prefix
    prefix = spec.trainer.checkpoint_uri or default_prefix
    nodes = spec.trainer.nodes
    # Several pods: each pod's /scratch is its own, so only S3 holds a checkpoint all ranks
    # (and the next attempt) can read.
    multinode = f" (a run on {nodes} nodes saves checkpoints to S3 only)" if nodes > 1 else ""
    if uri is None:
        if prefix is None:
            raise ValueError(
                "spec.trainer.checkpointUri: required (an s3:// prefix) when "
                f"spec.config.checkpoint.uri is not set and the operator has no default{multinode}"
            )
        uri = raw["checkpoint"]["uri"] = f"{prefix.rstrip('/')}/{key}"
    elif not uri.startswith("s3://"):
        raise ValueError(
            f"spec.config.checkpoint.uri: must be an s3:// URI in a cluster (got {uri!r}): "
            "a pod's local disk is gone with the pod"
        )
    if nodes > 1 and not uri.startswith("s3://"):  # the operator's default is a local path
        raise ValueError(
            f"spec.trainer.checkpointUri: required (an s3:// prefix){multinode}; the operator's "
            f"default checkpoint location {uri!r} is not in S3"
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
        },
        "data": {"config.yaml": body},
    }


def job(
    run: dict[str, Any], spec: FastSlowRunSpec, attempt: int, defaults: Defaults
) -> dict[str, Any]:
    """The trainer Job of one attempt. Every attempt runs `fst train --resume`: the first
    starts fresh (nothing to resume), the next ones continue from the latest checkpoint.
    Several GPUs or nodes: under torchrun (trainer_command); several nodes: an Indexed Job of
    one pod per node, named by the headless Service of `service`."""
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
        # codeio's bubblewrap sandbox needs user namespaces, which the restricted pod's
        # RuntimeDefault seccomp profile (and AppArmor) forbid; in a pod the pod itself is the
        # boundary (no token, only the namespace's own credentials, NetworkPolicy) and the
        # process sandbox keeps the trainer's environment unreadable (docs/security.md).
        {"name": "FST_SANDBOX", "value": "process"},
    ]
    tenancy = defaults.tenant_prefix is not None
    env_from: list[dict[str, Any]] = []
    if tenancy:  # the namespace's own S3 user and database role (FST_DATABASE_URL included)
        env_from.append({"secretRef": {"name": defaults.tenant_secret}})
    # A Secret the spec names (allowed by the operator's policy) comes after, so it wins.
    database = t.database_secret.model_dump() if t.database_secret else None
    if database is None and not tenancy:
        database = defaults.database_secret
    if database:
        env.append(
            {
                "name": "FST_DATABASE_URL",
                "valueFrom": {"secretKeyRef": {"name": database["name"], "key": database["key"]}},
            }
        )
    s3_secret = t.s3_secret or (None if tenancy else defaults.s3_secret)
    if s3_secret:
        env_from.append({"secretRef": {"name": s3_secret}})
    resources: dict[str, dict[str, str]] = {"requests": {}, "limits": {}}
    if t.node_gpus:
        resources["limits"]["nvidia.com/gpu"] = str(t.node_gpus)
    for name, value in (("cpu", t.cpu), ("memory", t.memory)):
        if value:
            resources["requests"][name] = resources["limits"][name] = value
    this_job = job_name(meta["name"], attempt)
    command, args = trainer_command(t, this_job)
    volume_mounts = [
        {"name": "config", "mountPath": "/etc/fastslow", "readOnly": True},
        {"name": "scratch", "mountPath": SCRATCH},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": f"{meta['name']}-config"}},
        {"name": "scratch", "emptyDir": {"sizeLimit": t.scratch_size}},
    ]
    if t.node_gpus > 0:
        # NCCL passes data between a pod's GPU processes through shared memory; a container's
        # /dev/shm is 64 MiB unless a memory-backed volume replaces it.
        volume_mounts.append({"name": "shm", "mountPath": "/dev/shm"})
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory"}})
    container = {
        "name": "trainer",
        "image": t.image,
        "imagePullPolicy": t.image_pull_policy,
        "command": command,
        "args": args,
        "env": env,
        "envFrom": env_from,
        "resources": {k: v for k, v in resources.items() if v},
        "volumeMounts": volume_mounts,
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
        "volumes": volumes,
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
    job_spec: dict[str, Any] = {
        # Retries are ours (a new Job per attempt, resuming from the checkpoint), so the
        # Job itself never retries: each attempt's outcome stays visible. On several nodes a
        # failed pod fails the Job, which stops the others: the ranks train together or not.
        "backoffLimit": 0,
        # A queued Job is created suspended: Kueue unsuspends it when its Workload is
        # admitted within the queue's quota (Kueue's contract with a Job's creator).
        "suspend": spec.suspend or bool(t.queue_name),
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if t.nodes > 1:
        # One pod per node, pod i with hostname <job>-i (the Job controller's doing in
        # Indexed mode) and JOB_COMPLETION_INDEX=i: torchrun's node rank. The subdomain
        # (the headless Service `service` builds) makes <job>-0.<service> its DNS name.
        job_spec.update(completionMode="Indexed", completions=t.nodes, parallelism=t.nodes)
        pod_spec["subdomain"] = service_name(this_job)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": this_job, "namespace": meta["namespace"], "labels": job_labels},
        "spec": job_spec,
    }


def trainer_command(t: TrainerSpec, job: str) -> tuple[list[str], list[str]]:
    """The trainer container's command and args. One process: `fst train`. Several GPUs: torchrun
    starts one `python -m fst train` per GPU (--standalone: its rendezvous on a free local
    port). Several nodes: torchrun on each pod with static rendezvous at pod 0 (as Kubeflow's
    PyTorchJob does), its node rank the Job's completion index; the kubelet expands
    $(JOB_COMPLETION_INDEX) from the env the Job controller gives each pod."""
    train = [
        "--config",
        CONFIG_PATH,
        "--resume",
        "--no-progress",
        f"--override=outputDir={SCRATCH}/runs",
    ]
    procs = str(t.processes_per_node)
    if t.nodes > 1:
        return ["torchrun"], [
            "--nnodes",
            str(t.nodes),
            "--nproc-per-node",
            procs,
            "--node-rank",
            "$(JOB_COMPLETION_INDEX)",
            "--master-addr",
            f"{job}-0.{service_name(job)}",
            "--master-port",
            str(RENDEZVOUS_PORT),
            "-m",
            "fst",
            "train",
            *train,
        ]
    if t.processes_per_node > 1:
        return ["torchrun"], [
            "--standalone",
            "--nproc-per-node",
            procs,
            "-m",
            "fst",
            "train",
            *train,
        ]
    return ["fst", "train"], train


def service_name(job: str) -> str:
    """The headless Service of a multi-node attempt: named after its Job. A Service name must
    start with a letter (RFC 1035); a run's name may start with a digit."""
    return job if job[:1].isalpha() else f"fst-{job}"


def _pod_selector(run_name: str, attempt: int) -> dict[str, str]:
    """The labels of one attempt's pods (the Job's pod template has them)."""
    return {LABEL_RUN: run_name, LABEL_ATTEMPT: str(attempt)}


def service(run: dict[str, Any], spec: FastSlowRunSpec, attempt: int) -> dict[str, Any] | None:
    """The headless Service of a multi-node attempt (None for one node): it gives pod i of
    the Indexed Job the DNS name <job>-i.<service>, which torchrun's rendezvous needs.
    publishNotReadyAddresses: the names exist as soon as the pods do, before they are
    Ready, so no rank waits for another's readiness to find pod 0."""
    if spec.trainer.nodes <= 1:
        return None
    meta = run["metadata"]
    name = job_name(meta["name"], attempt)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(name),
            "namespace": meta["namespace"],
            "labels": _pod_selector(meta["name"], attempt),
        },
        "spec": {
            "clusterIP": "None",
            "selector": _pod_selector(meta["name"], attempt),
            "publishNotReadyAddresses": True,
            "ports": [
                {
                    "name": "rendezvous",
                    "port": RENDEZVOUS_PORT,
                    "targetPort": RENDEZVOUS_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


def network_policy(
    run: dict[str, Any], spec: FastSlowRunSpec, attempt: int
) -> dict[str, Any] | None:
    """A multi-node attempt's pods accept connections from each other, on any port (the
    rendezvous, then NCCL's or gloo's own), and from nothing else; None for one node.
    NetworkPolicies add up: where the chart's policy for trainer pods denies all ingress,
    this one opens it between the pods of one attempt only (the chart lets trainer pods
    connect out to trainer pods of their namespace). Ingress only: a policy listing egress
    would cut the pods off from S3 and the database where no other policy allows them."""
    if spec.trainer.nodes <= 1:
        return None
    meta = run["metadata"]
    pods = {"matchLabels": _pod_selector(meta["name"], attempt)}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": job_name(meta["name"], attempt),
            "namespace": meta["namespace"],
            "labels": _pod_selector(meta["name"], attempt),
        },
        "spec": {
            "podSelector": pods,
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": pods}]}],
        },
    }


def job_suspend_change(spec: FastSlowRunSpec, job: dict[str, Any]) -> bool | None:
    """The `suspend` to set on the Job after the spec changed, or None to leave it.

    Called only when the spec changed (metadata.generation ahead of status.observedGeneration),
    never on every reconcile: between changes, a queued Job's `suspend` belongs to Kueue,
    which suspends it while its Workload waits for quota and unsuspends it on admission.
    Suspending always applies (the user stops the pod); resuming a queued Job is Kueue's to
    do, so the operator never unsuspends a Job against an un-admitted Workload."""
    suspended = bool((job.get("spec") or {}).get("suspend"))
    if spec.suspend and not suspended:
        return True
    if not spec.suspend and suspended and not spec.trainer.queue_name:
        return False
    return None


def job_summary(job: dict[str, Any]) -> dict[str, Any]:
    """What the operator needs of a Job (its name, suspend, outcome), in the Job's own shape:
    kept per run in kopf's in-memory index instead of the whole object."""
    status = job.get("status") or {}
    return {
        "metadata": {"name": job["metadata"]["name"]},
        "spec": {"suspend": bool((job.get("spec") or {}).get("suspend"))},
        "status": {
            "conditions": [
                {k: c.get(k) for k in ("type", "status", "reason", "message")}
                for c in status.get("conditions") or []
            ],
            "active": status.get("active") or 0,
            "ready": status.get("ready") or 0,
        },
    }


# ----------------------------------------------------------------------------- run status


def job_outcome(job: dict[str, Any] | None) -> tuple[Phase, str]:
    """(Pending | Running | Succeeded | Failed | Suspended, message) of a Job."""
    if job is None:
        return Phase.PENDING, "no Job yet"
    status = job.get("status") or {}
    for c in status.get("conditions") or []:
        if c.get("status") != "True":
            continue
        if c["type"] == "Complete":
            return Phase.SUCCEEDED, "the trainer finished"
        if c["type"] == "Failed":
            return Phase.FAILED, f"{c.get('reason', 'Failed')}: {c.get('message', '')}".strip(": ")
        if c["type"] == "Suspended":
            return Phase.SUSPENDED, "the Job is suspended"
    if (job.get("spec") or {}).get("suspend"):
        return Phase.SUSPENDED, "the Job is suspended"
    if status.get("active") or status.get("ready"):
        return Phase.RUNNING, "the trainer pod is running"
    return Phase.PENDING, "waiting for the trainer pod"


def oom_failure(pods: list[dict[str, Any]]) -> str | None:
    """Why an attempt failed when the kernel OOM-killed a container at its memory limit (the
    kubelet reports reason OOMKilled, exit 137), as a message naming the limit; else None.

    pods: the attempt's Job's pods (core/v1 Pod dicts, camelCase)."""
    for pod in pods:
        limits = {
            c["name"]: ((c.get("resources") or {}).get("limits") or {}).get("memory")
            for c in (pod.get("spec") or {}).get("containers") or []
        }
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            for state in (status.get("state"), status.get("lastState")):
                ended = (state or {}).get("terminated") or {}
                if ended.get("reason") == "OOMKilled":
                    limit = limits.get(status["name"]) or "none set"
                    return (
                        f"OOMKilled: container {status['name']} of pod "
                        f"{pod['metadata']['name']} went over its memory limit {limit} "
                        f"(exit {ended.get('exitCode', 137)}); raise spec.trainer.memory or "
                        "lower slow.microBatchSize / rollout.batchSize"
                    )
    return None


@dataclass(frozen=True)
class RunDecision:
    status: FastSlowRunStatus  # the whole new status
    create_attempt: int | None = None  # create this attempt's Job


def apply_progress(status: FastSlowRunStatus, progress: RunProgress | None) -> None:
    """Mirror the trainer's progress (from the database) into `status`."""
    if progress is None:
        return
    status.step = progress.step
    if progress.reward is not None:
        status.reward = round(progress.reward, 6)
    if progress.kl is not None:
        status.kl = round(progress.kl, 6)
    if progress.checkpoint_uri is not None:
        status.checkpoint_uri = progress.checkpoint_uri
    if progress.population_version is not None:
        status.population_version = progress.population_version
    if progress.population:
        status.best_prompt = progress.population[0][:2048]


# The status fields apply_progress writes, as the apiserver stores them (camelCase).
PROGRESS_FIELDS = tuple(
    FastSlowRunStatus.model_fields[f].alias or f
    for f in ("step", "reward", "kl", "checkpoint_uri", "population_version", "best_prompt")
)


def progress_patch(status: dict[str, Any], progress: RunProgress) -> dict[str, Any]:
    """The merge patch that mirrors `progress` into a run whose status is `status`: only the
    progress fields, only those that changed (an empty dict when nothing did)."""
    new = FastSlowRunStatus.model_validate({k: status[k] for k in PROGRESS_FIELDS if k in status})
    apply_progress(new, progress)
    dumped = new.dump()
    return {k: dumped[k] for k in PROGRESS_FIELDS if k in dumped and status.get(k) != dumped[k]}


def read_status(obj: dict[str, Any]) -> FastSlowRunStatus:
    return FastSlowRunStatus.model_validate(obj.get("status") or {})


def spec_changed(obj: dict[str, Any]) -> bool:
    """The spec changed since the operator last wrote status for it: metadata.generation
    (bumped by spec changes only) is ahead of status.observedGeneration."""
    seen = (obj.get("status") or {}).get("observedGeneration") or 0
    return bool((obj["metadata"].get("generation") or 0) > seen)


def decide_run(
    run: dict[str, Any],
    spec: FastSlowRunSpec,
    job: dict[str, Any] | None,
    progress: RunProgress | None,
    workload: dict[str, Any] | None = None,
    oom: str | None = None,
) -> RunDecision:
    """The run's next status from what was observed, and whether a new attempt starts.
    `workload`: Kueue's Workload of the current Job (admission.workload_summary), if any.
    `oom`: oom_failure() of the failed attempt's pods: the run fails at once (another attempt
    would meet the same limit)."""
    old = read_status(run)
    gen = run["metadata"].get("generation")
    name = run["metadata"]["name"]
    status = old.model_copy(deep=True)
    if old.phase != Phase.FAILED:
        status.last_error = None
    attempt = old.attempt or 1
    status.attempt, status.job_name = attempt, job_name(name, attempt)
    status.observed_generation, status.steps = gen, spec.config.final_step
    apply_progress(status, progress)
    if old.phase in (Phase.SUCCEEDED, Phase.FAILED):
        return RunDecision(status)  # terminal: only progress is refreshed
    # A spec that was invalid and is valid now (e.g. its trainer section was fixed) starts over.
    conds = old.conditions
    failed = old.condition(ConditionType.FAILED)
    if failed is not None and failed.reason == Reason.INVALID_SPEC:
        conds = remove_condition(conds, ConditionType.FAILED)
    conds = set_condition(
        conds,
        ConditionType.CREATED,
        True,
        Reason.JOB_CREATED,
        f"Job {status.job_name}",
        gen,
    )
    queued = None  # a queued run's admission, as Kueue's Workload tells it
    if spec.trainer.queue_name:
        queued = admission.admission(workload, job, spec.trainer.queue_name)
        conds = set_condition(
            conds, ConditionType.ADMITTED, queued.admitted, queued.reason, queued.message, gen
        )
    else:  # not (or no longer) queued
        conds = remove_condition(conds, ConditionType.ADMITTED)
    outcome, message = job_outcome(job)
    create = None
    running = (False, Reason.POD_PENDING, message)
    if outcome == Phase.FAILED and oom is not None:
        status.last_error = oom
        status.completion_time = now()
        running = (False, Reason.OOM_KILLED, oom)
        conds = set_condition(conds, ConditionType.FAILED, True, Reason.OOM_KILLED, oom, gen)
    elif outcome == Phase.FAILED:
        error = (progress.last_error if progress else None) or message
        status.last_error = error
        if attempt <= spec.backoff_limit:
            attempt += 1
            create = attempt
            status.attempt, status.job_name = attempt, job_name(name, attempt)
            msg = f"attempt {attempt - 1} failed ({error}); attempt {attempt} resumes from "
            msg += status.checkpoint_uri or "the start (no checkpoint yet)"
            running = (False, Reason.RETRYING, msg)
        else:
            status.completion_time = now()
            running = (False, Reason.FAILED, error)
            conds = set_condition(
                conds,
                ConditionType.FAILED,
                True,
                Reason.BACKOFF_LIMIT_EXCEEDED,
                f"{attempt} attempt(s) failed; last error: {error}",
                gen,
            )
    elif outcome == Phase.SUCCEEDED:
        status.completion_time = now()
        running = (False, Reason.COMPLETED, message)
        conds = set_condition(
            conds,
            ConditionType.SUCCEEDED,
            True,
            Reason.COMPLETED,
            f"trained {spec.config.steps} steps",
            gen,
        )
    elif outcome == Phase.SUSPENDED:
        running = (False, Reason.SUSPENDED, message)
    elif outcome == Phase.RUNNING:
        status.start_time = status.start_time or now()
        running = (True, Reason.POD_RUNNING, message)
    conds = set_condition(conds, ConditionType.RUNNING, *running, gen)
    suspended = outcome == Phase.SUSPENDED
    if suspended and spec.suspend:
        reason, why = Reason.SUSPENDED, "spec.suspend is true"
    elif suspended:
        reason = Reason.QUEUED
        why = f"waiting for admission by queue {spec.trainer.queue_name}"
        if queued is not None and not queued.admitted:
            why += f": {queued.message}"  # e.g. Kueue's "insufficient quota for ..."
    else:
        reason, why = Reason.NOT_SUSPENDED, ""
    conds = set_condition(conds, ConditionType.SUSPENDED, suspended, reason, why, gen)
    status.conditions = conds
    status.phase = phase_of(conds)
    return RunDecision(status, create)


def invalid_status(run: dict[str, Any], message: str) -> FastSlowRunStatus:
    gen = run["metadata"].get("generation")
    status = read_status(run)
    conds = set_condition(
        status.conditions, ConditionType.CREATED, False, Reason.INVALID_SPEC, message, gen
    )
    conds = set_condition(conds, ConditionType.FAILED, True, Reason.INVALID_SPEC, message, gen)
    status.observed_generation, status.conditions = gen, conds
    status.phase = phase_of(conds)  # Invalid
    return status


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch from status `old` to `new`: changed keys, and None for keys gone."""
    patch: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch


# ----------------------------------------------------------------------------- streams


def stream_model(stream: dict[str, Any]) -> TaskStream:
    """The TaskStream CR as fst's model (what `fst stream` reads): one validation."""
    body = {
        "apiVersion": stream["apiVersion"],
        "kind": stream["kind"],
        "metadata": {"name": stream["metadata"]["name"]},
        "spec": stream["spec"],
    }
    return TaskStream.model_validate(body)


def _sequence(run: dict[str, Any]) -> int:
    return int(run["metadata"].get("annotations", {}).get(ANNOTATION_SEQUENCE, "0"))


_PLAN_STATUS = {
    Phase.SUCCEEDED: PlanStatus.SUCCEEDED,
    Phase.FAILED: PlanStatus.FAILED,
    Phase.INVALID: PlanStatus.FAILED,
}


def _stage_identity(run: dict[str, Any]) -> dict[str, Any]:
    """What a child FastSlowRun says of the stage run it is (labels and annotations)."""
    meta = run["metadata"]
    annotations = meta.get("annotations") or {}
    return {
        "stage": meta["labels"][LABEL_STAGE],
        "version": int(annotations.get(ANNOTATION_STAGE_VERSION, "1")),
        "run": meta["name"],
        "source": annotations.get(ANNOTATION_SOURCE) or None,
    }


def stage_runs(children: list[dict[str, Any]], rule: PromotionSpec | None = None) -> list[StageRun]:
    """The stream's child FastSlowRuns, oldest first, as the StageRuns fst.plan reads: the
    same records `fst stream` keeps in stream.json (a gate's decision: its status.gate)."""
    out = []
    for run in sorted(children, key=_sequence):
        status = read_status(run)
        phase = Phase(status.phase) if status.phase else None
        plan_status = PlanStatus.PENDING if phase is None else _PLAN_STATUS.get(phase)
        identity = _stage_identity(run)
        gate = status.gate
        out.append(
            StageRun(
                **identity,
                status=plan_status or PlanStatus.RUNNING,
                checkpoint=status.checkpoint_uri,
                gate=gate_decision(identity["stage"], gate, rule or PromotionSpec())
                if gate
                else None,
                bundle=gate.bundle if gate else None,
            )
        )
    return out


def run_for_stage(
    stream: dict[str, Any], model: TaskStream, planned: StageRun, sequence: int
) -> dict[str, Any]:
    """The FastSlowRun of one planned stage run (fst.plan.next_stage): named, started from
    and configured exactly as `fst stream` would run it."""
    stage = stage_spec(model, planned.stage)
    cfg = stage_config(
        model, stage, planned.run, planned.start_checkpoint, planned.start_population
    )
    config = cfg.model_dump(mode="json", by_alias=True, exclude_none=True)
    for key in OPERATOR_OWNED_KEYS:
        config.pop(key, None)
    spec = model.spec
    return {
        "apiVersion": API_VERSION,
        "kind": "FastSlowRun",
        "metadata": {
            "name": planned.run,
            "namespace": stream["metadata"]["namespace"],
            "labels": {LABEL_STREAM: model.metadata.name, LABEL_STAGE: stage.name},
            "annotations": {
                ANNOTATION_STAGE_VERSION: str(planned.version),
                ANNOTATION_SOURCE: planned.source or "",
                ANNOTATION_SEQUENCE: str(sequence),
            },
        },
        "spec": {
            "config": config,
            "trainer": spec.trainer.model_dump(mode="json", by_alias=True, exclude_none=True),
            "backoffLimit": spec.backoff_limit,
            "suspend": False,
        },
    }


@dataclass(frozen=True)
class Gating:
    """A stage run's gate in progress (its Job runs), or failed (`failed` True)."""

    run: str
    message: str
    failed: bool = False


def stream_status(
    stream: dict[str, Any],
    children: list[dict[str, Any]],
    invalid: str | None = None,
    data_error: str | None = None,
    gating: Gating | None = None,
    serving: ServedModel | None = None,
) -> TaskStreamStatus:
    """The stream's status from its child runs. `invalid`: the spec is wrong (Invalid).
    `data_error`: a data source or hand-over checkpoint could not be read, so no stage can be
    planned (DataReady=False; the next poll tries again); None after a successful plan.
    `gating`: a succeeded stage run's gate has not decided yet (or failed). `serving`: what
    the serving ConfigMap holds (kept from the old status when None)."""
    gen = stream["metadata"].get("generation")
    old = TaskStreamStatus.model_validate(stream.get("status") or {})
    conds = old.conditions
    stages = []
    for run in sorted(children, key=_sequence):
        s = read_status(run)
        stages.append(
            StageStatus(
                **_stage_identity(run),
                phase=s.phase or Phase.PENDING,
                step=s.step,
                reward=s.reward,
                checkpoint_uri=s.checkpoint_uri,
                start_time=s.start_time,
                completion_time=s.completion_time,
                promoted=s.gate.promoted if s.gate else None,
                gate_reason=s.gate.reason if s.gate else None,
                bundle=s.gate.bundle if s.gate else None,
            )
        )
    promoted = next((x for x in reversed(stages) if x.promoted), None)
    gated = next((x for x in reversed(stages) if x.promoted is not None), None)
    if gating is not None:
        reason = Reason.GATE_FAILED if gating.failed else Reason.GATE_RUNNING
        conds = set_condition(conds, ConditionType.PROMOTED, False, reason, gating.message, gen)
    elif gated is not None:
        run = next(r for r in children if r["metadata"]["name"] == gated.run)
        gate = read_status(run).gate
        assert gate is not None
        label = version_name(gated.stage, gated.version)
        verdict = "promoted" if gate.promoted else "rejected"
        msg = f"stage {label} {verdict}: {gate.message}"
        conds = set_condition(conds, ConditionType.PROMOTED, gate.promoted, gate.reason, msg, gen)
    elif not any(c.type == ConditionType.PROMOTED for c in conds):
        msg = "no stage gated yet: the base model with the seed prompt is served"
        conds = set_condition(
            conds, ConditionType.PROMOTED, False, Reason.NOTHING_PROMOTED, msg, gen
        )
    current = stages[-1] if stages else None
    if invalid is not None:
        conds = set_condition(conds, ConditionType.FAILED, True, Reason.INVALID_SPEC, invalid, gen)
    elif current is None:
        pass  # Pending: no stage run yet
    elif current.phase in (Phase.FAILED, Phase.INVALID):
        msg = f"stage {current.stage} (run {current.run}) failed"
        conds = set_condition(conds, ConditionType.RUNNING, False, Reason.STAGE_FAILED, msg, gen)
        conds = set_condition(conds, ConditionType.FAILED, True, Reason.STAGE_FAILED, msg, gen)
    elif gating is not None and gating.failed:
        msg = f"the gate of run {gating.run} failed: {gating.message}"
        conds = set_condition(conds, ConditionType.RUNNING, False, Reason.GATE_FAILED, msg, gen)
        conds = set_condition(conds, ConditionType.FAILED, True, Reason.GATE_FAILED, msg, gen)
    elif gating is not None:
        msg = f"gating run {gating.run}: {gating.message}"
        conds = remove_condition(conds, ConditionType.FAILED)
        conds = set_condition(conds, ConditionType.RUNNING, True, Reason.GATE_RUNNING, msg, gen)
        conds = set_condition(conds, ConditionType.SUCCEEDED, False, Reason.GATE_RUNNING, msg, gen)
    elif current.phase != Phase.SUCCEEDED:
        msg = f"stage {current.stage} (run {current.run})"
        conds = remove_condition(conds, ConditionType.FAILED)  # a failed run was replaced
        conds = set_condition(conds, ConditionType.RUNNING, True, Reason.STAGE_RUNNING, msg, gen)
        conds = set_condition(conds, ConditionType.SUCCEEDED, False, Reason.STAGE_RUNNING, msg, gen)
    else:
        msg = f"{len(stages)} stage run(s) done; waiting for new stages or data"
        conds = remove_condition(conds, ConditionType.FAILED)
        conds = set_condition(conds, ConditionType.RUNNING, False, Reason.ALL_STAGES_DONE, msg, gen)
        conds = set_condition(
            conds, ConditionType.SUCCEEDED, True, Reason.ALL_STAGES_DONE, msg, gen
        )
    if data_error is not None:
        conds = set_condition(
            conds, ConditionType.DATA_READY, False, Reason.DATA_UNREADABLE, data_error, gen
        )
    elif invalid is None:
        msg = "data sources readable"
        conds = set_condition(conds, ConditionType.DATA_READY, True, Reason.DATA_READABLE, msg, gen)
    if invalid is None:
        failed = next((c for c in conds if c.type == ConditionType.FAILED), None)
        if failed is not None and failed.reason == Reason.INVALID_SPEC:
            conds = remove_condition(conds, ConditionType.FAILED)
    serving = serving or old.serving
    return TaskStreamStatus(
        phase=phase_of(conds),
        observed_generation=gen,
        stages=stages,
        conditions=conds,
        current_stage=current.stage if current else None,
        promoted=ServedModel(
            stage=version_name(promoted.stage, promoted.version),
            run=promoted.run,
            bundle=promoted.bundle,
        )
        if promoted
        else None,
        serving=serving,
        serving_stage=serving.stage if serving else None,
    )


# ----------------------------------------------------------------------------- the gate

LABEL_GATE = "fastslow.io/gate-of"  # a gate Job's stage run (never LABEL_RUN: not a trainer Job)
GATE_FILE = "gate.json"
SERVING_SUFFIX = "-serving"


def gate_name(run_name: str) -> str:
    """The gate Job (and its ConfigMap) of a stage run: `<run>-gate` (run names are <= 52)."""
    return f"{run_name}-gate"


def stream_key(namespace: str, name: str) -> str:
    """The stream's name in the database's stages table (namespaced, as run_key)."""
    return run_key(namespace, name)


def gate_input(
    stream: dict[str, Any], model: TaskStream, runs: list[StageRun], run: StageRun
) -> dict[str, Any]:
    """GATE.json of `fst gate` (fst.gate.GateJob): the stream, its history up to `run`, the
    database names of those runs."""
    namespace = stream["metadata"]["namespace"]
    history = runs[: runs.index(run) + 1]
    return GateJob(
        stream=model.model_dump(mode="json", by_alias=True, exclude_none=True),
        stream_key=stream_key(namespace, model.metadata.name),
        runs=history,
        run=run.run,
        run_keys={r.run: run_key(namespace, r.run) for r in history},
    ).model_dump(mode="json")


def gate_config_map(child: dict[str, Any], gate: dict[str, Any]) -> dict[str, Any]:
    meta = child["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": gate_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": {LABEL_GATE: meta["name"], LABEL_STREAM: meta["labels"][LABEL_STREAM]},
        },
        "data": {GATE_FILE: json.dumps(gate, indent=1)},
    }


def gate_job(child: dict[str, Any], defaults: Defaults) -> dict[str, Any]:
    """The gate Job of a stage run (its FastSlowRun `child`): `fst gate` in a pod like the
    trainer's (image, credentials, resources, restricted security), on one node and one
    process whatever the run trained on (greedy evaluation of two models). The Job retries its
    pod: a killed gate resumes from the scores it saved in the database."""
    spec = FastSlowRunSpec.model_validate(child["spec"])
    one = spec.trainer.model_copy(update={"nodes": 1, "processes_per_node": 1})
    obj = job(child, spec.model_copy(update={"trainer": one, "suspend": False}), 1, defaults)
    meta = child["metadata"]
    name = gate_name(meta["name"])
    labels = {
        "app.kubernetes.io/name": "fastslow-gate",
        "app.kubernetes.io/managed-by": "fastslow-operator",
        LABEL_GATE: meta["name"],
        LABEL_STREAM: meta["labels"][LABEL_STREAM],
    }
    obj["metadata"]["name"] = name
    queue = obj["metadata"]["labels"].get(KUEUE_QUEUE_LABEL)
    obj["metadata"]["labels"] = labels | ({KUEUE_QUEUE_LABEL: queue} if queue else {})
    template = obj["spec"]["template"]
    template["metadata"]["labels"] = dict(labels)
    container = template["spec"]["containers"][0]
    container["name"] = "gate"
    container["command"], container["args"] = ["fst", "gate"], [f"/etc/fastslow/{GATE_FILE}"]
    container["env"] = [e for e in container["env"] if e["name"] != "FST_ATTEMPT"]
    for volume in template["spec"]["volumes"]:
        if volume["name"] == "config":
            volume["configMap"] = {"name": name}
    obj["spec"]["backoffLimit"] = 2
    return obj


def gate_status(info: StageInfo) -> GateStatus | None:
    """A stage run's gate as the gate Job recorded it (the stages table), for its status."""
    if info.gate is None:
        return None
    decision = GateDecision.model_validate(info.gate)
    return GateStatus(
        promoted=decision.promoted,
        reason=decision.reason,
        message=decision.message,
        candidate={s: v.pass_rate for s, v in decision.candidate.items()},
        baseline={s: v.pass_rate for s, v in decision.baseline.items()},
        n=decision.candidate[decision.stage].n,
        bundle=info.bundle_uri,
    )


def gate_decision(stage: str, gate: GateStatus, rule: PromotionSpec) -> GateDecision:
    """The planner's view of a gate in a run's status (StageRun.gate)."""
    n = gate.n or 0
    return GateDecision(
        stage=stage,
        promoted=gate.promoted,
        reason=gate.reason,
        message=gate.message,
        candidate={s: Score(pass_rate=v, n=n) for s, v in gate.candidate.items()},
        baseline={s: Score(pass_rate=v, n=n) for s, v in gate.baseline.items()},
        rule=rule,
    )


# ----------------------------------------------------------------------------- serving


def serving_config_map(
    stream: dict[str, Any], served: StageRun | None, model: TaskStream, prompt: str | None
) -> dict[str, Any]:
    """`<stream>-serving`: what a serving Deployment mounts (docs/serving.md). `served` None:
    nothing promoted yet, the base model with the seed prompt. `digest` changes whenever what
    is served does, so a Deployment can roll on it (its pod template annotation)."""
    meta = stream["metadata"]
    if served is None:
        seed = prompt if prompt is not None else ""
        data = {"model": model.spec.model.name, "systemPrompt": seed, "stage": "", "run": ""}
    else:
        # Not gated (the operator has no database, or `evalProblems: 0`): no bundle is
        # published, the checkpoint's model/ folder is the loadable weights.
        weights = served.bundle or (f"{served.checkpoint}/model" if served.checkpoint else "")
        data = {
            "model": weights,
            "systemPrompt": prompt or "",
            "stage": served.name,
            "run": served.run,
        }
    data["pinned"] = model.spec.serving.pin or ""
    data["digest"] = hashlib.sha256(
        json.dumps([data["model"], data["systemPrompt"]]).encode()
    ).hexdigest()[:16]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"{meta['name']}{SERVING_SUFFIX}",
            "namespace": meta["namespace"],
            "labels": {
                LABEL_STREAM: meta["name"],
                "app.kubernetes.io/managed-by": "fastslow-operator",
            },
        },
        "data": data,
    }
