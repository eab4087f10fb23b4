"""fastslow's side of the benchmark: `fst.loop.rl_step` itself, on the settings' problems."""

from __future__ import annotations

import shutil
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.speed.settings import BenchSettings, bench_reward, prompts_hash, train_config
from fst.loop import build_run, rl_step
from fst.tasks import Problem, Score, Task


class TieBrokenTask:
    """The run's task with the benchmark's reward (task reward + tie-break, see settings)."""

    def __init__(self, task: Task) -> None:
        self.task, self.name = task, task.name

    def problems(self, split: str) -> list[Problem]:
        return self.task.problems(split)

    def score(self, problem: Problem, completion: str) -> Score:
        s = self.task.score(problem, completion)
        return Score(bench_reward(self.task, problem, completion), s.feedback)


class FastslowSide:
    def __init__(self, settings: BenchSettings) -> None:
        self.settings = settings
        self.tmp = Path(tempfile.mkdtemp(prefix="fst-bench-speed-"))
        cfg = train_config(settings, self.tmp)
        self.fst_run = build_run(cfg, cfg.run_dir)
        self.fst_run.task = TieBrokenTask(self.fst_run.task)
        # Every completion runs to max_new_tokens (equal work with TRL, see settings).
        self.fst_run.engine.stop_ids = []
        self._instrument_generation()

    def _instrument_generation(self) -> None:
        """Time the decoding itself (rl_step's gen_s also includes prompt building and
        scoring) and hash the prompts, without changing what generate does."""
        engine, original = self.fst_run.engine, self.fst_run.engine.generate
        self.step_info: dict[str, Any] = {}

        def generate(prompts, params, generator):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            out = original(prompts, params, generator)
            self.step_info["decode_s"] = time.perf_counter() - t0
            self.step_info["prompts_hash"] = prompts_hash(prompts)
            return out

        engine.generate = generate

    def describe(self) -> dict[str, Any]:
        from bench.speed.peak import matmul_params

        return {"trainer": "fastslow", "matmul_params": matmul_params(self.fst_run.policy)}

    def run(self, conn: Connection, meter: Any) -> None:
        while conn.recv() == "step":
            self.step_info = {}
            meter.start()
            record = rl_step(self.fst_run)
            self.fst_run.sink.write(record)  # what fst train does after every step
            m = meter.stop()
            conn.send(
                {
                    **m,
                    "rollout_s": record["gen_s"],  # prompts + generation + scoring
                    "decode_s": self.step_info["decode_s"],
                    "gen_tokens": int(record["gen_tokens"]),
                    "trained_tokens": int(record["trained_tokens"]),
                    "loss": record["loss"],
                    "prompts_hash": self.step_info["prompts_hash"],
                }
            )

    def close(self) -> None:
        self.fst_run.sink.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
