"""bench.fst_overhead's arithmetic: the amortised FST step, its ratio to the RL step, and where
a round's time goes, on hand-written cycles."""

from __future__ import annotations

import pytest

from bench.fst_overhead import Settings, summary, train_config, workers_of


def cycle(steps, rounds=()):
    return {
        "steps": [
            {
                "step_s": s,
                "gen_tokens": 100,
                "trained_tokens": 90,
                "reward_mean": 0.5,
                "calls": [{"phase": "step", "prompt_tokens": 50}],
            }
            for s in steps
        ],
        "rounds": list(rounds),
    }


def a_round(total, calls):
    return {
        "step_s": total,
        "gepa_metric_calls": sum(c["rows"] for c in calls),
        "gepa_new_candidates": 1,
        "calls": calls,
    }


def test_the_round_is_amortised_over_t_steps_and_broken_down_by_stage():
    rl = [cycle([10, 10, 10, 10]), cycle([10, 12, 10, 10])]
    calls = [
        {"phase": "rescore", "rows": 64, "s": 8.0},
        {"phase": "gepa minibatch", "rows": 16, "s": 4.0},
        {"phase": "gepa minibatch", "rows": 16, "s": 4.0},
        {"phase": "gepa Pareto set", "rows": 16, "s": 3.0},
    ]
    fst = [
        cycle([11, 11, 11, 11], [a_round(20.0, calls)]),
        cycle([11, 11, 11, 11], [a_round(24.0, calls)]),
    ]
    r = summary(rl, fst, every=4)
    assert r["rl_step_s"] == 10 and r["fst_step_s"] == 11
    assert r["ratio_without_round"] == pytest.approx(1.1)
    # (4 x 11 + 20) / 4 = 16 and (4 x 11 + 24) / 4 = 17: median 16.5
    assert r["fst_amortised_step_s"] == pytest.approx(16.5)
    assert r["ratio_amortised"] == pytest.approx(1.65)
    # All cycles together: (8 x 11 + 20 + 24) / 8 = 16.5 against (80 + 2) / 8 = 10.25
    assert r["fst_mean_step_with_rounds_s"] == pytest.approx(16.5)
    assert r["ratio_of_totals"] == pytest.approx(16.5 / 10.25)
    b = r["round_breakdown"]
    assert b["rescore (s)"] == 8.0 and b["rescore (rows)"] == 64
    assert b["gepa minibatch (calls)"] == 2 and b["gepa minibatch (s)"] == 8.0
    assert b["reflection + bookkeeping (s)"] == pytest.approx(22.0 - 19.0)
    assert r["round_metric_calls"] == 112


def test_one_fst_worker_per_proposals_setting_on_the_same_run():
    s = Settings(proposals_per_iteration=(1, 4), reuse_step_rollouts=(4,))
    assert workers_of(s) == {
        "rl": (0, False, None),
        "fst p=1": (1, False, None),
        "fst p=4": (4, False, None),
        "fst p=4 reuse": (4, True, None),
    }
    budgeted = workers_of(
        Settings(proposals_per_iteration=(), reuse_step_rollouts=(4,), max_prompt_tokens=96)
    )
    assert budgeted == {
        "rl": (0, False, None),
        "fst p=4 reuse": (4, True, None),
        "fst p=4 reuse max96": (4, True, 96),
    }
    assert train_config(s, 4, "/tmp/x", True, 96).fast.max_prompt_tokens == 96
    rl, fst = train_config(s, 0, "/tmp/x"), train_config(s, 4, "/tmp/x")
    reuse = train_config(s, 4, "/tmp/x", reuse=True)
    assert (rl.mode, fst.mode, fst.fast.proposals_per_iteration) == ("rl", "fst", 4)
    assert (fst.fast.reuse_step_rollouts, reuse.fast.reuse_step_rollouts) == (False, True)
    assert reuse.fast.model_copy(update={"reuse_step_rollouts": False}) == fst.fast
    assert fst.fast.max_prompt_tokens is None
    same = ("slow", "rollout", "task", "model", "seed")
    assert all(getattr(rl, k) == getattr(fst, k) == getattr(reuse, k) for k in same)
