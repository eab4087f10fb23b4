"""The custom resources' status types: what the operator observed, typed.

The operator builds these models and writes `model.dump()`; the CRDs' status schemas and their
`kubectl get` columns are generated from the same models (fst/k8s/crd.py), so adding a status
field is one edit here, checked by the type checker and by tests/unit/test_crd.py.

Conventions (Kubernetes API conventions, Kubeflow Trainer's TrainJob):
- `conditions` are the facts: one entry per ConditionType, each with a named Reason.
- `phase` is a one-word summary of those conditions for `kubectl get`, computed from them by
  `phase_of()` and never decided separately.
- Times are RFC 3339 strings (`metav1.Time`), as every Kubernetes status has them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel


class Phase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    INVALID = "Invalid"


TERMINAL_PHASES = (Phase.SUCCEEDED, Phase.FAILED, Phase.INVALID)


class ConditionType(StrEnum):
    CREATED = "Created"  # the trainer Job of the current attempt exists
    # A queued run's Job admitted by its queue (Kueue's Workload: Admitted, or why not yet).
    # Only on runs with spec.trainer.queueName; it does not enter the phase (Suspended does).
    ADMITTED = "Admitted"
    RUNNING = "Running"  # its pod runs (False while pending, retrying, suspended, done)
    SUSPENDED = "Suspended"  # the Job is suspended (spec.suspend, or a queue not admitting it)
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    DATA_READY = "DataReady"  # a TaskStream's data sources and hand-over checkpoint are readable
    # A TaskStream's newest gated stage run was promoted (its reason: the gate's, e.g.
    # GatePassed, RegressionOn<Stage>, BelowMinScore, InsufficientGain; GateRunning, GateFailed).
    PROMOTED = "Promoted"


CONDITION_ORDER = [t.value for t in ConditionType]


class Reason(StrEnum):
    """Every reason a condition can have, named once (Kubernetes: CamelCase, machine-readable)."""

    JOB_CREATED = "JobCreated"
    POD_PENDING = "Pending"
    POD_RUNNING = "PodRunning"
    RETRYING = "Retrying"
    COMPLETED = "Completed"
    FAILED = "Failed"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    # The kernel killed the trainer at its memory limit: not retried (it would again).
    OOM_KILLED = "OOMKilled"
    SUSPENDED = "Suspended"
    NOT_SUSPENDED = "NotSuspended"
    # Waiting for a queue (Kueue): Suspended's reason until admission; Admitted's while
    # Kueue has not yet tried to fit the Workload.
    QUEUED = "Queued"
    # The Admitted condition, mirrored from Kueue's Workload (fst_operator/admission.py).
    ADMITTED = "Admitted"  # Workload Admitted (or the Job unsuspended by its queue)
    QUOTA_RESERVED = "QuotaReserved"  # quota held, admission checks pending
    WAITING_FOR_QUOTA = "WaitingForQuota"  # Kueue's Pending: the ClusterQueue has no room yet
    INADMISSIBLE = "Inadmissible"  # Kueue's Inadmissible: no such LocalQueue, a stopped queue
    EVICTED = "Evicted"  # Kueue took the quota back (preempted, queue stopped, ...)
    NO_WORKLOAD = "NoWorkload"  # Kueue has made no Workload for the Job (yet)
    NOT_ADMITTED = "NotAdmitted"  # any other reason of Kueue's, named in the message
    INVALID_SPEC = "InvalidSpec"
    STAGE_RUNNING = "StageRunning"
    STAGE_FAILED = "StageFailed"
    ALL_STAGES_DONE = "AllStagesDone"
    DATA_READABLE = "DataReadable"
    DATA_UNREADABLE = "DataUnreadable"  # missing credentials, access denied, no such object
    # The promotion gate (fst/gate.py) of a stage run: its Job runs, or failed. The decisions
    # themselves are the gate's own reasons (fst/promote.py), a set that names stages.
    GATE_RUNNING = "GateRunning"
    GATE_FAILED = "GateFailed"
    NOTHING_PROMOTED = "NothingPromoted"  # no stage gated yet: the base model is served


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


DATE_TIME: dict[str, Any] = {"format": "date-time"}


def printer(name: str, kind: str = "string", priority: int = 0) -> dict[str, Any]:
    """Field metadata: show this status field as a `kubectl get` column (crd.py reads it)."""
    return {"x-printer-column": {"name": name, "type": kind, "priority": priority}}


class StatusModel(BaseModel):
    """Base of the status models: camelCase on the wire, unknown keys kept out (a status
    written by an older operator may have fields this one no longer knows)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", use_enum_values=True
    )

    def dump(self) -> dict[str, Any]:
        """The JSON the apiserver stores: camelCase, no nulls."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# Typed in Python, plain strings in the CRD: an older CRD must still accept the condition types
# and reasons a newer operator writes (Kubernetes treats both as open sets).
ConditionTypeField = Annotated[ConditionType, WithJsonSchema({"type": "string", "maxLength": 64})]
# A condition reason: one of Reason, or a promotion gate's (RegressionOn<Stage> names a stage).
ReasonField = Annotated[Reason | str, WithJsonSchema({"type": "string", "maxLength": 128})]


class Condition(StatusModel):
    """metav1.Condition."""

    type: ConditionTypeField
    status: Literal["True", "False", "Unknown"]
    reason: ReasonField
    message: str = Field("", max_length=4096)
    observed_generation: int = Field(0, ge=0)
    last_transition_time: str = Field(json_schema_extra=DATE_TIME)


def set_condition(
    conditions: list[Condition],
    type_: ConditionType,
    status: bool,
    reason: Reason | str,
    message: str,
    generation: int | None,
) -> list[Condition]:
    """`conditions` with `type_` set; lastTransitionTime changes only when the status does."""
    value: Literal["True", "False"] = "True" if status else "False"
    old = next((c for c in conditions if c.type == type_), None)
    changed = old is None or old.status != value
    new = Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message[:4000],
        observed_generation=generation or 0,
        last_transition_time=now() if changed or old is None else old.last_transition_time,
    )
    out = [c for c in conditions if c.type != type_] + [new]
    return sorted(out, key=lambda c: CONDITION_ORDER.index(c.type))


def remove_condition(conditions: list[Condition], type_: ConditionType) -> list[Condition]:
    return [c for c in conditions if c.type != type_]


def phase_of(conditions: list[Condition]) -> Phase:
    """THE phase of a resource: a one-word summary of its conditions, for `kubectl get`.

    Failed (Invalid when the reason is InvalidSpec) > Succeeded > Suspended > Running >
    Pending: whichever of those conditions is True first."""
    true = {c.type: c for c in conditions if c.status == "True"}
    if ConditionType.FAILED in true:
        invalid = true[ConditionType.FAILED].reason == Reason.INVALID_SPEC
        return Phase.INVALID if invalid else Phase.FAILED
    for type_, phase in (
        (ConditionType.SUCCEEDED, Phase.SUCCEEDED),
        (ConditionType.SUSPENDED, Phase.SUSPENDED),
        (ConditionType.RUNNING, Phase.RUNNING),
    ):
        if type_ in true:
            return phase
    return Phase.PENDING


class FastSlowRunStatus(StatusModel):
    """A run's attempt, its Job, and its progress as the trainer recorded it in the database."""

    phase: Phase | None = Field(None, json_schema_extra=printer("Phase"))
    step: int | None = Field(
        None, description="Last completed RL step.", json_schema_extra=printer("Step", "integer")
    )
    reward: float | None = Field(
        None,
        description="Mean reward of the last step.",
        json_schema_extra=printer("Reward", "number"),
    )
    kl: float | None = Field(
        None,
        description="Last measured KL to the base model.",
        json_schema_extra=printer("KL", "number"),
    )
    attempt: int | None = Field(
        None,
        description="1 + failed attempts so far.",
        json_schema_extra=printer("Attempt", "integer", priority=1),
    )
    observed_generation: int | None = None
    job_name: str | None = None
    steps: int | None = Field(
        None,
        description="The step the run ends at: its steps, after the step of the checkpoint it "
        "continues (spec.config.continueFrom), if any.",
    )
    checkpoint_uri: str | None = Field(
        None,
        description="The latest checkpoint. Its state.json holds the prompt population saved "
        "with those weights: what the next stage of a stream starts from.",
    )
    population_version: int | None = Field(
        None, description="Version of the latest prompt population in the database."
    )
    best_prompt: str | None = Field(
        None,
        max_length=2048,
        description="The best prompt of the latest population (cut to 2048 characters; the "
        "whole population is in the checkpoint and the database).",
    )
    last_error: str | None = None
    start_time: str | None = Field(None, json_schema_extra=DATE_TIME)
    completion_time: str | None = Field(None, json_schema_extra=DATE_TIME)
    gate: GateStatus | None = Field(None, description="A stream's stage run: its gate.")
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description="Latest observations: Created, Admitted (queued runs), Running, Suspended, "
        "Succeeded, Failed.",
    )

    def condition(self, type_: ConditionType) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


class GateStatus(StatusModel):
    """A stage run's promotion gate (fst/promote.py): the decision and every number behind it.
    Written into the run's status by the operator when the run's gate Job has decided."""

    promoted: bool
    reason: str = Field(max_length=128, description="GatePassed, RegressionOn<Stage>, ...")
    message: str = Field("", max_length=4096)
    candidate: dict[str, float] = Field(
        default_factory=dict, description="Stage -> the candidate's greedy pass rate."
    )
    baseline: dict[str, float] = Field(
        default_factory=dict, description="Stage -> the then promoted model's pass rate."
    )
    n: int | None = Field(None, description="Problems scored per stage.")
    bundle: str | None = Field(None, description="The published bundle (weights + prompt).")


class ServedModel(StatusModel):
    """A stream's promoted (or served) stage run and its bundle."""

    stage: str | None = Field(None, description="Stage version; None: the base model.")
    run: str | None = None
    bundle: str | None = Field(None, description="The bundle's URI; None: the base model.")
    pinned: str | None = Field(None, description="spec.serving.pin when it is set.")
    config_map: str | None = Field(None, description="The ConfigMap a server mounts.")


class StageStatus(StatusModel):
    """One stage run of a stream, as its FastSlowRun reports it."""

    stage: str
    version: int
    run: str
    source: str | None = Field(
        None, description="The version of its data: sha256 of a file, or of S3 ETags."
    )
    phase: Phase | None = None
    step: int | None = None
    reward: float | None = None
    checkpoint_uri: str | None = None
    start_time: str | None = Field(None, json_schema_extra=DATE_TIME)
    completion_time: str | None = Field(None, json_schema_extra=DATE_TIME)
    promoted: bool | None = Field(None, description="Its gate's decision (None: not gated yet).")
    gate_reason: str | None = Field(None, max_length=128)
    bundle: str | None = None


class TaskStreamStatus(StatusModel):
    phase: Phase | None = Field(None, json_schema_extra=printer("Phase"))
    current_stage: str | None = Field(None, json_schema_extra=printer("Stage"))
    serving_stage: str | None = Field(
        None, description="The stage served now.", json_schema_extra=printer("Serving")
    )
    promoted: ServedModel | None = Field(None, description="The newest promoted stage run.")
    serving: ServedModel | None = Field(
        None, description="What is served: the newest promoted, or spec.serving.pin's."
    )
    observed_generation: int | None = None
    stages: list[StageStatus] = Field(
        default_factory=list,
        max_length=1000,
        description="Every stage run so far, in order, with its outcome.",
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description="Latest observations: Running, Succeeded, Failed, DataReady, Promoted.",
    )
