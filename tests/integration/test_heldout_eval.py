"""The periodic held-out eval (metrics.evalEvery) on a real SmolLM2 run: a step-0 point, a
point every N steps, nothing duplicated by a resume, and `fst report` still draws the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_fst, tiny_config, write_config

pytestmark = pytest.mark.slow


def test_eval_every_records_a_learning_curve(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        mode="fst",
        steps=3,
        **{"metrics.evalEvery": 2, "metrics.evalProblems": 3, "checkpoint.every": 3},
    )
    path = write_config(tmp_path, cfg)
    # A GEPA round, 3 steps and 3 evals: ~4 min alone, much longer on a shared CPU.
    run_fst("train", "-c", str(path), "--no-progress", timeout=1700)
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
    run_fst("train", "-c", str(path), "--resume", "--no-progress")
    assert records() == first
    report = run_fst("report", str(run_dir))
    assert "report:" in report.stdout
