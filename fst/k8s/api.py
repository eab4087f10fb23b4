"""The custom resources' spec types: FastSlowRun and TaskStream.

A FastSlowRun's `spec.config` IS a TrainConfig (fst/config.py), minus the fields the operator
owns (OPERATOR_OWNED); `spec.trainer` says where and how the trainer pod runs. A TaskStream is
the manifest `fst stream` reads AND the custom resource the operator reconciles: its stages are
TrainConfig sections, and its TrainerSpec is copied into each stage's run. crds/ is generated
from these models (fst/k8s/crd.py), so `fst train`, `fst stream` and the apiserver validate
against one schema.

Following Kubeflow Trainer / JobSet: `spec` says intent, `status` says facts. The status is
written by the operator only; its typed models are in fst/k8s/status.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from fst.config import ModelConfig, Schema, TaskConfig, TrainConfig
from fst.schema import DNS_LABEL

GROUP = "fastslow.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# TrainConfig sections a stage (or the stream defaults) may set.
STAGE_SECTIONS = ("mode", "seed", "rollout", "slow", "fast", "metrics", "checkpoint")
DEFAULT_IMAGE = "ghcr.io/fastslow/trainer:0.1.0"

# TrainConfig fields the operator sets for a run in a cluster, so a CR never carries them:
# the run's name is the FastSlowRun's, its scratch folder is the pod's, and the database URL
# comes from a Secret (spec.trainer.databaseSecret), never from the spec in clear text.
OPERATOR_OWNED = ("run", "output_dir", "database")
OPERATOR_OWNED_KEYS = tuple(to_camel(f) for f in OPERATOR_OWNED)  # as written in YAML


class SecretKeyRef(Schema):
    name: str = Field(pattern=DNS_LABEL, max_length=253, description="A Secret in the namespace.")
    key: str = Field(max_length=253, description="The key inside the Secret.")


class Toleration(Schema):
    """A pod toleration (core/v1 Toleration), e.g. for tainted GPU nodes."""

    key: str | None = Field(None, max_length=316)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class TrainerSpec(Schema):
    """Where and how the trainer pod runs. Credentials come only from referenced Secrets."""

    image: str = Field(DEFAULT_IMAGE, min_length=1, description="The trainer image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    gpus: int = Field(1, ge=0, le=64, description="nvidia.com/gpu per pod (0: CPU only).")
    cpu: str | None = Field(None, max_length=32, description="CPU request and limit, e.g. '8'.")
    memory: str | None = Field(
        None, max_length=32, description="Memory request and limit, e.g. '32Gi'."
    )
    scratch_size: str = Field(
        "50Gi",
        max_length=32,
        description="Size limit of the writable scratch volume (/scratch): model cache, staging "
        "of checkpoints. The root filesystem is read-only.",
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    service_account_name: str | None = Field(
        None, pattern=DNS_LABEL, max_length=253, description="The pod's ServiceAccount."
    )
    checkpoint_uri: str | None = Field(
        None,
        pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$",
        max_length=1024,
        description="s3:// prefix for checkpoints; a run saves under <prefix>/<run>. "
        "Default: config.checkpoint.uri, else the operator's default.",
    )
    s3_secret: str | None = Field(
        None,
        pattern=DNS_LABEL,
        max_length=253,
        description="A Secret whose keys are environment variables for S3: AWS_ENDPOINT_URL, "
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_REGION optional).",
    )
    database_secret: SecretKeyRef | None = Field(
        None,
        description="The key of a Secret holding the database URL "
        "(postgresql+psycopg://user:password@host/db).",
    )
    queue_name: str | None = Field(
        None,
        max_length=63,
        description="Kueue LocalQueue: sets the kueue.x-k8s.io/queue-name label on the Job.",
    )
    priority_class_name: str | None = Field(None, max_length=253)


class FastSlowRunSpec(Schema):
    """One training run in a cluster: what to train (config) and where (trainer)."""

    config: TrainConfig = Field(
        description="The run's configuration: the same schema as fst train."
    )
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    backoff_limit: int = Field(
        2,
        ge=0,
        le=100,
        description="Failed attempts retried, each resuming from the latest checkpoint.",
    )
    suspend: bool = Field(False, description="True: no trainer pod runs (the Job is suspended).")

    @model_validator(mode="before")
    @classmethod
    def _no_operator_owned(cls, data: Any) -> Any:
        config = data.get("config") if isinstance(data, dict) else None
        if isinstance(config, dict):
            pairs = zip(OPERATOR_OWNED, OPERATOR_OWNED_KEYS, strict=True)
            owned = [key for f, key in pairs if f in config or key in config]
            if owned:
                raise ValueError(
                    f"config.{owned[0]} is set by the operator (the run's name, the pod's scratch "
                    "folder, spec.trainer.databaseSecret); remove it"
                )
            # A placeholder name until the operator names the run after the resource.
            data = {**data, "config": {**config, "run": "run"}}
        return data


# ----------------------------------------------------------------------------- TaskStream


class StageSpec(Schema):
    """One stage: a task (or data source) and how long to train on it."""

    name: str = Field(pattern=DNS_LABEL, max_length=40)
    task: TaskConfig
    steps: int = Field(gt=0)
    mode: Literal["rl", "fst", "gepa"] | None = None
    seed: int | None = None
    rollout: dict[str, Any] | None = None
    slow: dict[str, Any] | None = None
    fast: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    checkpoint: dict[str, Any] | None = None


class TaskStreamSpec(Schema):
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    defaults: dict[str, Any] = Field(
        default_factory=dict,
        description=f"Settings shared by all stages: any of {', '.join(STAGE_SECTIONS)}.",
    )
    output_dir: str = Field("runs", description="Local folder for stream state and runs.")
    eval_problems: int = Field(
        16, ge=0, description="Test problems per stage for retention and the decomposition."
    )
    watch_interval_seconds: float = Field(10.0, gt=0)
    stages: list[StageSpec] = Field(min_length=1, max_length=100)
    # In a cluster only (the operator); `fst stream` ignores them.
    trainer: TrainerSpec = Field(
        default_factory=TrainerSpec,
        description="Cluster only: where each stage's trainer pod runs (copied into its run).",
    )
    backoff_limit: int = Field(
        2, ge=0, le=100, description="Cluster only: retries of each stage's run."
    )
    suspend: bool = Field(False, description="Cluster only: start no new stage while true.")

    @field_validator("defaults")
    @classmethod
    def _known_sections(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - set(STAGE_SECTIONS))
        if unknown:
            raise ValueError(f"unknown keys {unknown}; allowed: {', '.join(STAGE_SECTIONS)}")
        return v

    @field_validator("stages")
    @classmethod
    def _unique_names(cls, v: list[StageSpec]) -> list[StageSpec]:
        names = [s.name for s in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique; repeated: {dupes}")
        return v


class ObjectMeta(Schema):
    """The part of metadata a TaskStream file needs (`fst stream`); the operator reads the
    rest (namespace, uid, generation) from the object itself."""

    name: str = Field(pattern=DNS_LABEL, max_length=40)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class TaskStream(Schema):
    api_version: Literal["fastslow.io/v1alpha1"]
    kind: Literal["TaskStream"]
    metadata: ObjectMeta
    spec: TaskStreamSpec
