"""A transformers rollout engine: batched sampling with a KV cache, on CPU or GPU.

The decoding loop is written out (rather than calling `model.generate`) so that the sampler's
per-token logprobs come out for free, the random stream is an explicit torch.Generator that a
checkpoint can save and restore, and nothing is hidden behind generation-config defaults.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fst.rollout import Rollout, SamplingParams


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token for each row of `logits` (B, V).

    Returns (tokens (B,), logprobs (B,)); logprobs are under the temperature-scaled softmax.
    """
    logprobs_all = torch.log_softmax(logits.float() / params.temperature, dim=-1)  # (B, V)
    if params.greedy:
        tokens = logprobs_all.argmax(dim=-1)
    else:
        probs = logprobs_all.exp()
        if params.top_p < 1.0:
            sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= params.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, sorted_idx, sorted_probs)
        tokens = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1)
        tokens = tokens.to(logits.device)
    return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(-1)


class HFRolloutEngine:
    """Samples from `model` itself (shared weights: sync_weights is a no-op)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        stop_ids: list[int],
        batch_size: int = 32,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.batch_size = batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]

    def sync_weights(self) -> None:
        pass

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator
    ) -> list[Rollout]:
        out: list[Rollout] = []
        for i in range(0, len(prompts), self.batch_size):
            out.extend(self._generate_batch(prompts[i : i + self.batch_size], params, generator))
        return out

    @torch.no_grad()
    def _generate_batch(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator
    ) -> list[Rollout]:
        model, device = self.model, self.model.device
        was_training = model.training
        model.eval()
        B, L = len(prompts), max(len(p) for p in prompts)
        # Left padding keeps every row's last prompt token in the last column.
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attention = torch.zeros((B, L), dtype=torch.long)
        for b, p in enumerate(prompts):
            input_ids[b, L - len(p) :] = torch.tensor(p)
            attention[b, L - len(p) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (B, L): 0 at each row's first token

        out = model(
            input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True
        )
        cache, logits = out.past_key_values, out.logits[:, -1, :]  # (B, V)
        next_pos = positions[:, -1:] + 1  # (B, 1)

        # Rows that hit a stop token leave the batch (and the KV cache): a finished sequence
        # costs nothing more, which matters when completion lengths vary a lot.
        rows = list(range(B))  # original index of each row still decoding
        ids: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        finished = [False] * B
        stop_set = set(self.stop_ids)
        for _ in range(params.max_new_tokens):
            tok, lp = sample_next(logits, params, generator)  # (b,), (b,)
            keep = []
            for i, (t, logp) in enumerate(zip(tok.tolist(), lp.tolist(), strict=True)):
                ids[rows[i]].append(t)
                lps[rows[i]].append(logp)
                if t in stop_set:
                    finished[rows[i]] = True
                else:
                    keep.append(i)
            if not keep:
                break
            if len(keep) < len(rows):
                idx = torch.tensor(keep, device=device)
                _select_rows(cache, idx)
                attention, next_pos, tok = attention[idx], next_pos[idx], tok[idx]
                rows = [rows[i] for i in keep]
            attention = torch.cat([attention, attention.new_ones((len(rows), 1))], dim=1)
            out = model(
                input_ids=tok[:, None],
                attention_mask=attention,
                position_ids=next_pos,
                past_key_values=cache,
                use_cache=True,
            )
            cache, logits = out.past_key_values, out.logits[:, -1, :]
            next_pos = next_pos + 1

        rollouts = []
        for b in range(B):
            body = ids[b][:-1] if finished[b] else ids[b]
            text = self.tokenizer.decode(body, skip_special_tokens=True)
            rollouts.append(Rollout(list(prompts[b]), ids[b], lps[b], text, finished[b]))
        model.train(was_training)
        return rollouts


def _select_rows(cache: object, idx: torch.Tensor) -> None:
    """Keep only the batch rows `idx` of a transformers KV cache (in place)."""
    for layer in cache.layers:
        layer.batch_select_indices(idx)
