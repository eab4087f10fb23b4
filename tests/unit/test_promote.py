"""The promotion gate's rules (fst/promote.py) on hand-made scores."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fst.k8s.api import PromotionSpec, TaskStream
from fst.plan import StageRun, StageStatus, next_stage, serving_run, start_run
from fst.promote import Score, decide, reason_suffix


def scores(**rates: float) -> dict[str, Score]:
    return {stage.replace("_", "-"): Score(pass_rate=r, n=16) for stage, r in rates.items()}


def test_a_candidate_better_on_its_stage_and_no_worse_elsewhere_passes():
    d = decide(
        PromotionSpec(),
        "mul",
        scores(add_sub=0.75, mul=0.5),
        scores(add_sub=0.8125, mul=0.25),
    )
    assert d.promoted and d.reason == "GatePassed"
    assert "0.500 (n=16) against the promoted model's 0.250 (n=16) (gain +0.250)" in d.message
    assert d.candidate["mul"].pass_rate == 0.5 and d.baseline["add-sub"].pass_rate == 0.8125


def test_a_drop_over_max_regression_names_the_worst_earlier_stage():
    rule = PromotionSpec(max_regression=0.1)
    d = decide(
        rule,
        "capitals",
        scores(add_sub=0.5, mul=0.5625, capitals=1.0),
        scores(add_sub=0.75, mul=0.625, capitals=0.5),
    )
    # add-sub dropped 0.25 (> 0.1), mul 0.0625 (allowed).
    assert not d.promoted and d.reason == "RegressionOnAddSub"
    assert "a drop of 0.250 is over maxRegression 0.1" in d.message


def test_a_drop_of_exactly_max_regression_is_allowed():
    rule = PromotionSpec(max_regression=0.25)
    d = decide(rule, "b", scores(a=0.5, b=0.5), scores(a=0.75, b=0.5))
    assert d.promoted, d.message


def test_a_regression_is_named_first_then_min_score_then_min_gain():
    wrecked = decide(PromotionSpec(min_gain=0.1), "b", scores(a=0.0, b=0.0), scores(a=1.0, b=0.5))
    assert (wrecked.promoted, wrecked.reason) == (False, "RegressionOnA")
    low = decide(PromotionSpec(min_score=0.6), "b", scores(a=1.0, b=0.5), scores(a=1.0, b=0.0))
    assert (low.promoted, low.reason) == (False, "BelowMinScore")
    flat = decide(PromotionSpec(min_gain=0.1), "b", scores(a=1.0, b=0.5), scores(a=1.0, b=0.45))
    assert (flat.promoted, flat.reason) == (False, "InsufficientGain")
    assert "gain +0.050 is below minGain 0.1" in flat.message


def test_the_default_rule_rejects_a_candidate_worse_on_its_own_stage():
    d = decide(PromotionSpec(), "a", scores(a=0.25), scores(a=0.375))
    assert (d.promoted, d.reason) == (False, "InsufficientGain")


def test_scores_of_different_stages_are_refused():
    with pytest.raises(ValueError, match="compares different stages"):
        decide(PromotionSpec(), "b", scores(a=0.5, b=0.5), scores(b=0.5))
    with pytest.raises(ValueError, match="needs both models' scores"):
        decide(PromotionSpec(), "c", scores(a=0.5), scores(a=0.5))


def test_reasons_are_valid_condition_reasons():
    assert reason_suffix("add-sub") == "AddSub"
    assert reason_suffix("stage2-v2") == "Stage2V2"


# ----------------------------------------------------------------------------- the planner


def three_stages(**spec) -> TaskStream:
    return TaskStream.model_validate(
        {
            "apiVersion": "fastslow.io/v1alpha1",
            "kind": "TaskStream",
            "metadata": {"name": "acme"},
            "spec": {
                "defaults": {"mode": "rl"},
                "stages": [
                    {"name": name, "task": {"name": "arithmetic"}, "steps": 1}
                    for name in ("a", "b", "c")
                ],
                **spec,
            },
        }
    )


def done(stage: str, promoted: bool | None) -> StageRun:
    gate = None
    if promoted is not None:
        ours, theirs = (0.5, 0.25) if promoted else (0.25, 0.5)
        gate = decide(PromotionSpec(), stage, scores(**{stage: ours}), scores(**{stage: theirs}))
    return StageRun(
        stage=stage,
        version=1,
        run=f"acme-{stage}",
        status=StageStatus.SUCCEEDED,
        checkpoint=f"/ckpt/{stage}/step-00000001",
        population=[f"prompt of {stage}"],
        gate=gate,
        bundle=f"/ckpt/{stage}/bundle/step-00000001" if promoted is not False else None,
    )


def test_the_next_stage_starts_from_the_promoted_run_not_a_rejected_one():
    runs = [done("a", True), done("b", False)]
    assert [r.promoted for r in runs] == [True, False]
    nxt = next_stage(three_stages(), runs, lambda t: None, lambda uri: ["p"])
    assert nxt is not None and nxt.stage == "c"
    assert nxt.start_checkpoint == "/ckpt/a/step-00000001"
    # The spec may choose the rejected candidate instead.
    spec = three_stages(promotion={"nextStageFrom": "candidate"})
    nxt = next_stage(spec, runs, lambda t: None, lambda uri: ["p"])
    assert nxt is not None and nxt.start_checkpoint == "/ckpt/b/step-00000001"
    # A run that was never gated (evalProblems: 0) counts as promoted.
    assert start_run([done("a", None)], PromotionSpec()).stage == "a"


def test_serving_is_the_newest_promoted_run_or_the_pinned_stage():
    runs = [done("a", True), done("b", True), done("c", False)]
    assert serving_run(runs, None).stage == "b"
    assert serving_run(runs, "a").stage == "a"
    assert serving_run(runs, "c") is None  # rejected: never served
    assert serving_run([], None) is None  # the base model with the seed prompt


def test_a_pin_must_name_a_stage_of_the_stream():
    with pytest.raises(ValidationError, match=r"serving.pin: no stage named 'zz'"):
        three_stages(serving={"pin": "zz"})
    assert three_stages(serving={"pin": "a"}).spec.serving.pin == "a"
