"""What both trainers are given: one model, one problem sequence, one reward, one set of sizes.

Equal work is arranged here, in three ways:
  - the same prompts: fastslow draws its problems with `fst.loop.batch_indices`; TRL gets a
    dataset holding exactly that sequence, unshuffled, P problems per step;
  - the same number of generated tokens: every completion runs to `max_new_tokens` on both
    sides (fastslow: the engine's stop set is emptied; TRL: `min_new_tokens = max_new_tokens`,
    i.e. transformers masks EOS until then), so a step generates exactly P·G·N tokens;
  - the same number of trained tokens: the reward is the task's reward plus a tiny
    deterministic tie-break from the completion's text (< 1e-3), so no group has zero reward
    variance. fastslow skips zero-advantage rollouts (they carry no gradient) and TRL does not;
    without the tie-break, fastslow would train on fewer tokens and the comparison would
    flatter it.
Each worker reports a hash of its prompt token ids and its generated/trained token counts per
step; the orchestrator checks they are equal.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fst.config import TrainConfig
from fst.loop import batch_indices
from fst.tasks import Problem, Task


@dataclass(frozen=True)
class BenchSettings:
    model: str = "smollm2-135m-instruct"
    task: str = "arithmetic"
    task_params: dict[str, Any] = field(
        default_factory=lambda: {"steps": 1, "maxOperand": 20, "answerFormat": "last_number"}
    )
    problems_per_step: int = 4  # P
    group_size: int = 8  # G
    max_new_tokens: int = 128  # N: every completion has exactly N tokens (see above)
    temperature: float = 1.0
    top_p: float = 1.0
    micro_batch_size: int = 8
    lr: float = 1e-5
    eps_max: float = 5.0
    # fp32: both trainers compute in float32. bf16: both run their matmuls in bfloat16 with
    # float32 master weights (fastslow model.autocast: bfloat16, TRL bf16=True).
    precision: str = "fp32"
    seed: int = 0
    warmup: int = 1  # steps per trainer not measured (first step: allocator, caches, setup)
    measured: int = 5  # measured steps per trainer
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    # On a shared machine another process may take the cores for part of a step. A measured
    # pair in which either trainer averaged fewer than min_cpu_share * threads busy cores is
    # measured again, at most contention_retries times over the run (see __main__).
    contention_retries: int = 3
    min_cpu_share: float = 0.8
    # fastslow sets glibc's malloc to keep freed large blocks (fst.loop.keep_freed_memory);
    # TRL does not. True gives TRL's process the same setting, to see what it is worth there.
    trl_keep_freed_memory: bool = False

    @property
    def total_steps(self) -> int:
        return self.warmup + self.measured

    @property
    def max_steps(self) -> int:
        """Steps a trainer may be asked for, re-run pairs included."""
        return self.total_steps + self.contention_retries

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_config(s: BenchSettings, output_dir: Path) -> TrainConfig:
    """fastslow's config for the benchmark: mode rl, no KL probe (TRL runs with beta=0 and no
    reference model either), no checkpoints inside the measured steps."""
    return TrainConfig.model_validate(
        {
            "run": "bench-speed",
            "mode": "rl",
            "steps": s.max_steps + 1,
            "seed": s.seed,
            "outputDir": str(output_dir),
            "model": {
                "name": s.model,
                "autocast": "bfloat16" if s.precision == "bf16" else "none",
            },
            "task": {"name": s.task, "params": s.task_params},
            "rollout": {
                "temperature": s.temperature,
                "topP": s.top_p,
                "maxNewTokens": s.max_new_tokens,
                "batchSize": s.problems_per_step * s.group_size,
            },
            "slow": {
                "loss": "cispo",
                "epsMax": s.eps_max,
                "problemsPerStep": s.problems_per_step,
                "groupSize": s.group_size,
                "lr": s.lr,
                "microBatchSize": s.micro_batch_size,
                "gradClip": 1.0,
                "weightDecay": 0.0,
                "warmupSteps": 0,
            },
            "metrics": {"klPrompts": 0},
            "checkpoint": {"every": 10_000},
        }
    )


def problem_sequence(s: BenchSettings, task: Task, steps: int) -> list[int]:
    """Indices into the train split of the problems of `steps` steps, in fastslow's order."""
    cfg = train_config(s, Path("."))
    n = len(task.problems("train"))
    return batch_indices(0, steps * s.problems_per_step, n, cfg.task.seed)


def tie_break(text: str) -> float:
    """A deterministic value in [0, 1e-3) from the completion text (see the module docstring)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32 * 1e-3


def bench_reward(task: Task, problem: Problem, text: str) -> float:
    return task.score(problem, text).reward + tie_break(text)


def prompts_hash(prompts: list[list[int]]) -> str:
    """Hash of a step's prompt token ids, in rollout order (problem-major)."""
    return hashlib.sha256(json.dumps([[int(t) for t in p] for p in prompts]).encode()).hexdigest()
