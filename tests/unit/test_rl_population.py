"""Mode rl trains the weights under the seed prompt alone: `fast.initialPopulation` (what a
stream hands over from a previous fst stage) is ignored, and said so in the log."""

from __future__ import annotations

import json
import logging

import pytest

import fst.loop
from fst.config import validate_config
from fst.model import load_tokenizer, prompt_tokens
from tests.tiny_model import (  # noqa: F401 (fixtures)
    one_torch_thread,
    tiny_model_dir,
    tiny_run_config,
    varied_reward,
)

EVOLVED = ["An evolved prompt from an fst stage.", "Another evolved prompt."]


def config(tmp_path, model_dir, mode: str):
    raw = tiny_run_config(tmp_path, model_dir, mode=mode, steps=2)
    raw["fast"]["initialPopulation"] = EVOLVED
    return validate_config(raw)


@pytest.mark.usefixtures("one_torch_thread")
def test_rl_run_uses_only_the_seed_prompt(tmp_path, tiny_model_dir, monkeypatch, caplog):  # noqa: F811
    cfg = config(tmp_path, tiny_model_dir, "rl")
    systems: list[str | None] = []
    chat_prompt_ids = fst.loop.chat_prompt_ids

    def spy(tok, system, user):
        systems.append(system)
        return chat_prompt_ids(tok, system, user)

    monkeypatch.setattr(fst.loop, "chat_prompt_ids", spy)
    with caplog.at_level(logging.INFO, logger="fst.loop"):
        fst.loop.train(cfg, progress=False)

    assert systems and set(systems) == {cfg.fast.seed_prompt}
    state = json.loads((cfg.run_dir / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert [p["text"] for p in state["population"]] == [cfg.fast.seed_prompt]
    assert "mode rl: fast.initialPopulation (2 prompts) is ignored" in caplog.text


def test_fst_run_starts_from_the_initial_population(tmp_path, tiny_model_dir, caplog):  # noqa: F811
    cfg = config(tmp_path, tiny_model_dir, "fst")
    with caplog.at_level(logging.INFO, logger="fst.loop"):
        run = fst.loop.build_run(cfg, cfg.run_dir)
    assert [p.text for p in run.population] == EVOLVED
    assert "is ignored" not in caplog.text


@pytest.mark.usefixtures("one_torch_thread", "varied_reward")
def test_gepa_run_keeps_the_weights_and_measures_their_entropy(tmp_path, tiny_model_dir):  # noqa: F811
    """Mode gepa never updates the weights, yet each step reports the policy's entropy on the
    tokens a training step would use, so it is compared with the other modes' on one scale."""
    cfg = validate_config(tiny_run_config(tmp_path, tiny_model_dir, mode="gepa", steps=2))
    fst.loop.train(cfg, progress=False)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in rows if "reward_mean" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(m["updated"] == 0.0 and "loss" not in m for m in steps)
    signal = [m for m in steps if m["zero_var_groups"] < 1.0]
    assert signal, "varied_reward should vary within some group"
    assert all(m["entropy"] > 0 and m["entropy_tokens"] > 0 for m in signal)


def test_fst_run_counts_the_budget_in_the_policys_tokens(tmp_path, tiny_model_dir, caplog):  # noqa: F811
    """fast.maxPromptTokens, counted by the run's tokenizer: a member over it is dropped
    (said in the log), and the digest reflector is told the budget."""
    raw = tiny_run_config(tmp_path, tiny_model_dir, mode="fst", steps=2)
    raw["fast"]["seedPrompt"] = "Be brief."
    raw["fast"]["initialPopulation"] = ["Short.", "A prompt that is much longer than that. " * 4]
    cfg = validate_config(raw)
    tokens = [prompt_tokens(load_tokenizer(cfg.model), t) for t in raw["fast"]["initialPopulation"]]
    raw["fast"]["maxPromptTokens"] = budget = max(tokens[0], len("Be brief.")) + 1
    assert tokens[1] > budget
    cfg = validate_config(raw)
    with caplog.at_level(logging.INFO, logger="fst.loop"):
        run = fst.loop.build_run(cfg, cfg.run_dir)
    assert [p.text for p in run.population] == ["Short."]
    assert "1 of 2 prompts are over fast.maxPromptTokens" in caplog.text
    assert run.reflector.fits("Short.") and not run.reflector.fits(EVOLVED[0] * 4)
