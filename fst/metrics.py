"""Measurements of the policy, and where metrics go (JSONL always, TensorBoard optionally).

KL(π_θ ‖ π_base) estimator
    On a fixed set of held-out prompts, completions are sampled from π_θ with a FIXED seed
    (common random numbers: every measurement uses the same sampling noise, so the curve moves
    with the weights, not with the dice), then at every completion position the exact KL
    between the two next-token distributions is summed over the whole vocabulary:
        KL_t = Σ_v π_θ(v | y_<t) · (log π_θ(v | y_<t) − log π_base(v | y_<t))
    and averaged over completion tokens. Summing over the vocabulary removes the per-token
    sampling variance of the k1/k3 estimators (which see one token per position, and k1 can go
    negative); the remaining Monte-Carlo is over prefixes only. On a 49k-token vocabulary and a
    135M model this is cheap. It is a per-token KL (nats/token).
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel

from fst.rollout import Rollout, RolloutEngine, SamplingParams
from fst.slow.trainer import pack, window_logits

if TYPE_CHECKING:
    from fst.fast.population import PromptRecord
    from fst.store.db import RunDB

KL_SEED = 20_260_101  # fixed seed of the KL probe's sampler, independent of the training RNG


@torch.no_grad()
def _next_token_logprobs(
    model: PreTrainedModel, rollouts: list[Rollout], temperature: float, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    batch = pack(rollouts, [0.0] * len(rollouts), pad_id, model.device)
    logits = window_logits(model, batch)
    return torch.log_softmax(logits.float() / temperature, dim=-1), batch.mask  # (B, W, V)


@torch.no_grad()
def kl_to_base(
    policy: PreTrainedModel,
    reference: PreTrainedModel | None,
    engine: RolloutEngine,
    prompts: list[list[int]],
    params: SamplingParams,
    pad_id: int,
) -> float:
    """Mean per-token KL(π_θ ‖ π_base) on `prompts` (see the module docstring).

    `reference=None` means the policy is a PEFT model whose base is the adapters disabled."""
    if not prompts:
        return math.nan
    generator = torch.Generator().manual_seed(KL_SEED)
    rollouts = engine.generate(prompts, params, generator)
    rollouts = [r for r in rollouts if r.completion_ids]
    if not rollouts:
        return 0.0
    was_training = policy.training
    policy.eval()
    logp_theta, mask = _next_token_logprobs(policy, rollouts, params.temperature, pad_id)
    if reference is None:
        from peft import PeftModel  # loaded already when the policy is one

        if not isinstance(policy, PeftModel):
            raise ValueError("reference=None: the base must be a PEFT policy's disabled adapters")
        ctx = policy.disable_adapter()
        base_model = policy
    else:
        ctx, base_model = nullcontext(), reference
    with ctx:
        logp_base, _ = _next_token_logprobs(base_model, rollouts, params.temperature, pad_id)
    policy.train(was_training)
    kl = (logp_theta.exp() * (logp_theta - logp_base)).sum(-1)  # (B, W)
    return float((kl * mask).sum() / mask.sum())


class MetricsSink:
    """Appends one JSON object per record to `metrics.jsonl`; mirrors scalars to TensorBoard.

    On resume, `truncate_after(step)` drops records of steps the checkpoint does not contain,
    so the file always describes exactly one trajectory of the weights.
    """

    def __init__(
        self, run_dir: Path, tensorboard: bool = False, db: RunDB | None = None, run: str = ""
    ) -> None:
        self.db, self.run = db, run  # a RunDB (fst/store/db.py): the durable copy on a cluster
        self.path = run_dir / "metrics.jsonl"
        self.population_path = run_dir / "population.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` extra

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        for path in (self.path, self.population_path):
            _truncate_jsonl(path, step)
        if self.db is not None:
            self.db.truncate_after(self.run, step)

    def write_population(
        self,
        step: int,
        round_idx: int,
        population: list[PromptRecord],
        candidates: list[PromptRecord],
    ) -> None:
        """Append a GEPA round that ran before step `step`: the population it kept and every
        candidate it saw (so the lineage of each member can be traced)."""
        record = {
            "step": step,
            "round": round_idx,
            "members": [p.to_dict() for p in population],
            "candidates": [c.to_dict() for c in candidates],
        }
        with self.population_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.db is not None:
            self.db.save_population(self.run, round_idx, step, population)

    def write(self, record: dict[str, Any]) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
        if self.db is not None and "step" in record:
            self.db.log_metrics(self.run, record["step"], record)
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _truncate_jsonl(path: Path, step: int) -> None:
    """Keep the records of steps <= `step`; atomic replace, so a crash loses nothing."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
