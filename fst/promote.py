"""The promotion gate: is a stage's candidate better than the model being served? Pure.

After a stage's run succeeds, two models are scored by greedy pass rate on the same problems:

    candidate   the run's final weights with its best prompt
    promoted    what is served now: the last promoted stage's bundle, or at first the base
                model with the seed prompt

on the stage's own test split and on the retention set of every earlier stage (the first
`evalProblems` test problems of each). `decide` applies the stream's PromotionSpec:

    promoted[s] - candidate[s] <= maxRegression, each earlier s   else RegressionOn<S>
    candidate[stage] >= minScore                         else BelowMinScore
    candidate[stage] - promoted[stage] >= minGain        else InsufficientGain

in that order (a regression of what is served now is named first: it is what a bad stage
breaks for the customer), and returns a GateDecision holding every number behind it: what
`fst stream` writes to stream.json and the database (and, with issue 19's cluster part, what
the operator writes to status).

Greedy decoding makes each score a function of (weights, prompt, problems): the promoted
model's scores on earlier stages are those its own gate measured, so only the new stage's
problems are scored for it again.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

from fst.k8s.api import PromotionSpec

GATE_PASSED = "GatePassed"
BELOW_MIN_SCORE = "BelowMinScore"
INSUFFICIENT_GAIN = "InsufficientGain"
REGRESSION_ON = "RegressionOn"  # + the stage's name in CamelCase: RegressionOnAddSub


class Score(BaseModel):
    """A greedy pass rate on `n` problems."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pass_rate: float = Field(ge=0, le=1)
    n: int = Field(ge=0)

    def __str__(self) -> str:
        return f"{self.pass_rate:.3f} (n={self.n})"


class GateDecision(BaseModel):
    """The gate's verdict on one stage's candidate, with every number behind it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str
    promoted: bool
    reason: str = Field(description="A condition reason: GatePassed, RegressionOn<Stage>, ...")
    message: str
    candidate: dict[str, Score] = Field(description="Stage -> the candidate's score.")
    baseline: dict[str, Score] = Field(description="Stage -> the promoted model's score.")
    rule: PromotionSpec


def reason_suffix(stage: str) -> str:
    """A stage's name (a DNS label) as the CamelCase tail of a condition reason."""
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^A-Za-z0-9]+", stage))


def decide(
    rule: PromotionSpec,
    stage: str,
    candidate: dict[str, Score],
    baseline: dict[str, Score],
) -> GateDecision:
    """Apply `rule` to the candidate of `stage`. Both score maps hold `stage` and the same
    earlier stages (in stream order); the first rule that fails names the decision."""
    if stage not in candidate or stage not in baseline:
        raise ValueError(f"the gate of stage {stage!r} needs both models' scores on it")
    if set(candidate) != set(baseline):
        raise ValueError(
            f"the gate of stage {stage!r} compares different stages: candidate "
            f"{sorted(candidate)}, promoted {sorted(baseline)}"
        )
    new, old = candidate[stage], baseline[stage]
    gain = new.pass_rate - old.pass_rate

    def verdict(promoted: bool, reason: str, message: str) -> GateDecision:
        return GateDecision(
            stage=stage,
            promoted=promoted,
            reason=reason,
            message=message,
            candidate=candidate,
            baseline=baseline,
            rule=rule,
        )

    regressions = [
        (baseline[s].pass_rate - candidate[s].pass_rate, s)
        for s in candidate
        if s != stage and baseline[s].pass_rate - candidate[s].pass_rate > rule.max_regression
    ]
    if regressions:
        drop, worst = max(regressions)
        return verdict(
            False,
            REGRESSION_ON + reason_suffix(worst),
            f"{stage}: on earlier stage {worst} the candidate scored {candidate[worst]} against "
            f"the promoted model's {baseline[worst]}: a drop of {drop:.3f} is over "
            f"maxRegression {rule.max_regression:g}",
        )
    if new.pass_rate < rule.min_score:
        return verdict(
            False,
            BELOW_MIN_SCORE,
            f"{stage}: the candidate scored {new}, below minScore {rule.min_score:g}",
        )
    if gain < rule.min_gain:
        return verdict(
            False,
            INSUFFICIENT_GAIN,
            f"{stage}: the candidate scored {new} against the promoted model's {old}: gain "
            f"{gain:+.3f} is below minGain {rule.min_gain:g}",
        )
    kept = ", ".join(f"{s} {candidate[s].pass_rate:.3f}" for s in candidate if s != stage)
    return verdict(
        True,
        GATE_PASSED,
        f"{stage}: the candidate scored {new} against the promoted model's {old} (gain "
        f"{gain:+.3f})" + (f"; earlier stages: {kept}" if kept else ""),
    )
