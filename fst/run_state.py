"""What a checkpoint holds, and how a run is restored from one.

model/            save_pretrained (safetensors) + tokenizer: loadable on its own, which is
                  how the next stage of a stream starts from this one
trainer.pt        AdamW and LR-schedule state
rng.pt            every random stream: the rollout sampler's generator, torch, python, numpy
state.json        step, data cursor, best reward, anything the loop needs to continue
config.yaml       the run's configuration, for the record
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fst.config import TrainConfig, dump_config
from fst.slow.trainer import SlowTrainer


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {
        "sampler": generator.get_state(),
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["sampler"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def write_checkpoint_files(
    folder: Path,
    cfg: TrainConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    trainer: SlowTrainer,
    generator: torch.Generator,
    state: dict[str, Any],
) -> None:
    model.save_pretrained(folder / "model", safe_serialization=True)
    tokenizer.save_pretrained(folder / "model")
    torch.save(trainer.state_dict(), folder / "trainer.pt")
    torch.save(rng_state(generator), folder / "rng.pt")
    (folder / "state.json").write_text(json.dumps(state, indent=1))
    (folder / "config.yaml").write_text(dump_config(cfg))


def load_weights_into(model: PreTrainedModel, folder: Path) -> None:
    """Copy saved weights into an already-built model (same architecture)."""
    from safetensors.torch import load_file

    model_dir = folder / "model"
    if (model_dir / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(model_dir / "adapter_model.safetensors"))
        return
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{model_dir}: no safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings are saved once; the tied lm_head is legitimately "missing".
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"{model_dir}: weights do not match the model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def read_checkpoint_files(
    folder: Path, model: PreTrainedModel, trainer: SlowTrainer, generator: torch.Generator
) -> dict[str, Any]:
    load_weights_into(model, folder)
    trainer.load_state_dict(torch.load(folder / "trainer.pt", weights_only=False))
    restore_rng(torch.load(folder / "rng.pt", weights_only=False), generator)
    return json.loads((folder / "state.json").read_text())
