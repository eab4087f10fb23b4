"""The learning benchmark (bench/learning): the plasticity probe's manifests, and the analysis
(plasticity, differences with bootstrap intervals) on hand-written runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.learning.analyze import analyze_plasticity, tables
from bench.learning.run import plan
from bench.learning.spec import (
    COMMON,
    PLASTICITY_STEPS_B,
    STEPS,
    RunSpec,
    plasticity_manifest,
    run_config,
)
from fst.config import TaskConfig, TrainConfig
from fst.k8s.api import TaskStream
from fst.plan import check_stages, stage_config, stage_spec
from fst.tasks import build_task


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
    assert a.model.autocast == b.model.autocast == "bfloat16"  # every run of the bench alike
    base = TaskStream.model_validate(plasticity_manifest("base", str(tmp_path)))
    assert [s.name for s in base.spec.stages] == ["b"]
    with pytest.raises(ValueError, match="plasticity arm"):
        plasticity_manifest("gepa", str(tmp_path))


def test_the_probe_is_planned_after_the_rest_unless_switched_off(tmp_path):
    names = [j.name for j in plan(tmp_path, (0,), 4, streams=False)]
    assert names[-12:] == [
        "plasticity-base-s0",
        "plasticity-rl-s0",
        "plasticity-fst-s0",
        "plasticity-fst-distill-s0",
        # The variants come last: they are compared with everything before them.
        "mul-fst-reuse-s0",
        "mul-fst-reuse-max96-s0",
        "mul-fst-p4-reuse-max96-s0",
        "mul-fst-p4-reuse-max96-overlap-s0",
        "house-fst-reuse-s0",
        "house-fst-reuse-max96-s0",
        "house-fst-p4-reuse-max96-s0",
        "house-fst-p4-reuse-max96-overlap-s0",
    ]
    assert not any("plasticity" in j.name for j in plan(tmp_path, (0,), 4, False, plasticity=False))


def test_a_variant_runs_its_base_mode_with_its_fast_settings(tmp_path):
    variant = TrainConfig.model_validate(run_config(RunSpec("mul", "fst-reuse", 1), str(tmp_path)))
    fst = TrainConfig.model_validate(run_config(RunSpec("mul", "fst", 1), str(tmp_path)))
    assert (variant.run, variant.mode, variant.fast.reuse_step_rollouts) == (
        "mul-fst-reuse-s1",
        "fst",
        True,
    )
    assert variant.model_copy(update={"run": fst.run}) != fst
    assert variant.fast.model_copy(update={"reuse_step_rollouts": False}) == fst.fast
    assert all(getattr(variant, k) == getattr(fst, k) for k in ("slow", "task", "seed", "steps"))
    jobs = {j.name: j for j in plan(tmp_path, (1,), 4, streams=False, plasticity=False)}
    assert [c[3] for c in jobs["mul-fst-reuse-s1"].commands] == ["train", "eval"]  # decomposed


def write_probe(out: Path, arm: str, evals: list[float], seed: int = 0) -> None:
    folder = out / "streams" / f"plasticity-{arm}-s{seed}"
    run = f"plasticity-{arm}-s{seed}-b"
    (folder / run).mkdir(parents=True)
    stages = [{"stage": "b", "run": run, "status": "succeeded"}]
    (folder / "stream.json").write_text(json.dumps({"stages": stages}))
    # Per-problem outcomes on 10 test problems: the first round(10 * v) pass.
    lines = [
        {
            "step": 2 * i,
            "eval_pass_rate": v,
            "eval_passed": "1" * round(10 * v) + "0" * (10 - round(10 * v)),
        }
        for i, v in enumerate(evals)
    ]
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
    # Intervals over seeds x problems: fst's B gain (3 -> 7 of 10 on the same problems) and
    # its B end against the base arm's (7 vs 6 of 10).
    ci = result["intervals"]
    assert ci["fst"]["gain"]["estimate"] == pytest.approx(0.4)
    assert 0 < ci["fst"]["gain"]["low"] <= 0.4 <= ci["fst"]["gain"]["high"]
    assert ci["fst"]["end_vs_base"]["estimate"] == pytest.approx(0.1)
    assert ci["base"]["end_vs_base"] is None
    assert "| fst | 1 | +0.400 [" in table


def test_the_bench_stream_is_one_trajectory_through_three_tasks(tmp_path):
    from bench.learning.spec import TASKS, stream_manifest

    stream = TaskStream.model_validate(stream_manifest("fst-distill", str(tmp_path)))
    check_stages(stream, "bench stream")
    assert stream.spec.continue_trajectory and stream.spec.promotion.next_stage_from == "candidate"
    assert [s.name for s in stream.spec.stages] == ["add-sub", "multiply", "house"]
    second = stage_config(
        stream, stage_spec(stream, "multiply"), "m", start_checkpoint="/x/step-00000006"
    )
    # Stage 2 continues stage 1's state; its GEPA cadence does not restart at the boundary.
    assert second.continue_from == "/x/step-00000006" and second.mode == "fst-distill"
    assert second.fast.every_steps == 4 and 6 % 4 != 0
    assert second.model.autocast == "bfloat16"
    assert TASKS["house"]["params"]["hiddenOp"] == "-"
    names = [j.name for j in plan(tmp_path, (0,), 4, streams=True, plasticity=False)]
    assert {f"stream-{m}-s0" for m in ("rl", "fst", "fst-distill", "gepa")} <= set(names)


def test_stream_acquisition_carries_a_paired_interval(tmp_path):
    from bench.learning.analyze import analyze_streams

    folder = tmp_path / "streams" / "stream-fst-s0"
    stages = []
    for name, first, last in (("one", "00000000", "11110000"), ("two", "11000000", "11000000")):
        run = f"stream-fst-s0-{name}"
        (folder / run).mkdir(parents=True)
        rows = [
            {"step": 0, "eval_pass_rate": first.count("1") / 8, "eval_passed": first},
            {"step": 6, "eval_pass_rate": last.count("1") / 8, "eval_passed": last},
        ]
        (folder / run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        stages.append(
            {"stage": name, "run": run, "status": "succeeded", "evaluation": {"retention": {}}}
        )
    (folder / "stream.json").write_text(json.dumps({"stages": stages}))
    figdir = tmp_path / "fig"
    figdir.mkdir()
    r = analyze_streams(tmp_path, figdir)["fst"]
    one, two = r["acquisition_ci"]
    assert one["estimate"] == pytest.approx(0.5) and 0 < one["low"] < 0.5 < one["high"]
    assert two == {"estimate": 0.0, "low": 0.0, "high": 0.0}


def write_run(out: Path, name: str, evals: list[str], entropy: float, kl: float) -> None:
    """A finished run: evals every 2 steps as per-problem outcome strings, KL growing by
    `kl` per step, constant entropy, the same outcomes on the OOD task."""
    run = out / "runs" / name
    run.mkdir(parents=True)
    lines = []
    for i, passed in enumerate(evals):
        rate = passed.count("1") / len(passed)
        lines.append(
            {
                "step": 2 * i,
                "eval_pass_rate": rate,
                "eval_passed": passed,
                "ood_pass_rate": rate,
                "ood_passed": passed,
            }
        )
    for step in range(1, 2 * len(evals) - 1):
        lines.append(
            {"step": step, "reward_mean": 0.5, "entropy": entropy, "kl": kl * step, "loss": 0.1}
        )
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run / "done.json").write_text(json.dumps({"wall_s": 1.0, "cpu_s": 1.0}))


def test_differences_against_rl_carry_bootstrap_intervals(tmp_path):
    from bench.learning.analyze import differences, load_run

    runs = {}
    for seed in (0, 1, 2):
        # rl: 2 of 8 at step 0, 4 of 8 from step 4; fst: the same start, 6 of 8 at step 2.
        write_run(tmp_path, f"rl-{seed}", ["11000000", "11000000", "11110000"], 1.0, 0.02)
        write_run(tmp_path, f"fst-{seed}", ["11000000", "11111100", "11111100"], 1.5, 0.01)
        runs[("rl", seed)] = load_run(tmp_path / "runs" / f"rl-{seed}")
        runs[("fst", seed)] = load_run(tmp_path / "runs" / f"fst-{seed}")
    d = differences(runs)["fst"]
    assert d["seeds"] == [0, 1, 2]
    assert d["final"]["estimate"] == pytest.approx(0.25)  # 6/8 - 4/8
    assert d["final"]["low"] < 0.25 < d["final"]["high"]
    assert d["ood"]["estimate"] == pytest.approx(0.25)
    assert d["peak_ratio"]["estimate"] == pytest.approx(0.5) and d["peak_reached"] == 3
    # Matched reward 0.5: rl at step 4 (KL 0.08); fst, interpolated, at step 1 (KL 0.01).
    assert d["kl_ratio"]["estimate"] == pytest.approx(0.125)
    assert d["entropy"]["estimate"] == pytest.approx(0.5)


def test_every_task_of_the_bench_has_room_for_its_splits(tmp_path):
    """Each task a bench job trains or evaluates on generates all its splits at their sizes,
    the out-of-domain task included (a house stage with operands up to 20 asked for 240
    distinct problems of 231 and failed its stream two stages in, after ~40 CPU-minutes)."""
    from bench.learning.spec import COMMON, TASKS, stream_manifest

    stream = stream_manifest("rl", str(tmp_path))
    tasks = {
        **{f"task {k}": v for k, v in TASKS.items()},
        **{f"stage {s['name']}": s["task"] for s in stream["spec"]["stages"]},
        "plasticity B": plasticity_manifest("base", str(tmp_path))["spec"]["stages"][0]["task"],
        "ood": COMMON["metrics"]["oodTask"],
    }
    for what, spec in tasks.items():
        cfg = TaskConfig.model_validate(spec)
        task = build_task(cfg)
        for split, size in (
            ("train", cfg.train_size),
            ("val", cfg.val_size),
            ("test", cfg.test_size),
        ):
            assert len(task.problems(split)) == size, (what, split)


def test_a_run_restarted_before_its_first_checkpoint_counts_its_base_eval_once(tmp_path):
    from bench.learning.analyze import load_run

    base = {"step": 0, "eval_pass_rate": 0.5, "eval_passed": "10"}
    steps = [{"step": s, "reward_mean": 0.25, "loss": 0.1} for s in (1, 2)]
    steps[1].update(eval_pass_rate=1.0, eval_passed="11")
    rows = [base, base, base, *steps]  # three attempts' base points, as older runs wrote them
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "done.json").write_text("{}")
    run = load_run(tmp_path)
    assert run is not None
    assert run["eval_steps"] == [0, 2] and run["eval"] == [0.5, 1.0]
    assert run["train_steps"] == [1, 2]


def test_a_finished_job_is_recorded_without_weights_and_restored_into_an_empty_workspace(
    tmp_path,
):
    from bench.learning.run import record_job, restore_recorded

    out, record = tmp_path / "out", tmp_path / "record"
    jobs = {j.name: j for j in plan(out, (0,), STEPS, streams=True, plasticity=False)}
    run, stream = jobs["mul-rl-s0"], jobs["stream-fst-s0"]
    for job in (run, stream):
        (job.folder / "stage-a" / "checkpoints" / "step-00000006").mkdir(parents=True)
        (
            job.folder / "stage-a" / "checkpoints" / "step-00000006" / "model.safetensors"
        ).write_bytes(b"w" * 1000)
        (job.folder / "fst.db").write_bytes(b"a stream's database")
        (job.folder / "metrics.jsonl").write_text('{"step": 0, "eval_pass_rate": 0.5}\n')
        (job.folder / "done.json").write_text('{"wall_s": 1, "cpu_s": 1}')
        record_job(job, out, record)
    assert (record / "runs" / "mul-rl-s0" / "metrics.jsonl").is_file()
    assert (record / "configs" / "mul-rl-s0.yaml").is_file()
    recorded = [p.name for p in record.rglob("*")]
    assert not {"checkpoints", "model.safetensors", "fst.db"} & set(recorded)

    # The workspace is lost (a new machine): the recorded jobs come back as done, the rest not.
    empty = tmp_path / "new-out"
    jobs = plan(empty, (0,), STEPS, streams=True, plasticity=False)
    assert sorted(restore_recorded(jobs, empty, record)) == ["mul-rl-s0", "stream-fst-s0"]
    done = sorted(j.name for j in jobs if j.done)
    assert done == ["mul-rl-s0", "stream-fst-s0"]
    restored = empty / "runs" / "mul-rl-s0" / "metrics.jsonl"
    assert restored.read_text() == '{"step": 0, "eval_pass_rate": 0.5}\n'
    # A job that is done in the workspace is left as it is.
    assert restore_recorded(jobs, empty, record) == []


def test_compare_pairs_two_variants_by_seed_and_says_how_late_their_rounds_came(tmp_path):
    from bench.learning.analyze import compare

    every = COMMON["fast"]["everySteps"]
    for seed in (0, 1):
        write_run(tmp_path, f"mul-late-s{seed}", ["11000000", "11111100"], 1.0, 0.01)
        write_run(tmp_path, f"mul-now-s{seed}", ["11000000", "11110000"], 1.0, 0.01)
        for variant, late in (("late", 3), ("now", 0)):
            # Rounds 0 and 1, due before steps 1 and T + 1, recorded `late` steps after.
            rounds = [
                {"round": i, "step": i * every + 1 + late, "members": [{"text": "a prompt"}]}
                for i in (0, 1)
            ]
            path = tmp_path / "runs" / f"mul-{variant}-s{seed}" / "population.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rounds))
            metrics = path.parent / "metrics.jsonl"
            with metrics.open("a") as f:  # one round's record: 10 rollouts sampled
                f.write(json.dumps({"step": 1, "gepa_s": 1.0, "gepa_metric_calls": 10}) + "\n")
    write_run(tmp_path, "mul-late-s2", ["11000000", "11111111"], 1.0, 0.01)  # no pair: left out
    table = compare(tmp_path, "late", "now", seeds=(0, 1, 2)).splitlines()
    assert len(table) == 3 and "house" not in table[2]  # header, rule, the one task both ran
    cells = [c.strip() for c in table[2].split("|")[1:-1]]
    assert cells[0] == "`mul` (seeds 0, 1)"
    assert cells[1] == "0.750 / 0.750" and cells[2] == "0.500 / 0.500"
    assert cells[3].startswith("+0.250 [")  # 6/8 - 4/8 on the last eval of both seeds
    assert cells[6] == "10 / 10" and cells[7] == "3.0 / 0.0"
