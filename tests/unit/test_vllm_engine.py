"""The vLLM rollout engine, WITHOUT vLLM (which needs a GPU; none here).

What is real: the import guard, the mapping of our SamplingParams to vLLM's keyword arguments,
the conversion of vLLM's outputs to Rollouts, the weights handed to vLLM (plain and LoRA-merged,
on a tiny Llama; and, in two real processes joined by gloo, gathered from an FSDP2-sharded
policy whose parameters are DTensors) and the engine's own call sequence. What is a stand-in:
vLLM's output objects (RequestOutput / CompletionOutput / Logprob, same attribute names as
vLLM 0.33), the `LLM` object, whose methods record what the engine asked for and refuse what
real vLLM refuses (waking or sleeping memory twice, loading into sleeping weights), and
torchrun's environment for the engine's start-up (a fake rank of a fake world: its kwargs).
Whether real vLLM behaves as these stand-ins assume is NOT verified here.
"""

from __future__ import annotations

import builtins
import copy
import importlib
import json
import os
import random
import socket
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import fst.loop
from fst.config import ConfigError, TrainConfig
from fst.distributed import World
from fst.rollout import SamplingParams
from fst.rollout.vllm import (
    INSTALL_HINT,
    TP_ENV,
    VLLMRolloutEngine,
    check_torchrun,
    engine_placement,
    import_vllm,
    llm_kwargs,
    policy_weights,
    request_seeds,
    sampling_kwargs,
    share_of,
    tensor_parallel_size,
    to_rollout,
    version_at_least,
    weight_chunks,
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
    # top-p goes to vLLM as is: its processed logprobs are then the nucleus-renormalised ones
    # the HF engine logs too (fst/rollout/hf.py sample_next).
    assert sampling_kwargs(SamplingParams(top_p=0.9), STOP, seed=1)["top_p"] == 0.9


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
    chunks: list[list[str]] = field(default_factory=list)  # the names of each load call
    asleep: bool = False  # its weight memory is unmapped (vLLM asleep, weights not woken)

    def load_weights(self, weights):
        if self.asleep:
            raise RuntimeError("load_weights into sleeping (unmapped) weight memory")
        got = dict(weights)
        self.chunks.append(list(got))
        self.loaded.update(got)
        return set(got)

    def named_parameters(self):
        return [(n, None) for n in self.param_names]


class FakeLLM:
    """Stand-in for vllm.LLM: records calls; 'samples' from each request's seed. Like vLLM's
    CuMemAllocator it refuses to wake memory that is awake or to sleep while part of its memory
    already sleeps."""

    def __init__(self, param_names: list[str]) -> None:
        self.model = FakeVLLMModel(param_names)
        self.events: list = []
        self.requests: list = []
        self.prompts: list = []
        self.sleeping: set[str] = set()

    def apply_model(self, func):
        # `func` is functools.partial(_load_weights | _unset, ...): record which.
        self.events.append(func.func.__name__.strip("_"))
        return [func(self.model)]

    def reset_prefix_cache(self):
        self.events.append("reset_prefix_cache")

    def sleep(self, level):
        assert level in (1, 2) and not self.sleeping, f"sleep({level}) while {self.sleeping} sleep"
        self.events.append(("sleep", level))
        self.sleeping = {"weights", "kv_cache"}
        self.model.asleep = True

    def wake_up(self, tags=None):
        assert set(tags) <= self.sleeping, f"waking {tags}, but only {self.sleeping} sleep"
        self.events.append(("wake", tuple(tags)))
        self.sleeping -= set(tags)
        self.model.asleep = "weights" in self.sleeping

    def generate(self, prompts, sampling_params, use_tqdm=True):
        assert not self.sleeping, f"generate while {self.sleeping} sleep"
        self.events.append("generate")
        self.requests = list(sampling_params)
        self.prompts = [p["prompt_token_ids"] for p in prompts]
        outs = []
        for i, (p, sp) in enumerate(zip(prompts, sampling_params, strict=True)):
            rng = random.Random(sp.get("seed"))
            ids = [rng.randrange(3, 50) for _ in range(sp["max_tokens"] - 1)] + [STOP[0]]
            lps = [-0.25] * len(ids)
            outs.append(
                RequestOutput(str(i), p["prompt_token_ids"], [completion(ids, lps, "stop")])
            )
        return outs


def push_events(policy) -> list[str]:
    """What one weight push looks like to vLLM: a load per decoder layer (or other weight),
    the check that every vLLM parameter was set, the prefix cache dropped."""
    return ["load_weights"] * len(list(weight_chunks(policy_weights(policy)))) + [
        "unset",
        "reset_prefix_cache",
    ]


def make_engine(policy, sleep=True, param_names=None, **kwargs):
    names = param_names or [n for n, _ in policy.named_parameters()]
    llm = FakeLLM(names)
    return VLLMRolloutEngine(policy, Tok(), STOP, llm, dict, sleep=sleep, **kwargs), llm


def test_engine_loads_the_policy_then_sleeps_and_reloads_on_each_generate(tiny_llama):
    eng, llm = make_engine(tiny_llama)
    push = push_events(tiny_llama)
    assert llm.events == [*push, ("sleep", 2)]
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
        *push,
        ("wake", ("kv_cache",)),
        "generate",
        ("sleep", 2),
    ]
    torch.testing.assert_close(
        llm.model.loaded["model.norm.weight"], tiny_llama.model.norm.weight.detach()
    )
    assert [r.prompt_ids for r in rollouts] == [[3, 4], [5]]
    assert all(r.finished and len(r.completion_ids) == 4 for r in rollouts)


def test_weights_are_pushed_one_decoder_layer_at_a_time(tiny_llama):
    """A merge or a gather never materialises more than one layer's tensors at once."""
    _, llm = make_engine(tiny_llama, sleep=False)
    layers = len(tiny_llama.model.layers)
    per_layer = [n for n in llm.model.chunks if n[0].startswith("model.layers.")]
    assert len(per_layer) == layers
    for i, names in enumerate(per_layer):
        assert names and all(n.startswith(f"model.layers.{i}.") for n in names)
    others = [n for n in llm.model.chunks if not n[0].startswith("model.layers.")]
    assert others == [["model.embed_tokens.weight"], ["model.norm.weight"], ["lm_head.weight"]]
    assert llm.model.loaded.keys() == dict(tiny_llama.named_parameters()).keys()


def test_engine_without_sleep_pushes_weights_on_sync(tiny_llama):
    eng, llm = make_engine(tiny_llama, sleep=False)
    llm.events.clear()
    eng.sync_weights()
    assert llm.events == push_events(tiny_llama)
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


@pytest.fixture
def one_process(monkeypatch):
    """No torchrun environment, whatever the machine running the tests has set."""
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", TP_ENV):
        monkeypatch.delenv(key, raising=False)


def fake_vllm(monkeypatch, policy) -> dict:
    """A stand-in `vllm` module whose LLM records its keyword arguments (returned dict)."""
    started: dict = {}

    class RecordingLLM(FakeLLM):
        def __init__(self, **kwargs):
            started.update(
                kwargs, config=json.loads((Path(kwargs["model"]) / "config.json").read_text())
            )
            super().__init__([n for n, _ in policy.named_parameters()])

    fake = types.SimpleNamespace(__version__="0.33.0", LLM=RecordingLLM, SamplingParams=dict)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # restored after the test
    monkeypatch.delenv("FST_VLLM_SLEEP", raising=False)
    return started


def test_from_config_starts_vllm_in_process_with_the_documented_settings(
    monkeypatch, tiny_llama, one_process
):
    """from_config against a stand-in `vllm` module: what it passes to vllm.LLM, and that the
    engine it returns works and cleans its scratch folder."""
    started = fake_vllm(monkeypatch, tiny_llama)
    monkeypatch.setenv("FST_VLLM_GPU_MEMORY_UTILIZATION", "0.25")
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
    assert eng.sleep_between_calls and eng.sleep_level == 2 and eng.tp_exchange is None
    assert eng.llm.events[-1] == ("sleep", 2)
    assert len(eng.generate([[3]], SamplingParams(max_new_tokens=2), torch.Generator())) == 1
    eng.close()
    assert not folder.exists()


# ----------------------------------------------------------------------------- many ranks


def torchrun_env(monkeypatch, rank: int, size: int, local_size: int | None = None) -> None:
    """What torchrun sets in rank `rank` of a `size`-process run (a fake: no process group)."""
    local_size = local_size or size
    env = {
        "RANK": rank,
        "WORLD_SIZE": size,
        "LOCAL_RANK": rank % local_size,
        "LOCAL_WORLD_SIZE": local_size,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": 29500,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))


def gpu_cfg(**top) -> TrainConfig:
    c = cfg(batchSize=16)
    return TrainConfig.model_validate(
        {**c.model_dump(by_alias=True), "seed": 7, "model": {"device": "cuda"}, **top}
    )


def test_each_rank_starts_its_own_engine_with_the_external_launcher(monkeypatch, tiny_llama):
    """Rank 1 of 2 (fake torchrun environment, stand-in vLLM): one engine per rank, joined to
    torchrun's processes, its own seed, tensor parallelism 1, vLLM in the trainer's bf16
    compute dtype; it sleeps at level 1 (weights kept in CPU memory)."""
    torchrun_env(monkeypatch, rank=1, size=2)
    monkeypatch.delenv(TP_ENV, raising=False)
    started = fake_vllm(monkeypatch, tiny_llama)
    monkeypatch.setenv("FST_VLLM_GPU_MEMORY_UTILIZATION", "0.55")
    c = gpu_cfg(parallel={"mixedPrecision": "bf16"})
    eng = VLLMRolloutEngine.from_config(c, tiny_llama, Tok(), STOP)
    started.pop("config"), started.pop("model")
    assert started == {
        "distributed_executor_backend": "external_launcher",
        "tensor_parallel_size": 1,
        "seed": 7 + 1,  # run seed + engine index
        "dtype": "bfloat16",
        "max_num_seqs": 16,
        "load_format": "dummy",
        "skip_tokenizer_init": True,
        "generation_config": "vllm",
        "max_model_len": None,
        "gpu_memory_utilization": 0.55,
        "enable_sleep_mode": True,
        "enable_prefix_caching": True,
        "logprobs_mode": "processed_logprobs",
    }
    assert eng.sleep_level == 1 and eng.dtype == torch.bfloat16 and eng.tp_exchange is None
    assert eng.llm.events == [*push_events(tiny_llama), ("sleep", 1)]
    # The weights vLLM got: the policy's, cast to vLLM's dtype.
    loaded = eng.llm.model.loaded
    assert loaded.keys() == dict(tiny_llama.named_parameters()).keys()
    for name, p in tiny_llama.named_parameters():
        assert loaded[name].dtype == torch.bfloat16
        assert torch.equal(loaded[name], p.detach().to(torch.bfloat16))
    eng.close()


def test_rank_zero_of_a_run_without_mixed_precision_keeps_the_model_dtype(monkeypatch, tiny_llama):
    torchrun_env(monkeypatch, rank=0, size=2)
    monkeypatch.delenv(TP_ENV, raising=False)
    started = fake_vllm(monkeypatch, tiny_llama)
    eng = VLLMRolloutEngine.from_config(gpu_cfg(), tiny_llama, Tok(), STOP)
    assert started["seed"] == 7 and started["dtype"] == "float32"
    assert started["distributed_executor_backend"] == "external_launcher"
    eng.close()


def test_tensor_parallel_groups_share_a_seed_and_serve_their_ranks_requests():
    world = World(rank=3, size=8, local_rank=3, local_size=4)  # 2 nodes x 4 GPUs, rank 3
    placement = engine_placement(world, tp=2)
    assert placement.engine == 1 and placement.tp_rank == 1
    assert placement.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]  # within a node each
    kw = llm_kwargs(
        gpu_cfg(),
        Path("/m"),
        placement,
        sleep=True,
        max_model_len=None,
        memory_utilization=0.5,
    )
    assert kw["tensor_parallel_size"] == 2 and kw["seed"] == 7 + 1
    assert kw["max_num_seqs"] == 16 * 2
    assert engine_placement(World(rank=2, size=8, local_rank=2, local_size=4), 2).engine == 1
    assert tensor_parallel_size({TP_ENV: "2"}) == 2 and tensor_parallel_size({}) == 1


@pytest.mark.parametrize(
    "world, tp, match",
    [
        (World(rank=0, size=8, local_rank=0, local_size=4), 3, "must divide the processes"),
        (World(rank=0, size=8, local_rank=0, local_size=4), 8, "must divide the processes"),
        (World(), 2, "needs torchrun"),
        (World(), 0, "1 or more"),
    ],
)
def test_impossible_tensor_parallel_sizes_are_config_errors(world, tp, match):
    with pytest.raises(ConfigError, match=match):
        engine_placement(world, tp)
    with pytest.raises(ConfigError, match="not an integer"):
        tensor_parallel_size({TP_ENV: "two"})


def test_torchrun_checks_name_the_setting(monkeypatch):
    env = {"RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    one_engine_each = engine_placement(World(rank=1, size=2, local_rank=1, local_size=2))
    check_torchrun(gpu_cfg(), one_engine_each, env)  # fine
    for device in ("cpu", "cuda:0"):
        c = gpu_cfg(model={"device": device})
        with pytest.raises(ConfigError, match=r"model\.device: .*\(cuda:1\)"):
            check_torchrun(c, one_engine_each, env)
    with pytest.raises(ConfigError, match="missing: MASTER_PORT"):
        check_torchrun(gpu_cfg(), one_engine_each, {k: v for k, v in env.items() if k[-1] != "T"})
    pairs = engine_placement(World(rank=1, size=2, local_rank=1, local_size=2), 2)
    check_torchrun(gpu_cfg(), pairs, env)  # mode rl, no periodic eval: every rank generates
    for top, what in [({"mode": "fst"}, "mode: fst"), ({"metrics": {"evalEvery": 5}}, "metr")]:
        with pytest.raises(ConfigError, match=f"rank 0 generates alone for {what}"):
            check_torchrun(gpu_cfg(**top), pairs, env)


def test_level_one_sleep_pushes_only_in_sync_weights(tiny_llama):
    """Under torchrun a push gathers shards (a collective), so generate(), which rank 0 may
    call alone, never pushes: sleeping keeps the weights (level 1), sync_weights pushes."""
    eng, llm = make_engine(tiny_llama, sleep_level=1)
    push = push_events(tiny_llama)
    assert llm.events == [*push, ("sleep", 1)]
    llm.events.clear()
    eng.generate([[3]], SamplingParams(max_new_tokens=2), torch.Generator())
    assert llm.events == [
        ("wake", ("weights",)),
        ("wake", ("kv_cache",)),
        "generate",
        ("sleep", 1),
    ]
    llm.events.clear()
    with torch.no_grad():
        tiny_llama.model.norm.weight.add_(1.0)  # "an optimizer step"
    eng.sync_weights()  # asleep: wake the weights' memory, push now
    assert llm.events == [("wake", ("weights",)), *push]
    torch.testing.assert_close(
        llm.model.loaded["model.norm.weight"], tiny_llama.model.norm.weight.detach()
    )
    llm.events.clear()
    eng.sync_weights()  # weights awake (the KV cache still asleep): push only
    assert llm.events == push
    llm.events.clear()
    eng.generate([[3]], SamplingParams(max_new_tokens=2), torch.Generator())
    assert llm.events == [("wake", ("kv_cache",)), "generate", ("sleep", 1)]


def test_a_tensor_parallel_group_pools_its_requests_and_each_rank_keeps_its_own(tiny_llama):
    """Rank 1 of a group of 2: the engine gets both ranks' requests (with their own seeds),
    and returns rank 1's completions only, in order."""
    other = [([9, 9], 12345), ([8], 777)]  # rank 0's requests (prompt, seed)
    seen = []

    def exchange(batch):
        seen.append(batch)
        return [other, batch], 1

    eng, llm = make_engine(tiny_llama, sleep=False, tp_exchange=exchange)
    g = torch.Generator().manual_seed(4)
    out = eng.generate([[3], [4, 5]], SamplingParams(max_new_tokens=3), g)
    mine = request_seeds(torch.Generator().manual_seed(4), 2)
    assert seen == [[([3], mine[0]), ([4, 5], mine[1])]]
    assert llm.prompts == [[9, 9], [8], [3], [4, 5]]
    assert [r["seed"] for r in llm.requests] == [12345, 777, *mine]
    assert [r.prompt_ids for r in out] == [[3], [4, 5]]
    # A rank with nothing to generate still takes part in the exchange (a collective).
    seen.clear()
    assert eng.generate([], SamplingParams(max_new_tokens=3), g) == []
    assert seen == [[]]
    assert share_of([2, 0, 3], 2) == slice(2, 5) and share_of([2, 0, 3], 1) == slice(2, 2)


def test_policy_weights_casts_to_vllms_dtype_and_strips_wrapper_names(tiny_llama):
    got = dict(policy_weights(tiny_llama, torch.bfloat16))
    for name, p in tiny_llama.named_parameters():
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], p.detach().to(torch.bfloat16))
    from fst.rollout.vllm import hf_name

    assert (
        hf_name("model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight")
        == "model.layers.0.mlp.up_proj.weight"
    )
    assert torch.is_grad_enabled()  # the generator did not leave gradients off


# ----------------------------------------------------------------------------- real FSDP2


def tied_llama(lora: bool) -> torch.nn.Module:
    """The tiny Llama of tests/tiny_model.py's shape (tied embeddings, like SmolLM2), built in
    memory: the same seed gives every rank the same weights."""
    from tests.conftest import build_tiny_llama

    model = build_tiny_llama(tied=True)
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            init_lora_weights=False,  # B != 0: the merge changes the weights
        ),
    )


def _fsdp_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of the real test: shard the tiny Llama (plain, then LoRA) with the project's
    FSDP2 wrapping and compare what policy_weights gathers with the unsharded weights."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from fst.config import ParallelConfig
    from fst.distributed import shard

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    report = {}
    try:
        for lora in (False, True):
            model = tied_llama(lora)
            want = {n: t.clone() for n, t in policy_weights(model)}
            shard(model, ParallelConfig(strategy="fsdp"))
            sharded = sum(isinstance(p, DTensor) for p in model.parameters())
            assert sharded == len(list(model.parameters())), "not every parameter is a DTensor"
            got = dict(policy_weights(model))
            assert list(got) == list(want), (list(got), list(want))
            for name, tensor in want.items():
                assert not isinstance(got[name], DTensor), name
                torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)
            # Cast before the gather: bf16 shards travel, equal to the whole tensor cast.
            for name, tensor in policy_weights(model, torch.bfloat16):
                assert torch.equal(tensor, want[name].to(torch.bfloat16)), name
            # Through the engine (stand-in vLLM): one layer per load, every weight set.
            eng, llm = make_engine(model, sleep_level=1, param_names=list(want))
            assert llm.model.loaded.keys() == want.keys()
            for name, tensor in want.items():
                torch.testing.assert_close(llm.model.loaded[name], tensor, rtol=0, atol=1e-6)
            # A step as the loop takes it: forward/backward (which reshards every unit), an
            # update of the shards, the trainer's no-grad probe forward (after which FSDP2
            # keeps the root unit unsharded: its parameters are plain tensors), the sync.
            x = torch.tensor([[3, 4, 5]])
            model(input_ids=x).logits.float().sum().backward()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)  # "the optimizer step", on each rank's shards
                model(input_ids=x)
            plain = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
            twin = tied_llama(lora)
            with torch.no_grad():
                for p in twin.parameters():
                    p.add_(1.0)
            want = {n: t.clone() for n, t in policy_weights(twin)}
            eng.sync_weights()
            assert llm.model.loaded.keys() == want.keys()
            for name, tensor in want.items():
                torch.testing.assert_close(llm.model.loaded[name], tensor, rtol=0, atol=1e-5)
            report["lora" if lora else "plain"] = {
                "dtensors": sharded,
                "unsharded_after_probe": plain,
                "names": list(got),
                "chunks": [len(c) for c in llm.model.chunks],
            }
        if rank == 0:
            Path(out).write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_policy_weights_gathers_fsdp2_shards_into_the_unsharded_weights(tmp_path, tiny_llama):
    """REAL: two processes, a gloo group on the CPU, the tiny Llama sharded by fst.distributed's
    FSDP2 wrapping (parameters are DTensors); what policy_weights yields on each rank (and what
    the engine pushes) equals the unsharded model's weights, plain and LoRA-merged.

    The ranks are forked from this process (torch, transformers and peft already imported):
    a fresh interpreter per rank would spend most of the test importing them."""
    import torch.multiprocessing as mp

    out = tmp_path / "report.json"
    ctx = mp.start_processes(
        _fsdp_rank,
        args=(2, _free_port(), str(out)),
        nprocs=2,
        join=False,
        start_method="fork",
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks did not finish in 120 s (a collective out of step?)")
    report = json.loads(out.read_text())
    plain, lora = report["plain"], report["lora"]
    assert "lm_head.weight" not in plain["names"]  # tied: pushed once, as embed_tokens
    assert lora["names"] == plain["names"]  # merged under the base model's names
    assert plain["dtensors"] == 2 * 9 + 2  # 9 per layer; embedding and final norm
    assert lora["dtensors"] == plain["dtensors"] + 2 * 3 * 2  # A and B on 3 modules per layer
    assert plain["chunks"] == [1, 9, 9, 1] * 2  # construction and sync: a layer per load
    root = ["model.embed_tokens.weight", "model.norm.weight"]
    assert plain["unsharded_after_probe"] == root  # the sync read those as plain tensors
