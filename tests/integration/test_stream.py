"""`fst stream` end to end: a tiny two-stage stream killed during stage 2 and run again
continues stage 2 from its checkpoint; with --watch, new data starts a new stage from the last
checkpoint and population; the report is written.

Real `fst stream` subprocesses on the tiny random Llama (tests/tiny_model.py) with its varied
reward on the arithmetic stage (tests/varied_fst.py), so that stage 1 trains and stage 2 starts
from weights that are not the base's: what is tested is the stages' bookkeeping and hand-over,
which is the same for SmolLM2 (it took ~6 and ~4 min here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.tiny_model import tiny_model_dir  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def stream_cmd(*args: str) -> list[str]:
    """`fst stream ARGS` with the tiny model's varied reward (tests/varied_fst.py)."""
    return [sys.executable, "-m", "tests.varied_fst", "stream", *args]


def one_thread(**env: str) -> dict[str, str]:
    """The environment with torch on one thread (the tiny model gains nothing from a second)
    and `env`."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **env}


def stream_to_the_end(path: Path) -> subprocess.CompletedProcess:
    """`fst stream PATH --no-progress` to its end (one torch thread), output captured."""
    return subprocess.run(
        stream_cmd(str(path), "--no-progress"),
        cwd=REPO,
        env=one_thread(),
        capture_output=True,
        text=True,
        timeout=900,
    )


QA = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Egypt", "Cairo"),
    ("Spain", "Madrid"),
    ("Peru", "Lima"),
    ("Cuba", "Havana"),
    ("Kenya", "Nairobi"),
]


def write_qa(path: Path, pairs) -> None:
    path.write_text(
        "".join(
            json.dumps({"question": f"What is the capital of {c}?", "answer": a}) + "\n"
            for c, a in pairs
        )
    )


def stream_doc(tmp_path: Path, model: Path, stages: list[dict], **spec) -> Path:
    doc = {
        "apiVersion": "fastslow.io/v1alpha1",
        "kind": "TaskStream",
        "metadata": {"name": "tiny"},
        "spec": {
            "model": {"name": str(model)},
            "outputDir": str(tmp_path / "runs"),
            "evalProblems": 2,
            "watchIntervalSeconds": 1,
            "defaults": {
                "mode": "fst",
                "rollout": {"temperature": 0.8, "maxNewTokens": 6, "batchSize": 16},
                # lr 1e-2: the random model moves visibly (stage 2 starts from new weights)
                "slow": {"problemsPerStep": 2, "groupSize": 2, "lr": 1e-2},
                "fast": {
                    "everySteps": 2,
                    "topK": 2,
                    "metricCalls": 4,
                    "minibatchSize": 2,
                    "paretoSize": 2,
                },
                "metrics": {"klPrompts": 1, "klEvery": 2},
                "checkpoint": {"every": 1, "keepLast": 3},
            },
            "stages": stages,
            **spec,
        },
    }
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


ARITH = {
    "name": "arithmetic",
    "trainSize": 16,
    "valSize": 2,
    "testSize": 2,
    "params": {"steps": 1, "answerFormat": "last_number"},
}


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"fst stream exited {proc.returncode}:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out")
        time.sleep(0.3)


def test_killed_in_stage_two_resumes_stage_two(tmp_path, tiny_model_dir):  # noqa: F811
    qa = tmp_path / "qa.jsonl"
    write_qa(qa, QA)
    path = stream_doc(
        tmp_path,
        tiny_model_dir,
        [
            {"name": "first", "task": ARITH, "steps": 2},
            {
                "name": "second",
                "steps": 3,
                "task": {"name": "jsonl", "valSize": 2, "testSize": 2, "params": {"path": str(qa)}},
            },
        ],
    )
    runs = tmp_path / "runs" / "tiny"
    second_ckpt = runs / "tiny-second" / "checkpoints" / "step-00000001" / "manifest.json"
    # The stream waits to be killed right after stage 2's step-1 checkpoint (tests/varied_fst.py):
    # a tiny-model step takes a fraction of a second, so polling alone could land later.
    proc = subprocess.Popen(
        stream_cmd(str(path), "--no-progress"),
        cwd=REPO,
        env=one_thread(FST_TEST_HANG_AFTER="tiny-second:1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(second_ckpt.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)

    first_metrics = (runs / "tiny-first" / "metrics.jsonl").read_text()
    # Stage 1 trained (the varied reward): stage 2 starts from weights that are not the base's.
    assert any(json.loads(line)["updated"] for line in first_metrics.splitlines())
    first_ckpt_time = json.loads(
        (runs / "tiny-first" / "checkpoints" / "step-00000002" / "manifest.json").read_text()
    )["created"]
    second_step1 = json.loads(second_ckpt.read_text())["created"]
    state = json.loads((runs / "stream.json").read_text())["stages"]
    assert [(e["name"], e["status"]) for e in state] == [
        ("first", "succeeded"),
        ("second", "running"),
    ]

    out = stream_to_the_end(path)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "report:" in out.stdout
    state = json.loads((runs / "stream.json").read_text())["stages"]
    assert [(e["name"], e["status"]) for e in state] == [
        ("first", "succeeded"),
        ("second", "succeeded"),
    ]
    # Stage 1 was not re-run; stage 2 continued from its step-1 checkpoint (not from scratch).
    assert (runs / "tiny-first" / "metrics.jsonl").read_text() == first_metrics
    assert (
        json.loads(
            (runs / "tiny-first" / "checkpoints" / "step-00000002" / "manifest.json").read_text()
        )["created"]
        == first_ckpt_time
    )
    assert json.loads(second_ckpt.read_text())["created"] == second_step1
    assert "resumed tiny-second at step 1" in out.stderr
    steps = [
        json.loads(line)["step"]
        for line in (runs / "tiny-second" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3]
    # Stage 2 started from stage 1's final checkpoint and population, KL against the base.
    assert state[1]["start_checkpoint"] == state[0]["checkpoint"]
    assert state[1]["start_population"] == state[0]["population"]
    cfg = yaml.safe_load((runs / "tiny-second" / "config.yaml").read_text())
    assert cfg["model"]["name"] == state[0]["checkpoint"]
    assert cfg["model"]["reference"] == str(tiny_model_dir)
    assert set(state[1]["evaluation"]["retention"]) == {"first", "second"}
    # The database records the stream's stages next to their runs.
    from fst.store.db import RunDB, database_url

    stages = RunDB(database_url(None, runs / "fst.db")).stages("tiny")
    assert [(s.name, s.run_name, s.status) for s in stages] == [
        ("first", "tiny-first", "succeeded"),
        ("second", "tiny-second", "succeeded"),
    ]
    assert [s.checkpoint_uri for s in stages] == [e["checkpoint"] for e in state]
    assert all(s.population_version for s in stages)
    assert (runs / "report.html").is_file() and (runs / "reward_per_step.png").is_file()


def test_watch_starts_a_new_stage_when_data_changes(tmp_path, tiny_model_dir):  # noqa: F811
    qa = tmp_path / "qa.jsonl"
    write_qa(qa, QA[:6])
    path = stream_doc(
        tmp_path,
        tiny_model_dir,
        [
            {
                "name": "facts",
                "steps": 1,
                "task": {"name": "jsonl", "valSize": 2, "testSize": 2, "params": {"path": str(qa)}},
            },
        ],
    )
    runs = tmp_path / "runs" / "tiny"
    proc = subprocess.Popen(
        stream_cmd(str(path), "--watch", "--no-progress"),
        cwd=REPO,
        env=one_thread(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def entries() -> list[dict]:
            f = runs / "stream.json"
            return json.loads(f.read_text())["stages"] if f.is_file() else []

        wait_for(lambda: [e["status"] for e in entries()] == ["succeeded"], proc)
        write_qa(qa, QA)  # the customer's data grows
        wait_for(lambda: len(entries()) == 2 and entries()[1]["status"] == "succeeded", proc)
    finally:
        proc.kill()
        proc.wait(30)
    first, second = entries()
    assert second["name"] == "facts-v2" and second["version"] == 2
    assert second["source"] != first["source"]
    assert second["start_checkpoint"] == first["checkpoint"]
    assert second["start_population"] == first["population"]


def test_a_gate_killed_mid_evaluation_keeps_its_scores(tmp_path, tiny_model_dir):  # noqa: F811
    """A stream SIGKILLed during a stage's end-of-stage evaluation resumes it: the scores
    measured before the kill are kept (saved one by one in stream.json) and not measured
    again; the gate then decides on them."""
    path = stream_doc(
        tmp_path,
        tiny_model_dir,
        [
            {"name": "first", "task": ARITH, "steps": 1},
            {"name": "second", "task": {**ARITH, "seed": 4}, "steps": 1},
        ],
    )
    runs = tmp_path / "runs" / "tiny"
    state_file = runs / "stream.json"

    def scores() -> dict:
        return json.loads(state_file.read_text()).get("scores", {}) if state_file.is_file() else {}

    marker = tmp_path / "hanging"
    proc = subprocess.Popen(
        stream_cmd(str(path), "--no-progress"),
        cwd=REPO,
        env=one_thread(
            FST_TEST_HANG_AFTER_SCORES="tiny-second:2", FST_TEST_HANG_MARKER=str(marker)
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Stage 2's gate has measured two scores; the process then waits to be killed.
    wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    kept = scores()
    entries = json.loads(state_file.read_text())["stages"]
    assert [e["status"] for e in entries] == ["succeeded", "running"]
    assert entries[0]["gate"] is not None and entries[1]["gate"] is None

    out = stream_to_the_end(path)
    assert out.returncode == 0, out.stderr[-4000:]
    final = scores()
    assert {k: final[k] for k in kept} == kept  # nothing measured before the kill changed
    measured_again = out.stderr.count("gate: measured")
    assert measured_again == len(final) - len(kept), out.stderr[-3000:]
    entries = json.loads(state_file.read_text())["stages"]
    assert [e["status"] for e in entries] == ["succeeded", "succeeded"]
    assert entries[1]["gate"]["stage"] == "second"


def test_a_kill_while_publishing_a_bundle_keeps_the_previous_one_serving(
    tmp_path,
    tiny_model_dir,  # noqa: F811
    s3_uri,
):
    """A stream SIGKILLed while the promoted stage 2 uploads its bundle to MinIO (two files
    up, the rest and the manifest not): stage 1's bundle stays served, the half-written one
    is listed nowhere and cannot be fetched; run again, stage 2's bundle is published whole
    and served."""
    from fst.bundle import bundle_uri_of, fetch_bundle
    from fst.store.checkpoints import open_store
    from fst.store.layout import CheckpointError
    from fst.store.s3 import make_client, parse_endpoint, parse_s3_uri

    always = {"minGain": -1, "maxRegression": 1}  # the tiny model's scores are noise: promote
    path = stream_doc(
        tmp_path,
        tiny_model_dir,
        [
            {"name": "first", "task": ARITH, "steps": 1, "checkpoint": {"uri": f"{s3_uri}/first"}},
            {
                "name": "second",
                "task": {**ARITH, "seed": 4},
                "steps": 1,
                "checkpoint": {"uri": f"{s3_uri}/second"},
            },
        ],
        promotion=always,
    )
    folder = tmp_path / "runs" / "tiny"
    bucket, prefix = parse_s3_uri(s3_uri)
    marker = tmp_path / "hanging"
    proc = subprocess.Popen(
        stream_cmd(str(path), "--no-progress"),
        cwd=REPO,
        env=one_thread(
            FST_TEST_HANG_IN_UPLOAD=f"{prefix}/second/bundle/:2", FST_TEST_HANG_MARKER=str(marker)
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)

    first, second = json.loads((folder / "stream.json").read_text())["stages"]
    serving = json.loads((folder / "serving.json").read_text())
    assert first["bundle"] == bundle_uri_of(first["checkpoint"])
    assert (serving["stage"], serving["bundle"]) == ("first", first["bundle"])
    assert second["status"] == "running" and second["bundle"] is None
    # Two files of stage 2's bundle are in the bucket, its manifest is not: no bundle is listed.
    client = make_client(parse_endpoint(os.environ["AWS_ENDPOINT_URL"]))
    half = [
        o.object_name
        for o in client.list_objects(bucket, prefix=f"{prefix}/second/bundle/", recursive=True)
    ]
    assert len(half) == 2 and not any(name.endswith("manifest.json") for name in half), half
    bundles = open_store(f"{s3_uri}/second/bundle")
    assert bundles.steps() == []
    half_uri = f"{s3_uri}/second/bundle/{half[0].split('/bundle/')[1].split('/')[0]}"
    with pytest.raises(CheckpointError):
        fetch_bundle(half_uri)
    fetch_bundle(first["bundle"])  # the served one is whole

    out = stream_to_the_end(path)
    assert out.returncode == 0, out.stderr[-4000:]
    first, second = json.loads((folder / "stream.json").read_text())["stages"]
    serving = json.loads((folder / "serving.json").read_text())
    assert second["status"] == "succeeded" and second["gate"]["promoted"]
    assert second["bundle"] == bundle_uri_of(second["checkpoint"]) == half_uri
    assert (serving["stage"], serving["bundle"]) == ("second", second["bundle"])
    assert len(bundles.steps()) == 1
    assert (fetch_bundle(second["bundle"]) / "system_prompt.txt").read_text() == serving[
        "systemPrompt"
    ]


def adamw_steps(checkpoint: Path, tmp_path: Path) -> set[float]:
    """The AdamW step counts saved in a checkpoint (one per trained parameter)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{checkpoint.name}-{checkpoint.parent.parent.name}.pt"
    dcp_to_torch_save(checkpoint / "dcp", out)
    state = torch.load(out, weights_only=True)
    return {float(s["step"]) for s in state["optim"]["state"].values()}


def run_two_stages(root: Path, model: Path, **spec) -> tuple[Path, dict, dict]:
    """`fst stream` of two tiny stages (3 steps, then 2 on other data) under `root`, to the
    end; (the stream's folder, stage 1's entry, stage 2's entry in stream.json)."""
    root.mkdir(exist_ok=True)
    stages = [
        {"name": "first", "task": ARITH, "steps": 3},
        {"name": "second", "task": {**ARITH, "seed": 4}, "steps": 2},
    ]
    path = stream_doc(root, model, stages, **spec)
    out = stream_to_the_end(path)
    assert out.returncode == 0, out.stderr[-4000:]
    folder = root / "runs" / "tiny"
    first, second = json.loads((folder / "stream.json").read_text())["stages"]
    return folder, first, second


def steps_of(run_dir: Path) -> dict[int, dict]:
    """A run's training-step records by step (metrics.jsonl)."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return {m["step"]: m for m in metrics if "reward_mean" in m}


def test_continue_trajectory_carries_the_optimizer_and_the_gepa_cadence(tmp_path, tiny_model_dir):  # noqa: F811
    """continueTrajectory: true: stage 2 continues stage 1's trajectory (the paper's single
    continual run): its AdamW state goes on from stage 1's (step counts 4, 5, not 1, 2), its
    steps are numbered on (4, 5), its schedule is not warmed up again, and no GEPA round is
    forced at the boundary: with T = 2, the round comes before global step 5, at the cadence."""
    folder, first, second = run_two_stages(tmp_path / "on", tiny_model_dir, continueTrajectory=True)
    assert second["start_checkpoint"] == first["checkpoint"]
    assert first["checkpoint"].endswith("step-00000003")
    assert second["checkpoint"].endswith("step-00000005")  # the run ends at 3 + 2

    ckpts = folder / second["run"] / "checkpoints"
    assert adamw_steps(Path(first["checkpoint"]), tmp_path) == {3.0}
    assert adamw_steps(ckpts / "step-00000004", tmp_path) == {4.0}  # a fresh AdamW would say 1
    assert adamw_steps(ckpts / "step-00000005", tmp_path) == {5.0}

    by_step = steps_of(folder / second["run"])
    assert sorted(by_step) == [4, 5]
    assert "round" not in by_step[4]  # no round forced at the boundary (3 % T != 0) ...
    assert "round" in by_step[5]  # ... the next one at the cadence, before step 5
    # The schedule goes on (warmupSteps 0 here: the LR is the configured one, not restarted).
    assert by_step[4]["lr"] == by_step[5]["lr"] == pytest.approx(1e-2)
    rounds = [json.loads(line) for line in (folder / second["run"] / "population.jsonl").open()]
    assert len(rounds) == 1

    # Without the option stage 2 is a fresh run: steps 1, 2 and a round before step 1.
    folder, _, second = run_two_stages(tmp_path / "off", tiny_model_dir)
    by_step = steps_of(folder / second["run"])
    assert sorted(by_step) == [1, 2] and "round" in by_step[1]
    assert adamw_steps(folder / second["run"] / "checkpoints" / "step-00000001", tmp_path) == {1.0}
