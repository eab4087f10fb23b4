"""Checkpoint stores: a checkpoint is a folder of files, committed atomically.

Layout (a local folder here; an S3 prefix in fst/store/s3.py):
    <root>/step-00000010/manifest.json   written LAST; lists every file with size and sha256
    <root>/step-00000010/model/...       a loadable Hugging Face model folder
    <root>/step-00000010/...             optimizer, RNG, trainer state, config

A checkpoint without a manifest is never listed or loaded: a crash mid-save leaves at most an
ignored staging folder, and the previous checkpoint stays the latest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    pass


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def parse_step_name(name: str) -> int | None:
    """`step-00000010` -> 10; anything else -> None."""
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_manifest(folder: Path, step: int, meta: dict[str, Any]) -> dict[str, Any]:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(folder).as_posix()] = {
                "size": p.stat().st_size,
                "sha256": sha256_file(p),
            }
    return {"step": step, "created": time.time(), "files": files, "meta": meta}


def verify_folder(folder: Path, manifest: dict[str, Any], hashes: bool = True) -> None:
    """Raise CheckpointError if a file is missing, has the wrong size, or (hashes) wrong sha."""
    for rel, info in manifest["files"].items():
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"{folder}: missing {rel}")
        if p.stat().st_size != info["size"]:
            raise CheckpointError(
                f"{folder}: {rel} has {p.stat().st_size} bytes, manifest says {info['size']}"
            )
        if hashes and sha256_file(p) != info["sha256"]:
            raise CheckpointError(f"{folder}: {rel} does not match its sha256")


class CheckpointStore(Protocol):
    uri: str

    def commit(self, step: int, staging: Path, meta: dict[str, Any]) -> str:
        """Make the files in local folder `staging` the checkpoint of `step`; return its URI.
        The staging folder is consumed."""
        ...

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint (manifest present), ascending."""
        ...

    def materialize(self, step: int) -> Path:
        """A local folder holding the verified checkpoint of `step`."""
        ...

    def manifest(self, step: int) -> dict[str, Any]: ...

    def delete(self, step: int) -> None: ...

    def staging_dir(self) -> Path:
        """A fresh local folder to write a checkpoint's files into before `commit`."""
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

    def staging_dir(self) -> Path:
        path = self.root / f".staging-{uuid.uuid4().hex[:12]}"
        path.mkdir()
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
        return str(final)

    def steps(self) -> list[int]:
        out = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / MANIFEST).is_file():
                out.append(int(m.group(1)))
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


def open_store(uri: str) -> CheckpointStore:
    """`s3://bucket/prefix` -> S3CheckpointStore (endpoint and keys from the environment);
    anything else is a local folder."""
    if uri.startswith("s3://"):
        from fst.store.s3 import S3CheckpointStore

        return S3CheckpointStore(uri)
    if "://" in uri:
        raise CheckpointError(f"{uri!r}: unsupported checkpoint URI (use s3:// or a folder)")
    return LocalCheckpointStore(uri)


def latest_step(store: CheckpointStore) -> int | None:
    steps = store.steps()
    return steps[-1] if steps else None


def prune(store: CheckpointStore, keep_last: int, keep: set[int] = frozenset()) -> list[int]:
    """Delete all but the last `keep_last` checkpoints and those in `keep` (e.g. the best)."""
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
