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
def s3_uri(s3_env: dict[str, str], request: pytest.FixtureRequest) -> str:
    """A fresh prefix in the test bucket, unique to this test."""
    name = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40]
    return f"s3://{TEST_BUCKET}/{name}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """A new, empty Postgres database for this test."""
    return postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")
