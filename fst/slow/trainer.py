"""One optimizer step of the slow channel: rollouts + advantages -> updated weights.

batch of N rollouts (prompt ids, completion ids, sampler logprobs, advantage)
  -> drop rollouts whose advantage is 0 (they carry no gradient; their tokens still
     count in the token-mean normaliser, so dropping them changes nothing but time)
  -> micro-batches of `micro_batch_size` sequences, right-padded
  -> forward: logits over the completion window only (B, W, V) -> log π_θ (B, W)
  -> loss (CISPO by default) / normaliser of the whole step, backward, accumulate
  -> clip the global grad norm, AdamW step, LR schedule step
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from fst.config import SlowConfig
from fst.rollout import Rollout
from fst.slow.losses import LossOutput, cispo_loss, dapo_loss, grpo_loss


@dataclass
class PackedBatch:
    """A micro-batch in "window" coordinates: only positions from `start` (the first position
    that predicts a completion token in any row) are kept, since the prompt's logits are never
    needed. W = L - 1 - start.
    """

    input_ids: torch.Tensor  # (B, L) prompt + completion, right-padded
    attention: torch.Tensor  # (B, L)
    start: int  # first kept position
    targets: torch.Tensor  # (B, W) the token each kept position predicts
    mask: torch.Tensor  # (B, W) 1.0 where the target is a completion token
    old_logp: torch.Tensor  # (B, W) sampler logprobs at completion positions, else 0
    adv: torch.Tensor  # (B,)


def pack(
    rollouts: list[Rollout], advantages: list[float], pad_id: int, device: torch.device
) -> PackedBatch:
    L = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    B = len(rollouts)
    start = min(len(r.prompt_ids) for r in rollouts) - 1
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, L - 1))
    old_logp = torch.zeros((B, L - 1))
    for b, r in enumerate(rollouts):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        input_ids[b, : p + c] = torch.tensor(r.prompt_ids + r.completion_ids)
        attention[b, : p + c] = 1
        # Position j predicts token j+1, so completion token t is predicted at p - 1 + t.
        mask[b, p - 1 : p - 1 + c] = 1.0
        old_logp[b, p - 1 : p - 1 + c] = torch.tensor(r.logprobs)
    return PackedBatch(
        input_ids=input_ids.to(device),
        attention=attention.to(device),
        start=start,
        targets=input_ids[:, start + 1 :].to(device),
        mask=mask[:, start:].to(device),
        old_logp=old_logp[:, start:].to(device),
        adv=torch.tensor(advantages, dtype=torch.float32, device=device),
    )


def window_logits(model: PreTrainedModel, batch: PackedBatch) -> torch.Tensor:
    """Logits at the kept positions only, (B, W, V): the LM head (49k x 576 for SmolLM2) and
    the softmax never run over the prompt."""
    L = batch.input_ids.shape[1]
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention,
        logits_to_keep=L - batch.start,  # positions start..L-1; the last predicts nothing
    )
    return out.logits[:, :-1, :]


def token_logprobs(
    model: PreTrainedModel, batch: PackedBatch, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π_θ(target) and the policy's entropy at every kept position: both (B, W).

    The logits are divided by the sampling temperature so that π_θ and the sampler's π_old
    are the same distribution family (otherwise ρ would be off by the temperature alone).
    """
    logits = window_logits(model, batch).float() / temperature  # (B, W, V)
    lse = torch.logsumexp(logits, dim=-1)  # (B, W)
    logp = logits.gather(-1, batch.targets[..., None]).squeeze(-1) - lse
    with torch.no_grad():
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


class SlowTrainer:
    def __init__(
        self, model: PreTrainedModel, cfg: SlowConfig, temperature: float, pad_id: int
    ) -> None:
        self.model, self.cfg, self.temperature, self.pad_id = model, cfg, temperature, pad_id
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        warmup = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
        )

    def _loss(
        self, logp: torch.Tensor, b: PackedBatch, num_tokens: int, num_seqs: int
    ) -> LossOutput:
        c = self.cfg
        if c.loss == "cispo":
            return cispo_loss(logp, b.old_logp, b.adv, b.mask, c.eps_max, num_tokens)
        if c.loss == "grpo":
            return grpo_loss(logp, b.old_logp, b.adv, b.mask, c.clip_low, num_seqs)
        return dapo_loss(logp, b.old_logp, b.adv, b.mask, c.clip_low, c.clip_high, num_tokens)

    def step(self, rollouts: list[Rollout], advantages: list[float]) -> dict[str, float]:
        """One optimizer step on the whole batch. Returns the step's training metrics."""
        num_tokens = sum(len(r.completion_ids) for r in rollouts)
        num_seqs = len(rollouts)
        active = [i for i, a in enumerate(advantages) if a != 0.0]
        stats = {"loss": 0.0, "clipped": 0.0, "ratio_sum": 0.0, "entropy_sum": 0.0, "tokens": 0.0}
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        mbs = self.cfg.micro_batch_size
        for i in range(0, len(active), mbs):
            idx = active[i : i + mbs]
            batch = pack(
                [rollouts[j] for j in idx],
                [advantages[j] for j in idx],
                self.pad_id,
                self.model.device,
            )
            logp, entropy = token_logprobs(self.model, batch, self.temperature)
            out = self._loss(logp, batch, num_tokens, num_seqs)
            out.loss.backward()
            stats["loss"] += float(out.loss.detach())
            stats["clipped"] += float(out.clipped_tokens)
            stats["ratio_sum"] += float(out.ratio_sum)
            stats["entropy_sum"] += float((entropy * batch.mask).sum())
            stats["tokens"] += float(batch.mask.sum())

        trained = stats["tokens"]
        metrics = {
            "loss": stats["loss"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "trained_tokens": trained,
            "trained_seqs": float(len(active)),
            "clip_frac": stats["clipped"] / trained if trained else 0.0,
            "ratio_mean": stats["ratio_sum"] / trained if trained else math.nan,
            "entropy": stats["entropy_sum"] / trained if trained else math.nan,
        }
        if active:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            metrics["grad_norm"] = float(norm)
            self.optimizer.step()
        else:
            # Every group had zero variance: no gradient. Skipping the update keeps Adam's
            # momentum and weight decay from moving the weights on a step without signal.
            metrics["grad_norm"] = 0.0
        with warnings.catch_warnings():
            # The schedule counts RL steps, updated or not; torch warns when the first step
            # of a run had no update (every group flat), which is expected here.
            warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        metrics["updated"] = 1.0 if active else 0.0
        return metrics

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
