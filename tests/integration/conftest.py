"""Session-wide MinIO and PostgreSQL servers (tests/servers.py) and per-test handles on them.

A server that cannot be started FAILS the tests that need it (never skips): the message says
how to install or build it. When tests failed, the servers' folders (data and logs) are kept
and listed at the end of the run.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack
from typing import TypeVar

import pytest

from tests.servers import (
    TEST_BUCKET,
    MinioServer,
    PostgresServer,
    ServerUnavailable,
    minio_server,
    postgres_server,
)

T = TypeVar("T")
_kept_logs: list[str] = []


def _enter_or_fail(stack: ExitStack, server: AbstractContextManager[T]) -> T:
    try:
        return stack.enter_context(server)
    except ServerUnavailable as e:
        problem = str(e)
    pytest.fail(problem, pytrace=False)  # outside `except`: the message, no chained traceback


def _keep_logs_if_failed(request: pytest.FixtureRequest, server, name: str) -> None:
    if request.session.testsfailed:
        server.keep_logs = True
        _kept_logs.append(f"{name}: {server.root} (log {server.log})")


def pytest_terminal_summary(terminalreporter) -> None:
    for line in _kept_logs:
        terminalreporter.write_line(f"kept server folder {line}")


@pytest.fixture(scope="session")
def minio(request: pytest.FixtureRequest) -> Iterator[MinioServer]:
    with ExitStack() as stack:
        server = _enter_or_fail(stack, minio_server(bucket=TEST_BUCKET))
        yield server
        _keep_logs_if_failed(request, server, "minio")


@pytest.fixture(scope="session")
def postgres(request: pytest.FixtureRequest) -> Iterator[PostgresServer]:
    with ExitStack() as stack:
        server = _enter_or_fail(stack, postgres_server())
        yield server
        _keep_logs_if_failed(request, server, "postgres")


@pytest.fixture
def s3_env(minio: MinioServer, monkeypatch: pytest.MonkeyPatch, tmp_path) -> dict[str, str]:
    """The environment a trainer pod would get: endpoint and keys of the test MinIO, and a
    private local cache. Also applied to this process."""
    env = {**minio.env(), "FST_CACHE": str(tmp_path / "cache")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def s3_uri(s3_env: dict[str, str], request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh prefix in the test bucket, unique to this test; emptied after it (a SmolLM2
    checkpoint with its optimizer state is ~2 GB, and the session's tests share one disk)."""
    name = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40]
    prefix = f"{name}-{uuid.uuid4().hex[:6]}"
    yield f"s3://{TEST_BUCKET}/{prefix}"
    from minio.deleteobjects import DeleteObject

    from fst.store.s3 import make_client, parse_endpoint

    client = make_client(parse_endpoint(s3_env["AWS_ENDPOINT_URL"]))
    objects = client.list_objects(TEST_BUCKET, prefix=f"{prefix}/", recursive=True)
    doomed = (DeleteObject(o.object_name) for o in objects if o.object_name)
    for error in client.remove_objects(TEST_BUCKET, doomed):
        print(f"could not delete {error}")


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """A new, empty Postgres database for this test."""
    return postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")
