"""Checkpoints on a real MinIO, run state on a real PostgreSQL (and SQLite): round trips,
crashes and outages during a save, schema migrations, and the one-writer-per-run lease."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import inspect

from fst.fast.population import PromptRecord
from fst.store.checkpoints import (
    CheckpointError,
    fetch_model_dir,
    latest_step,
    open_store,
    prune,
    step_name,
)
from fst.store.db import RunDB, RunLockedError
from fst.store.s3 import S3CheckpointStore
from tests.servers import TEST_BUCKET as BUCKET

pytestmark = pytest.mark.integration

MiB = 1 << 20
PART = 5 * MiB
TABLES = {"runs", "stages", "gate_scores", "prompt_populations", "metrics", "events"}


def write_checkpoint(folder: Path, step: int, big: int = 0) -> dict[str, bytes]:
    """A checkpoint-shaped folder of small synthetic files (plus one `big`-byte shard);
    returns relative path -> content, to compare with what comes back."""
    files = {
        "model/config.json": json.dumps({"step": step}).encode(),
        "model/tokenizer.json": b'{"vocab": {}}',
        "model/model.safetensors": os.urandom(big or 4096),
        "trainer.pt": os.urandom(2048),
        "rng.pt": os.urandom(512),
        "state.json": json.dumps({"step": step, "cursor": step * 2}).encode(),
        "config.yaml": b"run: t\n",
    }
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return files


def save(store: S3CheckpointStore, step: int, big: int = 0) -> dict[str, bytes]:
    staging = store.staging_dir()
    files = write_checkpoint(staging, step, big)
    store.commit(step, staging, {"run": "t"})
    assert not staging.exists()
    return files


def assert_same_files(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        assert (folder / rel).read_bytes() == data, rel


def step_objects(store: S3CheckpointStore, step: int) -> list[str]:
    objs = store.client.list_objects(BUCKET, prefix=store.key(step), recursive=True)
    return sorted(o.object_name for o in objs)


# ----------------------------------------------------------------------------- S3 checkpoints


def test_s3_round_trip_with_multipart_file(s3_uri):
    store = S3CheckpointStore(s3_uri, part_size=PART)
    files = save(store, 10, big=12 * MiB)

    assert store.steps() == [10]
    big = store.client.stat_object(BUCKET, store.key(10, "model/model.safetensors"))
    assert big.size == 12 * MiB
    assert big.etag.endswith("-3")  # three 5 MiB parts: a real multipart upload
    assert store.manifest(10)["files"]["model/model.safetensors"]["size"] == 12 * MiB

    folder = store.materialize(10)
    assert_same_files(folder, files)
    # A second materialize reuses the verified local copy: no download at all.
    store.client.fget_object = None
    assert store.materialize(10) == folder


def test_s3_materialize_replaces_a_damaged_local_copy(s3_uri):
    store = S3CheckpointStore(s3_uri)
    files = save(store, 3)
    folder = store.materialize(3)
    (folder / "trainer.pt").write_bytes(b"truncated")
    assert_same_files(store.materialize(3), files)


def test_open_store_and_fetch_model_dir(s3_uri):
    store = open_store(s3_uri)  # endpoint and keys from the environment, as in a pod
    assert isinstance(store, S3CheckpointStore)
    save(store, 1)
    files = save(store, 2)
    assert latest_step(store) == 2

    latest = fetch_model_dir(s3_uri)
    assert (latest / "config.json").read_bytes() == files["model/config.json"]
    first = fetch_model_dir(f"{s3_uri}/{step_name(1)}")
    assert json.loads((first / "config.json").read_text()) == {"step": 1}
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        fetch_model_dir(f"{s3_uri}/{step_name(7)}")


def test_latest_and_prune_keep_last_n_and_explicit_keep(s3_uri):
    store = S3CheckpointStore(s3_uri)
    saved = {step: save(store, step) for step in (1, 2, 3, 4, 5)}
    assert latest_step(store) == 5

    assert prune(store, keep_last=2, keep={2}) == [1, 3]
    assert store.steps() == [2, 4, 5]
    assert step_objects(store, 1) == [] and step_objects(store, 3) == []
    assert_same_files(store.materialize(2), saved[2])


def test_resaving_a_step_replaces_it(s3_uri):
    store = S3CheckpointStore(s3_uri)
    save(store, 4)
    staging = store.staging_dir()
    (staging / "state.json").write_text('{"step": 4, "again": true}')
    store.commit(4, staging, {})

    assert store.steps() == [4]
    assert step_objects(store, 4) == [store.key(4, "manifest.json"), store.key(4, "state.json")]
    folder = store.materialize(4)
    assert json.loads((folder / "state.json").read_text()) == {"step": 4, "again": True}
    assert not (folder / "trainer.pt").exists()


KILLABLE_SAVE = """
import sys, time
from pathlib import Path
from fst.store.s3 import S3CheckpointStore

store = S3CheckpointStore(sys.argv[1])
upload = store._upload
done = []

def upload_then_pause(path, key, info):
    upload(path, key, info)
    done.append(key)
    print("uploaded", key, flush=True)
    if len(done) == 2:
        time.sleep(60)  # the test kills us here, between the 2nd and the 3rd file

store._upload = upload_then_pause
store.commit(int(sys.argv[3]), Path(sys.argv[2]), {})
"""


def test_save_killed_between_files_leaves_previous_checkpoint(s3_uri, s3_env, tmp_path):
    store = S3CheckpointStore(s3_uri)
    before = save(store, 10)
    staging = tmp_path / "staging"
    write_checkpoint(staging, 20)

    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_SAVE, s3_uri, str(staging), "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **s3_env},
    )
    try:
        uploaded = [proc.stdout.readline() for _ in range(2)]
        assert all(line.startswith("uploaded") for line in uploaded), proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()

    half = step_objects(store, 20)
    assert 0 < len(half) < len(before)  # some files made it, the manifest did not
    assert store.steps() == [10]
    assert latest_step(store) == 10
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        store.materialize(20)
    assert_same_files(store.materialize(10), before)

    # The next save cleans the abandoned half-checkpoint up (here: at once, not after 1 h).
    store.abandoned_after_s = 0
    save(store, 30)
    assert step_objects(store, 20) == []
    assert store.steps() == [10, 30]


class OutageDuringSave(S3CheckpointStore):
    """Stops MinIO right after the first file of a commit is uploaded, restarts it later."""

    def __init__(self, *args, minio, outage_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.minio, self.outage_s = minio, outage_s
        self.down = threading.Event()
        self.up_again = 0.0
        self.outage: threading.Thread | None = None

    def _upload(self, path, key, info):
        super()._upload(path, key, info)
        if not self.down.is_set():
            self.outage = threading.Thread(target=self._outage, daemon=True)
            self.outage.start()
            assert self.down.wait(30), "MinIO did not stop"

    def _outage(self) -> None:
        self.minio.stop()
        self.down.set()
        time.sleep(self.outage_s)
        self.minio.start()
        self.up_again = time.monotonic()


def test_save_survives_a_20s_minio_outage(s3_uri, minio, caplog):
    store = OutageDuringSave(s3_uri, minio=minio, outage_s=20, retry_seconds=60, part_size=PART)
    before = save(S3CheckpointStore(s3_uri), 1)
    staging = store.staging_dir()
    files = write_checkpoint(staging, 2, big=6 * MiB)

    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="fst.store.s3"):
        store.commit(2, staging, {})
    elapsed = time.monotonic() - t0
    # The save's retry can get through as soon as MinIO accepts connections, before start()
    # (which waits for readiness) returns and records up_again: wait for the outage thread.
    if store.outage is not None:
        store.outage.join(60)

    assert store.down.is_set() and store.up_again, "the outage did not happen during the save"
    assert elapsed >= 20
    assert any("retrying" in r.getMessage() for r in caplog.records)
    assert store.steps() == [1, 2]
    assert_same_files(store.materialize(2), files)
    assert_same_files(store.materialize(1), before)


def test_save_fails_clearly_when_minio_stays_down(s3_uri, minio):
    store = S3CheckpointStore(s3_uri, retry_seconds=2)
    before = save(store, 5)
    staging = store.staging_dir()
    write_checkpoint(staging, 6)
    minio.stop()
    try:
        with pytest.raises(CheckpointError) as err:
            store.commit(6, staging, {})
    finally:
        minio.start()
    message = str(err.value)
    assert minio.endpoint_url in message and BUCKET in message and store.prefix in message
    assert "after" in message  # says it retried, and for how long
    assert store.steps() == [5]
    assert_same_files(store.materialize(5), before)


# ----------------------------------------------------------------------------- database


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fst.db'}"
    return request.getfixturevalue("pg_url")


def table_names(db: RunDB) -> set[str]:
    return set(inspect(db.engine).get_table_names()) - {"alembic_version"}


def test_alembic_upgrade_downgrade_upgrade(db_url):
    with RunDB(db_url) as db:
        assert table_names(db) == set()
        db.upgrade()
        assert db.schema_revision() == "0003"
        assert table_names(db) == TABLES
        db.acquire_run("r", "rl", {"steps": 3}).release()

        db.downgrade("base")
        assert db.schema_revision() is None
        assert table_names(db) == set()

        db.upgrade()
        assert table_names(db) == TABLES
        assert db.run_info("r") is None  # really a fresh schema
        assert_models_match_schema(db)


UPGRADE = "import sys; from fst.store.db import RunDB; RunDB(sys.argv[1]).upgrade()"


def test_pods_upgrading_together_on_postgres(pg_url):
    """Every trainer pod calls upgrade() at start; concurrent calls must all succeed."""
    pods = [
        subprocess.Popen([sys.executable, "-c", UPGRADE, pg_url], stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    failures = [p.stderr.read() for p in pods if p.wait(timeout=120) != 0]
    assert failures == []
    with RunDB(pg_url) as db:
        assert db.schema_revision() == "0003"


def assert_models_match_schema(db: RunDB) -> None:
    """The hand-written migration and the ORM mappings describe the same schema."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from fst.store.db import Base

    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


POPULATION_V1 = [
    PromptRecord("Solve step by step.", [], 0, {"p1": 1.0, "p2": 0.0}, 0),
    PromptRecord("Réponds en un mot — « 42 ».", ["a1b2c3d4e5"], 1, {"p1": 0.5}, 1),
]
POPULATION_V2 = [*POPULATION_V1, PromptRecord("Think, then answer.", ["x", "y"], 2, {}, -1)]

READ_BACK = """
import json, sys
from dataclasses import asdict
from fst.store.db import RunDB
with RunDB(sys.argv[1]) as db:
    print(json.dumps([
        {"version": p.version, "round": p.round, "step": p.step,
         "members": [asdict(m) for m in p.members]}
        for p in db.populations("pop")
    ]))
"""


def test_populations_survive_a_process_restart(pg_url):
    with RunDB(pg_url) as db:
        db.upgrade()
        with db.acquire_run("pop", "fst", {"fast": {"topK": 2}}):
            assert db.save_population("pop", 1, 2, POPULATION_V1) == 1
            assert db.save_population("pop", 2, 4, POPULATION_V2) == 2

    out = subprocess.run(
        [sys.executable, "-c", READ_BACK, pg_url], capture_output=True, text=True, check=True
    ).stdout
    versions = json.loads(out)
    assert [(v["version"], v["round"], v["step"]) for v in versions] == [(1, 1, 2), (2, 2, 4)]
    assert [PromptRecord(**m) for m in versions[1]["members"]] == POPULATION_V2

    with RunDB(pg_url) as db:  # a fresh engine in this process too
        latest = db.latest_population("pop")
        assert latest is not None and latest.version == 2
        assert latest.members == POPULATION_V2
        assert [m.id for m in latest.members] == [m.id for m in POPULATION_V2]


def test_truncate_after_forgets_the_future_of_a_resume(db_url):
    with RunDB(db_url) as db:
        db.upgrade()
        lease = db.acquire_run("r", "fst", {})
        for step in (2, 4, 6):
            db.log_metrics("r", step, {"reward_mean": step / 10, "note": "skipped", "nan": 1e999})
            db.save_population("r", step // 2, step, POPULATION_V1)
        db.log_event("r", "resume", "resumed at step 4")

        db.truncate_after("r", 4)

        assert sorted(db.metrics("r")) == [2, 4]
        assert db.metrics("r")[4] == {"reward_mean": 0.4, "nan": None}
        assert [p.step for p in db.populations("r")] == [2, 4]
        assert db.save_population("r", 3, 6, POPULATION_V2) == 3
        assert [kind for _, kind, _ in db.events("r")] == ["resume"]
        lease.release()


def test_stages_record_a_stream(db_url):
    with RunDB(db_url) as db:
        db.upgrade()
        db.start_stage("stream", 0, "arith", "stream-0")
        db.finish_stage("stream", 0, "succeeded", "s3://b/p/step-00000010", 3)
        db.start_stage("stream", 1, "graph", "stream-1")
        stages = db.stages("stream")
        assert [(s.index, s.status) for s in stages] == [(0, "succeeded"), (1, "running")]
        assert stages[0].checkpoint_uri == "s3://b/p/step-00000010"
        assert stages[0].population_version == 3 and stages[0].finished_at is not None
        assert stages[0].promoted is None and stages[0].gate is None  # not gated
        gate = {"promoted": False, "reason": "RegressionOnArith", "candidate": {"arith": 0.5}}
        db.finish_stage(
            "stream",
            1,
            "succeeded",
            "s3://b/p2/step-00000004",
            4,
            data_version="ab12",
            gate=gate,
            bundle_uri=None,
        )
        graph = db.stages("stream")[1]
        assert (graph.promoted, graph.gate, graph.data_version) == (False, gate, "ab12")


def test_gate_scores_are_kept_once(db_url):
    """A gate killed mid-evaluation finds what it measured (fst/gate.py's DatabaseScores)."""
    with RunDB(db_url) as db:
        db.upgrade()
        assert db.gate_score("k1") is None
        db.save_gate_score("k1", 0.375, 16)
        db.save_gate_score("k1", 0.5, 16)  # measured again: the first number stays
        db.save_gate_score("k2", 1.0, 8)
    with RunDB(db_url) as again:
        assert again.gate_score("k1") == (0.375, 16)
        assert again.gate_score("k2") == (1.0, 8)


def test_two_writers_on_one_run_are_refused(db_url):
    with RunDB(db_url) as first, RunDB(db_url) as second:
        first.upgrade()
        lease = first.acquire_run("shared", "rl", {})
        with pytest.raises(RunLockedError, match=r"run 'shared' is being written by .*:\d+:"):
            second.acquire_run("shared", "rl", {})
        lease.heartbeat()
        lease.release()
        second.acquire_run("shared", "rl", {}).release()


def test_an_expired_lease_can_be_taken_over(db_url):
    with RunDB(db_url) as first, RunDB(db_url) as second:
        first.upgrade()
        stale = first.acquire_run("r", "rl", {})  # a trainer that died without releasing
        time.sleep(1.2)
        taker = second.acquire_run("r", "rl", {}, lease_s=1)
        with pytest.raises(RunLockedError, match="lost"):
            stale.heartbeat()
        stale.release()  # a no-op now: it must not free the new writer's lease
        with pytest.raises(RunLockedError):
            first.acquire_run("r", "rl", {})
        taker.release()


def test_racing_writers_exactly_one_wins(db_url):
    dbs = [RunDB(db_url) for _ in range(4)]
    dbs[0].upgrade()
    barrier = threading.Barrier(len(dbs))
    outcomes: list[str] = []

    def contend(db: RunDB) -> None:
        barrier.wait()
        try:
            db.acquire_run("race", "rl", {})
            outcomes.append("won")
        except RunLockedError:
            outcomes.append("refused")

    threads = [threading.Thread(target=contend, args=(db,)) for db in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for db in dbs:
        db.close()
    assert sorted(outcomes) == ["refused", "refused", "refused", "won"]
