"""The custom resources' spec types: FastSlowRun and TaskStream.

A FastSlowRun's `spec.config` IS a TrainConfig (fst/config.py), minus the fields the operator
owns (OPERATOR_OWNED); `spec.trainer` says where and how the trainer pod runs. A TaskStream is
the manifest `fst stream` reads AND the custom resource the operator reconciles: its defaults
and stages override TrainConfig sections (override models generated from them), and its
TrainerSpec is copied into each stage's run. crds/ is generated from these models
(fst/k8s/crd.py), so `fst train`, `fst stream` and the apiserver validate against one schema.

Following Kubeflow Trainer / JobSet: `spec` says intent, `status` says facts. The status is
written by the operator only; its typed models are in fst/k8s/status.py.
"""

from __future__ import annotations

import functools
import types
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, Field, create_model, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic.fields import FieldInfo

from fst.config import ModelConfig, Schema, TaskConfig, TrainConfig
from fst.schema import DNS_LABEL

GROUP = "fastslow.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# TrainConfig sections a stage (or the stream defaults) may set.
STAGE_SECTIONS = ("mode", "seed", "rollout", "slow", "fast", "distill", "metrics", "checkpoint")
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
    nodes: int = Field(
        1,
        ge=1,
        le=64,
        description="Pods (machines) the run trains on. 1: one pod; more: an Indexed Job of "
        "`nodes` pods (a headless Service names them) whose torchrun agents rendezvous at pod "
        "0. Checkpoints must then go to S3.",
    )
    gpus_per_node: int | None = Field(
        None,
        ge=0,
        le=16,
        description="nvidia.com/gpu per pod; torchrun starts one trainer process per GPU "
        "(0: CPU only, one process). Default: gpus, else 1.",
    )
    gpus: int | None = Field(
        None,
        ge=0,
        le=64,
        description="Deprecated synonym of gpusPerNode for a one-node run (set one of them).",
    )
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

    @property
    def node_gpus(self) -> int:
        """nvidia.com/gpu per pod: gpusPerNode, else the deprecated gpus, else 1."""
        for value in (self.gpus_per_node, self.gpus):
            if value is not None:
                return value
        return 1

    @property
    def processes_per_node(self) -> int:
        """Trainer processes torchrun starts in each pod: one per GPU, one on CPU."""
        return max(1, self.node_gpus)

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.node_gpus

    @model_validator(mode="after")
    def _gpu_fields(self) -> TrainerSpec:
        # Mirrored by CEL rules in the CRDs (fst/k8s/crd.py TRAINER_RULES).
        if self.gpus is not None and self.gpus_per_node is not None:
            raise ValueError(GPUS_AND_GPUS_PER_NODE)
        if self.gpus is not None and self.nodes > 1:
            raise ValueError(GPUS_WITH_NODES)
        return self


# Messages of the rules between spec.trainer's GPUs and the model's device: the CEL rules of
# the CRDs (fst/k8s/crd.py) and the models' validators give the same text.
GPUS_AND_GPUS_PER_NODE = (
    "spec.trainer.gpus is a deprecated synonym of spec.trainer.gpusPerNode: set only gpusPerNode"
)
GPUS_WITH_NODES = (
    "spec.trainer.gpus: only for a one-node run; with spec.trainer.nodes > 1 set gpusPerNode "
    "(GPUs of each pod) instead"
)


def device_cpu_message(model: str) -> str:
    """`model`: where the model section is (spec.config.model, or spec.model in a stream)."""
    return (
        f"{model}.device: cpu cannot use the GPUs requested by spec.trainer.gpusPerNode (or "
        f"the deprecated gpus; default 1); set {model}.device to auto or cuda, or "
        "spec.trainer.gpusPerNode to 0"
    )


def device_cuda_message(model: str) -> str:
    return (
        f"{model}.device: cuda needs a GPU, but spec.trainer.gpusPerNode (or the deprecated "
        f"gpus) is 0; set {model}.device to auto or cpu, or spec.trainer.gpusPerNode to 1 or more"
    )


def check_device(device: str, trainer: TrainerSpec, model: str) -> None:
    """The model's torch device must fit the GPUs the pods get (ValueError if not): cpu would
    leave them idle, cuda would find none. `auto` fits both."""
    if device == "cpu" and trainer.node_gpus > 0:
        raise ValueError(device_cpu_message(model))
    if device.startswith("cuda") and trainer.node_gpus == 0:
        raise ValueError(device_cuda_message(model))


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

    @model_validator(mode="after")
    def _device_fits_gpus(self) -> FastSlowRunSpec:
        # Mirrored by CEL rules in the CRD (fst/k8s/crd.py device_rules).
        check_device(self.config.model.device, self.trainer, "spec.config.model")
        return self


# ----------------------------------------------------------------------------- TaskStream


# A stage overrides only the settings it names: `fst.plan.stage_config` deep-merges the built-in
# defaults < the stream's `defaults` < the stage's sections. So a stage's sections (and the
# stream's defaults) are "override" models, generated from the TrainConfig sections rather
# than written twice: the same fields, aliases, descriptions and per-field constraints (ranges,
# patterns, enums), unknown keys rejected, but every field optional and without a default (an
# unset field is not dumped, so it cannot override anything). A nested config model (e.g.
# fast.reflector) becomes an override model too, since the merge goes into it key by key;
# lists, tuples and scalars are replaced whole and keep their type. What spans fields (a
# model's validators, e.g. fst mode's topK <= groupSize) is checked on the merged TrainConfig.


class Overrides(Schema):
    """Base of the generated override models (`overrides_of`)."""

    # The generated fields (a subclass such as StageSpec adds its own, which are not settings).
    override_fields: ClassVar[tuple[str, ...]] = ()
    # True: a null field means unset (a stage's `slow:` left empty). False: null is a value,
    # the one a field that is `X | None` in the config model may override a default with.
    null_is_unset: ClassVar[bool] = False

    def overrides(self) -> dict[str, Any]:
        """The settings given, camelCase, nested overrides included: what to deep-merge."""
        given = self.model_dump(
            mode="json", by_alias=True, exclude_unset=True, include=set(self.override_fields)
        )
        return {k: v for k, v in given.items() if v is not None or not self.null_is_unset}


def _override_type(annotation: Any) -> Any:
    """A field's type in an override model: a config model (alone or in `X | None`) becomes
    its override model; anything else is replaced whole by a merge, so it keeps its type. A
    task (metrics.oodTask) is replaced whole too, like a stage's own task: which params it
    takes depends on its name."""
    if annotation is TaskConfig:
        return annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return overrides_of(annotation)
    if get_origin(annotation) in (Union, types.UnionType):
        options = tuple(_override_type(a) for a in get_args(annotation))
        return Union[options]  # noqa: UP007 (a runtime tuple of types)
    return annotation


@functools.cache
def overrides_of(
    model: type[BaseModel],
    fields: tuple[str, ...] | None = None,
    name: str | None = None,
    nullable: bool = False,
) -> type[Overrides]:
    """The override model of `model` (or of its `fields` only): every field optional, no
    defaults, the same constraints. `nullable`: each field may also be null, meaning unset
    (a stage's `slow:` left empty)."""
    fields = fields or tuple(model.model_fields)
    defs: dict[str, Any] = {}
    for field_name in fields:
        info = model.model_fields[field_name]
        kind = _override_type(info.annotation)
        if nullable:
            kind = kind | None
        field = FieldInfo.from_field(
            None,
            alias=info.alias,
            validation_alias=info.validation_alias,
            serialization_alias=info.serialization_alias,
            description=info.description,
            examples=info.examples,
            json_schema_extra=info.json_schema_extra,
            discriminator=info.discriminator,
            deprecated=info.deprecated,
        )
        # The constraints (Gt, MaxLen, pattern, ...), as pydantic keeps them. Not through
        # Annotated[...]: typing caches those by equality, and Gt(0) == Gt(0.0).
        field.metadata = list(info.metadata)
        defs[field_name] = (kind, field)
    override_model = create_model(
        name or f"{model.__name__.removesuffix('Config')}Overrides",
        __base__=Overrides,
        __doc__=model.__doc__,
        __module__=__name__,
        **defs,
    )
    override_model.override_fields, override_model.null_is_unset = fields, nullable
    return override_model


if TYPE_CHECKING:  # mypy cannot see generated fields; it sees the base of every override model
    StageSettings = Overrides
else:
    StageSettings = overrides_of(TrainConfig, STAGE_SECTIONS, "StageSettings", nullable=True)


class StreamDefaults(StageSettings):
    """Settings shared by all stages (a stage's own settings win, key by key)."""


class StageSpec(StageSettings):
    """One stage: a task (or data source), its steps, and the settings it overrides."""

    name: str = Field(pattern=DNS_LABEL, max_length=40)
    task: TaskConfig
    steps: int = Field(gt=0)


class PromotionSpec(Schema):
    """The gate between a stage's run and what is served (fst/promote.py). After a stage's run
    succeeds, its candidate (final weights + best prompt) and the promoted model (at first the
    base model with the seed prompt) are scored by greedy pass rate on the stage's test split
    and on every earlier stage's retention set (`evalProblems` problems each). The candidate is
    promoted when all three rules hold; a rejected one is kept for inspection, never served."""

    min_score: float = Field(
        0.0, ge=0, le=1, description="Lowest pass rate on the stage's own test split."
    )
    min_gain: float = Field(
        0.0,
        ge=-1,
        le=1,
        description="Lowest gain over the promoted model on the stage's test split (0: not worse).",
    )
    max_regression: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Largest drop against the promoted model on any earlier stage's retention set.",
    )
    next_stage_from: Literal["promoted", "candidate"] = Field(
        "promoted",
        description="What the stage after a rejected one starts from: the promoted model "
        "(default: a rejected stage's regression is not carried on) or the rejected candidate.",
    )


class ServingSpec(Schema):
    """What the stream serves: by default its newest promoted stage."""

    pin: str | None = Field(
        None,
        pattern=DNS_LABEL,
        max_length=40,
        description="Serve this stage's newest promoted bundle instead of the newest one "
        "(a rollback); remove it to return to the newest.",
    )


class TaskStreamSpec(Schema):
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    defaults: StreamDefaults = Field(default_factory=StreamDefaults)
    output_dir: str = Field("runs", description="Local folder for stream state and runs.")
    eval_problems: int = Field(
        16, ge=0, description="Test problems per stage for retention and the decomposition."
    )
    watch_interval_seconds: float = Field(10.0, gt=0)
    stages: list[StageSpec] = Field(min_length=1, max_length=100)
    continue_trajectory: bool = Field(
        False,
        description="Stages continue ONE training trajectory (the paper's continual setting): "
        "a stage starts from its start checkpoint's full state (weights, AdamW and schedule, "
        "step counter, so the GEPA cadence goes on and no round is forced at the boundary, and "
        "the population), with only the data new. Default false: each stage is a fresh run "
        "from that checkpoint's weights and population (a new AdamW, warmup, step 0 and a GEPA "
        "round first), reproducible on its own and carrying no optimizer momentum from a "
        "stage the gate rejected.",
    )
    promotion: PromotionSpec = Field(default_factory=PromotionSpec)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    # In a cluster only (the operator); `fst stream` ignores them.
    trainer: TrainerSpec = Field(
        default_factory=TrainerSpec,
        description="Cluster only: where each stage's trainer pod runs (copied into its run).",
    )
    backoff_limit: int = Field(
        2, ge=0, le=100, description="Cluster only: retries of each stage's run."
    )
    suspend: bool = Field(False, description="Cluster only: start no new stage while true.")

    @model_validator(mode="after")
    def _device_fits_gpus(self) -> TaskStreamSpec:
        # Mirrored by CEL rules in the CRD (fst/k8s/crd.py device_rules). `fst stream` ignores
        # `trainer`, but the same file runs in a cluster, where the two must agree.
        check_device(self.model.device, self.trainer, "spec.model")
        return self

    @model_validator(mode="after")
    def _pin_names_a_stage(self) -> TaskStreamSpec:
        pin = self.serving.pin
        if pin is not None and pin not in [s.name for s in self.stages]:
            raise ValueError(f"serving.pin: no stage named {pin!r} in spec.stages")
        return self

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
