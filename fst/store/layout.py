"""What a checkpoint looks like, wherever it is stored: the step folder names, the manifest
that commits a checkpoint, and the check of a folder's files against its manifest.

    <root>/step-00000010/manifest.json   written LAST; lists every file with size and sha256
    <root>/step-00000010/...             the checkpoint's files

Both stores build on this: the local folder (fst/store/checkpoints.py) and S3
(fst/store/s3.py). It is a leaf module, so neither store has to import the other for it.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt, or its store cannot be reached."""


def step_name(step: int) -> str:
    """10 -> `step-00000010`: zero-padded, so names sort like steps."""
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
    """The manifest of the files under `folder`: {step, created, files: {path: {size, sha256}},
    meta}."""
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
