"""Kill a real training run with SIGKILL and resume it: the steps after the resume must
produce the same metrics (and, in mode fst, the same prompt population) as a run that was
never interrupted. Real model (SmolLM2-135M-Instruct), real subprocesses."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import (
    comparable,
    fst_cmd,
    run_fst,
    tiny_config,
    wait_for_checkpoint,
    write_config,
)

pytestmark = pytest.mark.slow


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def kill_after_checkpoint(cfg_path: Path, manifest: Path, timeout: float = 600) -> None:
    """Start `fst train`, SIGKILL it as soon as `manifest` exists."""
    proc = subprocess.Popen(
        fst_cmd("train", "-c", str(cfg_path), "--no-progress"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_checkpoint(proc, manifest, timeout)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("mode", ["rl", "fst"])
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, mode):
    straight = tiny_config(tmp_path / "a", mode=mode)
    killed = tiny_config(tmp_path / "b", mode=mode)
    run_fst("train", "-c", str(write_config(tmp_path, straight, "a.yaml")), "--no-progress")

    cfg_b = write_config(tmp_path, killed, "b.yaml")
    run_b = Path(killed["outputDir"]) / "t"
    kill_after_checkpoint(cfg_b, run_b / "checkpoints" / "step-00000002" / "manifest.json")
    # Without --resume the saved run is protected, not overwritten.
    refused = run_fst("train", "-c", str(cfg_b), "--no-progress", check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    run_fst("train", "-c", str(cfg_b), "--resume", "--no-progress")

    run_a = Path(straight["outputDir"]) / "t"
    metrics_a, metrics_b = read_jsonl(run_a / "metrics.jsonl"), read_jsonl(run_b / "metrics.jsonl")
    assert [m["step"] for m in metrics_b] == [1, 2, 3, 4]
    for a, b in zip(metrics_a, metrics_b, strict=True):
        a, b = comparable(a), comparable(b)
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
            else:
                assert b[key] == a[key], (a["step"], key)
    assert any(m["updated"] for m in metrics_a), "the weights should have been updated"

    if mode == "fst":
        pop_a, pop_b = (
            read_jsonl(run_a / "population.jsonl"),
            read_jsonl(run_b / "population.jsonl"),
        )
        assert [r["round"] for r in pop_b] == [0, 1]
        assert [[m["text"] for m in r["members"]] for r in pop_a] == [
            [m["text"] for m in r["members"]] for r in pop_b
        ]
        assert "population_size" in metrics_b[0] and "population_size" in metrics_b[2]
