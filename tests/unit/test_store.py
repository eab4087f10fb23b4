"""Storage pieces that need no server: URIs, endpoints, error classification, the SQLite run
database, and the S3 store's behaviour when the endpoint is unreachable."""

from __future__ import annotations

import json
import time

import pytest
import urllib3
from minio.error import S3Error, ServerError

from fst.store.checkpoints import (
    CheckpointError,
    LocalCheckpointStore,
    fetch_model_dir,
    open_store,
    parse_step_name,
    split_checkpoint_uri,
)
from fst.store.db import RunDB, RunLockedError, UnknownRunError, database_url
from fst.store.s3 import S3CheckpointStore, is_transient, parse_endpoint, parse_s3_uri
from tests.servers import free_port


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/", ("bucket", "")),
        ("s3://bucket/runs/a", ("bucket", "runs/a")),
        ("s3://bucket/runs/a/", ("bucket", "runs/a")),
    ],
)
def test_parse_s3_uri(uri, expected):
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize(
    "uri", ["s3://", "s3:///prefix", "http://b/p", "s3://b/p?x=1", "s3://b/a//c", "s3://b/../x"]
)
def test_parse_s3_uri_rejects(uri):
    with pytest.raises(CheckpointError):
        parse_s3_uri(uri)


def test_parse_endpoint():
    ep = parse_endpoint("http://127.0.0.1:9000")
    assert (ep.host, ep.secure, ep.url) == ("127.0.0.1:9000", False, "http://127.0.0.1:9000")
    assert parse_endpoint("https://s3.amazonaws.com/").secure
    for bad in ("127.0.0.1:9000", "ftp://x", "http://x/some/path"):
        with pytest.raises(CheckpointError, match="AWS_ENDPOINT_URL"):
            parse_endpoint(bad)


def test_split_checkpoint_uri():
    assert split_checkpoint_uri("s3://b/p/step-00000010") == ("s3://b/p", 10)
    assert split_checkpoint_uri("s3://b/p/step-00000010/") == ("s3://b/p", 10)
    assert split_checkpoint_uri("s3://b/p") == ("s3://b/p", None)
    assert split_checkpoint_uri("s3://b/step-00000003") == ("s3://b", 3)
    assert split_checkpoint_uri("s3://step-00000003") == ("s3://step-00000003", None)
    assert parse_step_name("step-00000042") == 42
    assert parse_step_name("step-42") is None


def test_store_keys_follow_the_local_layout(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    with_prefix = S3CheckpointStore("s3://b/runs/a/", cache_dir=tmp_path)
    assert with_prefix.uri == "s3://b/runs/a"
    assert with_prefix.key(10, "model/x.safetensors") == "runs/a/step-00000010/model/x.safetensors"
    assert with_prefix.key(10) == "runs/a/step-00000010/"
    assert (
        S3CheckpointStore("s3://b", cache_dir=tmp_path).key(1, "rng.pt") == "step-00000001/rng.pt"
    )


def test_part_size_below_s3_minimum_is_refused():
    with pytest.raises(CheckpointError, match="5 MiB"):
        S3CheckpointStore("s3://b/p", endpoint_url="http://127.0.0.1:1", part_size=1 << 20)


def test_open_store_dispatches_on_scheme(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    assert isinstance(open_store("s3://bucket/prefix"), S3CheckpointStore)
    assert isinstance(open_store(str(tmp_path / "ckpt")), LocalCheckpointStore)
    with pytest.raises(CheckpointError, match="unsupported"):
        open_store("gs://bucket/prefix")


def s3_error(status: int, code: str) -> S3Error:
    response = urllib3.HTTPResponse(status=status)
    return S3Error(response, code, "msg", "/r", "id", "host")


def test_transient_errors():
    assert is_transient(urllib3.exceptions.NewConnectionError(None, "refused"))
    assert is_transient(urllib3.exceptions.ProtocolError("reset"))
    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    assert is_transient(ServerError("bad gateway", 502))
    assert is_transient(s3_error(503, "SlowDown"))
    assert is_transient(s3_error(500, "InternalError"))
    assert not is_transient(s3_error(403, "AccessDenied"))
    assert not is_transient(s3_error(404, "NoSuchBucket"))
    assert not is_transient(ValueError("bug"))


def test_unreachable_endpoint_gives_a_clear_error_after_the_retry_budget(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3CheckpointStore("s3://ckpts/run-a", endpoint_url=url, retry_seconds=1.5)
    staging = store.staging_dir()
    (staging / "state.json").write_text("{}")
    t0 = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        store.commit(1, staging, {})
    assert 1.5 <= time.monotonic() - t0 < 10
    message = str(err.value)
    assert url in message and "'ckpts'" in message and "run-a/" in message
    assert "still failing after" in message


def test_fetch_model_dir_from_a_local_store(tmp_path):
    store = LocalCheckpointStore(tmp_path / "ckpt")
    for step in (1, 2):
        staging = store.staging_dir()
        (staging / "model").mkdir()
        (staging / "model" / "config.json").write_text(json.dumps({"step": step}))
        store.commit(step, staging, {})
    latest = fetch_model_dir(str(tmp_path / "ckpt"))
    assert json.loads((latest / "config.json").read_text()) == {"step": 2}
    first = fetch_model_dir(str(tmp_path / "ckpt" / "step-00000001"))
    assert json.loads((first / "config.json").read_text()) == {"step": 1}


# ----------------------------------------------------------------------------- database


def test_database_url(monkeypatch, tmp_path):
    monkeypatch.delenv("FST_DATABASE_URL", raising=False)
    assert database_url(None, tmp_path / "x.db") == f"sqlite:///{tmp_path / 'x.db'}"
    assert database_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert database_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    monkeypatch.setenv("FST_DATABASE_URL", "postgres://u@h/db")
    assert database_url(None, tmp_path / "x.db") == "postgresql+psycopg://u@h/db"
    monkeypatch.delenv("FST_DATABASE_URL")
    with pytest.raises(ValueError, match="FST_DATABASE_URL"):
        database_url(None)


@pytest.fixture
def db(tmp_path):
    with RunDB(str(tmp_path / "runs.db")) as db:
        db.upgrade()
        yield db


def test_sqlite_run_lifecycle(db):
    with db.acquire_run("r", "fst", {"steps": 4}) as lease:
        assert db.run_info("r")["status"] == "running"
        assert db.run_info("r")["writer"] == lease.token
        with pytest.raises(RunLockedError, match="Stop that trainer first"):
            db.acquire_run("r", "fst", {})
        db.log_metrics("r", 1, {"reward_mean": 0.25, "kl": 0.0, "flag": True})
        db.log_metrics("r", 1, {"reward_mean": 0.5})  # re-logging a step overwrites
        assert db.metrics("r") == {1: {"reward_mean": 0.5, "kl": 0.0, "flag": 1.0}}
    info = db.run_info("r")
    assert info["status"] == "stopped" and info["writer"] is None
    assert db.acquire_run("r", "fst", {}).token


def test_lease_keep_alive_refreshes_the_heartbeat(db):
    lease = db.acquire_run("r", "rl", {})
    first = db.run_info("r")["heartbeat_at"]
    lease.keep_alive(every_s=0.1)
    time.sleep(0.5)
    assert db.run_info("r")["heartbeat_at"] > first
    lease.check()
    lease.release()


def test_unknown_run_is_a_clear_error(db):
    with pytest.raises(UnknownRunError, match="no run named 'ghost'"):
        db.log_metrics("ghost", 1, {"x": 1.0})
    db.acquire_run("empty", "rl", {}).release()
    assert db.latest_population("empty") is None and db.populations("empty") == []


def test_a_dead_local_writers_lease_is_taken_over_at_once(tmp_path):
    import subprocess
    import sys

    from fst.store.db import RunDB, RunLockedError

    url = f"sqlite:///{tmp_path / 'fst.db'}"
    code = (
        "import os, sys; from fst.store.db import RunDB; db = RunDB(sys.argv[1]); db.upgrade(); "
        "db.acquire_run('r', 'rl', {}); os._exit(0)"  # exits without releasing
    )
    subprocess.run([sys.executable, "-c", code, url], check=True)
    with RunDB(url) as db:
        lease = db.acquire_run("r", "rl", {})  # the holder is dead: no 60 s wait
        with pytest.raises(RunLockedError, match="being written by"):
            db.acquire_run("r", "rl", {})  # but a live holder (us) is respected
        lease.release("finished")


def test_processes_starting_together_on_a_new_sqlite_database_migrate_once(tmp_path):
    """The learning bench starts two runs at once on one new database file: both used to find
    no tables and one failed on "table runs already exists"."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'fst.db'}"
    go = tmp_path / "go"
    # Every process imports first, then waits for the same moment to migrate.
    code = (
        "import os, sys, time, alembic.command; from fst.store.db import RunDB; "
        "db = RunDB(sys.argv[1]); go = sys.argv[2]\n"
        "while not os.path.exists(go): time.sleep(0.001)\n"
        "db.upgrade(); print(db.schema_revision())"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, url, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    time.sleep(3)  # all four imported and waiting
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    errors = [err for p, (_, err) in zip(procs, results, strict=True) if p.returncode != 0]
    assert not errors, errors[0]
    with RunDB(url) as db:
        assert {out.strip() for out, _ in results} == {db.schema_revision()}
        db.acquire_run("r", "rl", {}).release()
