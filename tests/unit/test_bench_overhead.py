"""bench.fst_overhead's arithmetic: the amortised FST step, its ratio to the RL step, and where
a round's time goes, on hand-written cycles."""

from __future__ import annotations

import pytest

from bench.fst_overhead import Settings, Worker, summary, train_config, workers_of


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


def test_an_overlap_cycle_is_timed_whole_and_each_round_that_ended_in_it_counted():
    rl = [cycle([10, 10, 10, 10]), cycle([10, 10, 10, 10])]
    call = {"phase": "rescore", "rows": 0, "s": 0.1}

    def overlap_cycle(total, *ended):
        return cycle([12, 12, 12, 12], [{"step_s": total, "calls": [call], "ended": list(ended)}])

    first = {"gepa_metric_calls": 20, "gepa_new_candidates": 1, "gepa_rows_alongside_steps": 20}
    second = {"gepa_metric_calls": 40, "gepa_new_candidates": 3, "gepa_rows_alongside_steps": 36}
    # The first cycle's round ends in the second, with the one after it.
    r = summary(rl, [overlap_cycle(0.4), overlap_cycle(0.8, first, second)], every=4)
    assert r["round_s"] == pytest.approx(0.6)  # per cycle: (4 x 12 + 0.4) / 4, (48 + 0.8) / 4
    assert r["fst_amortised_step_s"] == pytest.approx(12.15)
    assert r["rounds_ended"] == 2
    assert (r["round_metric_calls"], r["round_new_candidates"]) == (30, 2)
    assert r["round_rows_alongside_steps"] == 28
    nothing_ended = summary(rl, [overlap_cycle(0.4)], every=4)
    assert (nothing_ended["rounds_ended"], nothing_ended["round_metric_calls"]) == (0, 0.0)


def test_one_fst_worker_per_proposals_setting_on_the_same_run():
    s = Settings(proposals_per_iteration=(1, 4), reuse_step_rollouts=(4,))
    assert workers_of(s) == {
        "rl": Worker(0),
        "fst p=1": Worker(1),
        "fst p=4": Worker(4),
        "fst p=4 reuse": Worker(4, reuse=True),
    }
    overlapping = workers_of(
        Settings(
            proposals_per_iteration=(),
            reuse_step_rollouts=(4,),
            max_prompt_tokens=96,
            overlap_round=True,
        )
    )
    assert overlapping == {
        "rl": Worker(0),
        "fst p=4 reuse overlap": Worker(4, True, None, True),
        "fst p=4 reuse max96 overlap": Worker(4, True, 96, True),
    }
    assert train_config(s, Worker(4, True, 96), "/tmp/x").fast.max_prompt_tokens == 96
    rl, fst = train_config(s, Worker(0), "/tmp/x"), train_config(s, Worker(4), "/tmp/x")
    reuse = train_config(s, Worker(4, True), "/tmp/x")
    assert (rl.mode, fst.mode, fst.fast.proposals_per_iteration) == ("rl", "fst", 4)
    assert (fst.fast.reuse_step_rollouts, reuse.fast.reuse_step_rollouts) == (False, True)
    assert reuse.fast.model_copy(update={"reuse_step_rollouts": False}) == fst.fast
    assert fst.fast.max_prompt_tokens is None and not reuse.fast.overlap_round
    same = ("slow", "rollout", "task", "model", "seed")
    assert all(getattr(rl, k) == getattr(fst, k) == getattr(reuse, k) for k in same)
    # The overlap twin differs in fast.overlapRound and in room for a round's rows.
    overlap = train_config(s, Worker(4, True, None, True), "/tmp/x")
    assert overlap.fast.model_copy(update={"overlap_round": False}) == reuse.fast
    assert overlap.rollout.batch_size == 2 * reuse.rollout.batch_size == 64
