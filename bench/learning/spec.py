"""What the learning benchmark runs: tasks x modes x seeds, and the continual stream.

Every run of one (task, seed) shares the same base model, problems (task seed 0: the same
train/val/test splits and the same batch order), run seed (sampling noise), optimizer steps,
problems per step and group size, so `rl` and `fst` take the same optimizer steps on the same
training rollouts; `fst` and `gepa` also spend GEPA evaluation rollouts, which are counted
(metrics.jsonl `gepa_metric_calls`) and reported beside the results.

Sizing (2-core CPU, SmolLM2-135M-Instruct, one torch thread per run): see README.md here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

MODES = ("rl", "fst", "fst-distill", "gepa")
# The `fast` settings two variants below share.
_P4_REUSE_MAX96 = {"proposalsPerIteration": 4, "reuseStepRollouts": True, "maxPromptTokens": 96}
# Settings on trial before any becomes a default: a variant runs its base mode with these
# `fast` settings on the same tasks and seeds (job <task>-<variant>-s<seed>), and `analyze`
# compares it with the base mode's jobs.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # GEPA rounds start from the last T steps' rollouts (docs/performance.md, round 2 item 4).
    "fst-reuse": ("fst", {"reuseStepRollouts": True}),
    # The same, with the population's prompts held to 96 tokens (fast.maxPromptTokens): the
    # seed prompt, one worked example and a lesson or two (docs/performance.md, item 4).
    "fst-reuse-max96": ("fst", {"reuseStepRollouts": True, "maxPromptTokens": 96}),
    # The settings under which FST's overhead met its target (docs/performance.md, round 2
    # item 4, ninth pass): GEPA's proposals 4 at a time, reuse, the budget, and a round's
    # rollouts riding in the next steps' engine calls (fast.overlapRound: its population comes
    # in a few steps later than a round run at once). And the same without the overlap.
    "fst-p4-reuse-max96": ("fst", _P4_REUSE_MAX96),
    "fst-p4-reuse-max96-overlap": ("fst", {**_P4_REUSE_MAX96, "overlapRound": True}),
}
SEEDS = (0, 1, 2)
STEPS = 20

# Tasks where the base model starts low. Both are generated arithmetic because on this CPU a
# star_graph or codeio prompt is 3-6x longer, and generation dominates the cost.
TASKS: dict[str, dict[str, Any]] = {
    # Multiplication, lenient answer format: the base model is right some of the time
    # (sampled), so RL has some signal from the first step. Operands up to 25: 351 distinct
    # products up to commutativity (the splits keep a * b and b * a together), room for 64
    # held-out problems, 16 val and 160 train; up to 15 there were 136.
    "mul": {
        "name": "arithmetic",
        "trainSize": 160,
        "valSize": 16,
        "testSize": 64,
        "params": {"steps": 1, "maxOperand": 25, "ops": ["*"], "answerFormat": "last_number"},
    },
    # A house notation: "Compute 14 # 9." where '#' is subtraction, said only in the feedback
    # ("In this task a # b always means a - b, e.g. ..."). The base model reads '#' as
    # multiplication or worse (0 of 48 greedy, 2 of 96 sampled at T=0.7); told the rule in its
    # system prompt, 11 of 48 greedy and 10 of 96 sampled. The offline digest reflector lifts
    # exactly that sentence into the prompt, so the fast channel can unlock what RL alone has
    # almost no signal for: the paper's star-graph regime. (`boxed`, the previous zero-start
    # task, stayed at 0 in every mode: SmolLM2-135M ignores format rules in a system prompt.)
    # Operands up to 25: 351 pairs a >= b; up to 20 there were 231, short of the 240 the
    # splits take (the first house stage of the stream failed on it). On the first 48 test
    # problems, greedy: 0 under the seed prompt at both sizes (3 of all 64 at 25), 8 (25) and
    # 11 (20) with the rule.
    "house": {
        "name": "arithmetic",
        "trainSize": 160,
        "valSize": 16,
        "testSize": 64,
        "params": {
            "steps": 1,
            "maxOperand": 25,
            "ops": ["-"],
            "hiddenOp": "-",
            "nonNegative": True,
            "answerFormat": "last_number",
        },
    },
}

# Shared by every run (and by the stream's stages).
COMMON: dict[str, Any] = {
    # Matmuls in bf16 (this CPU has AVX-512 BF16), weights, gradients and AdamW state in fp32:
    # a step took 0.55x its fp32 time in bench/speed (docs/performance.md, round 2 item 3),
    # which is what makes this spec's ~37 jobs fit in a few sessions. Every mode alike.
    "model": {"autocast": "bfloat16"},
    "rollout": {"temperature": 0.7, "maxNewTokens": 48, "batchSize": 32},
    "slow": {
        "problemsPerStep": 4,
        "groupSize": 4,
        "lr": 1.0e-5,
        "warmupSteps": 1,
        "microBatchSize": 16,
    },
    "fast": {
        "everySteps": 5,  # GEPA rounds before steps 1, 6, 11, 16
        "topK": 4,  # K <= G: each problem's 4 rollouts use the 4 prompts
        "metricCalls": 32,  # ~4 proposals per round; 12 (1-2) got none accepted
        "minibatchSize": 4,
        "paretoSize": 8,
        "reflector": {"kind": "digest"},
    },
    # A held-out eval every 2 steps on 64 test problems, and the same on a task no run
    # trains on (out of domain: exact division, lenient format).
    "metrics": {
        "klPrompts": 4,
        "klEvery": 2,
        "evalEvery": 2,
        "evalProblems": 64,
        "oodTask": {
            "name": "arithmetic",
            "trainSize": 1,
            "valSize": 1,
            "testSize": 64,
            "params": {"steps": 1, "maxOperand": 20, "ops": ["/"], "answerFormat": "last_number"},
        },
    },
    # One mid-run checkpoint for resumability; keepLast 1 because each is ~1.6 GB.
    "checkpoint": {"every": 10, "keepLast": 1},
}

STREAM_STEPS = 6
STREAM_STAGES: list[dict[str, Any]] = [
    {
        "name": "add-sub",
        "task": {
            "name": "arithmetic",
            "trainSize": 256,
            "valSize": 16,
            "testSize": 64,
            "params": {
                "steps": 1,
                "maxOperand": 20,
                "ops": ["+", "-"],
                "answerFormat": "last_number",
            },
        },
    },
    {"name": "multiply", "task": TASKS["mul"]},
    {"name": "house", "task": TASKS["house"]},
]


# The plasticity probe (the paper: "starting from a checkpoint trained with either method, a
# fresh RL pass on a new task"): task A trained in mode rl, fst or fst-distill, then a FRESH
# rl run on task B from A's final checkpoint, under the seed prompt alone (an rl stage never
# inherits a population: fst.loop.initial_population), with a new AdamW (no
# continueTrajectory). Arm `base` runs B from the base model: the reference a trained
# checkpoint is compared with. There is no gepa arm: gepa never changes the weights, so its
# checkpoint IS the base model and its arm would be arm base run again.
PLASTICITY_ARMS = ("base", "rl", "fst", "fst-distill")
PLASTICITY_A = "mul"
PLASTICITY_B: dict[str, Any] = copy.deepcopy(STREAM_STAGES[0]["task"])  # add/sub, lenient
PLASTICITY_STEPS_B = 12


def plasticity_manifest(arm: str, output_dir: str, seed: int = 0) -> dict[str, Any]:
    """The probe of one arm as a TaskStream: stage `a` (task A, mode `arm`, STEPS steps;
    absent for arm base), then stage `b` (task B, mode rl, PLASTICITY_STEPS_B steps, a held-out
    eval every 2 steps). B starts from A's final checkpoint whatever the gate decides
    (nextStageFrom: candidate): the probe measures the checkpoint, not the gate."""
    if arm not in PLASTICITY_ARMS:
        raise ValueError(f"plasticity arm {arm!r}: one of {PLASTICITY_ARMS}")
    defaults = copy.deepcopy(COMMON)
    model = defaults.pop("model")  # a stream's model is spec.model, one for every stage
    defaults.update(mode="rl", seed=seed)
    defaults["checkpoint"] = {"every": STEPS, "keepLast": 1}
    stage_b: dict[str, Any] = {
        "name": "b",
        "task": copy.deepcopy(PLASTICITY_B),
        "steps": PLASTICITY_STEPS_B,
        "mode": "rl",
        "metrics": {"evalEvery": 2},
    }
    stages = [stage_b]
    if arm != "base":
        stages.insert(
            0,
            {"name": "a", "task": copy.deepcopy(TASKS[PLASTICITY_A]), "steps": STEPS, "mode": arm},
        )
    return {
        "apiVersion": "fastslow.io/v1alpha1",
        "kind": "TaskStream",
        "metadata": {"name": f"plasticity-{arm}-s{seed}"},
        "spec": {
            "outputDir": output_dir,
            "model": model,
            "evalProblems": 16,
            "promotion": {"nextStageFrom": "candidate"},
            "defaults": defaults,
            "stages": stages,
        },
    }


@dataclass(frozen=True)
class RunSpec:
    task: str
    mode: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.task}-{self.mode}-s{self.seed}"


def run_config(spec: RunSpec, output_dir: str, steps: int = STEPS) -> dict[str, Any]:
    """The `fst train` config of one run."""
    cfg = copy.deepcopy(COMMON)
    mode, fast = VARIANTS.get(spec.mode, (spec.mode, {}))
    cfg.update(
        run=spec.name,
        mode=mode,
        steps=steps,
        seed=spec.seed,
        outputDir=output_dir,
        task=copy.deepcopy(TASKS[spec.task]),
    )
    cfg["fast"].update(fast)
    return cfg


def base_mode(mode_or_variant: str) -> str:
    """The `mode` a job's config runs: a variant's base mode, or the mode itself."""
    return VARIANTS.get(mode_or_variant, (mode_or_variant, {}))[0]


def stream_manifest(mode: str, output_dir: str, seed: int = 0) -> dict[str, Any]:
    """A 3-stage TaskStream, all stages in `mode`; the streams of the modes differ only in mode.

    The paper's continual setting: ONE trajectory across the stages (continueTrajectory:
    AdamW, schedule, step counter and population carry over) from a task-agnostic seed prompt,
    and a GEPA round every 4 steps of the whole run (before steps 1, 5, 9, 13, 17), which does
    not line up with the stage boundaries (steps 7 and 13): the fast channel is not told when
    the data changed."""
    defaults = copy.deepcopy(COMMON)
    model = defaults.pop("model")  # a stream's model is spec.model, one for every stage
    defaults.update(mode=mode, seed=seed)
    defaults["fast"]["everySteps"] = 4
    defaults["checkpoint"] = {"every": STREAM_STEPS, "keepLast": 1}
    return {
        "apiVersion": "fastslow.io/v1alpha1",
        "kind": "TaskStream",
        "metadata": {"name": f"stream-{mode}-s{seed}"},
        "spec": {
            "outputDir": output_dir,
            "model": model,
            # Retention + decomposition after each stage: 16 test problems (cost).
            "evalProblems": 16,
            "continueTrajectory": True,
            # One trajectory whatever the gate says (a rejected stage still hands on).
            "promotion": {"nextStageFrom": "candidate"},
            "defaults": defaults,
            "stages": [
                {"name": s["name"], "task": copy.deepcopy(s["task"]), "steps": STREAM_STEPS}
                for s in STREAM_STAGES
            ],
        },
    }


def all_runs(seeds: tuple[int, ...] = SEEDS) -> list[RunSpec]:
    """Seed-major, so that a partial bench has complete (task, seed) triples first; the
    variants last."""
    return [RunSpec(t, m, s) for s in seeds for t in TASKS for m in MODES] + [
        RunSpec(t, v, s) for s in seeds for t in TASKS for v in VARIANTS
    ]
