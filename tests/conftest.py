"""Shared test helpers. Tests that load the real model are marked `slow`; they still run in CI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

# Keep runs reproducible and quiet; never reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TIMING_KEYS = ("_s", "_per_s", "fast_time_share")


def build_tiny_llama(tied: bool = False):
    """A small Llama, randomly initialised from seed 0 (the same weights in every process);
    `tied`: tied embeddings, like SmolLM2."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg)


class IdsTok:
    """The one tokenizer method the rollout engine calls, for the tiny Llama: ids as text."""

    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def assert_logprobs_of_a_full_forward(model, rollouts, temperature=1.0, autocast=None, abs=1e-4):
    """Each rollout's sampler logprobs are those of one forward over prompt + completion (under
    bf16 autocast when `autocast` is torch.bfloat16)."""
    import torch

    for r in rollouts:
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        with torch.no_grad(), torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            logits = model(ids).logits[0].float()
        logp = torch.log_softmax(logits / temperature, -1)
        want = [
            float(logp[len(r.prompt_ids) - 1 + t, tok]) for t, tok in enumerate(r.completion_ids)
        ]
        assert r.logprobs == pytest.approx(want, abs=abs)


@pytest.fixture
def tiny_llama():
    """A small randomly initialised Llama: the same code path as SmolLM2, in milliseconds."""
    return build_tiny_llama().eval()


def tiny_config(tmp_path: Path, **overrides) -> dict:
    """A run small enough for a test: SmolLM2 on CPU, a few short steps."""
    cfg = {
        "run": "t",
        "mode": "rl",
        "steps": 4,
        "seed": 3,
        "outputDir": str(tmp_path / "runs"),
        "task": {
            "name": "arithmetic",
            "trainSize": 32,
            "valSize": 4,
            "testSize": 4,
            "params": {"steps": 1, "maxOperand": 20, "answerFormat": "last_number"},
        },
        "rollout": {"temperature": 0.8, "maxNewTokens": 12, "batchSize": 16},
        "slow": {"problemsPerStep": 2, "groupSize": 4, "lr": 1e-5, "microBatchSize": 8},
        "fast": {"everySteps": 2, "topK": 2, "metricCalls": 8, "minibatchSize": 2, "paretoSize": 4},
        "metrics": {"klPrompts": 2, "klEvery": 1},
        "checkpoint": {"every": 2, "keepLast": 3},
    }
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def write_config(tmp_path: Path, cfg: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def fst_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fst", *args]


def run_fst(*args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(fst_cmd(*args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"fst {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def wait_for_checkpoint(proc: subprocess.Popen, manifest: Path, timeout: float) -> None:
    """Wait while `proc` runs until `manifest` exists (the kill tests then kill it); fail the
    test if the process ends first or the deadline passes."""
    deadline = time.monotonic() + timeout
    while not manifest.exists():
        if proc.poll() is not None:
            pytest.fail(f"run ended before the checkpoint appeared:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail("no checkpoint before the deadline")
        time.sleep(0.2)


def comparable(record: dict) -> dict:
    """A metrics record without wall-clock measurements."""
    return {k: v for k, v in record.items() if not k.endswith(TIMING_KEYS)}
