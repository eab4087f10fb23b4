"""The stream planner: which stage runs next, under what name, from what. Pure and torch-free.

One planner for both executors of a TaskStream:
- `fst stream` (fst/stream.py) keeps its StageRuns in `<outputDir>/<stream>/stream.json`;
- the operator (fst_operator) reads them off the stream's child FastSlowRuns.

Both call `next_stage(stream, runs, fingerprint_of, population_of)` and `stage_config(...)`,
so a stage's run name, its start checkpoint and the population it inherits are the same on a
laptop and on a cluster. The I/O the planner needs (a data source's fingerprint, the population
saved in a checkpoint) comes in as functions: fst/handover.py has the real ones.

    stage 1                 starts from the base model and the seed prompt
    stage n                 starts from the newest PROMOTED stage run's final checkpoint
                            (fst/promote.py: the gate; `promotion.nextStageFrom: candidate`
                            takes the newest successful one); in modes fst/gepa also from the
                            prompt population saved IN that checkpoint (state.json); an `rl`
                            stage never inherits prompts
    new data in a stage     the stage runs again as `<stage>-v2`, `-v3`, ...
    served                  the newest promoted run's bundle, or the pinned stage's
                            (`serving.pin`: a rollback)
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fst.config import ConfigError, TaskConfig, TrainConfig, format_validation_error
from fst.k8s.api import PromotionSpec, StageSpec, TaskStream
from fst.promote import GateDecision

# A stage run's name must leave room for the Job suffix `-a<attempt>` (Job names are DNS
# labels of at most 63 characters): the FastSlowRun CRD caps names at 52.
RUN_NAME_LIMIT = 52


class StageStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class StageRun(BaseModel):
    """One run of one stage version: its identity, its inputs, and (once done) its outputs.

    Serialized as-is into stream.json (snake_case keys)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    stage: str
    version: int = Field(ge=1)
    run: str = Field(description="The run's name: stage_run_name(stream, stage, version).")
    source: str | None = Field(None, description="Fingerprint of the data this run trains on.")
    status: StageStatus = StageStatus.PENDING
    # Inputs, fixed when the run is planned.
    start_checkpoint: str | None = None
    start_population: list[str] | None = None
    # Outputs, once it succeeded (`fst stream` fills them; the operator reads them off status).
    checkpoint: str | None = None
    population: list[str] | None = None
    best_prompt_id: str | None = None
    evaluation: dict[str, Any] | None = None
    gate: GateDecision | None = Field(None, description="The promotion gate's decision.")
    bundle: str | None = Field(None, description="Where its bundle is published (if promoted).")
    started: float | None = None
    finished: float | None = None
    error: str | None = Field(None, description="Why the run failed (status failed), one line.")

    @property
    def name(self) -> str:
        """The stage version's display name: `mul`, `mul-v2`, ..."""
        return version_name(self.stage, self.version)

    @property
    def promoted(self) -> bool:
        """Succeeded and passed its gate. A run the stream could not gate (`evalProblems: 0`
        evaluates nothing) counts as promoted: there is nothing to hold it back with."""
        return self.status == StageStatus.SUCCEEDED and (self.gate is None or self.gate.promoted)


def version_name(stage: str, version: int) -> str:
    return stage if version == 1 else f"{stage}-v{version}"


def short_name(name: str, limit: int) -> str:
    """`name` if it fits, else a prefix and a hash of the whole: deterministic and unique."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-')}-{digest}"


def stage_run_name(stream: str, stage: str, version: int) -> str:
    """THE name of a stage version's run: its FastSlowRun on a cluster, its folder locally."""
    return short_name(f"{stream}-{version_name(stage, version)}", RUN_NAME_LIMIT)


def inherits_prompts(config: TrainConfig) -> bool:
    """Only the modes with a fast channel start from an earlier stage's prompts: an `rl` stage
    trains with its own seed prompt, whatever came before."""
    return config.mode != "rl"


# ----------------------------------------------------------------------------- configs


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def stage_config(
    stream: TaskStream,
    stage: StageSpec,
    run_name: str,
    start_checkpoint: str | None = None,
    start_population: list[str] | None = None,
) -> TrainConfig:
    """The TrainConfig of one stage run: stream defaults < stage settings < hand-over.

    Raises pydantic's ValidationError naming the field when the merge is invalid."""
    spec = stream.spec
    raw = _deep_merge(spec.defaults.overrides(), stage.overrides())
    model = spec.model.model_dump(mode="json", by_alias=True)
    continued = start_checkpoint is not None and spec.continue_trajectory
    if start_checkpoint is not None and not continued:
        # A fresh run from the checkpoint's weights (its exported model/), KL still to the base.
        model["name"] = start_checkpoint
        model["reference"] = spec.model.reference or spec.model.name
    raw.update(
        run=run_name,
        steps=stage.steps,
        task=stage.task.model_dump(mode="json", by_alias=True),
        model=model,
        outputDir=str(Path(spec.output_dir) / stream.metadata.name),
    )
    if continued:
        # The base model, then the checkpoint's whole state on top (a LoRA run's checkpoint
        # holds its adapters, not the frozen base); its population comes with it.
        raw["continueFrom"] = start_checkpoint
    elif start_population and raw.get("mode", "rl") != "rl":
        raw = _deep_merge(raw, {"fast": {"initialPopulation": start_population}})
    return TrainConfig.model_validate(raw)


def check_stages(stream: TaskStream, source: str) -> None:
    """Each stage, merged with the stream's defaults, must make a valid run: a ConfigError
    names the source, the stage and the field (`fst stream` and the operator both check)."""
    for i, stage in enumerate(stream.spec.stages):
        name = stage_run_name(stream.metadata.name, stage.name, 1)
        try:
            stage_config(stream, stage, run_name=name)
        except ValidationError as e:
            where = f"{source}: spec.stages.{i} ({stage.name})"
            raise ConfigError(format_validation_error(e, where)) from None


def stage_spec(stream: TaskStream, name: str) -> StageSpec:
    for s in stream.spec.stages:
        if s.name == name:
            return s
    raise ConfigError(f"spec.stages: no stage named {name!r} in the manifest")


def check_history(stream: TaskStream, runs: list[StageRun], source: str) -> None:
    """The manifest must still describe the stream's history: every stage that has a run keeps
    its name, and the stages that have runs stay first, in the order they first ran. Stages are
    added at the end. A ConfigError names the stage otherwise.

    Why no rename or reorder: a stage's name is the identity of its runs (run names, folders,
    checkpoints, database rows, a cluster's child objects), and the stream is a sequence in
    time, each stage trained on the previous one's weights. A renamed stage would be planned
    as a new stage (its old runs orphaned, retention unable to find it), and moving a stage
    before one that already ran cannot change what that run started from. Both executors call
    this before planning."""
    ran: list[str] = []
    for r in runs:
        if r.stage not in ran:
            ran.append(r.stage)
    names = [s.name for s in stream.spec.stages]
    for i, name in enumerate(ran):
        if name in names:
            continue
        last = next(r for r in reversed(runs) if r.stage == name)
        maybe = names[i] if i < len(names) and names[i] not in ran else None
        hint = f" (renamed to {maybe!r}?)" if maybe else ""
        raise ConfigError(
            f"{source}: spec.stages: stage {name!r}{hint} is gone from the manifest, but it "
            f"has run ({last.run}, {last.status}); a stage that has run cannot be renamed or "
            f"removed: restore the name {name!r}, or start a new stream (another metadata.name)"
        )
    for i, name in enumerate(ran):
        if names[i] != name:
            raise ConfigError(
                f"{source}: spec.stages.{i} ({names[i]}): expected stage {name!r} here; the "
                f"stages that have run ({', '.join(ran)}) must stay first, in that order: "
                "reordering them or inserting a stage before one that has run is not "
                "supported; add new stages at the end"
            )


# ----------------------------------------------------------------------------- the planner


def last_succeeded(runs: list[StageRun]) -> StageRun | None:
    done = [r for r in runs if r.status == StageStatus.SUCCEEDED]
    return done[-1] if done else None


def last_promoted(runs: list[StageRun]) -> StageRun | None:
    """The newest promoted run: the model the next gate compares against."""
    done = [r for r in runs if r.promoted]
    return done[-1] if done else None


def start_run(runs: list[StageRun], rule: PromotionSpec) -> StageRun | None:
    """The run a new stage starts from (None: the base model): the newest promoted one, or,
    with `promotion.nextStageFrom: candidate`, the newest that succeeded, promoted or not."""
    return last_succeeded(runs) if rule.next_stage_from == "candidate" else last_promoted(runs)


def awaiting_gate(stream: TaskStream, runs: list[StageRun]) -> StageRun | None:
    """The oldest succeeded run the promotion gate has not decided on (a cluster's gate runs
    as its own Job after the run: the operator plans nothing until it decided). None when the
    stream gates nothing (`evalProblems: 0`)."""
    if stream.spec.eval_problems == 0:
        return None
    return next((r for r in runs if r.status == StageStatus.SUCCEEDED and r.gate is None), None)


def serving_run(runs: list[StageRun], pin: str | None) -> StageRun | None:
    """The run whose bundle is served: the newest promoted one, or the newest promoted run of
    the pinned stage. None: nothing promoted yet (or nothing of the pinned stage), and what is
    served is the base model with the seed prompt."""
    mine = [r for r in runs if r.promoted and (pin is None or r.stage == pin)]
    return mine[-1] if mine else None


def next_stage(
    stream: TaskStream,
    runs: list[StageRun],
    fingerprint_of: Callable[[TaskConfig], str | None],
    population_of: Callable[[str], list[str]],
) -> StageRun | None:
    """The stage run to work on next, or None when every stage is up to date.

    `runs` are the stream's stage runs so far, oldest first. In manifest order, a stage needs a
    run when it never succeeded, or when its data source's fingerprint differs from the one its
    latest successful run trained on. An unfinished run (pending or running) is returned as it
    is, to be continued; a failed one stops the stream (returned as it is too: the caller
    decides, `fst stream` retries it, the operator reports the stream Failed).
    A new run starts from the newest promoted run's final checkpoint (start_run: or the newest
    successful one, promoted or not, with `promotion.nextStageFrom: candidate`) and, when its
    mode has a fast channel, from the population saved in that checkpoint (`population_of`).
    """
    for stage in stream.spec.stages:
        mine = [r for r in runs if r.stage == stage.name]
        if mine and mine[-1].status != StageStatus.SUCCEEDED:
            return mine[-1]
        fingerprint = fingerprint_of(stage.task)
        if mine and (fingerprint is None or mine[-1].source == fingerprint):
            continue
        version = len(mine) + 1
        name = stage_run_name(stream.metadata.name, stage.name, version)
        start = start_run(runs, stream.spec.promotion)
        checkpoint = start.checkpoint if start else None
        population = None
        if checkpoint is not None and inherits_prompts(stage_config(stream, stage, name)):
            population = population_of(checkpoint)
        return StageRun(
            stage=stage.name,
            version=version,
            run=name,
            source=fingerprint,
            start_checkpoint=checkpoint,
            start_population=population,
        )
    return None
