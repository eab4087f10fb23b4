"""One optimizer step of the slow channel: rollouts + advantages -> updated weights.

batch of N rollouts (prompt ids, completion ids, sampler logprobs, advantage)
  -> drop rollouts whose advantage is 0 (they carry no gradient; their tokens still
     count in the token-mean normaliser, so dropping them changes nothing but time)
  -> micro-batches of `micro_batch_size` sequences, in the order of their prompts' tokens
     (rows that share a system prompt share a micro-batch)
  -> forward, prompt shared: each DISTINCT prefix that several prompts share (a population's
     system prompt) runs once, then each DISTINCT prompt's rest on top of its prefix's KV
     cache, then the completions on top of their prompt's (in buckets of similar length,
     each padded to its own longest row); each cache, with its gradients, copied to every
     row that uses it -> logits at completion positions only (B, C, V)
     -> log π_θ (B, C)
  -> loss (CISPO by default) / normaliser of the whole step, backward, accumulate
  -> clip the global grad norm, AdamW step, LR schedule step

Sharing the prompt computes the same thing as running every row's prompt + completion
(attention is causal: a prompt's hidden states do not depend on what follows), and the
gradient through the shared prompt is the sum over its rows, as before. With G rollouts per
problem it saves (G-1)/G of the prompt's forward and backward work. FST's K system prompts
are what makes its prompts long (the digest reflector's lessons: 2.3x RL's prompt tokens per
step after 4 rounds, docs/performance.md); a micro-batch of one system prompt over its
problems runs that prompt once, not once per problem.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from fst.config import SlowConfig
from fst.distributed import SINGLE, World, full_tensor, max_all, min_max_all, sum_all
from fst.model import autocast
from fst.rollout import Rollout
from fst.slow.losses import LossOutput, cispo_loss, dapo_loss, grpo_loss, reverse_kl_loss


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
    return logp_entropy(window_logits(model, batch), batch.targets, temperature)


def completion_logits(
    model: PreTrainedModel, rollouts: list[Rollout], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits predicting each completion token, aligned by completion position: (B, C, V)
    with C the longest completion, and the mask of real tokens (B, C). Row b's token t is
    predicted at position p_b - 1 + t of its prompt + completion (window coordinates: minus
    the batch's start)."""
    batch = pack(rollouts, [0.0] * len(rollouts), pad_id, device)
    logits = window_logits(model, batch)  # (B, W, V)
    C = max(len(r.completion_ids) for r in rollouts)
    t = torch.arange(C, device=device)
    first = torch.tensor([len(r.prompt_ids) - 1 - batch.start for r in rollouts], device=device)
    lengths = torch.tensor([len(r.completion_ids) for r in rollouts], device=device)
    mask = (t[None, :] < lengths[:, None]).float()  # (B, C)
    where = (first[:, None] + t[None, :]).clamp(max=logits.shape[1] - 1)  # (B, C)
    aligned = logits.gather(1, where[:, :, None].expand(-1, -1, logits.shape[-1]))
    return aligned, mask


@dataclass
class DistillBatch:
    """FST-distill's data for one RL step (fst/slow/losses.py reverse_kl_loss): completions
    sampled under the seed prompt (the student's context) and, for each, the same problem
    under the best prompt (the teacher's context)."""

    students: list[Rollout]  # prompt_ids: seed prompt + problem; completion_ids: the sample
    teacher_prompts: list[list[int]]  # per student: best prompt + the same problem
    weight: float  # the term's coefficient at this step (distill.weightAt)


def logp_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / T) at `targets` (B, W), differentiable, and the entropy of
    softmax(logits / T) (B, W), not differentiable (a metric)."""
    B, W, V = logits.shape
    # In float32 even under model.autocast (whose bf16 batched matmul would otherwise take the
    # entropy's dot product): the logits are upcast, the softmax and its gradient are not.
    with torch.autocast(logits.device.type, enabled=False):
        logp, entropy = _TokenLogprob.apply(
            logits.float().reshape(B * W, V), targets.reshape(B * W), 1.0 / temperature
        )
    return logp.view(B, W), entropy.view(B, W)


class _TokenLogprob(torch.autograd.Function):
    """z = logits / T; log softmax(z)[target] and the entropy of softmax(z), per row of (N, V).

    The same values and gradient (d logp / dz = onehot(target) - softmax(z)) as autograd's graph
    of logsumexp + gather + softmax, but with ONE (N, V) buffer kept between forward and
    backward, which the backward turns into the gradient in place. The graph it replaces made
    ~5 (N, V) temporaries and as many passes over them; at (8 x 128) x 49k logits that is 200 MB
    each, per micro-batch.
    """

    # ctx: Any, as torch's own signature has it; the attributes set on it are ours.
    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        targets: torch.Tensor,
        inv_temperature: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z = logits if inv_temperature == 1.0 else logits * inv_temperature
        lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (N, 1)
        probs = torch.sub(z, lse).exp_()  # softmax(z), the one buffer
        logp = (z.gather(-1, targets[:, None]) - lse).squeeze(-1)
        # Σ_v p_v z_v as a batched dot product (no (N, V) temporary).
        expected_z = torch.bmm(probs.unsqueeze(1), z.unsqueeze(2)).view(-1)
        entropy = lse.squeeze(-1) - expected_z
        ctx.save_for_backward(probs, targets)
        ctx.inv_temperature = inv_temperature
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(
        ctx: Any, grad_logp: torch.Tensor, _: torch.Tensor
    ) -> tuple[torch.Tensor, None, None]:
        probs, targets = ctx.saved_tensors
        # The graph is used once (no retain_graph), so the saved softmax becomes the gradient.
        grad = probs.mul_(-grad_logp[:, None])
        grad.scatter_add_(-1, targets[:, None], grad_logp[:, None])
        if ctx.inv_temperature != 1.0:
            grad.mul_(ctx.inv_temperature)
        return grad, None, None


@dataclass
class SharedPromptBatch:
    """A micro-batch whose rows share prompts: U distinct prompts, B completions, and the S
    distinct prefixes the prompts share (a population's system prompt over its problems).

    Columns of a row: [prefix, left-padded | prompt's rest, left-padded | completion, right-
    padded]; positions count real tokens only. Without a prefix stage (`prefix_ids` None) the
    rest is the whole prompt. Completion coordinates: position t of a row is its completion
    token t, predicted by the prompt's last position (t = 0) or by completion token t - 1.
    """

    prefix_ids: torch.Tensor | None  # (S, Q) distinct shared prefixes, left-padded
    prefix_attention: torch.Tensor | None  # (S, Q)
    prefix_positions: torch.Tensor | None  # (S, Q) 0 at each prefix's first real token
    prompt_prefix: torch.Tensor | None  # (U,) which prefix each distinct prompt continues
    prompt_ids: torch.Tensor  # (U, P) each distinct prompt's rest after its prefix, left-padded
    prompt_attention: torch.Tensor  # (U, P)
    prompt_positions: torch.Tensor  # (U, P) prefix length at the rest's first real token
    row_prompt: torch.Tensor  # (B,) which distinct prompt each row continues
    completion_ids: torch.Tensor  # (B, C) right-padded
    completion_attention: torch.Tensor  # (B, C)
    completion_positions: torch.Tensor  # (B, C) prompt length + t
    mask: torch.Tensor  # (B, C) 1.0 on real completion tokens
    old_logp: torch.Tensor  # (B, C) sampler logprobs, 0 on padding
    adv: torch.Tensor  # (B,)


def pack_shared(
    rollouts: list[Rollout],
    advantages: list[float],
    pad_id: int,
    device: torch.device,
    min_completion: int = 1,
    split_prefixes: bool | None = None,
) -> SharedPromptBatch:
    """`min_completion` pads C up (masked positions): under FSDP every rank must run the same
    number of forwards per micro-batch, and C = 1 would skip the completions' forward.

    `split_prefixes`: run the distinct prompts' shared prefixes as a stage of their own (the
    grouping is the rollout engine's, `shared_prefixes`). None: when that saves more padded
    tokens than a forward's fixed cost (`FORWARD_OVERHEAD_TOKENS`). True always (under FSDP,
    so that every rank runs three forwards): a prompt in no group then has all but its last
    token as its "prefix"."""
    from fst.rollout.hf import MIN_SHARED_PREFIX, left_padded, shared_prefixes

    distinct: dict[tuple[int, ...], int] = {}
    row_prompt = [distinct.setdefault(tuple(r.prompt_ids), len(distinct)) for r in rollouts]
    prompts = list(distinct)
    B = len(rollouts)
    if split_prefixes is not False:
        group_of, cut = shared_prefixes(prompts, MIN_SHARED_PREFIX)
        if split_prefixes is None:
            split_prefixes = _prefix_split_saves(prompts, group_of, cut) > FORWARD_OVERHEAD_TOKENS
    prefix_ids = prefix_attention = prefix_positions = prompt_prefix = None
    if split_prefixes:
        slot: dict[int, int] = {}  # group id -> its row among the distinct prefixes
        prefixes: list[tuple[int, ...]] = []
        for p, g, n in zip(prompts, group_of, cut, strict=True):
            if g not in slot:
                slot[g] = len(prefixes)
                prefixes.append(p[:n])
        prefix_ids, prefix_attention, prefix_positions = left_padded(prefixes, pad_id)
        prompt_prefix = torch.tensor([slot[g] for g in group_of])
        rests = [p[n:] for p, n in zip(prompts, cut, strict=True)]
        prompt_ids, prompt_attention, prompt_positions = left_padded(rests, pad_id, cut)
    else:
        prompt_ids, prompt_attention, prompt_positions = left_padded(prompts, pad_id)
    C = max(min_completion, *(len(r.completion_ids) for r in rollouts))
    completion_ids = torch.full((B, C), pad_id, dtype=torch.long)
    mask = torch.zeros((B, C))
    old_logp = torch.zeros((B, C))
    for b, r in enumerate(rollouts):
        c = len(r.completion_ids)
        completion_ids[b, :c] = torch.tensor(r.completion_ids)
        mask[b, :c] = 1.0
        old_logp[b, :c] = torch.tensor(r.logprobs)
    prompt_len = torch.tensor([len(r.prompt_ids) for r in rollouts])

    def put(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(device)

    return SharedPromptBatch(
        prefix_ids=put(prefix_ids),
        prefix_attention=put(prefix_attention),
        prefix_positions=put(prefix_positions),
        prompt_prefix=put(prompt_prefix),
        prompt_ids=prompt_ids.to(device),
        prompt_attention=prompt_attention.to(device),
        prompt_positions=prompt_positions.to(device),
        row_prompt=torch.tensor(row_prompt, device=device),
        completion_ids=completion_ids.to(device),
        completion_attention=mask.long().to(device),
        completion_positions=(prompt_len[:, None] + torch.arange(C)[None, :]).to(device),
        mask=mask.to(device),
        old_logp=old_logp.to(device),
        adv=torch.tensor(advantages, dtype=torch.float32, device=device),
    )


def _prefix_split_saves(
    prompts: Sequence[Sequence[int]], group_of: Sequence[int], cut: Sequence[int]
) -> int:
    """Padded tokens saved by running the prompts' shared prefixes as a forward of their own:
    U whole prompts against the distinct prefixes plus U rests (each forward left-padded to
    its longest row). Pure."""
    whole = len(prompts) * max(len(p) for p in prompts)
    prefix = {g: n for g, n in zip(group_of, cut, strict=True)}
    rests = max(len(p) - n for p, n in zip(prompts, cut, strict=True))
    return whole - (len(prefix) * max(prefix.values()) + len(prompts) * rests)


def shared_prompt_logprobs(
    model: PreTrainedModel, batch: SharedPromptBatch, temperature: float, sharded: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π_θ(completion token) and the policy's entropy at every completion position (B, C),
    with each distinct prefix and each distinct prompt run once (see the module docstring).

    Up to three forwards, each on top of the previous one's KV cache (copied to its rows):
    the S shared prefixes, the U prompts' rests, the B completions.

    `sharded` (FSDP2): the prefixes' logits join the result times 0. FSDP gathers a layer's
    weights for the backward when a gradient reaches that layer's output; the prefix forward's
    last layer is otherwise reached only through its keys and values, and its weights would
    still be sharded when their gradient is computed."""
    rows = batch.row_prompt
    anchor: torch.Tensor | None = None
    cache: Cache | None = None
    prompt_mask = batch.prompt_attention  # (U, columns so far)
    if batch.prefix_ids is not None:
        assert batch.prefix_attention is not None and batch.prompt_prefix is not None
        prefixes = model(
            input_ids=batch.prefix_ids,
            attention_mask=batch.prefix_attention,
            position_ids=batch.prefix_positions,
            use_cache=True,
            logits_to_keep=1,  # none are needed; 1 is the fewest the model computes
        )
        cache = prefixes.cache
        if sharded:
            anchor = prefixes.logits.float().sum() * 0.0
        _set_rows(cache, _layer_kv(cache), batch.prompt_prefix)
        prompt_mask = torch.cat(
            [batch.prefix_attention.index_select(0, batch.prompt_prefix), prompt_mask], dim=1
        )
    out = model(
        input_ids=batch.prompt_ids,
        attention_mask=prompt_mask,
        position_ids=batch.prompt_positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,  # the prompt's last position predicts completion token 0
    )
    targets = batch.completion_ids
    logp0, ent0 = logp_entropy(
        out.logits[:, -1:, :].index_select(0, rows), targets[:, :1], temperature
    )
    if anchor is not None:
        logp0 = logp0 + anchor
    if targets.shape[1] == 1:
        return logp0, ent0
    logp, ent = _completion_logprobs(model, batch, out.cache, prompt_mask, temperature, sharded)
    return torch.cat([logp0, logp], dim=1), torch.cat([ent0, ent], dim=1)


def _completion_logprobs(
    model: PreTrainedModel,
    batch: SharedPromptBatch,
    prompt_cache: Cache,
    prompt_mask: torch.Tensor,
    temperature: float,
    sharded: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π_θ and entropy (B, C-1) of completion tokens 1..C-1, each predicted by the token
    before it, on top of the prompts' cache (`prompt_cache`: U rows, masked by `prompt_mask`
    (U, P)); 0 past a row's end.

    The rows run in buckets of similar length, each forward padded to its own longest row
    (`completion_buckets`): one forward padded to the batch's longest completion spent 2-3
    padded tokens per real one on `mul` (completions of 20-128 tokens). Under FSDP every rank
    runs one forward, over the longest completion (the ranks' collectives must match)."""
    targets, rows = batch.completion_ids, batch.row_prompt
    B, C1 = targets.shape[0], targets.shape[1] - 1
    lengths = [max(int(n) - 1, 0) for n in batch.mask.sum(dim=1).tolist()]  # tokens fed in
    if sharded:
        buckets, lengths = [list(range(B))], [C1] * B
    else:
        buckets = completion_buckets(lengths, FORWARD_OVERHEAD_TOKENS)
    prompt_kv = _layer_kv(prompt_cache)  # (U, H, P, D) per layer, shared by every bucket
    logp = targets.new_zeros((B, C1), dtype=torch.float32)
    ent = targets.new_zeros((B, C1), dtype=torch.float32)
    for bucket in buckets:
        n = max(lengths[b] for b in bucket)  # this bucket's columns
        if n == 0:  # one-token completions: the prompt's last position predicted them
            continue
        idx = torch.tensor(bucket, device=targets.device)
        tokens = targets.index_select(0, idx)  # (b, C)
        prompt_of = rows.index_select(0, idx)
        _set_rows(prompt_cache, prompt_kv, prompt_of)
        logits = model(
            input_ids=tokens[:, :n],
            attention_mask=torch.cat(
                [
                    prompt_mask.index_select(0, prompt_of),
                    batch.completion_attention.index_select(0, idx)[:, :n],
                ],
                dim=1,
            ),
            position_ids=batch.completion_positions.index_select(0, idx)[:, :n],
            cache=prompt_cache,
            use_cache=True,
        ).logits  # (b, n, V)
        lp, en = logp_entropy(logits, tokens[:, 1 : n + 1], temperature)
        logp = logp.index_copy(0, idx, torch.nn.functional.pad(lp, (0, C1 - n)))
        ent = ent.index_copy(0, idx, torch.nn.functional.pad(en, (0, C1 - n)))
    return logp, ent


# One more forward costs about as many tokens' work as this, whatever its size: its backward
# computes and accumulates every weight's gradient once (SmolLM2, bf16 autocast, 2 cores: a
# 1-token forward + backward took 227 ms, gradients allocated included, a 1024-token one 2.2 ms
# per token; on 12 replayed steps of the overhead bench, 8, 32 and 96 were alike within noise).
FORWARD_OVERHEAD_TOKENS = 96


def completion_buckets(lengths: Sequence[int], overhead: int) -> list[list[int]]:
    """Rows (indices into `lengths`, each row's tokens in the completions' forward) grouped
    into forwards, each padded to its longest row: the grouping with the fewest padded
    tokens plus `overhead` per forward. Rows are taken by length and split where a split
    pays (dynamic programming over the split points); rows of length 0 need no forward and
    come as one bucket of their own, first. Pure."""
    empty = [i for i, n in enumerate(lengths) if n == 0]
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: lengths[i])
    L = [lengths[i] for i in order]
    best = [0.0] + [math.inf] * len(L)  # best[j]: the cost of the j shortest rows
    cut = [0] * (len(L) + 1)  # best[j]'s last bucket: rows cut[j]..j-1
    for j in range(1, len(L) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * L[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    buckets, j = [], len(L)
    while j > 0:
        buckets.append(order[cut[j] : j])
        j = cut[j]
    return ([empty] if empty else []) + buckets[::-1]


def _layer_kv(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values as they are now (refusing layers that hold none)."""
    kv = []
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or layer.keys is None or layer.values is None:
            raise NotImplementedError(f"shared-prompt training: KV-cache layer {layer!r}")
        kv.append((layer.keys, layer.values))
    return kv


def _set_rows(
    cache: Cache, kv: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor
) -> None:
    """Point every layer of `cache` at rows `rows` of `kv` (one (U, H, P, D) pair per layer):
    index_select carries the gradient back to the shared prompt, summed over its rows."""
    for layer, (keys, values) in zip(cache.layers, kv, strict=True):
        assert isinstance(layer, DynamicLayer)  # as _layer_kv checked
        layer.keys, layer.values = keys.index_select(0, rows), values.index_select(0, rows)


def _fused_adamw_ok(params: Sequence[torch.Tensor]) -> bool | None:
    """Whether torch's fused AdamW kernel applies (floating-point parameters on CPU or CUDA)."""
    floats = (torch.float32, torch.float16, torch.bfloat16)
    ok = all(p.device.type in ("cpu", "cuda") and p.dtype in floats for p in params)
    return True if ok and params else None  # None: torch's own default


def mini_batches(n: int, parts: int) -> list[range]:
    """`parts` contiguous, near-equal index ranges covering range(n) (the first n % parts one
    longer). The rollouts come grouped by problem, G in a row: with P*G divisible by
    parts*G each mini-batch holds whole problems."""
    size, extra = divmod(n, parts)
    starts = [k * size + min(k, extra) for k in range(parts + 1)]
    return [range(starts[k], starts[k + 1]) for k in range(parts)]


def combine_updates(updates: list[dict[str, float]]) -> dict[str, float]:
    """One RL step's metrics from its updates' (each over its own mini-batch): counts add up,
    token-weighted means (clip fraction, ratio mean, entropy) are re-weighted by the tokens each
    update trained, extremes are taken over all, and loss and gradient norm are the mean of the
    updates that ran. `updates` counts the optimizer updates taken."""
    if len(updates) == 1:
        return {**updates[0], "updates": updates[0]["updated"]}
    ran = [u for u in updates if u["updated"]]
    tokens = sum(u["trained_tokens"] for u in updates)

    def token_mean(key: str) -> float:
        return sum(u[key] * u["trained_tokens"] for u in ran) / tokens if tokens else math.nan

    return {
        "loss": sum(u["loss"] for u in ran) / len(ran) if ran else 0.0,
        "lr": updates[0]["lr"],
        "trained_tokens": tokens,
        "trained_seqs": sum(u["trained_seqs"] for u in updates),
        "clip_frac": token_mean("clip_frac") if tokens else 0.0,
        "ratio_mean": token_mean("ratio_mean"),
        "ratio_min": min((u["ratio_min"] for u in ran), default=math.nan),
        "ratio_max": max((u["ratio_max"] for u in ran), default=math.nan),
        "entropy": token_mean("entropy"),
        "grad_norm": sum(u["grad_norm"] for u in ran) / len(ran) if ran else 0.0,
        "updated": 1.0 if ran else 0.0,
        "updates": float(len(ran)),
        **_combine_distill(updates),
    }


def _combine_distill(updates: list[dict[str, float]]) -> dict[str, float]:
    """FST-distill's metrics over a step's updates: tokens add up, the KL is token-weighted."""
    if "distill_tokens" not in updates[0]:
        return {}
    tokens = sum(u["distill_tokens"] for u in updates)
    kl = sum(u["distill_kl"] * u["distill_tokens"] for u in updates) / tokens if tokens else 0.0
    weight = updates[0]["distill_weight"]
    return {
        "distill_kl": kl,
        "distill_loss": weight * kl,
        "distill_tokens": tokens,
        "distill_weight": weight,
    }


class DivergedError(RuntimeError):
    """A step's loss or gradient norm, or the updated model's output, is NaN or infinite.

    Raised before the optimizer step when the loss or the gradient norm is not finite (the
    update is refused), or right after it when the updated policy's logits are not (the weights
    in memory are then broken: the caller must stop without saving them)."""


def outputs_finite(model: PreTrainedModel, ids: Sequence[int]) -> bool:
    """Whether the model's logits on the token sequence `ids` are all finite: a cheap probe (one
    short sequence, no gradient) of weights that may have been broken by an update. (A sharded
    model: every rank calls it, each with a sequence of its own.)"""
    if not ids:
        return True
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
            logits = model(input_ids=x).logits
        return bool(torch.isfinite(logits).all())
    finally:
        model.train(was_training)


class SlowTrainer:
    """AdamW on the policy's trainable parameters, fed by CISPO (or GRPO/DAPO) on rollouts.

    Under torchrun (`world.distributed`) the policy is FSDP2-sharded (fst/distributed.py) and
    each rank passes its own rollouts: the loss normaliser, the metrics and the decision to
    update are global (all-reduced), so every rank takes the same step, and the summed gradient
    equals the one a single process would compute on the whole batch."""

    def __init__(
        self,
        model: PreTrainedModel,
        cfg: SlowConfig,
        temperature: float,
        pad_id: int,
        world: World = SINGLE,
        shared_prompt: bool = True,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.model, self.cfg, self.temperature, self.pad_id = model, cfg, temperature, pad_id
        self.world = world
        # model.autocast: each micro-batch's forward under torch.autocast (the backward runs
        # outside it, in the dtypes the forward chose, as torch recommends); losses in float32.
        self.autocast_dtype = autocast_dtype
        # Activation checkpointing recomputes each layer's forward, which would write the
        # shared prompt's KV cache twice: the plain (one forward per row) path is used then.
        self.shared_prompt = shared_prompt
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=cfg.lr,
            betas=cfg.betas,
            weight_decay=cfg.weight_decay,
            # One fused kernel per parameter instead of ~10 elementwise passes: the same update,
            # 3-5x faster on CPU (torch's default there is the per-op loop).
            fused=_fused_adamw_ok(self.params),
        )
        warmup = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
        )

    def _loss(
        self,
        logp: torch.Tensor,
        b: SharedPromptBatch | PackedBatch,
        num_tokens: int,
        num_seqs: int,
    ) -> LossOutput:
        c = self.cfg
        if c.loss == "cispo":
            return cispo_loss(logp, b.old_logp, b.adv, b.mask, c.eps_max, num_tokens)
        if c.loss == "grpo":
            return grpo_loss(logp, b.old_logp, b.adv, b.mask, c.clip_low, num_seqs)
        return dapo_loss(logp, b.old_logp, b.adv, b.mask, c.clip_low, c.clip_high, num_tokens)

    def step(
        self,
        rollouts: list[Rollout],
        advantages: list[float],
        distill: DistillBatch | None = None,
    ) -> dict[str, float]:
        """One RL step on the whole generation batch (this rank's share of it, under torchrun):
        `updatesPerBatch` optimizer updates, each on one contiguous mini-batch of the rollouts
        (whole problems when it divides evenly), then one step of the LR schedule. Returns the
        step's training metrics (the whole batch's, on every rank).

        With one update the policy IS the sampler and CISPO's ratio is 1 up to float noise;
        from the second update on it is not, and the truncation min(ρ, ε_max) can bind.

        `distill` (mode fst-distill) adds its reverse-KL term, its students split across the
        updates like the rollouts.

        Raises DivergedError (see there) when the loss, the gradient norm or the updated
        model's output on one of the batch's sequences is NaN or infinite."""
        # A rank whose share is smaller than the number of updates has empty mini-batches; it
        # still takes part in each update's collectives, running a real sequence weighted 0.
        filler = rollouts[0]
        n = self.cfg.updates_per_batch
        parts = mini_batches(len(rollouts), n)
        distill_parts = (
            [
                DistillBatch(
                    [distill.students[i] for i in part],
                    [distill.teacher_prompts[i] for i in part],
                    distill.weight,
                )
                for part in mini_batches(len(distill.students), n)
            ]
            if distill is not None and distill.weight > 0
            else [None] * n
        )
        updates = [
            self._update([rollouts[i] for i in part], [advantages[i] for i in part], filler, d)
            for part, d in zip(parts, distill_parts, strict=True)
        ]
        with warnings.catch_warnings():
            # The schedule counts RL steps, updated or not; torch warns when the first step
            # of a run had no update (every group flat), which is expected here.
            warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        return combine_updates(updates)

    def _update(
        self,
        rollouts: list[Rollout],
        advantages: list[float],
        filler: Rollout,
        distill: DistillBatch | None = None,
    ) -> dict[str, float]:
        """One optimizer update on a mini-batch (token mean over the mini-batch)."""
        self.optimizer.zero_grad(set_to_none=True)
        metrics = self.backward(rollouts, advantages, filler)
        if distill is not None:
            metrics.update(self.distill_backward(distill, filler))
        if metrics["trained_seqs"] > 0 or metrics.get("distill_tokens", 0.0) > 0:
            if not (
                math.isfinite(metrics["loss"]) and math.isfinite(metrics.get("distill_loss", 0))
            ):
                self.optimizer.zero_grad(set_to_none=True)
                raise DivergedError(
                    f"the loss is {metrics['loss']}; the update was refused (the weights "
                    "were already broken, or the inputs produce non-finite log-probabilities)"
                )
            # Under FSDP the norm is a DTensor over every rank's shard: gathered, it is the
            # global norm, the same on every rank.
            norm = float(
                full_tensor(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip))
            )
            if not math.isfinite(norm):
                self.optimizer.zero_grad(set_to_none=True)
                raise DivergedError(f"the gradient norm is {norm}; the update was refused")
            metrics["grad_norm"] = norm
            self.optimizer.step()
            active = [r for r, a in zip(rollouts, advantages, strict=True) if a != 0.0]
            probe = (active or rollouts or [filler])[0]
            finite = outputs_finite(self.model, probe.prompt_ids + probe.completion_ids)
            if sum_all([0.0 if finite else 1.0], self.world)[0] > 0:
                raise DivergedError("the update made the model's outputs NaN or infinite")
        else:
            # Every group had zero variance: no gradient. Skipping the update keeps Adam's
            # momentum and weight decay from moving the weights on a step without signal.
            metrics["grad_norm"] = 0.0
        updated = metrics["trained_seqs"] > 0 or metrics.get("distill_tokens", 0.0) > 0
        metrics["updated"] = 1.0 if updated else 0.0
        return metrics

    def distill_backward(self, distill: DistillBatch, filler: Rollout) -> dict[str, float]:
        """FST-distill's term on `distill`, backpropagated into .grad (accumulating onto the
        policy-gradient term's): weight × Σ_t KL(student ‖ sg teacher) / the students' tokens.
        Returns distill_loss (weighted), distill_kl (per token), distill_tokens and
        distill_weight."""
        world, device = self.world, self.model.device
        students = distill.students
        num_tokens = sum_all([float(sum(len(r.completion_ids) for r in students))], world)[0]
        mbs = self.cfg.micro_batch_size
        local = [list(range(i, min(i + mbs, len(students)))) for i in range(0, len(students), mbs)]
        n_micro = max_all(len(local), world) if world.distributed else len(local)
        kl_sum = 0.0
        self.model.train()
        for m in range(n_micro):
            idle = m >= len(local)
            rows = [filler] if idle else [students[j] for j in local[m]]
            teachers = (
                [filler]
                if idle
                else [
                    Rollout(
                        distill.teacher_prompts[j],
                        r.completion_ids,
                        [0.0] * len(r.completion_ids),
                        "",
                        True,
                    )
                    for j, r in zip(local[m], rows, strict=True)
                ]
            )
            with torch.no_grad(), autocast(self.autocast_dtype, device):
                teacher, _ = completion_logits(self.model, teachers, self.pad_id, device)
            with autocast(self.autocast_dtype, device):
                student, mask = completion_logits(self.model, rows, self.pad_id, device)
            loss, kl = reverse_kl_loss(
                student, teacher, mask, max(int(num_tokens), 1), self.temperature
            )
            (loss * (0.0 if idle else distill.weight)).backward()
            if not idle:
                kl_sum += float(kl)
        kl_total = sum_all([kl_sum], world)[0]
        per_token = kl_total / num_tokens if num_tokens else 0.0
        return {
            "distill_loss": distill.weight * per_token,
            "distill_kl": per_token,
            "distill_tokens": num_tokens,
            "distill_weight": distill.weight,
        }

    def _logprobs(
        self, rollouts: list[Rollout], advantages: list[float]
    ) -> tuple[torch.Tensor, torch.Tensor, SharedPromptBatch | PackedBatch]:
        """log π_θ and entropy (B, C) of one micro-batch, and the batch they belong to."""
        device = self.model.device
        if self.shared_prompt:
            # Under FSDP, C >= 2 and a prefix stage in every micro-batch keep the number of
            # forwards (collectives) the same on all ranks: three.
            distributed = self.world.distributed
            min_c = 2 if distributed else 1
            split = True if distributed else None
            shared = pack_shared(rollouts, advantages, self.pad_id, device, min_c, split)
            logp, entropy = shared_prompt_logprobs(
                self.model, shared, self.temperature, sharded=distributed
            )
            return logp, entropy, shared
        packed = pack(rollouts, advantages, self.pad_id, device)
        logp, entropy = token_logprobs(self.model, packed, self.temperature)
        return logp, entropy, packed

    def _micro_batches(
        self, rollouts: list[Rollout], advantages: list[float]
    ) -> tuple[list[list[int]], int]:
        """This rank's micro-batches of the rollouts that carry a gradient (advantage != 0),
        as indices, and how many micro-batches every rank runs. Every rank runs as many as the
        busiest one (FSDP's forward and backward are collectives): the extra ones are a real
        sequence whose result is multiplied by 0.

        The rollouts are taken in the order of their prompts' tokens, so that rows sharing a
        system prompt share a micro-batch, whose forward then runs that prompt once (FST: a
        population prompt over its problems, instead of K system prompts over one problem).
        The order changes no gradient: the loss is normalised over the whole batch."""
        active = sorted(
            (i for i, a in enumerate(advantages) if a != 0.0), key=lambda i: rollouts[i].prompt_ids
        )
        mbs = self.cfg.micro_batch_size
        local = [active[i : i + mbs] for i in range(0, len(active), mbs)]
        n_micro = max_all(len(local), self.world) if self.world.distributed else len(local)
        return local, n_micro

    @torch.no_grad()
    def measure_entropy(self, rollouts: list[Rollout], advantages: list[float]) -> dict[str, float]:
        """The policy's entropy of softmax(logits / T) on the tokens a step WOULD train (the
        completions of groups with advantage != 0), by one forward without a gradient, over
        every rank's rollouts. Mode gepa never trains, so this is how its entropy is measured
        on the same tokens as the other modes' training entropy. Returns {"entropy": nats per
        token} (NaN when no group had signal) and the token count."""
        local, n_micro = self._micro_batches(rollouts, advantages)
        entropy_sum, tokens = 0.0, 0.0
        for m in range(n_micro):
            idle = m >= len(local)
            rows = [rollouts[0]] if idle else [rollouts[j] for j in local[m]]
            advs = [0.0] if idle else [advantages[j] for j in local[m]]
            with autocast(self.autocast_dtype, self.model.device):
                _, entropy, batch = self._logprobs(rows, advs)
            if not idle:
                entropy_sum += float((entropy * batch.mask).sum())
                tokens += float(batch.mask.sum())
        entropy_sum, tokens = sum_all([entropy_sum, tokens], self.world)
        return {"entropy": entropy_sum / tokens if tokens else math.nan, "entropy_tokens": tokens}

    def backward(
        self, rollouts: list[Rollout], advantages: list[float], filler: Rollout | None = None
    ) -> dict[str, float]:
        """The loss of `rollouts`, backpropagated: gradients accumulate into the parameters'
        .grad (no optimizer update). Returns the loss and the training metrics (over every
        rank's rollouts). `filler`: the sequence an idle micro-batch runs when this rank has no
        rollouts of its own (default: its first rollout)."""
        world = self.world
        num_tokens, num_seqs = sum_all(
            [float(sum(len(r.completion_ids) for r in rollouts)), float(len(rollouts))], world
        )
        self.model.train()
        local, n_micro = self._micro_batches(rollouts, advantages)
        stats = torch.zeros(6, dtype=torch.float64)  # loss clipped ratio entropy tokens seqs
        ratio_lo, ratio_hi = math.inf, -math.inf
        for m in range(n_micro):
            idle = m >= len(local)
            if idle:
                rows, advs = [rollouts[0] if rollouts else filler], [0.0]
            else:
                rows, advs = [rollouts[j] for j in local[m]], [advantages[j] for j in local[m]]
            assert rows[0] is not None, "an idle micro-batch needs a filler sequence"
            with autocast(self.autocast_dtype, self.model.device):
                logp, entropy, batch = self._logprobs(rows, advs)  # type: ignore[arg-type]
            out = self._loss(logp, batch, max(int(num_tokens), 1), int(num_seqs))
            (out.loss * 0.0 if idle else out.loss).backward()
            if idle:
                continue
            real = batch.mask > 0
            if bool(real.any()):
                ratio = torch.exp(logp.detach() - batch.old_logp)[real]
                ratio_lo = min(ratio_lo, float(ratio.min()))
                ratio_hi = max(ratio_hi, float(ratio.max()))
            stats += torch.tensor(
                [
                    float(out.loss.detach()),
                    float(out.clipped_tokens),
                    float(out.ratio_sum),
                    float((entropy * batch.mask).sum()),
                    float(batch.mask.sum()),
                    float(len(rows)),
                ],
                dtype=torch.float64,
            )
        loss, clipped, ratio_sum, entropy_sum, trained, seqs = sum_all(stats.tolist(), world)
        ratio_lo, ratio_hi = min_max_all(ratio_lo, ratio_hi, world)
        return {
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "trained_tokens": trained,
            "trained_seqs": seqs,
            "clip_frac": clipped / trained if trained else 0.0,
            "ratio_mean": ratio_sum / trained if trained else math.nan,
            "ratio_min": ratio_lo if trained else math.nan,
            "ratio_max": ratio_hi if trained else math.nan,
            "entropy": entropy_sum / trained if trained else math.nan,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
