"""Task streams: one customer's sequence of task stages, run one after another.

A TaskStream manifest (the same file a user later `kubectl apply`s) names a base model, stream
defaults, and stages. `run_stream` runs the stages in order:

    stage 1 starts from the base model and the task-agnostic seed prompt
    stage n starts from stage n-1's final checkpoint AND its prompt population
    after each stage: retention on every earlier stage's test set, and the channel
    decomposition on its own test set -> stream.json

What starts a new stage: a stage added to the file, or new data in a stage's source (a jsonl
file whose content hash changed): the stage then runs again as `<name>-v2`, `-v3`, ... from the
latest checkpoint. State lives in `<outputDir>/<stream>/stream.json` (written atomically), so
running the command again resumes: finished stages are skipped and an interrupted stage
continues from its last checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from fst.config import (
    ConfigError,
    ModelConfig,
    Schema,
    TaskConfig,
    TrainConfig,
    format_validation_error,
    read_yaml,
)
from fst.k8s.api import TrainerSpec

log = logging.getLogger(__name__)

API_VERSION = "fastslow.io/v1alpha1"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# TrainConfig sections a stage (or the stream defaults) may set.
SECTIONS = ("mode", "seed", "rollout", "slow", "fast", "metrics", "checkpoint")


# ----------------------------------------------------------------------------- the manifest


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
        description=f"Settings shared by all stages: any of {', '.join(SECTIONS)}.",
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
        unknown = sorted(set(v) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown keys {unknown}; allowed: {', '.join(SECTIONS)}")
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
    name: str = Field(pattern=DNS_LABEL, max_length=40)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class TaskStream(Schema):
    api_version: Literal["fastslow.io/v1alpha1"]
    kind: Literal["TaskStream"]
    metadata: ObjectMeta
    spec: TaskStreamSpec


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
    start_model: str | None = None,
    start_population: list[str] | None = None,
) -> TrainConfig:
    """The TrainConfig of one stage: stream defaults < stage settings < hand-over."""
    spec = stream.spec
    raw: dict[str, Any] = copy.deepcopy(spec.defaults)
    for section in SECTIONS:
        value = getattr(stage, section)
        if value is not None:
            raw = _deep_merge(raw, {section: value})
    model = spec.model.model_dump(mode="json", by_alias=True)
    if start_model is not None:
        model["name"] = start_model
        model["reference"] = spec.model.reference or spec.model.name
    raw.update(
        run=run_name,
        steps=stage.steps,
        task=stage.task.model_dump(mode="json", by_alias=True),
        model=model,
        outputDir=str(Path(spec.output_dir) / stream.metadata.name),
    )
    if start_population:
        raw = _deep_merge(raw, {"fast": {"initialPopulation": start_population}})
    return TrainConfig.model_validate(raw)


def load_stream(path: str | Path) -> TaskStream:
    """Parse and validate a TaskStream file; every error names its field (and the file)."""
    raw = read_yaml(path)
    try:
        stream = TaskStream.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from None
    # Each stage must also make a valid run once merged with the defaults.
    for i, stage in enumerate(stream.spec.stages):
        try:
            stage_config(stream, stage, run_name=f"{stream.metadata.name}-{stage.name}")
        except ValidationError as e:
            raise ConfigError(
                format_validation_error(e, f"{path}: spec.stages.{i} ({stage.name})")
            ) from None
    return stream


# ----------------------------------------------------------------------------- stream state


def source_fingerprint(task: TaskConfig) -> str | None:
    """A content hash of the stage's data source, or None for generated tasks."""
    path = task.params.get("path")
    if task.name != "jsonl" or not path:
        return None
    if str(path).startswith("s3://"):
        from fst.store.s3 import s3_prefix_fingerprint

        return s3_prefix_fingerprint(str(path))
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else None


@dataclass
class StreamState:
    """stream.json: one entry per stage run, in the order they ran."""

    path: Path
    entries: list[dict[str, Any]]

    @staticmethod
    def load(path: Path) -> StreamState:
        if path.is_file():
            return StreamState(path, json.loads(path.read_text())["stages"])
        return StreamState(path, [])

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"stages": self.entries}, indent=1))
        tmp.replace(self.path)

    def last_succeeded(self) -> dict[str, Any] | None:
        done = [e for e in self.entries if e["status"] == "succeeded"]
        return done[-1] if done else None


def next_stage(
    stream: TaskStream,
    state: StreamState,
    fingerprint_of: Callable[[TaskConfig], str | None] = source_fingerprint,
) -> tuple[StageSpec, dict[str, Any]] | None:
    """The next stage to run and its state entry (new or an interrupted one); None if none.

    In manifest order, a stage needs a run when it never succeeded, or when its data source's
    fingerprint differs from the one its latest successful run trained on. The operator
    plans a cluster's stream with the same function (operator/fst_operator/handlers.py).
    """
    for stage in stream.spec.stages:
        runs = [e for e in state.entries if e["stage"] == stage.name]
        fingerprint = fingerprint_of(stage.task)
        if runs and runs[-1]["status"] != "succeeded":
            return stage, runs[-1]  # interrupted: continue it
        if runs and (fingerprint is None or runs[-1]["source"] == fingerprint):
            continue
        version = len(runs) + 1
        name = stage.name if version == 1 else f"{stage.name}-v{version}"
        start = state.last_succeeded()
        entry = {
            "stage": stage.name,
            "name": name,
            "run": f"{stream.metadata.name}-{name}"[:63].rstrip("-"),
            "version": version,
            "source": fingerprint,
            "status": "pending",
            "start_checkpoint": start["checkpoint"] if start else None,
            "start_population": start["population"] if start else None,
        }
        return stage, entry
    return None


# ----------------------------------------------------------------------------- running


class StreamRunner:
    """Runs a stream's stages; keeps the base model loaded for the evaluations."""

    def __init__(self, stream: TaskStream, progress: bool = True) -> None:
        self.stream, self.progress = stream, progress
        self.dir = Path(stream.spec.output_dir) / stream.metadata.name
        self.state = StreamState.load(self.dir / "stream.json")
        self._base: Any = None

    def run_pending(self) -> int:
        """Run every stage that needs a run; returns how many ran."""
        ran = 0
        while (nxt := next_stage(self.stream, self.state)) is not None:
            stage, entry = nxt
            self.run_stage(stage, entry)
            ran += 1
        return ran

    def run_stage(self, stage: StageSpec, entry: dict[str, Any]) -> None:
        from fst.loop import train

        if entry not in self.state.entries:
            self.state.entries.append(entry)
        entry.update(status="running", started=entry.get("started") or time.time())
        self.state.save()
        cfg = stage_config(
            self.stream, stage, entry["run"], entry["start_checkpoint"], entry["start_population"]
        )
        log.info(
            "stage %s: run %s, %d steps, from %s",
            entry["name"],
            entry["run"],
            cfg.steps,
            entry["start_checkpoint"] or f"the base model {cfg.model.name}",
        )
        train(cfg, resume=True, progress=self.progress)
        folder, ckpt_state = _final_checkpoint(cfg)
        entry.update(
            checkpoint=str(folder),
            population=[p["text"] for p in ckpt_state["population"]],
            best_prompt_id=ckpt_state["population"][0]["id"],
        )
        entry["evaluation"] = self.evaluate(entry, folder, ckpt_state)
        entry.update(status="succeeded", finished=time.time())
        self.state.save()
        log.info("stage %s done: %s", entry["name"], json.dumps(entry["evaluation"]))

    def evaluate(self, entry: dict[str, Any], folder: Path, ckpt_state: dict) -> dict[str, Any]:
        """Retention on every stage so far and the channel decomposition on this one."""
        n = self.stream.spec.eval_problems
        if n == 0:
            return {}
        from fst.evaluate import channel_decomposition, evaluate_prompt
        from fst.loop import load_task
        from fst.model import load_policy, load_tokenizer, stop_token_ids
        from fst.rollout.hf import HFRolloutEngine
        from fst.run_state import load_weights_into

        spec = self.stream.spec
        tok = load_tokenizer(spec.model)
        if self._base is None:
            self._base = load_policy(spec.model)
        trained = load_policy(spec.model)
        load_weights_into(trained, folder)
        stop = stop_token_ids(tok, trained)
        cfg = stage_config(self.stream, self._stage(entry["stage"]), entry["run"])
        max_new_tokens = cfg.rollout.max_new_tokens
        best = ckpt_state["population"][0]["text"]
        trained_engine = HFRolloutEngine(trained, tok, stop)
        retention = {}
        seen = []
        for e in self.state.entries:
            if e["stage"] in seen or (e["status"] != "succeeded" and e is not entry):
                continue
            seen.append(e["stage"])
            task = load_task(stage_config(self.stream, self._stage(e["stage"]), e["run"]))
            res = evaluate_prompt(
                trained_engine, tok, task, task.problems("test")[:n], best, max_new_tokens
            )
            retention[e["stage"]] = res.pass_rate
        task = load_task(cfg)
        dec = channel_decomposition(
            HFRolloutEngine(self._base, tok, stop),
            trained_engine,
            tok,
            task,
            task.problems("test")[:n],
            cfg.fast.seed_prompt,
            best,
            max_new_tokens,
        )
        return {
            "retention": retention,
            "decomposition": {f"{w}+{p}": r.pass_rate for w, p, r in dec.rows()},
            "n": n,
        }

    def _stage(self, name: str) -> StageSpec:
        return next(s for s in self.stream.spec.stages if s.name == name)


def _final_checkpoint(cfg: TrainConfig) -> tuple[Path, dict[str, Any]]:
    from fst.loop import latest_checkpoint

    folder = latest_checkpoint(cfg)
    if folder is None:
        raise RuntimeError(f"run {cfg.run} finished without a checkpoint")
    return folder, json.loads((folder / "state.json").read_text())


def run_stream(
    path: str | Path, watch: bool = False, progress: bool = True, max_polls: int | None = None
) -> Path:
    """`fst stream FILE [--watch]`. With watch, re-read the file and the data sources every
    `watchIntervalSeconds` and run what became pending; `max_polls` bounds that (tests)."""
    stream = load_stream(path)
    runner = StreamRunner(stream, progress)
    runner.run_pending()
    polls = 0
    while watch and (max_polls is None or polls < max_polls):
        time.sleep(stream.spec.watch_interval_seconds)
        polls += 1
        try:
            stream = load_stream(path)  # a stage may have been added
        except ConfigError as e:
            log.error("not reloading %s: %s", path, e)  # keep running the last valid spec
            continue
        runner.stream = stream
        if runner.run_pending():
            polls = 0
    return runner.dir
