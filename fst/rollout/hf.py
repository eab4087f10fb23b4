"""A transformers rollout engine: batched sampling with a KV cache, on CPU or GPU.

The decoding loop is written out (rather than calling `model.generate`) so that the sampler's
per-token logprobs come out for free, the random stream is an explicit torch.Generator that a
checkpoint can save and restore, and nothing is hidden behind generation-config defaults.

The KV cache goes in and out of the model through transformers' `cache` keyword and output
field (transformers >= 5.24; the older name `past_key_values` is deprecated there and removed in
5.40), as a `Cache` of per-layer objects whose plain layers we replace with preallocated ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicLayer

from fst.model import attends_in_float32, autocast
from fst.rollout import Generators, Rollout, SamplingParams


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: Generators
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token for each row of `logits` (B, V); `generator`: one for all rows, or
    one per row (B of them).

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
    with torch.autocast(logits.device.type, enabled=False):  # float32 under model.autocast
        return _sample_next(logits.float(), params, generator)


def _sample_next(
    x: torch.Tensor, params: SamplingParams, generator: Generators
) -> tuple[torch.Tensor, torch.Tensor]:
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


# The vocabulary is searched in blocks of this many tokens: first a block, by the running sum
# of block totals, then a token within it. One float64 running sum over SmolLM2's 49k entries
# per row was ~3.6 ms of every decoding step (7% of decoding); block totals and one block's
# running sum are ~1% of that many float64 additions.
CDF_BLOCK = 256


def _inverse_cdf(weights: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One token per row, with probability proportional to `weights` (B, V), >= 0."""
    if isinstance(generator, torch.Generator):
        u = torch.rand((weights.shape[0], 1), generator=generator, dtype=torch.float64)
    else:  # one uniform number from each row's own generator
        u = torch.cat([torch.rand((1, 1), generator=g, dtype=torch.float64) for g in generator])
    return invert_cdf(weights, u.to(weights.device))


def invert_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token whose cumulative weight first exceeds u x the row's total: `weights` (B, V)
    >= 0, `u` (B, 1) uniform in [0, 1). Returns (B,) token ids.

    The same token as one float64 running sum over the whole row (up to the rounding of the
    float32 block totals, ~1e-7 of a block's mass), found in two steps: the block (CDF_BLOCK
    tokens) by the running sum of block totals, then the token by the running sum within that
    block, offset by the blocks before it."""
    B, V = weights.shape
    pad = -V % CDF_BLOCK
    padded = torch.nn.functional.pad(weights, (0, pad)) if pad else weights
    w = padded.view(B, -1, CDF_BLOCK)  # (B, nb, block), zero weights past V
    # Running sums in float64: in float32 the rounding error of a long running sum is
    # comparable to the probability of rare tokens. The block totals themselves are float32
    # (torch sums pairwise: ~1e-7 of a block's mass); converting the whole row to float64
    # first cost as much as the single running sum this replaces.
    block_cdf = w.sum(dim=-1).double().cumsum(dim=-1)  # (B, nb)
    target = u * block_cdf[:, -1:]  # (B, 1)
    block = _first_exceeding(block_cdf, target)  # (B,)
    rows = torch.arange(B, device=weights.device)
    before = torch.where(block > 0, block_cdf[rows, (block - 1).clamp(min=0)], 0.0)
    within_cdf = w[rows, block].double().cumsum(dim=-1) + before[:, None]  # (B, block)
    return block * CDF_BLOCK + _first_exceeding(within_cdf, target)


def _first_exceeding(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose running sum exceeds `target` (B, 1). When none does (the
    target rounds up to the row's total, p ~ 2^-53), the first index reaching the total: the
    last entry with weight > 0."""
    idx = torch.searchsorted(cdf, target, right=True)
    fallback = torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False)
    return torch.where(idx < cdf.shape[-1], idx, fallback).squeeze(-1)


# Prompts share one prefill of their common prefix only from this many common tokens. A
# heuristic, not tuned: sharing adds a second forward, whose fixed cost is about a decoding
# step (tens of ms), while a prompt token's prefill costs ~1 ms on 2 cores (compute-bound).
# Measured by `python -m bench.prefix` (SmolLM2, bf16, four population prompts of 17-140
# tokens): the prefill alone took 0.85 (a step's 16 distinct prompts), 0.66 (a re-scoring's
# 32) and 0.71 (a minibatch's 16) of the time; with 32 new tokens, 0.91, 0.84 and 0.83.
MIN_SHARED_PREFIX = 16


def shared_prefixes(
    prompts: Sequence[Sequence[int]], min_shared: int
) -> tuple[list[int], list[int]]:
    """Group prompts by a common prefix: returns (group id, prefix length) per prompt.

    Prompts are sorted; a prompt joins its predecessor's group when they share >= `min_shared`
    tokens and joining saves more prefill than it adds; a group's prefix is what all its
    prompts share, cut so that every prompt keeps >= 1 token after it (the last token's
    logits start the sampling). A prompt in no group is a group of its own, with all but its
    last token as prefix. Pure."""
    order = sorted(range(len(prompts)), key=lambda i: tuple(prompts[i]))
    group_of, length = [0] * len(prompts), [0] * len(prompts)

    def common(a: Sequence[int], b: Sequence[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    groups: list[list[int]] = []
    shared: list[int] = []  # per group: tokens all its prompts share
    for i in order:
        if groups:
            n = min(shared[-1], common(prompts[groups[-1][-1]], prompts[i]))
            # Join unless it costs more than it saves: the group's prompts would each carry
            # (shared - n) more tokens in their rest, against the n-token prefix row saved.
            # (Candidate system prompts that begin with the same seed text stay apart.)
            if n >= min_shared and (shared[-1] - n) * len(groups[-1]) <= n:
                groups[-1].append(i)
                shared[-1] = n
                continue
        groups.append([i])
        shared.append(len(prompts[i]))
    for g, members in enumerate(groups):
        cut = min([shared[g]] + [len(prompts[i]) - 1 for i in members])
        for i in members:
            group_of[i], length[i] = g, cut
    return group_of, length


def left_padded(
    seqs: Sequence[Sequence[int]], pad_id: int, offsets: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention, positions), each (N, max length), on the CPU: the sequences
    left-padded, so that every row's last token sits in the last column. Positions count real
    tokens from `offsets` (default 0) and are 0 on padding. Pure."""
    N, L = len(seqs), max(len(x) for x in seqs)
    ids = torch.full((N, L), pad_id, dtype=torch.long)
    attention = torch.zeros((N, L), dtype=torch.long)
    for n, x in enumerate(seqs):
        ids[n, L - len(x) :] = torch.tensor(list(x), dtype=torch.long)
        attention[n, L - len(x) :] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    if offsets is not None:
        positions = (positions + torch.tensor(list(offsets))[:, None]) * attention
    return ids, attention, positions


class HFRolloutEngine:
    """Samples from `model` itself (shared weights: sync_weights is a no-op).

    `autocast_dtype` (model.autocast): the forward passes run under torch.autocast in that
    dtype, one context around a whole `generate` so the weights are cast once per call, not
    once per decoded token; the sampler works in float32 on the upcast logits."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        stop_ids: list[int],
        batch_size: int = 32,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]

    def sync_weights(self) -> None:
        pass

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, generator: Generators
    ) -> list[Rollout]:
        if not isinstance(generator, torch.Generator) and len(generator) != len(prompts):
            raise ValueError(f"{len(generator)} generators for {len(prompts)} prompts")
        out: list[Rollout] = []
        with autocast(self.autocast_dtype, self.model.device):
            for i in range(0, len(prompts), self.batch_size):
                batch = slice(i, i + self.batch_size)
                gens = generator if isinstance(generator, torch.Generator) else generator[batch]
                out.extend(self._generate_batch(prompts[batch], params, gens))
        return out

    def _prefill(
        self, prompts: list[tuple[int, ...]]
    ) -> tuple[torch.Tensor, Cache, torch.Tensor, torch.Tensor]:
        """Run U distinct prompts through the model. Returns (last logits (U, V), the KV cache
        of (U, L) columns, the attention mask (U, L) over those columns, the position of each
        prompt's last token (U, 1)).

        Prompts that share a long prefix (the system prompt of a GEPA candidate, over its
        problems; a population prompt over a step's problems) run that prefix ONCE: first
        the distinct prefixes, then each prompt's rest on top of its prefix's cache (its
        rows copied), as vLLM's prefix caching does. Columns: [left-padded prefix | left-
        padded rest], so the padding between the two is masked out and positions count real
        tokens only."""
        device = self.model.device
        prefix_of, prefix_len = shared_prefixes(prompts, MIN_SHARED_PREFIX)
        if len(set(prefix_of)) == len(prompts):  # nothing shared: one plain prefill
            return self._forward(list(prompts))
        prefixes: dict[int, tuple[int, ...]] = {}
        for u, p in enumerate(prompts):
            prefixes.setdefault(prefix_of[u], p[: prefix_len[u]])
        _, cache, pre_mask, pre_pos = self._forward(list(prefixes.values()))
        slot = {g: k for k, g in enumerate(prefixes)}  # group id -> its row in the first forward
        group = torch.tensor([slot[g] for g in prefix_of], device=device)
        cache.batch_select_indices(group)  # (G, ...) -> (U, ...)
        rests = [list(p[n:]) for p, n in zip(prompts, prefix_len, strict=True)]
        return self._forward(
            rests, cache, pre_mask.index_select(0, group), pre_pos.index_select(0, group)
        )

    def _forward(
        self,
        prompts: list[list[int]] | list[tuple[int, ...]],
        cache: Cache | None = None,
        past_mask: torch.Tensor | None = None,
        past_last_pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Cache, torch.Tensor, torch.Tensor]:
        """One left-padded forward of `prompts` (each >= 1 token), after `cache` when given
        (whose columns `past_mask` (U, P) masks, and whose last real token per row sits at
        position `past_last_pos` (U, 1)). Returns (last logits (U, V), the cache, the mask of
        all its columns (U, P + L), the last token's position (U, 1))."""
        model, device = self.model, self.model.device
        input_ids, attention, positions = (x.to(device) for x in left_padded(prompts, self.pad_id))
        if past_last_pos is not None:  # positions (U, L) continue after the cached columns
            positions = positions + past_last_pos + 1
        full_mask = attention if past_mask is None else torch.cat([past_mask, attention], dim=1)
        # logits_to_keep=1: only the last position's logits are needed; the LM head (49k x 576
        # for SmolLM2) never runs over the rest of the prompt.
        out = model(
            input_ids=input_ids,
            attention_mask=full_mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :], out.cache, full_mask, positions[:, -1:]

    @torch.no_grad()
    def _generate_batch(
        self, prompts: list[list[int]], params: SamplingParams, generator: Generators
    ) -> list[Rollout]:
        model, device = self.model, self.model.device
        was_training = model.training
        model.eval()
        B, N = len(prompts), params.max_new_tokens

        # The G rollouts of a problem share their prompt: run the prompt (prefill) once per
        # DISTINCT prompt, then copy its KV cache and last logits to every row that uses it.
        # The prefill was ~a quarter of the decoding FLOPs at G=8 and 128 new tokens.
        distinct: dict[tuple[int, ...], int] = {}
        row_of = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        logits_u, cache, attention, last_pos = self._prefill(list(distinct))
        L = attention.shape[1]  # prompt columns (with a shared prefix: its and the rests')
        rows_idx = torch.tensor(row_of, device=device)
        logits = logits_u.index_select(0, rows_idx)  # (B, V)
        # A float32 attention (fst.model.FLOAT32_ATTENTION) reads float32 keys: keep them in
        # float32, so a decoding step casts its one new position, not the whole cache. (Under
        # bf16 autocast the keys come out of the rotary embedding in float32 already.) The
        # values stay in the dtype they were projected in (bf16 under autocast): its decoding
        # attention reads them as they are, half the bytes of a float32 copy.
        key_dtype = torch.float32 if attends_in_float32(model) else None
        cache = _preallocate(cache, rows_idx, L + N, key_dtype)
        next_pos = last_pos.index_select(0, rows_idx) + 1  # (B, 1)
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
        row_gens = None if isinstance(generator, torch.Generator) else list(generator)
        for t in range(N):
            gens = generator if row_gens is None else [row_gens[r] for r in rows]
            tok, lp = sample_next(logits, params, gens)  # (b,), (b,)
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

    keys, values: (B, H, n, D) the prefill's cache; the buffers are (B, H, capacity, D), the
    keys' in `key_dtype` (default: their own), the values' in their own dtype; new positions
    are cast to the buffer's dtype as they are written.
    """

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        capacity: int,
        key_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        b, h, n, d = keys.shape
        self.dtype, self.device = key_dtype or keys.dtype, keys.device
        self._k = keys.new_empty((b, h, capacity, d), dtype=key_dtype or keys.dtype)
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


def _preallocate(
    cache: Cache, rows: torch.Tensor, capacity: int, key_dtype: torch.dtype | None = None
) -> Cache:
    """The prefill's cache expanded to one row per rollout (`rows` (B,) maps each rollout to its
    distinct prompt), with plain layers moved into preallocated buffers, keys in `key_dtype`
    (default: their own; other layer kinds, e.g. sliding-window ones, keep their own logic and
    just get their rows selected)."""
    cache.batch_select_indices(rows)  # every layer kind: (U, ...) -> (B, ...)
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.keys is not None and layer.values is not None:
            cache.layers[i] = _PreallocatedLayer(layer.keys, layer.values, capacity, key_dtype)
    return cache
