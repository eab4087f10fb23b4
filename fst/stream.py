"""Task streams on one machine: `fst stream FILE` runs a TaskStream's stages in order.

A TaskStream manifest (the same file a user later `kubectl apply`s; its models are in
fst/k8s/api.py) names a base model, stream defaults, and stages. What runs next, under which
name and from which checkpoint and population, is decided by the planner shared with the
operator (fst/plan.py); this module runs the plan on this machine:

    stage 1 starts from the base model and the task-agnostic seed prompt
    stage n starts from stage n-1's final checkpoint AND (modes fst, gepa) the population
    saved in it
    after each stage: retention on every earlier stage's test set, and the channel
    decomposition on its own test set -> stream.json

What starts a new stage: a stage added to the file, or new data in a stage's source (a jsonl
file whose content hash changed): the stage then runs again as `<name>-v2`, `-v3`, ... from the
latest checkpoint. State lives in `<outputDir>/<stream>/stream.json` (written atomically), so
running the command again resumes: finished stages are skipped and an interrupted stage
continues from its last checkpoint. A stage's entry is written when its run has started
training (a data file that is missing, a model that does not load leave stream.json as it was);
a run that fails after that is marked `failed` with the reason, and retried by the next
`fst stream`. Stages that have run may not be renamed or reordered (fst.plan.check_history).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from fst.config import ConfigError, TrainConfig, format_validation_error, read_yaml
from fst.gate import StageGate
from fst.handover import checkpoint_population, source_fingerprint
from fst.k8s.api import TaskStream
from fst.plan import (
    StageRun,
    StageStatus,
    check_history,
    check_stages,
    serving_run,
    stage_config,
    stage_spec,
)
from fst.plan import next_stage as plan_next_stage
from fst.promote import Score

if TYPE_CHECKING:
    from fst.store.db import RunDB

log = logging.getLogger(__name__)

__all__ = ["StreamRunner", "StreamState", "load_stream", "run_stream"]


def load_stream(path: str | Path) -> TaskStream:
    """Parse and validate a TaskStream file; every error names its field (and the file)."""
    raw = read_yaml(path, "stream manifest")
    try:
        stream = TaskStream.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from None
    check_stages(stream, str(path))
    return stream


# ----------------------------------------------------------------------------- stream state


@dataclass
class StreamState:
    """stream.json: one StageRun per stage run, in the order they ran, and the scores the
    gates measured (key: fst.gate.score_key), saved one by one, so that an evaluation killed
    half-way resumes where it stopped."""

    path: Path
    runs: list[StageRun]
    scores: dict[str, Score] = field(default_factory=dict)

    @staticmethod
    def load(path: Path) -> StreamState:
        if not path.is_file():
            return StreamState(path, [])
        try:
            doc = json.loads(path.read_text())
            # `name` is derived (StageRun.name), written for people and the report.
            runs = [
                StageRun.model_validate({k: v for k, v in e.items() if k != "name"})
                for e in doc["stages"]
            ]
            scores = {k: Score.model_validate(v) for k, v in (doc.get("scores") or {}).items()}
            return StreamState(path, runs, scores)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"{path}: not a stream state file this version can read ({e}); move it away "
                "to start the stream over"
            ) from None

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        entries = [{"name": r.name, **r.model_dump(mode="json")} for r in self.runs]
        scores = {k: v.model_dump(mode="json") for k, v in self.scores.items()}
        tmp.write_text(json.dumps({"stages": entries, "scores": scores}, indent=1))
        tmp.replace(self.path)

    def get_score(self, key: str) -> Score | None:
        return self.scores.get(key)

    def put_score(self, key: str, score: Score) -> None:
        self.scores[key] = score
        self.save()  # one score at a time: a kill loses at most the one being measured


def next_stage(stream: TaskStream, state: StreamState) -> StageRun | None:
    """The next stage run of this machine's stream (fst.plan.next_stage on stream.json)."""
    return plan_next_stage(stream, state.runs, source_fingerprint, checkpoint_population)


# ----------------------------------------------------------------------------- running


class StreamRunner:
    """Runs a stream's stages; keeps the base model loaded for the evaluations."""

    def __init__(self, stream: TaskStream, progress: bool = True, source: str = "<stream>") -> None:
        from fst.loop import check_output_dir

        self.stream, self.progress, self.source = stream, progress, source
        check_output_dir(stream.spec.output_dir, "spec.outputDir")
        self.dir = Path(stream.spec.output_dir) / stream.metadata.name
        self.state = StreamState.load(self.dir / "stream.json")
        # The gate (fst/gate.py): its scores cached in stream.json, its models kept loaded.
        self.gates = StageGate(stream, self.state.runs, self.state)

    def check(self, stream: TaskStream) -> None:
        """`stream` (the manifest, maybe edited) against the history in stream.json: a
        ConfigError names a stage that was renamed, removed or moved after it ran."""
        check_history(stream, self.state.runs, self.source)

    def run_pending(self) -> int:
        """Run every stage that needs a run; returns how many ran."""
        self.check(self.stream)
        self.gates.stream = self.stream  # `--watch` may have reloaded the manifest
        ran = 0
        while (run := next_stage(self.stream, self.state)) is not None:
            self.run_stage(run)
            ran += 1
        self.write_serving()  # a pin added or removed changes it without a stage running
        return ran

    def run_stage(self, run: StageRun) -> None:
        from fst.loop import train

        stage = stage_spec(self.stream, run.stage)
        try:
            cfg = stage_config(
                self.stream, stage, run.run, run.start_checkpoint, run.start_population
            )
        except ValidationError as e:  # e.g. an inherited prompt over the size limit
            where = f"{self.source}: stage {run.name} (run {run.run})"
            raise ConfigError(format_validation_error(e, where)) from None
        log.info(
            "stage %s: run %s, %d steps, from %s%s",
            run.name,
            run.run,
            cfg.steps,
            run.start_checkpoint or f"the base model {cfg.model.name}",
            f" with {len(run.start_population)} inherited prompt(s)"
            if run.start_population
            else "",
        )
        db = _database(cfg)

        def on_start() -> None:
            # Only now is the stage running: an error before (a missing data file, a model that
            # does not load) leaves a new stage out of stream.json and the database.
            if run not in self.state.runs:
                self.state.runs.append(run)
            run.status = StageStatus.RUNNING
            run.started = run.started or time.time()
            run.error = None
            self.state.save()
            db.start_stage(self.stream.metadata.name, self.state.runs.index(run), run.name, run.run)

        try:
            if run in self.state.runs and _trained(cfg):
                # Killed after training, during the gate: go straight back to it (building the
                # run to find nothing left to train took longer than some kill intervals).
                log.info("stage %s: %s has trained its %d steps", run.name, run.run, cfg.steps)
                on_start()
            else:
                train(cfg, resume=True, progress=self.progress, on_start=on_start)
            folder, uri = _final_checkpoint(cfg)
            ckpt_state = json.loads((folder / "state.json").read_text())
            run.checkpoint = uri
            run.population = checkpoint_population(uri)  # what the next stage will inherit
            run.best_prompt_id = ckpt_state["population"][0]["id"]
            run.gate, run.evaluation = self.gates.evaluate(run, cfg)
            run.bundle = self.gates.publish(run, cfg, folder, db.metrics(run.run))
        except Exception as e:
            if run in self.state.runs:  # it ran (now or in an earlier attempt): say why it failed
                self._failed(run, e, db)
            db.close()
            if isinstance(e, ConfigError):  # name the stage: the manifest has several
                raise ConfigError(f"{self.source}: stage {run.name} (run {run.run}): {e}") from e
            raise
        run.status = StageStatus.SUCCEEDED
        run.finished = time.time()
        self.state.save()
        index = self.state.runs.index(run)
        version = db.latest_population(run.run)
        db.finish_stage(
            self.stream.metadata.name,
            index,
            checkpoint_uri=uri,
            population_version=version.version if version else None,
            data_version=run.source,
            gate=run.gate.model_dump(mode="json") if run.gate else None,
            bundle_uri=run.bundle,
        )
        db.close()
        if run.gate is not None:
            verdict = "promoted" if run.gate.promoted else f"REJECTED ({run.gate.reason})"
            log.info("stage %s %s: %s", run.name, verdict, run.gate.message)
        self.write_serving()

    def _failed(self, run: StageRun, error: Exception, db: RunDB) -> None:
        """Mark `run` failed in stream.json (and the database) with a one-line reason; the next
        `fst stream` retries it from its latest checkpoint."""
        from fst.config import redact_url

        reason = redact_url(" ".join(str(error).split()) or type(error).__name__)
        run.status = StageStatus.FAILED
        run.error = reason[:500]
        run.finished = None
        self.state.save()
        try:
            db.finish_stage(self.stream.metadata.name, self.state.runs.index(run), "failed")
        except Exception as e:  # the database may be why we are here: keep the first error
            log.warning("stage %s: could not record its failure: %s", run.name, e)

    def write_serving(self) -> dict[str, Any]:
        """`<stream>/serving.json`: what is served now (fst.plan.serving_run: the newest
        promoted bundle, or the pinned stage's), what a deployment reads."""
        pin = self.stream.spec.serving.pin
        serving = serving_run(self.state.runs, pin)
        if serving is None and pin is not None:
            # A pin names a stage in the manifest that has no promoted run (yet): keep serving
            # the newest promoted bundle, and say so.
            log.warning(
                "serving.pin: stage %s has no promoted bundle; serving the newest promoted one",
                pin,
            )
            serving = serving_run(self.state.runs, None)
        if serving is None:
            doc: dict[str, Any] = {
                "stage": None,
                "model": self.stream.spec.model.name,
                "systemPrompt": None,
                "bundle": None,
                "pinned": pin,
            }
        else:
            doc = {
                "stage": serving.name,
                "run": serving.run,
                "model": serving.bundle,
                "bundle": serving.bundle,
                "systemPrompt": serving.population[0] if serving.population else None,
                "pinned": pin,
            }
        path = self.dir / "serving.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(path)
        return doc


def lineage_rows(runs: list[StageRun]) -> list[dict[str, Any]]:
    """One row per stage run for `fst lineage`: what it started from, its data version, its
    gate's decision and scores, its bundle."""
    by_checkpoint = {r.checkpoint: r.name for r in runs if r.checkpoint}
    rows = []
    for r in runs:
        gate = r.gate
        if gate is None:
            decision = "-" if r.status != StageStatus.SUCCEEDED else "not gated"
            scores = None
        else:
            decision = ("promoted " if gate.promoted else "rejected ") + gate.reason
            ns = {score.n for score in gate.candidate.values()}
            scores = ", ".join(
                f"{stage} {gate.baseline[stage].pass_rate:.3f}->{score.pass_rate:.3f}"
                + ("" if len(ns) == 1 else f" (n={score.n})")
                for stage, score in gate.candidate.items()
            ) + (f" (n={ns.pop()})" if len(ns) == 1 else "")
        start = r.start_checkpoint
        rows.append(
            {
                "stage": r.name,
                "run": r.run,
                "status": str(r.status),
                "from": "base" if start is None else by_checkpoint.get(start, start),
                "dataVersion": r.source,
                "decision": decision,
                "scores": scores,
                "bundle": r.bundle,
                "gate": gate.model_dump(mode="json") if gate else None,
            }
        )
    return rows


def _database(cfg: TrainConfig) -> RunDB:
    """The database the stage's run records into (its `database`, else $FST_DATABASE_URL, else
    <outputDir>/fst.db): the stream's stages are recorded next to their runs."""
    from fst.store.db import RunDB, database_url

    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)  # where the default SQLite file goes
    db = RunDB(database_url(cfg.database, Path(cfg.output_dir) / "fst.db"))
    db.upgrade()  # the stages table may be the first this database gets (as train() does)
    return db


def _trained(cfg: TrainConfig) -> bool:
    """The run has a checkpoint of its last step: nothing is left to train."""
    from fst.loop import checkpoint_store
    from fst.store.checkpoints import latest_step

    return latest_step(checkpoint_store(cfg)) == cfg.final_step


def _final_checkpoint(cfg: TrainConfig) -> tuple[Path, str]:
    """(a local folder with the run's final checkpoint, that checkpoint's URI)."""
    from fst.loop import latest_checkpoint

    folder = latest_checkpoint(cfg)
    if folder is None:
        raise RuntimeError(f"run {cfg.run} finished without a checkpoint")
    store_uri = cfg.checkpoint.uri or str(cfg.run_dir / "checkpoints")
    return folder, f"{store_uri.rstrip('/')}/{folder.name}"


def run_stream(
    path: str | Path, watch: bool = False, progress: bool = True, max_polls: int | None = None
) -> Path:
    """`fst stream FILE [--watch]`. With watch, re-read the file and the data sources every
    `watchIntervalSeconds` and run what became pending; `max_polls` bounds that (tests)."""
    stream = load_stream(path)
    runner = StreamRunner(stream, progress, str(path))
    runner.run_pending()
    polls = 0
    while watch and (max_polls is None or polls < max_polls):
        time.sleep(stream.spec.watch_interval_seconds)
        polls += 1
        try:
            stream = load_stream(path)  # a stage may have been added
            runner.check(stream)
        except ConfigError as e:
            log.error("not reloading %s: %s", path, e)  # keep running the last valid spec
            continue
        runner.stream = stream
        if runner.run_pending():
            polls = 0
    return runner.dir
