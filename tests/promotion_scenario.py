"""The promotion gate's scenario on SmolLM2, shared by `fst stream` (tests/integration/
test_promotion.py) and the operator (tests/integration/test_operator_promotion.py):

    add, add-more    trained with a learning rate too small to change a greedy answer: each
                     candidate scores what the promoted model scores, passes the gate
                     (gain 0 >= minGain 0), and is promoted; a bundle is published
    wreck            more additions, trained with a learning rate that wrecks the weights:
                     add's retention collapses: rejected, RegressionOnAdd... (a regression of
                     what is served is named first); what is served stays add-more's bundle
    recover          a fourth stage added later: it starts from the promoted add-more (not the
                     rejected wreck), passes, is promoted and served
"""

from __future__ import annotations

from typing import Any

# Short additions SmolLM2 often gets right; long mixed expressions it gets wrong.
ADD = {
    "name": "arithmetic",
    "trainSize": 16,
    "valSize": 2,
    "testSize": 8,
    "params": {"steps": 1, "maxOperand": 9, "ops": ["+"], "answerFormat": "last_number"},
}
STILL = {"slow": {"lr": 1e-12}}  # the weights move by ~1e-12: no greedy answer changes
# Enough rollouts per step that some groups have reward variance (an update), and a rate
# that moves every weight by ~3e-3 per step.
WRECK = {"slow": {"lr": 3e-3, "problemsPerStep": 4, "groupSize": 4}}

STAGES: list[dict[str, Any]] = [
    {"name": "add", "task": ADD, "steps": 2, **STILL},
    {"name": "add-more", "task": {**ADD, "seed": 3}, "steps": 2, **STILL},
    {"name": "wreck", "task": {**ADD, "seed": 5}, "steps": 3, **WRECK},
]
RECOVER: dict[str, Any] = {"name": "recover", "task": {**ADD, "seed": 11}, "steps": 2, **STILL}


def stream_spec(**spec: Any) -> dict[str, Any]:
    """The TaskStream spec of the scenario (stages: STAGES unless given)."""
    return {
        "model": {"name": "smollm2-135m-instruct"},
        "evalProblems": 8,
        "promotion": {"maxRegression": 0.1},
        "defaults": {
            "mode": "rl",
            "seed": 1,
            "rollout": {"temperature": 0.8, "maxNewTokens": 8, "batchSize": 16},
            "slow": {"problemsPerStep": 2, "groupSize": 2, "microBatchSize": 4},
            "metrics": {"klPrompts": 1, "klEvery": 2},
            "checkpoint": {"every": 2, "keepLast": 1},
        },
        "stages": STAGES,
        **spec,
    }
