"""The periodic held-out eval (metrics.evalEvery) on a real `fst train` run: a step-0 point, a
point every N steps, nothing duplicated by a resume, and `fst report` still draws the run.
The run is the tiny random Llama (tests/tiny_model.py) with its varied reward
(tests/varied_fst.py), which the eval scores too: what is tested is when the eval runs and what
it records, not how well the model does (SmolLM2 took ~3 min here for the same schedule)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_config
from tests.tiny_model import tiny_model_dir, tiny_run_config  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    """`fst ARGS` with the tiny model's varied reward, torch on one thread."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.varied_fst", *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        pytest.fail(f"fst {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def test_eval_every_records_a_learning_curve(tmp_path: Path, tiny_model_dir: Path) -> None:  # noqa: F811
    cfg = tiny_run_config(
        tmp_path,
        tiny_model_dir,
        mode="fst",
        steps=3,
        **{"metrics.evalEvery": 2, "metrics.evalProblems": 3, "checkpoint.every": 3},
    )
    path = write_config(tmp_path, cfg)
    run("train", "-c", str(path), "--no-progress")
    run_dir = Path(cfg["outputDir"]) / "t"

    def records() -> list[dict]:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines if x.strip()]

    first = records()
    assert [m["step"] for m in first] == [0, 1, 2, 3]
    evals = {m["step"]: m for m in first if "eval_pass_rate" in m}
    assert sorted(evals) == [0, 2, 3]  # step 0, every 2 steps, and the last step
    assert "reward_mean" not in evals[0]  # the base point has no rollouts
    for m in evals.values():
        assert m["eval_n"] == 3
        assert m["eval_pass_rate"] in (0.0, 1 / 3, 2 / 3, 1.0)

    # A finished run resumed again adds nothing (the step-0 point is not written twice).
    run("train", "-c", str(path), "--resume", "--no-progress")
    assert records() == first
    report = run("report", str(run_dir))
    assert "report:" in report.stdout
