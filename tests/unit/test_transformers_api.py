"""Loading the policy, the rollout engine and the trainer use only the APIs the installed
transformers recommends: a load (full and LoRA), a generation and a training step on the tiny
Llama raise on any FutureWarning or DeprecationWarning, and transformers' logger reports no
deprecated name.

(transformers 5.24 renamed the model's `past_key_values` keyword and output to `cache`; the old
name still works but warns on every call, "will be removed in version 5.40.0".)
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from fst.config import ModelConfig, SlowConfig
from fst.rollout import SamplingParams
from fst.rollout.hf import HFRolloutEngine
from tests.conftest import IdsTok as Tok
from tests.tiny_model import tiny_model_dir  # noqa: F401 (fixture)


@pytest.fixture
def transformers_warnings(caplog):
    """transformers' own logger at WARNING (tests run it at ERROR), its warn-once memory
    cleared, captured by caplog."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    hf_logging.enable_propagation()
    hf_logging.warning_once.cache_clear()  # a message already shown once would stay silent
    with caplog.at_level(logging.WARNING, logger="transformers"):
        yield caplog
    hf_logging.disable_propagation()
    hf_logging.set_verbosity(level)


@pytest.mark.parametrize("lora", [None, {"rank": 4, "alpha": 8}], ids=["full", "lora"])
def test_load_generate_and_train_use_no_deprecated_api(
    tiny_model_dir,  # noqa: F811
    transformers_warnings,
    lora,
):
    from fst.model import load_policy
    from fst.slow.trainer import SlowTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        model = load_policy(ModelConfig(name=str(tiny_model_dir), lora=lora))
        engine = HFRolloutEngine(model, Tok(), stop_ids=[2], batch_size=8)
        trainer = SlowTrainer(model, SlowConfig(micro_batch_size=2, lr=1e-2), 0.7, pad_id=0)
        # Two rows share a prompt: the prefill's cache is expanded, and rows leave the batch.
        rollouts = engine.generate(
            [[50, 51, 52], [50, 51, 52], [60, 61]],
            SamplingParams(temperature=0.7, max_new_tokens=6),
            torch.Generator().manual_seed(0),
        )
        metrics = trainer.step(rollouts, [1.0, -1.0, 0.5])
    assert metrics["updated"] == 1.0 and all(r.completion_ids for r in rollouts)
    deprecated = [r.getMessage() for r in transformers_warnings.records if "deprecat" in str(r.msg)]
    assert deprecated == []
