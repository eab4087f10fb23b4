"""The transformers rollout engine and the KL probe, on a tiny random Llama (the same code
path as SmolLM2): determinism under a seed, left padding, stop tokens, sampler logprobs."""

from __future__ import annotations

import copy

import pytest
import torch

from fst.metrics import kl_to_base
from fst.rollout import SamplingParams
from fst.rollout.hf import HFRolloutEngine, sample_next, shared_prefixes
from tests.conftest import IdsTok as Tok
from tests.conftest import assert_logprobs_of_a_full_forward


@pytest.fixture
def model(tiny_llama):
    return tiny_llama


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]


def test_same_seed_same_samples_and_logprobs_match_a_full_forward(model):
    eng = HFRolloutEngine(model, Tok(), stop_ids=[1], batch_size=8)
    p = SamplingParams(temperature=0.9, max_new_tokens=6)
    a = eng.generate(PROMPTS, p, torch.Generator().manual_seed(1))
    b = eng.generate(PROMPTS, p, torch.Generator().manual_seed(1))
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    assert_logprobs_of_a_full_forward(model, a, temperature=0.9)


def test_a_row_with_its_own_generator_samples_the_same_in_any_batch(model):
    """One generator per prompt: a row's completion depends on its own generator only, not on
    the other rows of the call, their order, or the engine's batch size (GEPA compares
    candidates on common random numbers this way)."""
    eng = HFRolloutEngine(model, Tok(), stop_ids=[1], batch_size=8)
    p = SamplingParams(temperature=1.0, max_new_tokens=8)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    alone = eng.generate([PROMPTS[1]], p, gens([7]))[0].completion_ids
    mixed = eng.generate([*PROMPTS, PROMPTS[1]], p, gens([3, 7, 5, 9]))
    assert mixed[1].completion_ids == alone
    reordered = eng.generate([PROMPTS[2], PROMPTS[1], PROMPTS[0]], p, gens([5, 7, 3]))
    assert reordered[1].completion_ids == alone
    assert reordered[2].completion_ids == mixed[0].completion_ids
    small = HFRolloutEngine(model, Tok(), stop_ids=[1], batch_size=1)
    assert small.generate(PROMPTS, p, gens([3, 7, 5]))[1].completion_ids == alone
    # Another seed, another sample (8 tokens over a 100-token vocabulary).
    assert eng.generate([PROMPTS[1]], p, gens([8]))[0].completion_ids != alone
    with pytest.raises(ValueError, match="2 generators for 3 prompts"):
        eng.generate(PROMPTS, p, gens([1, 2]))


def test_left_padded_batch_equals_one_by_one_greedy(model):
    eng_batch = HFRolloutEngine(model, Tok(), stop_ids=[1], batch_size=8)
    eng_single = HFRolloutEngine(model, Tok(), stop_ids=[1], batch_size=1)
    p = SamplingParams(max_new_tokens=8, greedy=True)
    g = torch.Generator()
    batched = eng_batch.generate(PROMPTS, p, g)
    single = eng_single.generate(PROMPTS, p, g)
    assert [r.completion_ids for r in batched] == [r.completion_ids for r in single]


def test_stop_token_ends_completion_and_is_kept(model):
    greedy = SamplingParams(max_new_tokens=5, greedy=True)
    first = [
        r.completion_ids[0]
        for r in HFRolloutEngine(model, Tok(), stop_ids=[39]).generate(
            PROMPTS, greedy, torch.Generator()
        )
    ]
    eng = HFRolloutEngine(model, Tok(), stop_ids=sorted(set(first)), batch_size=8)
    rs = eng.generate(PROMPTS, greedy, torch.Generator())
    # Every first token is now a stop token: each completion is that one token, kept in the
    # ids (the policy learns when to stop) but not in the text.
    for r, tok in zip(rs, first, strict=True):
        assert r.finished and r.completion_ids == [tok] and r.text == ""
    rs = HFRolloutEngine(model, Tok(), stop_ids=[39]).generate(
        PROMPTS, SamplingParams(max_new_tokens=4, greedy=True), torch.Generator()
    )
    assert all(len(r.completion_ids) == 4 and not r.finished for r in rs)


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = SamplingParams(top_p=0.7)
    seen = {int(sample_next(logits, p, torch.Generator().manual_seed(s))[0]) for s in range(200)}
    assert seen == {0, 1}


def test_kl_probe_is_zero_for_the_base_and_positive_after_a_change(model):
    eng = HFRolloutEngine(model, Tok(), stop_ids=[1])
    ref = copy.deepcopy(model)
    p = SamplingParams(max_new_tokens=5)
    assert kl_to_base(model, ref, eng, PROMPTS, p, pad_id=0) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))
    kl = kl_to_base(model, ref, eng, PROMPTS, p, pad_id=0)
    assert kl > 1e-3
    assert kl_to_base(model, ref, eng, PROMPTS, p, pad_id=0) == kl  # fixed probe seed


def test_shared_prompts_decode_like_distinct_ones(model):
    """Rows with the same prompt share one prefill; each still decodes like a prompt alone."""
    eng = HFRolloutEngine(model, Tok(), stop_ids=[1], batch_size=8)
    p = SamplingParams(max_new_tokens=7, greedy=True)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[1]]
    shared = eng.generate(prompts, p, torch.Generator())
    alone = [eng.generate([q], p, torch.Generator())[0] for q in prompts]
    assert [r.completion_ids for r in shared] == [r.completion_ids for r in alone]
    for a, b in zip(shared, alone, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    # Sampled rows with one prompt get their own tokens (the cache rows are copies, not views).
    sampled = eng.generate([PROMPTS[0]] * 6, SamplingParams(max_new_tokens=6), torch.Generator())
    assert len({tuple(r.completion_ids) for r in sampled}) > 1


def test_sampler_draws_from_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(20000, 1)
    p = SamplingParams(temperature=0.8)
    tokens, logprobs = sample_next(logits, p, torch.Generator().manual_seed(0))
    want = torch.softmax(logits[0] / 0.8, -1)
    freq = torch.bincount(tokens, minlength=5).float() / len(tokens)
    assert torch.allclose(freq, want, atol=0.015)
    assert torch.allclose(logprobs, torch.log(want)[tokens], atol=1e-6)
    # With top-p the truncated tokens are never drawn, and each logprob is that of the nucleus
    # it was drawn from: softmax renormalised over tokens {0, 1}, the frequencies seen.
    tokens, logprobs = sample_next(logits, SamplingParams(top_p=0.8), torch.Generator())
    assert set(tokens.tolist()) == {0, 1}
    nucleus = torch.softmax(logits[0, :2], -1)
    assert torch.allclose(logprobs, torch.log(nucleus)[tokens], atol=1e-6)
    freq = torch.bincount(tokens, minlength=2).float() / len(tokens)
    assert torch.allclose(freq, nucleus, atol=0.015)


def test_block_search_picks_the_token_one_running_sum_picks():
    """invert_cdf's two-level search (a block of the vocabulary, then a token in it) returns
    the token a single float64 running sum over the row returns, for vocabularies that are and
    are not a multiple of the block, with empty blocks, empty rows ends, and u near 0 and 1."""
    from fst.rollout.hf import CDF_BLOCK, invert_cdf

    gen = torch.Generator().manual_seed(0)
    for V in (5, CDF_BLOCK, 3 * CDF_BLOCK + 17):
        w = torch.rand((64, V), generator=gen) ** 4
        w[w < 0.2] = 0.0
        w[:8, : V // 2] = 0.0  # a run of empty blocks before the mass
        w[8:16, V // 2 :] = 0.0  # and after it
        w[16, :] = 0.0
        w[16, V - 1] = 1.0  # all the mass on the last token
        w[w.sum(-1) == 0, 0] = 1.0  # (a row the sampler sees always has some mass)
        u = torch.rand((64, 1), generator=gen, dtype=torch.float64)
        u[:4] = 0.0
        u[4:8] = 1.0 - 1e-12
        cdf = w.double().cumsum(-1)
        want = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
        got = invert_cdf(w, u)
        assert torch.equal(got, want), V
        assert bool((w[torch.arange(64), got] > 0).all())


def test_shared_prefixes_groups_prompts_by_their_common_start():
    system = list(range(20, 40))  # 20 tokens, like a system prompt
    prompts = [[*system, 5, 6], [7, 8, 9], [*system, 5, 9, 9], [*system[:18], 1], system]
    group, length = shared_prefixes(prompts, min_shared=16)
    # The four that start with (most of) the system prompt are one group; what they all share
    # is its first 18 tokens; the plain prompt is a group of its own.
    assert len({group[i] for i in (0, 2, 3, 4)}) == 1 and group[1] != group[0]
    assert [length[i] for i in (0, 2, 3, 4)] == [18] * 4
    assert length[1] == 2  # alone: all but its last token
    # A prompt that IS the shared prefix keeps its last token for the second forward.
    group, length = shared_prefixes([system, [*system, 5]], min_shared=16)
    assert group[0] == group[1] and length == [19, 19]
    # Below min_shared nothing is grouped.
    group, _ = shared_prefixes([[*system[:10], 1], [*system[:10], 2]], min_shared=16)
    assert group[0] != group[1]


def test_a_shared_prefix_runs_once_and_changes_no_sample(model):
    """Prompts that share a long prefix (a system prompt over several problems) prefill it
    once; the samples and logprobs are those of a full forward of each row, and greedy
    decoding gives what one-prompt-at-a-time decoding gives."""
    system = [(7 * i) % 45 + 3 for i in range(20)]
    prompts = [[*system, 5, 6, 7], [*system, 8], [*system, 9, 10], [11, 12, 13]]
    shapes: list[tuple[int, ...]] = []
    hook = model.model.embed_tokens.register_forward_hook(
        lambda m, i, o: shapes.append(tuple(i[0].shape))
    )
    eng = HFRolloutEngine(model, Tok(), stop_ids=[1], batch_size=8)
    p = SamplingParams(temperature=0.9, max_new_tokens=6)
    out = eng.generate(prompts, p, torch.Generator().manual_seed(2))
    hook.remove()
    # First forward: the shared prefix once, and the lone prompt's all-but-last; second: the
    # rests (3 tokens at most), not 23-token prompts.
    assert shapes[0] == (2, 20) and shapes[1] == (4, 3)
    assert_logprobs_of_a_full_forward(model, out, temperature=0.9)
    greedy = SamplingParams(max_new_tokens=8, greedy=True)
    single = HFRolloutEngine(model, Tok(), stop_ids=[1], batch_size=1)
    g = torch.Generator()
    assert [r.completion_ids for r in eng.generate(prompts, greedy, g)] == [
        r.completion_ids for r in single.generate(prompts, greedy, g)
    ]


def test_system_prompts_that_begin_alike_are_not_merged_into_one_short_prefix():
    seed = list(range(20, 40))
    a, b = seed + list(range(1, 31)), seed + list(range(2, 32))  # two longer system prompts
    prompts = [[*s, q] for s in (a, b) for q in (41, 42, 43, 44)]
    group, length = shared_prefixes(prompts, min_shared=16)
    assert group[:4] == [group[0]] * 4 and group[4:] == [group[4]] * 4 and group[0] != group[4]
    assert length == [50] * 8  # each its whole system prompt, not the 20 seed tokens
