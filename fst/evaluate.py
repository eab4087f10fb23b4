"""Evaluation: pass rate of (weights, system prompt) on a split, greedy decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fst.model import chat_prompt_ids
from fst.rollout import RolloutEngine, SamplingParams
from fst.tasks import Problem, Task


@dataclass(frozen=True)
class EvalResult:
    reward_mean: float
    pass_rate: float
    n: int
    passed: tuple[bool, ...] = ()  # per problem, in order: what a paired bootstrap resamples


def evaluate_prompt(
    engine: RolloutEngine,
    tokenizer: PreTrainedTokenizerBase,
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
        passed=tuple(r >= 1.0 for r in rewards),
    )


@dataclass(frozen=True)
class Decomposition:
    """The paper's channel decomposition: which channel carries the gain."""

    base_seed: EvalResult  # base weights + seed prompt: where we started
    base_fst: EvalResult  # base weights + best evolved prompt: the fast channel alone
    trained_seed: EvalResult  # trained weights + seed prompt: the slow channel alone
    trained_fst: EvalResult  # trained weights + best evolved prompt: both together

    def rows(self) -> list[tuple[str, str, EvalResult]]:
        return [
            ("base", "seed prompt", self.base_seed),
            ("base", "FST prompt", self.base_fst),
            ("trained", "seed prompt", self.trained_seed),
            ("trained", "FST prompt", self.trained_fst),
        ]

    def table(self) -> str:
        lines = [f"{'weights':<8} {'prompt':<12} {'pass rate':>9} {'reward':>7}  n"]
        for w, p, r in self.rows():
            lines.append(f"{w:<8} {p:<12} {r.pass_rate:>9.3f} {r.reward_mean:>7.3f}  {r.n}")
        return "\n".join(lines)


def channel_decomposition(
    base_engine: RolloutEngine,
    trained_engine: RolloutEngine,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    problems: list[Problem],
    seed_prompt: str,
    fst_prompt: str,
    max_new_tokens: int,
) -> Decomposition:
    def ev(engine: RolloutEngine, prompt: str) -> EvalResult:
        return evaluate_prompt(engine, tokenizer, task, problems, prompt, max_new_tokens)

    return Decomposition(
        base_seed=ev(base_engine, seed_prompt),
        base_fst=ev(base_engine, fst_prompt),
        trained_seed=ev(trained_engine, seed_prompt),
        trained_fst=ev(trained_engine, fst_prompt),
    )
