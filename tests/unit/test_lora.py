"""LoRA runs on the tiny Llama, through the real loop (fst.loop.train): a checkpoint holds the
merged model (a plain transformers folder) and the adapters; a resume continues exactly; a
next stage loads the checkpoint as its model and trains new adapters on top of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fst.loop
from fst.config import ModelConfig, validate_config
from fst.model import is_lora, load_policy
from fst.run_state import load_weights_into, restore_policy
from tests.conftest import comparable
from tests.tiny_model import (  # noqa: F401 (fixtures)
    one_torch_thread,
    tiny_model_dir,
    tiny_run_config,
    varied_reward,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LORA = {"rank": 4, "alpha": 8}
PROBE = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]])  # any token ids


class Killed(Exception):
    """Stands for a SIGKILL right after a checkpoint was committed."""


def lora_config(tmp_path: Path, model_dir: Path, **overrides):
    raw = tiny_run_config(tmp_path, model_dir, **{"model.lora": LORA, **overrides})
    return validate_config(raw)


def checkpoint(cfg, step: int) -> Path:
    return cfg.run_dir / "checkpoints" / f"step-{step:08d}"


def read_metrics(cfg) -> list[dict]:
    path = cfg.run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@torch.no_grad()
def logits(model) -> torch.Tensor:
    model.eval()
    return model(input_ids=PROBE).logits


def train_killed_after(cfg, step: int, monkeypatch) -> None:
    """fst.loop.train(cfg), interrupted as soon as the checkpoint of `step` is committed."""
    save = fst.loop.save_checkpoint

    def save_then_die(run, extra_state=None):
        uri = save(run, extra_state)
        if run.step == step:
            raise Killed
        return uri

    with monkeypatch.context() as m:
        m.setattr(fst.loop, "save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            fst.loop.train(cfg, progress=False)


@pytest.fixture
def lora_run(tmp_path, tiny_model_dir, varied_reward):  # noqa: F811
    """A finished 2-step LoRA run (checkpoint at step 2)."""
    cfg = lora_config(tmp_path / "stage1", tiny_model_dir, steps=2)
    fst.loop.train(cfg, progress=False)
    return cfg


def test_lora_checkpoint_holds_the_merged_model_and_the_adapters(lora_run, tiny_model_dir):  # noqa: F811
    folder = checkpoint(lora_run, 2)
    assert (folder / "model" / "config.json").is_file()
    assert not (folder / "model" / "adapter_config.json").exists()
    # The trained parameters (the adapters alone: the frozen base is the run's own) and AdamW.
    assert (folder / "dcp" / ".metadata").is_file()
    assert any(m["updated"] for m in read_metrics(lora_run)), "LoRA should have been trained"

    # The trained policy as a resume rebuilds it: the run's base, its adapters restored.
    policy = load_policy(lora_run.model)
    restore_policy(policy, folder)
    # The checkpoint as a next stage (or `fst eval`, or a server) loads it: a plain model.
    merged = load_policy(ModelConfig(name=str(folder)))
    assert not is_lora(merged)
    base = load_policy(ModelConfig(name=str(tiny_model_dir)))
    want = logits(policy)
    assert torch.allclose(logits(merged), want, atol=1e-5)
    assert not torch.allclose(logits(base), want, atol=1e-3), "training should move the model"

    # Evaluation code builds the stream's base (with LoRA) and loads a checkpoint into it.
    evaluated = load_policy(lora_run.model)
    load_weights_into(evaluated, folder)
    assert torch.allclose(logits(evaluated), want, atol=1e-5)


def test_lora_resume_continues_exactly(tmp_path, tiny_model_dir, varied_reward, monkeypatch):  # noqa: F811
    straight = lora_config(tmp_path / "a", tiny_model_dir)
    fst.loop.train(straight, progress=False)

    killed = lora_config(tmp_path / "b", tiny_model_dir)
    train_killed_after(killed, 2, monkeypatch)
    assert [m["step"] for m in read_metrics(killed)] == [1, 2]
    fst.loop.train(killed, resume=True, progress=False)

    a, b = read_metrics(straight), read_metrics(killed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    assert sum(m["updated"] for m in a) >= 3, "most steps should update the adapters"
    for ra, rb in zip(a, b, strict=True):
        ra, rb = comparable(ra), comparable(rb)
        assert ra.keys() == rb.keys()
        for key in ra:
            if isinstance(ra[key], float):
                assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-8), (ra["step"], key)
            else:
                assert rb[key] == ra[key], (ra["step"], key)


def test_next_stage_trains_new_adapters_on_the_merged_checkpoint(
    lora_run,
    tiny_model_dir,  # noqa: F811
    tmp_path,
):
    # What a stream's hand-over sets: the previous stage's checkpoint folder as the model,
    # the stream's base as the KL reference.
    previous = checkpoint(lora_run, 2)
    stage2 = lora_config(
        tmp_path / "stage2",
        tiny_model_dir,
        steps=2,
        **{"model.name": str(previous), "model.reference": str(tiny_model_dir)},
    )
    start = load_policy(stage2.model)
    assert is_lora(start)  # new adapters (B = 0): it computes exactly the merged checkpoint
    merged = load_policy(ModelConfig(name=str(previous)))
    assert torch.allclose(logits(start), logits(merged), atol=1e-6)

    fst.loop.train(stage2, progress=False)
    metrics = read_metrics(stage2)
    assert [m["step"] for m in metrics] == [1, 2] and any(m["updated"] for m in metrics)
    assert all(m["kl"] > 0 for m in metrics)  # KL to the stream's base, not to stage 1's end

    # Stage 2's checkpoint, merged, holds both stages' training; evaluation that rebuilds the
    # stream's base (with LoRA) and loads it there computes the same.
    final = checkpoint(stage2, 2)
    merged2 = load_policy(ModelConfig(name=str(final)))
    evaluated = load_policy(lora_run.model)
    load_weights_into(evaluated, final)
    assert torch.allclose(logits(evaluated), logits(merged2), atol=1e-5)
    assert not torch.allclose(logits(merged2), logits(merged), atol=1e-4)


def test_an_adapter_only_folder_is_refused_with_a_clear_message(tmp_path, tiny_model_dir):  # noqa: F811
    policy = load_policy(ModelConfig(name=str(tiny_model_dir), lora=LORA))
    policy.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    with pytest.raises(ValueError, match="holds only a LoRA adapter"):
        load_policy(ModelConfig(name=str(tmp_path / "adapter")))


def test_merged_state_dict_is_peft_merge_and_leaves_the_policy_untouched(tiny_llama):
    import copy

    from peft import LoraConfig, get_peft_model

    from fst.model import merged_state_dict

    model = get_peft_model(
        tiny_llama,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    want = copy.deepcopy(model).merge_and_unload().state_dict()
    got = merged_state_dict(model)
    assert got.keys() == want.keys()  # the plain model's names: no lora_A/B, no base_layer
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(got[q], before[f"base_model.model.{q[:-7]}.base_layer.weight"])
    for n, p in model.named_parameters():  # merged into new tensors, not in place
        assert torch.equal(p, before[n])
