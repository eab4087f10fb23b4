"""The promotion gate, measured: score a finished stage run and its promoted baseline, decide
(fst/promote.py), publish the bundle. One implementation for both executors of a TaskStream:

    `fst stream`   StreamRunner.run_stage calls StageGate.evaluate + publish in-process; its
                   scores are cached in stream.json
    the operator   creates a gate Job per finished stage run (fst_operator/builders.gate_job),
                   which runs `fst gate GATE.json` = run_gate_job: the same StageGate, its
                   scores cached in the database (table gate_scores), its decision written to
                   the stream's stages table, where the operator reads it into status

A score is a function of (weights, prompt, problems, generation length) under greedy decoding
(score_key), so a cache hit is exact: a gate killed mid-evaluation loses at most the score it
was measuring, and the promoted model's scores on earlier stages are reused from its own gate.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from fst.bundle import publish_bundle
from fst.config import TrainConfig
from fst.k8s.api import TaskStream
from fst.plan import StageRun, StageStatus, last_promoted, stage_config, stage_spec
from fst.promote import GateDecision, Score, decide

log = logging.getLogger(__name__)


class ScoreCache(Protocol):
    """Where measured scores are kept between kills: stream.json, or the database."""

    def get_score(self, key: str) -> Score | None: ...

    def put_score(self, key: str, score: Score) -> None: ...


def score_key(
    weights: str,
    prompt: str,
    task: dict[str, Any],
    data_version: str | None,
    n: int,
    max_new_tokens: int,
) -> str:
    """What a greedy score is a function of: the weights, the prompt, the problems (the task's
    settings and its data's version), how many, and the generation length."""
    what = [weights, prompt, task, data_version, n, max_new_tokens]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


class StageGate:
    """Scores (weights, prompt) pairs on a stream's stages and decides a stage run's gate.

    `runs` is the stream's history (StageRuns, oldest first, with their gates); the base
    model is loaded once and kept, a checkpoint's weights one at a time."""

    def __init__(self, stream: TaskStream, runs: list[StageRun], cache: ScoreCache) -> None:
        self.stream, self.runs, self.cache = stream, runs, cache
        self._base: Any = None
        self._tokenizer: Any = None
        self._loaded: dict[str, Any] = {}

    def evaluate(
        self, run: StageRun, cfg: TrainConfig
    ) -> tuple[GateDecision | None, dict[str, Any]]:
        """The gate of a finished run (its checkpoint and population set), and the numbers the
        report shows: retention on every stage so far and the channel decomposition on this one.

        The candidate (this run's final weights + its best prompt) and the promoted model (the
        newest promoted run's, else the base model with the seed prompt) are scored on this
        stage's test split and on every earlier stage's retention set. None when the stream
        evaluates nothing (`evalProblems: 0`)."""
        if self.stream.spec.eval_problems == 0:
            return None, {}
        before = self.runs[: self.runs.index(run)]
        done = [r for r in before if r.status == StageStatus.SUCCEEDED and r.stage != run.stage]
        stages = [*dict.fromkeys(r.stage for r in done), run.stage]
        assert run.checkpoint is not None and run.population
        best, seed = run.population[0], cfg.fast.seed_prompt
        promoted = last_promoted(before)
        if promoted is not None and promoted.checkpoint and promoted.population:
            baseline: tuple[str | None, str] = (promoted.checkpoint, promoted.population[0])
        else:
            baseline = (None, seed)
        candidate = {stage: self.score(run.checkpoint, best, stage) for stage in stages}
        served = {stage: self.score(*baseline, stage) for stage in stages}
        decision = decide(self.stream.spec.promotion, run.stage, candidate, served)
        decomposition = {
            "base+seed prompt": self.score(None, seed, run.stage),
            "base+FST prompt": self.score(None, best, run.stage),
            "trained+seed prompt": self.score(run.checkpoint, seed, run.stage),
            "trained+FST prompt": candidate[run.stage],
        }
        evaluation = {
            "retention": {stage: candidate[stage].pass_rate for stage in stages},
            "decomposition": {k: v.pass_rate for k, v in decomposition.items()},
            "n": candidate[run.stage].n,  # the stage's test split may hold fewer
        }
        return decision, evaluation

    def score(self, weights: str | None, prompt: str, stage: str) -> Score:
        """Greedy pass rate of (weights: a checkpoint URI, None = the base model; prompt) on
        the first `evalProblems` test problems of `stage`'s newest data; cached."""
        from fst.evaluate import evaluate_prompt
        from fst.loop import load_task

        latest = [r for r in self.runs if r.stage == stage][-1]
        cfg = stage_config(self.stream, stage_spec(self.stream, stage), latest.run)
        n = self.stream.spec.eval_problems
        key = score_key(
            weights or f"base:{self.stream.spec.model.name}",
            prompt,
            cfg.task.model_dump(mode="json"),
            latest.source,
            n,
            cfg.rollout.max_new_tokens,
        )
        cached = self.cache.get_score(key)
        if cached is not None:
            return cached
        task = load_task(cfg)
        engine, tok = self._engine(weights)
        result = evaluate_prompt(
            engine, tok, task, task.problems("test")[:n], prompt, cfg.rollout.max_new_tokens
        )
        score = Score(pass_rate=result.pass_rate, n=result.n)
        self.cache.put_score(key, score)
        log.info(
            "gate: measured %s with %s on %s: %s",
            weights or "the base model",
            "the seed prompt" if prompt == cfg.fast.seed_prompt else "an evolved prompt",
            stage,
            score,
        )
        return score

    def _engine(self, weights: str | None) -> tuple[Any, Any]:
        """A greedy rollout engine on the base model (kept) or on a checkpoint's weights (the
        last one kept: a gate scores one candidate and one promoted model at a time)."""
        from fst.model import AUTOCAST_DTYPES, load_policy, load_tokenizer, stop_token_ids
        from fst.rollout.hf import HFRolloutEngine

        spec = self.stream.spec
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(spec.model)
        tok = self._tokenizer
        if weights is None:
            if self._base is None:
                self._base = load_policy(spec.model)
            model = self._base
        else:
            if weights not in self._loaded:
                self._loaded.clear()  # free the previous one first
                # The checkpoint's model/ is the whole (merged, if LoRA) model: no adapters.
                cfg = spec.model.model_copy(update={"name": weights, "lora": None})
                self._loaded[weights] = load_policy(cfg)
            model = self._loaded[weights]
        dtype = AUTOCAST_DTYPES[spec.model.autocast]  # as the stage's own evals decode
        engine = HFRolloutEngine(model, tok, stop_token_ids(tok, model), autocast_dtype=dtype)
        return engine, tok

    # ------------------------------------------------------------------ the bundle

    def lineage(
        self, run: StageRun, cfg: TrainConfig, metrics: dict[int, dict[str, float | None]]
    ) -> dict[str, Any]:
        """fastslow.json of a run's bundle: where its weights and prompt come from. `metrics`:
        the run's metrics by step, as the database has them (the last KL to the base)."""
        index = self.runs.index(run)
        kls = [m["kl"] for _, m in sorted(metrics.items()) if m.get("kl") is not None]
        config = cfg.model_dump(mode="json", by_alias=True, exclude={"database"})
        return {
            "format": 1,
            "stream": self.stream.metadata.name,
            "stage": run.name,
            "run": run.run,
            "baseModel": self.stream.spec.model.reference or self.stream.spec.model.name,
            "startedFrom": run.start_checkpoint or "base",
            "checkpoint": run.checkpoint,
            "dataVersion": run.source,
            "configDigest": config_digest(config),
            "mode": cfg.mode,
            "steps": cfg.steps,
            "klToBase": kls[-1] if kls else None,  # the run's last measurement
            "gate": run.gate.model_dump(mode="json") if run.gate else None,
            "earlierStages": [
                {
                    "stage": r.name,
                    "run": r.run,
                    "dataVersion": r.source,
                    "promoted": r.promoted,
                    "checkpoint": r.checkpoint,
                }
                for r in self.runs[:index]
                if r.status == StageStatus.SUCCEEDED
            ],
        }

    def publish(
        self,
        run: StageRun,
        cfg: TrainConfig,
        folder: Path,
        metrics: dict[int, dict[str, float | None]],
    ) -> str | None:
        """The run's bundle URI once published (promoted, or not gated), else None."""
        if run.gate is not None and not run.gate.promoted:
            return None
        assert run.checkpoint is not None and run.population
        lineage = self.lineage(run, cfg, metrics)
        return publish_bundle(run.checkpoint, folder, run.population[0], lineage)


def config_digest(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- `fst gate`


class GateJob(BaseModel):
    """The input of `fst gate FILE` (the gate Job's ConfigMap): the stream as the operator
    read it, its history, and which run to gate."""

    model_config = ConfigDict(extra="forbid")

    stream: dict[str, Any] = Field(description="The TaskStream (apiVersion, kind, metadata, spec).")
    stream_key: str = Field(description="The stream's name in the database's stages table.")
    runs: list[StageRun] = Field(description="The stream's stage runs, oldest first.")
    run: str = Field(description="The run to gate: one of `runs`, succeeded.")
    run_keys: dict[str, str] = Field(
        default_factory=dict, description="A run's name -> its name in the database."
    )


class DatabaseScores:
    """ScoreCache in the database (table gate_scores)."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def get_score(self, key: str) -> Score | None:
        found = self.db.gate_score(key)
        return None if found is None else Score(pass_rate=found[0], n=found[1])

    def put_score(self, key: str, score: Score) -> None:
        self.db.save_gate_score(key, score.pass_rate, score.n)


def run_gate_job(job: GateJob, population_of: Callable[[str], list[str]]) -> GateDecision | None:
    """`fst gate`: gate one stage run of a cluster's stream, publish its bundle if promoted,
    and record the decision in the stages table (stream_key, the run's index). Idempotent: run
    again after a kill, it reuses every score measured and the bundle already published."""
    from fst.store.checkpoints import open_store, split_checkpoint_uri
    from fst.store.db import RunDB, database_url

    stream = TaskStream.model_validate(job.stream)
    runs = [r.model_copy() for r in job.runs]
    run = next(r for r in runs if r.run == job.run)
    if run.checkpoint is None:
        raise ValueError(f"run {run.run} has no checkpoint to gate")
    for r in runs:  # the candidate's and the baseline's prompts are in their checkpoints
        if r.checkpoint and r.population is None and (r is run or r.promoted):
            r.population = population_of(r.checkpoint)
    cfg = stage_config(stream, stage_spec(stream, run.stage), run.run)
    db = RunDB(database_url())
    used = [r.checkpoint for r in runs if r.checkpoint and (r is run or r.promoted)]
    try:
        db.upgrade()
        gate = StageGate(stream, runs, DatabaseScores(db))
        run.gate, _ = gate.evaluate(run, cfg)
        store_uri, step = split_checkpoint_uri(run.checkpoint)
        assert step is not None
        folder = open_store(store_uri).materialize(step)
        metrics = db.metrics(job.run_keys.get(run.run, run.run))
        run.bundle = gate.publish(run, cfg, folder, metrics)
        index = runs.index(run)
        db.start_stage(job.stream_key, index, run.name, job.run_keys.get(run.run, run.run))
        db.finish_stage(
            job.stream_key,
            index,
            checkpoint_uri=run.checkpoint,
            data_version=run.source,
            gate=run.gate.model_dump(mode="json") if run.gate else None,
            bundle_uri=run.bundle,
        )
    finally:
        db.close()
        _drop_downloads(used)
    if run.gate is not None:
        verdict = "promoted" if run.gate.promoted else f"REJECTED ({run.gate.reason})"
        log.info("stage %s %s: %s", run.name, verdict, run.gate.message)
    return run.gate


def _drop_downloads(checkpoints: list[str]) -> None:
    """Delete the local copies of the S3 checkpoints a gate downloaded (~2 GB each for
    SmolLM2 with its optimizer state): a finished pod's emptyDir stays on the node's disk until
    its Job is deleted, and the next gate downloads what it needs again (or not at all: every
    score cached, the bundle published)."""
    import shutil

    from fst.store.checkpoints import open_store, split_checkpoint_uri
    from fst.store.layout import step_name

    for uri in checkpoints:
        store_uri, step = split_checkpoint_uri(uri)
        if not uri.startswith("s3://") or step is None:
            continue
        root = getattr(open_store(store_uri), "download_root", None)
        if root is not None:
            shutil.rmtree(root / step_name(step), ignore_errors=True)
