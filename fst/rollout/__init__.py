"""Rollout engines: turn prompt token ids into sampled completions with their logprobs.

The slow channel needs, for every completion token, the log-probability the SAMPLER gave it
(π_old in CISPO's importance ratio ρ = π_θ / π_old). Engines return exactly that, so the
trainer never has to re-run a forward pass just to recover π_old.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias

import torch

# The random stream a generate call draws from: one generator for the whole call (the run's:
# checkpoints save it), or one per prompt, so that each row's sample depends only on its own
# generator and not on what else is in the batch (GEPA's evaluations batch several candidates
# into one call and compare them on the same noise per problem).
Generators: TypeAlias = torch.Generator | Sequence[torch.Generator]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    greedy: bool = False  # argmax decoding (evaluation); logprobs are still of the tempered dist.


@dataclass
class Rollout:
    """One sampled completion.

    `logprobs[t]` is log π_sampler(completion_ids[t] | prefix) under the distribution it was
    drawn from: temperature-scaled, renormalised over the top-p nucleus when top_p < 1 (greedy
    decoding: the temperature-scaled one). `finished` is False when max_new_tokens cut it.
    The stop token, when produced, is the last entry of completion_ids (it is trained on: the
    policy must learn when to stop) but is not part of `text`.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    text: str
    finished: bool


class RolloutEngine(Protocol):
    # The token id that pads packed batches of this engine's rollouts (the trainer's and the
    # KL probe's forward passes): the tokenizer's pad id, else the first stop id.
    pad_id: int

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, generator: Generators
    ) -> list[Rollout]:
        """Sample one completion per prompt (repeat a prompt to get several). `generator`:
        one for the call, or a sequence with one per prompt (see Generators)."""
        ...

    def sync_weights(self) -> None:
        """Make the engine sample from the policy's current weights (no-op if shared)."""
        ...
