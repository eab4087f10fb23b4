"""The operator's progress poller (operator/fst_operator/progress.py) on a real SQLite RunDB:
what it reads, what it patches, and that it reads the progress only of runs that moved. The
status writer is a recorder here; tests/integration/test_operator.py drives the same poller
against a real API server."""

from __future__ import annotations

from typing import Any

import pytest
from fst_operator import builders, progress

from fst.fast.population import PromptRecord
from fst.store.db import RunDB, RunProgress


def dotted(namespace: str, name: str) -> str:
    """Readable run keys for these tests (the operator hashes namespace/name)."""
    return f"{namespace}.{name}"


@pytest.fixture
def db(tmp_path):
    with RunDB(str(tmp_path / "runs.db")) as db:
        db.upgrade()
        yield db


class CountingDB:
    """The real RunDB, counting the calls of `progress` (the expensive read)."""

    def __init__(self, db: RunDB) -> None:
        self.db, self.reads = db, 0

    def progress_markers(self, runs: Any) -> Any:
        return self.db.progress_markers(runs)

    def progress(self, run: str) -> RunProgress | None:
        self.reads += 1
        return self.db.progress(run)


def test_markers_move_with_metrics_events_and_populations(db):
    for name in ("a", "b"):
        db.acquire_run(name, "fst", {}).release()
    assert db.progress_markers(["a", "b", "absent"]) == {
        "a": (None, None, None),
        "b": (None, None, None),
    }
    db.log_metrics("a", 3, {"reward_mean": 0.5})
    first = db.progress_markers(["a"])["a"]
    assert first.step == 3
    db.log_event("a", "checkpoint", "s3://c/a/step-3")
    second = db.progress_markers(["a"])["a"]
    assert second.step == 3 and second.event_id is not None and second != first
    db.save_population("a", 1, 3, [PromptRecord("Think step by step.")])
    third = db.progress_markers(["a"])["a"]
    assert third.population_version == 1 and third != second
    assert db.progress_markers(["b"])["b"] == (None, None, None)  # b did not move


def test_markers_of_more_runs_than_one_query_binds(db):
    names = [f"r{i}" for i in range(1203)]
    for name in names[:3] + names[-2:]:
        db.acquire_run(name, "rl", {}).release()
        db.log_metrics(name, 1, {"reward_mean": 0.0})
    assert set(db.progress_markers(names)) == {*names[:3], *names[-2:]}


def test_progress_patch_writes_only_progress_fields_that_changed():
    moved = RunProgress(4, 0.25, 0.01, "s3://c/step-4", 2, ["Be brief."], None)
    status = {"phase": "Running", "step": 2, "reward": 0.25, "conditions": [{"type": "Running"}]}
    assert builders.progress_patch(status, moved) == {
        "step": 4,
        "kl": 0.01,
        "checkpointUri": "s3://c/step-4",
        "populationVersion": 2,
        "bestPrompt": "Be brief.",
    }
    same = {"step": 4, "reward": 0.25, "kl": 0.01, "checkpointUri": "s3://c/step-4"}
    same |= {"populationVersion": 2, "bestPrompt": "Be brief."}
    assert builders.progress_patch(same, moved) == {}


def test_a_round_patches_the_runs_that_moved_and_reads_only_those(db):
    for name in ("team.a", "team.b"):
        db.acquire_run(name, "fst", {}).release()
    db.log_metrics("team.a", 1, {"reward_mean": 0.5, "kl": 0.0})
    counting = CountingDB(db)
    patches: list[tuple[str, str, dict]] = []
    poller = progress.ProgressPoller(
        lambda namespace: counting if namespace == "team" else None,  # type: ignore[arg-type,return-value]
        lambda ns, name, patch: patches.append((ns, name, patch)),
        run_key=dotted,
    )
    active = {"team": {"a": {}, "b": {}, "not-started": {}}, "elsewhere": {"x": {}}}

    assert poller.poll(active) == 2  # the first round reads every run the database has
    assert counting.reads == 2
    assert patches[0] == ("team", "a", {"step": 1, "reward": 0.5, "kl": 0.0})
    assert patches[1] == ("team", "b", {"step": 0})

    patches.clear()
    active["team"] = {"a": {"step": 1, "reward": 0.5, "kl": 0.0}, "b": {"step": 0}}
    assert poller.poll(active) == 0 and counting.reads == 2 and not patches  # nothing moved

    db.log_metrics("team.b", 1, {"reward_mean": 1.0})
    assert poller.poll(active) == 1 and counting.reads == 3
    assert patches == [("team", "b", {"step": 1, "reward": 1.0})]


def test_a_failed_write_is_tried_again_next_round_and_a_finished_run_is_forgotten(db):
    db.acquire_run("team.a", "rl", {}).release()
    db.log_metrics("team.a", 2, {"reward_mean": 0.5})
    calls: list[dict] = []

    def flaky(ns: str, name: str, patch: dict) -> None:
        calls.append(patch)
        if len(calls) == 1:
            raise ConnectionError("apiserver unreachable")

    poller = progress.ProgressPoller(lambda ns: db, flaky, run_key=dotted)
    assert poller.poll({"team": {"a": {}}}) == 0  # the write failed: logged, not remembered
    assert poller.poll({"team": {"a": {}}}) == 1 and calls == [{"step": 2, "reward": 0.5}] * 2
    assert poller.poll({}) == 0  # a finished run leaves the index
    assert poller.poll({"team": {"a": {"step": 2, "reward": 0.5}}}) == 0  # read again: no change
    assert len(calls) == 2


def test_a_database_error_skips_the_namespace_for_this_round(db):
    class Down:
        def progress_markers(self, runs: Any) -> Any:
            raise OSError("connection refused")

    patches: list[Any] = []
    poller = progress.ProgressPoller(
        lambda ns: Down() if ns == "down" else db,  # type: ignore[return-value]
        lambda *a: patches.append(a),
        run_key=dotted,
    )
    db.acquire_run("up.r", "rl", {}).release()
    assert poller.poll({"down": {"r": {}}, "up": {"r": {}}}) == 1
    assert patches == [("up", "r", {"step": 0})]


def test_snapshot_copies_kopfs_index_shape():
    index = {"team": [("a", {"step": 1}), ("b", {})], "other": [("c", {"kl": 0.1})]}
    assert progress.snapshot(index) == {
        "team": {"a": {"step": 1}, "b": {}},
        "other": {"c": {"kl": 0.1}},
    }
