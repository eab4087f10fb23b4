"""The custom resources' spec types: FastSlowRun and the cluster part of a TaskStream.

A FastSlowRun's `spec.config` IS a TrainConfig (fst/config.py), minus the fields the operator
owns (OPERATOR_OWNED); `spec.trainer` says where and how the trainer pod runs. A TaskStream
(fst/stream.py) carries the same TrainerSpec, which the operator copies into each stage's run.
crds/ is generated from these models (fst/k8s/crd.py), so `fst train`, `fst stream` and the
apiserver validate against one schema.

Following Kubeflow Trainer / JobSet: `spec` says intent, `status` says facts. The status is
written by the operator only; its shape is documented in the CRD (fst/k8s/crd.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic.alias_generators import to_camel

from fst.config import Schema, TrainConfig

GROUP = "fastslow.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
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
