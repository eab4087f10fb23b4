"""Group-relative advantages: one group per problem, across ALL of its rollouts.

In FST a problem's G rollouts are spread over K system prompts, but they still form ONE
group: the baseline is the mean over every rollout of the problem, whichever prompt produced
it. A prompt that helps therefore raises the rewards its rollouts get relative to the others,
and the weights learn from that difference too.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A = (r - mean_G r) / (std_G r + eps) per row.

    rewards: (P, G), one row per problem. std is the sample standard deviation (as in GRPO
    and TRL). A group whose rewards are all equal carries no learning signal: its advantages
    are exactly zero, so it contributes no gradient.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (problems, G>=2), got {tuple(rewards.shape)}")
    rewards = rewards.double()
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    adv = (rewards - mean) / (std + eps)
    flat = rewards.max(dim=1, keepdim=True).values == rewards.min(dim=1, keepdim=True).values
    return torch.where(flat, torch.zeros_like(adv), adv).float()
