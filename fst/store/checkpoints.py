"""Checkpoint stores: a checkpoint is a folder of files, committed atomically.

Layout (fst/store/layout.py; a local folder here, an S3 prefix in fst/store/s3.py):
    <root>/step-00000010/manifest.json   written LAST; lists every file with size and sha256
    <root>/step-00000010/model/...       a loadable Hugging Face model folder
    <root>/step-00000010/...             optimizer, RNG, trainer state, config

A checkpoint without a manifest is never listed or loaded: a crash mid-save leaves at most an
ignored staging folder, and the previous checkpoint stays the latest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Protocol

# The layout both stores share lives in fst.store.layout; its names stay importable from here.
from fst.store.layout import (
    MANIFEST,
    CheckpointError,
    build_manifest,
    parse_step_name,
    step_name,
    verify_folder,
)
from fst.store.layout import sha256_file as sha256_file

log = logging.getLogger(__name__)


class CheckpointStore(Protocol):
    uri: str

    def commit(self, step: int, staging: Path, meta: dict[str, Any]) -> str:
        """Make the files in local folder `staging` the checkpoint of `step`; return its URI.
        The staging folder is consumed."""
        ...

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint (manifest present), ascending."""
        ...

    def step_uri(self, step: int) -> str:
        """The URI of `step`'s checkpoint, as `commit` returns it."""
        ...

    def materialize(self, step: int) -> Path:
        """A local folder holding the verified checkpoint of `step`."""
        ...

    def manifest(self, step: int) -> dict[str, Any]: ...

    def delete(self, step: int) -> None: ...

    def staging_dir(self, name: str | None = None) -> Path:
        """A fresh local folder to write a checkpoint's files into before `commit`. The ranks
        of a run (fst/distributed.py) pass one `name`: each gets that folder under its own
        staging root (shared on one node, one per node on several)."""
        ...


class LocalCheckpointStore:
    """Checkpoints in a local folder; commit is an atomic rename within one filesystem."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.uri = str(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".staging-*"):
            # Half-written saves of a crashed process: never loadable, safe to drop.
            shutil.rmtree(leftover, ignore_errors=True)

    def staging_dir(self, name: str | None = None) -> Path:
        path = self.root / f".staging-{name or uuid.uuid4().hex[:12]}"
        path.mkdir(exist_ok=name is not None)
        return path

    def commit(self, step: int, staging: Path, meta: dict[str, Any]) -> str:
        manifest = build_manifest(staging, step, meta)
        tmp = staging / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        tmp.replace(staging / MANIFEST)
        final = self.root / step_name(step)
        if final.exists():
            # Re-saving a step (after a resume): swap, then drop the old copy.
            old = self.root / f".staging-old-{uuid.uuid4().hex[:12]}"
            final.replace(old)
            staging.replace(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.replace(final)
        _fsync_dir(self.root)
        return self.step_uri(step)

    def step_uri(self, step: int) -> str:
        return str(self.root / step_name(step))

    def steps(self) -> list[int]:
        out = []
        for p in self.root.iterdir():
            step = parse_step_name(p.name)
            if step is not None and (p / MANIFEST).is_file():
                out.append(step)
        return sorted(out)

    def manifest(self, step: int) -> dict[str, Any]:
        path = self.root / step_name(step) / MANIFEST
        if not path.is_file():
            raise CheckpointError(f"no complete checkpoint for step {step} in {self.root}")
        return json.loads(path.read_text())

    def materialize(self, step: int) -> Path:
        folder = self.root / step_name(step)
        verify_folder(folder, self.manifest(step), hashes=False)
        return folder

    def delete(self, step: int) -> None:
        folder = self.root / step_name(step)
        # Remove the manifest first: an interrupted delete leaves an unlisted folder.
        (folder / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


S3_KEY_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def check_s3_credentials(uri: str) -> None:
    """A CheckpointError, at once, when the environment has no S3 keys for `uri` (instead of a
    minute of retried anonymous requests): the S3 store reads its endpoint and keys only from
    AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."""
    missing = [v for v in S3_KEY_VARIABLES if not os.environ.get(v)]
    if missing:
        raise CheckpointError(
            f"{uri}: no S3 credentials: {' and '.join(missing)} not set (set "
            "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and, for a server other than AWS, "
            "AWS_ENDPOINT_URL)"
        )


def open_store(uri: str) -> CheckpointStore:
    """`s3://bucket/prefix` -> S3CheckpointStore (endpoint and keys from the environment);
    anything else is a local folder."""
    if uri.startswith("s3://"):
        from fst.store.s3 import S3CheckpointStore

        check_s3_credentials(uri)
        return S3CheckpointStore(uri)
    if "://" in uri:
        raise CheckpointError(f"{uri!r}: unsupported checkpoint URI (use s3:// or a folder)")
    try:
        return LocalCheckpointStore(uri)
    except (FileExistsError, NotADirectoryError) as e:
        raise CheckpointError(f"{uri}: not a folder ({e.strerror})") from None


def latest_step(store: CheckpointStore) -> int | None:
    steps = store.steps()
    return steps[-1] if steps else None


def prune(store: CheckpointStore, keep_last: int, keep: Collection[int] = frozenset()) -> list[int]:
    """Delete every checkpoint but the newest `keep_last` and the steps in `keep`; return the
    deleted steps. `keep_last` <= 0 deletes nothing."""
    steps = store.steps()
    doomed = [s for s in steps[:-keep_last] if s not in keep] if keep_last > 0 else []
    for s in doomed:
        store.delete(s)
    return doomed


def split_checkpoint_uri(uri: str) -> tuple[str, int | None]:
    """`s3://b/p/step-00000010` -> ("s3://b/p", 10); a store URI alone -> (uri, None),
    meaning its latest checkpoint."""
    head, _, last = uri.rstrip("/").rpartition("/")
    step = parse_step_name(last)
    if step is None or head.endswith(":/"):  # "s3://step-00000010" is a bucket, not a step
        return uri.rstrip("/"), None
    return head, step


def fetch_model_dir(uri: str) -> Path:
    """The local `model/` folder of a checkpoint URI, downloaded to the cache if remote.

    `uri` names one checkpoint (`.../step-00000010`) or a store (its latest checkpoint)."""
    store_uri, step = split_checkpoint_uri(uri)
    store = open_store(store_uri)
    if step is None:
        step = latest_step(store)
        if step is None:
            raise CheckpointError(f"{store_uri}: no complete checkpoint to load a model from")
    model = store.materialize(step) / "model"
    if not model.is_dir():
        raise CheckpointError(f"{uri}: checkpoint of step {step} has no model/ folder")
    return model


class BackgroundCommits:
    """A run's checkpoint commits (upload, manifest last, prune) on a background thread, so a
    training step waits only for the checkpoint's local snapshot. At most one commit is in
    flight: `submit` first waits for the previous one (back-pressure: a save that comes
    before the last upload finished waits for it, so at most two snapshots are on disk).

    Nothing changes for readers: a checkpoint is listed once its manifest is up, so a process
    killed mid-upload leaves the previous checkpoint the latest, and a resume starts there.
    A failed commit is raised at the next `submit` or `wait` (the run then stops, as it would
    have at a synchronous save)."""

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._committed: list[str] = []

    def submit(self, commit: Callable[[], str]) -> None:
        """Run `commit` (returns the checkpoint's URI) in the background, after the last one."""
        import threading

        self.wait()

        def run() -> None:
            try:
                uri = commit()
            except BaseException as e:  # raised in the training thread by wait()
                self._error = e
                return
            with self._lock:
                self._committed.append(uri)

        self._thread = threading.Thread(target=run, name="checkpoint-commit", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until no commit is in flight; raise the error of one that failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"a checkpoint upload failed: {error}") from error

    def committed(self) -> list[str]:
        """URIs of the checkpoints committed since the last call, oldest first."""
        with self._lock:
            done, self._committed = self._committed, []
        return done
