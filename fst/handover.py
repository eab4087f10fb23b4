"""The I/O the stream planner (fst/plan.py) needs, shared by `fst stream` and the operator:

    source_fingerprint(task)      a content hash of a stage's data (local file or s3:// prefix)
    checkpoint_population(uri)    the prompt population saved in a checkpoint, best first

The population a next stage inherits is read from the previous stage's final checkpoint, the
same file on a laptop and in S3: the prompts saved with those weights, whole (a cluster's
status holds only a reference to it, the checkpoint URI). Torch-free.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fst.config import TaskConfig

STATE_FILE = "state.json"  # fst/run_state.py writes it into every checkpoint
MANIFEST_FILE = "manifest.json"  # written last: a checkpoint without it is not complete


class HandoverError(RuntimeError):
    """A checkpoint to hand over is missing, incomplete or does not match its manifest."""


def source_fingerprint(task: TaskConfig) -> str | None:
    """A content hash of the stage's data source, or None for generated tasks."""
    path = task.params.get("path")
    if task.name != "jsonl" or not path:
        return None
    if str(path).startswith("s3://"):
        from fst.store.s3 import s3_prefix_fingerprint

        return s3_prefix_fingerprint(str(path))
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else None


def _read(uri: str, name: str) -> bytes:
    if uri.startswith("s3://"):
        from fst.store.s3 import fetch_text

        try:
            return fetch_text(f"{uri.rstrip('/')}/{name}").encode()
        except FileNotFoundError:
            raise HandoverError(f"{uri}: no {name}") from None
    path = Path(uri) / name
    if not path.is_file():
        raise HandoverError(f"{uri}: no {name}")
    return path.read_bytes()


def checkpoint_state(uri: str) -> dict[str, Any]:
    """state.json of the checkpoint at `uri` (a local step folder or s3://.../step-N), checked
    against the checkpoint's manifest (complete, and the file's sha256 as saved)."""
    manifest = json.loads(_read(uri, MANIFEST_FILE))
    data = _read(uri, STATE_FILE)
    want = (manifest.get("files") or {}).get(STATE_FILE, {}).get("sha256")
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise HandoverError(f"{uri}: {STATE_FILE} does not match the checkpoint's manifest")
    state: dict[str, Any] = json.loads(data)
    return state


def checkpoint_population(uri: str) -> list[str]:
    """The prompt population saved in the checkpoint at `uri`, best first."""
    population = checkpoint_state(uri).get("population") or []
    return [p["text"] for p in population]
