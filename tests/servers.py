"""Real MinIO and PostgreSQL servers on loopback for the integration tests.

MinIO is built from source with `go install` (network: the Go module proxy only) into a cache
outside the repo, once: $FST_CACHE/bin/minio-<release>/minio (FST_CACHE defaults to
~/.cache/fastslow). Set FST_MINIO_BIN to use a prebuilt binary instead.

PostgreSQL comes from the machine's packages (Debian: apt-get install postgresql), found in
/usr/lib/postgresql/<version>/bin, or set FST_PG_BIN to a folder holding initdb and postgres.
initdb refuses to run as root, so as root the cluster is owned and run by user `nobody`.

Every server gets a fresh temp folder (data + log) under /tmp and a free port on 127.0.0.1; the
folder is removed at the end unless `keep_logs` was set (the fixtures set it when tests failed).
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from minio import Minio

# The last MinIO release whose source the Go module proxy serves: tag
# RELEASE.2025-09-07T16-13-09Z is commit 07c3a429bfed (tags of this form are not semver, so
# `go install` needs the commit's pseudo-version).
MINIO_RELEASE = "RELEASE.2025-09-07T16-13-09Z"
MINIO_MODULE = "github.com/minio/minio@v0.0.0-20250907161309-07c3a429bfed"
MINIO_USER = "fst-test-admin"
MINIO_PASSWORD = "fst-test-secret-key"
PG_USER = "fst"
TEST_BUCKET = "fst-test"


class ServerUnavailable(RuntimeError):
    """A server binary is missing and cannot be built; the message says how to get it."""


def cache_root() -> Path:
    return Path(os.environ.get("FST_CACHE") or Path.home() / ".cache" / "fastslow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def wait_until(
    ready: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen, log: Path
) -> None:
    """Poll `ready` until it holds; fail early (with the log) if the server process died."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise ServerUnavailable(f"{what} exited with {proc.returncode}:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise ServerUnavailable(f"{what} not ready after {timeout:.0f}s:\n{log_tail(log)}")
        time.sleep(0.2)


def stop_process(
    proc: subprocess.Popen | None, sig: int = signal.SIGTERM, grace: float = 30
) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# ----------------------------------------------------------------------------- MinIO


def minio_binary(build: bool = True) -> Path:
    """$FST_MINIO_BIN, else the cached build of MINIO_RELEASE, built now if missing."""
    if env := os.environ.get("FST_MINIO_BIN"):
        path = Path(env)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ServerUnavailable(f"FST_MINIO_BIN={env} is not an executable file")
        return path
    target = cache_root() / "bin" / f"minio-{MINIO_RELEASE}" / "minio"
    if target.is_file():
        return target
    if not build:
        raise ServerUnavailable(f"{target} is missing")
    return build_minio(target)


def build_minio(target: Path) -> Path:
    """`go install` MinIO into `target` (a few minutes on 2 cores). Builds into a temp folder
    and renames, under a file lock: a killed or concurrent build never leaves half a binary."""
    go = shutil.which("go") or next(
        (p for p in ("/usr/local/go/bin/go", "/usr/lib/go/bin/go") if os.access(p, os.X_OK)), None
    )
    if go is None:
        raise ServerUnavailable(
            "MinIO is needed for the integration tests and Go is not installed to build it. "
            f"Install Go >= 1.24 (https://go.dev/dl) so that `go install {MINIO_MODULE}` can "
            "run, or set FST_MINIO_BIN to a prebuilt minio server binary."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():  # built by someone else while we waited
            return target
        gobin = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
        env = {**os.environ, "GOBIN": str(gobin), "CGO_ENABLED": "0"}
        t0 = time.monotonic()
        proc = subprocess.run(
            [go, "install", MINIO_MODULE], env=env, capture_output=True, text=True, timeout=3600
        )
        if proc.returncode != 0 or not (gobin / "minio").is_file():
            shutil.rmtree(gobin, ignore_errors=True)
            raise ServerUnavailable(
                f"`go install {MINIO_MODULE}` failed ({proc.returncode}); it needs the Go "
                "module proxy (GOPROXY). Or set FST_MINIO_BIN to a prebuilt minio binary.\n"
                + proc.stderr[-4000:]
            )
        (gobin / "minio").replace(target)
        shutil.rmtree(gobin, ignore_errors=True)
        (target.parent / "build-seconds.txt").write_text(f"{time.monotonic() - t0:.0f}\n")
    return target


class MinioServer:
    """A single-drive MinIO on 127.0.0.1 (or `host`: the real test node's address, for pods
    there); `stop()` and `start()` again keep port and data."""

    def __init__(self, binary: Path, root: Path, host: str = "127.0.0.1") -> None:
        self.binary, self.root, self.host = binary, root, host
        self.data = root / "data"
        self.log = root / "minio.log"
        self.port, self.console_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self.keep_logs = False

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """What a checkpoint store needs to reach this server (as a pod's Secret would)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": MINIO_USER,
            "AWS_SECRET_ACCESS_KEY": MINIO_PASSWORD,
            "AWS_REGION": "us-east-1",
        }

    def start(self, timeout: float = 90) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "MINIO_ROOT_USER": MINIO_USER,
            "MINIO_ROOT_PASSWORD": MINIO_PASSWORD,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
        }
        cmd = [
            str(self.binary),
            "server",
            "--quiet",
            "--address",
            f"{self.host}:{self.port}",
            "--console-address",
            f"{self.host}:{self.console_port}",
            str(self.data),
        ]
        with self.log.open("a") as log:
            log.write(f"\n--- start {time.strftime('%H:%M:%S')}: {' '.join(cmd)}\n")
            log.flush()
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._live, timeout, f"minio on port {self.port}", self.proc, self.log)

    def _live(self) -> bool:
        try:
            url = f"{self.endpoint_url}/minio/health/ready"
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def client(self) -> Minio:
        return Minio(
            f"127.0.0.1:{self.port}", MINIO_USER, MINIO_PASSWORD, secure=False, region="us-east-1"
        )

    def make_bucket(self, name: str) -> None:
        client = self.client()
        if not client.bucket_exists(name):
            client.make_bucket(name)


@contextmanager
def minio_server(
    binary: Path | None = None, bucket: str = TEST_BUCKET, host: str = "127.0.0.1"
) -> Iterator[MinioServer]:
    root = Path(tempfile.mkdtemp(prefix="fst-minio-"))
    server = MinioServer(binary or minio_binary(), root, host)
    try:
        server.start()
        server.make_bucket(bucket)
    except BaseException:
        server.stop()
        raise  # the folder (and its log) stays for a look
    try:
        yield server
    finally:
        server.stop()
        if not server.keep_logs:
            shutil.rmtree(server.root, ignore_errors=True)


# ----------------------------------------------------------------------------- PostgreSQL


def postgres_bin_dir() -> Path:
    """$FST_PG_BIN, else the newest /usr/lib/postgresql/<version>/bin, else initdb on PATH."""
    if env := os.environ.get("FST_PG_BIN"):
        if not all((Path(env) / b).is_file() for b in ("initdb", "postgres")):
            raise ServerUnavailable(f"FST_PG_BIN={env} holds no initdb and postgres binaries")
        return Path(env)
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: [int(x) for x in p.parent.name.split(".") if x.isdigit()],
        reverse=True,
    )
    candidates = list(versions)
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    raise ServerUnavailable(
        "PostgreSQL server binaries (initdb, postgres) not found: install them "
        "(Debian/Ubuntu: apt-get install postgresql) or set FST_PG_BIN to their folder."
    )


class PostgresServer:
    """A throwaway cluster on 127.0.0.1 (superuser `fst` trusted, other roles by password,
    fsync off for speed). With `host` (the real test node's address) it listens there instead,
    for pods on that node's /24, with the same rules.
    As root it runs as `nobody`: initdb and postgres refuse to run as root."""

    def __init__(self, bin_dir: Path, root: Path, host: str = "127.0.0.1") -> None:
        self.bin, self.root, self.host = bin_dir, root, host
        self.data, self.sockets = root / "data", root / "sockets"
        self.log = root / "postgres.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.keep_logs = False
        self.owner = pwd.getpwnam("nobody") if os.geteuid() == 0 else None

    def _run_as(self) -> dict:
        """subprocess arguments that drop root privileges (nothing to drop otherwise)."""
        if self.owner is None:
            return {}
        return {"user": self.owner.pw_uid, "group": self.owner.pw_gid, "extra_groups": []}

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{PG_USER}@{self.host}:{self.port}/{database}"

    def start(self, timeout: float = 60) -> None:
        self.sockets.mkdir(parents=True, exist_ok=True)
        self.log.touch()
        if self.owner is not None:
            for p in (self.root, self.sockets, self.log):
                os.chown(p, self.owner.pw_uid, self.owner.pw_gid)
        if not (self.data / "PG_VERSION").is_file():
            self._initdb()
        cmd = [
            str(self.bin / "postgres"),
            *("-D", str(self.data), "-p", str(self.port), "-k", str(self.sockets)),
            *("-c", f"listen_addresses={self.host}", "-c", "fsync=off"),
            *("-c", "synchronous_commit=off", "-c", "full_page_writes=off"),
        ]
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, **self._run_as()
            )
        wait_until(self._accepts, timeout, f"postgres on port {self.port}", self.proc, self.log)

    def _initdb(self) -> None:
        cmd = [str(self.bin / "initdb"), "-D", str(self.data), "-U", PG_USER]
        cmd += ["--auth=trust", "--no-sync", "--encoding=UTF8", "--no-locale"]
        with self.log.open("a") as log:
            proc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, **self._run_as()
            )
        if proc.returncode != 0:
            raise ServerUnavailable(f"initdb failed ({proc.returncode}):\n{log_tail(self.log)}")
        # The superuser logs in without a password; every other role (the operator's
        # per-namespace roles) with its password, so the tenancy tests prove a password is
        # needed, as on a real server.
        clients = "127.0.0.1/32" if self.host == "127.0.0.1" else f"{self.host}/24"
        (self.data / "pg_hba.conf").write_text(
            f"local all all trust\n"
            f"host all {PG_USER} {clients} trust\n"
            f"host all all {clients} scram-sha-256\n"
        )

    def _accepts(self) -> bool:
        try:
            with psycopg.connect(self._dsn("postgres"), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def _dsn(self, database: str) -> str:
        return f"host={self.host} port={self.port} user={PG_USER} dbname={database}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        with psycopg.connect(self._dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT)  # SIGINT: "fast" shutdown, clean on disk
        self.proc = None


@contextmanager
def postgres_server(host: str = "127.0.0.1") -> Iterator[PostgresServer]:
    # Directly under /tmp: an unprivileged owner must be able to reach the folder.
    root = Path(tempfile.mkdtemp(prefix="fst-pg-"))
    server = PostgresServer(postgres_bin_dir(), root, host)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    try:
        yield server
    finally:
        server.stop()
        if not server.keep_logs:
            shutil.rmtree(server.root, ignore_errors=True)
