"""Policy-gradient losses. Pure functions of tensors; no model, no optimizer.

Shapes, for a micro-batch of B sequences padded to T completion positions:
  logp      (B, T)  log π_θ(y_t | y_<t) under the current weights (requires grad)
  old_logp  (B, T)  log π_old(y_t | y_<t) from the sampler (no grad)
  adv       (B,)    one advantage per sequence
  mask      (B, T)  1.0 on real completion tokens, 0.0 on padding

`num_tokens` / `num_sequences` is the normaliser of the WHOLE step's batch (all micro-batches),
so that splitting a batch into micro-batches does not change the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, already divided by the step's normaliser
    clipped_tokens: torch.Tensor  # scalar count of tokens whose ratio was clipped/truncated
    ratio_sum: torch.Tensor  # scalar sum of ρ over real tokens (for the mean ratio metric)


def cispo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    eps_max: float,
    num_tokens: int,
) -> LossOutput:
    """CISPO (MiniMax-M1): loss = -Σ_t sg(min(ρ_t, ε_max)) · A · log π_θ(y_t) / Σ|y|.

    The importance weight is truncated from above and detached, so EVERY token keeps a
    gradient (unlike PPO-style clipping, which zeroes the gradient of clipped tokens); there
    is no lower clip.
    """
    ratio = torch.exp(logp.detach() - old_logp)
    weight = ratio.clamp(max=eps_max)  # sg(min(ρ, ε_max)): built from detached logp
    per_token = -weight * adv[:, None] * logp
    return LossOutput(
        loss=(per_token * mask).sum() / num_tokens,
        clipped_tokens=((ratio > eps_max).float() * mask).sum(),
        ratio_sum=(ratio * mask).sum(),
    )


def _clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, low: float, high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv[:, None]
    clipped = ratio.clamp(1.0 - low, 1.0 + high) * adv[:, None]
    per_token = -torch.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped).float()
    return per_token, was_clipped, ratio.detach()


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    num_sequences: int,
) -> LossOutput:
    """GRPO's PPO-clipped surrogate, averaged per sequence, then over sequences."""
    per_token, was_clipped, ratio = _clipped_surrogate(logp, old_logp, adv, clip_eps, clip_eps)
    per_seq = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return LossOutput(
        loss=per_seq.sum() / num_sequences,
        clipped_tokens=(was_clipped * mask).sum(),
        ratio_sum=(ratio * mask).sum(),
    )


def dapo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    num_tokens: int,
) -> LossOutput:
    """DAPO: asymmetric clip (clip-higher) and a token-level mean over the step's batch."""
    per_token, was_clipped, ratio = _clipped_surrogate(logp, old_logp, adv, clip_low, clip_high)
    return LossOutput(
        loss=(per_token * mask).sum() / num_tokens,
        clipped_tokens=(was_clipped * mask).sum(),
        ratio_sum=(ratio * mask).sum(),
    )


def reverse_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    num_tokens: int,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FST-distill's term: Σ_t KL(p_s,t ‖ sg p_t,t) / num_tokens over real completion tokens,
    with p = softmax(logits / temperature) over the whole vocabulary.

      student_logits  (B, C, V)  π_θ's logits under the seed prompt (requires grad)
      teacher_logits  (B, C, V)  π_θ's logits under the best prompt, same completions (no grad)
      mask            (B, C)     1.0 on real completion tokens

    Reverse KL (the student's expectation) on the student's own samples: mode-seeking, as in
    on-policy self-distillation. d KL_t / d z_s,k = p_s,k (log p_s,k − log p_t,k − KL_t) / T:
    zero wherever the two contexts give the same distribution. Returns (loss, the KL summed
    over real tokens, detached, for the metric)."""
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = (log_s.exp() * (log_s - log_t)).sum(dim=-1)  # (B, C)
    return (kl * mask).sum() / num_tokens, (kl.detach() * mask).sum()
