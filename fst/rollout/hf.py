"""A transformers rollout engine: batched sampling with a KV cache, on CPU or GPU.

The decoding loop is written out (rather than calling `model.generate`) so that the sampler's
per-token logprobs come out for free, the random stream is an explicit torch.Generator that a
checkpoint can save and restore, and nothing is hidden behind generation-config defaults.

The KV cache goes in and out of the model through transformers' `cache` keyword and output
field (transformers >= 5.24; the older name `past_key_values` is deprecated there and removed in
5.40), as a `Cache` of per-layer objects whose plain layers we replace with preallocated ones.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicLayer

from fst.rollout import Rollout, SamplingParams


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token for each row of `logits` (B, V).

    Returns (tokens (B,), logprobs (B,)): the log-probability of each token under the
    distribution it was drawn from, the temperature-scaled softmax, renormalised over the
    top-p nucleus when top_p < 1 (so CISPO's ratio π_θ / π_sampler weighs a nucleus-sampled
    token by the policy's whole distribution against the truncated one actually sampled).

    One exp pass over the vocabulary serves both the logprob (through log Σ exp) and the
    sampling weights; the token is drawn by inverting the CDF with one uniform number per row.
    (torch.multinomial draws an exponential variate for EVERY vocabulary entry, ~49k per row
    for SmolLM2, which was 8% of decoding time.) The distribution sampled is the same; the
    token a given generator state maps to is not the one multinomial would pick.
    """
    x = logits.float()
    if params.temperature != 1.0:  # x / 1.0 == x exactly: skip a (B, V) copy
        x = x / params.temperature
    peak = x.amax(dim=-1, keepdim=True)
    weights = torch.exp(x - peak)  # (B, V), unnormalised probabilities
    log_z = weights.sum(dim=-1, keepdim=True).log()  # log Σ exp(x - peak)
    if params.greedy:
        tokens = x.argmax(dim=-1)
    else:
        if params.top_p < 1.0:
            probs = weights / weights.sum(dim=-1, keepdim=True)
            sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= params.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            weights = torch.zeros_like(probs).scatter(-1, sorted_idx, sorted_probs)
            # The nucleus's share of the mass: sampled tokens are that much likelier than
            # under the whole softmax. (weights are now probabilities, so log_z is theirs.)
            log_z = log_z + weights.sum(dim=-1, keepdim=True).log()
        tokens = _inverse_cdf(weights, generator)
    logprobs = (x.gather(-1, tokens[:, None]) - peak - log_z).squeeze(-1)
    return tokens, logprobs


def _inverse_cdf(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row, with probability proportional to `weights` (B, V), >= 0."""
    # float64: in float32 the rounding error of a 49k-term running sum is comparable to the
    # probability of rare tokens; in float64 it is ~1e-12 of the mass.
    cdf = weights.double().cumsum(dim=-1)
    u = torch.rand((weights.shape[0], 1), generator=generator, dtype=torch.float64)
    u = u.to(weights.device) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True)  # first index whose CDF exceeds u
    # u < total always, except when u * total rounds up to total (p ~ 2^-53): then the first
    # index reaching the total is the last token with weight > 0.
    fallback = torch.searchsorted(cdf, u, right=False)
    return torch.where(tokens < cdf.shape[-1], tokens, fallback).squeeze(-1)


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
        N = params.max_new_tokens

        # The G rollouts of a problem share their prompt: run the prompt (prefill) once per
        # DISTINCT prompt, then copy its KV cache and last logits to every row that uses it.
        # The prefill was ~a quarter of the decoding FLOPs at G=8 and 128 new tokens.
        distinct: dict[tuple[int, ...], int] = {}
        row_of = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        U = len(distinct)
        # Left padding keeps every row's last prompt token in the last column.
        input_ids = torch.full((U, L), self.pad_id, dtype=torch.long)
        attention = torch.zeros((U, L), dtype=torch.long)
        for u, p in enumerate(distinct):
            input_ids[u, L - len(p) :] = torch.tensor(p)
            attention[u, L - len(p) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (U, L): 0 at each row's first token

        # logits_to_keep=1: only the last position's logits are needed; the LM head (49k x 576
        # for SmolLM2) never runs over the rest of the prompt.
        out = model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        rows_idx = torch.tensor(row_of, device=device)
        logits = out.logits[:, -1, :].index_select(0, rows_idx)  # (B, V)
        cache = _preallocate(out.cache, rows_idx, L + N)
        next_pos = positions[:, -1:].index_select(0, rows_idx) + 1  # (B, 1)
        # The attention mask of the whole completion, allocated once; step t uses [:, :L+t+1].
        full_attention = torch.ones((B, L + N), dtype=torch.long, device=device)
        full_attention[:, :L] = attention.index_select(0, rows_idx)

        # Rows that hit a stop token leave the batch (and the KV cache): a finished sequence
        # costs nothing more, which matters when completion lengths vary a lot.
        rows = list(range(B))  # original index of each row still decoding
        ids: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        finished = [False] * B
        stop_set = set(self.stop_ids)
        for t in range(N):
            tok, lp = sample_next(logits, params, generator)  # (b,), (b,)
            keep = []
            for i, (tk, logp) in enumerate(zip(tok.tolist(), lp.tolist(), strict=True)):
                ids[rows[i]].append(tk)
                lps[rows[i]].append(logp)
                if tk in stop_set:
                    finished[rows[i]] = True
                else:
                    keep.append(i)
            if not keep or t == N - 1:
                break  # (the last step's logits would never be used)
            if len(keep) < len(rows):
                idx = torch.tensor(keep, device=device)
                cache.batch_select_indices(idx)
                full_attention, next_pos, tok = full_attention[idx], next_pos[idx], tok[idx]
                rows = [rows[i] for i in keep]
            out = model(
                input_ids=tok[:, None],
                attention_mask=full_attention[:, : L + t + 1],
                position_ids=next_pos,
                cache=cache,
                use_cache=True,
            )
            cache, logits = out.cache, out.logits[:, -1, :]
            next_pos = next_pos + 1

        rollouts = []
        for b in range(B):
            body = ids[b][:-1] if finished[b] else ids[b]
            text = self.tokenizer.decode(body, skip_special_tokens=True)
            assert isinstance(text, str)  # one sequence of ids decodes to one string
            rollouts.append(Rollout(list(prompts[b]), ids[b], lps[b], text, finished[b]))
        model.train(was_training)
        return rollouts


class _PreallocatedLayer(DynamicLayer):
    """A KV-cache layer whose keys and values live in buffers sized for the whole completion.

    transformers' DynamicLayer appends with torch.cat, copying the layer's whole cache at every
    decoding step (~15% of decoding time at 128 new tokens); here a step writes only its new
    position, and `keys`/`values` are views of the filled part, so the attention reads exactly
    what it read before.

    keys, values: (B, H, n, D) the prefill's cache; the buffers are (B, H, capacity, D).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        super().__init__()
        b, h, n, d = keys.shape
        self.dtype, self.device = keys.dtype, keys.device
        self._k = keys.new_empty((b, h, capacity, d))
        self._v = values.new_empty((b, values.shape[1], capacity, values.shape[-1]))
        self._k[:, :, :n] = keys
        self._v[:, :, :n] = values
        self._n = n
        self.is_initialized = True
        self._expose()

    def _expose(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._k[:, :, : self._n], self._v[:, :, : self._n]
        self.keys, self.values = keys, values
        return keys, values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = key_states.shape[-2]
        if self._n + n > self._k.shape[-2]:
            raise RuntimeError("KV cache capacity exceeded")  # a bug in the caller's sizing
        self._k[:, :, self._n : self._n + n] = key_states
        self._v[:, :, self._n : self._n + n] = value_states
        self._n += n
        return self._expose()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self._expose()


def _preallocate(cache: Cache, rows: torch.Tensor, capacity: int) -> Cache:
    """The prefill's cache expanded to one row per rollout (`rows` (B,) maps each rollout to its
    distinct prompt), with plain layers moved into preallocated buffers (other layer kinds,
    e.g. sliding-window ones, keep their own logic and just get their rows selected)."""
    cache.batch_select_indices(rows)  # every layer kind: (U, ...) -> (B, ...)
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.keys is not None and layer.values is not None:
            cache.layers[i] = _PreallocatedLayer(layer.keys, layer.values, capacity)
    return cache
