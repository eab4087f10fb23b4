"""Two customers on one MinIO and one PostgreSQL: what B's credentials can and cannot reach.

The operator's provisioner (operator/fst_operator/tenancy.py) runs against the real servers
with their admin logins; the Kubernetes Secret store is a dict here (the operator test drives
it through a real API server). Everything B tries is what B's trainer pod could try with the
environment of its Secret.
"""

from __future__ import annotations

import io
import uuid
from typing import Any

import psycopg
import pytest
from fst_operator import tenancy
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error
from sqlalchemy.engine import make_url

from fst.store.db import RunDB
from fst.store.s3 import S3CheckpointStore, parse_endpoint
from tests.servers import TEST_BUCKET


class SecretStore:
    """The two Kubernetes calls the provisioner makes, on a dict."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}

    def read(self, namespace: str, name: str) -> dict[str, str] | None:
        return self.secrets.get((namespace, name))

    def write(self, obj: dict[str, Any], replace: dict[str, str] | None = None) -> None:
        meta = obj["metadata"]
        self.secrets[(meta["namespace"], meta["name"])] = dict(obj["stringData"])


@pytest.fixture
def tenants(s3_env: dict[str, str], pg_url: str, minio):
    prefix = f"s3://{TEST_BUCKET}/tenants-{uuid.uuid4().hex[:6]}"
    shared = f"s3://{TEST_BUCKET}/shared-{uuid.uuid4().hex[:6]}/models"
    provisioner = tenancy.TenantProvisioner(prefix, s3_env, pg_url, [shared])
    store = SecretStore()
    a = provisioner.ensure("team-a", store.read, store.write)
    b = provisioner.ensure("team-b", store.read, store.write)
    return provisioner, store, a, b, shared


def client_of(env: dict[str, str]) -> Minio:
    """A client with the SDK's own retries of dropped connections: MinIO may close a kept-alive
    connection after refusing a request, and a refusal is what these tests are about."""
    endpoint = parse_endpoint(env["AWS_ENDPOINT_URL"])
    return Minio(
        endpoint.host,
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        secure=endpoint.secure,
        region=env.get("AWS_REGION") or "us-east-1",
    )


def denied(call) -> str:
    with pytest.raises(S3Error) as e:
        call()
    assert e.value.code == "AccessDenied", e.value
    return e.value.code


def test_b_cannot_touch_a_objects(tenants, minio) -> None:
    _, store, a, b, shared = tenants
    env_a = store.secrets[("team-a", tenancy.SECRET_NAME)]
    env_b = store.secrets[("team-b", tenancy.SECRET_NAME)]
    # No root credential in the tenants' Secrets.
    for env in (env_a, env_b):
        assert env["AWS_ACCESS_KEY_ID"] != minio.env()["AWS_ACCESS_KEY_ID"]
        assert minio.env()["AWS_SECRET_ACCESS_KEY"] not in env.values()
    ca, cb = client_of(env_a), client_of(env_b)
    key_a = f"{a.prefix}runs/x/step-1/manifest.json"
    ca.put_object(TEST_BUCKET, key_a, io.BytesIO(b"{}"), 2)  # A writes its own prefix
    assert [o.object_name for o in ca.list_objects(TEST_BUCKET, a.prefix, recursive=True)] == [
        key_a
    ]

    denied(lambda: list(cb.list_objects(TEST_BUCKET, a.prefix, recursive=True)))
    denied(lambda: list(cb.list_objects(TEST_BUCKET, "", recursive=True)))  # no bucket listing
    denied(lambda: cb.get_object(TEST_BUCKET, key_a))
    denied(lambda: cb.stat_object(TEST_BUCKET, key_a))
    denied(lambda: cb.put_object(TEST_BUCKET, key_a, io.BytesIO(b"forged"), 6))
    denied(lambda: cb.put_object(TEST_BUCKET, f"{a.prefix}new", io.BytesIO(b"x"), 1))
    denied(lambda: cb.remove_object(TEST_BUCKET, key_a))
    errors = list(cb.remove_objects(TEST_BUCKET, [DeleteObject(key_a)]))
    assert errors and errors[0].code == "AccessDenied"
    # A's object is untouched.
    assert ca.get_object(TEST_BUCKET, key_a).read() == b"{}"
    # A prefix that only shares a string prefix with B's is not B's ("team-b" vs "team-bb").
    denied(lambda: cb.put_object(TEST_BUCKET, f"{b.prefix[:-1]}b/x", io.BytesIO(b"x"), 1))

    # B's own prefix works, through the checkpoint store a trainer uses.
    store_b = S3CheckpointStore(f"{b.root}runs/y", client=cb)
    assert store_b.steps() == []

    # The shared base-model prefix: readable by both, writable by neither.
    root = minio.client()
    bucket, _, key = shared.removeprefix("s3://").partition("/")
    root.put_object(bucket, f"{key}/base/config.json", io.BytesIO(b"{}"), 2)
    assert cb.get_object(bucket, f"{key}/base/config.json").read() == b"{}"
    denied(lambda: cb.put_object(bucket, f"{key}/base/config.json", io.BytesIO(b"xx"), 2))


def pg_connect(url: str) -> psycopg.Connection:
    return psycopg.connect(
        make_url(url).set(drivername="postgresql").render_as_string(hide_password=False),
        autocommit=True,
    )


def test_b_cannot_read_a_rows(tenants, pg_url: str) -> None:
    _, store, a, _, _ = tenants
    url_a = store.secrets[("team-a", tenancy.SECRET_NAME)]["FST_DATABASE_URL"]
    url_b = store.secrets[("team-b", tenancy.SECRET_NAME)]["FST_DATABASE_URL"]
    owner = make_url(pg_url)
    for url in (url_a, url_b):  # the owner's login is in no tenant Secret
        assert make_url(url).username not in (owner.username, None)
    with RunDB(url_a) as db:
        db.acquire_run("team-a.secret-run", "rl", {"steps": 1}).release()
        db.log_metrics("team-a.secret-run", 1, {"reward_mean": 0.9})
    with RunDB(url_b) as db:  # B sees its own (empty) tables
        assert db.run_info("team-a.secret-run") is None
        assert db.progress("team-a.secret-run") is None
    with pg_connect(url_b) as conn:
        for query in (
            f"SELECT * FROM {a.db_role}.runs",
            f"SELECT * FROM {a.db_role}.metrics",
            f"UPDATE {a.db_role}.runs SET writer = 'b'",
            f"SET ROLE {a.db_role}",
            "CREATE TABLE public.squat (x int)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(query)
    # B's password is not A's: logging in as A with it fails.
    forged = make_url(url_a).set(password=make_url(url_b).password)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        pg_connect(forged.render_as_string(hide_password=False))
    # The operator (owner) reads each tenant's progress from its schema.
    with RunDB(tenancy.schema_url(pg_url, a.db_role)) as db:
        progress = db.progress("team-a.secret-run")
        assert progress is not None and progress.reward == pytest.approx(0.9)


def test_ensure_is_idempotent_and_the_secret_rotates(tenants, s3_env, pg_url) -> None:
    provisioner, store, a, _, _ = tenants
    before = dict(store.secrets[("team-a", tenancy.SECRET_NAME)])
    # A restarted operator (a new provisioner) keeps the Secret and its logins working.
    again = tenancy.TenantProvisioner(provisioner.tenant_prefix, s3_env, pg_url, provisioner.shared)
    again.ensure("team-a", store.read, store.write)
    assert store.secrets[("team-a", tenancy.SECRET_NAME)] == before
    list(client_of(before).list_objects(TEST_BUCKET, a.prefix))
    pg_connect(before["FST_DATABASE_URL"]).close()
    # Deleting the Secret rotates both passwords; the old ones stop working.
    del store.secrets[("team-a", tenancy.SECRET_NAME)]
    tenancy.TenantProvisioner(provisioner.tenant_prefix, s3_env, pg_url).ensure(
        "team-a", store.read, store.write
    )
    after = store.secrets[("team-a", tenancy.SECRET_NAME)]
    assert after["AWS_SECRET_ACCESS_KEY"] != before["AWS_SECRET_ACCESS_KEY"]
    list(client_of(after).list_objects(TEST_BUCKET, a.prefix))
    with pytest.raises(S3Error):
        list(client_of(before).list_objects(TEST_BUCKET, a.prefix))
    with pytest.raises(psycopg.OperationalError):
        pg_connect(before["FST_DATABASE_URL"])
    pg_connect(after["FST_DATABASE_URL"]).close()


def test_names_do_not_collide() -> None:
    """`team-a` + `prod-x` and `team-a-prod` + `x`: different roles, prefixes and run keys."""
    from fst_operator.builders import run_key

    one, two = tenancy.tenant("team-a", "s3://b/t"), tenancy.tenant("team-a-prod", "s3://b/t")
    assert one.prefix == "t/team-a/" and two.prefix == "t/team-a-prod/"
    assert not two.prefix.startswith(one.prefix)
    assert one.db_role != two.db_role
    assert run_key("team-a", "prod-x") != run_key("team-a-prod", "x")
    long = tenancy.tenant("n" * 63, "s3://b/t")
    assert len(long.db_role) <= 63 and long.db_role != tenancy.tenant("n" * 62, "s3://b/t").db_role
