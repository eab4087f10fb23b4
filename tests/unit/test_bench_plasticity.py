"""The learning benchmark's plasticity probe (bench/learning): its manifests, and its analysis on
hand-written stage runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.learning.analyze import analyze_plasticity, tables
from bench.learning.run import plan
from bench.learning.spec import PLASTICITY_STEPS_B, STEPS, plasticity_manifest
from fst.k8s.api import TaskStream
from fst.plan import check_stages, stage_config, stage_spec


def test_the_probe_trains_a_then_a_fresh_rl_run_on_b_without_the_population(tmp_path):
    stream = TaskStream.model_validate(plasticity_manifest("fst", str(tmp_path)))
    check_stages(stream, "probe")  # every stage makes a valid run
    assert [s.name for s in stream.spec.stages] == ["a", "b"]
    assert stream.spec.promotion.next_stage_from == "candidate"  # B starts from A, gated or not
    assert not stream.spec.continue_trajectory  # a fresh AdamW on B
    a = stage_config(stream, stage_spec(stream, "a"), "a")
    assert (a.mode, a.steps, a.task.params["ops"]) == ("fst", STEPS, ["*"])
    # B, handed A's checkpoint and FST population, trains by rl under the seed prompt alone.
    b = stage_config(
        stream,
        stage_spec(stream, "b"),
        "b",
        start_checkpoint="/x/checkpoints/step-00000020",
        start_population=["an evolved prompt", "another"],
    )
    assert (b.mode, b.steps, b.metrics.eval_every) == ("rl", PLASTICITY_STEPS_B, 2)
    assert b.model.name == "/x/checkpoints/step-00000020" and not b.fast.initial_population
    base = TaskStream.model_validate(plasticity_manifest("base", str(tmp_path)))
    assert [s.name for s in base.spec.stages] == ["b"]
    with pytest.raises(ValueError, match="plasticity arm"):
        plasticity_manifest("gepa", str(tmp_path))


def test_the_probe_is_planned_after_the_rest_unless_switched_off(tmp_path):
    names = [j.name for j in plan(tmp_path, (0,), 4, streams=False)]
    assert names[-3:] == ["plasticity-base-s0", "plasticity-rl-s0", "plasticity-fst-s0"]
    assert not any("plasticity" in j.name for j in plan(tmp_path, (0,), 4, False, plasticity=False))


def write_probe(out: Path, arm: str, evals: list[float]) -> None:
    folder = out / "streams" / f"plasticity-{arm}-s0"
    run = f"plasticity-{arm}-s0-b"
    (folder / run).mkdir(parents=True)
    stages = [{"stage": "b", "run": run, "status": "succeeded"}]
    (folder / "stream.json").write_text(json.dumps({"stages": stages}))
    lines = [{"step": 2 * i, "eval_pass_rate": v} for i, v in enumerate(evals)]
    lines += [{"step": s, "reward_mean": 0.1 * s} for s in range(1, 2 * len(evals) - 1)]
    (folder / run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_steps_to_threshold_and_the_table(tmp_path):
    write_probe(tmp_path, "base", [0.2, 0.3, 0.5, 0.6])
    write_probe(tmp_path, "rl", [0.3, 0.3, 0.4, 0.5])  # the lowest end: the threshold, 0.5
    write_probe(tmp_path, "fst", [0.3, 0.5, 0.6, 0.7])
    figdir = tmp_path / "fig"
    figdir.mkdir()
    result = analyze_plasticity(tmp_path, figdir)
    arms = result["arms"]
    assert {a: arms[a][0]["steps_to_threshold"] for a in arms} == {
        "base": 4.0,
        "rl": 6.0,
        "fst": 2.0,
    }
    assert arms["fst"][0]["gain"] == pytest.approx(0.4) and arms["rl"][0]["threshold"] == 0.5
    assert (figdir / "plasticity.png").is_file()
    summary = {"runs": {}, "unfinished": [], "tasks": {}, "streams": {}, "plasticity": result}
    table = tables(summary)
    assert "| fst | 0 | 0.300 | 0.700 | +0.400 | 0.500 | 2 |" in table
