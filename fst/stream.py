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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from fst.config import ConfigError, TrainConfig, format_validation_error, read_yaml
from fst.handover import checkpoint_population, source_fingerprint
from fst.k8s.api import TaskStream
from fst.plan import (
    StageRun,
    StageStatus,
    check_history,
    check_stages,
    stage_config,
    stage_spec,
)
from fst.plan import next_stage as plan_next_stage

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
    """stream.json: one StageRun per stage run, in the order they ran."""

    path: Path
    runs: list[StageRun]

    @staticmethod
    def load(path: Path) -> StreamState:
        if not path.is_file():
            return StreamState(path, [])
        try:
            raw = json.loads(path.read_text())["stages"]
            # `name` is derived (StageRun.name), written for people and the report.
            runs = [
                StageRun.model_validate({k: v for k, v in e.items() if k != "name"}) for e in raw
            ]
            return StreamState(path, runs)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"{path}: not a stream state file this version can read ({e}); move it away "
                "to start the stream over"
            ) from None

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        entries = [{"name": r.name, **r.model_dump(mode="json")} for r in self.runs]
        tmp.write_text(json.dumps({"stages": entries}, indent=1))
        tmp.replace(self.path)


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
        self._base: Any = None

    def check(self, stream: TaskStream) -> None:
        """`stream` (the manifest, maybe edited) against the history in stream.json: a
        ConfigError names a stage that was renamed, removed or moved after it ran."""
        check_history(stream, self.state.runs, self.source)

    def run_pending(self) -> int:
        """Run every stage that needs a run; returns how many ran."""
        self.check(self.stream)
        ran = 0
        while (run := next_stage(self.stream, self.state)) is not None:
            self.run_stage(run)
            ran += 1
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
            train(cfg, resume=True, progress=self.progress, on_start=on_start)
            folder, uri = _final_checkpoint(cfg)
            ckpt_state = json.loads((folder / "state.json").read_text())
            run.checkpoint = uri
            run.population = checkpoint_population(uri)  # what the next stage will inherit
            run.best_prompt_id = ckpt_state["population"][0]["id"]
            run.evaluation = self.evaluate(run, folder, ckpt_state)
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
        )
        db.close()
        log.info("stage %s done: %s", run.name, json.dumps(run.evaluation))

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

    def evaluate(self, run: StageRun, folder: Path, ckpt_state: dict[str, Any]) -> dict[str, Any]:
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
        cfg = stage_config(self.stream, stage_spec(self.stream, run.stage), run.run)
        max_new_tokens = cfg.rollout.max_new_tokens
        best = ckpt_state["population"][0]["text"]
        trained_engine = HFRolloutEngine(trained, tok, stop)
        retention = {}
        seen: list[str] = []
        for other in self.state.runs:
            if other.stage in seen or (other.status != StageStatus.SUCCEEDED and other is not run):
                continue
            seen.append(other.stage)
            task = load_task(
                stage_config(self.stream, stage_spec(self.stream, other.stage), other.run)
            )
            res = evaluate_prompt(
                trained_engine, tok, task, task.problems("test")[:n], best, max_new_tokens
            )
            retention[other.stage] = res.pass_rate
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


def _database(cfg: TrainConfig) -> RunDB:
    """The database the stage's run records into (its `database`, else $FST_DATABASE_URL, else
    <outputDir>/fst.db): the stream's stages are recorded next to their runs."""
    from fst.store.db import RunDB, database_url

    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)  # where the default SQLite file goes
    db = RunDB(database_url(cfg.database, Path(cfg.output_dir) / "fst.db"))
    db.upgrade()  # the stages table may be the first this database gets (as train() does)
    return db


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
