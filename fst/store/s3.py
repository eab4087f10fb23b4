"""Checkpoints in S3 (AWS, MinIO, any S3-compatible store), same layout as a local folder
(fst/store/layout.py):

    s3://bucket/prefix/step-00000010/manifest.json   uploaded LAST; lists every file
    s3://bucket/prefix/step-00000010/model/...       ...and the other files of the checkpoint

S3 has no rename, so atomicity comes from the manifest alone: a step is listed (and loadable)
only once its manifest exists, and the manifest is written only after every other object was
uploaded and checked. A save killed half-way leaves unlisted objects (a later commit removes
them once they are an hour old); the previous checkpoint is never touched by a save.

Endpoint and credentials come from the environment, so a Kubernetes Secret can provide them:
    AWS_ENDPOINT_URL        http://minio:9000 (scheme decides TLS); default https://s3.amazonaws.com
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN (optional)
    AWS_REGION              optional (AWS_DEFAULT_REGION is also read)
    FST_S3_CA_BUNDLE        a PEM file of CAs to trust (a private MinIO's own CA); else
                            SSL_CERT_FILE, else the certifi bundle
    FST_S3_INSECURE=1       do not verify TLS certificates (tests, never production)
    FST_S3_RETRY_SECONDS    how long one operation keeps retrying transient errors (default 60)
    FST_CACHE               local cache root (staging and downloaded checkpoints);
                            default ~/.cache/fastslow

Integrity: each file's sha256 (computed locally into the manifest) is also stored as object
metadata; after each upload a stat checks the object's size and that metadata. The content
itself is checked end to end when a checkpoint is downloaded: every file is hashed and
compared with the manifest before the checkpoint is handed out.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError

from fst.store.layout import (
    MANIFEST,
    CheckpointError,
    build_manifest,
    parse_step_name,
    step_name,
    verify_folder,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_ENDPOINT = "https://s3.amazonaws.com"
DEFAULT_PART_SIZE = 64 << 20  # S3 allows 10,000 parts: 64 MiB parts cover files up to 640 GiB
MIN_PART_SIZE = 5 << 20  # the S3 minimum for every part but the last
SHA_META = "sha256"  # stored as x-amz-meta-sha256
# S3 error codes worth retrying even when the HTTP status is below 500.
_TRANSIENT_CODES = {"RequestTimeout", "SlowDown", "ServiceUnavailable", "InternalError"}


def cache_root() -> Path:
    return Path(os.environ.get("FST_CACHE") or Path.home() / ".cache" / "fastslow")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> ("bucket", "some/prefix"); the prefix may be empty."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise CheckpointError(f"{uri!r} is not an s3://bucket[/prefix] URI")
    if parts.query or parts.fragment:
        raise CheckpointError(f"{uri!r}: query strings and fragments are not allowed")
    prefix = parts.path.strip("/")
    if prefix and not _is_plain_relative(prefix):
        raise CheckpointError(f"{uri!r}: the prefix must not hold empty, '.' or '..' parts")
    return parts.netloc, prefix


def _is_plain_relative(path: str) -> bool:
    """No '', '.' or '..' segments: safe to use both as a key and as a local sub-path."""
    return all(part not in ("", ".", "..") for part in path.split("/"))


@dataclass(frozen=True)
class Endpoint:
    """Where the S3 API is and how to reach it (host:port, TLS or not)."""

    host: str
    secure: bool

    @property
    def url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.host}"


def parse_endpoint(url: str) -> Endpoint:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CheckpointError(f"AWS_ENDPOINT_URL={url!r}: expected http(s)://host[:port]")
    if parts.path.strip("/"):
        raise CheckpointError(f"AWS_ENDPOINT_URL={url!r}: a path is not supported")
    return Endpoint(parts.netloc, parts.scheme == "https")


def is_transient(exc: BaseException) -> bool:
    """Network trouble and server-side (5xx) errors: worth trying again. Anything else
    (access denied, no such bucket, bad request) will not fix itself."""
    if isinstance(exc, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, ServerError):
        return exc.status_code >= 500
    if isinstance(exc, InvalidResponseError):
        return True  # a proxy's HTML error page while the server restarts
    if isinstance(exc, S3Error):
        status = getattr(exc.response, "status", 0) or 0
        return status >= 500 or exc.code in _TRANSIENT_CODES
    return False


def make_client(endpoint: Endpoint, env: dict[str, str] | None = None) -> Minio:
    """A client with short network timeouts and no retries of its own: `S3CheckpointStore`
    retries whole operations itself, under one time budget it can report on."""
    env = dict(os.environ if env is None else env)
    insecure = env.get("FST_S3_INSECURE", "").lower() in ("1", "true", "yes")
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=10, read=60),
        retries=False,
        maxsize=8,
        cert_reqs="CERT_NONE" if insecure else "CERT_REQUIRED",
        ca_certs=None if insecure else _ca_bundle(env),
    )
    return Minio(
        endpoint.host,
        access_key=env.get("AWS_ACCESS_KEY_ID") or None,
        secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
        session_token=env.get("AWS_SESSION_TOKEN") or None,
        secure=endpoint.secure,
        region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        http_client=http,
    )


def _ca_bundle(env: dict[str, str]) -> str:
    return env.get("FST_S3_CA_BUNDLE") or env.get("SSL_CERT_FILE") or certifi.where()


class S3CheckpointStore:
    """A `CheckpointStore` under `s3://bucket/prefix`; see the module docstring."""

    def __init__(
        self,
        uri: str,
        *,
        client: Minio | None = None,
        endpoint_url: str | None = None,
        retry_seconds: float | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        cache_dir: Path | None = None,
        abandoned_after_s: float = 3600.0,
    ) -> None:
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or DEFAULT_ENDPOINT
        self.endpoint = parse_endpoint(url)
        self.client = client or make_client(self.endpoint)
        if retry_seconds is None:
            retry_seconds = float(os.environ.get("FST_S3_RETRY_SECONDS", "60"))
        self.retry_seconds = retry_seconds
        if part_size < MIN_PART_SIZE:
            raise CheckpointError(f"part size {part_size} is below the S3 minimum of 5 MiB")
        self.part_size = part_size
        self.abandoned_after_s = abandoned_after_s
        cache = cache_dir or cache_root()
        self.staging_root = cache / "staging"
        self.download_root = cache / "s3" / self.endpoint.host.replace(":", "_") / self.bucket
        if self.prefix:
            self.download_root = self.download_root / self.prefix

    # ------------------------------------------------------------------ naming

    def key(self, step: int, rel: str = "") -> str:
        """The object key of file `rel` of `step` (or the step's prefix, ending in '/')."""
        parts = [self.prefix, step_name(step), rel] if self.prefix else [step_name(step), rel]
        return "/".join(parts)

    def where(self, key: str) -> str:
        return f"{self.endpoint.url} bucket {self.bucket!r} key {key!r}"

    # ------------------------------------------------------------------ retries

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        """Run `fn`, retrying transient errors with backoff for up to `retry_seconds`."""
        deadline = None
        delay = 0.5
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except CheckpointError:
                raise
            except Exception as exc:
                if not is_transient(exc):
                    raise CheckpointError(f"{what} failed at {self.where(key)}: {exc}") from exc
                now = time.monotonic()
                deadline = deadline or now + self.retry_seconds
                if now >= deadline:
                    raise CheckpointError(
                        f"{what} failed at {self.where(key)}: still failing after "
                        f"{attempt} attempts over {self.retry_seconds:.0f}s: {exc}"
                    ) from exc
                log.warning("%s at %s: %s; retrying", what, self.where(key), _short(exc))
                time.sleep(min(delay * random.uniform(0.5, 1.0), deadline - now))
                delay = min(delay * 2, 8.0)

    # ------------------------------------------------------------------ listing

    def _step_objects(self) -> dict[int, dict[str, float]]:
        """Every object under the store's prefix, grouped by step (complete or not):
        step -> {key: last-modified time (unix seconds)}."""
        base = f"{self.prefix}/" if self.prefix else ""

        def run() -> list[Any]:
            return list(self.client.list_objects(self.bucket, prefix=base, recursive=True))

        out: dict[int, dict[str, float]] = {}
        for obj in self._call("list", base, run):
            step = parse_step_name(obj.object_name[len(base) :].split("/", 1)[0])
            if step is not None:
                modified = obj.last_modified.timestamp() if obj.last_modified else 0.0
                out.setdefault(step, {})[obj.object_name] = modified
        return out

    def steps(self) -> list[int]:
        listing = self._step_objects()
        return sorted(s for s, keys in listing.items() if self.key(s, MANIFEST) in keys)

    def manifest(self, step: int) -> dict[str, Any]:
        key = self.key(step, MANIFEST)

        def run() -> bytes:
            resp = self.client.get_object(self.bucket, key)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        try:
            return json.loads(self._call("read manifest", key, run))
        except CheckpointError as e:
            if isinstance(e.__cause__, S3Error) and e.__cause__.code == "NoSuchKey":
                msg = f"no complete checkpoint for step {step} in {self.uri}"
                raise CheckpointError(msg) from e
            raise

    # ------------------------------------------------------------------ saving

    def staging_dir(self, name: str | None = None) -> Path:
        self.staging_root.mkdir(parents=True, exist_ok=True)
        if name is not None:  # one folder that a run's ranks share (see CheckpointStore)
            path = self.staging_root / f"staging-{name}"
            path.mkdir(exist_ok=True)
            return path
        _drop_stale(self.staging_root, max_age_s=24 * 3600)
        return Path(tempfile.mkdtemp(prefix="staging-", dir=self.staging_root))

    def upload_part(self, step: int, staging: Path) -> dict[str, Any]:
        """Upload the files of `staging` as part of `step`'s checkpoint, without committing it;
        return their manifest entries. A run on several nodes: each node uploads the shards
        on its own disk, then rank 0 commits with `uploaded=` every node's entries."""
        files: dict[str, Any] = build_manifest(staging, step, {})["files"]
        for rel, info in files.items():
            self._upload(staging / rel, self.key(step, rel), info)
        return files

    def commit(
        self,
        step: int,
        staging: Path,
        meta: dict[str, Any],
        uploaded: dict[str, Any] | None = None,
    ) -> str:
        """Upload `staging`'s files, then the manifest, which also lists the `uploaded` files
        (other nodes' parts, already in place: see upload_part)."""
        manifest = build_manifest(staging, step, meta)
        existing = self._step_objects()
        old_keys = set(existing.get(step, {}))
        if old_keys:
            # Re-saving a step (after a resume): hide the old copy first, so that no reader
            # ever sees its manifest next to a mix of old and new files.
            self._remove([self.key(step, MANIFEST)])
        for rel, info in manifest["files"].items():
            self._upload(staging / rel, self.key(step, rel), info)
        for rel, info in (uploaded or {}).items():
            self._check_uploaded(self.key(step, rel), info)
        manifest["files"] = dict(sorted({**manifest["files"], **(uploaded or {})}.items()))
        stale = old_keys - {self.key(step, rel) for rel in manifest["files"]}
        self._remove(sorted(stale - {self.key(step, MANIFEST)}))
        self._put_manifest(step, manifest)
        shutil.rmtree(staging, ignore_errors=True)
        self._remove_abandoned(existing, step)
        return self.step_uri(step)

    def step_uri(self, step: int) -> str:
        return f"s3://{self.bucket}/{self.key(step)}"

    def _remove_abandoned(self, listing: dict[int, dict[str, float]], current: int) -> None:
        """Drop the objects of saves that died before their manifest (never listed, so just
        garbage). Only those untouched for `abandoned_after_s`: a younger one might be a save
        still in progress in some other process, and deleting under it would break it."""
        cutoff = time.time() - self.abandoned_after_s
        for s, objects in listing.items():
            if s == current or self.key(s, MANIFEST) in objects:
                continue
            if max(objects.values()) < cutoff:
                log.info("removing abandoned incomplete checkpoint %s", self.key(s))
                self._remove(sorted(objects))

    def _upload(self, path: Path, key: str, info: dict[str, Any]) -> None:
        def run() -> None:
            self.client.fput_object(
                self.bucket,
                key,
                str(path),
                metadata={SHA_META: info["sha256"]},
                part_size=self.part_size,
                num_parallel_uploads=2,
            )
            self._check_uploaded(key, info)

        self._call("upload", key, run)

    def _check_uploaded(self, key: str, info: dict[str, Any]) -> None:
        stat = self.client.stat_object(self.bucket, key)
        sha = _user_meta(stat.metadata, SHA_META)
        if stat.size != info["size"] or sha != info["sha256"]:
            raise CheckpointError(
                f"upload to {self.where(key)} did not verify: stored {stat.size} bytes, "
                f"sha256 {sha}; expected {info['size']} bytes, sha256 {info['sha256']}"
            )

    def _put_manifest(self, step: int, manifest: dict[str, Any]) -> None:
        key = self.key(step, MANIFEST)
        body = json.dumps(manifest, indent=1).encode()

        def run() -> None:
            self.client.put_object(
                self.bucket, key, io.BytesIO(body), len(body), content_type="application/json"
            )
            if self.client.stat_object(self.bucket, key).size != len(body):
                raise CheckpointError(f"manifest upload to {self.where(key)} did not verify")

        self._call("upload manifest", key, run)

    # ------------------------------------------------------------------ loading

    def materialize(self, step: int) -> Path:
        """Download (or reuse) a verified local copy of the checkpoint of `step`."""
        manifest = self.manifest(step)
        final = self.download_root / step_name(step)
        if _cached_copy_matches(final, manifest):
            return final
        self.download_root.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=self.download_root))
        try:
            for rel in manifest["files"]:
                if not _is_plain_relative(rel):
                    raise CheckpointError(f"{self.uri}: manifest of step {step} lists {rel!r}")
                self._download(self.key(step, rel), partial / rel)
            verify_folder(partial, manifest, hashes=True)
            # The manifest goes in last: a folder without it is never reused.
            (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
            _replace_dir(partial, final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return final

    def _download(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._call("download", key, lambda: self.client.fget_object(self.bucket, key, str(dest)))

    # ------------------------------------------------------------------ deleting

    def delete(self, step: int) -> None:
        keys = list(self._step_objects().get(step, {}))
        manifest = self.key(step, MANIFEST)
        # Manifest first: an interrupted delete leaves an unlisted, incomplete step.
        if manifest in keys:
            self._remove([manifest])
        self._remove([k for k in keys if k != manifest])

    def _remove(self, keys: list[str]) -> None:
        if not keys:
            return

        def run() -> None:
            errors = list(self.client.remove_objects(self.bucket, [DeleteObject(k) for k in keys]))
            if errors:
                raise CheckpointError(f"could not delete {errors[0].name}: {errors[0].message}")

        self._call("delete", keys[0], run)


def _user_meta(metadata: Any, name: str) -> str | None:
    """A user metadata value from a stat's headers (S3 prefixes them with x-amz-meta-)."""
    for k, v in (metadata or {}).items():
        if k.lower() == f"x-amz-meta-{name}":
            return v
    return None


def _cached_copy_matches(folder: Path, manifest: dict[str, Any]) -> bool:
    """A previous download of this exact checkpoint, complete (its manifest was written after
    the hashes were checked) and with every file still the right size."""
    try:
        cached = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if cached != manifest:
        return False
    try:
        verify_folder(folder, manifest, hashes=False)
    except CheckpointError:
        return False
    return True


def _replace_dir(src: Path, dest: Path) -> None:
    """Move folder `src` to `dest`, replacing an old `dest` (renames within one filesystem)."""
    if dest.exists():
        old = dest.with_name(f".old-{uuid.uuid4().hex[:12]}")
        dest.replace(old)
        shutil.rmtree(old, ignore_errors=True)
    src.replace(dest)


def _drop_stale(root: Path, max_age_s: float) -> None:
    """Remove staging folders left by processes that died long ago (never in use now)."""
    cutoff = time.time() - max_age_s
    for p in root.glob("staging-*"):
        try:
            if p.stat().st_mtime < cutoff:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


# ----------------------------------------------------------------------------- data sources


def _data_objects(uri: str) -> tuple[Minio, str, list[Any]]:
    """The objects a data URI names: the object itself, or every object under the prefix."""
    bucket, key = parse_s3_uri(uri)
    client = make_client(parse_endpoint(os.environ.get("AWS_ENDPOINT_URL") or DEFAULT_ENDPOINT))
    objects = sorted(
        (o for o in client.list_objects(bucket, prefix=key, recursive=True) if not o.is_dir),
        key=lambda o: o.object_name,
    )
    exact = [o for o in objects if o.object_name == key]
    return client, bucket, exact or objects


def s3_prefix_fingerprint(uri: str) -> str:
    """A hash of the names, sizes and ETags under `uri`: it changes when the data does."""
    _, _, objects = _data_objects(uri)
    listing = "\n".join(f"{o.object_name} {o.size} {o.etag}" for o in objects)
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def fetch_text(uri: str) -> str:
    """The UTF-8 text of the object at `uri`, or of every object under it, in key order."""
    client, bucket, objects = _data_objects(uri)
    if not objects:
        raise FileNotFoundError(f"{uri}: no objects")
    parts = []
    for o in objects:
        resp = client.get_object(bucket, o.object_name)
        try:
            parts.append(resp.read().decode("utf-8-sig"))
        finally:
            resp.close()
            resp.release_conn()
    return "\n".join(parts)
