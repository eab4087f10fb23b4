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
from tests.tiny_model import (  # noqa: F401  (fixtures)
    tiny_model_dir,
    tiny_run_config,
    varied_reward,
)

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


def test_fst_eval_decodes_as_the_run_did_under_autocast(
    tmp_path: Path,
    tiny_model_dir: Path,  # noqa: F811
    varied_reward,  # noqa: F811
    monkeypatch,
) -> None:
    """`fst eval` decodes as the run did, model.autocast included (it used to decode in
    float32 whatever the run's setting): every engine it builds casts to bfloat16, and its
    (trained weights, FST prompt) row passes exactly the problems the run's last held-out
    eval passed, on the same problems."""
    import torch

    from fst.cli import build_parser
    from fst.rollout.hf import HFRolloutEngine

    n = 8
    cfg = tiny_run_config(
        tmp_path,
        tiny_model_dir,
        mode="fst",
        steps=2,
        **{
            "model.autocast": "bfloat16",
            "metrics.evalEvery": 2,
            "metrics.evalProblems": n,
            "checkpoint.every": 2,
            "task.testSize": n,
        },
    )
    path = write_config(tmp_path, cfg)
    run("train", "-c", str(path), "--no-progress")
    run_dir = Path(cfg["outputDir"]) / "t"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    last = [json.loads(x) for x in lines if x.strip() and "eval_passed" in x][-1]
    assert last["step"] == 2

    dtypes = []
    generate = HFRolloutEngine.generate

    def recording(self, *args, **kwargs):
        dtypes.append(self.autocast_dtype)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(HFRolloutEngine, "generate", recording)
    out = tmp_path / "decomposition.json"
    args = build_parser().parse_args(
        ["eval", "-c", str(path), "--limit", str(n), "--json", str(out)]
    )
    assert args.func(args) == 0
    assert dtypes and set(dtypes) == {torch.bfloat16}, dtypes
    trained_fst = json.loads(out.read_text())["trained weights + FST prompt"]
    assert "".join("1" if p else "0" for p in trained_fst["passed"]) == last["eval_passed"]
    assert trained_fst["n"] == n
