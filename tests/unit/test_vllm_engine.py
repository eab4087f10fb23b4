"""The vLLM rollout engine, WITHOUT vLLM (which needs a GPU; none here).

What is real: the import guard, the mapping of our SamplingParams to vLLM's keyword arguments,
the conversion of vLLM's outputs to Rollouts, the weights handed to vLLM (plain and LoRA-merged,
on a tiny Llama) and the engine's own call sequence. What is a stand-in: vLLM's output objects
(RequestOutput / CompletionOutput / Logprob, same attribute names as vLLM 0.33) and the `LLM`
object, whose methods record what the engine asked for. Whether real vLLM behaves as these
stand-ins assume is NOT verified here.
"""

from __future__ import annotations

import builtins
import copy
import importlib
import json
import os
import random
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import fst.loop
from fst.config import ConfigError, TrainConfig
from fst.rollout import SamplingParams
from fst.rollout.vllm import (
    INSTALL_HINT,
    VLLMRolloutEngine,
    check_rollout_config,
    import_vllm,
    policy_weights,
    request_seeds,
    sampling_kwargs,
    to_rollout,
    version_at_least,
)

STOP = [1, 2]

# ----------------------------------------------------------------------------- stand-ins


@dataclass
class Logprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:  # vllm.outputs.CompletionOutput (the fields we read)
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:  # vllm.outputs.RequestOutput (the fields we read)
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


class Tok:
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def completion(ids, lps, reason, other=None):
    """A CompletionOutput whose positions also hold a non-sampled token (as top-k would)."""
    positions = []
    for t, lp in zip(ids, lps, strict=True):
        pos = {t: Logprob(lp, rank=2)}
        if other is not None:
            pos[other] = Logprob(-0.01, rank=1)
        positions.append(pos)
    return CompletionOutput(0, "", ids, sum(lps), positions, reason)


# ----------------------------------------------------------------------------- import guard


def test_importing_the_module_never_imports_vllm(monkeypatch):
    seen = []
    real_import = builtins.__import__

    def tracking_import(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            seen.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", tracking_import)
    importlib.reload(sys.modules["fst.rollout.vllm"])
    assert seen == []


def test_missing_vllm_is_a_config_error_naming_the_setting_and_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(ConfigError) as e:
        import_vllm()
    msg = str(e.value)
    assert "rollout.engine: vllm" in msg
    assert INSTALL_HINT == "pip install 'fastslow[gpu]'" and INSTALL_HINT in msg
    assert "rollout.engine: hf" in msg


def test_too_old_vllm_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.8.5"))
    with pytest.raises(ConfigError, match=r"vLLM >= 0\.10\.2 \(found 0\.8\.5\)"):
        import_vllm()
    assert version_at_least("0.33.0", "0.10.2") and version_at_least("0.10.2", "0.10.2")
    assert not version_at_least("0.10.2rc1", "0.10.2") and not version_at_least("dev", "0.1")


def cfg(**rollout) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "task": {"name": "arithmetic", "trainSize": 4, "valSize": 2, "testSize": 2},
            "rollout": {"engine": "vllm", **rollout},
            "metrics": {"klPrompts": 0},
        }
    )


def test_top_p_below_one_is_refused_before_vllm_is_needed(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ConfigError, match=r"rollout\.topP: 0\.9 .*rollout\.engine: hf"):
        VLLMRolloutEngine.from_config(cfg(topP=0.9), None, Tok(), STOP)
    check_rollout_config(cfg().rollout)  # topP 1: fine


def test_build_run_selects_the_vllm_engine_by_config(monkeypatch, tmp_path, tiny_llama):
    """build_run's branch reaches the vLLM engine (whose import guard then speaks); the model
    loaders are replaced by the tiny Llama so no real model is loaded."""
    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.setattr(fst.loop, "load_tokenizer", lambda m: Tok())
    monkeypatch.setattr(fst.loop, "load_policy", lambda m: tiny_llama)
    monkeypatch.setattr(fst.loop, "stop_token_ids", lambda tok, model: STOP)
    c = cfg().model_copy(update={"output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"rollout\.engine: vllm needs the vLLM package"):
        fst.loop.build_run(c, tmp_path / "run")


# ----------------------------------------------------------------------------- mapping


def test_sampling_kwargs_sampled_and_greedy():
    kw = sampling_kwargs(SamplingParams(temperature=0.7, max_new_tokens=9), STOP, seed=123)
    assert kw == {
        "n": 1,
        "max_tokens": 9,
        "stop_token_ids": STOP,
        "ignore_eos": True,
        "logprobs": 0,
        "detokenize": False,
        "temperature": 0.7,
        "top_p": 1.0,
        "seed": 123,
    }
    greedy = sampling_kwargs(SamplingParams(max_new_tokens=4, greedy=True), STOP, seed=None)
    assert greedy["temperature"] == 0.0 and "seed" not in greedy and "top_p" not in greedy
    with pytest.raises(ValueError, match="top_p"):
        sampling_kwargs(SamplingParams(top_p=0.9), STOP, seed=1)


def test_request_seeds_come_from_the_generator():
    a = request_seeds(torch.Generator().manual_seed(5), 6)
    b = request_seeds(torch.Generator().manual_seed(5), 6)
    assert a == b and len(set(a)) == 6 and all(0 <= s < 2**31 - 1 for s in a)
    g = torch.Generator().manual_seed(5)
    assert request_seeds(g, 3) + request_seeds(g, 3) == a  # consecutive calls continue the stream


def test_finished_completion_keeps_the_stop_token_and_its_logprob_but_not_in_text():
    out = RequestOutput("0", [7, 8], [completion([5, 6, 2], [-0.5, -1.0, -0.1], "stop", other=9)])
    r = to_rollout([7, 8], out, STOP, Tok())
    assert r.prompt_ids == [7, 8] and r.completion_ids == [5, 6, 2]
    assert r.logprobs == [-0.5, -1.0, -0.1]  # the sampled token's, not the other entry's
    assert r.text == "5 6" and r.finished


def test_length_capped_completion_is_unfinished():
    out = RequestOutput("0", [7], [completion([5, 6], [-0.5, -1.0], "length")])
    r = to_rollout([7], out, STOP, Tok())
    assert not r.finished and r.text == "5 6" and r.completion_ids == [5, 6]


@pytest.mark.parametrize(
    "comp, prompt, match",
    [
        (completion([5, 6], [-0.5, -1.0], "stop"), [7], "finish_reason='stop'"),  # not our stop
        (completion([5, 1], [-0.5, -1.0], "abort"), [7], "finish_reason='abort'"),
        (CompletionOutput(0, "", [5, 1], None, None, "stop"), [7], "logprobs=0"),
        (completion([5, 1], [-0.5, -1.0], "stop"), [8], "out of order"),
    ],
)
def test_unexpected_outputs_are_errors(comp, prompt, match):
    with pytest.raises(RuntimeError, match=match):
        to_rollout(prompt, RequestOutput("0", [7], [comp]), STOP, Tok())


# ----------------------------------------------------------------------------- weights


def test_policy_weights_are_the_hf_parameters_by_name(tiny_llama):
    got = dict(policy_weights(tiny_llama))
    assert got.keys() == dict(tiny_llama.named_parameters()).keys()
    assert "model.layers.0.self_attn.q_proj.weight" in got and "lm_head.weight" in got
    assert all(not t.requires_grad for t in got.values())


def test_tied_embeddings_are_pushed_once():
    from transformers import LlamaConfig, LlamaForCausalLM

    c = LlamaConfig(
        vocab_size=20,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=True,
    )
    names = [n for n, _ in policy_weights(LlamaForCausalLM(c))]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names


def test_lora_weights_are_pushed_merged_without_touching_the_policy(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    want = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    got = dict(policy_weights(model))
    assert got.keys() == want.keys()  # base names, no lora_A/lora_B/base_layer
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor.detach(), rtol=0, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(got[q], before[f"base_model.model.{q[:-7]}.base_layer.weight"])
    for n, p in model.named_parameters():  # the policy itself is unchanged
        assert torch.equal(p, before[n])


# ----------------------------------------------------------------------------- engine logic


@dataclass
class FakeVLLMModel:
    """Records what load_weights received; its parameter names are the policy's."""

    param_names: list[str]
    loaded: dict[str, torch.Tensor] = field(default_factory=dict)

    def load_weights(self, weights):
        self.loaded = dict(weights)
        return set(self.loaded)

    def named_parameters(self):
        return [(n, None) for n in self.param_names]


class FakeLLM:
    """Stand-in for vllm.LLM: records calls; 'samples' from each request's seed."""

    def __init__(self, param_names: list[str]) -> None:
        self.model = FakeVLLMModel(param_names)
        self.events: list = []
        self.requests: list = []

    def apply_model(self, func):
        self.events.append("load")
        return [func(self.model)]

    def reset_prefix_cache(self):
        self.events.append("reset_prefix_cache")

    def sleep(self, level):
        self.events.append(("sleep", level))

    def wake_up(self, tags=None):
        self.events.append(("wake", tuple(tags)))

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.events.append("generate")
        self.requests = list(sampling_params)
        outs = []
        for i, (p, sp) in enumerate(zip(prompts, sampling_params, strict=True)):
            rng = random.Random(sp.get("seed"))
            ids = [rng.randrange(3, 50) for _ in range(sp["max_tokens"] - 1)] + [STOP[0]]
            lps = [-0.25] * len(ids)
            outs.append(
                RequestOutput(str(i), p["prompt_token_ids"], [completion(ids, lps, "stop")])
            )
        return outs


def make_engine(policy, sleep=True, param_names=None):
    names = param_names or [n for n, _ in policy.named_parameters()]
    llm = FakeLLM(names)
    return VLLMRolloutEngine(policy, Tok(), STOP, llm, dict, sleep=sleep), llm


def test_engine_loads_the_policy_then_sleeps_and_reloads_on_each_generate(tiny_llama):
    eng, llm = make_engine(tiny_llama)
    assert llm.events == ["load", "reset_prefix_cache", ("sleep", 2)]
    torch.testing.assert_close(
        llm.model.loaded["model.norm.weight"], tiny_llama.model.norm.weight.detach()
    )
    llm.events.clear()
    eng.sync_weights()  # asleep: deferred to the wake-up, which reloads anyway
    assert llm.events == []
    with torch.no_grad():
        tiny_llama.model.norm.weight.add_(1.0)  # "an optimizer step"
    rollouts = eng.generate([[3, 4], [5]], SamplingParams(max_new_tokens=4), torch.Generator())
    assert llm.events == [
        ("wake", ("weights",)),
        "load",
        "reset_prefix_cache",
        ("wake", ("kv_cache",)),
        "generate",
        ("sleep", 2),
    ]
    torch.testing.assert_close(
        llm.model.loaded["model.norm.weight"], tiny_llama.model.norm.weight.detach()
    )
    assert [r.prompt_ids for r in rollouts] == [[3, 4], [5]]
    assert all(r.finished and len(r.completion_ids) == 4 for r in rollouts)


def test_engine_without_sleep_pushes_weights_on_sync(tiny_llama):
    eng, llm = make_engine(tiny_llama, sleep=False)
    llm.events.clear()
    eng.sync_weights()
    assert llm.events == ["load", "reset_prefix_cache"]
    eng.generate([[3]], SamplingParams(max_new_tokens=2), torch.Generator())
    assert llm.events[-1] == "generate"


def test_engine_seeds_each_request_from_the_generator(tiny_llama):
    eng, llm = make_engine(tiny_llama, sleep=False)
    p = SamplingParams(temperature=0.8, max_new_tokens=5)
    a = eng.generate([[3], [3], [4]], p, torch.Generator().manual_seed(11))
    seeds = [r["seed"] for r in llm.requests]
    assert seeds == request_seeds(torch.Generator().manual_seed(11), 3)
    assert all(r["temperature"] == 0.8 and r["stop_token_ids"] == STOP for r in llm.requests)
    b = eng.generate([[3], [3], [4]], p, torch.Generator().manual_seed(11))
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    assert a[0].completion_ids != a[1].completion_ids  # same prompt, different request seeds


def test_greedy_generation_draws_nothing_from_the_generator(tiny_llama):
    eng, llm = make_engine(tiny_llama, sleep=False)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    eng.generate([[3]], SamplingParams(max_new_tokens=3, greedy=True), g)
    assert torch.equal(g.get_state(), state)
    assert llm.requests[0]["temperature"] == 0.0 and "seed" not in llm.requests[0]


def test_engine_refuses_a_vllm_model_the_policy_does_not_fully_set(tiny_llama):
    names = [n for n, _ in tiny_llama.named_parameters()] + ["model.extra.weight"]
    with pytest.raises(RuntimeError, match=r"model\.extra\.weight"):
        make_engine(tiny_llama, param_names=names)


def test_from_config_starts_vllm_in_process_with_the_documented_settings(monkeypatch, tiny_llama):
    """from_config against a stand-in `vllm` module: what it passes to vllm.LLM, and that the
    engine it returns works and cleans its scratch folder."""
    started = {}

    class RecordingLLM(FakeLLM):
        def __init__(self, **kwargs):
            started.update(
                kwargs, config=json.loads((Path(kwargs["model"]) / "config.json").read_text())
            )
            super().__init__([n for n, _ in tiny_llama.named_parameters()])

    fake = types.SimpleNamespace(__version__="0.33.0", LLM=RecordingLLM, SamplingParams=dict)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # restored after the test
    monkeypatch.setenv("FST_VLLM_GPU_MEMORY_UTILIZATION", "0.25")
    monkeypatch.delenv("FST_VLLM_SLEEP", raising=False)
    c = cfg(batchSize=16).model_copy(update={"seed": 7})
    eng = VLLMRolloutEngine.from_config(c, tiny_llama, Tok(), STOP)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    config = started.pop("config")
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 50
    folder = Path(started.pop("model"))
    assert started == {
        "load_format": "dummy",
        "skip_tokenizer_init": True,
        "generation_config": "vllm",
        "dtype": "float32",
        "seed": 7,
        "max_num_seqs": 16,
        "max_model_len": None,
        "gpu_memory_utilization": 0.25,
        "enable_sleep_mode": True,
        "enable_prefix_caching": True,
        "logprobs_mode": "processed_logprobs",
    }
    assert eng.sleep_between_calls and eng.llm.events[-1] == ("sleep", 2)
    assert len(eng.generate([[3]], SamplingParams(max_new_tokens=2), torch.Generator())) == 1
    eng.close()
    assert not folder.exists()
