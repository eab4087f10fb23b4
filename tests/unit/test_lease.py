"""The run's writer lease on a real SQLite file: failed heartbeats are logged and retried, a
lease unconfirmed for longer than its length (or taken by another writer) is lost, and a
training run that lost its lease stops without writing anything more."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

import fst.loop
from fst.config import validate_config
from fst.loop import RunError
from fst.store.db import RunDB, RunLockedError
from tests.tiny_model import (  # noqa: F401 (fixtures)
    one_torch_thread,
    tiny_model_dir,
    tiny_run_config,
)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def heartbeat_failures(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "lease heartbeat failed" in r.getMessage()]


def db_folder(db: RunDB) -> Path:
    return Path(db.url.split("///", 1)[1]).parent


class Outage:
    """The database file's folder moved away: new connections fail ("unable to open database
    file") until it is moved back. Pooled connections are closed first, since an open SQLite
    connection would keep working on the moved file."""

    def __init__(self, db: RunDB, folder: Path) -> None:
        self.db, self.folder, self.away = db, folder, folder.with_name(folder.name + "-away")

    def __enter__(self) -> Outage:
        self.db.engine.dispose()
        self.folder.rename(self.away)
        return self

    def __exit__(self, *exc: object) -> None:
        self.away.rename(self.folder)


@pytest.fixture
def db(tmp_path):
    folder = tmp_path / "db"
    with RunDB(str(folder / "fst.db")) as db:
        db.upgrade()
        yield db


def test_failed_heartbeats_are_logged_and_retried_until_the_database_is_back(db, caplog):
    lease = db.acquire_run("r", "rl", {}, lease_s=3.0)
    lease.keep_alive(every_s=0.1)
    try:
        with caplog.at_level(logging.WARNING, logger="fst.store.db"), Outage(db, db_folder(db)):
            wait_for(lambda: len(heartbeat_failures(caplog)) >= 3)
            lease.check()  # within the lease length: still ours
        failures = heartbeat_failures(caplog)
        assert "OperationalError" in failures[0] and "unable to open database file" in failures[0]
        back = db.run_info("r")["heartbeat_at"]
        wait_for(lambda: db.run_info("r")["heartbeat_at"] > back)  # heartbeats succeed again
        lease.check()
        assert lease.lost is None
    finally:
        lease.release()


def test_a_lease_unconfirmed_for_longer_than_its_length_is_lost(db, caplog):
    lease = db.acquire_run("r", "rl", {}, lease_s=0.6)
    lease.keep_alive(every_s=0.1)
    with caplog.at_level(logging.WARNING, logger="fst.store.db"), Outage(db, db_folder(db)):
        wait_for(lambda: lease.lost is not None)
        assert heartbeat_failures(caplog)
        with pytest.raises(RunLockedError, match=r"lost: no heartbeat succeeded for \d+s"):
            lease.check()
    assert any(r.levelno == logging.ERROR and "was lost" in r.getMessage() for r in caplog.records)
    time.sleep(0.3)
    with pytest.raises(RunLockedError):  # lost for good, although the database is back
        lease.check()
    lease.release()


def test_a_lease_taken_by_another_writer_is_lost(db, caplog):
    lease = db.acquire_run("r", "rl", {}, lease_s=60.0)
    lease.keep_alive(every_s=0.1)
    with caplog.at_level(logging.ERROR, logger="fst.store.db"), RunDB(db.url) as second:
        # A second trainer that considers every lease expired takes the run over.
        other = second.acquire_run("r", "rl", {}, lease_s=0.0)
        wait_for(lambda: lease.lost is not None)
        with pytest.raises(RunLockedError, match="expired and was taken"):
            lease.check()
        lease.release()  # must not free the other writer's lease
        assert db.run_info("r")["writer"] == other.token
        other.release()
    assert "was lost (it expired and was taken)" in caplog.text


@pytest.mark.usefixtures("one_torch_thread")
def test_training_stops_without_writing_once_another_writer_took_the_run(
    tmp_path,
    tiny_model_dir,  # noqa: F811
    monkeypatch,
    caplog,
):
    cfg = validate_config(tiny_run_config(tmp_path, tiny_model_dir, steps=4))
    monkeypatch.setattr(fst.loop, "LEASE_S", 1.0)  # heartbeats every 0.25 s
    rl_step = fst.loop.rl_step
    taken_by: list[str] = []

    def step_then_lose_the_run(run):
        record = rl_step(run)
        if run.step == 2:  # during step 2, another trainer takes the run over
            with RunDB(run.sink.db.url) as other:

                def take_over() -> bool:
                    # lease_s=0: any heartbeat older than this attempt's clock reading is
                    # expired; one that lands between the reading and the update is not,
                    # and the attempt is refused (seen in 1 of ~4 suite runs): try again.
                    try:
                        taken_by.append(other.acquire_run(cfg.run, cfg.mode, {}, lease_s=0.0).token)
                    except RunLockedError:
                        return False
                    return True

                wait_for(take_over)
            wait_for(lambda: run.lease.lost is not None)  # the heartbeat notices
        return record

    monkeypatch.setattr(fst.loop, "rl_step", step_then_lose_the_run)
    with caplog.at_level(logging.ERROR), pytest.raises(RunError, match="expired and was taken"):
        fst.loop.train(cfg, progress=False)

    # Step 1 was written; nothing of step 2, although it ran: no metrics, no checkpoint.
    lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1]
    assert not (cfg.run_dir / "checkpoints" / "step-00000002").exists()
    with RunDB(str(Path(cfg.output_dir) / "fst.db")) as check:
        assert list(check.metrics(cfg.run)) == [1]
        assert check.run_info(cfg.run)["writer"] == taken_by[0]  # not released by the loser
    assert "was lost (it expired and was taken)" in caplog.text


def test_a_silent_writer_is_waited_out_and_a_live_one_refused(db):
    """acquire_run(wait_s=...): the next attempt of a crashed trainer (its lease held, no
    heartbeats) takes the run over once the lease expires; a writer that heartbeats is alive
    and refused without waiting its lease out."""
    db.acquire_run("r", "rl", {}, lease_s=1.5)  # then silent: never heartbeats nor releases
    with RunDB(db.url) as second:
        t0 = time.monotonic()
        with pytest.raises(RunLockedError):  # without waiting: refused
            second.acquire_run("r", "rl", {}, lease_s=1.5)
        taken = second.acquire_run("r", "rl", {}, lease_s=1.5, wait_s=20)
        assert 0.5 < time.monotonic() - t0 < 10
        assert db.run_info("r")["writer"] == taken.token
        taken.keep_alive(every_s=0.2)
        try:
            with RunDB(db.url) as third:
                t0 = time.monotonic()
                with pytest.raises(RunLockedError, match="being written by"):
                    third.acquire_run("r", "rl", {}, lease_s=60.0, wait_s=30)
                assert time.monotonic() - t0 < 10  # it saw a heartbeat: no 30 s wait
        finally:
            taken.release()
