"""Evaluation: pass rate of (weights, system prompt) on a split, greedy decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fst.model import chat_prompt_ids
from fst.rollout import RolloutEngine, SamplingParams
from fst.tasks import Problem, Task


@dataclass(frozen=True)
class EvalResult:
    reward_mean: float
    pass_rate: float
    n: int


def evaluate_prompt(
    engine: RolloutEngine,
    tokenizer,
    task: Task,
    problems: list[Problem],
    system_prompt: str,
    max_new_tokens: int,
) -> EvalResult:
    """Greedy completions of `problems` under `system_prompt`, scored by the task."""
    prompts = [chat_prompt_ids(tokenizer, system_prompt, p.prompt) for p in problems]
    params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, greedy=True)
    rollouts = engine.generate(prompts, params, torch.Generator().manual_seed(0))
    rewards = [task.score(p, r.text).reward for p, r in zip(problems, rollouts, strict=True)]
    n = len(rewards)
    return EvalResult(
        reward_mean=sum(rewards) / n if n else 0.0,
        pass_rate=sum(r >= 1.0 for r in rewards) / n if n else 0.0,
        n=n,
    )
