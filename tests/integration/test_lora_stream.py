"""LoRA through the real training loop: train 2 steps and checkpoint, resume to step 3 (the
same metrics as a run that was never interrupted), then load the checkpoint as a stream's next
stage does: `model.name` = the checkpoint folder, the base as the reference, and new LoRA
adapters on top of the merged weights.

The model is the tiny random Llama (tests/tiny_model.py; tied embeddings and the same
attention and MLP projections as SmolLM2, so the same LoRA targets) with its varied reward, so
that every step trains the adapters: what is tested is the adapters' checkpoint, resume and
merge, not what they learn (SmolLM2 took ~3 min here)."""

from __future__ import annotations

import json

import pytest
import torch

import fst.loop
from fst.config import ModelConfig, validate_config
from fst.model import chat_prompt_ids, is_lora, load_policy, load_tokenizer
from tests.conftest import comparable
from tests.tiny_model import (  # noqa: F401 (fixtures)
    one_torch_thread,
    tiny_model_dir,
    tiny_run_config,
    varied_reward,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread", "varied_reward")]

LORA = {"rank": 8, "alpha": 16}


def config(tmp_path, model_dir, steps: int):
    raw = tiny_run_config(tmp_path, model_dir, steps=steps, **{"model.lora": LORA})
    raw["metrics"]["klPrompts"] = 1
    return validate_config(raw)


def read_metrics(cfg) -> list[dict]:
    lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    return [comparable(json.loads(line)) for line in lines if line.strip()]


def test_lora_trains_checkpoints_resumes_and_hands_over_to_a_next_stage(tmp_path, tiny_model_dir):  # noqa: F811
    straight = config(tmp_path / "straight", tiny_model_dir, steps=3)
    fst.loop.train(straight, progress=False)

    # 2 steps and a checkpoint; then the same run resumed from it, to step 3.
    first = config(tmp_path / "resumed", tiny_model_dir, steps=2)
    fst.loop.train(first, progress=False)
    resumed = config(tmp_path / "resumed", tiny_model_dir, steps=3)
    fst.loop.train(resumed, resume=True, progress=False)

    want, got = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in got] == [1, 2, 3]
    assert all(m["updated"] for m in want), "every step should train the adapters"
    for a, b in zip(want, got, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
            else:
                assert b[key] == a[key], (a["step"], key)

    # The next stage: the checkpoint folder as the model (what the stream hands over), the
    # base as KL reference, LoRA again: new adapters that start at the merged weights.
    folder = resumed.run_dir / "checkpoints" / "step-00000003"
    assert (folder / "model" / "model.safetensors").is_file()
    assert (folder / "dcp" / ".metadata").is_file()  # the adapters and AdamW, for a resume
    next_stage = ModelConfig(name=str(folder), lora=LORA, reference=str(tiny_model_dir))
    policy = load_policy(next_stage)
    assert is_lora(policy)
    tok = load_tokenizer(next_stage)
    ids = torch.tensor([chat_prompt_ids(tok, "Be brief.", "Compute 3 + 4.")])
    with torch.no_grad():
        start = policy(input_ids=ids).logits
        with policy.disable_adapter():  # the merged weights alone
            merged = policy(input_ids=ids).logits
        base = load_policy(ModelConfig(name=str(tiny_model_dir)))(input_ids=ids).logits
    assert torch.allclose(start, merged)  # new adapters add nothing yet
    assert not torch.allclose(merged, base, atol=1e-4)  # the merged weights carry stage 1
