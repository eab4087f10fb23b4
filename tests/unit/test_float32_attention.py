"""fst.model.FLOAT32_ATTENTION: under bfloat16 autocast on the CPU the policy's attention runs
in float32 (torch's CPU SDPA kernels are several times slower in bfloat16), the linear layers
stay in bfloat16, and the rollout engine keeps its KV cache in float32 for it."""

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


def test_engine_keeps_a_float32_cache_and_samples_what_a_full_forward_scores(models, monkeypatch):
    _, fp32 = models
    assert attends_in_float32(fp32)
    cache_dtypes: list[torch.dtype] = []
    real_preallocate = hf_engine._preallocate

    def spy(cache, rows, capacity, dtype=None):
        out = real_preallocate(cache, rows, capacity, dtype)
        cache_dtypes.extend(t.dtype for layer in out.layers for t in (layer.keys, layer.values))
        return out

    monkeypatch.setattr(hf_engine, "_preallocate", spy)
    engine = HFRolloutEngine(fp32, Tok(), [1], 8, autocast_dtype=torch.bfloat16)
    prompts = [[5, 6, 7, 8], [9, 10]]
    rollouts = engine.generate(prompts, SamplingParams(max_new_tokens=6), torch.Generator())
    assert cache_dtypes and set(cache_dtypes) == {torch.float32}
    # The trainer's view of the same tokens: one forward under the same autocast.
    assert_logprobs_of_a_full_forward(fp32, rollouts, autocast=torch.bfloat16, abs=0.03)


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
