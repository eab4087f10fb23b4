"""fst.model.FLOAT32_ATTENTION: under bfloat16 autocast on the CPU the policy's attention runs
in float32 (torch's CPU SDPA kernels are several times slower in bfloat16), the linear layers
stay in bfloat16, and the rollout engine keeps its cached keys in float32 for it; a decoding
step (one query per row) runs as two matmuls and a softmax."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fst.config import ModelConfig
from fst.model import FLOAT32_ATTENTION, attends_in_float32, load_policy
from fst.rollout import SamplingParams
from fst.rollout import hf as hf_engine
from fst.rollout.hf import HFRolloutEngine
from tests.conftest import IdsTok as Tok
from tests.conftest import assert_logprobs_of_a_full_forward
from tests.tiny_model import tiny_model_dir  # noqa: F401  (fixture)


@pytest.fixture
def models(tiny_llama):
    """(the tiny Llama with transformers' sdpa, a copy with FLOAT32_ATTENTION)."""
    fp32_attention = copy.deepcopy(tiny_llama)
    fp32_attention.set_attn_implementation(FLOAT32_ATTENTION)
    return tiny_llama, fp32_attention


class AttentionKernelDtypes(TorchDispatchMode):
    """The query dtype every attention KERNEL receives: below autocast, which casts SDPA's
    inputs itself (transformers' rotary embedding hands SDPA float32 queries and keys even
    under bf16 autocast, so a Python-level look at its arguments says nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.__name__:
            self.seen.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


IDS = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # a left-padded row


def test_without_autocast_it_is_exactly_sdpa(models):
    sdpa, fp32 = models
    with torch.no_grad():
        a = sdpa(input_ids=IDS, attention_mask=MASK).logits
        b = fp32(input_ids=IDS, attention_mask=MASK).logits
    assert torch.equal(a, b)


def test_under_bf16_autocast_only_the_attention_runs_in_float32(models):
    sdpa, fp32 = models
    linear_out: list[torch.dtype] = []
    fp32.model.layers[0].self_attn.o_proj.register_forward_hook(
        lambda m, i, o: linear_out.append(o.dtype)
    )
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with AttentionKernelDtypes() as stock:
            ref = sdpa(input_ids=IDS, attention_mask=MASK).logits
        with AttentionKernelDtypes() as ours:
            out = fp32(input_ids=IDS, attention_mask=MASK).logits
    assert stock.seen and set(stock.seen) == {torch.bfloat16}  # what sdpa does under autocast
    assert ours.seen and set(ours.seen) == {torch.float32}
    assert linear_out == [torch.bfloat16]  # the projections around it stay bf16
    with torch.no_grad():
        exact = sdpa(input_ids=IDS, attention_mask=MASK).logits
    # Nearer to the float32 model than the all-bf16 forward is, on the rows' real tokens.
    real = MASK.bool()
    assert (out.float() - exact)[real].abs().max() <= (ref.float() - exact)[real].abs().max()


def test_engine_keeps_float32_keys_and_samples_what_a_full_forward_scores(models, monkeypatch):
    _, fp32 = models
    assert attends_in_float32(fp32)
    key_dtypes: list[torch.dtype] = []
    value_dtypes: list[torch.dtype] = []
    real_preallocate = hf_engine._preallocate

    def spy(cache, rows, capacity, key_dtype=None):
        out = real_preallocate(cache, rows, capacity, key_dtype)
        key_dtypes.extend(layer.keys.dtype for layer in out.layers)
        value_dtypes.extend(layer.values.dtype for layer in out.layers)
        return out

    monkeypatch.setattr(hf_engine, "_preallocate", spy)
    engine = HFRolloutEngine(fp32, Tok(), [1], 8, autocast_dtype=torch.bfloat16)
    prompts = [[5, 6, 7, 8], [9, 10]]
    rollouts = engine.generate(prompts, SamplingParams(max_new_tokens=6), torch.Generator())
    # Keys in float32 (the attention's dtype), values as projected under autocast (bf16).
    assert key_dtypes and set(key_dtypes) == {torch.float32}
    assert value_dtypes and set(value_dtypes) == {torch.bfloat16}
    # The trainer's view of the same tokens: one forward under the same autocast.
    assert_logprobs_of_a_full_forward(fp32, rollouts, autocast=torch.bfloat16, abs=0.03)


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
def test_a_decoding_step_attends_as_the_sdpa_kernel_does(value_dtype):
    """One query per row (decoding) takes two matmuls and a softmax instead of the SDPA
    kernel: the same output over left-padded rows and grouped key-value heads, exactly in
    float32 and within the values' rounding in bf16."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from fst.model import _sdpa_float32

    g = torch.Generator().manual_seed(0)
    B, H, kv_heads, n, D = 3, 6, 2, 9, 8
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = H // kv_heads, True
    query = torch.randn(B, H, 1, D, generator=g)
    key = torch.randn(B, kv_heads, n, D, generator=g)
    value = torch.randn(B, kv_heads, n, D, generator=g).to(value_dtype)
    mask = torch.ones(B, 1, 1, n, dtype=torch.bool)
    mask[0, ..., :4] = False  # a left-padded row
    mask[2, ..., :1] = False
    tol = 1e-6 if value_dtype == torch.float32 else 2e-2
    for attention_mask in (mask, None):
        out, _ = _sdpa_float32(module, query, key, value, attention_mask, scaling=D**-0.5)
        ref, _ = sdpa_attention_forward(
            module, query, key, value.float(), attention_mask, scaling=D**-0.5
        )
        assert out.shape == ref.shape == (B, 1, H, D)
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    # A padded key never counts: changing it changes nothing.
    masked, _ = _sdpa_float32(module, query, key, value, mask, scaling=D**-0.5)
    key[0, :, :4] += 100.0
    again, _ = _sdpa_float32(module, query, key, value, mask, scaling=D**-0.5)
    assert torch.equal(again, masked)


def test_load_policy_picks_it_for_bf16_autocast_on_the_cpu_only(tiny_model_dir):  # noqa: F811
    mixed = load_policy(ModelConfig(name=str(tiny_model_dir), device="cpu", autocast="bfloat16"))
    plain = load_policy(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    assert mixed.config._attn_implementation == FLOAT32_ATTENTION and attends_in_float32(mixed)
    assert plain.config._attn_implementation == "sdpa" and not attends_in_float32(plain)


def test_a_saved_model_does_not_record_it(models, tmp_path):
    """Checkpoints must load where fst.model was never imported (vLLM, a user's transformers):
    the attention choice is the loader's, not part of the saved config."""
    import json

    _, fp32 = models
    fp32.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert FLOAT32_ATTENTION not in json.dumps(config)
