"""Kill a real training run with SIGKILL and resume it: the steps after the resume must
produce the same metrics (and, in mode fst, the same prompt population) as a run that was
never interrupted. Real `fst train` subprocesses on the tiny random Llama (tests/tiny_model.py)
with its varied reward (tests/varied_fst.py), so that every step has reward variance and
updates the weights, and GEPA's rounds score the policy's own rollouts: what is compared is
the checkpoint's weights, AdamW state, random streams and population, not the model's skill.
(SmolLM2 goes through the same loading and checkpoint code; it took ~5 min per mode here.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import comparable, wait_for_checkpoint, write_config
from tests.tiny_model import tiny_model_dir, tiny_run_config  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def varied_fst(*args: str) -> list[str]:
    """`fst ARGS` with the tiny model's varied reward (tests/varied_fst.py)."""
    return [sys.executable, "-m", "tests.varied_fst", *args]


def one_thread() -> dict[str, str]:
    """The environment with torch on one thread: the tiny model's matrices are too small
    for a second one to help (see tests.tiny_model.one_torch_thread)."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        varied_fst(*args), cwd=REPO, env=one_thread(), capture_output=True, text=True, timeout=900
    )
    if check and proc.returncode != 0:
        pytest.fail(f"fst {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def signal_after_checkpoint(
    cfg_path: Path, manifest: Path, sig: int = signal.SIGKILL, timeout: float = 600
) -> tuple[int, str]:
    """Start `fst train` (run `t`), send it `sig` as soon as `manifest` (step 2) exists; return
    its exit code and stderr. The run waits there for the signal (FST_TEST_HANG_AFTER,
    tests/varied_fst.py): a tiny-model step takes a fraction of a second, so it would
    otherwise often be past step 3, or done."""
    proc = subprocess.Popen(
        varied_fst("train", "-c", str(cfg_path), "--no-progress"),
        cwd=REPO,
        env={**one_thread(), "FST_TEST_HANG_AFTER": "t:2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_checkpoint(proc, manifest, timeout)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


@pytest.mark.parametrize(
    "mode", ["rl", "fst", "fst-distill", "fst-bf16", "fst-reuse", "fst-overlap"]
)
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir, mode):  # noqa: F811
    # fst-distill: a population without the seed prompt, so that its best prompt differs from
    # the student's context from step 1 and the distill term runs on every step.
    # It also scores an out-of-domain task in the periodic eval (metrics.oodTask).
    extras = {
        "fst-distill": {
            "fast.initialPopulation": ["Be brief.", "Answer with a number."],
            "metrics.evalEvery": 2,
            "metrics.evalProblems": 3,
            "metrics.oodTask": {"name": "arithmetic", "trainSize": 1, "valSize": 1, "testSize": 3},
        },
        # bf16 autocast and GEPA proposing two candidates per iteration (batched evaluations)
        # resume exactly too.
        "fst-bf16": {"model.autocast": "bfloat16", "fast.proposalsPerIteration": 2},
        # Round 1 starts from the rollouts of steps 1-2, which only the checkpoint of step 2
        # carries across the kill.
        "fst-reuse": {"fast.reuseStepRollouts": True},
        # Rounds in flight across steps (their rows sampled beside the steps'), each finished
        # before the checkpoint of step 2 and the end.
        "fst-overlap": {"fast.reuseStepRollouts": True, "fast.overlapRound": True},
    }
    extra = extras.get(mode, {})
    bf16, reuse, overlap = mode == "fst-bf16", mode == "fst-reuse", mode == "fst-overlap"
    mode = "fst" if mode in ("fst-bf16", "fst-reuse", "fst-overlap") else mode
    straight = tiny_run_config(tmp_path / "a", tiny_model_dir, mode=mode, **extra)
    killed = tiny_run_config(tmp_path / "b", tiny_model_dir, mode=mode, **extra)
    if bf16:  # at the tiny model's lr of 1e-2, in bf16 it collapses to one completion per
        # group by step 4 (no reward variance, no update); 3e-3 keeps every step training
        straight["slow"]["lr"] = killed["slow"]["lr"] = 3e-3
    run("train", "-c", str(write_config(tmp_path, straight, "a.yaml")), "--no-progress")

    cfg_b = write_config(tmp_path, killed, "b.yaml")
    run_b = Path(killed["outputDir"]) / "t"
    code, _ = signal_after_checkpoint(
        cfg_b, run_b / "checkpoints" / "step-00000002" / "manifest.json"
    )
    assert code == -signal.SIGKILL
    # Without --resume the saved run is protected, not overwritten.
    refused = run("train", "-c", str(cfg_b), "--no-progress", check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    run("train", "-c", str(cfg_b), "--resume", "--no-progress")

    run_a = Path(straight["outputDir"]) / "t"
    metrics_a, metrics_b = read_jsonl(run_a / "metrics.jsonl"), read_jsonl(run_b / "metrics.jsonl")
    assert [m["step"] for m in metrics_b if "reward_mean" in m] == [1, 2, 3, 4]
    for a, b in zip(metrics_a, metrics_b, strict=True):
        a, b = comparable(a), comparable(b)
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
            else:
                assert b[key] == a[key], (a["step"], key)
    # Every step trains (the varied reward), so steps 3 and 4 depend on the restored weights
    # and AdamW state.
    steps_a = [m for m in metrics_a if "reward_mean" in m]
    assert all(m["updated"] for m in steps_a), "every step should update the weights"

    if mode == "fst-distill":  # the distill term ran on every step, before and after the kill
        trained = [m for m in metrics_b if "reward_mean" in m]
        assert all(m["distill_kl"] > 0 and m["distill_tokens"] > 0 for m in trained), metrics_b
        evals = [m for m in metrics_b if "eval_pass_rate" in m]
        assert [m["step"] for m in evals] == [0, 2, 4]  # step 0: the base point of the curve
        assert all(len(m["eval_passed"]) == len(m["ood_passed"]) == 3 for m in evals)
        assert all(m["ood_pass_rate"] == m["ood_passed"].count("1") / 3 for m in evals)
    if mode in ("fst", "fst-distill"):
        pop_a, pop_b = (
            read_jsonl(run_a / "population.jsonl"),
            read_jsonl(run_b / "population.jsonl"),
        )
        assert [r["round"] for r in pop_b] == [0, 1]
        assert [[m["text"] for m in r["members"]] for r in pop_a] == [
            [m["text"] for m in r["members"]] for r in pop_b
        ]
        assert pop_a[1]["members"] == pop_b[1]["members"]  # scores too: the resumed policy's
        assert pop_a[1]["members"] != pop_a[0]["members"], "round 1 scores the trained policy"
        by_step = {m["step"]: m for m in metrics_b if "reward_mean" in m}
        if overlap:  # each round ends at a step of its own (its record names it), by step 2, 4
            ended = [m for m in by_step.values() if "population_size" in m]
            assert [m["round"] for m in ended] == [0, 1] and ended[0]["step"] <= 2, ended
            # Round 0 re-scores the seed prompt: rows sampled beside step 1's.
            assert by_step[1]["gen_round_rows"] > 0 and ended[0]["gepa_rows_alongside_steps"] > 0
            assert ended[1]["gepa_reused_rows"] > 0, ended[1]
            return
        assert "population_size" in by_step[1] and "population_size" in by_step[3]
        # Round 0 has no steps to reuse; round 1 re-scores the population from steps 1-2.
        assert by_step[1]["gepa_reused_rows"] == 0
        assert (by_step[3]["gepa_reused_rows"] > 0) == reuse


def test_sigterm_releases_the_run_so_the_next_attempt_starts_at_once(tmp_path, tiny_model_dir):  # noqa: F811
    """SIGTERM (a pod deleted, drained or evicted) unwinds the run: exit 143, the run's writer
    lease released (status `stopped`, no writer), so a resume starts at once rather than
    waiting the lease out (fst/signals.py), and continues from the checkpoint."""
    from fst.store.db import RunDB, database_url

    cfg = tiny_run_config(tmp_path, tiny_model_dir)
    cfg_path = write_config(tmp_path, cfg, "t.yaml")
    out_dir = Path(cfg["outputDir"])
    manifest = out_dir / "t" / "checkpoints" / "step-00000002" / "manifest.json"
    code, err = signal_after_checkpoint(cfg_path, manifest, signal.SIGTERM, timeout=300)
    assert code == 143, err[-3000:]
    assert "stopped (SIGTERM); continue with --resume" in err
    with RunDB(database_url(cfg.get("database"), out_dir / "fst.db")) as db:
        info = db.run_info("t")
        assert info["status"] == "stopped" and info["writer"] is None, info
        assert any("Terminated" in msg for _, kind, msg in db.events("t") if kind == "error")
    out = run("train", "-c", str(cfg_path), "--resume", "--no-progress")
    assert "resumed t at step 2" in out.stderr and "waiting for its lease" not in out.stderr


def test_an_attempt_that_resumes_at_the_final_step_announces_its_checkpoint(
    tmp_path,
    tiny_model_dir,  # noqa: F811
):
    """A background upload can commit the final checkpoint after its attempt last reported
    one (the pod killed in between): the next attempt resumes there, trains nothing, and must
    still say which checkpoint is the run's latest, or the operator's status.checkpointUri
    keeps the one before it (it mirrors the last "checkpoint" event)."""
    import sqlite3

    from fst.store.db import RunDB, database_url

    cfg = tiny_run_config(tmp_path, tiny_model_dir, steps=2)
    cfg_path = write_config(tmp_path, cfg, "t.yaml")
    out_dir = Path(cfg["outputDir"])
    final = str(out_dir / "t" / "checkpoints" / "step-00000002")
    run("train", "-c", str(cfg_path), "--no-progress")
    db_path = out_dir / "fst.db"
    with RunDB(database_url(cfg.get("database"), db_path)) as db:
        assert db.progress("t").checkpoint_uri == final
    # The window between the commit and its event: the event never made it.
    with sqlite3.connect(db_path) as con:
        con.execute("DELETE FROM events WHERE kind = 'checkpoint' AND message = ?", (final,))
    with RunDB(database_url(cfg.get("database"), db_path)) as db:
        assert db.progress("t").checkpoint_uri != final
    out = run("train", "-c", str(cfg_path), "--resume", "--no-progress")
    assert "resumed t at step 2" in out.stderr
    with RunDB(database_url(cfg.get("database"), db_path)) as db:
        assert db.progress("t").checkpoint_uri == final
        announced = [msg for _, kind, msg in db.events("t") if kind == "checkpoint"]
    # Announced once: a second resume with nothing new adds no duplicate.
    run("train", "-c", str(cfg_path), "--resume", "--no-progress")
    with RunDB(database_url(cfg.get("database"), db_path)) as db:
        assert [msg for _, kind, msg in db.events("t") if kind == "checkpoint"] == announced


def test_a_fresh_start_after_an_attempt_that_saved_nothing_keeps_one_base_eval(
    tmp_path,
    tiny_model_dir,  # noqa: F811
):
    """An attempt killed before its first checkpoint leaves records (its base eval at step 0,
    maybe some steps) but nothing to resume: the next attempt starts afresh and its records
    replace them all. Before, the base eval was kept and written again, one more step-0 row per
    such restart (found in the learning bench: three in one run's metrics.jsonl)."""
    cfg = tiny_run_config(
        tmp_path, tiny_model_dir, **{"metrics.evalEvery": 2, "metrics.evalProblems": 3}
    )
    cfg_path = write_config(tmp_path, cfg, "t.yaml")
    run_dir = Path(cfg["outputDir"]) / "t"
    run("train", "-c", str(cfg_path), "--no-progress")
    first = read_jsonl(run_dir / "metrics.jsonl")
    # As if the attempt had been killed before saving anything: no checkpoint to resume.
    shutil.rmtree(run_dir / "checkpoints")
    out = run("train", "-c", str(cfg_path), "--resume", "--no-progress")
    assert "resumed" not in out.stderr
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics if "eval_pass_rate" in m] == [0, 2, 4]
    assert [m["step"] for m in metrics if "reward_mean" in m] == [1, 2, 3, 4]
    assert len(metrics) == len(first)
