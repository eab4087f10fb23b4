"""The slow trainer on a tiny randomly initialised Llama (same code path as SmolLM2)."""

from __future__ import annotations

import pytest
import torch

from fst.config import SlowConfig
from fst.rollout import Rollout
from fst.slow.trainer import SlowTrainer, pack, token_logprobs


@pytest.fixture
def model(tiny_llama):
    return tiny_llama


def rollouts_from(model, prompts, completions):
    """Rollouts whose sampler logprobs are the model's own (ratio 1)."""
    out = []
    for p, c in zip(prompts, completions, strict=True):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        lp = [float(logp[len(p) - 1 + t, tok]) for t, tok in enumerate(c)]
        out.append(Rollout(p, c, lp, "", True))
    return out


def test_window_logprobs_equal_full_forward(model):
    rs = rollouts_from(model, [[1, 2, 3, 4, 5], [6, 7]], [[8, 9, 10], [11, 12, 13, 14]])
    batch = pack(rs, [1.0, -1.0], pad_id=0, device=torch.device("cpu"))
    assert batch.start == 1  # shortest prompt has 2 tokens: position 1 predicts completion[0]
    with torch.no_grad():
        logp, entropy = token_logprobs(model, batch, temperature=1.0)
    got = (logp * batch.mask).sum(1)
    want = torch.tensor([sum(r.logprobs) for r in rs])
    assert torch.allclose(got, want, atol=1e-5)
    assert int(batch.mask.sum()) == 7 and (entropy[batch.mask > 0] > 0).all()


def test_step_updates_only_with_signal_and_is_micro_batch_invariant(model):
    import copy

    rs = rollouts_from(model, [[1, 2, 3]] * 4, [[4, 5], [6], [7, 8, 9], [10]])
    adv = [1.0, -1.0, 0.5, -0.5]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ta = SlowTrainer(a, SlowConfig(micro_batch_size=4, lr=1e-2), 1.0, pad_id=0)
    tb = SlowTrainer(b, SlowConfig(micro_batch_size=1, lr=1e-2), 1.0, pad_id=0)
    ma, mb = ta.step(rs, adv), tb.step(rs, adv)
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5)
    assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-4)
    # Same gradient either way (compared before Adam, whose first step is ~lr*sign(g) and so
    # magnifies float noise in near-zero gradients).
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6, rtol=1e-4)
    before = [p.detach().clone() for p in model.parameters()]
    assert ta.step(rs, [0.0] * 4)["updated"] == 0.0  # no signal: the weights stay put
    ta2 = SlowTrainer(model, SlowConfig(lr=1e-2), 1.0, pad_id=0)
    assert ta2.step(rs, [0.0] * 4)["updated"] == 0.0
    assert all(torch.equal(x, y) for x, y in zip(before, model.parameters(), strict=True))
    assert ma["ratio_mean"] == pytest.approx(1.0, abs=1e-4) and ma["clip_frac"] == 0.0


def test_measured_entropy_is_the_training_entropy_without_touching_the_weights(model):
    """Mode gepa's entropy (a no-grad forward) is the number a training step reports on the
    same batch: the same tokens (groups with signal only) and the same softmax(logits / T)."""
    import copy

    rs = rollouts_from(
        model, [[1, 2, 3]] * 4 + [[4, 5]] * 2, [[4, 5], [6], [7, 8, 9], [10], [11], [12, 13]]
    )
    adv = [1.0, -1.0, 0.5, -0.5, 0.0, 0.0]  # the last group is flat: not trained, not measured
    frozen = SlowTrainer(model, SlowConfig(micro_batch_size=3), 0.7, pad_id=0)
    before = [p.detach().clone() for p in model.parameters()]
    measured = frozen.measure_entropy(rs, adv)
    assert all(torch.equal(x, y) for x, y in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
    trained = SlowTrainer(copy.deepcopy(model), SlowConfig(micro_batch_size=2), 0.7, 0).step(
        rs, adv
    )
    assert measured["entropy_tokens"] == trained["trained_tokens"] == 7
    assert measured["entropy"] == pytest.approx(trained["entropy"], rel=1e-5)
    assert measured["entropy"] > 0
    flat = frozen.measure_entropy(rs, [0.0] * 6)
    assert flat["entropy_tokens"] == 0 and flat["entropy"] != flat["entropy"]  # NaN: no signal


def assert_same_as_one_forward_per_row(model, shared, rs, adv):
    """The shared-prompt forward of `shared` (packed from `rs`) gives the logprobs, and the
    gradient, of one forward over every row's prompt + completion."""
    import copy

    from fst.slow.trainer import shared_prompt_logprobs

    a, b = copy.deepcopy(model), copy.deepcopy(model)
    logp_a, _ = shared_prompt_logprobs(a, shared, temperature=0.7)
    full = pack(rs, adv, pad_id=0, device=torch.device("cpu"))
    logp_b, _ = token_logprobs(b, full, temperature=0.7)
    per_row_a = (logp_a * shared.mask).sum(1)
    per_row_b = (logp_b * full.mask).sum(1)
    assert torch.allclose(per_row_a, per_row_b, atol=1e-5)

    (per_row_a * shared.adv).sum().backward()
    (per_row_b * full.adv).sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6, rtol=1e-4)


# Overheads per completion forward: 0 runs each completion length in a forward of its own,
# 10**6 all completions in one forward (as under FSDP).
BUCKETINGS = [0, 10**6]


@pytest.mark.parametrize("overhead", BUCKETINGS)
def test_shared_prompt_forward_equals_one_forward_per_row(model, overhead, monkeypatch):
    """Running each distinct prompt once (KV cache copied to its rows) gives the same
    logprobs, and the same gradient, as running every row's prompt + completion."""
    monkeypatch.setattr("fst.slow.trainer.FORWARD_OVERHEAD_TOKENS", overhead)
    from fst.slow.trainer import pack_shared

    prompts = [[1, 2, 3, 4], [5, 6], [1, 2, 3, 4], [5, 6], [7, 8, 9]]
    completions = [[10, 11, 12], [13], [14, 15], [16, 17, 18, 19], [20, 21]]
    rs = rollouts_from(model, prompts, completions)
    adv = [1.0, -0.5, 0.25, 2.0, -1.0]

    shared = pack_shared(rs, adv, pad_id=0, device=torch.device("cpu"))
    assert shared.prompt_ids.shape[0] == 3  # three distinct prompts for five rows
    assert shared.prefix_ids is None  # no prefix shared: no prefix stage
    assert_same_as_one_forward_per_row(model, shared, rs, adv)


SYSTEM_A = [30 + i % 19 for i in range(20)]  # two 20-token "system prompts", shared by
SYSTEM_B = [31 + i % 17 for i in range(18)]  # their problems (vocabulary: 50)


@pytest.mark.parametrize("overhead", BUCKETINGS)
@pytest.mark.parametrize("split", [None, True])  # auto (as some prefix is shared), forced (FSDP)
def test_shared_prefix_forward_equals_one_forward_per_row(model, split, overhead, monkeypatch):
    """Prompts that share a system prompt run it once, then their rests on top of it, then
    their completions: the same logprobs and the same gradient as one forward per row."""
    monkeypatch.setattr("fst.slow.trainer.FORWARD_OVERHEAD_TOKENS", overhead)
    from fst.slow.trainer import pack_shared

    prompts = [
        [*SYSTEM_A, 1, 2],
        [*SYSTEM_A, 3, 4, 5],
        [*SYSTEM_B, 1, 2],
        [*SYSTEM_A, 1, 2],
        [*SYSTEM_B, 6],
        [7, 8, 9],
    ]
    completions = [[10, 11, 12], [13], [14, 15], [16, 17, 18, 19], [20, 21], [22]]
    rs = rollouts_from(model, prompts, completions)
    adv = [1.0, -0.5, 0.25, 2.0, -1.0, 0.5]

    shared = pack_shared(rs, adv, pad_id=0, device=torch.device("cpu"), split_prefixes=split)
    # Split: 3 prefixes x 20 + 5 rests x 3 = 75 padded tokens against 5 x 23 whole prompts.
    if split is None and overhead > 40:  # saving 40 tokens is not worth a forward
        assert shared.prefix_ids is None and shared.prompt_ids.shape == (5, 23)
    else:  # A, B, and the unshared prompt's all-but-last token (a "prefix" of its own)
        assert shared.prefix_ids is not None and shared.prefix_ids.shape[0] == 3
        assert shared.prompt_ids.shape[0] == 5  # five distinct prompts, their rests only
        assert shared.prompt_ids.shape[1] < len(SYSTEM_A)
    assert_same_as_one_forward_per_row(model, shared, rs, adv)


def test_completion_buckets_split_where_padding_costs_more_than_a_forward():
    from fst.slow.trainer import completion_buckets

    lengths = [0, 5, 100, 3, 98, 0]  # rows 0 and 5 need no forward
    # One forward: 4 x 100 + 10 = 410; {3, 5} and {98, 100}: 2 x 5 + 2 x 100 + 20 = 230;
    # three forwards: 238.
    assert completion_buckets(lengths, 10) == [[0, 5], [3, 1], [4, 2]]
    assert completion_buckets(lengths, 10**6) == [[0, 5], [3, 1, 4, 2]]
    assert completion_buckets(lengths, 0) == [[0, 5], [3], [1], [4], [2]]
    assert completion_buckets([7, 7, 7], 0) == [[0, 1, 2]]  # no padding to save
    assert completion_buckets([], 5) == []


def test_micro_batches_group_rows_by_system_prompt(model):
    """K system prompts over one problem (FST's step order) become micro-batches of one system
    prompt over its problems; flat groups stay out."""
    tr = SlowTrainer(model, SlowConfig(micro_batch_size=2), 1.0, pad_id=0)
    prompts = [[*SYSTEM_A, 1], [*SYSTEM_B, 1], [*SYSTEM_A, 2], [*SYSTEM_B, 2], [*SYSTEM_A, 3]]
    rs = [Rollout(p, [5], [0.0], "", True) for p in prompts]
    local, n_micro = tr._micro_batches(rs, [1.0, -1.0, 1.0, -1.0, 0.0])
    assert n_micro == 2 and local == [[0, 2], [1, 3]]


def test_sampler_logprobs_with_temperature_give_ratio_one(model):
    """The trainer's log π_θ at the sampling temperature equals the engine's logprobs."""
    from fst.rollout import SamplingParams
    from fst.rollout.hf import HFRolloutEngine

    class Tok:
        pad_token_id = 0

        def decode(self, ids, skip_special_tokens=True):
            return ""

    eng = HFRolloutEngine(model, Tok(), stop_ids=[1], batch_size=8)
    rs = eng.generate(
        [[5, 6, 7], [5, 6, 7], [8, 9]], SamplingParams(0.7, 1.0, 6), torch.Generator()
    )
    tr = SlowTrainer(model, SlowConfig(micro_batch_size=2), 0.7, pad_id=0)
    m = tr.backward(rs, [1.0, -1.0, 0.5])
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and m["clip_frac"] == 0.0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprob_matches_autograd_reference(temperature):
    from fst.slow.trainer import logp_entropy

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64) * 3
    targets = torch.randint(0, 11, (2, 5))
    weights = torch.randn(2, 5, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    logp, entropy = logp_entropy(x, targets, temperature)
    (weights * logp).sum().backward()

    y = logits.clone().requires_grad_()
    ref_all = torch.log_softmax(y / temperature, -1)
    ref_logp = ref_all.gather(-1, targets[..., None]).squeeze(-1)
    (weights * ref_logp).sum().backward()
    ref_entropy = -(ref_all.exp() * ref_all).sum(-1)
    # logp_entropy computes in float32 (the reference here in float64).
    assert torch.allclose(logp.double(), ref_logp, atol=1e-5)
    assert torch.allclose(entropy.double(), ref_entropy.detach(), atol=1e-5)
    assert torch.allclose(x.grad, y.grad, atol=1e-5)


def test_mini_batches_cover_the_batch_in_order():
    from fst.slow.trainer import mini_batches

    assert mini_batches(8, 1) == [range(0, 8)]
    assert mini_batches(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert [len(r) for r in mini_batches(7, 3)] == [3, 2, 2]
    assert [i for r in mini_batches(7, 3) for i in r] == list(range(7))


def test_several_updates_per_batch_go_off_policy(model):
    """updatesPerBatch 2: the step is two updates, one per half of the batch, the second on a
    policy that is no longer the sampler: its ratios move off 1 and (with a low ε_max) the
    truncation binds. The step equals two single-update steps on the halves in turn."""
    import copy

    from fst.config import SlowConfig

    # The second half repeats the first: what update 1 made likelier, update 2 sees with ρ > 1.
    prompts = [[1, 2, 3]] * 8
    completions = [[4, 5], [6], [7, 8, 9], [10]] * 2
    rs = rollouts_from(model, prompts, completions)
    adv = [1.0, -1.0, 0.5, -0.5] * 2
    cfg = {"lr": 5e-2, "eps_max": 1.02, "micro_batch_size": 8}
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    two = SlowTrainer(a, SlowConfig(updates_per_batch=2, **cfg), 1.0, pad_id=0)
    m = two.step(rs, adv)
    assert m["updates"] == 2.0 and m["updated"] == 1.0
    assert m["trained_seqs"] == 8 and m["trained_tokens"] == sum(map(len, completions))
    assert m["ratio_min"] < 0.99  # the second half is off-policy both ways
    assert m["ratio_max"] > 1.02 and m["clip_frac"] > 0  # ε_max = 1.02 truncates some tokens

    one = SlowTrainer(b, SlowConfig(**cfg), 1.0, pad_id=0)
    first = one.step(rs[:4], adv[:4])
    second = one.step(rs[4:], adv[4:])
    assert first["ratio_max"] == pytest.approx(1.0, abs=1e-4)  # on-policy: ρ = 1
    assert m["loss"] == pytest.approx((first["loss"] + second["loss"]) / 2, rel=1e-5)
    assert m["clip_frac"] == pytest.approx(
        second["clip_frac"] * second["trained_tokens"] / m["trained_tokens"], rel=1e-6
    )
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_more_updates_than_rollouts_is_a_config_error():
    from pydantic import ValidationError

    from fst.config import SlowConfig

    with pytest.raises(ValidationError, match=r"updatesPerBatch \(9\) exceeds .* 8 rollouts"):
        SlowConfig(problems_per_step=4, group_size=2, updates_per_batch=9)


def test_bfloat16_autocast_samples_and_trains_in_bf16_with_float32_weights(model):
    """model.autocast: the decoder's matmuls run in bfloat16 while sampling and in the training
    forward; the weights and their gradients stay float32, the log-probs, ratio and loss are
    float32, and the gradient points where the float32 one does."""
    import copy

    from fst.rollout import SamplingParams
    from fst.rollout.hf import HFRolloutEngine

    class Tok:
        pad_token_id = 0

        def decode(self, ids, skip_special_tokens=True):
            return ""

    seen: list[torch.dtype] = []
    probe = model.model.layers[0].mlp.down_proj
    handle = probe.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    engine = HFRolloutEngine(model, Tok(), [1], 8, autocast_dtype=torch.bfloat16)
    rs = engine.generate(
        [[5, 6, 7], [5, 6, 7], [8, 9, 10, 11]], SamplingParams(1.0, 1.0, 6), torch.Generator()
    )
    assert seen and set(seen) == {torch.bfloat16}
    assert all(isinstance(lp, float) for r in rs for lp in r.logprobs)
    adv = [1.0, -1.0, 0.5]

    seen.clear()
    handle.remove()
    mixed, full = copy.deepcopy(model), copy.deepcopy(model)
    mixed.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    tm = SlowTrainer(mixed, SlowConfig(micro_batch_size=2), 1.0, 0, autocast_dtype=torch.bfloat16)
    tf = SlowTrainer(full, SlowConfig(micro_batch_size=2), 1.0, 0)
    m_mixed, m_full = tm.backward(rs, adv), tf.backward(rs, adv)
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in tm.params)
    # The sampler and the trainer are both bf16, by different paths (KV cache vs one forward):
    # the ratio is 1 only up to bf16 rounding, and the loss is within it of the float32 loss.
    assert m_mixed["ratio_mean"] == pytest.approx(1.0, abs=0.05)
    assert m_mixed["loss"] == pytest.approx(m_full["loss"], rel=0.05, abs=1e-3)
    g_mixed = torch.cat([p.grad.flatten() for p in tm.params])
    g_full = torch.cat([p.grad.flatten() for p in tf.params])
    assert float(torch.nn.functional.cosine_similarity(g_mixed, g_full, dim=0)) > 0.99
    # Outside the trainer and the engine nothing runs in bf16.
    seen.clear()
    with torch.no_grad():
        assert mixed(torch.tensor([[5, 6, 7]])).logits.dtype == torch.float32
    assert seen == [torch.float32]
