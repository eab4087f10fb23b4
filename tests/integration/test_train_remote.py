"""A short `fst train` with checkpoints in real MinIO and records in real Postgres, SIGKILLed
and resumed on a "new pod" (the local run folder wiped): it continues from S3. The run is the
tiny random Llama (tests/tiny_model.py) with its varied reward (tests/varied_fst.py): what is
tested is the plumbing of checkpoints and records, which is the same for SmolLM2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fst.store.checkpoints import open_store
from fst.store.db import RunDB
from tests.conftest import write_config
from tests.tiny_model import tiny_model_dir, tiny_run_config  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]


def varied_fst(*args: str) -> list[str]:
    """`fst ARGS` with the tiny model's varied reward (tests/varied_fst.py)."""
    return [sys.executable, "-m", "tests.varied_fst", *args]


def test_sigkill_and_resume_from_s3_and_postgres(tmp_path, s3_uri, pg_url, tiny_model_dir):  # noqa: F811
    cfg = tiny_run_config(
        tmp_path,
        tiny_model_dir,
        **{"checkpoint.uri": s3_uri, "database": pg_url, "checkpoint.keepLast": 2},
    )
    path = write_config(tmp_path, cfg)
    store = open_store(s3_uri)
    # torch on one thread (the tiny model gains nothing from a second one); the run waits to be
    # killed once its step-2 checkpoint is in S3 (tests/varied_fst.py): a tiny-model step takes
    # a fraction of a second, so polling S3 alone could catch it after step 4.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        varied_fst("train", "-c", str(path), "--no-progress"),
        cwd=REPO,
        env={**env, "FST_TEST_HANG_AFTER": "t:2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    while 2 not in store.steps():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint in S3 in time"
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)

    # A new pod: nothing local survives. (The killed writer's lease in Postgres is taken over
    # at once because it names a dead process of this host; on a cluster a new pod waits for
    # the heartbeat to expire.)
    shutil.rmtree(Path(cfg["outputDir"]))
    out = subprocess.run(
        varied_fst("train", "-c", str(path), "--resume", "--no-progress"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "resumed t at step 2" in out.stderr

    assert store.steps() == [2, 4]  # keepLast 2, in S3
    with RunDB(pg_url) as db:
        metrics = db.metrics("t")
        kinds = [kind for _, kind, _ in db.events("t")]
        info = db.run_info("t")
    assert sorted(metrics) == [1, 2, 3, 4]
    assert kinds[0] == "started" and "resumed" in kinds and kinds[-1] == "finished"
    assert info["status"] == "finished"
    local = (Path(cfg["outputDir"]) / "t" / "metrics.jsonl").read_text().splitlines()
    assert len(local) == 2  # the new pod's own steps 3 and 4; the database has all four


def test_background_upload_lets_training_go_on_and_a_kill_keeps_the_previous_checkpoint(
    tmp_path,
    s3_uri,
    tiny_model_dir,  # noqa: F811
):
    """checkpoint.backgroundUpload (the default for S3): the upload of step 4's checkpoint is
    held after two files (tests/varied_fst.py); training goes on through steps 5 and 6, then
    the step-6 save waits for it (one upload at a time) and step 7 never starts. SIGKILLed
    there, the store still lists only step 2 (the half of step 4 is invisible); resumed, the
    run continues from step 2 and ends with steps 4, 6, 8 committed."""
    from fst.store.s3 import parse_s3_uri

    cfg = tiny_run_config(
        tmp_path,
        tiny_model_dir,
        steps=8,
        **{"checkpoint.uri": s3_uri, "checkpoint.every": 2, "checkpoint.keepLast": 3},
    )
    path = write_config(tmp_path, cfg)
    store = open_store(s3_uri)
    _, prefix = parse_s3_uri(s3_uri)
    marker = tmp_path / "hanging"
    metrics = Path(cfg["outputDir"]) / "t" / "metrics.jsonl"

    def steps_logged() -> list[int]:
        if not metrics.is_file():
            return []
        return [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x.strip()]

    hold = {"FST_TEST_HANG_IN_UPLOAD": f"{prefix}/step-00000004/:2"}
    proc = subprocess.Popen(
        varied_fst("train", "-c", str(path), "--no-progress"),
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **hold, "FST_TEST_HANG_MARKER": str(marker)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600
        while not (marker.exists() and 6 in steps_logged()):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, f"stuck at steps {steps_logged()}"
            time.sleep(0.3)
        time.sleep(3)  # a tiny-model step takes a fraction of a second
        assert max(steps_logged()) == 6  # the step-6 save waits for step 4's upload
        assert store.steps() == [2]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    out = subprocess.run(
        varied_fst("train", "-c", str(path), "--resume", "--no-progress"),
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "resumed t at step 2" in out.stderr
    assert store.steps() == [4, 6, 8]
    assert "uploading in the background" in out.stderr


def test_jsonl_task_reads_s3_and_the_stream_sees_new_data(s3_uri, minio):
    import io
    import json

    from fst.config import TaskConfig
    from fst.handover import source_fingerprint
    from fst.store.s3 import make_client, parse_endpoint, parse_s3_uri, s3_prefix_fingerprint
    from fst.tasks import build_task

    bucket, prefix = parse_s3_uri(s3_uri)
    client = make_client(parse_endpoint(minio.env()["AWS_ENDPOINT_URL"]))

    def put(name: str, rows: list[tuple[str, str]]) -> None:
        data = "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows).encode()
        client.put_object(bucket, f"{prefix}/{name}", io.BytesIO(data), len(data))

    put("a.jsonl", [(f"q{i}?", f"a{i}") for i in range(6)])
    task_cfg = TaskConfig(
        name="jsonl", val_size=1, test_size=1, params={"path": f"{s3_uri}/", "format": "qa"}
    )
    task = build_task(task_cfg)
    assert len(task.problems("train")) == 4
    before = source_fingerprint(task_cfg)
    assert before == s3_prefix_fingerprint(f"{s3_uri}/")
    put("b.jsonl", [("q9?", "a9")])  # new data arrives under the prefix
    assert source_fingerprint(task_cfg) != before
    assert len(build_task(task_cfg).problems("train")) == 5
